"""Tests for jaxmodels.optim: every optimizer trains, schedules, logged learning rate,
gradient accumulation, weight-decay masking and gradient clipping."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels import optim
from jaxmodels.errors import ConfigError


def _least_squares():
    """A small, well-conditioned linear least-squares problem over one kernel."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    y = x @ jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    # Non-zero initial kernel: LAMB and LARS scale steps by the parameter norm.
    params = {"kernel": jnp.asarray(0.3 * rng.normal(size=(4, 3)), jnp.float32)}

    def loss(p):
        return jnp.mean((x @ p["kernel"] - y) ** 2)

    return params, loss


# A typical learning rate for each optimizer on this problem (LARS's trust ratio has a
# coefficient of 1e-3, so its nominal rate is much larger).
_LEARNING_RATES = {
    "adam": 0.1,
    "adamw": 0.1,
    "rmsprop": 0.1,  # no momentum (its usual default)
    "sgd": 0.1,
    "lamb": 0.3,
    "lars": 30.0,
}


def _lr_used(tx, state, params):
    """Applies one sgd update with a gradient of ones; returns (lr it used, new state)."""
    ones = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(ones, state, params)
    return -float(updates["w"][0]), state


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_lowers_least_squares_loss(name):
    assert set(_LEARNING_RATES) == set(optim.OPTIMIZERS)
    params, loss = _least_squares()
    tx = optim.make_optimizer(
        name,
        _LEARNING_RATES[name],
        total_steps=20,
        warmup_steps=2,
        schedule="cosine",
        weight_decay=1e-4,
        grad_clip_norm=10.0,
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    initial = float(loss(params))
    for _ in range(20):
        params, state, _ = step(params, state)
    final = float(loss(params))
    assert np.isfinite(final)
    assert final < initial / 2, (name, initial, final)


def test_unknown_optimizer_raises_config_error_naming_it():
    with pytest.raises(ConfigError, match="adamax_typo"):
        optim.make_optimizer("adamax_typo", 1e-3, total_steps=10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.0},
        {"accumulate_steps": 0},
        # Were accepted: a negative clip norm reversed the update, a negative decay or
        # momentum pushed the weights away.
        {"grad_clip_norm": -1.0},
        {"weight_decay": -0.01},
        {"momentum": -0.9},
    ],
)
def test_bad_optimizer_arguments_raise(kwargs):
    args = {"learning_rate": 1e-3, **kwargs}
    lr = args.pop("learning_rate")
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=name):
        optim.make_optimizer("sgd", lr, total_steps=10, **args)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("lamb", {"mu_dtype": jnp.bfloat16}, "mu_dtype .* applies to adam, adamw and sgd"),
        ("rmsprop", {"mu_dtype": jnp.bfloat16}, "drop mu_dtype"),
        ("lars", {"mu_dtype": jnp.bfloat16}, "drop mu_dtype"),
        ("sgd", {"momentum": 0.0, "nesterov": True}, "nesterov needs momentum > 0"),
    ],
)
def test_options_an_optimizer_would_ignore_raise(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        optim.make_optimizer(name, 1e-3, total_steps=10, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        # Were accepted: eps -1 trained to below chance, b1 1 gave NaN, and a negative
        # end_factor a negative learning rate (the loss ascended).
        ("adam", {"eps": -1.0}, r"eps must be > 0, got -1.0"),
        ("rmsprop", {"eps": 0.0}, r"eps must be > 0, got 0.0"),
        ("adamw", {"b1": 1.0}, r"b1 must be in \[0, 1\), got 1.0"),
        ("lamb", {"b2": 1.5}, r"b2 must be in \[0, 1\), got 1.5"),
        ("sgd", {"momentum": 1.5}, r"momentum must be in \[0, 1\), got 1.5"),
        ("adam", {"schedule": "linear", "end_factor": -1.0}, r"end_factor must be >= 0"),
        ("adam", {"eps": float("nan")}, r"eps must be > 0, got nan"),
    ],
)
def test_values_that_break_training_quietly_raise(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        optim.make_optimizer(name, 1e-3, total_steps=10, **kwargs)


@pytest.mark.parametrize("name", ["adam", "adamw", "lamb"])
def test_momentum_given_to_an_optimizer_without_it_is_ignored_with_a_warning(name):
    """Was ignored without a word."""
    params = {"w": jnp.ones((2, 2))}
    plain = optim.make_optimizer(name, 1e-3, total_steps=10)
    with pytest.warns(UserWarning, match=rf"momentum=0.9, nesterov=True has no effect on {name}"):
        given = optim.make_optimizer(name, 1e-3, total_steps=10, momentum=0.9, nesterov=True)
    # Even one its range check would refuse: it is not used.
    with pytest.warns(UserWarning, match=rf"momentum=1.5 has no effect on {name}.*b1, here 0.9"):
        optim.make_optimizer(name, 1e-3, total_steps=10, momentum=1.5)
    assert jax.tree.structure(given.init(params)) == jax.tree.structure(plain.init(params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim.make_optimizer(name, 1e-3, total_steps=10, momentum=0.0)  # none, as it is
        for other in optim.MOMENTUM_OPTIMIZERS:
            optim.make_optimizer(other, 1e-3, total_steps=10, momentum=0.9, nesterov=True)


def test_rmsprop_takes_nesterov_and_sgd_its_accumulator_dtype():
    params, loss = _least_squares()
    grads = jax.grad(loss)(params)

    def after_two(**kwargs):
        tx = optim.make_optimizer("rmsprop", 0.01, total_steps=10, **kwargs)
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
        return updates["kernel"]

    nesterov = after_two(momentum=0.9, nesterov=True)
    assert not np.allclose(nesterov, after_two(momentum=0.9))
    reference = optax.rmsprop(0.01, momentum=0.9, nesterov=True)
    state = reference.init(params)
    for _ in range(2):
        expected, state = reference.update(grads, state, params)
    np.testing.assert_allclose(nesterov, expected["kernel"], rtol=1e-6)
    tx = optim.make_optimizer("sgd", 0.1, total_steps=10, mu_dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(tx.init(params)) if a.ndim == 2} == {
        jnp.dtype(jnp.bfloat16)
    }


def test_unknown_schedule_raises_config_error_naming_it():
    with pytest.raises(ConfigError, match="cosinus"):
        optim.make_schedule(1.0, 100, schedule="cosinus")
    with pytest.raises(ConfigError, match="cosinus"):
        optim.make_optimizer("adam", 1e-3, total_steps=100, schedule="cosinus")


@pytest.mark.parametrize("warmup", [-1, 101])
def test_bad_warmup_raises(warmup):
    with pytest.raises(ConfigError, match="warmup_steps"):
        optim.make_schedule(1.0, 100, warmup_steps=warmup, schedule="cosine")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_then_decay_schedule(schedule):
    peak, total, warmup, end = 0.4, 100, 10, 0.1
    s = optim.make_schedule(peak, total, warmup, schedule, end_factor=end)
    np.testing.assert_allclose(float(s(0)), 0.0, atol=1e-7)
    np.testing.assert_allclose(float(s(warmup // 2)), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(float(s(warmup)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(s(total)), end * peak, rtol=1e-5)
    np.testing.assert_allclose(float(s(total + 50)), end * peak, rtol=1e-5)
    # Half-way through the decay both are at the mean of peak and end value; in the first
    # half cosine stays above the straight line, linear is on it.
    mid = float(s((warmup + total) // 2))
    np.testing.assert_allclose(mid, (peak + end * peak) / 2, rtol=1e-5)
    quarter = warmup + (total - warmup) // 4
    line = peak - (peak - end * peak) * (quarter - warmup) / (total - warmup)
    if schedule == "linear":
        np.testing.assert_allclose(float(s(quarter)), line, rtol=1e-5)
    else:
        assert float(s(quarter)) > line * 1.05


def test_schedule_without_warmup_starts_at_peak():
    s = optim.make_schedule(0.3, 50, 0, "cosine", end_factor=0.0)
    np.testing.assert_allclose(float(s(0)), 0.3, rtol=1e-6)
    np.testing.assert_allclose(float(s(50)), 0.0, atol=1e-7)


def test_constant_schedule():
    s = optim.make_schedule(0.25, 100, 0, "constant")
    for step in (0, 1, 50, 100, 1000):
        np.testing.assert_allclose(float(s(step)), 0.25, rtol=1e-7)
    s = optim.make_schedule(0.25, 100, 4, "constant")
    np.testing.assert_allclose(float(s(0)), 0.0, atol=1e-7)
    np.testing.assert_allclose(float(s(2)), 0.125, rtol=1e-6)
    for step in (4, 50, 1000):
        np.testing.assert_allclose(float(s(step)), 0.25, rtol=1e-7)


@pytest.mark.parametrize(
    "wrap",
    [{}, {"grad_clip_norm": 100.0}, {"grad_clip_norm": 100.0, "accumulate_steps": 2}],
    ids=["plain", "clipped", "clipped+accumulated"],
)
def test_current_learning_rate_is_the_one_the_next_update_uses(wrap):
    """Before every update, `current_learning_rate` equals the schedule at that update's
    index and the learning rate the update then applies (sgd without momentum, g = 1)."""
    kw = {"total_steps": 8, "warmup_steps": 3, "schedule": "linear", "end_factor": 0.25}
    sched = optim.make_schedule(1.0, **kw)
    tx = optim.make_optimizer("sgd", 1.0, momentum=0.0, **kw, **wrap)
    params = {"w": jnp.zeros((3,))}
    state = tx.init(params)
    micro = wrap.get("accumulate_steps", 1)
    logged, used = [], []
    for _ in range(6):
        logged.append(float(optim.current_learning_rate(state)))
        for _ in range(micro - 1):
            lr, state = _lr_used(tx, state, params)
            assert lr == 0.0  # no update until the last micro-step
        lr, state = _lr_used(tx, state, params)
        used.append(lr)
    expected = [float(sched(k)) for k in range(6)]
    np.testing.assert_allclose(used, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(logged, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wrap", [{}, {"grad_clip_norm": 1.0, "accumulate_steps": 2}])
def test_with_schedule_sets_the_stored_rate_from_the_update_count(wrap):
    """A resumed run with another schedule stores (and logs) the new schedule's rate; the
    rest of the state, and its layout, are unchanged."""
    old = optim.make_optimizer("adamw", 1.0, total_steps=10, schedule="linear", **wrap)
    params = {"w": jnp.ones((3,))}
    state = old.init(params)
    for _ in range(3 * wrap.get("accumulate_steps", 1)):
        _, state = old.update({"w": jnp.ones((3,))}, state, params)
    new = optim.make_schedule(0.5, total_steps=20, schedule="cosine")
    refreshed = optim.with_schedule(state, new)
    np.testing.assert_allclose(float(optim.current_learning_rate(refreshed)), float(new(3)))
    assert float(optim.current_learning_rate(state)) == pytest.approx(0.7)
    assert jax.tree.structure(refreshed) == jax.tree.structure(state)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), refreshed, state)
    assert sum(jax.tree.leaves(changed)) == 1


def test_current_learning_rate_at_init_and_missing():
    tx = optim.make_optimizer("adamw", 1e-3, total_steps=100, schedule="constant")
    state = tx.init({"w": jnp.ones((2, 2))})
    np.testing.assert_allclose(float(optim.current_learning_rate(state)), 1e-3, rtol=1e-6)
    plain = optax.sgd(0.1).init({"w": jnp.ones((2,))})
    with pytest.raises(ValueError, match="learning_rate"):
        optim.current_learning_rate(plain)


def test_gradient_accumulation_equals_one_step_with_mean_gradient():
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.25, -0.75])}
    g1 = {"w": jnp.array([[0.3, -1.0], [2.0, 0.1]]), "b": jnp.array([1.0, -0.5])}
    g2 = {"w": jnp.array([[-0.7, 0.4], [1.0, 0.9]]), "b": jnp.array([0.2, 0.6])}
    kw = {"total_steps": 10, "momentum": 0.0}

    acc = optim.make_optimizer("sgd", 0.5, accumulate_steps=2, **kw)
    state = acc.init(params)
    updates, state = acc.update(g1, state, params)
    after_first = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, after_first, params)
    updates, state = acc.update(g2, state, after_first)
    accumulated = optax.apply_updates(after_first, updates)

    one = optim.make_optimizer("sgd", 0.5, **kw)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    updates, _ = one.update(mean, one.init(params), params)
    single = optax.apply_updates(params, updates)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), accumulated, single)
    assert not np.allclose(accumulated["w"], params["w"])


def test_accumulation_weighs_micro_batches_by_their_loss_weight():
    """Was the plain mean (`optax.MultiSteps`): a micro-batch of 1 token weighed as much as
    one of 3. Adam with clipping, so the weighted mean must be exact before both."""
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    g1, g2 = {"w": jnp.array([0.3, -1.0, 2.0])}, {"w": jnp.array([-0.7, 0.4, 1.0])}
    kw = {"total_steps": 10, "grad_clip_norm": 0.5}
    acc = optim.make_optimizer("adam", 0.1, accumulate_steps=2, **kw)
    state = acc.init(params)
    first, state = acc.update(g1, state, params, loss_weight=3.0)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), first)
    updates, state = acc.update(g2, state, params, loss_weight=1.0)

    one = optim.make_optimizer("adam", 0.1, **kw)
    weighted = jax.tree.map(lambda a, b: (3 * a + b) / 4, g1, g2)
    expected, _ = one.update(weighted, one.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    equal, _ = one.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), one.init(params))
    assert not np.allclose(updates["w"], equal["w"], rtol=1e-3)
    # The accumulator starts again from nothing.
    assert int(state.mini_step) == 0 and float(state.weight) == 0.0
    np.testing.assert_array_equal(state.grads["w"], 0.0)
    # No weight at all (micro-batches without a token): a zero gradient, not NaN.
    state = acc.init(params)
    for _ in range(2):
        updates, state = acc.update(g1, state, params, loss_weight=0.0)
    assert np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize("name", ["adam", "sgd", "lamb"])
