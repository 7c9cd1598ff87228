"""A PNG grid of test images with their detections (for the detection report)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["draw_detections"]


def draw_detections(records, detections: dict, path: str, class_names: Sequence[str], n: int = 6,
                    per_image: int = 5, min_score: float = 0.0) -> str:
    """Draw the first ``n`` records with their ``per_image`` best detections scoring >= ``min_score``
    (0: the SVMs' decision boundary).

    Args:
      records: a record source (``image``, ``boxes``, ``image_id``).
      detections: image_id -> (boxes (d, 4), scores (d,), labels (d,)), best first.
      path: PNG to write. Ground truth is dashed white, detections green with "class score".
    Returns:
      path.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(n, len(records))
    cols = 3
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        rec = records[i]
        ax = axes.ravel()[i]
        ax.imshow(rec["image"])
        for b in rec["boxes"]:
            ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0] + 1, b[3] - b[1] + 1, fill=False,
                                       ec="white", lw=1, ls="--"))
        boxes, scores, labels = detections.get(rec["image_id"], (np.zeros((0, 4)), [], []))
        shown = [(b, s, lab) for b, s, lab in zip(boxes, scores, labels) if s >= min_score]
        for b, s, lab in shown[:per_image]:
            ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0] + 1, b[3] - b[1] + 1, fill=False,
                                       ec="lime", lw=1.5))
            ax.text(b[0], b[1], f"{class_names[lab]} {s:.2f}", color="black", fontsize=6,
                    bbox=dict(fc="lime", alpha=0.7, pad=1, lw=0))
        ax.set_title(rec["image_id"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
