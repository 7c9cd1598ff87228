"""Result tables in the paper's layout, written as markdown and JSON."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

from spp_jax import atomic


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def markdown_table(rows: Sequence[str], cols: Sequence[str], cells: Mapping[tuple[str, str], object],
                   corner: str = "") -> str:
    """A markdown table; ``cells[(row, col)]`` may be missing (shown as an en dash)."""
    lines = ["| " + " | ".join([corner, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append("| " + " | ".join([r, *(_cell(cells.get((r, c))) for c in cols)]) + " |")
    return "\n".join(lines)


def error_pair(top1: float | None, top5: float | None) -> str:
    """The paper's "top-1 / top-5" error cell."""
    if top1 is None:
        return "–"
    return f"{top1:.2f} / {top5:.2f}"


def write_report(workdir: str, name: str, markdown: str, data: object) -> tuple[str, str]:
    """Write ``name.md`` and ``name.json`` into workdir (atomically); return their paths."""
    paths = []
    for ext, text in (("md", markdown + "\n"), ("json", json.dumps(data, indent=2, sort_keys=True) + "\n")):
        paths.append(atomic.write_text(os.path.join(workdir, f"{name}.{ext}"), text))
    return paths[0], paths[1]