def test_accumulation_with_bfloat16_parameters(name):
    """Was a `lax.cond` TypeError: the steps between updates returned bfloat16 zeros where
    the update (the float32 learning rate times it) is float32."""
    params = {"w": jnp.ones((4,), jnp.bfloat16), "b": jnp.ones((2,), jnp.float32)}
    grads = {"w": jnp.full((4,), 0.5, jnp.bfloat16), "b": jnp.full((2,), 0.5, jnp.float32)}
    acc = optim.make_optimizer(name, 0.1, total_steps=10, accumulate_steps=2)
    state = acc.init(params)
    first, state = jax.jit(acc.update)(grads, state, params)
    second, state = jax.jit(acc.update)(grads, state, params)
    one = optim.make_optimizer(name, 0.1, total_steps=10)
    expected, _ = one.update(grads, one.init(params), params)
    for k in params:
        assert first[k].dtype == second[k].dtype == expected[k].dtype
        np.testing.assert_array_equal(first[k], 0)
        np.testing.assert_allclose(second[k], expected[k], rtol=1e-2)


def test_a_multisteps_state_continues_as_the_accumulation_state():
    """Checkpoints of earlier versions hold `optax.MultiSteps`' state (a running mean):
    converted mid-accumulation, the update is the one accumulation throughout gives."""
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    g1, g2 = {"w": jnp.array([0.3, -1.0, 2.0])}, {"w": jnp.array([-0.7, 0.4, 1.0])}
    inner = optim.make_optimizer("adam", 0.1, total_steps=10)
    legacy = optax.MultiSteps(inner, every_k_schedule=3)
    _, old = legacy.update(g1, legacy.init(params), params)
    _, old = legacy.update(g2, old, params)
    acc = optim.make_optimizer("adam", 0.1, total_steps=10, accumulate_steps=3)
    new = acc.init(params)
    layout = jax.tree.structure(optim.as_multisteps(new))
    assert jax.tree.structure(old) == layout
    _, new = acc.update(g1, new, params)
    _, new = acc.update(g2, new, params)
    converted = optim.from_multisteps(old)
    assert jax.tree.structure(converted) == jax.tree.structure(new)
    expected, _ = acc.update(g1, new, params)
    updates, _ = acc.update(g1, converted, params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "rmsprop", "lamb", "lars"])
