"""Table 6: VOC 2007 classification with linear SVMs on pretrained SPP-net features.

    python -m experiments.voc_cls --checkpoint-workdir runs/zf5 [--workdir runs/zf5-voc-cls]
        [--dataset shapes|voc/2007] [--data-dir DIR] [--nospp-checkpoint-workdir DIR]
        [--settings spp_crop224,spp_full224,spp_full392] [--mean constant|image] [--quick]

The checkpoint workdir comes from ``make train`` (e.g. ``make train MODEL=zf5
WORKDIR=runs/zf5``) and is only read (a msgpack file with its JSON sidecar works too).
Default settings: no-SPP crop 224, SPP crop 224, SPP full 224 and full 392 (ZF-5) /
364 (Overfeat). Images are minus the constant 128, as the paper (``--mean image``:
the training mean image).  Writes ``voc_cls.md`` / ``.json`` / ``.png``
in ``--workdir`` (default ``<checkpoint-workdir>-voc-cls``); features are cached in
``<workdir>/features`` so an interrupted run resumes.  Embedded data (default):
the shapes ``multilabel`` variant, 500 trainval / 300 test images.
"""
import argparse
import logging
import os
import sys

from spp_jax.devices import log_devices
from spp_jax.errors import UserError
from spp_jax.pretrained import MEAN_CHOICES
from spp_jax.transfer import classify
from spp_jax.transfer.datasets import VOC_DATASETS
from spp_jax.transfer.features import LAYERS
from spp_jax.transfer.run import run_voc


def add_common(ap, settings_help):
    ap.add_argument("--checkpoint-workdir", default=None,
                    help="a `make train` workdir (read only), or a .msgpack with its .json sidecar")
    ap.add_argument("--nospp-checkpoint-workdir", default=None,
                    help="a workdir trained with spp=false, for the 'no SPP crop 224' column")
    ap.add_argument("--data-dir", default=None, help="TFDS data_dir for the real datasets")
    ap.add_argument("--workdir", default=None, help="output directory (default <checkpoint-workdir>-<task>)")
    ap.add_argument("--settings", default=None, help=f"comma-separated settings (default {settings_help})")
    ap.add_argument("--mean", choices=MEAN_CHOICES, default="constant",
                    help="subtract the constant 128 (the paper's Appendix A; default) or the training mean image")
    ap.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated subset of {','.join(LAYERS)}")
    ap.add_argument("--svm-c", type=float, default=classify.DEFAULT_C, help="SVM C (features are L2-normalised)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="crops per compiled batch")
    ap.add_argument("--full-batch-size", type=int, default=4, help="full images per compiled batch")
    ap.add_argument("--bucket-step", type=float, default=0.5,
                    help="full images are padded to multiples of this fraction of the shorter side")
    ap.add_argument("--quick", action="store_true", help="a few images only (a smoke test)")
    ap.add_argument("--no-progress", action="store_true")


def common_kwargs(args):
    return dict(nospp_workdir=args.nospp_checkpoint_workdir, dataset=args.dataset, data_dir=args.data_dir,
                settings=[s for s in args.settings.split(",") if s.strip()] if args.settings else None,
                mean=args.mean,
                layers=[s.strip() for s in args.layers.split(",") if s.strip()], seed=args.seed, C=args.svm_c,
                batch_size=args.batch_size, full_batch_size=args.full_batch_size,
                bucket_step=args.bucket_step, progress=not args.no_progress)


def workdir_for(args, task):
    """Checked layers, then the output workdir; FileNotFoundError (with how to get one) without a checkpoint."""
    bad = [k for k in args.layers.split(",") if k.strip() and k.strip() not in LAYERS]
    if bad:
        raise ValueError(f"unknown layers {bad}; valid: {', '.join(LAYERS)}")
    if args.workdir:
        return args.workdir
    if args.checkpoint_workdir:
        return os.path.normpath(args.checkpoint_workdir) + f"-{task}"
    from spp_jax.transfer.run import NO_CHECKPOINT_HELP
    raise UserError(NO_CHECKPOINT_HELP)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="shapes", choices=VOC_DATASETS)
    add_common(ap, "nospp_crop224,spp_crop224,spp_full224,spp_full392 (spp_full364 for Overfeat)")
    ap.add_argument("--trainval-size", type=int, default=500, help="embedded data only")
    ap.add_argument("--test-size", type=int, default=300, help="embedded data only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    log_devices()
    if args.quick:
        args.trainval_size, args.test_size = min(args.trainval_size, 40), min(args.test_size, 24)
    try:
        wd = workdir_for(args, "voc-cls")
        return run_voc(wd, args.checkpoint_workdir, trainval_size=args.trainval_size, test_size=args.test_size,
                       limit=args.quick, **common_kwargs(args))
    except (UserError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
