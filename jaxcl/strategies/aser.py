"""ASER: replay the memory entries with the largest adversarial Shapley value.

Adversarial Shapley value experience replay (Shim et al. 2021). Memory
entries are valued by their KNN Shapley value (Jia et al. 2019) in the
model's feature space: for an evaluation point :math:`(x_e, y_e)` and
candidates sorted by Euclidean distance to it,
:math:`\\alpha_1, \\dots, \\alpha_N` (nearest first), the Shapley value of
candidate :math:`\\alpha_i` for the KNN utility
:math:`u(S) = \\frac{1}{K} \\sum_{j \\le \\min(K, |S|)}
\\mathbb{1}[y_{\\alpha_j(S)} = y_e]` has the closed form

.. math::
   s_{\\alpha_N} = \\frac{\\mathbb{1}[y_{\\alpha_N} = y_e]}{\\max(N, K)},
   \\qquad
   s_{\\alpha_i} = s_{\\alpha_{i+1}}
     + \\frac{\\mathbb{1}[y_{\\alpha_i} = y_e]
              - \\mathbb{1}[y_{\\alpha_{i+1}} = y_e]}{K}
       \\frac{\\min(K, i)}{i}

(:func:`knn_shapley`). Jia et al.'s Theorem 1 and the ASER code start the
recursion at :math:`1/N`, which is the Shapley value only when
:math:`N \\ge K`: with fewer candidates than neighbours every candidate is
always among the :math:`K` nearest, :math:`u` is additive and each value is
:math:`\\mathbb{1}[y_{\\alpha_i} = y_e]/K`. Here the first experiences'
small memories (Split MNIST's first experience holds 4 candidates against
the default :math:`K = 5`) get the values of the utility above. At each
step:

* **retrieval** (``update_grads``): a class-balanced subsample :math:`C`
  of the memory (``n_smp_cls`` random entries of each class in memory) is
  scored against a second, disjoint class-balanced subsample :math:`E_m`
  (cooperative) and against the incoming batch :math:`B` (adversarial);
  ASER\\ :math:`_\\mu` (``aser_type='asvm'``, the code's default) takes

  .. math::
     \\mathrm{ASV}_\\mu(c) = \\frac{1}{|E_m|} \\sum_{e \\in E_m} s_e(c)
       - \\frac{1}{|B|} \\sum_{b \\in B} s_b(c),

  ASER (``'asv'``) :math:`\\max_{e \\in E_m} s_e(c) - \\min_{b \\in B} s_b(c)`,
  and ``'neg_sv'`` :math:`-\\sum_{b \\in B} s_b(c)`. The ``batch_size``
  candidates of largest score are replayed: the gradient of their mean
  loss is added to the incoming gradient (the code's ER agent: two means
  added, as MIR). Until the memory has been offered more rows than it
  holds (``seen <= mem_size``), ``batch_size`` entries are drawn uniformly
  instead, as the code does;
* **memory update** (``after_step``, ``update='aser'``): rows go to free
  slots while there are some; once the memory is full, the incoming rows
  and ``n_smp_cls * num_classes`` random memory entries are valued by
  their summed Shapley value :math:`\\sum_{e} s_e` against a class-balanced
  subsample of the memory (disjoint from those entries) plus the incoming
  rows of *minority* classes (memory share below a threshold drawn from
  :math:`U(0, 1/|Y|)` each step, the code's ``add_minority_class_input``);
  of the :math:`n_m + n_b` candidates the :math:`n_m` highest stay, so each
  incoming row ranked among them overwrites a memory candidate ranked
  below. ``update='reservoir'`` keeps a reservoir instead (the code's
  ``--update random``).

Features are the model's (``features=True``, the penultimate layer;
the code's ``model.features``) in eval mode, under the current
parameters: before the step for retrieval, after it for the update (the
code updates the memory after ``opt.step()``).

Deviations: the model state (batch-norm statistics) is the one at the start
of the experience, as MIR's (``update_grads`` does not receive the current
one). Ties in a score keep the lower index first (stable sort: memory
candidates before incoming rows in the update); the code's torch sort
breaks them arbitrarily. An empty cooperative subsample (every class in
memory has at most ``n_smp_cls`` entries) contributes 0, where the code's
mean over no rows gives NaN. Candidate and evaluation subsamples hold at
most ``n_smp_cls * num_classes`` rows (static shapes); the code's are as
large.

References:
  Shim, Mai, Jeong, Sanner, Kim & Jang, `Online class-incremental
  continual learning with adversarial Shapley value
  <https://arxiv.org/abs/2009.00093>`_, AAAI 2021 (code:
  RaptorMai/online-continual-learning, ``utils/buffer/aser_*.py``).
  Jia et al., `Efficient task-specific data valuation for nearest neighbor
  algorithms <https://arxiv.org/abs/1908.08619>`_, VLDB 2019.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.strategies._extractor import extract
from jaxcl.strategies._replay_memory import add_replay_grads, init_memory
from jaxcl.strategies.replay import after_grads, incoming_rows, reservoir_step
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["aser", "ASERState", "knn_shapley", "aser_scores", "retrieve",
           "aser_update", "ASER_TYPES", "UPDATES"]

ASER_TYPES = ("asvm", "asv", "neg_sv")
UPDATES = ("aser", "reservoir")


class ASERState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; update draws fold in memory.seen
  model_state: Any        # model state at the start of the experience


def knn_shapley(dist: jax.Array, eval_y: jax.Array, cand_y: jax.Array,
                cand_ok: jax.Array, k: int) -> jax.Array:
  """KNN Shapley values ``(E, N)`` of ``N`` candidates for ``E``
  evaluation points (Jia et al. 2019, Theorem 1; the recursion in the
  module docstring).

  Args:
    dist: ``(E, N)`` distances (any monotone one: only the order counts).
    eval_y: int ``(E,)``; cand_y: int ``(N,)`` labels.
    cand_ok: bool ``(N,)``: the valid candidates. The others are left out
      of the game (``N`` in the recursion is their number) and get 0.
    k: the number of neighbours ``K``.
  """
  e, n_max = dist.shape
  n = jnp.sum(cand_ok, dtype=jnp.int32)
  # Invalid candidates sort last (stable: ties keep the lower index first).
  order = jnp.argsort(jnp.where(cand_ok[None, :], dist, jnp.inf), axis=1,
                      stable=True)
  i = jnp.arange(1, n_max + 1)
  active = i <= n
  match = ((cand_y[order] == eval_y[:, None]) & active).astype(jnp.float32)
  nxt = jnp.concatenate([match[:, 1:], jnp.zeros((e, 1), jnp.float32)], 1)
  nf = jnp.maximum(n, k).astype(jnp.float32)
  # Position N (the farthest valid one) starts the recursion with
  # 1/max(N, K) (module docstring: 1/N only holds for N >= K); the match
  # after it is 0 (inactive), so one expression covers both.
  factor = jnp.where(i == n, 1.0 / nf,
                     jnp.minimum(k, i).astype(jnp.float32) / (k * i))
  term = (match - nxt) * jnp.where(active, factor, 0.0)
  sv_sorted = jnp.cumsum(term[:, ::-1], axis=1)[:, ::-1]
  rows = jnp.arange(e)[:, None]
  return jnp.zeros((e, n_max), jnp.float32).at[rows, order].set(sv_sorted)


def _sq_dist(a: jax.Array, b: jax.Array) -> jax.Array:
  """Squared Euclidean distances ``(len(a), len(b))`` (the code's)."""
  return jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)


