"""SPP-net and no-SPP classifiers: a Table-1 backbone, a pooling head, fc6-fc7-fc8.

Parameters live in an explicit pytree ``{"params": {"backbone": {...}, "head":
{...}}}``; :class:`Head` is usable on its own so detection can fine-tune fc6,
fc7 and a new fc8 on cached pooled features.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spp_jax import bins as B
from spp_jax.config_grammar import check_value
from spp_jax.geometry import Geometry, geometry_from_layers
from spp_jax.models import layers as L
from spp_jax.models.backbones import BACKBONES, NO_SPP_POOL, check_name
from spp_jax.pooling import pool as spp_pool

INITS = ("paper", "he")


def _kernel_init(init: str):
    if init == "paper":  # the released models: Gaussian, std 0.01
        return nn.initializers.normal(stddev=0.01)
    if init == "he":
        return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")


def scaled_specs(name: str, width: float = 1.0) -> tuple:
    """Backbone specs with every conv's channel count multiplied by ``width`` (>= 1 channel).

    width < 1 gives small models for tests and the CPU-sized embedded config;
    strides, kernels and paddings, hence the geometry, are unchanged.
    """
    specs = BACKBONES[check_name(name)]
    if width == 1.0:
        return specs
    return tuple(dataclasses.replace(s, features=max(1, round(s.features * width)))
                 if isinstance(s, L.Conv) else s for s in specs)


def backbone_geometry(name: str, slack: float = 1.5) -> Geometry:
    """Receptive-field geometry of a backbone's last conv map, from its layer specs."""
    return geometry_from_layers(L.receptive_layers(BACKBONES[check_name(name)]), slack=slack)


def map_size(name: str, side: int) -> int:
    """Side of the last conv map for an input side (ints); raises if the input is too small."""
    for s in BACKBONES[check_name(name)]:
        side = L.spec_out_size(side, s)
    return side


class Backbone(nn.Module):
    """Conv layers of a Table-1 model: (B, H, W, 3) images -> (B, h, w, C) last conv map."""

    specs: tuple
    init_scheme: str = "paper"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for s in self.specs:
            if isinstance(s, L.Conv):
                x = nn.Conv(s.features, (s.kernel, s.kernel), (s.stride, s.stride),
                            padding=((s.pad, s.pad), (s.pad, s.pad)), name=s.name,
                            kernel_init=_kernel_init(self.init_scheme), bias_init=nn.initializers.zeros,
                            dtype=self.dtype)(x)
                x = nn.relu(x)
            elif isinstance(s, L.Pool):
                x = L.max_pool(x, s)
            else:
                x = L.lrn(x, s)
        return x


