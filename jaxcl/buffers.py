"""Fixed-shape replay memories as pure functions over arrays.

A :class:`Memory` is a NamedTuple of arrays with a leading *capacity* axis
(examples, labels, task ids, experience ids, a validity mask) plus one
counter. Its shape never changes, so a memory is an ordinary pytree: it sits
in ``TrainState.strategy``, goes through ``jit`` / ``lax.scan`` / ``vmap``,
checkpoints with orbax and can be sharded along the capacity axis. Every
function here is pure and jit-able; none of them syncs with the host.

Five insertion policies:

* :func:`reservoir_add` (Vitter, 1985, algorithm R): for streams of unknown
  length. The ``n``-th example offered (0-based) is stored with probability
  ``min(1, K / (n + 1))``, in a uniformly chosen slot when the memory is
  full, so after ``N`` examples every one of them is in memory with the same
  probability ``min(1, K / N)``.
* :func:`experience_balanced_add`: after ``i`` experiences each keeps
  ``K // i`` slots (random replay as usually taught, e.g. Avalanche's
  experience-balanced buffer). The new experience's examples are chosen
  uniformly at random; older experiences shrink to the new quota by random
  removal. The ``K mod i`` leftover slots stay empty, so the quota is exactly
  ``K // i`` (or all of an experience's examples if it has fewer).
* :func:`class_balanced_add` (GDumb's greedy sampler, Prabhu et al. 2020):
  add while the memory has room; when it is full, add an example only if its
  class holds fewer than ``K / |Y|`` slots (``|Y|`` the classes seen so
  far), evicting a random example of the currently largest class.
* :func:`random_class_balanced_add` (CoPE's, De Lange & Tuytelaars 2021):
  every class keeps ``quota`` entries, a uniformly random subset of the rows
  of it offered so far (each row draws a priority; the largest stay).
  :func:`class_balanced_sample` draws from it class-uniformly.
  :func:`class_balanced_experience_add` does the same with a whole
  experience at once (Avalanche's ``ClassBalancedBuffer``).

* :func:`loss_aware_add` (LARS / LABRS, Buzzega et al. 2020): reservoir
  sampling decides whether a row is stored, as in algorithm R, but the slot
  it overwrites is drawn with a probability that grows with the entries'
  score (``-loss``: well-learned entries go first) and, for LABRS, with the
  size of their class (:func:`lars_probs`, :func:`labrs_probs`). ABS
  (Millunzi et al. 2024, :func:`abs_probs`) draws it from the losses in
  opposite directions for past and current entries.

:func:`sample` draws a fixed number of valid entries without replacement
(invalid draws come back with mask 0, e.g. while the memory is empty).

References:
  Vitter, `Random sampling with a reservoir
  <https://doi.org/10.1145/3147.3165>`_, 1985.
  Chaudhry et al., `On tiny episodic memories in continual learning
  <https://arxiv.org/abs/1902.10486>`_, 2019.
  Prabhu et al., `GDumb: a simple approach that questions our progress in
  continual learning <https://doi.org/10.1007/978-3-030-58536-5_31>`_, 2020.
  Buzzega et al., `Rethinking experience replay: a bag of tricks for
  continual learning <https://arxiv.org/abs/2010.05595>`_, ICPR 2020.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

__all__ = ["Memory", "init", "size", "counts", "reservoir_add",
           "reservoir_slots", "put_rows", "replay_size",
           "experience_balanced_add", "class_balanced_add",
           "random_class_balanced_add", "class_balanced_experience_add",
           "class_balanced_sample", "sample",
           "free_slots_for",
           "gather", "check_capacity", "rank_within_groups",
           "lars_probs", "labrs_probs", "abs_probs", "loss_aware_add"]

_BIG = jnp.iinfo(jnp.int32).max


class Memory(NamedTuple):
  """A fixed-capacity memory of examples (or of latent activations).

  Attributes:
    x: ``(K, *example_shape)`` stored examples (float32 by default).
    y: int32 ``(K,)`` labels.
    task: int32 ``(K,)`` task ids.
    experience: int32 ``(K,)`` id of the experience an entry came from.
    valid: bool ``(K,)``: the slot holds an example.
    seen: int32 scalar: examples offered so far (the reservoir's ``n``).
  """
  x: jax.Array
  y: jax.Array
  task: jax.Array
  experience: jax.Array
  valid: jax.Array
  seen: jax.Array


def replay_size(name: str, batch_size: int, mem_size: int,
                stream_batch: int) -> int:
  """Rows a strategy replays per step: ``batch_size``, or the stream's
  batch size when it is 0 (host side, at ``init`` and when tracing).

  Raises:
    ValueError: naming ``name``, when that is more than ``mem_size``.
  """
  r = batch_size or stream_batch
  if r > mem_size:
    raise ValueError(
        f"{name}: batch_size={r} is larger than the memory capacity "
        f"mem_size={mem_size}; use batch_size <= {mem_size}")
  return r


def check_capacity(capacity: int, name: str = "mem_size") -> int:
  """Validates a capacity (host side, before tracing)."""
  if isinstance(capacity, bool) or not isinstance(capacity, int) or \
      capacity < 1:
    raise ValueError(f"{name} must be a positive int, got {capacity!r}")
  return capacity


def init(capacity: int, example_shape: Sequence[int],
         dtype=jnp.float32) -> Memory:
  """An empty memory of ``capacity`` slots for examples of ``example_shape``."""
  check_capacity(capacity, "capacity")
  k = capacity
  return Memory(
      x=jnp.zeros((k,) + tuple(example_shape), dtype),
      y=jnp.zeros((k,), jnp.int32),
      task=jnp.zeros((k,), jnp.int32),
      experience=jnp.zeros((k,), jnp.int32),
      valid=jnp.zeros((k,), bool),
      seen=jnp.zeros((), jnp.int32))


def capacity_of(mem: Memory) -> int:
  return mem.valid.shape[0]


def size(mem: Memory) -> jax.Array:
  """Number of valid entries (int32 scalar)."""
  return jnp.sum(mem.valid, dtype=jnp.int32)


def counts(mem: Memory, num: int, by: str = "y") -> jax.Array:
  """Valid entries per label (``by='y'``) or per experience id: ``(num,)``."""
  ids = mem.y if by == "y" else mem.experience
  return jnp.zeros((num,), jnp.int32).at[ids].add(
      mem.valid.astype(jnp.int32), mode="drop")


def _put(mem: Memory, slot, x, y, task, experience) -> Memory:
  """Writes one example at ``slot`` (``slot == K`` writes nothing)."""
  k = capacity_of(mem)
  write = slot < k
  s = jnp.minimum(slot, k - 1)
  sel = lambda new, old: jnp.where(write, new, old)
  return mem._replace(
      x=mem.x.at[s].set(sel(x.astype(mem.x.dtype), mem.x[s])),
      y=mem.y.at[s].set(sel(y, mem.y[s])),
      task=mem.task.at[s].set(sel(task, mem.task[s])),
      experience=mem.experience.at[s].set(sel(experience, mem.experience[s])),
      valid=mem.valid.at[s].set(sel(True, mem.valid[s])))


def _as_rows(n, y, task, experience, mask):
  i32 = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.int32), (n,))
  ok = (jnp.ones((n,), bool) if mask is None else
        jnp.broadcast_to(jnp.asarray(mask) > 0, (n,)))
  return i32(y), i32(task), i32(experience), ok


def reservoir_slots(mem: Memory, key: jax.Array, mask: jax.Array,
                    after: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """Where algorithm R puts each offered row: ``(slots, seen)``.

  ``slots`` is int32 ``(B,)``, the capacity ``K`` for a row that is not
  stored (not offered, not drawn, or overwritten by a later row of the same
  batch); ``seen`` is the counter after the batch. :func:`reservoir_add`
  writes the rows there; a strategy that keeps more per entry (DER's
  logits) writes its own arrays at the same slots. ``mask`` and ``after``
  are as in :func:`reservoir_add`.
  """
  b = mask.shape[0]
  k = capacity_of(mem)
  ok = mask > 0
  keys = jax.random.split(key, b)
  # The only sequential part of algorithm R is the counter: row i sees
  # n_i = seen + (rows offered before it), an exclusive cumulative sum.
  # Each row's draw j_i ~ U{0..n_i} is then independent, so all are drawn
  # at once (vmapped over the per-row keys: the same numbers a scan over
  # rows draws). A lax.scan here ran as an XLA while loop of b iterations
  # of small kernels: 20 % of a batch-10 Replay step on a CPU. (Scanning
  # with the memory itself as the carry, before that, copied the whole
  # buffer in and out of the loop at every training step.)
  okn = ok.astype(jnp.int32)
  n = mem.seen + jnp.cumsum(okn) - okn
  j = jax.vmap(lambda ki, ni: jax.random.randint(
      ki, (), 0, jnp.maximum(ni, 0) + 1))(keys, n)
  slots = jnp.where(ok, jnp.where(n < k, n, jnp.where(j < k, j, k)), k)
  if after is not None:
    slots = jnp.where(jnp.isnan(after), k, slots)
  # Offered one by one, a later row replaces an earlier one in the same
  # slot: drop the earlier writes so the scatter has no duplicate targets.
  order = jnp.arange(b)
  overwritten = jnp.any((slots[None, :] == slots[:, None]) &
                        (order[None, :] > order[:, None]), axis=1)
  return jnp.where(overwritten, k, slots), mem.seen + jnp.sum(okn)


def reservoir_add(mem: Memory, key: jax.Array, x: jax.Array, y: jax.Array,
                  task: jax.Array, experience: jax.Array | int,
                  mask: jax.Array | None = None,
                  after: jax.Array | None = None) -> Memory:
  """Offers a batch of examples to a reservoir memory (algorithm R).

  .. math::
     n \\leftarrow \\text{seen};\\quad
     \\text{slot} = \\begin{cases} n & n < K \\\\
       j \\sim U\\{0..n\\} & \\text{otherwise (kept if } j < K)\\end{cases}

  Rows with ``mask == 0`` (padding, empty replay slots) are not offered and
  do not advance the counter. The result is the same as offering the
  examples one by one (:func:`reservoir_slots`).

  Args:
    mem: the memory.
    key: PRNG key.
    x: ``(B, *example_shape)``; y, task: ``(B,)`` ints; experience: an int
      or ``(B,)``; mask: ``(B,)`` (None: all offered).
    after: a scalar computed from what the step read from this memory
      (e.g. the loss on replayed rows), or None. The writes are made to
      depend on it, which orders them after those reads: without such a
      data dependence XLA cannot update the memory in place and copies
      it twice per step (measured: XLA:CPU, a batch-10 Replay step). A NaN
      there (a diverged step, which the run reports) writes nothing; its
      rows still count as seen.
  """
  b = x.shape[0]
  y, task, experience, ok = _as_rows(b, y, task, experience, mask)
  slots, seen = reservoir_slots(mem, key, ok, after)
  return put_rows(mem, slots, x, y, task, experience)._replace(seen=seen)


def put_rows(mem: Memory, slots: jax.Array, x: jax.Array, y: jax.Array,
             task: jax.Array, experience: jax.Array) -> Memory:
  """Writes row ``i`` at ``slots[i]`` and marks it valid (a slot equal to
  the capacity writes nothing). ``slots`` must not repeat a target."""
  put = lambda arr, new: arr.at[slots].set(new.astype(arr.dtype),
                                           mode="drop")
  return mem._replace(
      x=put(mem.x, x), y=put(mem.y, y), task=put(mem.task, task),
      experience=put(mem.experience, experience),
      valid=mem.valid.at[slots].set(True, mode="drop"))


def free_slots_for(keep: jax.Array, take: jax.Array) -> jax.Array:
  """Slots for the rows ``take`` marks (bool ``(B,)``) when the memory
  keeps the slots ``keep`` marks (bool ``(K,)``): the ``r``-th taken row
  goes to the ``r``-th slot not kept, in slot order; a row not taken, or
  one beyond the free slots, gets ``K`` (nothing written by
  :func:`put_rows`)."""
  free = jnp.cumsum(~keep)
  r = jnp.cumsum(take)
  return jnp.where(take, jnp.searchsorted(free, r, method="compare_all"),
                   keep.shape[0])


def rank_within_groups(group: jax.Array, score: jax.Array) -> jax.Array:
  """For each entry, its rank by ``score`` among entries of its group."""
  n = group.shape[0]
  order = jnp.lexsort((score, group))  # by group, then score
  g_sorted = group[order]
  start = jnp.searchsorted(g_sorted, g_sorted, side="left")
  rank_sorted = jnp.arange(n) - start
  return jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted.astype(
      jnp.int32))


def experience_balanced_add(mem: Memory, key: jax.Array, x: jax.Array,
                            y: jax.Array, task: jax.Array,
                            experience: jax.Array | int,
                            mask: jax.Array | None = None) -> Memory:
  """Adds a whole experience to an experience-balanced memory.

  With ``i`` distinct experiences in memory after the call (the new one
  included), each keeps exactly ``min(n_e, K // i)`` entries, ``n_e`` its
  number of examples: the new experience's entries are a uniform random
  subset of its (unmasked) examples, and older experiences shrink to the
  quota by uniform random removal. Entries already tagged with the new
  experience id are replaced.

  Args:
    mem: the memory.
    key: PRNG key.
    x: ``(N, *example_shape)`` the experience's examples (may be padded).
    y, task: ``(N,)``; experience: the experience id (int32 scalar).
    mask: ``(N,)`` valid rows (None: all).
  """
  n = x.shape[0]
  k = capacity_of(mem)
  y, task, _, ok = _as_rows(n, y, task, 0, mask)
  experience = jnp.asarray(experience, jnp.int32)
  k_old, k_new = jax.random.split(key)
  old = mem.valid & (mem.experience != experience)
  # Distinct older experiences (+1 for the new one) give the quota.
  g = jnp.where(old, mem.experience, _BIG)
  gs = jnp.sort(g)
  firsts = (gs != jnp.concatenate([jnp.full((1,), -1, gs.dtype), gs[:-1]]))
  num_groups = jnp.sum(firsts & (gs != _BIG), dtype=jnp.int32) + 1
  quota = k // num_groups
  # Older experiences: keep a uniform random `quota` of each.
  rank = rank_within_groups(g, jax.random.uniform(k_old, (k,)))
  keep = old & (rank < quota)
  # New experience: a uniform random `quota` of its valid rows, ranked by a
  # random score; at most min(K, N) can be chosen (a static bound).
  m = min(k, n)
  score = jnp.where(ok, jax.random.uniform(k_new, (n,)), 2.0)
  chosen_rows = jnp.argsort(score)[:m]
  r = jnp.arange(m)
  chosen = (r < quota) & ok[chosen_rows]
  # Free slots first (stable), the r-th chosen row goes to the r-th one;
  # there are at least K - (i - 1) * quota >= quota free slots.
  free_slots = jnp.argsort(keep, stable=True)
  slots = jnp.where(chosen, free_slots[r], k)
  put = lambda arr, new: arr.at[slots].set(new[chosen_rows].astype(arr.dtype),
                                           mode="drop")
  return Memory(
      x=put(mem.x, x), y=put(mem.y, y), task=put(mem.task, task),
      experience=put(mem.experience, jnp.broadcast_to(experience, (n,))),
      valid=keep.at[slots].set(True, mode="drop"),
      seen=mem.seen + jnp.sum(ok, dtype=jnp.int32))


def class_balanced_add(mem: Memory, key: jax.Array, x: jax.Array,
                       y: jax.Array, task: jax.Array,
                       experience: jax.Array | int,
                       mask: jax.Array | None = None, *,
                       num_classes: int) -> Memory:
  """Offers examples to GDumb's greedy class-balanced memory, one by one.

  .. math::
     \\text{add } (x, y) \\iff |M| < K \\;\\lor\\; |M_y| < K / |Y|,

  where ``|Y|`` counts the classes seen so far (``y`` included); when the
  memory is full a uniformly chosen entry of the largest class is evicted
  first. Afterwards every seen class ``c`` holds at least
  ``min(n_c, K // |Y|)`` entries (``n_c`` its examples offered).

  Args:
    num_classes: size of the label space (static).

  Raises:
    ValueError: if the capacity is smaller than ``num_classes`` (some class
      could then never keep a slot).
  """
  b = x.shape[0]
  k = capacity_of(mem)
  if k < num_classes:
    raise ValueError(f"a class-balanced memory needs capacity >= the number "
                     f"of classes ({num_classes}); got capacity {k}")
  y, task, experience, ok = _as_rows(b, y, task, experience, mask)
  keys = jax.random.split(key, b)

  def body(mem, row):
    xi, yi, ti, ei, oki, ki = row
    cnt = counts(mem, num_classes, by="y")
    n_seen_classes = jnp.sum((cnt > 0) | (jnp.arange(num_classes) == yi),
                             dtype=jnp.int32)
    full = jnp.sum(mem.valid) >= k
    add = oki & (~full | (cnt[yi] * n_seen_classes < k))
    largest = jnp.argmax(cnt)
    u = jax.random.uniform(ki, (k,))
    victim = jnp.argmax(jnp.where(mem.valid & (mem.y == largest), u, -1.0))
    first_free = jnp.argmin(mem.valid)
    slot = jnp.where(full, victim, first_free)
    mem = _put(mem, jnp.where(add, slot, k), xi, yi, ti, ei)
    return mem._replace(seen=mem.seen + oki.astype(jnp.int32)), None

  mem, _ = jax.lax.scan(body, mem, (x, y, task, experience, ok, keys))
  return mem


def random_class_balanced_add(mem: Memory, priority: jax.Array,
                              key: jax.Array, x: jax.Array, y: jax.Array,
                              task: jax.Array, experience: jax.Array,
                              ok: jax.Array, quota: jax.Array, *,
                              num_classes: int,
                              after: jax.Array | None = None
                              ) -> tuple[Memory, jax.Array]:
  """Offers rows to a class-balanced memory of uniformly random members
  (CoPE's, De Lange & Tuytelaars 2021): ``(memory, priority)``.

  Each offered row draws a priority ``u ~ U[0, 1)``; then every class keeps
  the ``quota`` entries of largest priority among its stored entries and
  its offered rows. By induction (the quota never grows) a class holds
  ``min(n_c, quota)`` entries, a uniformly random subset of its ``n_c``
  rows offered so far. Kept entries stay in their slots; new ones take
  freed or empty slots.

  Args:
    mem, priority: the memory and its entries' priorities.
    key: PRNG key.
    x, y, task: the offered rows; experience: int32 scalar, their tag.
    ok: bool ``(b,)``: rows offered (padding is not).
    quota: int32 scalar, entries per class (``K // classes seen``).
    num_classes: the number of classes (static).
    after: a scalar the writes must follow (the step's loss: see
      :func:`reservoir_add`; the memory is then updated in
      place); NaN there keeps the memory as it was.
  """
  k, b = priority.shape[0], y.shape[0]
  u = jax.random.uniform(key, (b,))
  # Candidates: the K slots, then the b offered rows.
  cand_p = jnp.concatenate([priority, u])
  cand_y = jnp.concatenate([mem.y, y])
  cand_ok = jnp.concatenate([mem.valid, ok])
  ids = jnp.arange(k + b)
  per_class = lambda w: jnp.zeros((num_classes,), jnp.int32).at[cand_y].add(
      w.astype(jnp.int32))
  excess = jnp.maximum(per_class(cand_ok) - quota, 0)  # entries to drop
  # No sort (XLA's CPU sort of ~2k keys cost 0.8 ms a step, more than the
  # network's step). Most steps, a class over its quota is one of the
  # batch's and drops at most b: its b lowest-priority candidates, one
  # top_k per offered row (rows of one class drop the same ones).
  same = cand_ok[None, :] & (cand_y[None, :] == y[:, None])      # (b, K+b)
  low_p, low = jax.lax.top_k(jnp.where(same, -cand_p, -jnp.inf), b)
  hit = ((jnp.arange(b)[None, :] < excess[y][:, None]) & ok[:, None]
         & (low_p > -jnp.inf))
  alive = cand_ok & ~jnp.zeros((k + b,), bool).at[low.ravel()].max(
      hit.ravel())
  # The rest: when a new class shrinks the quota, every class drops its
  # lowest entries one by one (a few hundred passes, once per new class).
  def drop_lowest(carry):
    alive, left = carry
    p = jnp.where(alive, cand_p, jnp.inf)
    low = alive & (p == jnp.full((num_classes,), jnp.inf).at[cand_y].min(
        p)[cand_y])
    first = jnp.full((num_classes,), k + b).at[cand_y].min(
        jnp.where(low, ids, k + b))
    out = (ids == first[cand_y]) & (left[cand_y] > 0)
    return alive & ~out, left - per_class(out)

  alive, _ = jax.lax.while_loop(
      lambda carry: jnp.any(carry[1] > 0), drop_lowest,
      (alive, excess - per_class(cand_ok & ~alive)))
  keep_old, take = alive[:k], alive[k:]
  # The r-th new row takes the r-th slot not kept; the quota leaves
  # enough: kept + taken <= K.
  slots = free_slots_for(keep_old, take)
  if after is not None:
    bad = jnp.isnan(after)
    slots = jnp.where(bad, k, slots)
    keep_old = jnp.where(bad, mem.valid, keep_old)
  mem = put_rows(mem._replace(valid=keep_old), slots, x, y, task,
                         jnp.broadcast_to(experience, (b,)))
  mem = mem._replace(seen=mem.seen + jnp.sum(ok, dtype=jnp.int32))
  return mem, priority.at[slots].set(u, mode="drop")


def class_balanced_experience_add(mem: Memory, priority: jax.Array,
                                  key: jax.Array, x: jax.Array, y: jax.Array,
                                  task: jax.Array,
                                  experience: jax.Array | int,
                                  mask: jax.Array | None = None, *,
                                  num_classes: int
                                  ) -> tuple[Memory, jax.Array]:
  """Adds a whole experience to a class-balanced memory of uniformly random
  members (Avalanche's ``ClassBalancedBuffer``): ``(memory, priority)``.

  With ``C`` classes in memory after the call (the experience's included),
  each keeps ``min(n_c, K // C)`` entries, ``n_c`` its rows offered so far:
  every offered row draws a priority ``u ~ U[0, 1)`` and each class keeps
  its entries and offered rows of largest priority, so a class's entries
  are a uniformly random subset of all its rows offered, a returning
  class's too. Kept entries stay in their slots; new ones take freed or
  empty slots. The ``K mod C`` leftover slots stay empty (Avalanche gives
  them to the first classes).

  Args:
    mem, priority: the memory and its entries' priorities.
    key: PRNG key.
    x: ``(N, *example_shape)`` the experience's rows (may be padded).
    y, task: ``(N,)``; experience: the experience id (int32 scalar).
    mask: ``(N,)`` valid rows (None: all).
    num_classes: the number of classes (static).
  """
  n, k = x.shape[0], capacity_of(mem)
  y, task, _, ok = _as_rows(n, y, task, 0, mask)
  u = jax.random.uniform(key, (n,))
  cand_ok = jnp.concatenate([mem.valid, ok])
  cand_y = jnp.concatenate([mem.y, y])
  present = jnp.zeros((num_classes,), bool).at[cand_y].max(cand_ok)
  quota = k // jnp.maximum(jnp.sum(present, dtype=jnp.int32), 1)
  group = jnp.where(cand_ok, cand_y, num_classes)
  rank = rank_within_groups(group, -jnp.concatenate([priority, u]))
  alive = cand_ok & (rank < quota)
  keep_old, take = alive[:k], alive[k:]
  slots = free_slots_for(keep_old, take)
  mem = put_rows(mem._replace(valid=keep_old), slots, x, y, task,
                 jnp.broadcast_to(jnp.asarray(experience, jnp.int32), (n,)))
  mem = mem._replace(seen=mem.seen + jnp.sum(ok, dtype=jnp.int32))
  return mem, priority.at[slots].set(u, mode="drop")


def class_balanced_sample(mem: Memory, key: jax.Array, n: int,
                          num_classes: int) -> tuple[jax.Array, jax.Array]:
  """``n`` valid slots drawn without replacement, each with weight
  ``1 / n_c`` (``n_c``: entries of its class), so a draw picks a class
  uniformly, then one of its entries (Efraimidis & Spirakis: the ``n``
  largest ``log(u) / w``). Returns ``(idx, ok)`` as
  :func:`sample`."""
  per_class = counts(mem, num_classes).astype(jnp.float32)
  u = jax.random.uniform(key, mem.valid.shape, minval=1e-12)
  score = jnp.where(mem.valid, jnp.log(u) * per_class[mem.y], -jnp.inf)
  _, idx = jax.lax.top_k(score, n)
  return idx, mem.valid[idx]


def sample(mem: Memory, key: jax.Array, n: int,
           where: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Draws ``n`` valid slots uniformly without replacement.

  ``where`` (bool ``(capacity,)``, optional) restricts the draw to the
  valid slots where it is True (e.g. entries of past experiences only).
  Returns ``(idx, ok)``: slot indices ``(n,)`` and whether each is an
  eligible entry (False when fewer than ``n`` entries are eligible).
  """
  k = capacity_of(mem)
  if n > k:
    raise ValueError(f"cannot sample {n} entries from a memory of capacity "
                     f"{k}; use at most {k}")
  eligible = mem.valid if where is None else mem.valid & where
  score = jnp.where(eligible, jax.random.uniform(key, (k,)), -1.0)
  _, idx = jax.lax.top_k(score, n)
  return idx, eligible[idx]


def gather(mem: Memory, idx: jax.Array, ok: jax.Array) -> dict[str, jax.Array]:
  """Entries ``idx`` as a batch dict (``mask`` 0 where ``ok`` is False)."""
  return {"x": mem.x[idx], "y": mem.y[idx], "task": mem.task[idx],
          "mask": ok.astype(jnp.float32)}


# Loss-aware reservoirs (Buzzega et al. 2020, "Rethinking experience replay:
# a bag of tricks for continual learning"; Mammoth's utils/buffer.py).

def lars_probs(scores: jax.Array) -> jax.Array:
  """LARS's replacement probability of each slot of a full memory.

  .. math::
     p_i = \\frac{s_i - \\min_j s_j}{\\sum_k (s_k - \\min_j s_j)},

  uniform when every score is equal. ``scores`` (``(K,)``) are ``-loss``, so
  the entry with the highest loss is never replaced. This is Mammoth's
  min-max normalisation followed by a division by the sum: the ``1e-9`` of
  its min-max denominator cancels, and the one it adds to the sum (a
  relative ``1e-9``) is left out.
  """
  return _min_shifted_probs(scores.astype(jnp.float32))


def labrs_probs(scores: jax.Array, y: jax.Array,
                num_classes: int) -> jax.Array:
  """LABRS's replacement probability of each slot of a full memory.

  With ``s`` the scores (``-loss``) and ``n_i`` the number of entries of
  slot ``i``'s class, Mammoth's ``LossAwareBalancedSampling.merge_scores``:

  .. math::
     q_i = \\tfrac12 \\frac{s_i}{\\overline{|s|}\\,\\overline{|n|}}
           + \\tfrac12 n_i, \\qquad
     p_i = \\frac{q_i - \\min_j q_j}{\\sum_k (q_k - \\min_j q_j)}

  (uniform when every ``q_i`` is equal): entries of large classes and with
  low loss go first. The scale divides the scores by the *product* of the
  two means, as in the code. When every score is 0 (Mammoth: 0 / 0) the
  score term is 0.
  """
  s = scores.astype(jnp.float32)
  n = jnp.zeros((num_classes,), jnp.float32).at[y].add(1.0)[y]
  scale = jnp.mean(jnp.abs(s)) * jnp.mean(n)
  q = 0.5 * jnp.where(scale > 0, s / jnp.where(scale > 0, scale, 1.0),
                      0.0) + 0.5 * n
  return _min_shifted_probs(q)


def _min_shifted_probs(q: jax.Array) -> jax.Array:
  v = q - jnp.min(q)
  total = jnp.sum(v)
  return jnp.where(total > 0, v / jnp.where(total > 0, total, 1.0),
                   1.0 / q.shape[0])


def _masked_min_shifted_probs(q: jax.Array, m: jax.Array) -> jax.Array:
  """:func:`_min_shifted_probs` over the entries where ``m`` holds (0
  elsewhere; all 0 when none does)."""
  v = jnp.where(m, q - jnp.min(jnp.where(m, q, jnp.inf)), 0.0)
  total = jnp.sum(v)
  uniform = m / jnp.maximum(jnp.sum(m), 1)
  return jnp.where(total > 0, v / jnp.where(total > 0, total, 1.0), uniform)


def abs_probs(losses: jax.Array, past: jax.Array) -> jax.Array:
  """ABS's replacement probability of each slot of a full memory
  (asymmetric balanced sampling, Millunzi et al. 2024; Mammoth's
  ``ABSSampling``).

  The slots split into past entries ``P`` (``past``) and current ones
  ``C``; a group is picked in proportion to its size, then a slot within
  it, by loss ``ℓ`` in opposite directions:

  .. math::
     p_i = \\begin{cases}
       \\frac{|P|}{K} \\frac{\\max_P \\ell - \\ell_i}
                           {\\sum_{j \\in P} (\\max_P \\ell - \\ell_j)}
         & i \\in P \\
       \\frac{|C|}{K} \\frac{\\ell_i - \\min_C \\ell}
                           {\\sum_{j \\in C} (\\ell_j - \\min_C \\ell)}
         & i \\in C \\end{cases}

  (uniform within a group whose losses are all equal): current entries
  with a high loss (likely mislabelled) go first, past entries with a low
  loss (well remembered) go first. ``losses`` are losses, not LARS's
  ``-loss`` scores. Mammoth min-max normalises each group with a ``1e-9``
  in the denominator, which gives these ratios up to ``1e-9`` terms (left
  out).
  """
  s = losses.astype(jnp.float32)
  k = s.shape[0]
  n_past = jnp.sum(past).astype(jnp.float32)
  p_past = _masked_min_shifted_probs(-s, past)
  p_cur = _masked_min_shifted_probs(s, ~past)
  return jnp.where(past, n_past / k * p_past, (k - n_past) / k * p_cur)


def loss_aware_add(mem: Memory, scores: jax.Array, key: jax.Array,
                   x: jax.Array, y: jax.Array, task: jax.Array,
                   experience: jax.Array | int, new_scores: jax.Array,
                   mask: jax.Array | None = None, *, balanced: bool,
                   num_classes: int, after: jax.Array | None = None,
                   past: jax.Array | None = None
                   ) -> tuple[Memory, jax.Array]:
  """Offers rows to a LARS (``balanced=False``), LABRS or ABS (``past``
  given) memory: ``(memory, scores)``.

  Rows are offered one by one as in Mammoth's ``Buffer.add_data``: the
  ``n``-th row offered (0-based) takes slot ``n`` while the memory has
  room; after that it is stored when ``j ~ U{0..n-1}`` is below ``K``
  (Mammoth's ``randint(0, n)``: probability ``K / n``, where algorithm R's
  is ``K / (n + 1)``), in a slot drawn from :func:`lars_probs` /
  :func:`labrs_probs` of the scores and labels as they are at that row
  (earlier rows of the batch included). A stored row's score is
  ``new_scores`` (``-loss``).

  Args:
    mem, scores: the memory and its entries' scores ``(K,)``.
    key: PRNG key.
    x, y, task, experience, mask: as :func:`reservoir_add`.
    new_scores: ``(B,)`` the rows' scores.
    balanced: LABRS (class counts in the scores) rather than LARS.
    num_classes: the number of classes (static).
    after: as :func:`reservoir_add` (NaN: nothing written, rows counted).
    past: bool ``(K,)``, or None: the slots holding past entries, for
      ABS's probabilities (:func:`abs_probs`, whose scores are losses);
      a row written here is a current entry for the rows after it.
      ``balanced`` must then be False.
  """
  if past is not None and balanced:
    raise ValueError("loss_aware_add: give past (ABS) or balanced=True "
                     "(LABRS), not both")
  b = x.shape[0]
  k = capacity_of(mem)
  y, task, experience, ok = _as_rows(b, y, task, experience, mask)
  new_scores = new_scores.astype(jnp.float32)
  # Only the decisions are sequential (each reads the labels and scores the
  # earlier rows wrote): scan over them with the small arrays as the carry,
  # then write the examples once (carrying ``mem.x`` would copy it).
  def row(carry, r):
    labels, sc, old, n = carry
    oki, yi, si, ki = r
    k_in, k_slot = jax.random.split(ki)
    if past is not None:
      p = abs_probs(sc, old)
    elif balanced:
      p = labrs_probs(sc, labels, num_classes)
    else:
      p = lars_probs(sc)
    victim = jax.random.choice(k_slot, k, p=p)
    j = jax.random.randint(k_in, (), 0, jnp.maximum(n, 1))
    slot = jnp.where(n < k, n, jnp.where(j < k, victim, k))
    slot = jnp.where(oki, slot, k)
    labels = labels.at[slot].set(yi, mode="drop")
    sc = sc.at[slot].set(si, mode="drop")
    old = old.at[slot].set(False, mode="drop")
    return (labels, sc, old, n + oki.astype(jnp.int32)), slot

  old0 = (jnp.zeros((k,), bool) if past is None else
          jnp.asarray(past, bool))
  (_, new_sc, _, seen), slots = jax.lax.scan(
      row, (mem.y, scores.astype(jnp.float32), old0, mem.seen),
      (ok, y, new_scores, jax.random.split(key, b)))
  if after is not None:
    bad = jnp.isnan(after)
    slots = jnp.where(bad, k, slots)
    new_sc = jnp.where(bad, scores.astype(jnp.float32), new_sc)
  # A later row replacing an earlier one in the same slot wins.
  order = jnp.arange(b)
  overwritten = jnp.any((slots[None, :] == slots[:, None]) &
                        (order[None, :] > order[:, None]), axis=1)
  slots = jnp.where(overwritten, k, slots)
  mem = put_rows(mem, slots, x, y, task, experience)
  return mem._replace(seen=seen), new_sc
