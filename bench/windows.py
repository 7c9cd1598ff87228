"""Realistic detection windows: selective search on a synthetic 688 x 917 image."""
from __future__ import annotations

import functools

import numpy as np

IMAGE_HW = (688, 917)


@functools.lru_cache(maxsize=4)
def detection_image(index: int = 0, hw: tuple = IMAGE_HW) -> np.ndarray:
    """A synthetic shapes-detection image resized to exactly ``hw`` (uint8 RGB)."""
    import cv2
    from spp_jax.data.shapes import generate
    img = generate("detection", "test", index)["image"]
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


@functools.lru_cache(maxsize=4)
def proposals(n: int = 2000, hw: tuple = IMAGE_HW) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, (n, 4) float32 boxes, provenance): selective search ("fast") windows.

    If one image yields fewer than n boxes, selective search of further synthetic
    images (same size) tops them up; the provenance string says how many images.
    """
    from spp_jax.detection.proposals import ProposalSettings, clean_boxes, selective_search
    image = detection_image(0, hw)
    boxes = [selective_search(image, ProposalSettings(max_boxes=n))]
    k = 1
    while sum(len(b) for b in boxes) < n and k < 8:
        boxes.append(selective_search(detection_image(k, hw), ProposalSettings(max_boxes=n)))
        k += 1
    allb = clean_boxes(np.concatenate(boxes), hw, max_boxes=n)
    return image, allb, f"selective search (fast) on {k} synthetic {hw[0]}x{hw[1]} image(s): {len(allb)} windows"
