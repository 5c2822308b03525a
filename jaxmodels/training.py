"""The pure building blocks of training: state, sharded init, train and eval steps.

The train step is a pure function `(state, batch) -> (state, metrics)`, compiled once
with `jax.jit(in_shardings, out_shardings, donate_argnums=0)`. The state is created
already sharded: `jax.eval_shape` of the init gives shapes and logical axis names, the
rules give mesh shardings, and the init is jitted with those `out_shardings`, so no
device ever holds a full copy of a sharded parameter.

Example (single device works the same as a pod):
  >>> import jax, jax.numpy as jnp
  >>> from jaxmodels import cnn, optim, sharding, training
  >>> mesh = sharding.make_mesh(data=-1)
  >>> model = cnn.SeedCNN()
  >>> tx = optim.make_optimizer("adam", 1e-3, total_steps=10)
  >>> state, shardings = training.create_train_state(
  ...     model, tx, [jnp.zeros((8, 28, 28, 1))], jax.random.PRNGKey(0),
  ...     mesh, sharding.logical_rules("data"))
  >>> loss_fn, eval_fn = training.classification_fns(model)
  >>> step = training.compile_train_step(loss_fn, shardings, mesh, sharding.logical_rules("data"))
  >>> batch = {"image": jnp.zeros((8, 28, 28, 1)), "label": jnp.zeros((8,), jnp.int32)}
  >>> state, metrics = step(state, batch)
  >>> int(state.step)
  1
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmodels import losses, optim, sharding
from jaxmodels.errors import leaves_by_name

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# loss_fn(params, model_state, batch, rng) -> (loss, (new_model_state, metrics)). Where the
# loss is a mean over a count that varies between batches (tokens), metrics may hold it as
# "loss_weight" (not logged): accumulated micro-batches are then weighted by it, as if they
# were one batch (`optim.accumulate`).
LossFn = Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, tuple[Any, Metrics]]]
# eval_fn(params, model_state, batch) -> metrics as sums over the batch (incl. "count")
EvalFn = Callable[[Any, Any, Batch], Metrics]


class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue: a plain pytree (checkpointable as is).

    Attributes:
      step: number of train steps taken (micro-steps when accumulating gradients).
      params: the `params` collection (float32 storage).
      model_state: every other mutable collection, e.g. `batch_stats`.
      opt_state: the optimizer's state.
      rng: base PRNG key; step `s` uses `fold_in(rng, s)` (dropout etc.).
      tx: the optimizer (static, not saved).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def mesh_context(mesh: Mesh, rules: Any) -> contextlib.ExitStack:
    """Context in which models' logical constraints resolve against `mesh` and `rules`."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_inputs: Sequence[Any],
    rng: jax.Array,
    mesh: Mesh,
    rules: Any,
    *,
    params: Any = None,
    model_state: Any = None,
) -> tuple[TrainState, TrainState]:
    """Initialises parameters and optimizer state directly in their sharded layout.

    Args:
      model: a Flax module called as `model(*example_inputs, train=False)`.
      tx: the optimizer.
      example_inputs: positional inputs with the right shapes and dtypes (any batch size;
        each an array, a nested list of numbers, or a pytree of arrays such as a dict of
        features or a tuple; None for an optional input left out).
      rng: PRNG key for the initialisation.
      mesh, rules: where and how to shard (see `jaxmodels.sharding`).
      params: start from these parameters instead of random ones (fine-tuning: e.g.
        `bert.from_pretrained(...)[1]["params"]`, or `Checkpointer.restore_params()`), host
        or device arrays of the model's tree and shapes, stored in the model's parameter
        dtype and laid out as the rules say; the optimizer state is initialised for them.
      model_state: with `params`, the other collections to start from (e.g. a ResNet's
        `{"batch_stats": ...}`, its running statistics); None: as initialised.

    Returns:
      (state, shardings): the state, and a `TrainState` of `NamedSharding` with the same
      structure, for `jit` in/out shardings and for restoring checkpoints.

    Raises:
      ValueError: `params` or `model_state` of another tree or shapes than the model's (the
        first difference named).
    """
    init, abstract, shardings = _state_init(model, tx, example_inputs, rng, mesh, rules)
    with mesh_context(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)(rng)
    if params is None:
        if model_state is not None:
            raise ValueError("model_state is given with params (fine-tuning), not alone")
        return state, shardings
    given = {"params": _as_model_tree(params, abstract.params, "params")}
    if model_state is not None:
        given["model_state"] = _as_model_tree(model_state, abstract.model_state, "model_state")

    def start_from(state: TrainState, given: dict[str, Any]) -> TrainState:
        given = {
            k: jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), v, getattr(abstract, k))
            for k, v in given.items()
        }
        return state.replace(**given, opt_state=tx.init(given["params"]))

    with mesh_context(mesh, rules):
        given_shardings = {k: getattr(shardings, k) for k in given}
        start = jax.jit(
            start_from,
            in_shardings=(shardings, given_shardings),
            out_shardings=shardings,
            donate_argnums=0,
        )
        # Placed first: host arrays, or device arrays laid out otherwise (another mesh or
        # rules, one device), which jit would refuse for their sharding.
        state = start(state, jax.device_put(given, given_shardings))
    return state, shardings


