"""Gradient Episodic Memory (GEM): project the update onto the past's cone.

Lopez-Paz & Ranzato (2017) keep an episodic memory ``M_k`` of examples of
every past experience ``k``. At each step, with ``g`` the proposed gradient
and ``g_k = ∇ℓ(f_θ, M_k)`` the gradient of the loss on memory ``k``, the
update must not increase any past loss to first order:
``⟨g̃, g_k⟩ ≥ 0`` for all ``k < t``. If ``g`` already satisfies this it is
used unchanged; otherwise it is projected to the closest gradient that does
(eqs. 10-13):

.. math::
   \\min_{\\tilde g}\\; \\tfrac12 \\lVert g - \\tilde g \\rVert_2^2
   \\quad \\text{s.t.}\\quad G \\tilde g \\ge 0,
   \\qquad G = (g_1, \\ldots, g_{t-1})^\\top,

solved through its dual, a QP in ``t - 1`` variables:

.. math::
   v^* = \\arg\\min_{v \\ge \\gamma}\\;
     \\tfrac12 v^\\top (G G^\\top + \\varepsilon I) v + g^\\top G^\\top v,
   \\qquad \\tilde g = G^\\top v^* + g.

``γ`` is ``margin`` (the "memory strength" of the authors' code: ``v ≥ γ``
instead of ``v ≥ 0`` biases the update towards gradients that *decrease*
the old losses) and ``ε`` is ``eps`` (their ``1e-3`` ridge, which makes the
dual strictly convex; by the KKT conditions the result satisfies
``⟨g̃, g_k⟩ = μ_k − ε v_k ≥ −ε v_k``, so ``ε`` is also the constraints'
tolerance). The dual QP is solved inside ``jit`` by
:func:`jaxcl.strategies._qp.solve_box_qp`, an exact active-set method with
a fixed iteration budget (no host call to a QP library). ``G G^\\top`` and
``G g`` are sums of per-leaf contractions, so gradients are never
flattened. For models made of dense layers only (the MLPs of the usual GEM
protocols) the three products ``G g``, ``G G^\\top`` and ``G^\\top v`` can
instead be computed from each layer's inputs and output gradients on the
memory rows, without forming ``G`` at all (:mod:`jaxcl.dense_grams`;
argument ``gram``): 1.4-3.4x faster per step when the memory rows are few
against the layer sizes (``benchmarks/gem.py``).

Memory: after experience ``k`` its slots ``[k m, (k+1) m)`` receive ``m``
uniformly drawn training examples (``m`` is ``mem_per_experience``, or
``mem_size // num_experiences``: Buzzega et al.'s fixed total budget). The
memory has fixed shape ``(num_experiences * m, ...)``; the per-experience
gradients fill a fixed ``(num_experiences, ...)`` stack whose future rows
are zero and out of the QP, so nothing recompiles as the stream grows. A
step differentiates (in one ``vmap``) and projects against only the first
``k`` blocks, ``k`` the smallest of a few fixed sizes (:func:`row_buckets`)
that covers the past experiences: a ``lax.switch`` over static sizes, so
early experiences cost less and the first costs nothing extra.

.. warning::
  The memory losses use the model state (e.g. batch-norm statistics) as of
  the start of the experience (``update_grads`` does not see the current
  model state), in training mode. Rows that a chained strategy appends to
  the batch (``chain(replay(...), gem(...))``) are part of the gradient
  GEM projects, in either order: every ``prepare_batch`` runs before the
  gradient is taken.

.. note::
  In a vmapped sweep (``jaxcl.sweep``) every run forms ``G Gᵀ`` at every
  step: whether the proposed gradient violates a constraint differs per
  run, so the projection's ``cond`` is batched and runs both branches.
  A sweep's GEM step therefore costs more per run than a plain run's on a
  CPU (``benchmarks/gem.py --runs 3``; docs/notes_hybrid.md).

.. note::
  Beside a member that keeps weights fixed (one that declares
  ``freeze_grads``; :mod:`jaxcl.strategy` lists them), each memory
  gradient is masked to the weights that move (``ctx.freeze``), so the
  constraints hold on them in either order; that case forms the
  gradients (the stacked path), since the factored Gram has no
  per-weight mask.

References:
  Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
  <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017 (and the authors' code,
  ``facebookresearch/GradientEpisodicMemory``, for ``margin`` and ``eps``).
  Buzzega et al., `Dark experience for general continual learning
  <https://arxiv.org/abs/2004.07211>`_, 2020 (the total-budget protocol).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl import buffers, checks, dense_grams
from jaxcl.runs import max_over_runs
from jaxcl.state import cross_entropy, no_freeze
from jaxcl.strategies._qp import QPResult, solve_box_qp
from jaxcl.strategy import Strategy, mark_experience_start
from jaxcl.train import device_experience, init_variables

__all__ = ["GEMState", "gem", "per_experience", "check_memory_args",
           "row_buckets",
           "store_experience", "memory_loss", "tree_dot", "project",
           "project_factored", "GRAM_METHODS"]


class GEMState(NamedTuple):
  memory: buffers.Memory  # num_experiences * m slots; block k = experience k
  model_state: Any        # model state at the start of the experience
  experience: jax.Array   # int32 scalar: the current experience
  key: jax.Array          # PRNG key (memory sampling)


# --------------------------------------------------------------------------
# Shared with A-GEM: the episodic memory.


# Neither size given: the GEM authors' ``n_memories`` for their MNIST runs.
DEFAULT_MEM_PER_EXPERIENCE = 256


def check_memory_args(name: str, mem_size: int | None,
                      mem_per_experience: int | None) -> tuple[int, int]:
  """Factory-time checks of the two ways of sizing the memory.

  Returns ``(mem_size, mem_per_experience)`` as ints, one of them 0; with
  neither given, ``DEFAULT_MEM_PER_EXPERIENCE`` per experience.
  """
  if mem_size is None and mem_per_experience is None:
    return 0, DEFAULT_MEM_PER_EXPERIENCE
  # Only a missing size becomes 0: `or 0` would also turn False into 0 and
  # skip the type check below.
  mem_size = 0 if mem_size is None else mem_size
  mem_per_experience = 0 if mem_per_experience is None else mem_per_experience
  for k, v in (("mem_size", mem_size),
               ("mem_per_experience", mem_per_experience)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"{name}: {k} must be an int >= 0, got {v!r}")
  if mem_size and mem_per_experience:
    raise ValueError(f"{name}: give mem_size (a total budget) or "
                     f"mem_per_experience, not both (got {mem_size} and "
                     f"{mem_per_experience})")
  if not (mem_size or mem_per_experience):
    raise ValueError(f"{name}: the memory per experience is 0; set "
                     "mem_per_experience >= 1 or mem_size >= the number of "
                     "experiences")
  return mem_size, mem_per_experience


def per_experience(name: str, ctx, mem_size: int,
                   mem_per_experience: int) -> int:
  """Slots per experience (init time: needs the stream length)."""
  e = ctx.info.num_experiences
  m = mem_per_experience or mem_size // e
  if m < 1:
    raise ValueError(f"{name}: mem_size={mem_size} over {e} experiences "
                     "gives a memory per experience of 0; use mem_size >= "
                     f"{e} or set mem_per_experience")
  return m


@functools.partial(jax.jit, static_argnames=("m",))
def store_experience(mem: buffers.Memory, key: jax.Array, x, y, task,
                     n_valid, experience, *, m: int) -> buffers.Memory:
  """Writes ``m`` uniformly drawn valid rows of ``x`` into block
  ``experience`` of the memory (fewer if the experience is smaller; the
  rest of the block is marked invalid)."""
  size = x.shape[0]
  perm = jax.random.permutation(key, size)
  perm = perm[jnp.argsort(perm >= n_valid, stable=True)]  # valid first
  take = perm[:m] if size >= m else jnp.concatenate(
      [perm, jnp.zeros((m - size,), perm.dtype)])
  ok = jnp.arange(m) < jnp.minimum(n_valid, m)
  start = experience * m
  put = lambda a, new: jax.lax.dynamic_update_slice_in_dim(
      a, new.astype(a.dtype), start, axis=0)
  return mem._replace(
      x=put(mem.x, x[take]), y=put(mem.y, y[take]),
      task=put(mem.task, task[take]),
      experience=put(mem.experience, jnp.full((m,), experience, jnp.int32)),
      valid=put(mem.valid, ok), seen=mem.seen + n_valid)


def init_memory(ctx, key, m: int) -> GEMState:
  k_mem, k_ms = jax.random.split(key)
  _, variables = init_variables(ctx, k_ms)
  mem = buffers.init(ctx.info.num_experiences * m, ctx.info.input_shape)
  return GEMState(mem, variables, jnp.zeros((), jnp.int32), k_mem)


def make_hooks(m_of):
  """``before_experience`` / ``after_experience`` filling the memory;
  ``m_of(ctx)`` gives the slots per experience."""

  before_experience = mark_experience_start

  def after_experience(ctx, state, experience):
    ss = state.strategy
    data = device_experience(experience, ctx.info.train_size)
    key = jax.random.fold_in(ss.key, experience.index)
    mem = store_experience(ss.memory, key, data["x"], data["y"],
                           data["task"],
                           jnp.asarray(experience.num_train, jnp.int32),
                           jnp.asarray(experience.index, jnp.int32),
                           m=m_of(ctx))
    return state.replace(strategy=ss._replace(memory=mem))

  return before_experience, after_experience


def memory_loss(ctx, params, model_state, x, y, task, mask) -> jax.Array:
  """Mean cross-entropy of memory rows (0 when all are masked)."""
  logits, _ = ctx.apply(params, model_state, x, task, train=True, mask=mask)
  return cross_entropy(logits, y, mask)


def memory_loss_sum(ctx, params, model_state, x, y, task,
                    weight) -> jax.Array:
  """``Σ_a weight_a ℓ_a`` over memory rows (with ``weight_a = 1 / n_k`` on
  block ``k``'s valid rows: the sum of the blocks' mean losses)."""
  logits, _ = ctx.apply(params, model_state, x, task, train=True,
                        mask=weight)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y)
  return jnp.sum(ce * weight)


def tree_dot(a: Any, b: Any) -> jax.Array:
  """``⟨a, b⟩`` over all leaves, in float32."""
  terms = jax.tree.map(lambda u, v: jnp.vdot(u.astype(jnp.float32),
                                             v.astype(jnp.float32)), a, b)
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


# --------------------------------------------------------------------------
# GEM's projection.


def _project_with(g: Any, dots: jax.Array, has: jax.Array, gram_fn,
                  combine_fn, margin: float, eps: float,
                  max_iter: int) -> tuple[Any, Any]:
  """The projection given ``G g``; ``gram_fn()`` gives ``G Gᵀ`` and
  ``combine_fn(v)`` gives ``g + Gᵀ v``, each only when a constraint is
  violated."""
  k = has.shape[0]
  violated = jnp.any(has & (dots < 0.0))

  def solve(_):
    p = gram_fn()
    p = 0.5 * (p + p.T) + eps * jnp.eye(p.shape[0], dtype=p.dtype)
    qp = solve_box_qp(p, dots, margin, has, max_iter=max_iter)
    return combine_fn(qp.v), qp

  def keep(_):
    return g, QPResult(jnp.zeros((k,), jnp.float32), jnp.asarray(True),
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

  return jax.lax.cond(violated, solve, keep, None)


def project(g: Any, mem_grads: Any, has: jax.Array, margin: float,
            eps: float, max_iter: int = 0) -> tuple[Any, Any]:
  """GEM's projection of ``g`` given stacked memory gradients.

  Args:
    g: the proposed gradient (a pytree).
    mem_grads: the same pytree with a leading axis ``K`` (``g_k``).
    has: bool ``(K,)``: which rows are constraints (others are ignored).
    margin: ``γ``; eps: ``ε``.

  Returns:
    ``(g̃, qp)``: ``g`` itself when no active constraint is violated
    (``⟨g, g_k⟩ ≥ 0``), else ``Gᵀv* + g``; and the
    :class:`jaxcl.strategies._qp.QPResult` (``v`` = 0 when not solved).
  """
  k = has.shape[0]
  # Leaves as (K, -1) matrices: plain matmuls (faster than the equivalent
  # einsums on CPU, where these skinny products are memory bound).
  rows = lambda a: a.reshape(k, -1).astype(jnp.float32)
  gg = jax.tree.map(lambda a, b: rows(a) @ b.reshape(-1).astype(jnp.float32),
                    mem_grads, g)
  dots = sum(jax.tree.leaves(gg), 0.0)  # (K,) = G g

  def gram():
    return sum(jax.tree.leaves(
        jax.tree.map(lambda a: rows(a) @ rows(a).T, mem_grads)), 0.0)

  def combine(v):
    return jax.tree.map(
        lambda gi, a: (gi.astype(jnp.float32) + (v @ rows(a)).reshape(
            gi.shape)).astype(gi.dtype), g, mem_grads)

  return _project_with(g, dots, has, gram, combine, margin, eps, max_iter)


def project_factored(g: Any, factors: dense_grams.DenseFactors,
                     groups: jax.Array, has: jax.Array, margin: float,
                     eps: float, max_iter: int = 0) -> tuple[Any, Any]:
  """:func:`project` with ``G`` given by dense-layer factors
  (:mod:`jaxcl.dense_grams`) and ``groups`` ``(N, K)``, each example's
  block: ``G g``, ``G Gᵀ`` and ``Gᵀ v`` without forming ``G``."""
  dots = dense_grams.group_dots(factors, groups, g)

  def combine(v):
    extra = dense_grams.weighted_grad(factors, groups @ v, g)
    return jax.tree.map(lambda gi, e: (gi.astype(jnp.float32) + e.astype(
        jnp.float32)).astype(gi.dtype), g, extra)

  return _project_with(g, dots, has,
                       lambda: dense_grams.group_gram(factors, groups),
                       combine, margin, eps, max_iter)


def factored_calls(ctx, params, model_state, n: int):
  """The dense calls of the memory loss on ``n`` rows if its gradient
  products can be factored (:func:`jaxcl.dense_grams.dense_calls`), else
  ``None``; a model state (batch statistics) couples rows, so never then."""
  if jax.tree.leaves(model_state):
    return None

  def calls(rows):
    x = jnp.zeros((rows,) + tuple(ctx.info.input_shape), jnp.float32)
    z = jnp.zeros((rows,), jnp.int32)
    return dense_grams.dense_calls(
        lambda p: memory_loss_sum(ctx, p, model_state, x, z, z,
                                  jnp.ones((rows,))), params, rows)

  # Traced at two sizes: a dense layer whose leading axis is n for
  # another reason than the batch (e.g. n chunks) does not follow it.
  here, other = calls(n), calls(n + 1)
  if here is None or other is None or \
      [c.path for c in here] != [c.path for c in other]:
    return None
  return here


# The past memory blocks are differentiated, and the projection solved, on
# the first k blocks for k the smallest of a few fixed sizes that holds
# every past experience (a lax.switch over static sizes: one program for
# the whole stream, of which each step runs one branch). GEM's step moves
# its E x params gradient stack several times (forming it, G g, G Gᵀ,
# Gᵀ v), so its cost is proportional to the rows it keeps; a fori_loop
# over the past blocks saved their arithmetic but not that traffic, and
# its iterations were too small to fill a CPU (docs/notes_hybrid.md,
# sessions 5 and 12).
_ROW_BUCKETS = 4


def row_buckets(e: int, buckets: int | None = None) -> tuple[int, ...]:
  """The sizes ``0 < k_1 < ... < e`` (and 0: no past experience) that
  GEM's step can differentiate, for a stream of ``e`` experiences."""
  step = -(-e // (buckets or _ROW_BUCKETS))
  return (0,) + tuple(range(step, e, step)) + (e,)


# How G Gᵀ, G g and Gᵀ v are computed (the result is the same up to
# rounding): "stacked" forms the past blocks' gradients G; "factored"
# (dense-only models without model state) computes them from each dense
# layer's inputs and output gradients (jaxcl.dense_grams) without G;
# "auto" takes "factored" where it is possible and estimated cheaper.
GRAM_METHODS = ("auto", "factored", "stacked")


def gem(mem_size: int | None = None, mem_per_experience: int | None = None,
        margin: float = 0.5,
        eps: float = 1e-3, max_iter: int = 0,
        sample_per_experience: int = 0, gram: str = "auto") -> Strategy:
  """Gradient Episodic Memory.

  Args:
    mem_size: total memory (examples), split evenly over the stream's
      experiences (``mem_size // num_experiences`` each).
    mem_per_experience: examples kept per experience (the paper's
      ``n_memories``); give this or ``mem_size``. Neither given: 256 per
      experience (the authors' MNIST setting).
    margin: memory strength ``γ >= 0`` (the authors' code uses 0.5).
    eps: ridge ``ε > 0`` added to ``G Gᵀ``.
    max_iter: iteration budget of the QP solver (0: ``3 K + 10``).
    sample_per_experience: 0 (the paper) computes each ``g_k`` on all of
      experience ``k``'s memory at every step; ``s > 0`` on ``s`` of its
      examples drawn uniformly per step (a cheaper, noisier constraint: the
      memory gradients, not the QP, dominate GEM's cost; see
      ``benchmarks/gem.py``).
    gram: how the products of the memory gradients are computed, one of
      ``GRAM_METHODS``: ``"stacked"`` forms each past block's gradient;
      ``"factored"`` derives the products from the dense layers' inputs
      and output gradients (:mod:`jaxcl.dense_grams`; models whose
      parameters are all ``nn.Dense`` layers and which keep no model
      state, e.g. the MLPs); ``"auto"`` (default) uses ``"factored"``
      where it applies and :func:`jaxcl.dense_grams.cheaper` says it
      costs less (few memory rows against the layer sizes). The step is
      the same up to float rounding.

  Raises:
    ValueError: a memory per experience of 0 (both sizes 0, or at ``init``
      ``mem_size`` smaller than the number of experiences), both sizes
      given, negative ``margin``, non-positive ``eps``.
  """
  mem_size, mem_per_experience = check_memory_args("gem", mem_size,
                                                   mem_per_experience)
  checks.nonnegative("gem: margin", margin)
  checks.positive("gem: eps", eps)
  if isinstance(max_iter, bool) or not isinstance(max_iter, int) or \
      max_iter < 0:
    raise ValueError(f"gem: max_iter must be an int >= 0 (0: automatic), "
                     f"got {max_iter!r}")

  checks.one_of("gem: gram", gram, GRAM_METHODS)
  if isinstance(sample_per_experience, bool) or not isinstance(
      sample_per_experience, int) or sample_per_experience < 0:
    raise ValueError(f"gem: sample_per_experience must be an int >= 0 (0: "
                     f"the whole memory), got {sample_per_experience!r}")

  def m_of(ctx):
    return per_experience("gem", ctx, mem_size, mem_per_experience)

  def init(ctx, key, params):
    if sample_per_experience > m_of(ctx):
      raise ValueError(f"gem: sample_per_experience={sample_per_experience}"
                       f" is larger than the memory per experience "
                       f"({m_of(ctx)})")
    state = init_memory(ctx, key, m_of(ctx))
    if gram == "factored" and factored_calls(
        ctx, params, state.model_state, 2) is None:
      raise ValueError(
          "gem: gram='factored' needs a model whose parameters all belong "
          "to nn.Dense layers applied to one row per example, with no "
          "model state (batch statistics); this model is not one. Use "
          "gram='auto' or 'stacked'.")
    return state

  before_experience, after_experience = make_hooks(m_of)

  def update_grads(ctx, sstate, grads, params, batch, key):
    del batch
    e = ctx.info.num_experiences
    m = m_of(ctx)
    mem = sstate.memory
    blocks = lambda a: a.reshape((e, m) + a.shape[1:])
    # Only past experiences constrain the step (the current one's block
    # is filled after it ends).
    past = mem.valid & (mem.experience < sstate.experience)
    w = blocks(past)
    has = jnp.any(w, axis=1)
    xs, ys, ts = blocks(mem.x), blocks(mem.y), blocks(mem.task)
    if sample_per_experience:
      # s valid entries of each block, uniformly without replacement.
      score = jnp.where(w, jax.random.uniform(key, w.shape), -1.0)
      _, idx = jax.lax.top_k(score, sample_per_experience)  # (E, s)
      pick = lambda a: jnp.take_along_axis(
          a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
      xs, ys, ts, w = pick(xs), pick(ys), pick(ts), pick(w)
    grad_one = jax.grad(memory_loss, argnums=1)
    grad_blocks = jax.vmap(grad_one, in_axes=(None, None, None, 0, 0, 0, 0))
    wf = w.astype(jnp.float32)
    ms = sstate.model_state
    num_params = sum(a.size for a in jax.tree.leaves(params))

    def first(k):
      """The step on the first ``k`` blocks (those beyond the past are
      masked out: zero gradients and no constraint)."""
      def branch(_):
        if k == 0:  # no past experience: nothing to project against
          return grads
        rows = xs.shape[1]
        n = k * rows
        # A chained member's fixed weights (ctx.freeze) are masked out of
        # each memory gradient, so the constraints hold on the weights
        # that move; the factored Gram has no per-weight mask, so that
        # case takes the stacked path.
        frozen = ctx.freeze is not no_freeze
        calls = (None if gram == "stacked" or frozen
                 else factored_calls(ctx, params, ms, n))
        if calls and (gram == "factored" or dense_grams.cheaper(
            calls, n, k, num_params)):
          flat = lambda a: a[:k].reshape((n,) + a.shape[2:])
          # Each block's mean loss: weight 1 / n_k on its valid rows.
          weight = flat(wf / jnp.maximum(wf.sum(1, keepdims=True), 1.0))
          total = lambda p: memory_loss_sum(ctx, p, ms, flat(xs), flat(ys),
                                            flat(ts), weight)
          factors = dense_grams.dense_factors(total, params, calls, n)
          groups = jnp.repeat(jnp.eye(k, dtype=jnp.float32), rows, axis=0)
          new, _ = project_factored(grads, factors, groups, has[:k],
                                    float(margin), float(eps), max_iter)
          return new
        mem_grads = grad_blocks(ctx, params, ms, xs[:k], ys[:k], ts[:k],
                                wf[:k])
        if frozen:
          mem_grads = jax.vmap(ctx.freeze)(mem_grads)
        new, _ = project(grads, mem_grads, has[:k], float(margin),
                         float(eps), max_iter)
        return new
      return branch

    sizes = row_buckets(e)
    # In a sweep the past is the maximum over runs (all share the stream,
    # so it is every run's own count), unbatched: a batched index would
    # turn the switch into a select that runs every branch.
    n_past = max_over_runs(jnp.clip(sstate.experience, 0, e))
    # The smallest k >= past, counted against Python ints: an array of the
    # sizes could be batched by an enclosing batched cond, and the index
    # with it.
    which = sum(jnp.asarray(n_past > k, jnp.int32) for k in sizes[:-1])
    return jax.lax.switch(which, [first(k) for k in sizes], None)

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=update_grads,
                  after_experience=after_experience, name="gem")
