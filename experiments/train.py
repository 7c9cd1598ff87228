"""Train an SPP-net classifier, then run the paper's testing protocols.

    python -m experiments.train [--preset embedded|imagenet] [--workdir DIR] [key=value ...]

Examples:
    python -m experiments.train model=overfeat7                     # embedded data
    python -m experiments.train --preset imagenet model=zf5 dataset=imagenet2012 data_dir=/data/tfds
The preset sets its keys, then each key=value wins; the whole config is checked before any
data is generated, and the resolved config is written to WORKDIR/config.json.
"""
import logging
import os
import sys

from spp_jax import host_memory
from spp_jax.config_grammar import cli_parser, user_errors
from spp_jax.devices import log_devices
from spp_jax.train.config import PRESETS, TrainConfig, get_config
from spp_jax.train.experiment import train_and_evaluate


def main(argv=None):
    ap = cli_parser(TrainConfig, __doc__, presets=PRESETS,
                    preset_help="config preset (default: embedded, or imagenet when "
                                "dataset=imagenet2012)")
    ap.add_argument("--workdir", default=None, help="default: runs/<model>")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A no-op when an import already configured logging (absl does, at WARNING, when orbax
    # logs at import): the package level makes the start-up lines show either way.
    logging.getLogger("spp_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain chatter
    preset = args.preset or ("imagenet" if any(o.strip() == "dataset=imagenet2012" for o in args.overrides)
                             else "embedded")
    with user_errors(FileNotFoundError):
        cfg = get_config(preset, args.overrides)
        log_devices(cfg.distributed)
        workdir = args.workdir or os.path.join("runs", cfg.model)
        try:
            train_and_evaluate(cfg, workdir)
        except KeyboardInterrupt:
            sys.exit("interrupted: a checkpoint was saved; run the same command again to resume")


if __name__ == "__main__":
    host_memory.restart_with_kept_memory()  # once, before any work: CPU steps stop page-faulting
    main()
