"""Model FLOPs per training step, counted from the jaxpr of the forward pass.

The count, used for every framework compared (our rows and the peer rows get the same number):

* **forward FLOPs** are counted from ``jax.make_jaxpr`` of ``model.apply(variables, *inputs,
  train=False)`` with the benchmark's batch (abstract shapes: nothing is computed). Only the
  two kinds of equation that do the arithmetic of these models are counted:

  - ``dot_general``: 2 x (product of the contracted dimensions) x (output elements);
  - ``conv_general_dilated``: 2 x (output elements) x (kernel spatial size) x (input features
    per group, i.e. the kernel's input-feature dimension).

  Elementwise operations (activations, normalisation, bias adds, the loss), reductions,
  pooling and gathers (embedding look-ups) count 0.
* **sub-jaxprs** are counted where they run: ``jit``/``pjit`` calls, ``remat``, the primal
  function of ``custom_jvp``/``custom_vjp`` calls once each; a ``scan`` body times the scan
  length; a ``cond`` as its most expensive branch; a ``while`` body once (its trip count is not
  static, so the count is a lower bound).
* **Transformers** (BERT, the decoder-only LM): the count is then the usual 6 x N x tokens
  (N: the weights of the matmuls) + attention (Q K^T and weights x V, over the full
  seq x seq also when causal), matmuls only. Attention through cuDNN is a custom call with no
  matmuls in the jaxpr, so those forwards are counted on the XLA attention
  (`benchmarks.workloads.Built.flops_model`, as the cuDNN LSTM is counted on the scan one).
  BERT's masked-LM head is counted where the model computes it: on the masked positions only
  (the "MLM head on the masked 15% only" convention; the model gathers them before the
  vocabulary projection).
* **model FLOPs per step** = 3 x forward FLOPs (the backward pass costs about twice the
  forward: one matmul for the input gradient, one for the weight gradient). Optimizer updates
  and recomputation (remat) are not counted, so this is *model* FLOPs, as in MFU.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> forward_flops(nn.Dense(5), jnp.zeros((4, 3)), train_kwarg=False)  # 2 * 4 * 3 * 5
  120
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.extend import core as jcore

from benchmarks.specs import BACKWARD_FACTOR

__all__ = ["BACKWARD_FACTOR", "count_jaxpr_flops", "forward_flops", "jaxpr_flops", "step_flops"]


def _dot_general_flops(eqn: Any) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return 2 * contracted * math.prod(eqn.outvars[0].aval.shape)


def _conv_flops(eqn: Any) -> int:
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    rhs_shape = eqn.invars[1].aval.shape
    in_per_group = rhs_shape[rhs_spec[1]]
    kernel_spatial = math.prod(rhs_shape[d] for d in rhs_spec[2:])
    return 2 * math.prod(eqn.outvars[0].aval.shape) * kernel_spatial * in_per_group


def _as_jaxpr(value: Any) -> Any:
    """The open jaxpr inside `value` (a Jaxpr or ClosedJaxpr), else None."""
    if isinstance(value, jcore.ClosedJaxpr):
        return value.jaxpr
    if isinstance(value, jcore.Jaxpr):
        return value
    return None


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    found = []
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        found += [j for j in (_as_jaxpr(v) for v in items) if j is not None]
    return found


def count_jaxpr_flops(jaxpr: Any) -> int:
    """FLOPs of an open or closed jaxpr under the rules of the module docstring."""
    jaxpr = _as_jaxpr(jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * count_jaxpr_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max((count_jaxpr_flops(b) for b in eqn.params["branches"]), default=0)
        elif name == "while":
            total += count_jaxpr_flops(eqn.params["body_jaxpr"])
        else:  # jit/pjit, remat, custom_jvp_call, custom_vjp_call, ...: the primal call(s)
            total += sum(count_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
    return total


def jaxpr_flops(fn: Any, *args: Any) -> int:
    """FLOPs of `fn(*args)`; args may be arrays or `jax.ShapeDtypeStruct`s."""
    return count_jaxpr_flops(jax.make_jaxpr(fn)(*args))


def forward_flops(
    model: Any,
    *inputs: Any,
    variables: Any = None,
    train_kwarg: bool = True,
) -> int:
    """Forward FLOPs of `model.apply(variables, *inputs, train=False)`.

    Args:
      model: a Flax linen module.
      inputs: the model's positional inputs at the benchmark's batch size (arrays or
        `jax.ShapeDtypeStruct`s).
      variables: the model's variables (or their shapes); by default their shapes from
        `jax.eval_shape` of `model.init` (nothing is allocated).
      train_kwarg: pass `train=False` (all models of the library take it; a bare
        `nn.Dense` does not).
    """
    kwargs = {"train": False} if train_kwarg else {}
    if variables is None:
        variables = jax.eval_shape(
            lambda key, *x: model.init({"params": key, "dropout": key}, *x, **kwargs),
            jax.random.key(0),
            *inputs,
        )
    return jaxpr_flops(lambda v, *x: model.apply(v, *x, **kwargs), variables, *inputs)


def step_flops(forward: int | float) -> int | float:
    """Model FLOPs of one training step (forward + backward) from the forward FLOPs."""
    return BACKWARD_FACTOR * forward
