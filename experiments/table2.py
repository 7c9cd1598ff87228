"""Table 2 of the paper on the current dataset: no SPP vs SPP single-size vs SPP multi-size.

    python -m experiments.table2 [--preset embedded|imagenet] [--workdir runs/<model>-table2] [key=value ...]

Trains the three variants (each resumable in its own sub-workdir, with its resolved
config.json; a variant whose eval.json holds its exact config is reused), evaluates each
with the testing protocols, and writes table2.md / table2.json (top-1 / top-5 error, %).
The key=value arguments apply to all three; each variant then sets spp, sizes and
size_schedule.  All three configs are checked before any training.  For several seeds with
error bars, and ZF-5 with Overfeat-7, see `python -m experiments.claims`.
"""
import logging
import os

from spp_jax import host_memory
from spp_jax.config_grammar import cli_parser, user_errors
from spp_jax.devices import log_devices
from spp_jax.evaluate import PROTOCOL_TITLES, PROTOCOLS
from spp_jax.report import error_pair, markdown_table, write_report
from spp_jax.train import grid
from spp_jax.train.config import PRESETS, TrainConfig, get_config


def main(argv=None):
    ap = cli_parser(TrainConfig, __doc__, presets=PRESETS, default_preset="embedded")
    ap.add_argument("--workdir", default=None, help="default: runs/<model>-table2")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A no-op when an import already configured logging (absl does, at WARNING, when orbax
    # logs at import): the package level makes the start-up lines show either way.
    logging.getLogger("spp_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain chatter
    with user_errors(FileNotFoundError):
        base = get_config(args.preset, args.overrides)
        root = args.workdir or os.path.join("runs", f"{base.model}-table2")
        runs = grid.plan(args.preset, args.overrides, root, models=(base.model,), by_model=False)
        log_devices(base.distributed)
        results = grid.run_grid(runs)
    cols = [r.run.variant.title for r in results]
    cells = {(PROTOCOL_TITLES[p], r.run.variant.title): error_pair(*e)
             for r in results for p, e in r.errors.items()}
    rows = [PROTOCOL_TITLES[p] for p in PROTOCOLS if any((PROTOCOL_TITLES[p], c) in cells for c in cols)]
    md = (f"Table 2 layout: top-1 / top-5 error (%), {base.model}, {base.dataset} validation\n\n"
          + markdown_table(rows, cols, cells, corner="test view"))
    data = {r.run.variant.title: {"variant": r.run.variant.title, "workdir": r.run.workdir,
                                  "results": {p: {"top1_err": a, "top5_err": b}
                                              for p, (a, b) in r.errors.items()},
                                  "seconds": r.seconds, "reused": r.reused} for r in results}
    write_report(root, "table2", md, data)
    print(md)


if __name__ == "__main__":
    host_memory.restart_with_kept_memory()  # once, before any work: CPU steps stop page-faulting
    main()
