"""7. The cost of training through window SPP (end-to-end detection fine-tuning, issue 16).

ZF-5 at full width, 2 images of 688 x 917 (the 688 scale) in one padded (688, 1032) bucket
with ``valid_hw``, 128 selective-search windows per image, pyramid {6, 3, 2, 1}. Timed (warm,
median): the forward pass alone (conv maps + project/roi_pool of the windows); forward +
backward to every conv parameter through roi_pool; the conv layers' forward + backward alone
(the same conv maps, a random cotangent on them, no windows); and roi_pool's own forward +
backward on fixed conv5 maps. The ratio column is each time over the full forward + backward
(the share it accounts for), so ``1 - share(conv fwd+bwd)`` is what window SPP adds (on a
shared machine a few percent either way are noise; roi_pool's own fwd+bwd bounds it).

No torch: ``python -m bench.roi_grad [--quick]`` runs it alone in the project venv.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import Config, Row, make_config, markdown, time_fn, time_pair
from bench.windows import IMAGE_HW, proposals

NAME = "7 window-SPP backward"
IMAGES, WINDOWS = 2, 128


def _inputs(device):
    """Model, variables, (pixels, valid_hw, cells) of 2 images in one bucket, cotangents."""
    from spp_jax.models import get_model, random_variables
    from spp_jax.serve import Server
    model = get_model("zf5")
    variables = jax.device_put(random_variables(model, 0, bias_std=0.1), device)
    sv = Server(model, variables, mean=128.0)
    image, boxes, _ = proposals(IMAGES * WINDOWS, IMAGE_HW)
    view = sv.prepare(image, IMAGE_HW[0])
    batch = sv.batch([view, view[:, ::-1]], sv.bucket(*view.shape[:2], IMAGE_HW[0]))
    map_hw = sv.map_hw(batch.hw)
    cells = np.stack([sv.cells(boxes[i * WINDOWS:(i + 1) * WINDOWS], map_hw[i]) for i in range(IMAGES)])
    put = lambda a: jax.device_put(jnp.asarray(a), device)  # noqa: E731
    return model, variables, put(batch.pixels), put(batch.hw), put(cells), batch.pixels.shape


def _programs(model):
    """Four jitted functions: forward, forward+backward, conv fwd+bwd, roi_pool fwd+bwd."""
    from spp_jax.models import SPPNet
    from spp_jax.roi import roi_pool_cells
    levels = tuple(model.levels)

    def conv(params, pixels, hw):
        return model.apply({"params": params}, pixels, valid_hw=hw, method=SPPNet.conv_map)[0]

    def pool(fmap, cells):
        return jax.vmap(lambda f, c: roi_pool_cells(f, c, levels))(fmap, cells)

    def loss(params, pixels, hw, cells, cot):
        return jnp.vdot(pool(conv(params, pixels, hw), cells), cot)

    fwd = jax.jit(lambda p, x, hw, c: pool(conv(p, x, hw), c))
    fwd_bwd = jax.jit(jax.grad(loss))
    conv_bwd = jax.jit(jax.grad(lambda p, x, hw, cot: jnp.vdot(conv(p, x, hw), cot)))
    roi_bwd = jax.jit(jax.grad(lambda f, c, cot: jnp.vdot(pool(f, c), cot)))
    return conv, fwd, fwd_bwd, conv_bwd, roi_bwd


def run(cfg: Config, device) -> list[Row]:
    model, variables, pixels, hw, cells, shape = _inputs(device)
    params = {"backbone": variables["params"]["backbone"]}
    conv, fwd, fwd_bwd, conv_bwd, roi_bwd = _programs(model)
    fmap = jax.jit(conv)(params, pixels, hw)
    rng = np.random.default_rng(0)
    pooled_shape = (IMAGES, WINDOWS, model.pooled_dim)
    cot = jax.device_put(jnp.asarray(rng.standard_normal(pooled_shape), jnp.float32), device)
    cot_map = jax.device_put(jnp.asarray(rng.standard_normal(fmap.shape), jnp.float32), device)
    block = jax.block_until_ready
    reps = dict(warmup=1, repeats=cfg.bb_repeats)
    # The two whose difference is the point run interleaved (robust to other jobs' load).
    both = time_pair(lambda: block(fwd_bwd(params, pixels, hw, cells, cot)),
                     lambda: block(conv_bwd(params, pixels, hw, cot_map)), **reps)
    t = {"fwd_bwd": both[0], "conv_bwd": both[1],
         "fwd": time_fn(lambda: block(fwd(params, pixels, hw, cells)), **reps),
         "roi_bwd": time_fn(lambda: block(roi_bwd(fmap, cells, cot)), **reps)}
    where = (f"ZF-5 width 1, batch {shape[0]}x{shape[1]}x{shape[2]} (2 images 688x917, valid_hw), "
             f"conv5 {fmap.shape[1]}x{fmap.shape[2]}, {WINDOWS} windows/image, levels {tuple(model.levels)}")
    share = lambda k: t[k] / t["fwd_bwd"]  # noqa: E731
    return [
        Row(NAME, "fwd+bwd: conv maps + roi_pool, grads of all conv params", t["fwd_bwd"], None, "s", 1.0,
            note=where),
        Row(NAME, "forward alone (conv + roi_pool)", t["fwd"], None, "s", share("fwd"),
            note="ratio = this / fwd+bwd"),
        Row(NAME, "conv fwd+bwd alone (no windows)", t["conv_bwd"], None, "s", share("conv_bwd"),
            note=f"ratio = this / fwd+bwd (interleaved with it): window SPP adds "
                 f"{100 * (1 - share('conv_bwd')):.0f} % of fwd+bwd (noise: a few %)"),
        Row(NAME, "roi_pool fwd+bwd alone on the conv5 maps", t["roi_bwd"], None, "s", share("roi_bwd"),
            note="ratio = this / fwd+bwd"),
    ]


def main(argv=None) -> int:
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    rows = run(make_config(quick), jax.devices("cpu")[0])
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
