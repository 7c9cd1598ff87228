"""The paper's Table-1 backbones (ZF-5, Convnet*-5, Overfeat-5, Overfeat-7) with SPP / no-SPP heads."""
from spp_jax.models.backbones import BACKBONES, MODEL_NAMES, NO_SPP_POOL
from spp_jax.models.sppnet import (Backbone, Head, SPPNet, backbone_geometry, get_model,
                                   init_params, input_sides, map_size, random_variables,
                                   scaled_specs)

__all__ = ["BACKBONES", "MODEL_NAMES", "NO_SPP_POOL", "Backbone", "Head", "SPPNet",
           "backbone_geometry", "get_model", "init_params", "input_sides", "map_size", "random_variables", "scaled_specs"]
