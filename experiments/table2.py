"""Table 2 of the paper on the current dataset: no SPP vs SPP single-size vs SPP multi-size.

    python -m experiments.table2 [--workdir runs/<model>-table2] [key=value ...]

Trains the three variants (each resumable in its own sub-workdir), evaluates each with
the testing protocols, and writes table2.md / table2.json (top-1 / top-5 error, %).
"""
import argparse
import logging
import os
import sys

from spp_jax.errors import UserError
from spp_jax.evaluate import PROTOCOL_TITLES, PROTOCOLS
from spp_jax.report import error_pair, markdown_table, write_report
from spp_jax.train.config import PRESETS, get_config
from spp_jax.train.experiment import train_and_evaluate

VARIANTS = (  # (sub-workdir, column title, overrides)
    ("nospp", "no SPP", ["spp=false", "sizes=224", "size_schedule=single"]),
    ("single", "SPP single-size", ["spp=true", "sizes=224", "size_schedule=single"]),
    ("multi", "SPP multi-size", ["spp=true", "sizes=180,224", "size_schedule=multi"]),
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="embedded", choices=sorted(PRESETS))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain chatter
    try:
        base = get_config(args.preset, args.overrides)
    except (ValueError, TypeError) as e:
        sys.exit(f"error: {e}")
    root = args.workdir or os.path.join("runs", f"{base.model}-table2")
    cols, cells, data = [], {}, {}
    for sub, title, extra in VARIANTS:
        cfg = get_config(args.preset, list(args.overrides) + extra)
        try:
            out = train_and_evaluate(cfg, os.path.join(root, sub))
        except (FileNotFoundError, UserError) as e:  # e.g. a locked workdir, a diverged run
            sys.exit(f"error: {e}")
        cols.append(title)
        data[title] = out
        for p, r in out["results"].items():
            cells[(PROTOCOL_TITLES[p], title)] = error_pair(r["top1_err"], r["top5_err"])
    rows = [PROTOCOL_TITLES[p] for p in PROTOCOLS if any((PROTOCOL_TITLES[p], c) in cells for c in cols)]
    md = (f"Table 2 layout: top-1 / top-5 error (%), {base.model}, {base.dataset} validation\n\n"
          + markdown_table(rows, cols, cells, corner="test view"))
    write_report(root, "table2", md, data)
    print(md)


if __name__ == "__main__":
    main()
