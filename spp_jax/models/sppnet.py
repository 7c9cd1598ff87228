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
import numpy as np

from spp_jax import bins as B
from spp_jax.config_grammar import check_value
from spp_jax.geometry import Geometry, geometry_from_layers
from spp_jax.models import convolution
from spp_jax.models import layers as L
from spp_jax.models import masking as M
from spp_jax.models.input_norm import check_input_norm, normalise_input
from spp_jax.models.backbones import BACKBONES, NO_SPP_POOL, check_name
from spp_jax.pooling import pool as spp_pool
from spp_jax.roi import roi_pool_cells

INITS = ("paper", "he")
# The released ZF-5 definition (model-defs/Zeiler_conv5.prototxt) initialises these biases
# to the constant 1 and every other bias to 0 (SPP_FACTS section 3). Layers the released net
# does not have (Overfeat-7's conv6, conv7) get 0, as "elsewhere".
PAPER_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7", "fc8")


def _kernel_init(init: str):
    if init == "paper":  # the released models: Gaussian, std 0.01
        return nn.initializers.normal(stddev=0.01)
    if init == "he":
        return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")


def _bias_init(init: str, name: str):
    """The released biases under "paper" (1 on PAPER_BIAS_ONE, else 0); zeros under "he"."""
    if init == "paper" and name in PAPER_BIAS_ONE:
        return nn.initializers.constant(1.0)
    return nn.initializers.zeros


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


def input_sides(name: str, spp: bool = True, largest: int = 1024) -> list[int]:
    """The square input sides in [1, largest] a network takes (ints, pixels).

    Every side from the smallest the conv layers accept for an SPP net; for a no-SPP net
    only those whose last pool gives the 6x6 fc6 input (207-238 for ZF-5).
    """
    def fits(side: int) -> bool:
        try:
            last = map_size(name, side)
            return spp or L.spec_out_size(last, NO_SPP_POOL[name]) == 6
        except ValueError:  # too small for some layer
            return False

    return [s for s in range(1, largest + 1) if fits(s)]


class InputConv(nn.Module):
    """conv1: ``nn.Conv``'s parameters (``kernel`` (k, k, in_channels, F), ``bias`` (F,)) and
    function, which also takes a (B, H, W, 1) input standing for ``in_channels`` equal
    channels (``input_norm="gray_std"``, :func:`spp_jax.models.input_norm.gray_level`).

    Such an input is convolved with the kernel summed over its input channels: the same
    function and the same parameter gradient (each input channel's kernel gets the folded
    kernel's), with a third of the multiply-adds of conv1's forward and weight gradient, the
    most expensive layer of the embedded Overfeat-7. Only float rounding differs.
    """

    features: int
    kernel: int
    stride: int
    pad: int
    in_channels: int = 3
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init,
                            (self.kernel, self.kernel, self.in_channels, self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        if x.shape[-1] == 1 and self.in_channels > 1:
            kernel = jnp.sum(kernel, axis=2, keepdims=True)
        elif x.shape[-1] != self.in_channels:
            raise ValueError(f"conv1 takes {self.in_channels} channels (or 1 standing for "
                             f"{self.in_channels} equal ones), got {x.shape[-1]}")
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        return L.input_conv(x, kernel, self.stride, self.pad) + bias


class Backbone(nn.Module):
    """Conv layers of a Table-1 model: (B, H, W, 3) images -> (B, h, w, C) last conv map.

    A (B, H, W, 1) input stands for three equal channels (gray input, ``input_norm=
    "gray_std"``): conv1 (:class:`InputConv`) folds its kernel instead of convolving copies.

    With ``valid_hw`` ((B, 2) int, each image's real height and width inside a batch
    padded at the bottom/right) every layer's output beyond that image's extent is set
    to zero (:mod:`spp_jax.models.masking`), so the valid cells equal the unpadded
    network's exactly; the call then returns ``(map, map_hw)`` with ``map_hw`` (B, 2)
    int32 the valid map size per image. Without it nothing is masked or computed.

    Each conv layer's output (after ReLU, masked) is sown into the ``"intermediates"``
    collection as ``<layer name>_out``: free unless that collection is made mutable
    (``apply(..., mutable=["intermediates"])``), which is how the serving layer reads
    the last two conv maps in one pass.
    """

    specs: tuple
    init_scheme: str = "paper"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, valid_hw=None):
        if valid_hw is not None:
            valid_hw = jnp.asarray(valid_hw, jnp.int32)
            x = M.mask_beyond(x, valid_hw)  # whatever the padding held, it is zero now
        for i, s in enumerate(self.specs):
            if isinstance(s, L.Conv) and i == 0:
                x = nn.relu(InputConv(s.features, s.kernel, s.stride, s.pad, name=s.name,
                                      kernel_init=_kernel_init(self.init_scheme),
                                      bias_init=_bias_init(self.init_scheme, s.name),
                                      dtype=self.dtype)(x))
            elif isinstance(s, L.Conv):
                x = nn.Conv(s.features, (s.kernel, s.kernel), (s.stride, s.stride),
                            padding=((s.pad, s.pad), (s.pad, s.pad)), name=s.name,
                            kernel_init=_kernel_init(self.init_scheme),
                            bias_init=_bias_init(self.init_scheme, s.name), dtype=self.dtype,
                            conv_general_dilated=convolution.conv_general_dilated)(x)
                x = nn.relu(x)
            elif isinstance(s, L.Pool):
                x = L.max_pool(x, s)
            else:
                x = L.lrn(x, s)
            if valid_hw is not None:
                valid_hw = M.out_extent(s, valid_hw)
                if not isinstance(s, L.LRN):  # LRN maps zeros to zeros: no mask needed after it
                    x = M.mask_beyond(x, valid_hw)
            if isinstance(s, L.Conv):
                self.sow("intermediates", s.name + "_out", x)  # (the layer's own name is its scope)
        return x if valid_hw is None else (x, valid_hw)


