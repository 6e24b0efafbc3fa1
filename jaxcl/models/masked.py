"""Masked layers shared by the architectural strategies.

Flax (linen) building blocks for methods that learn *which* weights or
units a task uses rather than (only) the weights themselves:

* binary masks from real-valued scores by a threshold with a
  straight-through estimator (Piggyback, Mallya et al. 2018):

  .. math::  M = \\mathbb{1}[S > \\tau], \\qquad
             \\partial L / \\partial S := \\partial L / \\partial M

* top-k% masks by score magnitude, also straight-through (edge-popup,
  Ramanujan et al. 2020; SupSup, Wortsman et al. 2020):

  .. math::  M = \\mathbb{1}[|S| \\in \\mathrm{top}_k(|S|)]

* sign masks :math:`M = \\mathbb{1}[S > 0]` with scores initialised
  U(+-1/sqrt(fan_in)), straight-through (``mask='sign'``): the variant of
  SupSup's reference code for its MNIST experiments (``GetSubnetFast`` of
  ``FastMultitaskMaskConv``, RAIVNLab/supsup ``models/modules.py``; the
  density is learned, about 0.5 at init);

* :class:`MaskedDense` / :class:`MaskedConv`: a layer whose weights ``W``
  are *not trained* (they live in the ``frozen`` variable collection, so no
  optimiser ever touches them) and whose effective weights are
  ``W * M_t`` with a per-task mask ``M_t`` computed from per-task scores
  ``S[t]`` (a trained parameter of shape ``(num_tasks,) + W.shape``);
* unit-wise gates ``sigma(s * e)`` for HAT (:func:`hat_gate`).

Everything has fixed shapes sized at init (``num_tasks`` slots of scores),
so the strategies' state checkpoints, ``vmap`` s and never recompiles.

Per-example task ids: a batch usually holds one task (evaluation batches and
plain training batches always do), so the layers compute one masked weight
matrix; a batch mixing tasks (replay, joint training) takes a slower path
that computes every task's output and picks each example's (both paths are
compiled, ``lax.cond`` picks one at run time).

The module also holds small helpers the strategies share (gradient masks
along the task axis, a check that the optimiser does not move parameters
whose gradient is zero).

References:
  Mallya, Davis & Lazebnik, `Piggyback: Adapting a Single Network to
  Multiple Tasks by Learning to Mask Weights
  <https://arxiv.org/abs/1801.06519>`_, 2018.
  Ramanujan et al., `What's Hidden in a Randomly Weighted Neural Network?
  <https://arxiv.org/abs/1911.13299>`_, 2020.
  Wortsman et al., `Supermasks in Superposition
  <https://arxiv.org/abs/2006.14769>`_, 2020.
  Serra et al., `Overcoming Catastrophic Forgetting with Hard Attention to
  the Task <https://arxiv.org/abs/1801.01423>`_, 2018.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.runs import all_over_runs

__all__ = [
    "MASK_KINDS", "WEIGHT_INITS", "threshold_mask", "topk_mask",
    "hat_gate", "per_task", "MaskedDense", "MaskedConv",
    "task_row_grads", "check_zero_grad_is_zero_update", "mask_leaves",
]

MASK_KINDS = ("threshold", "edge_popup", "sign")
WEIGHT_INITS = ("kaiming", "signed_constant")


# --------------------------------------------------------------------------
# Binary masks with straight-through gradients.


@jax.custom_vjp
def _ste_threshold(scores: jax.Array, threshold: jax.Array) -> jax.Array:
  return (scores > threshold).astype(scores.dtype)


def _ste_threshold_fwd(scores, threshold):
  return _ste_threshold(scores, threshold), None


def _ste_threshold_bwd(_, g):
  # Straight-through: the mask's gradient is passed to the scores unchanged;
  # the threshold is a hyperparameter (no gradient).
  return g, jnp.zeros((), g.dtype)


_ste_threshold.defvjp(_ste_threshold_fwd, _ste_threshold_bwd)


def threshold_mask(scores: jax.Array, threshold: float) -> jax.Array:
  """``1[scores > threshold]`` (exactly 0/1) with a straight-through gradient."""
  return _ste_threshold(scores, jnp.asarray(threshold, scores.dtype))


def _kth_largest_bits(bits: jax.Array, k: int) -> jax.Array:
  """The k-th largest of non-negative float32s given as their int32 bits.

  Bit patterns of non-negative floats sort like the floats, so 32 steps of
  integer bisection find the exact value with O(n) work each; a full sort
  of a 784x1024 layer is ~10x slower on CPU.
  """

  def body(_, lohi):
    lo, hi = lohi  # count(bits >= lo) >= k > count(bits >= hi)
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(bits >= mid) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, body,
                            (jnp.int32(0), jnp.int32(0x7F800001)))
  return lo


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_topk(scores: jax.Array, density: float) -> jax.Array:
  # scores >= 0 here (magnitudes).
  n = scores.size
  k = max(1, min(n, int(round(density * n))))
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
  return (bits >= _kth_largest_bits(bits.reshape(-1), k)).astype(scores.dtype)


def _ste_topk_fwd(scores, density):
  return _ste_topk(scores, density), None


def _ste_topk_bwd(density, _, g):
  del density
  return (g,)


_ste_topk.defvjp(_ste_topk_fwd, _ste_topk_bwd)


def topk_mask(scores: jax.Array, density: float) -> jax.Array:
  """Edge-popup mask: 1 on the ``density`` fraction of largest ``|scores|``.

  ``round(density * scores.size)`` ones (more only if magnitudes tie at the
  threshold); the gradient passes straight through to ``|scores|`` (and so
  to ``scores`` times their sign), as edge-popup's ``GetSubnet``.
  """
  return _ste_topk(jnp.abs(scores), float(density))


def hat_gate(embedding: jax.Array, s: jax.Array | float) -> jax.Array:
  """HAT's unit attention ``sigma(s * e)`` (Serra et al. 2018, eq. 1)."""
  return jax.nn.sigmoid(s * embedding)


