"""Run the testing protocols (1 crop, 1 full, 10-view, multi-view) on a trained workdir.

    python -m experiments.eval --workdir runs/overfeat7 [key=value ...]

Starts from the workdir's config.json (types and ranges checked; the defaults listed below
are TrainConfig's, not the workdir's), then each key=value wins; the resolved config is
recorded in WORKDIR/eval.json with the results.
"""
import logging

from spp_jax import host_memory
from spp_jax.config_grammar import cli_parser, user_errors
from spp_jax.devices import log_devices
from spp_jax.train.config import TrainConfig, apply_overrides, load_config
from spp_jax.train.experiment import evaluate_workdir


def main(argv=None):
    ap = cli_parser(TrainConfig, __doc__)
    ap.add_argument("--workdir", required=True, help="a training workdir (has config.json)")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A no-op when an import already configured logging (absl does, at WARNING, when orbax
    # logs at import): the package level makes the start-up lines show either way.
    logging.getLogger("spp_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain chatter
    log_devices()
    with user_errors(FileNotFoundError):
        cfg = apply_overrides(load_config(args.workdir), args.overrides)
        evaluate_workdir(cfg, args.workdir)


if __name__ == "__main__":
    host_memory.restart_with_kept_memory()  # once, before any work: CPU steps stop page-faulting
    main()