class Head(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8 on pooled vectors.

    Returns a dict with ``fc6``, ``fc7`` (after ReLU, before dropout: the features
    the paper's SVMs use) and ``logits``; :meth:`features` stops after fc7 (and
    needs no fc8 parameters).
    """

    num_classes: int
    fc_dim: int = 4096
    dropout: float = 0.5
    init_scheme: str = "paper"
    dtype: Any = jnp.float32

    def setup(self):
        def dense(n, name, kernel_init):
            return nn.Dense(n, kernel_init=kernel_init, bias_init=_bias_init(self.init_scheme, name),
                            dtype=self.dtype)
        self.fc6 = dense(self.fc_dim, "fc6", _kernel_init(self.init_scheme))
        self.fc7 = dense(self.fc_dim, "fc7", _kernel_init(self.init_scheme))
        # fc8 is a linear classifier: Gaussian std 0.01 under both inits.
        self.fc8 = dense(self.num_classes, "fc8", nn.initializers.normal(0.01))
        # The names an @nn.compact Head gave its dropouts: the dropout masks (which fold in
        # the module path) stay those of earlier versions of this class.
        self.Dropout_0 = nn.Dropout(self.dropout)
        self.Dropout_1 = nn.Dropout(self.dropout)

    def features(self, x, train: bool = False):
        """(N, D) pooled -> {"fc6", "fc7"} (N, fc_dim), after ReLU."""
        fc6 = nn.relu(self.fc6(x))
        fc7 = nn.relu(self.fc7(self.Dropout_0(fc6, deterministic=not train)))
        return {"fc6": fc6, "fc7": fc7}

    def __call__(self, x, train: bool = False):
        out = self.features(x, train)
        return {**out, "logits": self.fc8(self.Dropout_1(out["fc7"], deterministic=not train))}


class SPPNet(nn.Module):
    """A Table-1 classifier with (``spp=True``) or without an SPP layer.

    Attributes:
      arch: one of ``MODEL_NAMES`` (zf5, convnet5, overfeat5, overfeat7).
      num_classes: fc8 outputs (1000 for ImageNet).
      spp: SPP head (any input size) or the no-SPP baseline (a last max pool to
        6x6; only the 224 input, whose map pools to exactly 6x6, is accepted).
      levels: pyramid levels of the SPP head, default (6, 3, 2, 1) (50 bins).
      width: conv channel multiplier (1.0 = the paper); fc_dim: fc6/fc7 width.
      init_scheme: "paper" (the released ZF-5 definition: Gaussian std 0.01, biases 1 on
        conv2, conv4, conv5, fc6, fc7, fc8 and 0 elsewhere) or "he" (He-normal kernels,
        zero biases; fc8 Gaussian std 0.01 under both).
      input_scale: images (0..255 minus the mean) are multiplied by this before conv1.
        1.0 is the paper; He initialisation wants unit-scale inputs (about 1/58).
      input_norm: "none" (the paper) or "gray_std": each image (after ``input_scale``)
        becomes its gray level standardised to zero mean and unit std over its own valid
        pixels (:mod:`spp_jax.models.input_norm`; an option against the embedded data's
        chance plateau, not the paper's).
      pool_mode: pyramid bin rule, "appendix_a" (the paper's, default) or "released"
        (the released Caffe model's 2x2 level, kernel = stride = ceil(a/2): use it to run
        released weights exactly; see :func:`spp_jax.bins.bin_edges`).

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
    input_norm: str = "none"
    pool_mode: str = "appendix_a"
    dtype: Any = jnp.float32

    def setup(self):
        check_name(self.arch)
        _kernel_init(self.init_scheme)  # fail early on a bad name
        B.check_mode(self.pool_mode)
        check_input_norm(self.input_norm)
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

    def conv_map(self, images, *, valid_hw=None):
        """(B, H, W, 3) float images -> (B, h, w, C) last conv map.

        (B, H, W, 1) images stand for three equal channels (gray images: conv1 folds its
        kernel, :class:`InputConv`); with ``input_norm="gray_std"`` the net therefore gives
        the same output for an image and for its channel mean (how the training pipeline
        feeds it, ``AugmentConfig.gray``).

        ``valid_hw``: (B, 2) int, each image's real (height, width) inside a batch padded
        at the bottom/right (any padding values). Every layer is then masked to each
        image's extent, so the map's valid cells equal the unpadded network's exactly,
        and the call returns ``(map, map_hw)``, ``map_hw`` (B, 2) int32 the valid map
        size per image. None (the default): no masking, nothing extra computed.
        """
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be (B, H, W, 3) (or (B, H, W, 1) gray), got shape "
                             f"{tuple(images.shape)}")
        if valid_hw is not None:
            self._check_valid_hw(images.shape, valid_hw)
        if self.input_scale != 1.0:
            images = images * self.input_scale
        images = normalise_input(images, self.input_norm, valid_hw)
        return self.backbone(images, valid_hw)

    def _check_valid_hw(self, shape, valid_hw):
        if tuple(getattr(valid_hw, "shape", np.shape(valid_hw))) != (shape[0], 2):
            raise ValueError(f"valid_hw must be (B, 2) = ({shape[0]}, 2) (height, width) per image, "
                             f"got shape {tuple(np.shape(valid_hw))}")
        if isinstance(valid_hw, jax.core.Tracer):
            return  # under jit: the caller checked (spp_jax.serve does, on the host)
        v = np.asarray(valid_hw)
        if not np.issubdtype(v.dtype, np.integer) or (v < 1).any() or (v > np.array(shape[1:3])).any():
            raise ValueError(f"valid_hw must hold integer sizes in [1, {shape[1]}] x [1, {shape[2]}] "
                             f"(the padded batch), got {v.tolist()}")
        M.valid_extents(scaled_specs(self.arch, self.width), v)  # too small for a layer: ValueError

    def pool_map(self, fmap, map_hw=None):
        """(B, h, w, C) -> (B, pooled_dim): SPP, or the no-SPP baseline's 6x6 pool.

        ``map_hw`` ((B, 2) int, from ``conv_map(..., valid_hw=...)``): pool each map's
        valid region only (the same bins as pooling the unpadded map).
        """
        if self.spp:
            if map_hw is None:
                return spp_pool(fmap, tuple(self.levels), mode=self.pool_mode)
            whole = jnp.concatenate([jnp.zeros_like(map_hw), map_hw[:, ::-1] - 1], axis=1)[:, None]
            pooled = jax.vmap(lambda f, c: roi_pool_cells(f, c, tuple(self.levels), mode=self.pool_mode))(
                fmap, whole)
            return pooled[:, 0]
        if map_hw is not None:
            raise ValueError(f"the no-SPP {self.arch} takes unpadded 224 inputs only; valid_hw (padded "
                             f"batches) needs an SPP net")
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

    def __call__(self, images, *, valid_hw=None, train: bool = False, features: bool = False):
        """Images (B, H, W, 3) -> logits (B, num_classes), or with ``features=True`` a dict
        with ``conv`` (B, h, w, C), ``pooled``, ``fc6``, ``fc7``, ``logits``.

        ``valid_hw`` ((B, 2) int, SPP nets): each image's real size in a padded batch; the
        outputs then equal the unpadded network's per image, and the dict also holds
        ``map_hw`` (B, 2), the valid conv map size per image (see :meth:`conv_map`).
        """
        if valid_hw is None:
            fmap, map_hw = self.conv_map(images), None
        else:
            fmap, map_hw = self.conv_map(images, valid_hw=valid_hw)
        pooled = self.pool_map(fmap, map_hw)
        out = self.head(pooled, train)
        if not features:
            return out["logits"]
        extra = {} if map_hw is None else {"map_hw": map_hw}
        return {"conv": fmap, "pooled": pooled, **out, **extra}


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
    need *some* network (tests, voc_det's ``random_backbone=true``): He scaling keeps
    activations O(1) through a random conv stack, where std 0.01 would shrink conv5 towards zero.
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
