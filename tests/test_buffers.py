"""Replay memories: property tests (hypothesis) and a statistical test.

Examples carry their id in ``x[:, 0]`` so that a test can tell exactly which
examples a memory holds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxcl import buffers

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Static shapes (one compilation per function): capacity 16, batches of 8.
K, B, MAXN = 16, 8, 64


def _ids(mem):
  valid = np.asarray(mem.valid)
  return np.asarray(mem.x[:, 0])[valid].astype(int), valid


reservoir = jax.jit(buffers.reservoir_add)
balanced = jax.jit(buffers.experience_balanced_add)
greedy = jax.jit(functools.partial(buffers.class_balanced_add,
                                   num_classes=5))


@SETTINGS
@given(n_batches=st.integers(1, 8), seed=st.integers(0, 2**16),
       drop=st.lists(st.booleans(), min_size=B * 8, max_size=B * 8))
def test_reservoir_capacity_no_duplicates_counter(n_batches, seed, drop):
  mem = buffers.init(K, (2,))
  key = jax.random.PRNGKey(seed)
  offered = []
  for b in range(n_batches):
    ids = np.arange(b * B, (b + 1) * B)
    mask = ~np.asarray(drop[b * B:(b + 1) * B])
    x = np.stack([ids, np.zeros(B)], 1).astype(np.float32)
    mem = reservoir(mem, jax.random.fold_in(key, b), x, ids % 5,
                    (ids % 3).astype(np.int32), b, mask.astype(np.float32))
    offered += list(ids[mask])
  ids, valid = _ids(mem)
  assert valid.sum() <= K
  assert valid.sum() == min(len(offered), K)
  assert int(mem.seen) == len(offered)
  assert len(set(ids)) == len(ids)                 # no duplicates
  assert set(ids) <= set(offered)                  # masked rows never stored
  # Labels, task ids and experience ids travel with their example.
  np.testing.assert_array_equal(np.asarray(mem.y)[valid], ids % 5)
  np.testing.assert_array_equal(np.asarray(mem.task)[valid], ids % 3)
  np.testing.assert_array_equal(np.asarray(mem.experience)[valid], ids // B)


@SETTINGS
@given(sizes=st.lists(st.integers(1, MAXN), min_size=1, max_size=6),
       capacity_choice=st.sampled_from([16, 17, 30]),
       seed=st.integers(0, 2**16))
def test_experience_balanced_quotas_exact(sizes, capacity_choice, seed):
  k = capacity_choice
  mem = buffers.init(k, (2,))
  add = balanced if k == K else jax.jit(buffers.experience_balanced_add)
  # Experience ids 1, 3, 5, ...: the quota counts the distinct experiences
  # in memory, not the id (a memory fed by a strategy that skips ids, or
  # numbers them from 1, must not read i from the id).
  eid = lambda i: 2 * i + 1
  for i, n in enumerate(sizes):
    ids = 1000 * eid(i) + np.arange(MAXN)
    x = np.stack([ids, np.zeros(MAXN)], 1).astype(np.float32)
    mask = (np.arange(MAXN) < n).astype(np.float32)   # padded experience
    mem = add(mem, jax.random.PRNGKey(seed + i), x, ids % 7,
              np.full(MAXN, eid(i), np.int32), eid(i), mask)
    quota = k // (i + 1)
    ids_in, valid = _ids(mem)
    assert valid.sum() <= k
    assert len(set(ids_in)) == len(ids_in)
    exp_of = np.asarray(mem.experience)[valid]
    np.testing.assert_array_equal(exp_of, ids_in // 1000)
    for j in range(i + 1):
      # exactly min(n_j, mem_size // i) per experience
      assert (exp_of == eid(j)).sum() == min(sizes[j], quota), (i, j)
      assert np.all(ids_in[exp_of == eid(j)] % 1000 < sizes[j])  # no padding
    np.testing.assert_array_equal(np.asarray(mem.task)[valid], exp_of)


def test_experience_balanced_old_entries_are_a_subset():
  """Shrinking only removes: survivors of experience 0 were stored before."""
  mem = buffers.init(K, (2,))
  x0 = np.stack([np.arange(MAXN), np.zeros(MAXN)], 1).astype(np.float32)
  mem = balanced(mem, jax.random.PRNGKey(0), x0, np.zeros(MAXN, np.int32),
                 np.zeros(MAXN, np.int32), 0, None)
  before = set(_ids(mem)[0])
  mem = balanced(mem, jax.random.PRNGKey(1), x0 + 1000,
                 np.zeros(MAXN, np.int32), np.zeros(MAXN, np.int32), 1, None)
  after = _ids(mem)[0]
  assert set(after[after < 1000]) < before and len(after[after < 1000]) == 8
  # Re-adding experience 1 (new rows, same id) replaces its entries: still
  # two experiences of K // 2, none of experience 1's old rows left (they
  # are not a third experience).
  mem = balanced(mem, jax.random.PRNGKey(2), x0 + 2000,
                 np.zeros(MAXN, np.int32), np.zeros(MAXN, np.int32), 1, None)
  again = _ids(mem)[0]
  np.testing.assert_array_equal(np.sort(again[again < 1000]),
                                np.sort(after[after < 1000]))
  assert np.sum(again >= 2000) == 8 and not np.any((again >= 1000) &
                                                   (again < 2000))


def test_experience_balanced_choice_and_shrinking_are_uniform():
  """Each of an experience's rows is kept with the same probability: K / n
  when it is added (a uniform subset, not e.g. its first rows, which in a
  stream sorted by class would all be one class), and (K // 2) / n once a
  second experience has shrunk it."""
  n, trials = MAXN, 2000
  x = jnp.stack([jnp.arange(n, dtype=jnp.float32), jnp.zeros(n)], 1)
  z = jnp.zeros(n, jnp.int32)

  def one(key):
    k0, k1 = jax.random.split(key)
    mem = buffers.experience_balanced_add(buffers.init(K, (2,)), k0, x, z, z,
                                          0)
    held = lambda m: jnp.zeros(2 * n, jnp.int32).at[m.x[:, 0].astype(
        jnp.int32)].add(m.valid.astype(jnp.int32))
    after0 = held(mem)
    mem = buffers.experience_balanced_add(mem, k1, x + n, z, z, 1)
    return after0, held(mem)

  after0, after1 = jax.jit(jax.vmap(one))(jax.random.split(
      jax.random.PRNGKey(0), trials))
  after0, after1 = np.asarray(after0).sum(0), np.asarray(after1).sum(0)
  df = n - 1
  threshold = df + 5 * np.sqrt(2 * df)   # ~5 sigma of chi2(df)
  for counts, p in ((after0[:n], K / n), (after1[:n], K // 2 / n),
                    (after1[n:], K // 2 / n)):
    assert counts.sum() == round(p * n) * trials
    stat = _chi2(counts, trials, p)
    assert stat < threshold, (stat, threshold, p)


@SETTINGS
@given(labels=st.lists(st.integers(0, 4), min_size=B, max_size=8 * B),
       seed=st.integers(0, 2**16))
def test_class_balanced_greedy_invariants(labels, seed):
  n = len(labels) // B * B
  labels = np.asarray(labels[:n], np.int32)
  mem = buffers.init(K, (2,))
  for b in range(n // B):
    ids = np.arange(b * B, (b + 1) * B)
    x = np.stack([ids, np.zeros(B)], 1).astype(np.float32)
    mem = greedy(mem, jax.random.PRNGKey(seed + b), x, labels[ids],
                 np.zeros(B, np.int32), 0, None)
    seen = labels[:(b + 1) * B]
    ids_in, valid = _ids(mem)
    assert valid.sum() == min(len(seen), K)
    assert len(set(ids_in)) == len(ids_in)
    np.testing.assert_array_equal(np.asarray(mem.y)[valid], labels[ids_in])
    classes = np.unique(seen)
    share = K // len(classes)
    cnt = np.bincount(np.asarray(mem.y)[valid], minlength=5)
    for c in classes:
      assert cnt[c] >= min((seen == c).sum(), share), (c, cnt, share)


def test_class_balanced_balances_a_skewed_stream():
  # 90% of the stream is class 0; the memory still ends balanced.
  rng = np.random.default_rng(0)
  labels = np.where(rng.random(400) < 0.9, 0, rng.integers(1, 5, 400))
  mem = buffers.init(20, (2,))
  x = np.stack([np.arange(400), np.zeros(400)], 1).astype(np.float32)
  mem = jax.jit(functools.partial(buffers.class_balanced_add, num_classes=5))(
      mem, jax.random.PRNGKey(0), x, labels, np.zeros(400, np.int32), 0)
  cnt = np.bincount(np.asarray(mem.y)[np.asarray(mem.valid)], minlength=5)
  np.testing.assert_array_equal(cnt, [4, 4, 4, 4, 4])


def test_class_balanced_rejects_a_class_at_its_share():
  """Greedy, not a reservoir: 16 rows of class 0 fill the memory; class 1
  then takes slots from the largest class (0) until it holds its share
  K / 2 = 8, after which its rows, and the later rows of class 0 (also at
  its share), are not stored at all (not swapped for a same-class entry)."""
  labels = np.r_[np.zeros(16), np.ones(16), np.zeros(8)].astype(np.int32)
  x = np.stack([np.arange(40), np.zeros(40)], 1).astype(np.float32)
  mem = greedy(buffers.init(K, (2,)), jax.random.PRNGKey(0), x, labels,
               np.zeros(40, np.int32), 0, None)
  ids_in, valid = _ids(mem)
  assert valid.sum() == K
  np.testing.assert_array_equal(np.sort(ids_in[ids_in >= 16]),
                                np.arange(16, 24))   # class 1's first 8
  assert np.sum(ids_in < 16) == 8                    # 8 of class 0's first
  assert int(mem.seen) == 40


def test_class_balanced_rejects_capacity_below_classes():
  mem = buffers.init(3, (2,))
  with pytest.raises(ValueError, match="capacity >= the number of classes"):
    buffers.class_balanced_add(mem, jax.random.PRNGKey(0), np.zeros((1, 2)),
                               np.zeros(1, np.int32), np.zeros(1, np.int32), 0,
                               num_classes=5)


def _inclusion_counts(add_fn, n_items, capacity, trials, seed):
  """How often each of ``n_items`` streamed items ends in memory."""
  x = jnp.stack([jnp.arange(n_items, dtype=jnp.float32),
                 jnp.zeros(n_items)], 1).reshape(-1, 10, 2)

  def one(key):
    mem = buffers.init(capacity, (2,))

    def body(mem, args):
      xb, k = args
      return add_fn(mem, k, xb, jnp.zeros(10, jnp.int32),
                    jnp.zeros(10, jnp.int32), 0), None

    keys = jax.random.split(key, x.shape[0])
    mem, _ = jax.lax.scan(body, mem, (x, keys))
    return jnp.zeros(n_items, jnp.int32).at[mem.x[:, 0].astype(
        jnp.int32)].add(mem.valid.astype(jnp.int32))

  keys = jax.random.split(jax.random.PRNGKey(seed), trials)
  return np.asarray(jax.jit(jax.vmap(one))(keys).sum(0))


def _chi2(counts, trials, p):
  # Each item's count ~ Binomial(trials, p); the statistic is ~chi2 with
  # about n - 1 degrees of freedom (the total is fixed).
  return np.sum((counts - trials * p) ** 2 / (trials * p * (1 - p)))


def _biased_add(mem, key, x, y, task, experience, mask=None):
  """A wrong "reservoir": when full, always overwrite a random slot (late
  items are kept far more often). The statistical test must reject it."""
  del mask

  def body(mem, row):
    xi, ki = row
    n = mem.seen
    slot = jnp.where(n < mem.valid.shape[0], n,
                     jax.random.randint(ki, (), 0, mem.valid.shape[0]))
    mem = buffers._put(mem, slot, xi, 0, 0, 0)
    return mem._replace(seen=n + 1), None

  mem, _ = jax.lax.scan(body, mem, (x, jax.random.split(key, x.shape[0])))
  return mem


def test_reservoir_inclusion_probability_is_uniform():
  n_items, capacity, trials = 200, 20, 3000
  p = capacity / n_items
  counts = _inclusion_counts(buffers.reservoir_add, n_items, capacity,
                             trials, seed=0)
  assert counts.sum() == capacity * trials
  df = n_items - 1
  threshold = df + 5 * np.sqrt(2 * df)   # ~5 sigma of chi2(df)
  stat = _chi2(counts, trials, p)
  assert stat < threshold, (stat, threshold)
  # First and last 10% of the stream are kept equally often (+-4 sigma).
  first, last = counts[:20].sum(), counts[-20:].sum()
  sd = np.sqrt(2 * 20 * trials * p * (1 - p))
  assert abs(first - last) < 4 * sd, (first, last, sd)
  # The same test rejects a biased sampler.
  bad = _inclusion_counts(_biased_add, n_items, capacity, trials, seed=0)
  assert _chi2(bad, trials, p) > threshold


def test_sample_without_replacement_only_valid():
  mem = buffers.init(K, (2,))
  x = np.stack([np.arange(5), np.zeros(5)], 1).astype(np.float32)
  mem = reservoir(mem, jax.random.PRNGKey(0), x, np.zeros(5, np.int32),
                  np.zeros(5, np.int32), 0, None)
  idx, ok = jax.jit(buffers.sample, static_argnums=2)(
      mem, jax.random.PRNGKey(1), 8)
  idx, ok = np.asarray(idx), np.asarray(ok)
  assert ok.sum() == 5 and len(set(idx[ok])) == 5
  assert set(idx[ok]) == set(range(5))
  # Empty memory: all draws are masked.
  _, ok0 = buffers.sample(buffers.init(K, (2,)), jax.random.PRNGKey(1), 8)
  assert not np.any(ok0)
  with pytest.raises(ValueError, match="capacity 16"):
    buffers.sample(mem, jax.random.PRNGKey(0), 17)


def test_sample_where_restricts_to_eligible_entries():
  mem = buffers.init(K, (1,))
  for e in range(3):   # 4 entries from each of experiences 0, 1, 2
    mem = reservoir(mem, jax.random.PRNGKey(e),
                    np.full((4, 1), e, np.float32), np.zeros(4, np.int32),
                    np.zeros(4, np.int32), e, None)
  past = mem.experience < 2
  idx, ok = buffers.sample(mem, jax.random.PRNGKey(5), 10, past)
  idx, ok = np.asarray(idx), np.asarray(ok)
  # Only the 8 entries of experiences 0 and 1, each once; the rest masked.
  assert ok.sum() == 8 and len(set(idx[ok])) == 8
  assert set(np.asarray(mem.experience)[idx[ok]]) == {0, 1}
  # Nothing eligible: every draw masked.
  _, ok0 = buffers.sample(mem, jax.random.PRNGKey(5), 10,
                          mem.experience < 0)
  assert not np.any(np.asarray(ok0))


def test_memory_is_a_pytree_that_vmaps_and_shards_on_capacity():
  mem = buffers.init(K, (3,))
  leaves = jax.tree.leaves(mem)
  assert len(leaves) == 6
  # vmap over memories (e.g. one per seed).
  mems = jax.vmap(lambda _: buffers.init(K, (3,)))(jnp.arange(4))
  x = jnp.ones((4, B, 3))
  out = jax.vmap(lambda m, k, xb: buffers.reservoir_add(
      m, k, xb, jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.int32), 0))(
          mems, jax.random.split(jax.random.PRNGKey(0), 4), x)
  assert out.x.shape == (4, K, 3) and np.all(np.asarray(out.seen) == B)
  # A capacity-axis sharding applies to every per-slot leaf.
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  spec = jax.sharding.PartitionSpec("data")
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sh = jax.sharding.NamedSharding(mesh, spec)
  placed = mem._replace(**{f: jax.device_put(getattr(mem, f), sh)
                           for f in ("x", "y", "task", "experience",
                                     "valid")},
                        seen=jax.device_put(mem.seen, rep))
  added = reservoir(placed, jax.random.PRNGKey(0), np.ones((B, 3),
                                                           np.float32),
                    np.zeros(B, np.int32), np.zeros(B, np.int32), 0, None)
  assert int(buffers.size(added)) == B


def test_memory_checkpoint_round_trip(tmp_path):
  import orbax.checkpoint as ocp
  mem = buffers.init(K, (3,))
  mem = reservoir(mem, jax.random.PRNGKey(0), np.random.rand(B, 3).astype(
      np.float32), np.arange(B) % 3, np.zeros(B, np.int32), 2, None)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "mem", mem)
  ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, mem)
  back = ckpt.restore(tmp_path / "mem", abstract)
  back = buffers.Memory(*jax.tree.leaves(back)) if not isinstance(
      back, buffers.Memory) else back
  for a, b in zip(jax.tree.leaves(mem), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).dtype == np.asarray(b).dtype


def test_reservoir_batch_equals_offering_rows_one_by_one():
  """One scatter per batch = algorithm R row by row with the same draws,
  including rows of one batch that land in the same slot (the later
  wins) and masked rows (not offered, counter unchanged)."""
  k, b = 3, 64
  collisions = 0
  mem = buffers.init(k, (2,))
  rng = np.random.default_rng(0)
  key = jax.random.PRNGKey(7)
  for step in range(4):
    key, sub = jax.random.split(key)
    x = rng.normal(size=(b, 2)).astype(np.float32)
    y = rng.integers(0, 5, b)
    mask = (rng.uniform(size=b) > 0.2).astype(np.float32)
    # Reference: the same per-row keys, one row at a time, in NumPy.
    ref_x, ref_y = np.asarray(mem.x).copy(), np.asarray(mem.y).copy()
    ref_valid, n = np.asarray(mem.valid).copy(), int(mem.seen)
    written = set()
    for i, ki in enumerate(jax.random.split(sub, b)):
      if not mask[i]:
        continue
      j = int(jax.random.randint(ki, (), 0, max(n, 0) + 1))
      slot = n if n < k else (j if j < k else k)
      if slot < k:
        collisions += slot in written
        written.add(slot)
        ref_x[slot], ref_y[slot], ref_valid[slot] = x[i], y[i], True
      n += 1
    mem = buffers.reservoir_add(mem, sub, jnp.asarray(x), jnp.asarray(y),
                                jnp.zeros(b, jnp.int32), step,
                                jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(mem.x), ref_x)
    np.testing.assert_array_equal(np.asarray(mem.y), ref_y)
    np.testing.assert_array_equal(np.asarray(mem.valid), ref_valid)
    assert int(mem.seen) == n
  assert collisions > 0  # the case that needs the later-row-wins rule


def test_reservoir_after_orders_writes_and_nan_writes_nothing():
  """``after`` only adds a data dependence: a finite value changes nothing,
  a NaN (a diverged step) writes nothing (its rows still count as seen)."""
  mem = buffers.init(4, (2,))
  key = jax.random.PRNGKey(3)
  x = jnp.arange(12, dtype=jnp.float32).reshape(6, 2)
  y = jnp.arange(6, dtype=jnp.int32)
  plain = buffers.reservoir_add(mem, key, x, y, y, 0)
  ordered = buffers.reservoir_add(mem, key, x, y, y, 0, after=jnp.float32(2.5))
  for a, b in zip(plain, ordered):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  diverged = buffers.reservoir_add(plain, key, x + 100, y, y, 0,
                                   after=jnp.float32(jnp.nan))
  np.testing.assert_array_equal(np.asarray(diverged.x), np.asarray(plain.x))
  assert int(plain.seen) == 6 and int(diverged.seen) == 12
  written = buffers.reservoir_add(plain, key, x + 100, y, y, 0,
                                  after=jnp.float32(1.0))
  assert not np.array_equal(np.asarray(written.x), np.asarray(plain.x))


def test_rank_within_groups_ranks_by_ascending_score_in_each_group():
  group = jnp.asarray([1, 0, 1, 0, 1, 2])
  score = jnp.asarray([0.3, 0.9, 0.1, 0.2, 0.5, 0.4])
  # group 0: 0.2 (3) < 0.9 (1); group 1: 0.1 (2) < 0.3 (0) < 0.5 (4).
  np.testing.assert_array_equal(
      np.asarray(buffers.rank_within_groups(group, score)), [1, 1, 0, 0, 2, 0])


def test_random_class_balanced_add_counts_only_offered_rows():
  mem = buffers.init(6, (1,))
  add = jax.jit(functools.partial(buffers.random_class_balanced_add,
                                  num_classes=3))
  mem, pri = add(mem, jnp.zeros((6,)), jax.random.PRNGKey(0),
                 jnp.arange(4, dtype=jnp.float32)[:, None],
                 jnp.asarray([0, 1, 2, 0]), jnp.zeros((4,), jnp.int32),
                 jnp.int32(0), jnp.asarray([True, True, False, True]),
                 jnp.int32(2))
  assert int(mem.seen) == 3
  ids, _ = _ids(mem)
  assert sorted(ids) == [0, 1, 3]  # the unoffered row 2 is not stored
  # Each stored entry keeps the priority its row drew, in [0, 1).
  p = np.asarray(pri)[np.asarray(mem.valid)]
  assert np.all((p > 0) & (p < 1)) and len(set(p)) == 3
  # Quota 1 from now on: class 0's two entries shrink to one, unless the
  # step diverged (after = NaN), which leaves the memory as it was.
  offer = (jax.random.PRNGKey(1), jnp.full((1, 1), 9.0), jnp.asarray([1]),
           jnp.zeros((1,), jnp.int32), jnp.int32(1), jnp.asarray([True]),
           jnp.int32(1))
  kept, _ = add(mem, pri, *offer)
  assert np.sum(np.asarray(kept.valid) & (np.asarray(kept.y) == 0)) == 1
  same, _ = buffers.random_class_balanced_add(
      mem, pri, *offer, num_classes=3, after=jnp.float32(jnp.nan))
  np.testing.assert_array_equal(np.asarray(same.valid), np.asarray(mem.valid))
  np.testing.assert_array_equal(np.asarray(same.x), np.asarray(mem.x))


def test_capacity_must_be_a_positive_int():
  for bad in (0, -3, 2.0, True, "8"):
    with pytest.raises(ValueError, match=f"mem_size must be a positive int, "
                       f"got {bad!r}"):
      buffers.check_capacity(bad)
  assert buffers.check_capacity(5) == 5