def _as_model_tree(given: Any, expected: Any, name: str) -> Any:
    """`given`'s leaves in the tree of `expected` (the model's: plain or frozen dicts alike,
    boxed or not), if it has the same paths and shapes; else a ValueError names the first
    difference."""
    given = nn.meta.unbox(given)
    have = leaves_by_name(given)
    want = leaves_by_name(expected)
    hint = ""
    if any(key.startswith("params/") for key in have):  # the whole variables
        hint = (
            " (pass variables['params'], not the variables)"
            if name == "params"
            else " (pass the collections but 'params', e.g. {'batch_stats': ...})"
        )
    for key in want:
        if key not in have:
            raise ValueError(f"{name} lack the model's {key}{hint}")
        if tuple(jnp.shape(have[key])) != want[key].shape:
            raise ValueError(
                f"{name} {key} has shape {tuple(jnp.shape(have[key]))}, the model's "
                f"{want[key].shape}"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"{name} hold {extra[0]}, which the model does not have{hint}")
    return jax.tree.unflatten(jax.tree.structure(expected), [have[key] for key in want])


def abstract_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_inputs: Sequence[Any],
    mesh: Mesh,
    rules: Any,
    rng: jax.Array | None = None,
) -> tuple[TrainState, TrainState]:
    """`create_train_state`'s result without computing it: (state of `jax.ShapeDtypeStruct`
    with shardings, shardings), for compiling a step ahead of time (`jit(...).lower(state,
    batch).compile()`), e.g. to check its memory, on devices that need not be attached, or
    as a restore target.

    `rng`: a key of the kind `create_train_state` gets (only its shape and dtype matter): a
    typed `jax.random.key` (the default) or a raw `jax.random.PRNGKey` (uint32[2], as the
    training application uses), whose `rng` leaves differ."""
    # Made on the default device: the mesh's devices may be compile-only ones.
    key = jax.random.key(0) if rng is None else rng
    _, abstract, shardings = _state_init(model, tx, example_inputs, key, mesh, rules)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return state, shardings


