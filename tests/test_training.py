"""Sharded training steps equal the single-device step; mesh and rules behave."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmodels import cnn, optim, sharding, training
from jaxmodels.errors import ConfigError

# Float32 sums over 8 shards reorder additions, so results agree to ~1e-6, not bitwise;
# a real sharding error (a per-shard BatchNorm statistic, a missing gradient all-reduce)
# is off by orders of magnitude more than these tolerances.
RTOL, ATOL = 1e-5, 1e-6


def _small_resnet():
    """Two stages of basic blocks: every ResNet part (BN, projections), fast to compile."""
    return cnn.ResNet(
        stage_sizes=(1, 1),
        block_cls=cnn.ResNetBlock,
        num_classes=10,
        small_images=True,
        num_filters=8,
    )


def _run(mesh_kw, rules_name, steps=3, accumulate=1):
    mesh = sharding.make_mesh(**mesh_kw)
    rules = sharding.logical_rules(rules_name)
    model = _small_resnet()
    # SGD is linear in the gradient, so a sharding error shows at full size (Adam would
    # amplify float32 reordering noise in near-zero gradients to ~lr).
    tx = optim.make_optimizer(
        "sgd", 0.1, total_steps=10, weight_decay=1e-4, accumulate_steps=accumulate
    )
    state, shardings = training.create_train_state(
        model, tx, [jnp.zeros((1, 16, 16, 3))], jax.random.PRNGKey(0), mesh, rules
    )
    loss_fn, _ = training.classification_fns(model)
    step = training.compile_train_step(loss_fn, shardings, mesh, rules)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = {
            "image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 10, size=(16,)).astype(np.int32),
        }
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses, state


@pytest.fixture(scope="module")
def single_device():
    return _run({"devices": jax.devices()[:1], "data": 1}, "data")


@pytest.mark.parametrize(
    "mesh_kw,rules_name",
    [({"data": 8}, "data"), ({"data": 2, "fsdp": 4}, "fsdp"), ({"data": 1, "fsdp": 8}, "fsdp")],
    ids=["data8", "data2_fsdp4", "fsdp8"],
)
def test_sharded_step_equals_single_device(single_device, mesh_kw, rules_name):
    ref, ref_losses, _ = single_device
    got, got_losses, live = _run(mesh_kw, rules_name)
    np.testing.assert_allclose(got_losses, ref_losses, rtol=RTOL)
    for name in ("params", "model_state"):
        flat_ref = jax.tree_util.tree_leaves_with_path(getattr(ref, name))
        flat_got = jax.tree.leaves(getattr(got, name))
        for (path, a), b in zip(flat_ref, flat_got, strict=True):
            np.testing.assert_allclose(
                b, a, rtol=RTOL, atol=ATOL, err_msg=f"{name}{jax.tree_util.keystr(path)}"
            )
    # The batch statistics really are the global ones, not one shard's.
    assert "batch_stats" in got.model_state
    if rules_name == "fsdp":
        specs = [x.sharding.spec for x in jax.tree.leaves(live.params)]
        assert any("fsdp" in str(s) for s in specs), "FSDP sharded no parameter"


def test_batchnorm_statistics_are_global_over_the_sharded_batch():
    """Each device holds a batch slice with a different mean; the BN mean is the global one."""
    mesh = sharding.make_mesh(data=8)
    rules = sharding.logical_rules("data")
    model = _small_resnet()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    x = np.concatenate([np.full((2, 8, 8, 3), i, np.float32) for i in range(8)])
    xs = jax.device_put(x, sharding.batch_sharding(mesh, 4))

    def stats(v, batch):
        _, new = model.apply(v, batch, train=True, mutable=["batch_stats"])
        return new["batch_stats"]["bn_init"]["mean"]

    with training.mesh_context(mesh, rules):
        sharded = jax.jit(stats)(variables, xs)
    local = jax.jit(stats)(variables, x)
    np.testing.assert_allclose(sharded, local, rtol=1e-5, atol=1e-6)
    one_shard = jax.jit(stats)(variables, x[:2])
    assert not np.allclose(one_shard, local)


def test_accumulated_micro_batches_equal_one_batch_of_their_tokens():
    """A token-mean loss over padded sequences, with `loss_weight`: two accumulated halves
    of a batch (7 and 2 real tokens) update as the whole batch does in one step (was: each
    half weighed alike)."""

    def loss_fn(params, model_state, batch, rng):
        del rng
        err = (batch["x"] * params["w"] - batch["y"]) ** 2 * batch["mask"]
        count = jnp.sum(batch["mask"])
        return jnp.sum(err) / jnp.maximum(count, 1.0), (model_state, {"loss_weight": count})

    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(4, 4)), "y": rng.normal(size=(4, 4)), "mask": mask}
    batch = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
    halves = [jax.tree.map(lambda a, i=i: a[2 * i : 2 * i + 2], batch) for i in range(2)]

    def run(accumulate, batches):
        tx = optim.make_optimizer("sgd", 0.5, total_steps=10, accumulate_steps=accumulate)
        params = {"w": jnp.ones((4,))}
        state = training.TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            model_state={},
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(0),
            tx=tx,
        )
        for b in batches:
            state, metrics = training.train_step(state, b, loss_fn)
            assert "loss_weight" not in metrics
        return state.params["w"]

    one = run(1, [batch])
    np.testing.assert_allclose(run(2, halves), one, rtol=1e-6)
    assert not np.allclose(one, 1.0)


def test_gradient_accumulation_runs_sharded():
    _, losses, state = _run({"data": 8}, "data", steps=4, accumulate=2)
    assert int(state.step) == 4
    assert all(np.isfinite(losses))


def test_state_is_created_sharded_and_donated():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    rules = sharding.logical_rules("fsdp")
    model = cnn.SeedCNN()
    tx = optim.make_optimizer("adam", 1e-3, total_steps=10)
    state, shardings = training.create_train_state(
        model, tx, [jnp.zeros((1, 28, 28, 1))], jax.random.PRNGKey(0), mesh, rules
    )
    kernel = state.params["Dense_0"]["kernel"]  # [1600, 128]: embed x mlp
    assert kernel.sharding.spec == P("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (400, 128)
    # Adam's moments follow their parameters' layout.
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["Dense_0"]["kernel"]
    assert mu.sharding.spec == P("fsdp", None)
    loss_fn, _ = training.classification_fns(model)
    step = training.compile_train_step(loss_fn, shardings, mesh, rules)
    batch = {"image": np.zeros((8, 28, 28, 1), np.float32), "label": np.zeros(8, np.int32)}
    new_state, _ = step(state, batch)
    assert kernel.is_deleted(), "the old state should have been donated"
    assert new_state.params["Dense_0"]["kernel"].sharding.spec == P("fsdp", None)


def test_a_state_the_step_cannot_take_is_refused_by_name():
    """A state already given to a step was JAX's "Buffer has been deleted or donated" (one
    device), or a crash of the process (several): an easy slip when a notebook cell runs
    twice."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])  # several: the crash, on old code
    model = cnn.SeedCNN()
    tx = optim.make_optimizer("sgd", 0.1, total_steps=10)
    state, shardings = training.create_train_state(
        model, tx, [jnp.zeros((1, 28, 28, 1))], jax.random.PRNGKey(0), mesh, ()
    )
    loss_fn, _ = training.classification_fns(model)
    step = training.compile_train_step(loss_fn, shardings, mesh, ())
    batch = {"image": np.zeros((2, 28, 28, 1), np.float32), "label": np.zeros(2, np.int32)}
    new_state, _ = step(state, batch)
    with pytest.raises(ValueError, match="given to an earlier step.*pass the state the last"):
        step(state, batch)
    # Parameters kept to roll back to were given away with their state (were: a crash in
    # XLA, past the check of the state as a whole).
    kept = new_state.params
    new_state, _ = step(new_state, batch)
    with pytest.raises(ValueError, match="train state's parameters were given to an earlier"):
        step(new_state.replace(params=kept), batch)
    with pytest.raises(ValueError, match=r"Conv_0/bias \(8 of 8 leaves\) was given to an earl"):
        training.first_non_finite(kept)  # (was a segmentation fault)
    # A state of another, equal-looking optimizer object (was jit's "different pytree
    # metadata" error, listing both optimizers' function addresses).
    other = new_state.replace(tx=optim.make_optimizer("sgd", 0.1, total_steps=10))
    with pytest.raises(ValueError, match="another optimizer object than the step was compiled"):
        step(other, batch)
    with pytest.raises(ValueError, match="another optimizer object"):
        step.lower(other, batch)


