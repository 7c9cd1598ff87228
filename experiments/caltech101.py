"""Table 7: Caltech101 classification with linear SVMs on pretrained SPP-net features.

    python -m experiments.caltech101 checkpoint=runs/zf5 [--preset embedded|quick|paper]
        [--workdir DIR] [key=value ...]

Examples:
    python -m experiments.caltech101 checkpoint=runs/zf5                       # embedded data
    python -m experiments.caltech101 --preset quick checkpoint=runs/zf5        # a smoke run
    python -m experiments.caltech101 --preset paper checkpoint=runs/zf5 data_dir=/data/tfds splits=5

The checkpoint comes from ``make train`` and is only read.  Per random split:
``train_per_class`` (30) training images per class and up to ``test_per_class`` (50) of
the rest for testing; accuracy (mean of per-class accuracies) is reported as mean +- std
over ``splits`` (10).  The preset (``embedded`` by default) sets its keys, then each
key=value wins; the defaults listed below are the paper's (Caltech101).  Everything is
checked before any image is read; the resolved config is written to
``WORKDIR/caltech101_config.json`` and the table to ``caltech101.md`` / ``.json`` / ``.png``
in ``--workdir`` (default ``<checkpoint>-caltech101``); features are cached in
``WORKDIR/features``.
"""
import logging

from spp_jax import host_memory
from spp_jax.config_grammar import user_errors
from spp_jax.devices import log_devices
from spp_jax.transfer.config import CALTECH_PRESETS, CaltechConfig, parse_command_line
from spp_jax.transfer.run import run_caltech


def main(argv=None):
    with user_errors(FileNotFoundError):  # FileNotFoundError: a TFDS dataset not prepared
        cfg, workdir = parse_command_line(CaltechConfig, CALTECH_PRESETS, __doc__, argv, "caltech101")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            force=True)
        log_devices()
        return run_caltech(cfg, workdir)


if __name__ == "__main__":
    host_memory.restart_with_kept_memory()  # once, before any work: CPU steps stop page-faulting
    main()
