"""8. The input pipeline against the train step it feeds (the embedded preset, on this CPU).

Two questions, per training size (180, 224):

* **Alone**, how fast does the grain pipeline make batches (the preset's augmentation,
  ``data_threads`` reader threads, the embedded images, the resized images cached as in
  every epoch after a run's first; the first epoch's figures are in the note), and at what
  CPU cost per image?
  Measured over ``pipeline_batches`` batches after a warm-up, against the step's own
  images/s on a resident batch (row ratio = pipeline images/s / step images/s; below 1 the
  pipeline would be the bottleneck even with a core to itself).
* **Shared**: the preset's compiled train step fed batch by batch from the live pipeline, as
  the training loop does (next batch, ``device_put``, step), against the same step on a
  resident batch, timed alternately over pairs of ``pipeline_steps`` steps each (row ratio =
  resident time / fed time: the fraction of the step's throughput the real loop keeps while
  the pipeline's threads share the two cores with XLA's).

No torch: the reference is the step without its input.  The data is generated for the
benchmark (``pipeline_examples`` training images of the embedded generator, in a temporary
directory): the per-image work does not depend on how many images there are.
"""
from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import Config, Row, pair_ratio, pair_spread, time_pair

GOAL_ALONE = (">=", 1.5)   # headroom: in training the pipeline shares the cores with XLA
GOAL_SHARED = (">=", 0.95)  # the input costs the step at most 5 %


def _data(tmp: str, cfg: Config):
    """(train config, sources, AugmentConfig) of the embedded preset on freshly generated data."""
    from spp_jax.train.config import get_config
    from spp_jax.train.experiment import prepare_data
    tc = get_config("embedded", ["model=overfeat7", f"train_examples={cfg.pipeline_examples}",
                                 "val_examples=50", "mean_samples=200", f"data_dir={tmp}"])
    ds, aug = prepare_data(tc, tmp)
    return tc, ds, aug


def _step(tc, side: int, device, channels: int):
    """The preset's compiled train step at ``side`` and a state holder: ``run(batch)``."""
    from spp_jax.train.config import build_model
    from spp_jax.train.state import create_state, optimizer_from_config
    from spp_jax.train.steps import CompiledSteps, make_eval_step, make_train_step
    model = build_model(tc, 10)
    tx = optimizer_from_config(tc, 1000)
    rep = jax.sharding.SingleDeviceSharding(device)
    params = model.init(jax.random.key(0), jnp.zeros((1, side, side, 3)))["params"]
    state = jax.device_put(create_state(params, tx), rep)
    steps = CompiledSteps(make_train_step(model, tx, 0), make_eval_step(model),
                          jax.eval_shape(lambda s: s, state), tc.batch_size, rep, rep,
                          channels=channels)
    holder = {"s": state}

    def run(batch):
        holder["s"], m = steps(side, holder["s"], batch)
        return m

    return run, rep


def _alone(it, n: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of ``n`` batches drawn from a warm iterator."""
    next(it)
    w, c = time.perf_counter(), time.process_time()
    images = sum(len(next(it)["label"]) for _ in range(n))
    return images / (time.perf_counter() - w), 1e3 * (time.process_time() - c) / images


def run(cfg: Config, device) -> list[Row]:
    from spp_jax.data import pipeline
    from spp_jax.train.experiment import cache_budget
    rows = []
    with tempfile.TemporaryDirectory(prefix="spp_bench_data_") as tmp:
        t0 = time.perf_counter()
        tc, ds, aug = _data(tmp, cfg)
        print(f"  data: {len(ds.train)} generated images ({time.perf_counter() - t0:.0f} s)", flush=True)
        b, k = tc.batch_size, cfg.pipeline_steps

        def pipe(side, cache=None):
            return pipeline.TrainIterator(ds.train, b, seed=0, sizes=pipeline.CycleSizes((side,)),
                                          cfg=aug, num_threads=tc.data_threads, cache=cache)
        # Training's steady state (every epoch after the first): the resized images cached.
        cache = pipeline.ResizedCache(cache_budget(tc))
        cold = _alone(pipe(224, cache), len(ds.train) // b - 1)  # fills the cache
        for side in cfg.embedded_sizes:
            step, rep = _step(tc, side, device, aug.channels)
            it = pipe(side, cache)
            resident = jax.device_put(next(it), rep)
            step(resident)["loss"].block_until_ready()  # compile

            def fed():
                for _ in range(k):
                    m = step(jax.device_put(next(it), rep))
                m["loss"].block_until_ready()

            def still():
                for _ in range(k):
                    m = step(resident)
                m["loss"].block_until_ready()

            t_fed, t_still = time_pair(fed, still, 1, cfg.repeats)
            shared = pair_ratio()
            spread = pair_spread()
            ips, ms = _alone(it, cfg.pipeline_batches)
            step_ips = k * b / t_still
            rows.append(Row("8 pipeline", f"grain pipeline alone ({tc.data_threads} threads) vs the "
                            f"step, batch {b} @{side}", ips, step_ips, "img/s", ips / step_ips,
                            GOAL_ALONE, f"{ms:.2f} CPU ms per image, resized images cached "
                            f"(first epoch, @224: {cold[0]:.0f} img/s, {cold[1]:.2f} CPU ms per "
                            f"image); {cfg.pipeline_batches} batches"))
            rows.append(Row("8 pipeline", f"train step fed by the pipeline vs on a resident batch, "
                            f"batch {b} @{side}", k * b / t_fed, step_ips, "img/s", shared,
                            GOAL_SHARED, f"{k} steps per call; {spread}"))
            it.close()
    return rows


if __name__ == "__main__":  # python -m bench.pipeline [--quick]: this stage alone, printed
    import sys

    from bench.common import configure_pairs, make_config, markdown
    c = make_config("--quick" in sys.argv)
    configure_pairs(c)
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(markdown(run(c, jax.devices("cpu")[0])))
