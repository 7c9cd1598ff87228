"""Optimizer, per-size compiled steps, dropout keys, donation, eval step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.train import (CompiledSteps, batch_sharding, build_model, create_state, decay_mask,
                           dropout_key, enable_compilation_cache, get_lr_scale, make_eval_step,
                           make_mesh, make_optimizer, make_train_step, optimizer_from_config,
                           replicated, set_lr_scale)
from spp_jax.train.testing import TEST_CACHE_DIR, tiny_config, tiny_data

SIZES = (48, 64)


@pytest.fixture(scope="module")
def env():
    enable_compilation_cache(TEST_CACHE_DIR)
    cfg = tiny_config()
    model = build_model(cfg, 4)
    tx = optimizer_from_config(cfg, 3)
    mesh = make_mesh()
    rep, bsh = replicated(mesh), batch_sharding(mesh)

    def init_fn(key):
        return create_state(model.init(key, jnp.zeros((1, 48, 48, 3)))["params"], tx)
    init = jax.jit(init_fn, out_shardings=rep)
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    steps = CompiledSteps(make_train_step(model, tx, cfg.seed), make_eval_step(model), abstract,
                          cfg.batch_size, rep, bsh)
    for s in SIZES:
        steps.build(s)
    data = tiny_data()
    batches = {s: next(data.train_iter(0, s, 8)) for s in SIZES}
    return dict(cfg=cfg, model=model, steps=steps, init=init, batches=batches, data=data)


def _fresh(env):
    return env["init"](jax.random.key(0))


def test_weight_decay_on_kernels_only():
    params = {"conv1": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
              "fc8": {"kernel": 2 * jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    mask = decay_mask(params)
    assert mask == {"conv1": {"kernel": True, "bias": False}, "fc8": {"kernel": True, "bias": False}}
    tx = make_optimizer(0.01, 0.9, 5e-4)
    st = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, st = tx.update(zeros, st, params)
    np.testing.assert_allclose(upd["conv1"]["kernel"], -0.01 * 5e-4, rtol=1e-6)
    np.testing.assert_allclose(upd["fc8"]["kernel"], -0.01 * 5e-4 * 2, rtol=1e-6)
    assert float(jnp.abs(upd["conv1"]["bias"]).max()) == 0.0
    # momentum 0.9: with the same gradient the second update is 1.9x the first
    g = jax.tree.map(jnp.ones_like, params)
    tx2 = make_optimizer(0.1, 0.9, 0.0)
    s2 = tx2.init(params)
    u1, s2 = tx2.update(g, s2, params)
    u2, s2 = tx2.update(g, s2, params)
    np.testing.assert_allclose(u2["fc8"]["bias"], 1.9 * u1["fc8"]["bias"], rtol=1e-6)


def test_adam_option_matches_hand_computed_updates():
    """Adam's bias-corrected steps by hand: m1 = g, v1 = g^2 -> update -lr * g / (|g| + eps);
    a constant gradient keeps |update| = lr. L2 decay enters the gradient (not AdamW)."""
    params = {"fc": {"kernel": jnp.array([[2.0, -1.0]]), "bias": jnp.array([0.5])}}
    g = {"fc": {"kernel": jnp.array([[0.3, 0.0]]), "bias": jnp.array([-4.0])}}
    lr, wd = 1e-3, 0.1
    tx = make_optimizer(lr, 0.9, wd, optimizer="adam")
    st = tx.init(params)
    u1, st = tx.update(g, st, params)
    eff = np.array([[0.3 + wd * 2.0, 0.0 + wd * -1.0]])  # decayed gradient of the kernel
    np.testing.assert_allclose(u1["fc"]["kernel"], -lr * np.sign(eff), rtol=1e-5)
    np.testing.assert_allclose(u1["fc"]["bias"], [lr], rtol=1e-5)  # no decay on biases
    u2, st = tx.update(g, st, params)
    np.testing.assert_allclose(u2["fc"]["bias"], [lr], rtol=1e-5)
    with pytest.raises(ValueError, match="optimizer='rmsprop'; valid: sgd, adam"):
        make_optimizer(lr, optimizer="rmsprop")


def test_one_program_per_size_sharing_params(env):
    steps = env["steps"]
    assert set(steps.compiled) == set(SIZES)
    assert all(t > 0 for t in steps.compile_seconds.values())
    state = _fresh(env)
    for s in (48, 64, 48):
        state, m = steps(s, state, env["batches"][s])
        assert np.isfinite(float(m["loss"]))
    assert int(state.step) == 3


def test_state_is_donated(env):
    state = _fresh(env)
    leaf = jax.tree.leaves(state.params)[0]
    new, _ = env["steps"](48, state, env["batches"][48])
    assert leaf.is_deleted()
    assert not jax.tree.leaves(new.params)[0].is_deleted()


def test_dropout_key_from_seed_and_step(env):
    assert jnp.array_equal(jax.random.key_data(dropout_key(0, 5)), jax.random.key_data(dropout_key(0, 5)))
    assert not jnp.array_equal(jax.random.key_data(dropout_key(0, 5)), jax.random.key_data(dropout_key(0, 6)))
    assert not jnp.array_equal(jax.random.key_data(dropout_key(0, 5)), jax.random.key_data(dropout_key(1, 5)))
    b = env["batches"][48]
    s = lambda: _fresh(env)
    _, m1 = env["steps"](48, s(), b)
    _, m2 = env["steps"](48, s(), b)
    assert float(m1["loss"]) == float(m2["loss"])  # deterministic
    _, m3 = env["steps"](48, s().replace(step=jnp.asarray(7, jnp.int32)), b)
    assert float(m3["loss"]) != float(m1["loss"])  # another step -> other dropout masks


def test_lr_scale_changes_update_without_recompile(env):
    b = env["batches"][64]
    compiled = env["steps"].compiled[64]
    s0 = _fresh(env)
    p0 = jax.tree.map(np.asarray, s0.params)
    a, _ = compiled(s0, b)
    s1 = set_lr_scale(_fresh(env), 0.5)
    assert get_lr_scale(s1) == 0.5
    c, _ = compiled(s1, b)  # the same AOT executable accepts the modified state
    da = jax.tree.map(lambda x, y: np.asarray(x) - y, a.params, p0)
    dc = jax.tree.map(lambda x, y: np.asarray(x) - y, c.params, p0)
    for x, y in zip(jax.tree.leaves(da), jax.tree.leaves(dc)):
        np.testing.assert_allclose(y, 0.5 * x, rtol=1e-3, atol=2e-7)  # f32 rounding of p - p0


def test_eval_step_views_and_mask(env):
    state = _fresh(env)
    ev = make_eval_step(env["model"])
    imgs = jnp.asarray(env["batches"][48]["image"][:4])
    labels = jnp.asarray(np.array([0, 1, 2, 3], np.int32))
    single = ev(state.params, {"image": imgs, "label": labels})
    assert float(single["count"]) == 4 and 0 <= float(single["top1"]) <= 4
    assert float(single["top5"]) == 4  # 4 classes: top-5 always hits
    views = ev(state.params, {"image": jnp.stack([imgs, imgs], 1), "label": labels})
    np.testing.assert_allclose(views["loss"], single["loss"], rtol=1e-5)
    masked = ev(state.params, {"image": imgs, "label": labels, "mask": jnp.array([1, 1, 0, 0], bool)})
    assert float(masked["count"]) == 2


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def test_nan_guard_skips_non_finite_steps_and_flags_overflow(env):
    import optax
    model, tx = env["model"], optimizer_from_config(env["cfg"], 3)
    b = env["batches"][48]
    state = _fresh(env)
    before = _host(state)
    step = jax.jit(make_train_step(model, tx, 0))
    nan_batch = dict(b, image=np.full_like(b["image"], np.nan))
    new, m = step(state, nan_batch)
    assert not bool(m["ok"])
    jax.tree.map(np.testing.assert_array_equal, _host(new), before)  # not applied, bit for bit
    new, m = step(state, b)  # a finite step is applied: the optimizer's own update
    assert bool(m["ok"]) and int(new.step) == 1
    key = dropout_key(0, state.step)
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, b["image"], train=True, rngs={"dropout": key}), b["label"]).mean())(
        state.params)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    want = optax.apply_updates(state.params, updates)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), _host(new.params),
                 _host(want))
    # A finite gradient whose update overflows: applied (nothing to fall back on inside the
    # cond), but flagged, so the loop stops before saving it.
    huge = optax.chain(optax.scale(3e38), optax.scale(10.0))
    over = jax.jit(make_train_step(model, huge, 0))
    s2 = create_state(state.params, huge)
    new, m = over(s2, b)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"])) and not bool(m["ok"])
