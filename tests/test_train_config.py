"""Configs, overrides, schedules, plateau controller, memory hint (no compilation)."""

import pytest

from spp_jax.train import (PRESETS, PlateauController, TrainConfig, apply_overrides, check_memory,
                           estimate_train_bytes, get_config, learning_rate_schedule, lr_at,
                           size_schedule)


def test_defaults_are_the_papers_imagenet_settings():
    c = TrainConfig()
    assert (c.model, c.spp, c.levels, c.sizes, c.size_schedule) == ("zf5", True, (6, 3, 2, 1),
                                                                      (180, 224), "multi")
    assert (c.batch_size, c.learning_rate, c.momentum, c.weight_decay) == (128, 0.01, 0.9, 5e-4)
    assert c.num_epochs == 70 and c.decay_epoch_list == (35, 58)
    o7 = get_config(model="overfeat7")
    assert o7.num_epochs == 90 and o7.decay_epoch_list == (45, 75)
    assert set(PRESETS) >= {"imagenet", "embedded"}
    get_config("embedded")  # valid


def test_overrides_are_typed():
    c = apply_overrides(TrainConfig(), ["model=overfeat5", "sizes=220,230", "learning_rate=0.02",
                                        "spp=false", "epochs=none", "decay_epochs=10,20",
                                        "batch_size=64", "width=0.5"])
    assert c.model == "overfeat5" and c.sizes == (220, 230) and c.learning_rate == 0.02
    assert c.spp is False and c.epochs is None and c.decay_epochs == (10, 20)
    assert c.batch_size == 64 and c.width == 0.5
    assert apply_overrides(c, ["epochs=5"]).epochs == 5


def test_override_errors():
    with pytest.raises(ValueError, match=r"unknown config key 'lr'; valid keys: model, spp, .*batch_size"):
        apply_overrides(TrainConfig(), ["lr=0.1"])
    with pytest.raises(ValueError, match="batch_size: expected an int, got 'big'"):
        apply_overrides(TrainConfig(), ["batch_size=big"])
    with pytest.raises(ValueError, match="expected a bool"):
        apply_overrides(TrainConfig(), ["spp=maybe"])
    with pytest.raises(ValueError, match="not key=value"):
        apply_overrides(TrainConfig(), ["spp"])
    with pytest.raises(ValueError, match="size_schedule=zigzag: must be one of: multi, single, random"):
        apply_overrides(TrainConfig(), ["size_schedule=zigzag"])
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("cifar")


def test_size_schedules():
    assert size_schedule(get_config(epochs=5))[:5] == [180, 224, 180, 224, 180]
    assert size_schedule(get_config(epochs=3, size_schedule="single")) == [224] * 3
    r = size_schedule(get_config(epochs=50, size_schedule="random"))
    assert all(180 <= s <= 224 for s in r) and len(set(r)) > 10
    assert r == size_schedule(get_config(epochs=50, size_schedule="random"))  # seeded
    assert r != size_schedule(get_config(epochs=50, size_schedule="random", seed=1))


def test_step_decay_schedule_matches_host_side_lr():
    cfg = get_config(epochs=6, decay_epochs=(3, 5))
    sched = learning_rate_schedule(cfg, steps_per_epoch=10)
    for step, want in [(0, 0.01), (29, 0.01), (30, 0.001), (49, 0.001), (50, 0.0001), (59, 1e-4)]:
        assert float(sched(step)) == pytest.approx(want, rel=1e-6)
        assert lr_at(cfg, 10, step) == pytest.approx(want, rel=1e-12)
    plateau = get_config(lr_schedule="plateau")
    assert learning_rate_schedule(plateau, 10) == 0.01
    assert lr_at(plateau, 10, 10**6, scale=0.1) == pytest.approx(0.001)


def test_plateau_controller_divides_twice_at_most():
    p = PlateauController(factor=0.1, patience=2, min_delta=0.01, max_decays=2)
    changes = [p.update(e) for e in [0.9, 0.8, 0.795, 0.79, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]]
    assert changes == [False, False, False, True, False, False, True, False, False, False, False]
    assert p.scale == pytest.approx(0.01) and p.decays == 2
    q = PlateauController()
    q.set_state(p.get_state())
    assert q.get_state() == p.get_state()
    assert PlateauController().get_state()["best"] is None  # JSON-able before any update


def test_memory_estimate_and_hint():
    small = estimate_train_bytes("zf5", 0.05, 32, (6, 3, 2, 1), 4, 64, 8)
    big = estimate_train_bytes("zf5", 1.0, 4096, (6, 3, 2, 1), 1000, 224, 128)
    assert small < 2**24 and 2**30 < big < 2**36
    assert estimate_train_bytes("zf5", 1.0, 4096, (6, 3, 2, 1), 1000, 224, 256) > big
    kw = dict(model="overfeat7", width=1.0, fc_dim=4096, levels=(6, 3, 2, 1), num_classes=1000,
              sizes=(224,), per_device_batch=100000, devices_per_host=1)
    with pytest.raises(MemoryError, match="Reduce batch_size"):
        check_memory("error", **kw)
    assert check_memory("off", **kw) == 0
    assert check_memory("warn", **{**kw, "per_device_batch": 1}) > 0
