"""Inner products of grouped gradients, without forming the gradients.

GEM (:mod:`jaxcl.strategies.gem`) needs, at every step, the Gram matrix
``G Gᵀ`` of the gradients ``g_k`` of ``K`` groups of examples (one per past
experience), their inner products ``G g`` with the proposed gradient, and
one combination ``Gᵀ v``. Forming ``G`` writes ``K`` parameter-sized arrays
and reads them three times; for a small MLP that memory traffic, not the
arithmetic, is most of GEM's step.

For a dense layer ``y = x W + b`` applied to rows ``a = 1..N``, the gradient
of a sum of per-row losses is ``∇W = Σ_a x_a δ_aᵀ``, ``∇b = Σ_a δ_a`` with
``δ_a = ∂ℓ_a/∂y_a``. So for groups ``S_j``, ``S_k`` of rows

.. math::
   \\langle g_j, g_k \\rangle
     = \\sum_{a \\in S_j,\\, b \\in S_k} (x_a \\cdot x_b + 1)\\,
       (\\delta_a \\cdot \\delta_b),
   \\qquad
   \\langle g, g_k \\rangle
     = \\sum_{a \\in S_k} x_a^\\top \\nabla W\\, \\delta_a + \\nabla b \\cdot \\delta_a

summed over the layers (the ``+ 1`` is the bias; a layer used several times
stacks its calls as more rows of the same example). This costs
``N² (d_in + d_out)`` per layer instead of ``K`` gradients, which pays when
the rows are few against the layer sizes (GEM's Buzzega et al. protocol: 10
or 25 examples per experience through a 784-100-100-10 MLP), and loses
when they are many (the A-GEM paper's protocol: 250 per experience);
:func:`cheaper` decides.

The factors ``x_a`` and ``δ_a`` are read from the model with flax's method
interceptors: every ``nn.Dense`` call's input is kept, and a zero added to
its output is differentiated to give ``δ``. This is exact only when

* every parameter belongs to an ``nn.Dense`` layer (no convolutions,
  normalisation scales, embeddings, masks), and
* each call sees one row per example (2-D inputs), and rows do not interact
  (no batch statistics: the caller passes a model without model state).

:func:`dense_calls` checks the first two and returns ``None`` when they do
not hold, so that callers fall back to forming the gradients.

References:
  Goodfellow, `Efficient per-example gradient computations
  <https://arxiv.org/abs/1510.01799>`_, 2015 (the outer-product form).
  Li et al., `Large language models can be strong differentially private
  learners <https://arxiv.org/abs/2110.05679>`_, ICLR 2022 ("ghost
  clipping": per-example norms from the same factors).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct, traverse_util

__all__ = ["DenseCall", "DenseFactors", "dense_calls", "dense_factors",
           "cheaper", "group_gram", "group_dots", "weighted_grad"]


class DenseCall(NamedTuple):
  """One ``nn.Dense`` call seen while tracing (static)."""
  path: tuple[str, ...]   # the layer's path in the parameter tree
  d_in: int
  d_out: int
  bias: bool


@struct.dataclass
class DenseFactors:
  """Per-row factors of every dense layer's gradient (a pytree).

  Layer ``i`` (one per parameter path, its calls stacked) has inputs
  ``inputs[i]`` ``(R_i, d_in)`` and output gradients ``deltas[i]``
  ``(R_i, d_out)``; ``rows[i]`` ``(R_i,)`` gives each row's example.
  """
  paths: tuple[tuple[str, ...], ...] = struct.field(pytree_node=False)
  bias: tuple[bool, ...] = struct.field(pytree_node=False)
  inputs: tuple[jax.Array, ...]
  deltas: tuple[jax.Array, ...]
  rows: tuple[jax.Array, ...]


def _is_dense_call(context) -> bool:
  # Exactly nn.Dense: subclasses (masked layers) may change the math.
  return type(context.module) is nn.Dense and \
      context.method_name == "__call__"


def _input(args, kwargs):
  return args[0] if args else kwargs["inputs"]


def dense_calls(loss_fn: Callable[[Any], jax.Array], params: Any,
                n: int) -> tuple[DenseCall, ...] | None:
  """The dense calls of ``loss_fn(params)``, or ``None`` if its gradient
  cannot be factored (see the module docstring).

  Traces ``loss_fn`` abstractly (no computation). ``n`` is the number of
  examples: each call's input must be ``(n, d_in)``.
  """
  calls = []

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if _is_dense_call(context):
      x = _input(args, kwargs)
      calls.append((context.module.path, x.shape, out.shape,
                    context.module.use_bias))
    return out

  def run(p):
    with nn.intercept_methods(spy):
      return loss_fn(p)

  jax.eval_shape(run, params)
  flat = traverse_util.flatten_dict(params)
  covered = set()
  out = []
  for path, x_shape, y_shape, bias in calls:
    if len(x_shape) != 2 or x_shape[0] != n or len(y_shape) != 2:
      return None
    names = {"kernel", "bias"} if bias else {"kernel"}
    kernel = flat.get(path + ("kernel",))
    if kernel is None or kernel.shape != (x_shape[1], y_shape[1]):
      return None
    covered |= {path + (k,) for k in names}
    out.append(DenseCall(path, x_shape[1], y_shape[1], bias))
  if not out or covered != set(flat):
    return None  # a parameter outside the dense calls (or none at all)
  return tuple(out)


def cheaper(calls: tuple[DenseCall, ...], n: int, k: int,
            num_params: int) -> bool:
  """Whether the factored products beat forming ``k`` gradients.

  Factored: ``n² Σ (d_in + d_out + 1)`` multiply-adds for the Gram
  matrices. Formed: ``k`` parameter-sized arrays written once and read
  three times, memory-bound on a CPU. The constant 100 (multiply-adds per
  formed float) separates the cases measured on a 2-core x86 CPU with
  ``benchmarks/gem.py`` (MLP 784-100-100-10; the ratio of the two counts:
  factored 2x faster at 27 (200 rows in 20 groups), about even at 83 (250
  in 10), slower at 167 (500 in 20); docs/notes_hybrid.md, session 15).
  On an accelerator it is a guess.
  """
  width = sum(c.d_in + c.d_out + 1 for c in calls)
  return n * n * width <= 100 * k * num_params


def dense_factors(loss_fn: Callable[[Any], jax.Array], params: Any,
                  calls: tuple[DenseCall, ...], n: int) -> DenseFactors:
  """Inputs and output gradients of every dense call of ``loss_fn`` over
  ``n`` examples (``calls`` from :func:`dense_calls`; ``loss_fn`` returns
  the *sum* of the examples' losses, each scaled as its group's gradient
  needs)."""
  zeros = [jnp.zeros((n, c.d_out), jnp.float32) for c in calls]

  def shifted(shifts):
    inputs = []

    def add(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if not _is_dense_call(context):
        return out
      i = len(inputs)
      inputs.append(_input(args, kwargs))
      return out + shifts[i].astype(out.dtype)

    with nn.intercept_methods(add):
      total = loss_fn(params)
    return total, inputs

  deltas, inputs = jax.grad(shifted, has_aux=True)(zeros)
  # One layer per parameter path: its calls' rows are stacked.
  paths = tuple(dict.fromkeys(c.path for c in calls))
  xs, ds, rows, bias = [], [], [], []
  for p in paths:
    idx = [i for i, c in enumerate(calls) if c.path == p]
    xs.append(jnp.concatenate([inputs[i].astype(jnp.float32) for i in idx]))
    ds.append(jnp.concatenate([deltas[i] for i in idx]))
    rows.append(jnp.tile(jnp.arange(n), len(idx)))
    bias.append(calls[idx[0]].bias)
  return DenseFactors(paths, tuple(bias), tuple(xs), tuple(ds), tuple(rows))


def group_gram(f: DenseFactors, groups: jax.Array) -> jax.Array:
  """``(K, K)`` Gram matrix of the groups' gradients; ``groups`` is the
  ``(N, K)`` 0/1 (or weighted) membership of each example."""
  total = 0.0
  for x, d, r, b in zip(f.inputs, f.deltas, f.rows, f.bias):
    kx = x @ x.T + (1.0 if b else 0.0)
    oh = groups[r]
    total = total + oh.T @ ((kx * (d @ d.T)) @ oh)
  return total


def group_dots(f: DenseFactors, groups: jax.Array, g: Any) -> jax.Array:
  """``(K,)`` inner products ``⟨g, g_k⟩`` of a parameter-shaped ``g`` with
  the groups' gradients."""
  flat = traverse_util.flatten_dict(g)
  total = 0.0
  for path, x, d, r, b in zip(f.paths, f.inputs, f.deltas, f.rows, f.bias):
    kernel = flat[path + ("kernel",)].astype(jnp.float32)
    per_row = jnp.sum((x @ kernel) * d, axis=1)
    if b:
      per_row = per_row + d @ flat[path + ("bias",)].astype(jnp.float32)
    total = total + groups[r].T @ per_row
  return total


def weighted_grad(f: DenseFactors, weights: jax.Array, like: Any) -> Any:
  """``Σ_a w_a ∇ℓ_a``: the gradient with example ``a`` weighted by
  ``weights[a]`` (``(N,)``), shaped and typed like ``like``."""
  flat = {}
  for path, x, d, r, b in zip(f.paths, f.inputs, f.deltas, f.rows, f.bias):
    wd = d * weights[r][:, None]
    flat[path + ("kernel",)] = x.T @ wd
    if b:
      flat[path + ("bias",)] = jnp.sum(wd, axis=0)
  # In `like`'s own tree structure (a dict or a FrozenDict).
  return jax.tree_util.tree_map_with_path(
      lambda kp, l: flat[tuple(k.key for k in kp)].astype(l.dtype), like)