def aser_scores(f_cand: jax.Array, y_cand: jax.Array, ok_cand: jax.Array,
                f_coop: jax.Array, y_coop: jax.Array, ok_coop: jax.Array,
                f_adv: jax.Array, y_adv: jax.Array, ok_adv: jax.Array, *,
                k: int, aser_type: str = "asvm") -> jax.Array:
  """ASER's retrieval score ``(N,)`` of each candidate (features ``f_*``,
  labels ``y_*``, validity ``ok_*``): cooperative KNN-SV against
  ``coop`` (memory rows) minus adversarial KNN-SV against ``adv`` (the
  incoming rows), by ``aser_type`` (module docstring); ``-inf`` for an
  invalid candidate. Empty evaluation sets contribute 0."""
  sv_adv = knn_shapley(_sq_dist(f_adv, f_cand), y_adv, y_cand, ok_cand, k)
  a = ok_adv[:, None]
  if aser_type == "neg_sv":
    score = -jnp.sum(jnp.where(a, sv_adv, 0.0), 0)
  else:
    sv_coop = knn_shapley(_sq_dist(f_coop, f_cand), y_coop, y_cand, ok_cand,
                          k)
    c = ok_coop[:, None]
    if aser_type == "asv":
      coop = jnp.max(jnp.where(c, sv_coop, -jnp.inf), 0)
      adv = jnp.min(jnp.where(a, sv_adv, jnp.inf), 0)
      score = (jnp.where(jnp.any(ok_coop), coop, 0.0)
               - jnp.where(jnp.any(ok_adv), adv, 0.0))
    else:
      mean = lambda sv, m, cnt: (jnp.sum(jnp.where(m, sv, 0.0), 0)
                                 / jnp.maximum(jnp.sum(cnt), 1))
      score = mean(sv_coop, c, ok_coop) - mean(sv_adv, a, ok_adv)
  return jnp.where(ok_cand, score, -jnp.inf)


