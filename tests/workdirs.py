"""A tiny `make train`-style workdir for the tests of everything that reads one."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.train.checkpoint import Checkpointer
from spp_jax.train.config import build_model, get_config
from spp_jax.train.state import create_state, optimizer_from_config


def make_workdir(path: str, spp: bool, seed: int) -> str:
    """A `make train`-style workdir (config.json, an orbax checkpoint, mean_image.npy) holding a
    tiny randomly initialised net: what the transfer experiments read, without training time."""
    cfg = get_config("embedded", ["width=0.05", "fc_dim=16", "sizes=224", "size_schedule=single",
                                  f"spp={str(spp).lower()}", "compile_cache_dir=none"])
    model = build_model(cfg, 10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    rng = np.random.default_rng(seed)

    def fill(p, s):
        fan_in = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 1
        std = np.sqrt(2 / fan_in) if jax.tree_util.keystr(p).endswith("['kernel']") else 0.1
        return jnp.asarray(rng.normal(0, std, s.shape), s.dtype)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), 1, async_save=False)
    ckpt.save(1, create_state(params, optimizer_from_config(cfg, 1)), {"epoch": 1})
    ckpt.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    np.save(os.path.join(path, "mean_image.npy"), np.full((256, 256, 3), 110.0, np.float32))
    return path
