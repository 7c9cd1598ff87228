"""Data for spp_jax.

The embedded default dataset is the deterministic synthetic "shapes" data
(``spp_jax.data.shapes``), a stand-in for ImageNet / Pascal VOC / Caltech101.
Its TFDS packaging (``spp_jax.data.shapes_tfds``, TensorFlow-free) is imported
lazily by ``load_shapes`` so that plain generator users do not pay for
importing tensorflow_datasets.
"""

from spp_jax.data.shapes import (
    CLASS_NAMES,
    FILL_STYLES,
    FINE_CLASS_NAMES,
    FINE_FILL_STYLES,
    SPLITS,
    VARIANTS,
    ShapesSource,
    class_names,
    generate,
    num_classes,
)


def load_shapes(variant, split, data_dir, seed=0, **split_sizes):
    """See :func:`spp_jax.data.shapes_tfds.load_shapes` (lazy import of TFDS)."""
    from spp_jax.data.shapes_tfds import load_shapes as _load

    return _load(variant, split, data_dir, seed=seed, **split_sizes)


__all__ = [
    "CLASS_NAMES",
    "FILL_STYLES",
    "FINE_CLASS_NAMES",
    "FINE_FILL_STYLES",
    "SPLITS",
    "VARIANTS",
    "ShapesSource",
    "class_names",
    "generate",
    "num_classes",
    "load_shapes",
]
