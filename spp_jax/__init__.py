"""spp_jax: SPP-net (He, Zhang, Ren, Sun 2014) in JAX/Flax.

Public API:
  pool(fmap, levels)                 spatial pyramid pooling of whole maps (B, H, W, C)
  roi_pool(fmap, boxes, levels, geometry=...)  pyramid pooling of image windows on one map
  roi_pool_cells(fmap, cells, levels)          the same for windows already in map cells
  project_boxes(boxes, geometry, map_hw)       image windows -> inclusive map cells
  Geometry                            where a backbone's cells sit in its input
  output_dim(channels, levels)        pooled vector length
  models: get_model(name, ...), MODEL_NAMES, SPPNet
  __version__                         this release (see CHANGELOG.md)
"""
from spp_jax.bins import DEFAULT_LEVELS, bin_edges, num_bins, output_dim, window_stride_bins
from spp_jax.geometry import Geometry, geometry_from_layers, project_boxes
from spp_jax.pooling import caffe_permutation, pool
from spp_jax.roi import roi_pool, roi_pool_cells
from spp_jax.models import MODEL_NAMES, SPPNet, get_model

__version__ = "0.2.0.dev0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "DEFAULT_LEVELS", "Geometry", "MODEL_NAMES", "SPPNet", "get_model", "bin_edges", "caffe_permutation", "geometry_from_layers",
    "num_bins", "output_dim", "pool", "project_boxes", "roi_pool", "roi_pool_cells",
    "window_stride_bins",
]