def test_a_state_starts_from_given_parameters():
    """Fine-tuning from given weights (was: random ones only, to be replaced by hand in
    their sharded layout)."""
    mesh, rules = sharding.make_mesh(data=2, fsdp=4), sharding.logical_rules("fsdp")
    model = cnn.SeedCNN()
    tx = optim.make_optimizer("adam", 1e-3, total_steps=10)
    inputs = [jnp.zeros((1, 28, 28, 1))]
    pretrained = model.init(jax.random.key(7), *inputs)["params"]
    host = jax.tree.map(lambda x: np.asarray(x, np.float64), pretrained)  # NumPy, float64
    state, shardings = training.create_train_state(
        model, tx, inputs, jax.random.key(0), mesh, rules, params=host
    )
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(pretrained), strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    kernel = state.params["Dense_0"]["kernel"]
    assert kernel.sharding == shardings.params["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", None)
    loss_fn, _ = training.classification_fns(model)
    step = training.compile_train_step(loss_fn, shardings, mesh, rules)
    batch = {"image": np.zeros((8, 28, 28, 1), np.float32), "label": np.zeros(8, np.int32)}
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    # Device arrays laid out otherwise (one device; another mesh's layout) are placed too
    # (were jit's "Sharding passed to jit does not match").
    for placed in (
        jax.device_put(pretrained, jax.devices()[0]),
        jax.device_put(pretrained, NamedSharding(mesh, P())),
    ):
        other, _ = training.create_train_state(
            model, tx, inputs, jax.random.key(0), mesh, rules, params=placed
        )
        assert other.params["Dense_0"]["kernel"].sharding.spec == P("fsdp", None)
    # Another tree or shape is named.
    with pytest.raises(ValueError, match=r"pass variables\['params'\], not the variables"):
        training.create_train_state(
            model, tx, inputs, jax.random.key(0), mesh, rules, params={"params": pretrained}
        )
    wrong = jax.tree.map(lambda x: x, pretrained)
    wrong["Dense_1"] = {**wrong["Dense_1"], "bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"params Dense_1/bias has shape \(3,\)"):
        training.create_train_state(model, tx, inputs, jax.random.key(0), mesh, rules, params=wrong)


def test_a_batchnorm_state_starts_from_given_statistics_too():
    """A ResNet's running statistics come with its weights (`model_state`)."""
    mesh, rules = sharding.make_mesh(data=8), sharding.logical_rules("data")
    model, inputs = _small_resnet(), [jnp.zeros((1, 8, 8, 3))]
    tx = optim.make_optimizer("sgd", 0.1, total_steps=10)
    variables = model.init(jax.random.key(5), *inputs)
    stats = jax.tree.map(lambda x: x + 0.5, variables["batch_stats"])
    state, _ = training.create_train_state(
        model,
        tx,
        inputs,
        jax.random.key(0),
        mesh,
        rules,
        params=variables["params"],
        model_state={"batch_stats": stats},
    )
    for got, want in zip(jax.tree.leaves(state.model_state), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    alone, _ = training.create_train_state(
        model, tx, inputs, jax.random.key(0), mesh, rules, params=variables["params"]
    )  # without model_state: the statistics as initialised (means 0, variances 1)
    initial = jax.tree.leaves(variables["batch_stats"])
    for got, want in zip(jax.tree.leaves(alone.model_state), initial, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match=r"pass the collections but 'params'"):
        training.create_train_state(
            model, tx, inputs, jax.random.key(0), mesh, rules,
            params=variables["params"], model_state=variables,
        )  # fmt: skip
    with pytest.raises(ValueError, match="model_state is given with params"):
        training.create_train_state(
            model, tx, inputs, jax.random.key(0), mesh, rules, model_state={"batch_stats": stats}
        )


@pytest.mark.parametrize("key", [jax.random.PRNGKey, jax.random.key], ids=["raw", "typed"])
def test_abstract_state_matches_the_created_state(key, tmp_path):
    """Its rng leaf was always a typed key, so with the raw keys the application uses it
    described another state and could not be a restore target; a state with a typed key
    could not be restored at all (its stored shape is the key data's)."""
    from jaxmodels.checkpoint import Checkpointer

    mesh, rules = sharding.make_mesh(data=2, fsdp=4), sharding.logical_rules("fsdp")
    model, tx = cnn.SeedCNN(), optim.make_optimizer("adam", 1e-3, total_steps=10)
    inputs = [jnp.zeros((1, 28, 28, 1))]
    state, _ = training.create_train_state(model, tx, inputs, key(0), mesh, rules)
    abstract, _ = training.abstract_train_state(model, tx, inputs, mesh, rules, rng=key(1))
    leaves = jax.tree.leaves(abstract)
    assert [(a.shape, a.dtype, a.sharding) for a in leaves] == [
        (x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(state)
    ]
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state)
    restored, _ = ckpt.restore(abstract)
    ckpt.close()

    def data(x):
        return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(data(a), data(b))


def test_fsdp_tp_rules_shard_over_tensor_axis():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.logical_rules("fsdp_tp")
    model = cnn.SeedCNN()
    tx = optim.make_optimizer("sgd", 1e-3, total_steps=10)
    state, _ = training.create_train_state(
        model, tx, [jnp.zeros((1, 28, 28, 1))], jax.random.PRNGKey(0), mesh, rules
    )
    assert state.params["Dense_0"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # 10 classes do not divide over 2 fsdp devices? they do; over tensor they are not named.
    assert state.params["Dense_1"]["kernel"].sharding.spec == P("tensor", None)


@pytest.mark.parametrize(
    ("mesh_kw", "parts"),
    [
        ({"data": 2, "fsdp": 4}, [(0, 2), (1, 2)]),  # one part per process
        ({"data": 1, "fsdp": 8}, [(0, 2), (1, 2)]),
        ({"data": 2, "fsdp": 2, "tensor": 2}, [(0, 2), (1, 2)]),
        ({"data": 1, "fsdp": 1, "tensor": 8}, [(0, 1), (0, 1)]),  # was: a different half each
        ({"data": 1, "fsdp": 2, "tensor": 4}, [(0, 2), (1, 2)]),
    ],
)
def test_each_process_feeds_the_rows_its_devices_hold(mesh_kw, parts):
    """The 8 devices as 2 simulated processes of 4: each process's part of the batch, the
    same part where processes hold the same rows (tensor parallelism across them)."""
    mesh = sharding.make_mesh(**mesh_kw)
    ways = sharding.batch_parallelism(mesh)
    index_map = sharding.batch_sharding(mesh).devices_indices_map((ways,))
    got = [sharding._batch_part(index_map, p, lambda d: d.id // 4) for p in (0, 1)]
    assert got == parts
    assert sharding.process_batch_part(mesh) == (0, 1)  # one real process: the whole batch


def test_processes_interleaved_along_the_batch_are_refused():
    mesh = sharding.make_mesh(data=8)
    index_map = sharding.batch_sharding(mesh).devices_indices_map((8,))
    assert sharding._batch_part(index_map, 0, lambda d: d.id % 2) is None  # rows 0, 2, 4, 6


def test_indivisible_dimension_stays_replicated():
    mesh = sharding.make_mesh(data=1, fsdp=8)
    spec = sharding._fit_spec(P("fsdp", None), (10, 4), mesh)
    assert spec == P(None, None)
    assert sharding._fit_spec(P("fsdp", None), (16, 4), mesh) == P("fsdp", None)


def test_mesh_errors_name_the_problem():
    with pytest.raises(ConfigError, match="multiply to 6, but there are 8 devices"):
        sharding.make_mesh(data=3, fsdp=2)
    with pytest.raises(ConfigError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match="do not divide"):
        sharding.make_mesh(data=-1, fsdp=3)
    with pytest.raises(
        ConfigError, match=r"unknown sharding rules .* \(config key sharding_rules\)"
    ):
        sharding.logical_rules("zero3")
    assert dict(sharding.make_mesh(data=-1, fsdp=2).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    # Was: a tensor axis no rule names, every example computed on its devices alike.
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    for name in ("data", "fsdp"):
        with pytest.raises(
            ConfigError,
            match=rf"mesh.tensor=2 with sharding_rules='{name}', which use no 'tensor' axis: "
            r"each example would be computed on 2 devices alike; use sharding_rules 'fsdp_tp'",
        ):
            sharding.check_rules_use_mesh(mesh, name)
    sharding.check_rules_use_mesh(mesh, "fsdp_tp")
    sharding.check_rules_use_mesh(sharding.make_mesh(data=2, fsdp=4), "data")


def test_first_non_finite_names_the_leaf():
    tree = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.nan])}}
    assert training.first_non_finite(tree) == "b/c"
    assert training.first_non_finite({"a": jnp.ones(3)}) is None


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_step_rng_other_generators_drive_dropout_deterministically(impl):
    import flax.linen as nn

    class Dropper(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dense(64)(x)
            return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(x))

    model = Dropper()
    mesh = sharding.make_mesh(devices=jax.devices()[:1], data=1)
    rules = sharding.logical_rules("data")
    tx = optim.make_optimizer("sgd", 0.1, total_steps=10)
    loss_fn, _ = training.classification_fns(model, inputs=lambda b: (b["x"],))
    batch = {"x": np.ones((8, 4), np.float32), "label": np.zeros((8,), np.int32)}

    def run(rng_impl):
        state, shardings = training.create_train_state(
            model, tx, [jnp.zeros((1, 4))], jax.random.PRNGKey(0), mesh, rules
        )
        step = training.compile_train_step(loss_fn, shardings, mesh, rules, rng_impl)
        _, metrics = step(state, batch)
        return float(metrics["loss"])

    key = training.step_key(jax.random.PRNGKey(0), jnp.int32(3), impl)
    assert jax.random.key_impl(key) is not None
    np.testing.assert_array_equal(
        jax.random.bits(key, (4,)),
        jax.random.bits(training.step_key(jax.random.PRNGKey(0), jnp.int32(3), impl), (4,)),
    )
    a, b, threefry = run(impl), run(impl), run("threefry")
    assert a == b, "same seed and step, same dropout masks"
    assert a != threefry, "another generator draws other masks"
    with pytest.raises(ValueError, match="unknown step rng"):
        training.compile_train_step(loss_fn, None, mesh, rules, "mersenne")


def test_the_readme_library_example_runs():
    """The README's "Using the library" block, run as written (it had used a batch it never
    defined)."""
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Using the library") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert np.isfinite(float(scope["metrics"]["loss"]))
    assert float(scope["sums"]["count"]) == 64


def test_a_batch_that_does_not_split_over_the_mesh_is_named():
    """Was JAX's "IndivisibleError ... should evenly divide the shape", with no word of the
    batch size."""
    mesh = sharding.make_mesh(data=2, fsdp=4)
    model = cnn.SeedCNN()
    tx = optim.make_optimizer("sgd", 0.1, total_steps=10)
    state, shardings = training.create_train_state(
        model, tx, [jnp.zeros((1, 28, 28, 1))], jax.random.PRNGKey(0), mesh, ()
    )
    loss_fn, eval_fn = training.classification_fns(model)
    batch = {"image": np.zeros((12, 28, 28, 1), np.float32), "label": np.zeros(12, np.int32)}
    message = (
        r"a batch of 12 examples \(batch\['image'\]'s leading axis\) does not split over "
        "the mesh's 8 data-parallel devices"
    )
    # The rules are not optional (were: () by default, under which the models' activation
    # constraints did nothing, and BERT's gradients under fsdp_tp came out wrong).
    with pytest.raises(TypeError, match="rules"):
        training.compile_train_step(loss_fn, shardings, mesh)
    with pytest.raises(TypeError, match="rules"):
        training.compile_eval_step(eval_fn, shardings, mesh)
    for step in (
        training.compile_train_step(loss_fn, shardings, mesh, ()),
        training.compile_eval_step(eval_fn, shardings, mesh, ()),
    ):
        with pytest.raises(ValueError, match=message):
            step(state, batch)
        with pytest.raises(ValueError, match=message):
            step.lower(state, batch)
    # An array of another size is named (was "a batch of 3 examples" for a batch of 16).
    batch = {"image": np.zeros((16, 28, 28, 1), np.float32), "label": np.zeros(16, np.int32)}
    train_step = training.compile_train_step(loss_fn, shardings, mesh, ())
    with pytest.raises(ValueError, match=r"a batch of 3 examples \(batch\['extra'\]'s"):
        train_step(state, {**batch, "extra": np.zeros(3, np.float32)})
    # A scalar cannot be split (was JAX's "incompatible with its sharding annotation").
    with pytest.raises(ValueError, match=r"batch\['epoch'\] is a scalar: every array of a"):
        train_step(state, {**batch, "epoch": 2})
    # A nested one as Python indexes it (was batch['extra/ids']).
    with pytest.raises(ValueError, match=r"a batch of 3 examples \(batch\['extra'\]\['ids'\]'s"):
        train_step(state, {**batch, "extra": {"ids": np.zeros(3, np.int32)}})
    # A batch without labels names the key it needs (was KeyError: 'label').
    labels = batch.pop("label")
    with pytest.raises(KeyError, match=r"the batch has keys \['image', 'labels'\];.*'label'"):
        train_step(state, {**batch, "labels": labels})


def test_leaves_are_named_alike_in_every_message():
    """One spelling of a leaf's path (`a/b/c`) for checkpoints, given weights and the NaN
    guard, whatever the tree's node types."""
    from jaxmodels.errors import leaves_by_name

    plain = {"params": {"Dense_0": {"kernel": 1}}, "rng": [2, 3]}
    frozen = flax.core.freeze({"params": {"Dense_0": {"kernel": 1}}, "rng": (2, 3)})
    names = ["params/Dense_0/kernel", "rng/0", "rng/1"]
    assert list(leaves_by_name(plain)) == list(leaves_by_name(frozen)) == names
    state = training.TrainState(
        step=0, params={"w": 1}, model_state={}, opt_state=(), rng=2, tx=None
    )
    assert list(leaves_by_name(state)) == ["step", "params/w", "rng"]


def test_example_inputs_are_a_list():
    """An array was iterated over its rows: errors about a channel axis, or a second
    `train` argument."""
    mesh, rules = sharding.make_mesh(data=8), sharding.logical_rules("data")
    tx = optim.make_optimizer("sgd", 0.1, total_steps=10)
    with pytest.raises(
        TypeError, match=r"example_inputs is the list .* \(got ArrayImpl\): pass \[x\]"
    ):
        training.create_train_state(
            cnn.SeedCNN(), tx, jnp.zeros((2, 28, 28, 1)), jax.random.key(0), mesh, rules
        )


class _Features(flax.linen.Module):
    """A model whose one input is a dict of features, and whose second is a pair of arrays
    of different widths."""

    @flax.linen.compact
    def __call__(self, features, pair, train=False):
        dense = flax.linen.Dense
        x = dense(4)(features["a"]) + dense(4)(features["b"]) + dense(4)(pair[0] * pair[1][:, :1])
        return dense(4, kernel_init=flax.linen.with_partitioning(_init, (None, "fsdp")))(x)


_init = flax.linen.initializers.lecun_normal()


def _features_batch(n):
    rng = np.random.default_rng(0)
    return {
        "features": {"a": rng.normal(size=(n, 5)), "b": rng.normal(size=(n, 2))},
        "pair": (rng.normal(size=(n, 3)), rng.normal(size=(n, 7))),
        "label": rng.integers(0, 3, n),
    }


def test_pytree_inputs_plain_optax_and_mesh_axis_annotations():
    """A model input that is a dict or a tuple of arrays failed in create_train_state
    (NumPy's "entry not a 2- or 3- tuple"); a plain optax optimizer failed at the first
    step ("no injected learning_rate"); a kernel given mesh axes by Flax's
    `nn.with_partitioning` was replicated (its names read as logical ones)."""
    mesh, rules = sharding.make_mesh(data=4, fsdp=2), sharding.logical_rules("fsdp")
    example = {k: jax.tree.map(lambda x: x[:1], v) for k, v in _features_batch(1).items()}
    inputs = [example["features"], example["pair"]]
    batch = _features_batch(8)
    losses = {}
    for name, tx in (
        ("adam", optim.make_optimizer("adam", 1e-2, total_steps=10)),
        ("plain", optax.adam(1e-2)),
    ):
        model = _Features()
        state, shardings = training.create_train_state(
            model, tx, inputs, jax.random.key(0), mesh, rules
        )
        assert state.params["Dense_3"]["kernel"].sharding.spec == P(None, "fsdp")
        loss_fn, _ = training.classification_fns(model, inputs=lambda b: (b["features"], b["pair"]))
        step = training.compile_train_step(loss_fn, shardings, mesh, rules)
        losses[name] = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses[name].append(float(metrics["loss"]))
        assert ("learning_rate" in metrics) == (name == "adam")
    np.testing.assert_allclose(losses["plain"], losses["adam"], rtol=1e-6)
    # A list stays one array (of nested rows), as before.

    class Flat(flax.linen.Module):
        @flax.linen.compact
        def __call__(self, x, train=False):
            return flax.linen.Dense(2)(x.reshape(x.shape[0], -1))

    state, _ = training.create_train_state(
        Flat(), optax.sgd(0.1), [[[1.0, 2.0, 3.0]]], jax.random.key(0), mesh, rules
    )
    assert state.params["Dense_0"]["kernel"].shape == (3, 2)
    assert losses["adam"][-1] < losses["adam"][0]


def test_a_mesh_axis_annotation_this_mesh_lacks_is_named():
    class Model(flax.linen.Module):
        @flax.linen.compact
        def __call__(self, x, train=False):
            init = flax.linen.with_partitioning(_init, (None, "model"))
            return flax.linen.Dense(4, kernel_init=init)(x)

    mesh, rules = sharding.make_mesh(data=8), sharding.logical_rules("data")
    tx = optim.make_optimizer("sgd", 0.1, total_steps=10)
    x = jnp.zeros((1, 3))
    with pytest.raises(ValueError, match="'model'.* not found in mesh"):  # Flax's own check
        training.create_train_state(Model(), tx, [x], jax.random.key(0), mesh, rules)
    abstract = jax.eval_shape(Model().init, jax.random.key(0), x)  # outside a mesh
    with pytest.raises(ValueError, match=r"\['params'\]\['Dense_0'\]\['kernel'\] is split over "):
        sharding.state_shardings(abstract, mesh, rules)