# --------------------------------------------------------------------------
# Per-task computation with a fast path for single-task batches.


def per_task(fn: Callable[[jax.Array], jax.Array], task: jax.Array,
             num_tasks: int, mixed: bool = True) -> jax.Array:
  """``fn(task[b])[b]`` for every example ``b``.

  ``fn(t)`` returns the whole batch's output under task ``t``'s weights. A
  batch holding one task costs one call; a mixed batch costs ``num_tasks``
  calls (every task's output, then each example's row). The choice is a
  ``lax.cond`` at run time. In a sweep its predicate is "every run's batch
  holds one task" (:func:`jaxcl.runs.all_over_runs`), one unbatched value,
  so the runs of a task-incremental stream keep the one-call shortcut; on
  a predicate batched by another ``vmap`` the ``cond`` becomes a
  ``select`` running *both* branches (``num_tasks + 1`` calls).
  ``mixed=False`` promises one task per batch and makes one call;
  rows of another task than the first get NaN, so a broken promise fails
  loudly (a non-finite loss) instead of silently using the wrong weights.
  """
  task = jnp.clip(task.astype(jnp.int32), 0, num_tasks - 1)
  if num_tasks == 1:
    return fn(jnp.zeros((), jnp.int32))
  if not mixed:
    out = fn(task[0])
    other = (task != task[0]).reshape((-1,) + (1,) * (out.ndim - 1))
    return jnp.where(other, jnp.nan, out)

  def one(_):
    return fn(task[0])

  def mixed(_):
    outs = jax.vmap(fn)(jnp.arange(num_tasks))  # (T, B, ...)
    return jnp.take_along_axis(
        outs, task.reshape((1, -1) + (1,) * (outs.ndim - 2)), axis=0)[0]

  # The mixed branch is right for any batch, the shortcut only for a
  # one-task batch: take it when every run of a sweep can.
  return jax.lax.cond(all_over_runs(jnp.all(task == task[0])), one, mixed,
                      None)


def _fan_in_uniform(key, shape, dtype=jnp.float32):
  # Kaiming uniform (a = sqrt(5)) as PyTorch's default for Linear/Conv.
  fan_in = int(np.prod(shape[:-1]))
  bound = 1.0 / math.sqrt(max(fan_in, 1))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _signed_constant(key, shape, dtype=jnp.float32, density=1.0):
  # Edge-popup's "scaled signed Kaiming constant": +-sqrt(2 / (k fan_in))
  # with a random sign, so a layer keeping a fraction k of its weights keeps
  # the activations' scale.
  fan_in = int(np.prod(shape[:-1]))
  std = math.sqrt(2.0 / max(density * fan_in, 1e-12))
  sign = jax.random.rademacher(key, shape, dtype=jnp.int32).astype(dtype)
  return sign * std