def test_weight_decay_shrinks_kernels_but_not_biases(name):
    params = {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = optim.make_optimizer(name, 0.01, total_steps=10, weight_decay=0.1)
    state = tx.init(params)
    p = params
    for _ in range(3):
        updates, state = tx.update(zeros, state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(p["bias"], params["bias"])
    assert np.all(np.abs(np.asarray(p["kernel"])) < 2.0)
    assert np.all(np.asarray(p["kernel"]) > 0.0)


@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd"])
def test_weight_decay_spares_biases_and_scales_of_any_rank(name):
    # An attention projection's bias is [heads, head_dim]; scanned layers stack every bias
    # and norm scale on a leading layer axis.
    params = {
        "query": {"kernel": jnp.full((4, 2, 2), 2.0), "bias": jnp.full((2, 2), 2.0)},
        "layers": {
            "norm": {"scale": jnp.full((3, 4), 2.0), "bias": jnp.full((3, 4), 2.0)},
            "lstm": {
                "backward_bias": jnp.full((3, 8), 2.0),
                "input_kernel": jnp.full((3, 4, 8), 2.0),
            },
        },
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = optim.make_optimizer(name, 0.01, total_steps=10, weight_decay=0.1)
    updates, _ = tx.update(zeros, tx.init(params), params)
    decayed = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    assert decayed == {
        "query": {"kernel": True, "bias": False},
        "layers": {
            "norm": {"scale": False, "bias": False},
            "lstm": {"backward_bias": False, "input_kernel": True},
        },
    }


def test_no_weight_decay_leaves_params_unchanged_with_zero_gradient():
    params = {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = optim.make_optimizer("adamw", 0.01, total_steps=10, weight_decay=0.0)
    updates, _ = tx.update(zeros, tx.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, optax.apply_updates(params, updates), params)


def test_grad_clip_norm_bounds_the_update():
    params = {"a": jnp.zeros((2,)), "b": jnp.zeros((2, 2))}
    grads = {"a": jnp.array([6.0, 0.0]), "b": jnp.array([[0.0, 8.0], [0.0, 0.0]])}
    assert float(optax.global_norm(grads)) == pytest.approx(10.0)
    tx = optim.make_optimizer("sgd", 1.0, total_steps=10, momentum=0.0, grad_clip_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-6)
    # Same direction, scaled down.
    np.testing.assert_allclose(updates["a"], -grads["a"] / 10, rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -grads["b"] / 10, rtol=1e-6)
    # A small gradient passes unchanged.
    small = jax.tree.map(lambda g: g / 100, grads)
    updates, _ = tx.update(small, tx.init(params), params)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), updates, small)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        # Was RMSprop with momentum 0.9 (the shared default), which no other library's is.
        ("rmsprop", optax.rmsprop(0.01)),
        # Was eps 1e-8 (Adam's): LAMB's paper and optax use 1e-6.
        ("lamb", optax.lamb(0.01)),
        ("sgd", optax.sgd(0.01, momentum=0.9)),
        ("adam", optax.adam(0.01)),
    ],
)
def test_defaults_are_each_optimizer_s_usual(name, reference):
    params, loss = _least_squares()
    params = {"kernel": params["kernel"] * 1e-3}  # small: LAMB's eps then shows
    tx = optim.make_optimizer(name, 0.01, total_steps=10)
    ours, theirs = tx.init(params), reference.init(params)
    for _ in range(3):
        grads = jax.tree.map(lambda g: g * 1e-4, jax.grad(loss)(params))
        mine, ours = tx.update(grads, ours, params)
        expected, theirs = reference.update(grads, theirs, params)
        np.testing.assert_allclose(mine["kernel"], expected["kernel"], rtol=1e-5, atol=1e-12)
        params = optax.apply_updates(params, expected)
