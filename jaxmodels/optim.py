"""Optimizers and learning-rate schedules, built in one place from plain arguments.

`make_optimizer` returns one `optax.GradientTransformation`:

    [accumulation ->] clip by global norm -> optimizer(learning_rate=schedule)

The learning rate is an injected hyperparameter, so the value in force lives in the
optimizer state and `current_learning_rate(opt_state)` reads it for logging.

Example:
  >>> import jax.numpy as jnp
  >>> tx = make_optimizer("adamw", 1e-3, total_steps=100, warmup_steps=10,
  ...                     schedule="cosine", weight_decay=0.05, grad_clip_norm=1.0)
  >>> state = tx.init({"w": jnp.ones((2, 2))})
  >>> float(current_learning_rate(state))
  0.0
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmodels.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd", "lamb", "lars")
# What `momentum=None` and `eps=None` mean: each optimizer's usual value (RMSprop's papers,
# optax, PyTorch and Keras have no momentum; LAMB's paper and optax's lamb use eps 1e-6).
DEFAULT_MOMENTUM = {"sgd": 0.9, "lars": 0.9, "rmsprop": 0.0}
# The optimizers that take `momentum` and `nesterov` (Adam's, AdamW's and LAMB's first
# moment decays by `b1` instead).
MOMENTUM_OPTIMIZERS = tuple(DEFAULT_MOMENTUM)
DEFAULT_EPS = {"adam": 1e-8, "adamw": 1e-8, "lamb": 1e-6, "rmsprop": 1e-8}
SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    end_factor: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0, then constant / cosine / linear decay to `end_factor * lr`.

    `total_steps` counts optimizer updates (after gradient accumulation).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup_steps < 0 or (total_steps > 0 and warmup_steps > total_steps):
        raise ConfigError(
            f"warmup_steps={warmup_steps} must be between 0 and total_steps={total_steps}"
        )
    if not end_factor >= 0:  # a negative final rate ascends the loss
        raise ConfigError(
            f"end_factor must be >= 0 (the final rate over the peak rate), got {end_factor}"
        )
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_factor)
    else:
        main = optax.linear_schedule(learning_rate, learning_rate * end_factor, decay_steps)
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def _decay_mask(params: Any) -> Any:
    """Weight decay applies to matrices and kernels, not to biases and norm scales: not to
    1-D parameters, nor to any named `*bias` or `*scale` (an attention projection's bias is
    [heads, head_dim]; scanned layers stack every bias and scale on a layer axis)."""

    def decayed(path: Any, p: Any) -> bool:
        last = path[-1] if path else None
        name = str(getattr(last, "key", getattr(last, "name", "")))
        return jnp.ndim(p) > 1 and not name.endswith(("bias", "scale"))

    return jax.tree_util.tree_map_with_path(decayed, params)


def _no_momentum(name: str, momentum: float | None, nesterov: bool, b1: float) -> str:
    given = ", ".join(f"{k}={v}" for k, v in (("momentum", momentum), ("nesterov", nesterov)) if v)
    return (
        f"{given} has no effect on {name}, which has no momentum ({name}'s first moment "
        f"decays by b1, here {b1}); momentum and nesterov are for "
        f"{', '.join(MOMENTUM_OPTIMIZERS)}"
    )


def make_optimizer(
    name: str,
    learning_rate: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    end_factor: float = 0.0,
    weight_decay: float = 0.0,
    momentum: float | None = None,
    nesterov: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    grad_clip_norm: float | None = None,
    accumulate_steps: int = 1,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Builds the optimizer.

    Args:
      name: one of `OPTIMIZERS`: adam, adamw, rmsprop, sgd (with momentum), lamb, lars.
      learning_rate: peak learning rate.
      total_steps: number of optimizer updates (for the decay schedule).
      warmup_steps, schedule, end_factor: see `make_schedule`.
      weight_decay: decoupled weight decay (adamw, lamb, lars) or L2 added to the gradient
        (sgd, rmsprop, adam); never applied to biases and norm scales (1-D parameters, and
        any named `*bias` or `*scale`).
      momentum, nesterov: for sgd, rmsprop and lars; momentum None: the optimizer's usual
        (`DEFAULT_MOMENTUM`: 0.9 for sgd and lars, none for rmsprop). Given to adam, adamw
        or lamb, which have none, they are ignored with a warning.
      b1, b2: for adam, adamw and lamb; eps: for those and rmsprop, None: the optimizer's
        usual (`DEFAULT_EPS`: 1e-8, lamb 1e-6).
      grad_clip_norm: clip the gradient to this global norm first (None or 0: off).
      accumulate_steps: accumulate gradients over this many micro-steps before an update
        (`accumulate`); the effective batch is `accumulate_steps` times larger. Each
        micro-step's `update` may take `loss_weight=` (what its loss is a mean over, e.g.
        tokens): the update then applies the weighted mean, exactly the gradient of the
        loss over all micro-batches' tokens together; without it they weigh equally.
      mu_dtype: storage dtype of first moments (e.g. bfloat16 to save memory): adam, adamw
        and sgd (its momentum).
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {learning_rate}")
    if accumulate_steps < 1:
        raise ConfigError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
    if name not in MOMENTUM_OPTIMIZERS and (momentum or nesterov):
        warnings.warn(_no_momentum(name, momentum, nesterov, b1), stacklevel=2)
        momentum, nesterov = None, False
    momentum = DEFAULT_MOMENTUM.get(name) if momentum is None else momentum
    eps = DEFAULT_EPS.get(name) if eps is None else eps
    for key, value in (("weight_decay", weight_decay), ("momentum", momentum)):
        if value is not None and not value >= 0:  # a negative one pushes the weights away
            raise ConfigError(f"{key} must be >= 0, got {value}")
    # Decay rates of running averages: 1 or more and the averages never forget (b1 = 1
    # gave NaN); the same for momentum.
    for key, value in (("momentum", momentum), ("b1", b1), ("b2", b2)):
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if eps is not None and not eps > 0:  # what keeps Adam's and RMSprop's division finite
        raise ConfigError(f"eps must be > 0, got {eps}")
    if grad_clip_norm is not None and grad_clip_norm < 0:  # it would reverse the update
        raise ConfigError(
            f"grad_clip_norm must be > 0 (None or 0: no clipping), got {grad_clip_norm}"
        )
    if mu_dtype is not None and name not in ("adam", "adamw", "sgd"):
        raise ConfigError(
            f"mu_dtype (the first moments' storage dtype) applies to adam, adamw and sgd; "
            f"optax's {name} keeps its state in the parameters' dtype: drop mu_dtype"
        )
    if nesterov and not momentum and name in ("sgd", "rmsprop", "lars"):
        raise ConfigError(f"nesterov needs momentum > 0 ({name}); set momentum or drop nesterov")
    sched = make_schedule(learning_rate, total_steps, warmup_steps, schedule, end_factor)

    def build(learning_rate: Any) -> optax.GradientTransformation:
        l2 = weight_decay > 0 and name in ("sgd", "rmsprop", "adam")
        parts = []
        if l2:
            parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
        if name == "adam":
            parts.append(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype))
        elif name == "adamw":
            parts.append(
                optax.adamw(
                    learning_rate,
                    b1=b1,
                    b2=b2,
                    eps=eps,
                    weight_decay=weight_decay,
                    mask=_decay_mask,
                    mu_dtype=mu_dtype,
                )
            )
        elif name == "rmsprop":
            parts.append(
                optax.rmsprop(learning_rate, eps=eps, momentum=momentum or None, nesterov=nesterov)
            )
        elif name == "sgd":
            parts.append(
                optax.sgd(
                    learning_rate,
                    momentum=momentum or None,
                    nesterov=nesterov,
                    accumulator_dtype=mu_dtype,
                )
            )
        elif name == "lamb":
            parts.append(
                optax.lamb(
                    learning_rate,
                    b1=b1,
                    b2=b2,
                    eps=eps,
                    weight_decay=weight_decay,
                    mask=_decay_mask,
                )
            )
        else:  # lars
            parts.append(
                optax.lars(
                    learning_rate,
                    weight_decay=weight_decay,
                    weight_decay_mask=_decay_mask,
                    trust_ratio_mask=_decay_mask,
                    momentum=momentum,
                    nesterov=nesterov,
                )
            )
        return optax.chain(*parts)

    injected = optax.inject_hyperparams(build)(learning_rate=sched)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        # inject_hyperparams keeps the rate it just used; store the next update's instead,
        # so the state always says what the coming step will apply (it is recomputed from
        # the count on every update, so the stored value is only ever read for logging).
        updates, state = injected.update(updates, state, params)
        rate = state.hyperparams["learning_rate"]
        upcoming = jnp.asarray(sched(state.count), rate.dtype)
        return updates, state._replace(hyperparams={**state.hyperparams, "learning_rate": upcoming})

    tx: optax.GradientTransformation = optax.GradientTransformation(injected.init, update)
    if grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    if accumulate_steps > 1:
        return accumulate(tx, accumulate_steps)
    return optax.with_extra_args_support(tx)


class AccumulationState(NamedTuple):
    mini_step: jax.Array  # micro-steps accumulated since the last update
    weight: jax.Array  # their summed loss weights
    grads: Any  # their gradients, each times its weight, summed
    inner: Any


def accumulate(inner: optax.GradientTransformation, every: int) -> optax.GradientTransformation:
    """`inner` applied once every `every` calls, to the weighted mean of their gradients.

    `update(grads, state, params, loss_weight=w)`: `w` (default 1) is what the micro-batch's
    loss is a mean over (e.g. its token count), so that the mean of the gradients weighted
    by it is the gradient of the loss over all micro-batches at once. The calls in between
    return zero updates. (`optax.MultiSteps` weighs every micro-batch equally.)
    """

    def init(params: Any) -> AccumulationState:
        return AccumulationState(
            mini_step=jnp.zeros([], jnp.int32),
            weight=jnp.zeros([], jnp.float32),
            grads=jax.tree.map(jnp.zeros_like, params),
            inner=inner.init(params),
        )

    def update(
        grads: Any, state: AccumulationState, params: Any = None, **extra: Any
    ) -> tuple[Any, AccumulationState]:
        w = jnp.asarray(extra.get("loss_weight", 1.0), jnp.float32)
        if w.shape:
            raise ValueError(f"loss_weight must be a scalar, got shape {w.shape}")
        summed = jax.tree.map(lambda a, g: (a + w * g).astype(a.dtype), state.grads, grads)
        weight = state.weight + w

        def apply() -> tuple[Any, AccumulationState]:
            total = jnp.where(weight > 0, weight, 1.0)  # no weight at all: nothing summed
            mean = jax.tree.map(lambda a: (a / total).astype(a.dtype), summed)
            updates, inner_state = inner.update(mean, state.inner, params)
            return updates, AccumulationState(
                jnp.zeros_like(state.mini_step),
                jnp.zeros_like(weight),
                jax.tree.map(jnp.zeros_like, summed),
                inner_state,
            )

        def wait() -> tuple[Any, AccumulationState]:
            # Updates as the inner optimizer's are (e.g. float32 for bfloat16 parameters).
            shapes = jax.eval_shape(inner.update, grads, state.inner, params)[0]
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            return zeros, AccumulationState(state.mini_step + 1, weight, summed, state.inner)

        return jax.lax.cond(state.mini_step + 1 >= every, apply, wait)

    return optax.GradientTransformationExtraArgs(init, update)


def as_multisteps(state: AccumulationState) -> optax.MultiStepsState:
    """`state`'s leaves in the layout of `optax.MultiSteps`' state, which earlier versions
    of `make_optimizer` accumulated with: a restore target for their checkpoints (then
    `from_multisteps`). Works on `jax.ShapeDtypeStruct` leaves too."""
    return optax.MultiStepsState(
        mini_step=state.mini_step,
        gradient_step=state.mini_step,
        inner_opt_state=state.inner,
        acc_grads=state.grads,
        skip_state=(),
    )


def from_multisteps(old: optax.MultiStepsState) -> AccumulationState:
    """An `optax.MultiSteps` state as `accumulate`'s: its running mean of `mini_step`
    equally weighted gradients becomes their sum, of weight `mini_step`."""
    n = old.mini_step
    return AccumulationState(
        mini_step=n,
        weight=n.astype(jnp.float32),
        grads=jax.tree.map(lambda a: (a * n).astype(a.dtype), old.acc_grads),
        inner=old.inner_opt_state,
    )


def _is_injected(node: Any) -> bool:
    return hasattr(node, "hyperparams") and hasattr(node, "count")


def with_schedule(opt_state: Any, schedule: optax.Schedule) -> Any:
    """`opt_state` whose stored learning rate is `schedule`'s at the state's update count.

    The rate each update applies is always recomputed from the count; the stored one is
    what `current_learning_rate` reads (for logging). A run resumed with another schedule
    calls this so that its first logged rate is the new schedule's, not the old one's.
    """

    def refresh(node: Any) -> Any:
        if not _is_injected(node):
            return node
        rate = node.hyperparams["learning_rate"]
        new = jnp.asarray(schedule(node.count), rate.dtype)
        return node._replace(hyperparams={**node.hyperparams, "learning_rate": new})

    return jax.tree.map(refresh, opt_state, is_leaf=_is_injected)


def injected_learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate the next update will use, read from an optimizer's state; None
    where the state holds none (an optimizer not built with `optax.inject_hyperparams`)."""
    for _, value in optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate"):
        if hasattr(value, "shape"):  # the value, not the schedule's own state
            return value
    return None


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the next update will use, read from an optimizer's state.

    Raises:
      ValueError: the state holds none (see `injected_learning_rate`).
    """
    value = injected_learning_rate(opt_state)
    if value is None:
        raise ValueError(
            "optimizer state has no injected learning_rate: build the optimizer with "
            "make_optimizer, or wrap it in optax.inject_hyperparams"
        )
    return value