class _MaskedBase(nn.Module):
  """Shared machinery of :class:`MaskedDense` and :class:`MaskedConv`."""
  num_tasks: int = 1
  mask: str = "threshold"
  weights: str = "kaiming"
  use_bias: bool = True
  threshold: float = 5e-3
  score_init: float = 1e-2
  density: float = 0.5
  mixed_batches: bool = True  # see per_task

  def _check(self):
    if self.mask not in MASK_KINDS:
      raise ValueError(f"mask={self.mask!r}; valid: {list(MASK_KINDS)}")
    if self.weights not in WEIGHT_INITS:
      raise ValueError(f"weights={self.weights!r}; valid: "
                       f"{list(WEIGHT_INITS)}")
    if self.num_tasks < 1:
      raise ValueError(f"num_tasks must be >= 1, got {self.num_tasks}")
    if not 0.0 < self.density <= 1.0:
      raise ValueError(f"density must be in (0, 1], got {self.density}")

  def _variables(self, kernel_shape):
    self._check()
    init = (functools.partial(_signed_constant, density=self.density)
            if self.weights == "signed_constant" else _fan_in_uniform)
    kernel = self.variable("frozen", "kernel",
                           lambda: init(self.make_rng("params"),
                                        kernel_shape)).value
    bias = None
    if self.use_bias:
      bias = self.variable("frozen", "bias",
                           lambda: jnp.zeros(kernel_shape[-1:])).value
    if self.mask == "threshold":
      s_init = lambda k, s: jnp.full(s, self.score_init, jnp.float32)
    else:
      s_init = lambda k, s: jax.vmap(lambda kk: _fan_in_uniform(kk, s[1:]))(
          jax.random.split(k, s[0]))
    scores = self.param("scores", s_init, (self.num_tasks,) + kernel_shape)
    return kernel, bias, scores

  def task_mask(self, scores_t: jax.Array) -> jax.Array:
    """The binary mask of one task's scores."""
    if self.mask == "threshold":
      return threshold_mask(scores_t, self.threshold)
    if self.mask == "sign":
      return threshold_mask(scores_t, 0.0)
    return topk_mask(scores_t, self.density)

  def _apply(self, op, x, task, masks=None, alphas=None):
    """``op(x, W * M)`` per task; see :class:`MaskedDense` for the modes."""
    kernel_shape = self._kernel_shape(x)
    kernel, bias, scores = self._variables(kernel_shape)
    # In the input's dtype, as the parameters are under mixed precision
    # (``model.compute_dtype``, which casts the parameters and inputs, not
    # these fixed weights); a no-op in float32.
    kernel = kernel.astype(x.dtype)
    bias = None if bias is None else bias.astype(x.dtype)

    def mask_of(t):
      if masks is not None:
        return masks[t].astype(kernel.dtype)
      return self.task_mask(scores[t])

    if alphas is not None:
      # Superposition of the masks (SupSup, eq. 4): W * sum_t alpha_t M_t.
      all_masks = (masks.astype(kernel.dtype) if masks is not None else
                   jax.vmap(self.task_mask)(scores))
      mix = jnp.tensordot(alphas, all_masks, axes=1)
      y = op(x, kernel * mix)
    else:
      y = per_task(lambda t: op(x, kernel * mask_of(t)), task, self.num_tasks,
                   self.mixed_batches)
    if bias is not None:
      y = y + bias
    return y


class MaskedDense(_MaskedBase):
  """A dense layer with frozen weights and a learned binary mask per task.

  Variables: ``frozen/kernel`` (in, features), ``frozen/bias`` (features,)
  (not trained: no gradient, no optimiser update), ``params/scores``
  (num_tasks, in, features). Output for an example of task ``t``:
  ``x @ (kernel * M_t) + bias`` with ``M_t = threshold_mask(scores[t])``
  (``mask='threshold'``, Piggyback) or ``topk_mask(scores[t], density)``
  (``mask='edge_popup'``, SupSup).

  Call arguments: ``masks`` (num_tasks, in, features) replaces the masks
  computed from the scores (stored binary masks); ``alphas`` (num_tasks,)
  superposes the masks with these weights (SupSup's task inference).
  """
  features: int = 1

  def _kernel_shape(self, x):
    return (x.shape[-1], self.features)

  @nn.compact
  def __call__(self, x: jax.Array, task: jax.Array,
               masks: jax.Array | None = None,
               alphas: jax.Array | None = None) -> jax.Array:
    return self._apply(lambda a, w: a @ w, x, task, masks, alphas)


