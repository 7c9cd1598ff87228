"""3. Backbones: ZF-5 / Overfeat-7 forward and one SGD training step, spp_jax vs PyTorch.

Also: the machine's measured f32 matmul peak (JAX and torch), LRN formulations
(in-process, by swapping the layer function the Flax backbone calls: the library is
not edited), and XLA flag variants (each in a child process that times JAX with the
flag and torch in that same process, so each ratio is still from one process).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (Config, Row, block, pair_ratio, pair_spread, time_pair, time_pair_samples,
                          torch_device, tsync)
from spp_jax import xla_options
from spp_jax.models import layers as L
from spp_jax.models.sppnet import scaled_specs

GOAL = (">=", 1.0)
FLAG_VARIANTS = (
    "--xla_cpu_use_thunk_runtime=false",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
)


_TDEV = [None]  # torch device of this run (set by run / matmul_peak from the config)


def _tdev():
    import torch
    return _TDEV[0] or torch.device("cpu")


def conv_flops(arch: str, h: int, w: int, width: float = 1.0) -> float:
    """Forward multiply-adds x 2 of the conv layers for one (h, w) image."""
    total, cin = 0.0, 3
    for s in scaled_specs(arch, width):
        if isinstance(s, L.Conv):
            h = (h + 2 * s.pad - s.kernel) // s.stride + 1
            w = (w + 2 * s.pad - s.kernel) // s.stride + 1
            total += 2.0 * h * w * s.features * cin * s.kernel * s.kernel
            cin = s.features
        elif isinstance(s, L.Pool):
            h, w = L.pool_out(h, s), L.pool_out(w, s)
    return total


def head_flops(channels: int, levels=(6, 3, 2, 1), fc: int = 4096, classes: int = 1000) -> float:
    d = channels * sum(n * n for n in levels)
    return 2.0 * (d * fc + fc * fc + fc * classes)


def setup_torch_threads():
    import torch
    n = os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# --------------------------------------------------------------------------- matmul peak

def matmul_peak(cfg: Config, device) -> dict:
    import torch
    _TDEV[0] = torch_device(cfg)
    n = cfg.matmul_n
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a, b = jax.device_put(a_np, device), jax.device_put(b_np, device)
    mm = jax.jit(jnp.matmul)
    at, bt = torch.from_numpy(a_np).to(_tdev()), torch.from_numpy(b_np).to(_tdev())
    # Peak = best of several runs (on a shared machine the median underestimates the hardware).
    sa, sb = time_pair_samples(lambda: mm(a, b).block_until_ready(),
                               lambda: (torch.mm(at, bt), tsync(_tdev())), 1, cfg.repeats, cfg.min_seconds)
    tj, tt = min(sa), min(sb)
    fl = 2.0 * n ** 3
    return {"n": n, "jax": fl / tj / 1e9, "torch": fl / tt / 1e9, "peak": max(fl / tj, fl / tt) / 1e9}


# --------------------------------------------------------------------------- LRN variants

def lrn_pow(x, spec):
    """The textbook formulation: scale ** -beta (a general pow: exp(log))."""
    sq = jnp.square(x)
    p = spec.size // 2
    total = jax.lax.reduce_window(sq, 0.0, jax.lax.add, (1, spec.size, spec.size, 1), (1, 1, 1, 1),
                                  ((0, 0), (p, p), (p, p), (0, 0)))
    return x * (spec.k + spec.alpha * total / (spec.size * spec.size)) ** (-spec.beta)


def lrn_none(x, spec):
    """No LRN at all: the lower bound of what any LRN formulation can cost."""
    return x


LRN_VARIANTS = {"library (separable, hand-written backward)": None, "pow": lrn_pow,
                "reduce_window (before 2026-12-06)": L.reduce_window_lrn, "none (bound)": lrn_none}


@contextlib.contextmanager
def _patched(module, name: str, fn):
    """``module.name`` is ``fn`` inside the block (unchanged when ``fn`` is None): programs
    traced there use the variant."""
    orig = getattr(module, name)
    if fn is not None:
        setattr(module, name, fn)
    try:
        yield
    finally:
        setattr(module, name, orig)


# --------------------------------------------------------------------------- pool variants

def _pool_op_row(side: int, spec: L.Pool, in_hw: int, channels: int, b: int, repeats: int) -> Row:
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((b, in_hw, in_hw, channels), dtype=np.float32))
    oh = L.spec_out_size(in_hw, spec)
    g = jnp.asarray(rng.standard_normal((b, oh, oh, channels), dtype=np.float32))
    fns = [xla_options.jit(lambda x, g, f=f: jax.vjp(lambda a: f(a, spec), x)[1](g)[0])
           for f in (L.max_pool, L.reduce_window_pool)]
    np.testing.assert_array_equal(np.asarray(fns[0](x, g)), np.asarray(fns[1](x, g)))
    tj, tr = time_pair(lambda: fns[0](x, g).block_until_ready(),
                       lambda: fns[1](x, g).block_until_ready(), 2, repeats)
    return Row("3 pools", f"overfeat7 width 1/8 {spec.name} fwd+bwd {b}x{in_hw}x{in_hw}x{channels} "
               f"(@{side})", b / tj, b / tr, "img/s", pair_ratio(), None,
               f"reference: reduce_window; same gradients; {pair_spread()}")


_LIBRARY_MAX_POOL = L.max_pool


def _reduce_window_when_overlapping(x, spec):
    """``max_pool`` as before 2026-12-06: overlapping pools (ZF-5's) through ``reduce_window``."""
    return L.reduce_window_pool(x, spec) if spec.kernel > spec.stride else _LIBRARY_MAX_POOL(x, spec)


def _zf5_detection_overrides() -> tuple[str, ...]:
    """ZF-5 as detection pretrains it: the recipe's input and dropout
    (spp_jax.detection.config.DETECTION_PRETRAIN), on the embedded preset otherwise."""
    from spp_jax.detection.config import DETECTION_PRETRAIN
    return tuple(f"{k}={DETECTION_PRETRAIN[k]}" for k in ("input_norm", "dropout"))


def pool_variants(cfg: Config, device) -> list[Row]:
    """The backbone pools through spp_jax.binmax against ``reduce_window``, JAX against JAX:
    Overfeat's kernel = stride pool1 and pool2 per op at 224 and on the embedded train step;
    ZF-5's overlapping 3x3 / 2 pools on the embedded ZF-5 step of detection's pretraining."""
    specs = scaled_specs("overfeat7", 0.125)
    rows, hw, cin = [], 224, 3
    for s in specs:  # each pool on its input size in the embedded Overfeat-7 at 224
        if isinstance(s, L.Pool):
            rows.append(_pool_op_row(224, s, hw, cin, 32, cfg.repeats))
        hw = L.spec_out_size(hw, s)
        cin = s.features if isinstance(s, L.Conv) else cin
    rows += [_step_ab_row("3 pools", side, device, _patched(L, "max_pool", L.reduce_window_pool),
                          "the same step with reduce_window pools", cfg.repeats)
             for side in cfg.embedded_sizes]
    rows += [_step_ab_row("3 pools", side, device, _patched(L, "max_pool", _reduce_window_when_overlapping),
                          "the same step with reduce_window pools", cfg.repeats, channels=3,
                          model="zf5", overrides=_zf5_detection_overrides())
             for side in cfg.embedded_sizes]
    return rows


def _three_equal_channels(x, name: str, valid_hw=None):
    """``normalise_input`` handing conv1 gray input as three equal channels (conv1 convolves
    copies, as the library did until 2026-12-05)."""
    from spp_jax.models import input_norm
    return input_norm.gray_standardise(x, valid_hw) if name == "gray_std" else x


def conv1_fold_variants(cfg: Config, device) -> list[Row]:
    """The embedded step (gray input) with conv1 folded to one channel against convolving
    the three equal channels, JAX against JAX."""
    from spp_jax.models import sppnet
    # Colour batches on both sides: a gray (1-channel) batch would reach conv1 as one channel
    # under the patch too.
    return [_step_ab_row("3 gray conv1", side, device,
                         _patched(sppnet, "normalise_input", _three_equal_channels),
                         "the same step, conv1 on three equal channels", cfg.repeats, channels=3)
            for side in cfg.embedded_sizes]


def _embedded_ab_rows(cfg: Config, device, bench: str, patch, what: str) -> list[Row]:
    """:func:`_step_ab_row` at every embedded size for Overfeat-7's preset (gray input) and
    ZF-5 as detection pretrains it (colour); ``patch()`` makes a fresh context manager."""
    rows = [_step_ab_row(bench, side, device, patch(), what, cfg.repeats)
            for side in cfg.embedded_sizes]
    rows += [_step_ab_row(bench, side, device, patch(), what, cfg.repeats, channels=3,
                          model="zf5", overrides=_zf5_detection_overrides())
             for side in cfg.embedded_sizes]
    return rows


def native_conv_variants(cfg: Config, device) -> list[Row]:
    """The embedded steps with the library's convolutions (the native CPU kernels where they
    apply) against the same steps with XLA's convolutions only (conv1 on space-to-depth
    blocks), JAX against JAX."""
    from spp_jax.models import convolution
    return _embedded_ab_rows(cfg, device, "3 native conv",
                             lambda: _patched(convolution, "_route", lambda *a: "xla"),
                             "the same step on XLA's convolutions only")


def conv1_block_variants(cfg: Config, device) -> list[Row]:
    """The embedded steps with the library's conv1 (the native kernels; without them
    space-to-depth blocks) against XLA's strided convolution, JAX against JAX."""
    from spp_jax.models import space_to_depth
    # The reference: conv1 as XLA's strided convolution whatever its size (the library's
    # until 2026-12-06).
    return _embedded_ab_rows(cfg, device, "3 conv1",
                             lambda: _patched(L, "input_conv", space_to_depth.strided_conv),
                             "the same step, conv1 as XLA's strided convolution")


def _step_ab_row(bench: str, side: int, device, patch, what: str, repeats: int,
                 channels: int | None = None, model: str = "overfeat7", overrides=()) -> Row:
    """The embedded preset's step (``model``, ``overrides``) against itself built under
    ``patch`` (a context manager)."""
    jstep, tc, *_ = embedded_jax_step(side, device, channels, model, overrides)
    with patch:  # traced and compiled while patched
        rstep, *_ = embedded_jax_step(side, device, channels, model, overrides)
    tj, tr = time_pair(jstep, rstep, 2, repeats)
    how = " ".join(overrides) or "the preset's own"
    return Row(bench, f"{model} width 1/8 train step ({how}) batch {tc.batch_size} @{side}",
               tc.batch_size / tj, tc.batch_size / tr, "img/s", pair_ratio(), None,
               f"reference: {what}; {pair_spread()}")


# --------------------------------------------------------------------------- models

def build(arch: str, device, width: float = 1.0):
    import torch
    from bench import torch_models as TM
    from spp_jax.models import SPPNet, get_model, init_params
    model = get_model(arch, width=width)
    variables = jax.device_put(init_params(model, jax.random.key(0)), device)
    tnet = TM.TorchSPPNet(arch, model.channels, width=width)
    TM.load_backbone_params(tnet.features, variables["params"]["backbone"])
    tnet = tnet.to(_tdev(), memory_format=torch.channels_last)
    return model, variables, tnet, SPPNet


def jax_forward(model, SPPNet):
    # The library's compile options (spp_jax.xla_options), as its serving programs use.
    return xla_options.jit(lambda v, x: model.apply(v, x, method=SPPNet.conv_map))


def torch_forward(tnet):
    import torch

    def f(x):
        with torch.no_grad():
            out = tnet.features(x)
        tsync(_tdev())
        return out
    return f


def images(b: int, h: int, w: int, device):
    import torch
    rng = np.random.default_rng(2)
    x_np = (rng.standard_normal((b, h, w, 3), dtype=np.float32) * 50.0)
    x = jax.device_put(jnp.asarray(x_np), device)
    x_t = torch.from_numpy(x_np).to(_tdev()).permute(0, 3, 1, 2)  # channels_last view of the NHWC buffer
    return x, x_t


def check_forward(fj, ft, variables, x, x_t):
    out_j = np.asarray(fj(variables, x))
    out_t = ft(x_t).permute(0, 2, 3, 1).cpu().numpy()
    assert out_j.shape == out_t.shape, (out_j.shape, out_t.shape)
    scale = float(np.abs(out_t).max()) or 1.0
    err = float(np.abs(out_j - out_t).max()) / scale
    assert err < 1e-3, f"backbone outputs differ: max rel err {err}"
    return err


def _batch(b: int, side: int):
    rng = np.random.default_rng(3)
    x_np = rng.standard_normal((b, side, side, 3), dtype=np.float32) * 50.0
    return x_np, rng.integers(0, 1000, b).astype(np.int32)


def jax_train_step(model, params, b: int, side: int, device):
    """One SGD (momentum 0.9) step of ``model`` on a fixed random batch, as a timed callable."""
    import optax
    tx = optax.sgd(0.01, momentum=0.9)
    x_np, y_np = _batch(b, side)
    x, y = jax.device_put(jnp.asarray(x_np), device), jax.device_put(jnp.asarray(y_np), device)

    @xla_options.jit
    def step(params, opt, x, y, key):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    state = {"p": params, "o": tx.init(params), "i": 0}

    def jstep():
        state["i"] += 1
        p, o, loss = step(state["p"], state["o"], x, y, jax.random.key(state["i"]))
        loss.block_until_ready()
        state["p"], state["o"] = p, o
    return jstep


def train_steps(model, variables, tnet, b: int, side: int, device):
    """The JAX step (:func:`jax_train_step`) and torch's on the same batch."""
    import torch
    jstep = jax_train_step(model, variables["params"], b, side, device)
    tnet.train()
    topt = torch.optim.SGD(tnet.parameters(), lr=0.01, momentum=0.9)
    x_np, y_np = _batch(b, side)
    x_t = torch.from_numpy(x_np).to(_tdev()).permute(0, 3, 1, 2)
    y_t = torch.from_numpy(y_np.astype(np.int64)).to(_tdev())

    def tstep():
        topt.zero_grad(set_to_none=True)
        loss = F_cross_entropy(tnet(x_t), y_t)
        loss.backward()
        topt.step()
        tsync(_tdev())
    return jstep, tstep


def winograd_variants(cfg: Config, device) -> list[Row]:
    """The full-width SGD steps with the library's convolutions (wide 3x3 layers by Winograd)
    against the same steps with those layers on XLA's convolutions, JAX against JAX."""
    from spp_jax.models import convolution, get_model, init_params
    route = convolution._route
    no_winograd = lambda *a: "xla" if route(*a) == "winograd" else route(*a)  # noqa: E731
    rows = []
    for arch in cfg.backbones:
        b = cfg.batch if arch == "zf5" else cfg.batch_overfeat
        model = get_model(arch)
        params = jax.device_put(init_params(model, jax.random.key(0)), device)["params"]
        jstep = jax_train_step(model, params, b, 224, device)
        with _patched(convolution, "_route", no_winograd):
            rstep = jax_train_step(model, params, b, 224, device)
            rstep()  # traced and compiled while patched
        tj, tr = time_pair(jstep, rstep, 1, cfg.train_repeats)
        rows.append(Row("3 winograd", f"{arch} SGD train step batch {b} @224", b / tj, b / tr,
                        "img/s", pair_ratio(), None,
                        f"reference: the same step, its 3x3 stride-1 layers on XLA's convolutions; "
                        f"{pair_spread()}"))
    return rows


def F_cross_entropy(logits, y):
    import torch.nn.functional as F
    return F.cross_entropy(logits, y)


# --------------------------------------------------------------------------- main

def run(cfg: Config, device, peak: dict) -> list[Row]:
    _TDEV[0] = torch_device(cfg)
    rows = []
    pk = peak["peak"]
    for arch in cfg.backbones:
        b = cfg.batch if arch == "zf5" else cfg.batch_overfeat
        model, variables, tnet, SPPNet = build(arch, device)
        fj, ft = jax_forward(model, SPPNet), torch_forward(tnet)
        tnet.eval()
        for label, (n, h, w) in ((f"fwd batch {b} @224", (b, 224, 224)),
                                 (f"fwd 1 image {cfg.big_image[0]}x{cfg.big_image[1]}", (1,) + tuple(cfg.big_image))):
            x, x_t = images(n, h, w, device)
            err = check_forward(fj, ft, variables, x, x_t)
            tj, tt = time_pair(lambda: fj(variables, x).block_until_ready(), lambda: ft(x_t),
                               1, cfg.bb_repeats)
            fl = conv_flops(arch, h, w) * n
            rows.append(Row("3 backbone", f"{arch} {label}", n / tj, n / tt, "img/s", pair_ratio(), GOAL,
                            f"conv GFLOP/s (direct-convolution count) jax {fl / tj / 1e9:.0f} ({fl / tj / 1e9 / pk:.0%} of peak), "
                            f"torch {fl / tt / 1e9:.0f} ({fl / tt / 1e9 / pk:.0%}); max rel diff {err:.1e}; {pair_spread()}"))
        jstep, tstep = train_steps(model, variables, tnet, b, 224, device)
        tj, tt = time_pair(jstep, tstep, 1, cfg.train_repeats)
        fl = 3.0 * b * (conv_flops(arch, 224, 224) + head_flops(model.channels))
        rows.append(Row("3 backbone", f"{arch} SGD train step batch {b} @224", b / tj, b / tt, "img/s",
                        pair_ratio(), GOAL, f"GFLOP/s (3x fwd, direct-convolution count) jax {fl / tj / 1e9:.0f} ({fl / tj / 1e9 / pk:.0%} "
                        f"of peak), torch {fl / tt / 1e9:.0f} ({fl / tt / 1e9 / pk:.0%}); {pair_spread()}"))
        del jstep, tstep, model, variables, tnet
    rows += embedded_steps(cfg, device)
    rows += pool_variants(cfg, device)
    rows += conv1_fold_variants(cfg, device)
    rows += conv1_block_variants(cfg, device)
    rows += native_conv_variants(cfg, device)
    rows += winograd_variants(cfg, device)
    rows += lrn_variants(cfg, device, pk)
    rows += lrn_step_variants(cfg, device)
    if cfg.flag_variants and cfg.device == "cpu":  # XLA CPU flags
        rows += flag_variants(cfg)
    return rows


def _preset_channels(tc) -> int:
    """The channels of the preset's training batches: 1 (the gray level) for gray_std nets."""
    from spp_jax.models.input_norm import takes_gray_batches
    return 1 if takes_gray_batches(tc.input_norm) else 3


def embedded_jax_step(side: int, device, channels: int | None = None, model: str = "overfeat7",
                      overrides=()):
    """The embedded preset's own compiled train step (spp_jax.train.CompiledSteps: Overfeat-7
    width 1/8, or ``model``, with ``overrides`` (key=value); fc 1024, 10 classes, Adam with L2,
    batch 32, NaN guard) on a fixed batch at ``side`` px: (step(), the preset's TrainConfig, the
    model, compile seconds)."""
    from spp_jax.train.config import build_model, get_config
    from spp_jax.train.state import create_state, optimizer_from_config
    from spp_jax.train.steps import CompiledSteps, make_eval_step, make_train_step
    tc = get_config("embedded", [f"model={model}", *overrides])
    model = build_model(tc, 10)
    tx = optimizer_from_config(tc, 1000)
    b = tc.batch_size
    rep = jax.sharding.SingleDeviceSharding(device)
    state = jax.device_put(create_state(model.init(jax.random.key(0), jnp.zeros((1, side, side, 3)))
                                        ["params"], tx), rep)
    channels = channels or _preset_channels(tc)
    steps = CompiledSteps(make_train_step(model, tx, 0), make_eval_step(model),
                          jax.eval_shape(lambda s: s, state), b, rep, rep, channels=channels)
    x_np, y_np = _embedded_batch(b, side, channels)
    batch = jax.device_put({"image": jnp.asarray(x_np), "label": jnp.asarray(y_np)}, rep)
    holder = {"s": state}

    def jstep():
        holder["s"], m = steps(side, holder["s"], batch)
        m["loss"].block_until_ready()
    jstep()  # compiles
    return jstep, tc, model, steps.compile_seconds[side]


def _embedded_batch(b: int, side: int, channels: int = 3):
    """A random (b, side, side, channels) batch in pixel units and its labels; one channel
    is the three-channel batch's channel mean (the gray batches of a gray_std preset)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((b, side, side, 3), dtype=np.float32) * 58.0
    return (x.mean(-1, keepdims=True) if channels == 1 else x), rng.integers(0, 10, b).astype(np.int32)


def embedded_torch_step(side: int, tc, channels):
    """The same net and optimiser in torch (channels-last, Adam with the same L2 as
    weight_decay; the preset's dropout and input: gray input into a one-channel conv1) on
    the same batch: step()."""
    import torch
    from bench import torch_models as TM
    tnet = TM.TorchSPPNet("overfeat7", channels, num_classes=10, fc_dim=tc.fc_dim, width=tc.width,
                          dropout=tc.dropout, gray=tc.input_norm == "gray_std",
                          ).to(_tdev(), memory_format=torch.channels_last)
    tnet.train()
    topt = torch.optim.Adam(tnet.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    x_np, y_np = _embedded_batch(tc.batch_size, side, _preset_channels(tc))  # the JAX side's batch
    x_t = torch.from_numpy(x_np * tc.input_scale).to(_tdev()).permute(0, 3, 1, 2)
    y_t = torch.from_numpy(y_np.astype(np.int64)).to(_tdev())

    def tstep():
        topt.zero_grad(set_to_none=True)
        F_cross_entropy(tnet(x_t), y_t).backward()
        topt.step()
        tsync(_tdev())
    return tstep


def embedded_steps(cfg: Config, device) -> list[Row]:
    """The embedded preset's own train step vs the same net in torch, at each training size."""
    rows = []
    for side in cfg.embedded_sizes:
        jstep, tc, model, compile_s = embedded_jax_step(side, device)
        tstep = embedded_torch_step(side, tc, model.channels)
        tj, tt = time_pair(jstep, tstep, 2, cfg.repeats)
        b = tc.batch_size
        rows.append(Row("3 embedded", f"overfeat7 width 1/8 train step (the preset's own) batch {b} @{side}",
                        b / tj, b / tt, "img/s", pair_ratio(), (">=", 0.8),
                        f"Adam + L2, dropout {tc.dropout:g}, input {tc.input_norm}, "
                        f"{_preset_channels(tc)}-channel batches as in training (torch: one-channel conv1); "
                        f"JAX compile {compile_s:.1f} s; {pair_spread()}"))
        del jstep, tstep
    return rows


def lrn_variants(cfg: Config, device, pk: float) -> list[Row]:
    """ZF-5 forward (batch at 224) with each LRN formulation, each against the same torch model."""
    model, variables, tnet, SPPNet = build("zf5", device)
    tnet.eval()
    ft = torch_forward(tnet)
    b = cfg.batch
    x, x_t = images(b, 224, 224, device)
    rows = []
    fl = conv_flops("zf5", 224, 224) * b
    for name in cfg.lrn_variants:
        fn = LRN_VARIANTS[name]
        with _patched(L, "lrn", fn):
            fj = jax_forward(model, SPPNet)
            if fn is not lrn_none:
                check_forward(fj, ft, variables, x, x_t)
            block(fj(variables, x))  # trace + compile while patched
        tj, tt = time_pair(lambda: fj(variables, x).block_until_ready(), lambda: ft(x_t), 1, cfg.bb_repeats)
        rows.append(Row("3 LRN", f"zf5 fwd batch {b} @224, LRN {name}", b / tj, b / tt, "img/s", pair_ratio(),
                        None, f"jax {fl / tj / 1e9:.0f} GFLOP/s ({fl / tj / 1e9 / pk:.0%} of peak); {pair_spread()}"))
    return rows


def lrn_step_variants(cfg: Config, device) -> list[Row]:
    """The embedded ZF-5 step as detection pretrains it, with the library's LRN against
    autodiff of the ``reduce_window`` box sum (the library's until 2026-12-06), JAX against JAX."""
    return [_step_ab_row("3 LRN", side, device, _patched(L, "lrn", L.reduce_window_lrn),
                         "the same step, LRN by autodiff of reduce_window", cfg.repeats, channels=3,
                         model="zf5", overrides=_zf5_detection_overrides())
            for side in cfg.embedded_sizes]


def flag_variants(cfg: Config) -> list[Row]:
    rows = []
    for flags in ("",) + FLAG_VARIANTS:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        cmd = [sys.executable, "-m", "bench.backbone", "--child", "--batch", str(cfg.batch),
               "--repeats", str(cfg.bb_repeats), "--train-batch", str(cfg.flag_train_batch)]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not lines:
                err = (p.stderr.strip().splitlines() or ["?"])[-1][:120]
                rows.append(Row("3 XLA flags", f"zf5 fwd, {flags or 'default'}", None, None, "img/s", None,
                                None, f"failed: {err}"))
                continue
            r = json.loads(lines[-1])
        except subprocess.TimeoutExpired:
            rows.append(Row("3 XLA flags", f"zf5 fwd, {flags or 'default'}", None, None, "img/s", None,
                            None, "timed out"))
            continue
        rows.append(Row("3 XLA flags", f"zf5 fwd batch {cfg.batch} @224, {flags or 'default flags'}",
                        r["jax"], r["torch"], "img/s", r["ratio"], None,
                        "own process: JAX with this XLA_FLAGS and torch timed interleaved"))
        if "train_jax" in r:
            rows.append(Row("3 XLA flags", f"zf5 train step batch {cfg.flag_train_batch} @224, "
                            f"{flags or 'default flags'}", r["train_jax"], r["train_torch"], "img/s",
                            r["train_ratio"], None, "same process as the row above"))
    return rows


def _child(argv):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-batch", type=int, default=0)
    a = ap.parse_args(argv)
    setup_torch_threads()
    dev = jax.devices("cpu")[0]
    model, variables, tnet, SPPNet = build("zf5", dev)
    tnet.eval()
    fj, ft = jax_forward(model, SPPNet), torch_forward(tnet)
    x, x_t = images(a.batch, 224, 224, dev)
    check_forward(fj, ft, variables, x, x_t)
    tj, tt = time_pair(lambda: fj(variables, x).block_until_ready(), lambda: ft(x_t), 1, a.repeats)
    out = {"jax": a.batch / tj, "torch": a.batch / tt, "jax_s": tj, "torch_s": tt, "ratio": pair_ratio()}
    if a.train_batch:
        jstep, tstep = train_steps(model, variables, tnet, a.train_batch, 224, dev)
        tj, tt = time_pair(jstep, tstep, 1, a.repeats)
        out.update(train_jax=a.train_batch / tj, train_torch=a.train_batch / tt, train_jax_s=tj, train_torch_s=tt,
                   train_ratio=pair_ratio())
    print(json.dumps(out))


if __name__ == "__main__":
    _child(sys.argv[1:])
