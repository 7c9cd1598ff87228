"""Train an SPP-net classifier, then run the paper's testing protocols.

    python -m experiments.train [--preset embedded|imagenet] [--workdir DIR] [key=value ...]

Examples:
    python -m experiments.train model=overfeat7                     # embedded data
    python -m experiments.train --preset imagenet model=zf5 dataset=imagenet2012 data_dir=/data/tfds
Keys are the fields of spp_jax.train.TrainConfig (e.g. spp=false sizes=224 size_schedule=random).
"""
import argparse
import logging
import os
import sys

from spp_jax.errors import UserError
from spp_jax.train.config import PRESETS, get_config
from spp_jax.train.experiment import train_and_evaluate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="config preset (default: embedded, or imagenet when dataset=imagenet2012)")
    ap.add_argument("--workdir", default=None, help="default: runs/<model>")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain chatter
    preset = args.preset or ("imagenet" if any(o.strip() == "dataset=imagenet2012" for o in args.overrides)
                             else "embedded")
    try:
        cfg = get_config(preset, args.overrides)
    except (ValueError, TypeError) as e:
        sys.exit(f"error: {e}")
    workdir = args.workdir or os.path.join("runs", cfg.model)
    try:
        train_and_evaluate(cfg, workdir)
    except (FileNotFoundError, UserError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: a checkpoint was saved; run the same command again to resume")


if __name__ == "__main__":
    main()