class Head(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8 on pooled vectors.

    Returns a dict with ``fc6``, ``fc7`` (after ReLU, before dropout: the features
    the paper's SVMs use) and ``logits``.
    """

    num_classes: int
    fc_dim: int = 4096
    dropout: float = 0.5
    init_scheme: str = "paper"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        dense = lambda n, name, k: nn.Dense(n, name=name, kernel_init=k, dtype=self.dtype,
                                            bias_init=nn.initializers.zeros)
        fc6 = nn.relu(dense(self.fc_dim, "fc6", _kernel_init(self.init_scheme))(x))
        h = nn.Dropout(self.dropout, deterministic=not train)(fc6)
        fc7 = nn.relu(dense(self.fc_dim, "fc7", _kernel_init(self.init_scheme))(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(fc7)
        # fc8 is a linear classifier: Gaussian std 0.01 under both inits.
        logits = dense(self.num_classes, "fc8", nn.initializers.normal(0.01))(h)
        return {"fc6": fc6, "fc7": fc7, "logits": logits}


class SPPNet(nn.Module):
    """A Table-1 classifier with (``spp=True``) or without an SPP layer.

    Attributes:
      arch: one of ``MODEL_NAMES`` (zf5, convnet5, overfeat5, overfeat7).
      num_classes: fc8 outputs (1000 for ImageNet).
      spp: SPP head (any input size) or the no-SPP baseline (a last max pool to
        6x6; only the 224 input, whose map pools to exactly 6x6, is accepted).
      levels: pyramid levels of the SPP head, default (6, 3, 2, 1) (50 bins).
      width: conv channel multiplier (1.0 = the paper); fc_dim: fc6/fc7 width.
      init_scheme: "paper" (Gaussian std 0.01, zero biases, as the released models) or "he".
      input_scale: images (0..255 minus the mean) are multiplied by this before conv1.
        1.0 is the paper; He initialisation wants unit-scale inputs (about 1/58).

    Use ``model.apply(variables, images, train=..., rngs={"dropout": key})`` for
    logits and features; ``method=SPPNet.conv_map`` / ``SPPNet.head`` for the
    parts (detection pools windows between them).
    """

    arch: str = "zf5"
    num_classes: int = 1000
    spp: bool = True
    levels: Sequence[int] = B.DEFAULT_LEVELS
    width: float = 1.0
    fc_dim: int = 4096
    dropout: float = 0.5
    init_scheme: str = "paper"
    input_scale: float = 1.0
    dtype: Any = jnp.float32

    def setup(self):
        check_name(self.arch)
        _kernel_init(self.init_scheme)  # fail early on a bad name
        self.backbone = Backbone(scaled_specs(self.arch, self.width), self.init_scheme, self.dtype)
        self.classifier = Head(self.num_classes, self.fc_dim, self.dropout, self.init_scheme, self.dtype)

    @property
    def geometry(self) -> Geometry:
        """Where conv-map cells sit in the input (from the layer specs)."""
        return backbone_geometry(self.arch)

    @property
    def channels(self) -> int:
        return [s for s in scaled_specs(self.arch, self.width) if isinstance(s, L.Conv)][-1].features

    @property
    def pooled_dim(self) -> int:
        """fc6 input length: C * 50 with SPP (12,800 for ZF-5), C * 36 without."""
        return B.output_dim(self.channels, self.levels) if self.spp else self.channels * 36

    def conv_map(self, images):
        """(B, H, W, 3) float images -> (B, h, w, C) last conv map."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got shape {tuple(images.shape)}")
        if self.input_scale != 1.0:
            images = images * self.input_scale
        return self.backbone(images)

    def pool_map(self, fmap):
        """(B, h, w, C) -> (B, pooled_dim): SPP, or the no-SPP baseline's 6x6 pool."""
        if self.spp:
            return spp_pool(fmap, tuple(self.levels))
        p = L.max_pool(fmap, NO_SPP_POOL[self.arch])
        if p.shape[1:3] != (6, 6):
            raise ValueError(
                f"the no-SPP {self.arch} needs a conv map that pools to 6x6 (a 224 input); got a "
                f"{fmap.shape[1]}x{fmap.shape[2]} map -> {p.shape[1]}x{p.shape[2]}. Use spp=True "
                f"for other input sizes.")
        return p.reshape(p.shape[0], -1)

    def head(self, pooled, train: bool = False):
        """(N, pooled_dim) -> {"fc6", "fc7", "logits"}."""
        return self.classifier(pooled, train)

    def __call__(self, images, train: bool = False, features: bool = False):
        """Images (B, H, W, 3) -> logits (B, num_classes), or with ``features=True`` a dict
        with ``conv`` (B, h, w, C), ``pooled``, ``fc6``, ``fc7``, ``logits``."""
        fmap = self.conv_map(images)
        pooled = self.pool_map(fmap)
        out = self.head(pooled, train)
        if not features:
            return out["logits"]
        return {"conv": fmap, "pooled": pooled, **out}


# Ranges of get_model's numeric arguments (a bad one raises ConfigError naming it).
_ARG_RULES = {"num_classes": (int, dict(ge=1)), "fc_dim": (int, dict(ge=1)),
              "width": (float, dict(gt=0)), "dropout": (float, dict(ge=0, lt=1)),
              "input_scale": (float, dict(gt=0)), "levels": (tuple[int, ...], dict(ge=1, min_len=1))}


def get_model(name: str, **kwargs) -> SPPNet:
    """Model by name (``zf5``, ``convnet5``, ``overfeat5``, ``overfeat7``); kwargs as SPPNet.

    num_classes and fc_dim must be >= 1, width and input_scale finite and > 0, dropout in
    [0, 1), levels positive ints (ConfigError otherwise, before anything is built).
    """
    for key, (tp, rule) in _ARG_RULES.items():
        if key in kwargs:
            kwargs[key] = check_value(key, kwargs[key], tp, **rule)
    return SPPNet(arch=check_name(name), **kwargs)


def init_params(model: SPPNet, rng: jax.Array, side: int = 224):
    """Initialise a model's variables with a (1, side, side, 3) dummy input."""
    return run_once(model.init, rng, jnp.zeros((1, side, side, 3), model.dtype))


def random_variables(model: SPPNet, seed: int = 0, bias_std: float = 0.0) -> dict:
    """He-normal kernels and Gaussian(0, ``bias_std``) biases for ``model``, without compiling.

    Shapes come from ``jax.eval_shape`` (tracing only), values from NumPy, so this
    takes milliseconds where ``model.init`` compiles the network. For pipelines that
    need *some* network (tests, ``--random-backbone``): He scaling keeps activations
    O(1) through a random conv stack, where std 0.01 would shrink conv5 towards zero.
    """
    import numpy as np
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(2.0 / fan_in), s.shape), s.dtype)
        if bias_std > 0:
            return jnp.asarray(rng.normal(0, bias_std, s.shape), s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def run_once(fn, *args, out_shardings=None):
    """Run ``fn`` once as a single XLA program compiled without backend optimisation.

    For initialisation: eager ``model.init`` dispatches every op separately (~20 s on
    this CPU for ZF-5), and an optimised compile of several threefry initializers
    takes ~13 s; at optimisation level 0 it compiles in ~3 s and runs once anyway.
    """
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
        return fn(*args)  # already inside a transformation (e.g. jax.eval_shape): just trace
    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    compiled = jax.jit(fn, **kw).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args)
