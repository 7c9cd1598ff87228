"""Table 7: Caltech101 classification with linear SVMs on pretrained SPP-net features.

    python -m experiments.caltech101 --checkpoint-workdir runs/zf5 [--workdir runs/zf5-caltech101]
        [--dataset shapes|caltech101] [--data-dir DIR] [--nospp-checkpoint-workdir DIR]
        [--splits 10] [--train-per-class 30] [--test-per-class 50] [--mean constant|image] [--quick]

The checkpoint workdir comes from ``make train`` (e.g. ``make train MODEL=zf5
WORKDIR=runs/zf5``) and is only read.  Per random split: 30 training images per
class and up to 50 of the rest for testing; accuracy (mean of per-class
accuracies) is reported as mean +- std over the splits (10 by default). Images are
minus the constant 128, as the paper (``--mean image``: the training mean image).  Writes
``caltech101.md`` / ``.json`` / ``.png`` in ``--workdir`` (default
``<checkpoint-workdir>-caltech101``); features are cached in ``<workdir>/features``.
Embedded data (default): the shapes ``fine`` variant (30 classes), a pool of 2400 images.
"""
import argparse
import logging
import sys

from experiments.voc_cls import add_common, common_kwargs, workdir_for
from spp_jax.devices import log_devices
from spp_jax.errors import UserError
from spp_jax.transfer.datasets import CALTECH_DATASETS
from spp_jax.transfer.run import CALTECH_SETTINGS, run_caltech


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="shapes", choices=CALTECH_DATASETS)
    add_common(ap, ",".join(CALTECH_SETTINGS))
    ap.add_argument("--pool-size", type=int, default=2400, help="embedded data only: images in the pool")
    ap.add_argument("--splits", type=int, default=10, help="random train/test splits (10)")
    ap.add_argument("--train-per-class", type=int, default=30)
    ap.add_argument("--test-per-class", type=int, default=50)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    log_devices()
    if args.quick:
        args.pool_size, args.splits = min(args.pool_size, 450), min(args.splits, 2)
        args.train_per_class, args.test_per_class = min(args.train_per_class, 3), min(args.test_per_class, 3)
    try:
        wd = workdir_for(args, "caltech101")
        kw = common_kwargs(args)
        kw["settings"] = kw["settings"] or CALTECH_SETTINGS
        return run_caltech(wd, args.checkpoint_workdir, pool_size=args.pool_size, splits=args.splits,
                           train_per_class=args.train_per_class, test_per_class=args.test_per_class, **kw)
    except (UserError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
