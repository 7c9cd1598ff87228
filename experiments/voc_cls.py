"""Table 6: VOC 2007 classification with linear SVMs on pretrained SPP-net features.

    python -m experiments.voc_cls checkpoint=runs/zf5 [--preset embedded|quick|paper]
        [--workdir DIR] [key=value ...]

Examples:
    python -m experiments.voc_cls checkpoint=runs/zf5                          # embedded data
    python -m experiments.voc_cls --preset quick checkpoint=runs/zf5           # a smoke run
    python -m experiments.voc_cls --preset paper checkpoint=runs/zf5 data_dir=/data/tfds
    python -m experiments.voc_cls checkpoint=runs/zf5 nospp_checkpoint=runs/zf5-nospp mean=image

The checkpoint comes from ``make train`` (e.g. ``make train MODEL=zf5 WORKDIR=runs/zf5``)
and is only read (a .msgpack file with its .json sidecar works too).  The preset
(``embedded`` by default) sets its keys, then each key=value wins; the defaults listed
below are the paper's (VOC 2007).  Everything is checked before any image is read; the
resolved config is written to ``WORKDIR/voc_cls_config.json`` and the table to
``voc_cls.md`` / ``.json`` / ``.png`` in ``--workdir`` (default ``<checkpoint>-voc-cls``);
features are cached in ``WORKDIR/features``, so an interrupted run resumes.
"""
import logging

from spp_jax import host_memory
from spp_jax.config_grammar import user_errors
from spp_jax.devices import log_devices
from spp_jax.transfer.config import VOC_PRESETS, VocClsConfig, parse_command_line
from spp_jax.transfer.run import run_voc


def main(argv=None):
    with user_errors(FileNotFoundError):  # FileNotFoundError: a TFDS dataset not prepared
        cfg, workdir = parse_command_line(VocClsConfig, VOC_PRESETS, __doc__, argv, "voc-cls")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            force=True)
        log_devices()
        return run_voc(cfg, workdir)


if __name__ == "__main__":
    host_memory.restart_with_kept_memory()  # once, before any work: CPU steps stop page-faulting
    main()
