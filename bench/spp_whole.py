"""1. Whole-map SPP: ``spp_jax.pool`` vs PyTorch's idiom (adaptive_max_pool2d per level + concat)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import spp_jax
from bench.common import Config, Row, pair_ratio, pair_spread, time_pair, torch_device, tsync

LEVELS = (6, 3, 2, 1)
GOAL = (">=", 1.5)


def _axis_bins_slices(x, axis: int, n: int):
    """Appendix A bin maxima along one axis as n static slices + max (no gather)."""
    from spp_jax.bins import bin_edges
    parts = [jax.lax.slice_in_dim(x, s, e, axis=axis).max(axis=axis, keepdims=True)
             for s, e in bin_edges(x.shape[axis], n)]
    return jnp.concatenate(parts, axis=axis)


def pool_slices(fmap, levels=LEVELS):
    """A candidate formulation for ``spp_jax.pool`` (bench-only, not the library's):
    the finest level by static slices (columns, then rows), coarser levels that divide
    it as maxima over groups of its bins, exactly as the library derives them."""
    from spp_jax.bins import derivation_plan
    b, c = fmap.shape[0], fmap.shape[-1]
    plan = derivation_plan(levels)
    got = {}
    for n in sorted(plan, reverse=True):
        if plan[n] == n:
            got[n] = _axis_bins_slices(_axis_bins_slices(fmap, 2, n), 1, n)
        else:
            m = plan[n] // n
            got[n] = got[plan[n]].reshape(b, n, m, n, m, c).max(axis=(2, 4))
    return jnp.concatenate([got[n].reshape(b, n * n * c) for n in levels], axis=-1)


def torch_spp(x, levels=LEVELS):
    """The usual PyTorch SPP layer: one adaptive max pool per level, flattened channel-major."""
    import torch
    import torch.nn.functional as F
    return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in levels], dim=1)


def ours_from_torch(out_t: np.ndarray, b: int, c: int, levels=LEVELS) -> np.ndarray:
    """Torch's (B, sum C*n*n) channel-major layout -> spp_jax's (y, x, C) per level."""
    parts, off = [], 0
    for n in levels:
        blk = out_t[:, off:off + c * n * n].reshape(b, c, n, n).transpose(0, 2, 3, 1)
        parts.append(blk.reshape(b, -1))
        off += c * n * n
    return np.concatenate(parts, axis=1)


def run(cfg: Config, device) -> list[Row]:
    import torch
    rows = []
    rng = np.random.default_rng(0)
    tdev = torch_device(cfg)
    for shape in cfg.spp_shapes:
        b, h, w, c = shape
        # Distinct values (exact integers): no ties, so every gradient rule (ours: the first
        # maximal cell; jnp.max: split; torch: its own) routes to the same cell.
        x_np = (rng.permutation(int(np.prod(shape))) - int(np.prod(shape)) // 2).reshape(shape)
        x_np = x_np.astype(np.float32)
        g_np = rng.standard_normal((b, c * sum(n * n for n in LEVELS)), dtype=np.float32)
        x = jax.device_put(jnp.asarray(x_np), device)
        g = jax.device_put(jnp.asarray(g_np), device)
        # channels-last input for torch: a (B, C, H, W) view of the same NHWC buffer.
        x_t = torch.from_numpy(x_np).to(tdev).permute(0, 3, 1, 2)
        assert x_t.is_contiguous(memory_format=torch.channels_last)
        x_tg = x_t.detach().clone(memory_format=torch.channels_last).requires_grad_(True)
        perm = spp_jax.caffe_permutation(c, LEVELS, LEVELS)  # ours -> channel-major, level order kept
        g_t = torch.from_numpy(np.ascontiguousarray(g_np[:, perm])).to(tdev)

        fwd = jax.jit(lambda a: spp_jax.pool(a, LEVELS))
        grad = jax.jit(jax.grad(lambda a, gg: jnp.vdot(spp_jax.pool(a, LEVELS), gg)))

        out_j = np.asarray(fwd(x))
        with torch.no_grad():
            out_t = torch_spp(x_t).cpu().numpy()
        assert np.array_equal(out_j, ours_from_torch(out_t, b, c)), f"SPP outputs differ for {shape}"
        # Gradients: both route each bin's gradient to its arg-max cell; with distinct
        # inputs there are no ties, so they agree up to summation order.
        gj = np.asarray(grad(x, g))
        x_tg.grad = None
        torch_spp(x_tg).backward(g_t)
        gt = x_tg.grad.permute(0, 2, 3, 1).cpu().numpy()
        np.testing.assert_allclose(gj, gt, rtol=1e-5, atol=1e-5)

        def jf():
            fwd(x).block_until_ready()

        def tf():
            with torch.no_grad():
                torch_spp(x_t)
            tsync(tdev)

        def jb():
            grad(x, g).block_until_ready()

        def tb():
            x_tg.grad = None
            torch_spp(x_tg).backward(g_t)
            tsync(tdev)

        name = "x".join(map(str, shape))
        # The candidate formulation, timed against the library in the same process.
        alt_f = jax.jit(lambda a: pool_slices(a))
        alt_g = jax.jit(jax.grad(lambda a, gg: jnp.vdot(pool_slices(a), gg)))
        assert np.array_equal(np.asarray(alt_f(x)), out_j)
        np.testing.assert_allclose(np.asarray(alt_g(x, g)), gj, rtol=1e-6, atol=1e-6)
        ta, tl = time_pair(lambda: alt_f(x).block_until_ready(), jf, cfg.warmup, cfg.repeats, cfg.min_seconds)
        r_f = pair_ratio()
        tab, tlb = time_pair(lambda: alt_g(x, g).block_until_ready(), jb, cfg.warmup, cfg.repeats,
                             cfg.min_seconds)
        r_b = pair_ratio()
        tj, tt = time_pair(jf, tf, cfg.warmup, cfg.repeats, cfg.min_seconds)
        rows.append(Row("1 SPP", f"{name} fwd", tj * 1e3, tt * 1e3, "ms", pair_ratio(), GOAL,
                        f"outputs bit-equal; {pair_spread()}"))
        tj, tt = time_pair(jb, tb, cfg.warmup, cfg.repeats, cfg.min_seconds)
        rows.append(Row("1 SPP", f"{name} fwd+bwd", tj * 1e3, tt * 1e3, "ms", pair_ratio(), GOAL,
                        f"grads equal (rtol 1e-5); {pair_spread()}"))
        rows.append(Row("1 SPP alt", f"{name} static-slices formulation vs library, fwd | fwd+bwd",
                        ta * 1e3, tl * 1e3, "ms", r_f, None,
                        f"fwd+bwd: slices {tab * 1e3:.1f} ms vs library {tlb * 1e3:.1f} ms "
                        f"(x{r_b:.2f}); bench-only candidate, outputs and grads equal"))
    return rows