def _class_balanced_pair(mem: buffers.Memory, key: jax.Array, n_smp: int,
                         size: int) -> tuple[jax.Array, jax.Array,
                                             jax.Array]:
  """Two disjoint class-balanced subsamples: ``n_smp`` random valid
  entries of every class in memory, then ``n_smp`` more of each among the
  rest (the code's ``ClassBalancedRandomSampling.sample`` twice, the
  second excluding the first). Returns ``(idx1, ok1, rank)``: the first's
  slots ``(size,)`` (``size`` >= ``n_smp`` times the classes), whether each
  is a drawn entry, and every slot's random rank in its class (the second
  subsample is ``n_smp <= rank < 2 n_smp``)."""
  u = jax.random.uniform(key, mem.valid.shape)
  group = jnp.where(mem.valid, mem.y, jnp.iinfo(jnp.int32).max)
  rank = buffers.rank_within_groups(group, u)
  first = mem.valid & (rank < n_smp)
  _, idx = jax.lax.top_k(jnp.where(first, u, -1.0), size)
  return idx, first[idx], rank


# A private helper for jaxcl/buffers.py's kind: slots of ``size`` entries
# among those ``sel`` marks (bool ``(K,)``), in slot order.
def _take(sel: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  k = sel.shape[0]
  _, idx = jax.lax.top_k(jnp.where(sel, k - jnp.arange(k), -1), size)
  return idx, sel[idx]


def retrieve(ctx, params, model_state, mem: buffers.Memory, batch: dict,
             key: jax.Array, *, k: int, n_smp_cls: int, num_retrieve: int,
             aser_type: str = "asvm"
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """ASER's retrieval (``_retrieve_by_knn_sv``): the ``num_retrieve``
  candidates of largest score (:func:`aser_scores`).

  Returns ``(idx, ok, cand, score)``: memory slots ``(r,)`` with ``r =
  min(num_retrieve, P)``, ``P = n_smp_cls * num_classes`` the static
  candidate count, and whether each is a drawn candidate; the ``P``
  candidates' slots and scores (``-inf`` for slots not drawn). ``batch``
  holds the incoming rows (``x``, ``y``, ``task``, ``mask``).
  """
  size = n_smp_cls * ctx.info.num_classes
  c_idx, c_ok, rank = _class_balanced_pair(mem, key, n_smp_cls, size)
  e_idx, e_ok = _take(mem.valid & (rank >= n_smp_cls)
                      & (rank < 2 * n_smp_cls), size)
  xs = jnp.concatenate([mem.x[c_idx], mem.x[e_idx],
                        batch["x"].astype(mem.x.dtype)], 0)
  ts = jnp.concatenate([mem.task[c_idx], mem.task[e_idx],
                        batch["task"].astype(jnp.int32)], 0)
  f = extract(ctx, "backbone", params, model_state, xs, ts)
  f_c, f_e, f_b = f[:size], f[size:2 * size], f[2 * size:]
  score = aser_scores(f_c, mem.y[c_idx], c_ok, f_e, mem.y[e_idx], e_ok,
                      f_b, batch["y"].astype(jnp.int32), batch["mask"] > 0,
                      k=k, aser_type=aser_type)
  _, top = jax.lax.top_k(score, min(num_retrieve, size))
  return c_idx[top], c_ok[top], c_idx, score


def aser_update(ctx, params, model_state, mem: buffers.Memory,
                key: jax.Array, rows: dict, experience: jax.Array, *,
                k: int, n_smp_cls: int, after: jax.Array | None = None
                ) -> buffers.Memory:
  """ASER's memory update (``ASER_update.update``): fill free slots in
  order, then value the remaining incoming rows against the memory by
  summed KNN-SV and swap them for lower-valued memory entries (module
  docstring). ``rows``: the incoming ``x``, ``y``, ``task``, ``mask``;
  ``after``: as :func:`jaxcl.buffers.reservoir_add` (a NaN writes
  nothing)."""
  cap = buffers.capacity_of(mem)
  c = ctx.info.num_classes
  size = n_smp_cls * c
  b = rows["y"].shape[0]
  y = rows["y"].astype(jnp.int32)
  task = rows["task"].astype(jnp.int32)
  ok = rows["mask"] > 0
  okn = ok.astype(jnp.int32)
  # 1. Fill: the memory is filled in slot order (nothing is ever removed),
  # so while it has room `seen` is its size and row i goes to seen + i.
  pos = buffers.size(mem) + jnp.cumsum(okn) - okn
  fill = ok & (pos < cap)
  slots = jnp.where(fill, pos, cap)
  if after is not None:
    slots = jnp.where(jnp.isnan(after), cap, slots)
  mem = buffers.put_rows(mem, slots, rows["x"], y, task,
                         jnp.broadcast_to(experience, (b,)))
  rest = ok & ~fill
  # 2. The rows that did not fit (none while the memory has room: then
  # every memory candidate outranks the empty incoming set, nothing moves).
  k_eval, k_cand, k_min = jax.random.split(key, 3)
  e_idx, e_ok, _ = _class_balanced_pair(mem, k_eval, n_smp_cls, size)
  threshold = jax.random.uniform(k_min, (), maxval=1.0 / c)
  share = buffers.counts(mem, c).astype(jnp.float32) / cap
  minority = rest & (share[jnp.clip(y, 0, c - 1)] < threshold)
  in_eval = jnp.zeros((cap,), bool).at[e_idx].set(e_ok)
  m_idx, m_ok = buffers.sample(mem, k_cand, size, where=~in_eval)
  xs = jnp.concatenate([mem.x[e_idx], mem.x[m_idx],
                        rows["x"].astype(mem.x.dtype)], 0)
  ts = jnp.concatenate([mem.task[e_idx], mem.task[m_idx], task], 0)
  f = extract(ctx, "backbone", params, model_state, xs, ts)
  f_e, f_m, f_b = f[:size], f[size:2 * size], f[2 * size:]
  # Evaluation: the memory subsample plus the minority incoming rows;
  # candidates: the random memory entries, then the incoming rows.
  f_eval = jnp.concatenate([f_e, f_b], 0)
  y_eval = jnp.concatenate([mem.y[e_idx], y], 0)
  ok_eval = jnp.concatenate([e_ok, minority], 0)
  f_cand = jnp.concatenate([f_m, f_b], 0)
  y_cand = jnp.concatenate([mem.y[m_idx], y], 0)
  ok_cand = jnp.concatenate([m_ok, rest], 0)
  sv = knn_shapley(_sq_dist(f_eval, f_cand), y_eval, y_cand, ok_cand, k)
  sv = jnp.sum(jnp.where(ok_eval[:, None], sv, 0.0), 0)
  # Rank the valid candidates by value (descending; invalid last); the
  # n_m best stay, n_m the memory candidates' number.
  order = jnp.argsort(jnp.where(ok_cand, -sv, jnp.inf), stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  large = rank < jnp.sum(m_ok)
  evict = m_ok & ~large[:size]
  insert = rest & large[size:]
  # The r-th inserted row takes the r-th evicted slot (as many of each).
  ev_rank = jnp.cumsum(evict) - 1
  ev_slot = jnp.full((size,), cap, jnp.int32).at[
      jnp.where(evict, ev_rank, size)].set(m_idx.astype(jnp.int32),
                                           mode="drop")
  in_rank = jnp.cumsum(insert) - 1
  slots = jnp.where(insert, ev_slot[jnp.clip(in_rank, 0, size - 1)], cap)
  if after is not None:
    slots = jnp.where(jnp.isnan(after), cap, slots)
  mem = buffers.put_rows(mem, slots, rows["x"], y, task,
                         jnp.broadcast_to(experience, (b,)))
  return mem._replace(seen=mem.seen + jnp.sum(okn))


def aser(mem_size: int = 500, batch_size: int = 10, k: int = 5,
         n_smp_cls: int = 2, aser_type: str = "asvm",
         update: str = "aser") -> Strategy:
  """ER with ASER retrieval (and memory update).

  Args:
    mem_size: memory capacity in examples.
    batch_size: replayed examples per step (the code's ``eps_mem_batch``);
      at most ``n_smp_cls * num_classes`` (the candidates) are replayed.
    k: neighbours ``K`` of the KNN Shapley value (the code's default 5;
      its CIFAR-100 command uses 3).
    n_smp_cls: entries drawn per class for each class-balanced subsample
      (the code's ``n_smp_cls``, a float it truncates to an int: default
      2.0; its CIFAR-100 command gives 1.5, i.e. 1).
    aser_type: ``'asvm'`` (ASER_µ, mean cooperative minus mean
      adversarial value; the code's default), ``'asv'`` (ASER: max
      minus min) or ``'neg_sv'`` (minus the summed adversarial value).
    update: ``'aser'`` (KNN-SV memory update, what the paper and the
      code's ASER command use) or ``'reservoir'``.

  Raises:
    ValueError: non-positive sizes, unknown ``aser_type`` / ``update``;
      at ``init``, ``n_smp_cls * num_classes > mem_size``.
  """
  buffers.check_capacity(mem_size, "aser: mem_size")
  for name, v in (("batch_size", batch_size), ("k", k),
                  ("n_smp_cls", n_smp_cls)):
    checks.whole(f"aser: {name}", v, 1)
  if aser_type not in ASER_TYPES:
    raise ValueError(f"aser: unknown aser_type {aser_type!r}; valid: "
                     f"{', '.join(ASER_TYPES)}")
  if update not in UPDATES:
    raise ValueError(f"aser: unknown update {update!r}; valid: "
                     f"{', '.join(UPDATES)}")
  if batch_size > mem_size:
    raise ValueError(f"aser: batch_size={batch_size} is larger than the "
                     f"memory capacity mem_size={mem_size}; use "
                     f"batch_size <= {mem_size}")

  def init(ctx, key, params):
    del params
    size = n_smp_cls * ctx.info.num_classes
    if size > mem_size:
      raise ValueError(
          f"aser: n_smp_cls={n_smp_cls} times the stream's "
          f"{ctx.info.num_classes} classes is {size}, more than "
          f"mem_size={mem_size}; use n_smp_cls <= "
          f"{mem_size // ctx.info.num_classes}")
    memory, variables, k_mem = init_memory(ctx, key, mem_size)
    return ASERState(memory, jnp.zeros((), jnp.int32), k_mem, variables)

  before_experience = mark_experience_start

  def update_grads(ctx, sstate, grads, params, batch, key):
    mem = sstate.memory
    rows = incoming_rows(ctx, batch)
    k_aser, k_rand = jax.random.split(key)
    idx, ok, _, _ = retrieve(ctx, params, sstate.model_state, mem, rows,
                             k_aser, k=k, n_smp_cls=n_smp_cls,
                             num_retrieve=batch_size, aser_type=aser_type)
    # Until the memory has been offered more rows than it holds, the code
    # draws uniformly (ASER_retrieve: n_seen_so_far <= mem_size).
    r_idx, r_ok = buffers.sample(mem, k_rand, batch_size)
    r = idx.shape[0]
    early = mem.seen <= mem_size
    idx = jnp.where(early, r_idx[:r], idx)
    ok = jnp.where(early, r_ok[:r], ok)
    if r < batch_size:  # only the random draw has the rows beyond P
      idx = jnp.concatenate([idx, r_idx[r:]])
      ok = jnp.concatenate([ok, r_ok[r:] & early])
    return add_replay_grads(ctx, sstate.model_state, grads, params, mem,
                            idx, ok)

  def after_step(ctx, sstate, info):
    # after: the gradient read the retrieved rows (update_grads), so the
    # writes follow the reads and XLA updates the memory in place.
    if update == "reservoir":
      return sstate._replace(memory=reservoir_step(ctx, sstate, info,
                                                   after=after_grads(info)))
    key = jax.random.fold_in(sstate.key, sstate.memory.seen)
    mem = aser_update(ctx, info.params_after, sstate.model_state,
                      sstate.memory, key, incoming_rows(ctx, info.batch),
                      sstate.experience, k=k, n_smp_cls=n_smp_cls,
                      after=after_grads(info))
    return sstate._replace(memory=mem)

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=update_grads, after_step=after_step,
                  name="aser")