def _state_init(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_inputs: Sequence[Any],
    rng: jax.Array,
    mesh: Mesh,
    rules: Any,
) -> tuple[Callable[[jax.Array], TrainState], TrainState, TrainState]:
    """(init(rng) -> TrainState, the state's shapes (`jax.ShapeDtypeStruct`), its
    shardings)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    if not isinstance(example_inputs, list | tuple):  # an array would give its rows
        raise TypeError(
            f"example_inputs is the list of the model's positional inputs (got "
            f"{type(example_inputs).__name__}): pass [x] for a model of one input"
        )
    # Each input may be a pytree (a dict of features, a tuple); a list is one array (of
    # nested rows of numbers); None stays None.
    inputs = [
        jnp.asarray(v) if isinstance(v, list) else jax.tree.map(jnp.asarray, v)
        for v in example_inputs
    ]

    def init_variables(key: jax.Array) -> Any:
        return model.init({"params": key, "dropout": key}, *inputs, train=False)

    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        variables = nn.meta.unbox(init_variables(init_rng))
        params = variables.pop("params")
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=variables,
            opt_state=tx.init(params),
            rng=state_rng,
            tx=tx,
        )

    with mesh_context(mesh, rules):
        abstract_vars = jax.eval_shape(init_variables, rng)
        var_shardings = dict(sharding.state_shardings(abstract_vars, mesh, rules))
        abstract = jax.eval_shape(init, rng)
    param_shardings = var_shardings.pop("params")
    # Outside the mesh: optax initialises placeholder states eagerly, on the default device
    # (the mesh's devices may be compile-only ones).
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    shardings = abstract.replace(
        step=replicated,
        params=param_shardings,
        model_state=var_shardings,
        opt_state=opt_shardings,
        rng=replicated,
    )
    return init, abstract, shardings


# Random-bit generators the step's dropout key may use (see `step_key`).
STEP_RNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")


def step_key(rng: jax.Array, step: jax.Array, impl: str = "threefry") -> jax.Array:
    """The key of step `step` from the state's base key (threefry, as saved).

    `impl` "rbg" / "unsafe_rbg" turns it into a key of XLA's RngBitGenerator (seeded from
    the threefry key, so still a deterministic function of seed and step): far cheaper
    random bits for dropout masks on accelerators, but the bits depend on how the arrays
    are partitioned, so a sharded step no longer equals the single-device one exactly.
    """
    key = jax.random.fold_in(rng, step)
    if impl == "threefry":
        return key
    if impl not in STEP_RNG_IMPLS:
        raise ValueError(f"unknown step rng {impl!r}; use one of {STEP_RNG_IMPLS}")
    return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=impl)


def train_step(
    state: TrainState, batch: Batch, loss_fn: LossFn, rng_impl: str = "threefry"
) -> tuple[TrainState, Metrics]:
    """One optimizer step; pure. Metrics include loss, grad_norm and learning_rate (where
    the optimizer's state holds it: `optim.make_optimizer`'s, or any other built with
    `optax.inject_hyperparams`; a plain optax optimizer's step has no learning_rate).

    `rng_impl`: the generator of the step's key (dropout masks), see `step_key`. Jitted by
    hand rather than by `compile_train_step`, trace it under `mesh_context(mesh, rules)`:
    the models' activation constraints resolve against the rules.
    """
    rng = step_key(state.rng, state.step, rng_impl)

    def objective(params: Any) -> tuple[jax.Array, tuple[Any, Metrics]]:
        return loss_fn(params, state.model_state, batch, rng)

    (loss, (model_state, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params
    )
    extra = {"loss_weight": metrics.pop("loss_weight")} if "loss_weight" in metrics else {}
    tx = optax.with_extra_args_support(state.tx)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
    learning_rate = optim.injected_learning_rate(state.opt_state)
    if learning_rate is not None:
        metrics["learning_rate"] = learning_rate
    new_state = state.replace(
        step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
    )
    return new_state, metrics


def compile_train_step(
    loss_fn: LossFn,
    shardings: TrainState,
    mesh: Mesh,
    rules: Any,
    rng_impl: str = "threefry",
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step` jitted once with shardings and state donation.

    `rules`: those the state was created with (`create_train_state`). They are needed here
    too, not only for the parameters: the models constrain some activations by logical
    axis names, which resolve against them (without them, e.g., BERT's gradients under
    `fsdp_tp` came out wrong, from XLA's partitioning of its MLM head)."""
    if rng_impl not in STEP_RNG_IMPLS:
        raise ValueError(f"unknown step rng {rng_impl!r}; use one of {STEP_RNG_IMPLS}")
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(  # a partial keeps the name: jit_train_step in traces, dumps and caches
        functools.partial(train_step, loss_fn=loss_fn, rng_impl=rng_impl),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    return _in_mesh(jitted, mesh, rules, shardings.tx)


def compile_eval_step(
    eval_fn: EvalFn, shardings: TrainState, mesh: Mesh, rules: Any
) -> Callable[[TrainState, Batch], Metrics]:
    """Jitted `eval_fn(params, model_state, batch)`, returning replicated metric sums
    (`rules`: as for `compile_train_step`)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        return eval_fn(state.params, state.model_state, batch)

    jitted = jax.jit(
        eval_step,
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=replicated,
    )
    return _in_mesh(jitted, mesh, rules, shardings.tx)


def _in_mesh(
    fn: Callable[..., Any], mesh: Mesh, rules: Any, tx: optax.GradientTransformation
) -> Callable[..., Any]:
    """`fn(state, batch)` in the mesh's context, after checking the batch splits over it
    and the state is one the step can take."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]

    def check(state: Any, batch: Batch) -> None:
        _check_split(batch, ways)
        if isinstance(state, TrainState) and state.tx != tx:
            # jit's own error lists both optimizers' function addresses ("pytree metadata").
            raise ValueError(
                "this train state holds another optimizer object than the step was compiled "
                "with (the optimizer is static, compared by identity; each make_optimizer "
                "call makes a new one): build the state and the step from the same `tx`, "
                "or compile the step with this state's shardings"
            )

    def wrapped(state: Any, batch: Batch) -> Any:
        check(state, batch)
        _check_not_donated(state)
        with mesh_context(mesh, rules):
            return fn(state, batch)

    def lower(state: Any, batch: Batch) -> Any:
        check(state, batch)
        with mesh_context(mesh, rules):
            return fn.lower(state, batch)

    wrapped.lower = lower  # type: ignore[attr-defined]
    return wrapped


_DONATED = (
    "given to an earlier step, which reused its buffers for the state it returned "
    "(donation): pass the state the last step returned (`state, metrics = step(state, "
    "batch)`), or copy what you keep of a state before the step"
)


def _first_array(tree: Any) -> jax.Array | None:
    """The first array of `tree` down its first branches (dicts, tuples, lists), without
    flattening the rest; None where that branch ends in something else."""
    for _ in range(64):
        if isinstance(tree, jax.Array):
            return None if isinstance(tree, jax.core.Tracer) else tree
        if isinstance(tree, Mapping) and tree:
            tree = next(iter(tree.values()))
        elif isinstance(tree, tuple | list) and tree:
            tree = tree[0]
        else:
            return None
    return None


def _check_not_donated(state: Any) -> None:
    """A state whose buffers an earlier step took over (donation) is refused by name: JAX's
    own error says only "Buffer has been deleted or donated", and on several devices the
    process can crash instead. One array of each part of the state tells: the state as a
    whole, or a part of an earlier one put back (e.g. parameters kept to roll back to).
    Walking every leaf would cost a large model's step some 0.2 ms of Python."""
    parts = [("this train state was", state)]
    if isinstance(state, TrainState):
        parts = [
            ("this train state was", state.step),
            ("this train state's parameters were", state.params),
            ("this train state's model state was", state.model_state),
            ("this train state's optimizer state was", state.opt_state),
        ]
    for what, part in parts:
        leaf = _first_array(part)
        if leaf is not None and leaf.is_deleted():
            raise ValueError(f"{what} {_DONATED}")


def _check_split(batch: Batch, ways: int) -> None:
    """A batch's leading axis is split over the mesh's data x fsdp devices (JAX's own error
    names a shape and a sharding, not the batch size to change)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = np.shape(leaf)
        # As Python indexes it: batch['inputs']['ids'], not the checkpoints' a/b names.
        name = "batch" + jax.tree_util.keystr(path)
        if not shape:  # (JAX's error: "incompatible with its sharding annotation")
            raise ValueError(
                f"{name} is a scalar: every array of a batch is split over the mesh's "
                "data-parallel devices along its first axis (the examples); give it one "
                "(a value per example), or pass the value to the step another way (e.g. "
                "in the loss function)"
            )
        if shape[0] % ways:
            raise ValueError(
                f"a batch of {shape[0]} examples ({name}'s leading axis) does not "
                f"split over the mesh's {ways} data-parallel devices (data x fsdp): use a "
                f"batch size that is a multiple of {ways}, or a mesh with fewer "
                "data-parallel devices"
            )


def classification_fns(
    model: nn.Module,
    label_smoothing: float = 0.0,
    inputs: Callable[[Batch], tuple[Any, ...]] | None = None,
) -> tuple[LossFn, EvalFn]:
    """Loss and eval functions for `model(*inputs(batch), train=...) -> logits`.

    Batches are dicts with the model's inputs, integer `label`s and, for evaluation, an
    optional `weight` (0 for padding examples). Mutable collections (BatchNorm's
    `batch_stats`) are updated in training mode.

    Args:
      model: the classifier.
      label_smoothing: for the training loss.
      inputs: picks (and may transform, inside the step) the model's inputs from a batch:
        a tuple of positional or a dict of keyword arguments; default `(batch["image"],)`.
        E.g. uint8 images normalised to bfloat16 on the device, `(batch["tokens"],
        batch["length"])` for an LSTM, `{"input_ids": ..., "lengths": ...}` for BERT.
    """
    inputs = inputs or (lambda batch: (batch["image"],))

    def apply(variables: Any, batch: Batch, **kwargs: Any) -> Any:
        args = inputs(batch)
        if isinstance(args, Mapping):
            return model.apply(variables, **args, **kwargs)
        return model.apply(variables, *args, **kwargs)

    def labels(batch: Batch) -> jax.Array:
        if "label" not in batch:
            raise KeyError(
                f"the batch has keys {sorted(batch)}; classification_fns' losses need its "
                "integer classes under 'label'"
            )
        return batch["label"]

    def loss_fn(params: Any, model_state: Any, batch: Batch, rng: jax.Array) -> Any:
        variables = {"params": params, **model_state}
        logits, new_state = apply(
            variables,
            batch,
            train=True,
            mutable=list(model_state.keys()),
            rngs={"dropout": rng},
        )
        loss_sum, count = losses.cross_entropy(logits, labels(batch), None, label_smoothing)
        accuracy = losses.correct(logits, batch["label"]) / count
        return loss_sum / count, (dict(new_state), {"accuracy": accuracy})

    def eval_fn(params: Any, model_state: Any, batch: Batch) -> Metrics:
        logits = apply({"params": params, **model_state}, batch, train=False)
        weights = batch.get("weight")
        loss_sum, count = losses.cross_entropy(logits, labels(batch), weights)
        return {
            "loss": loss_sum,
            "accuracy": losses.correct(logits, batch["label"], weights),
            "count": count,
        }

    return loss_fn, eval_fn


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def first_non_finite(tree: Any) -> str | None:
    """Name of the first leaf holding a NaN or inf (host-side check; `params/Dense_0/kernel`
    as `errors.leaves_by_name` names it), or None.

    One compiled program for the whole tree (not one per leaf): with the tree sharded over
    several processes each program is a collective that every process must run, in the
    same order."""
    leaves = leaves_by_name(tree)
    gone = [k for k, x in leaves.items() if isinstance(x, jax.Array) and x.is_deleted()]
    if gone:  # (the compiled check would read freed memory: a crash, not an error)
        raise ValueError(f"{gone[0]} ({len(gone)} of {len(leaves)} leaves) was {_DONATED}")
    flags = jax.device_get(_finite_flags(list(leaves.values())))
    for name, ok in zip(leaves, flags, strict=True):
        if not ok:
            return name
    return None
