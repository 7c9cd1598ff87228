"""Run the testing protocols (1 crop, 1 full, 10-view, multi-view) on a trained workdir.

    python -m experiments.eval --workdir runs/overfeat7 [key=value ...]
"""
import argparse
import logging
import sys

from spp_jax.errors import UserError
from spp_jax.train.config import apply_overrides
from spp_jax.train.config import load_config
from spp_jax.train.experiment import evaluate_workdir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value (e.g. protocols=1crop,10view eval_limit=100)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain chatter
    try:
        cfg = apply_overrides(load_config(args.workdir), args.overrides)
        evaluate_workdir(cfg, args.workdir)
    except (FileNotFoundError, ValueError, UserError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