class MaskedConv(_MaskedBase):
  """A 2-D convolution (NHWC, SAME padding) with frozen weights and a
  learned binary mask per task; as :class:`MaskedDense` otherwise."""
  features: int = 1
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)

  def _kernel_shape(self, x):
    return tuple(self.kernel_size) + (x.shape[-1], self.features)

  @nn.compact
  def __call__(self, x: jax.Array, task: jax.Array,
               masks: jax.Array | None = None,
               alphas: jax.Array | None = None) -> jax.Array:

    def op(a, w):
      return jax.lax.conv_general_dilated(
          a, w, tuple(self.strides), "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return self._apply(op, x, task, masks, alphas)


# --------------------------------------------------------------------------
# Helpers shared by the strategies.


def task_row_grads(grads: Any, task: jax.Array,
                   select: Callable[[tuple, jax.Array], bool]) -> Any:
  """Zeros every row but ``task`` along axis 0 of the selected leaves.

  ``select(path, leaf)`` picks the leaves stacked per task (scores, columns);
  other leaves pass unchanged.
  """

  def one(path, g):
    if not select(path, g):
      return g
    keep = jnp.arange(g.shape[0]) == task
    return jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g,
                     jnp.zeros_like(g))

  return jax.tree_util.tree_map_with_path(one, grads)


def mask_leaves(tree: Any, masks: Any) -> Any:
  """``where(mask, leaf, 0)`` leaf by leaf (``masks`` may hold None)."""
  return jax.tree.map(
      lambda a, m: a if m is None else jnp.where(m, a, jnp.zeros_like(a)),
      tree, masks, is_leaf=lambda v: v is None)


@functools.partial(jax.jit, static_argnums=0)
def _max_zero_grad_update(tx, params):
  # One compiled program (op-by-op dispatch of an optimiser update is slow).
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  return [jnp.max(jnp.abs(u)) for u in jax.tree.leaves(updates)]


def _zero_grad_update_size(tx, params) -> list[float]:
  try:
    return [float(m) for m in _max_zero_grad_update(tx, params)]
  except TypeError:  # an unhashable optimiser: run it op by op
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return [float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)]


def check_zero_grad_is_zero_update(tx, params: Any, method: str) -> None:
  """Raises if the optimiser moves a parameter whose gradient is zero.

  Methods that freeze parameters by zeroing their gradient (PackNet, PNN,
  Piggyback and SupSup scores of earlier tasks, HAT) rely on a zero gradient
  giving a zero update. Decoupled weight decay (``adamw``) and coupled L2
  (``sgd``/``momentum`` with ``weight_decay``) break that. The check feeds a
  zero gradient to a fresh optimiser state; it is skipped under tracing
  (e.g. ``vmap`` over ``init``).
  """
  leaves = jax.tree.leaves(params)
  if any(isinstance(a, jax.core.Tracer) for a in leaves):
    return
  moved = _zero_grad_update_size(tx, params)
  if any(m != 0.0 for m in moved):
    raise ValueError(
        f"{method} freezes parameters by zeroing their gradients, but the "
        "optimiser moves parameters whose gradient is zero (weight decay "
        f"{max(moved):.3g} per step); set optimizer.weight_decay=0 (decoupled "
        "adamw decay and coupled sgd L2 both move frozen weights)")


def score_leaves(params: Any) -> dict[str, jax.Array]:
  """The ``scores`` parameters of masked layers, by layer path
  (``'backbone/Dense_0'``, ``'head'``)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys and keys[-1] == "scores":
      out["/".join(keys[:-1])] = leaf
  return out


def binary_masks(scores: jax.Array, mask: str, threshold: float,
                 density: float) -> jax.Array:
  """Every task's binary mask (bool, shaped like ``scores``) from stacked
  per-task scores, as the layers compute them (without the STE)."""
  if mask == "threshold":
    return scores > threshold
  if mask == "sign":
    return scores > 0.0
  return jax.vmap(lambda s: topk_mask(s, density))(scores) > 0.5


def head_task_grads(grads: Any, task: jax.Array, num_tasks: int) -> Any:
  """Zeros the gradient of every head but ``task``'s in a multi-head
  ``grads['head']`` (``kernel`` (D, num_tasks * C), ``bias``), so that other
  members of a chain (e.g. LwF's distillation through old heads) cannot move
  the heads of other tasks."""
  if not isinstance(grads, dict) or "head" not in grads or num_tasks <= 1:
    return grads
  head = dict(grads["head"])
  for k in ("kernel", "bias"):
    if k not in head:
      continue
    g = head[k]
    c = g.shape[-1] // num_tasks
    keep = (jnp.arange(g.shape[-1]) // c) == task
    head[k] = jnp.where(keep, g, jnp.zeros_like(g))
  out = dict(grads)
  out["head"] = head
  return out
