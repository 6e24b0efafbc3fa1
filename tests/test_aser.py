"""Mechanism tests of ASER (on scikit-learn digits)."""

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import buffers, experiment, scenarios, train
from jaxcl.state import cross_entropy
from jaxcl.strategies import aser as A
from jaxcl.strategies._extractor import extract
from jaxcl.strategies.aser import aser

from test_replay import B, batch_of, make_ctx
from test_replay import config as replay_config

# The module's functions jitted: one compiled program per shape and setting
# is cheaper than dispatching each operation eagerly (test time).
knn_shapley = jax.jit(A.knn_shapley, static_argnums=4)
aser_scores = jax.jit(A.aser_scores, static_argnames=("k", "aser_type"))
retrieve = jax.jit(A.retrieve, static_argnums=0,
                   static_argnames=("k", "n_smp_cls", "num_retrieve",
                                    "aser_type"))
aser_update = jax.jit(A.aser_update, static_argnums=0,
                      static_argnames=("k", "n_smp_cls"))
reservoir_add = jax.jit(buffers.reservoir_add)
sample = jax.jit(buffers.sample, static_argnums=2)
class_balanced_pair = jax.jit(A._class_balanced_pair, static_argnums=(2, 3))
features = jax.jit(lambda ctx, params, x: extract(
    ctx, "backbone", params, {}, x, jnp.zeros(len(x), jnp.int32)),
                   static_argnums=0)


def update_grads(s):
  """``s.update_grads`` jitted (``ctx`` static)."""
  return jax.jit(s.update_grads, static_argnums=0)


def memory_of(exps, n_each, cap):
  """A memory of ``cap`` slots holding the first ``n_each`` training rows
  of each experience in ``exps`` (tagged with its index)."""
  mem = buffers.init(cap, exps[0].train_x.shape[1:])
  for e, exp in enumerate(exps):
    mem = reservoir_add(mem, jax.random.PRNGKey(e),
                        jnp.asarray(exp.train_x[:n_each]),
                        jnp.asarray(exp.train_y[:n_each]),
                        jnp.zeros(n_each, jnp.int32), jnp.int32(e))
  return mem


# ---------------------------------------------------------------------------
# KNN Shapley value: the recursion against the definition.


def knn_utility(subset, dist, cand_y, y, k):
  """Jia et al. 2019's KNN utility: the share of the K nearest of
  ``subset`` (fewer if it is smaller) labelled ``y``, over K."""
  near = sorted(subset, key=lambda j: (dist[j], j))[:k]
  return sum(cand_y[j] == y for j in near) / k


def brute_force_shapley(dist, cand_y, y, k):
  """Shapley values by enumerating every order of the candidates."""
  n = len(dist)
  sv = np.zeros(n)
  for order in itertools.permutations(range(n)):
    before = []
    for j in order:
      sv[j] += (knn_utility(before + [j], dist, cand_y, y, k)
                - knn_utility(before, dist, cand_y, y, k))
      before.append(j)
  return sv / math.factorial(n)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_knn_shapley_equals_brute_force(k):
  # k = 4: the masked game below has N = 3 < K candidates, where the
  # recursion starts at 1/K, not 1/N.
  rng = np.random.default_rng(k)
  for _ in range(4):
    e, n = 3, 5
    dist = rng.random((e, n))
    cand_y = rng.integers(0, 2, n)
    eval_y = rng.integers(0, 2, e)
    got = np.asarray(knn_shapley(jnp.asarray(dist), jnp.asarray(eval_y),
                                 jnp.asarray(cand_y), jnp.ones(n, bool), k))
    want = np.stack([brute_force_shapley(dist[i], cand_y, eval_y[i], k)
                     for i in range(e)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Invalid candidates leave the game: the others' values are those of
    # the smaller game, theirs 0.
    ok = np.array([True, False, True, True, False])
    got = np.asarray(knn_shapley(jnp.asarray(dist), jnp.asarray(eval_y),
                                 jnp.asarray(cand_y), jnp.asarray(ok), k))
    keep = np.flatnonzero(ok)
    want = np.stack([brute_force_shapley(dist[i, keep], cand_y[keep],
                                         eval_y[i], k) for i in range(e)])
    np.testing.assert_allclose(got[:, keep], want, atol=1e-6)
    np.testing.assert_array_equal(got[:, ~ok], 0.0)


def test_knn_shapley_values_are_informative():
  """The case above is not trivial: values differ, some are negative, and
  they sum to the utility of the whole set (efficiency)."""
  dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
  cand_y = np.array([0, 1, 1, 0, 1])
  sv = np.asarray(knn_shapley(jnp.asarray(dist), jnp.asarray([1]),
                              jnp.asarray(cand_y), jnp.ones(5, bool), 2))[0]
  assert sv.min() < 0 < sv.max()
  np.testing.assert_allclose(sv.sum(), knn_utility(range(5), dist[0],
                                                   cand_y, 1, 2), atol=1e-6)


# ---------------------------------------------------------------------------
# ASER's score and retrieval.


def shapley_by_recursion(dist, cand_y, y, k):
  """knn_shapley for one evaluation point (checked against the brute
  force above), for cases too large to enumerate."""
  return np.asarray(knn_shapley(jnp.asarray(dist)[None], jnp.asarray([y]),
                                jnp.asarray(cand_y),
                                jnp.ones(len(cand_y), bool), k))[0]


def numpy_scores(f_c, y_c, f_e, y_e, ok_e, f_b, y_b, ok_b, k, kind,
                 shapley=brute_force_shapley):
  """ASER's score from per-point values (every candidate valid)."""
  def svs(f_eval, y_eval, ok):
    d = ((f_eval[:, None] - f_c[None]) ** 2).sum(-1)
    return np.stack([shapley(d[i], y_c, y_eval[i], k)
                     for i in np.flatnonzero(ok)])
  adv = svs(f_b, y_b, ok_b)
  if kind == "neg_sv":
    return -adv.sum(0)
  coop = svs(f_e, y_e, ok_e)
  if kind == "asv":
    return coop.max(0) - adv.min(0)
  return coop.mean(0) - adv.mean(0)


@pytest.mark.parametrize("kind", A.ASER_TYPES)
def test_aser_scores_match_numpy(kind):
  rng = np.random.default_rng(0)
  f_c, f_e, f_b = (rng.normal(size=(n, 3)) for n in (5, 4, 4))
  y_c, y_e, y_b = (rng.integers(0, 3, n) for n in (5, 4, 4))
  ok_e = np.array([True, True, False, True])   # a padded row each
  ok_b = np.array([True, False, True, True])
  got = np.asarray(aser_scores(
      *map(jnp.asarray, (f_c, y_c, np.ones(5, bool), f_e, y_e, ok_e, f_b,
                         y_b, ok_b)), k=2, aser_type=kind))
  want = numpy_scores(f_c, y_c, f_e, y_e, ok_e, f_b, y_b, ok_b, 2, kind)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert len(set(np.round(want, 5))) > 2  # the ranking is not trivial


def test_retrieve_picks_top_scored_class_balanced_candidates(stream):
  ctx = make_ctx(stream)
  state = train.init_state(ctx, aser(mem_size=60), 0)
  e0, e1 = stream.experiences
  mem = memory_of([e0, e1], 30, 60)
  incoming = batch_of(e1, start=40)
  key = jax.random.PRNGKey(5)
  # 2 per class (with 1, and 1 match per class, a match's value does not
  # depend on its distance: the cooperative term would be constant).
  n_smp, size = 2, 2 * stream.num_classes
  idx, ok, cand, score = retrieve(ctx, state.params, {}, mem, incoming, key,
                                    k=3, n_smp_cls=n_smp, num_retrieve=5)
  cand, score = np.asarray(cand), np.asarray(score)
  y = np.asarray(mem.y)
  drawn = np.isfinite(score)
  # Candidates: n_smp_cls valid entries of each class in memory.
  classes = sorted(set(y[np.asarray(mem.valid)]))
  assert sorted(y[cand[drawn]]) == sorted(classes * n_smp)
  assert len(set(cand[drawn])) == drawn.sum()
  # Numpy reference: the same draws (same key), brute-force values.
  c_idx, c_ok, rank = class_balanced_pair(mem, key, n_smp, size)
  np.testing.assert_array_equal(c_idx, cand)
  e_sel = np.asarray(mem.valid & (rank >= n_smp) & (rank < 2 * n_smp))
  e_idx = np.flatnonzero(e_sel)
  assert not set(e_idx) & set(cand[drawn])  # disjoint from the candidates
  feat = lambda x: np.asarray(features(ctx, state.params, x))
  cs = cand[drawn]
  want = numpy_scores(feat(mem.x[cs]), y[cs], feat(mem.x[e_idx]), y[e_idx],
                      np.ones(len(e_idx), bool), feat(incoming["x"]),
                      np.asarray(incoming["y"]), np.ones(B, bool), 3, "asvm",
                      shapley=shapley_by_recursion)
  np.testing.assert_allclose(score[drawn], want, atol=1e-5)
  assert np.all(np.asarray(ok))
  top = np.sort(want)[::-1]
  assert top[4] > top[5] + 1e-4  # no tie at the cut: the top 5 is defined
  assert set(np.asarray(idx)) == set(cs[np.argsort(-want)[:5]])


def test_only_valid_memory_rows_are_replayed(stream):
  ctx = make_ctx(stream)
  s = aser(mem_size=40, batch_size=10)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy
  g0 = jax.tree.map(jnp.ones_like, state.params)
  incoming = batch_of(stream.experiences[1])
  key = jax.random.PRNGKey(4)
  # Empty memory: gradient unchanged.
  out = update_grads(s)(ctx, ss, g0, state.params, incoming, key)
  jax.tree.map(np.testing.assert_array_equal, out, g0)
  # 7 valid entries in 40 slots, past the fill phase (ASER's own scoring):
  # only those can be chosen, each once.
  mem = memory_of([stream.experiences[0]], 7, 40)._replace(
      seen=jnp.asarray(1000, jnp.int32))
  idx, ok, _, _ = retrieve(ctx, state.params, {}, mem, incoming, key,
                             k=5, n_smp_cls=2, num_retrieve=10)
  idx, ok = np.asarray(idx), np.asarray(ok)
  assert np.all(np.asarray(mem.valid)[idx[ok]])
  assert ok.sum() == 4  # 2 classes in memory x n_smp_cls 2
  assert len(set(idx[ok])) == ok.sum()


def test_update_grads_adds_retrieved_rows_gradient(stream):
  """Past the fill phase the replayed gradient is that of the rows
  ``retrieve`` picks; before it (seen <= mem_size), of uniform draws."""
  ctx = make_ctx(stream)
  s = aser(mem_size=40, batch_size=5, k=3)
  state = train.init_state(ctx, s, 0)
  mem = memory_of(stream.experiences, 20, 40)
  g0 = jax.tree.map(jnp.ones_like, state.params)
  incoming = batch_of(stream.experiences[1], start=30)
  key = jax.random.PRNGKey(6)
  k_aser, k_rand = jax.random.split(key)

  @jax.jit
  def g_of(idx, ok):
    return jax.grad(lambda p: cross_entropy(
        ctx.logits(p, {}, mem.x[idx], mem.task[idx]), mem.y[idx],
        ok.astype(jnp.float32)))(state.params)

  aser_pick = retrieve(ctx, state.params, {}, mem, incoming, k_aser, k=3,
                         n_smp_cls=2, num_retrieve=5)[:2]
  rand_pick = sample(mem, k_rand, 5)
  assert set(np.asarray(aser_pick[0])) != set(np.asarray(rand_pick[0]))
  step = update_grads(s)
  for seen, pick in ((40, rand_pick), (41, aser_pick)):
    ss = state.strategy._replace(memory=mem._replace(
        seen=jnp.asarray(seen, jnp.int32)))
    out = step(ctx, ss, g0, state.params, incoming, key)
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(
        a, b + c, rtol=1e-5, atol=1e-6), out, g0, g_of(*pick))
  # A replay batch larger than the candidates (n_smp_cls 1: 10 slots, 4
  # drawn, one per class in memory): past the fill phase only the
  # retrieved candidates are replayed, no uniform draw fills the batch.
  s15 = aser(mem_size=40, batch_size=15, k=3, n_smp_cls=1)
  pick = retrieve(ctx, state.params, {}, mem, incoming, k_aser, k=3,
                  n_smp_cls=1, num_retrieve=15)[:2]
  assert np.asarray(pick[1]).sum() == 4
  ss = state.strategy._replace(memory=mem._replace(
      seen=jnp.asarray(41, jnp.int32)))
  out = update_grads(s15)(ctx, ss, g0, state.params, incoming, key)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(
      a, b + c, rtol=1e-5, atol=1e-6), out, g0, g_of(*pick))


def _freeze_head(tree):
  """A ctx.freeze that keeps the head fixed (as LFL's mask does)."""
  return {**tree, "head": jax.tree.map(jnp.zeros_like, tree["head"])}


def test_replayed_gradient_spares_frozen_weights(stream):
  """Beside a member that keeps weights fixed (ctx.freeze), the replayed
  rows' gradient is masked as MIR's is: the head gets none of it."""
  import dataclasses
  ctx = make_ctx(stream)
  fctx = dataclasses.replace(ctx, freeze=_freeze_head)
  s = aser(mem_size=40, batch_size=5)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy._replace(memory=memory_of(stream.experiences, 20, 40))
  g0 = jax.tree.map(jnp.ones_like, state.params)
  incoming = batch_of(stream.experiences[1], start=30)
  key = jax.random.PRNGKey(6)
  step = update_grads(s)
  whole = step(ctx, ss, g0, state.params, incoming, key)
  out = step(fctx, ss, g0, state.params, incoming, key)
  jax.tree.map(np.testing.assert_array_equal, out["head"], g0["head"])
  assert not np.allclose(whole["head"]["kernel"], g0["head"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, out["backbone"],
               whole["backbone"])


# ---------------------------------------------------------------------------
# ASER's memory update.


def test_update_fills_free_slots_in_order(stream):
  ctx = make_ctx(stream)
  state = train.init_state(ctx, aser(mem_size=40), 0)
  exp = stream.experiences[0]
  mem = buffers.init(40, exp.train_x.shape[1:])
  rows = batch_of(exp)
  rows["mask"] = rows["mask"].at[3].set(0.0)   # a padded row
  for i in range(4):
    mem = aser_update(ctx, state.params, {}, mem, jax.random.PRNGKey(i),
                        rows, jnp.asarray(0), k=5, n_smp_cls=2)
  # 4 x 9 rows offered (row 3 is padding): slots 0..35 in order.
  order = np.array([r for r in range(B) if r != 3] * 4)
  x = np.asarray(exp.train_x).reshape(len(exp.train_y), -1)
  np.testing.assert_array_equal(np.asarray(mem.x[:36]).reshape(36, -1),
                                x[order])
  assert int(mem.seen) == 36 and int(buffers.size(mem)) == 36
  # The fifth batch: rows 0, 1, 2, 4 fill slots 36..39, the other five are
  # then valued against the full memory (and may replace entries).
  mem = aser_update(ctx, state.params, {}, mem, jax.random.PRNGKey(9),
                      rows, jnp.asarray(0), k=5, n_smp_cls=2)
  assert int(mem.seen) == 45 and int(buffers.size(mem)) == 40
  order = np.concatenate([order, [0, 1, 2, 4]])
  got = np.asarray(mem.x).reshape(40, -1)
  moved = np.flatnonzero(np.any(got != x[order], 1))
  for slot in moved:  # replaced by one of the rows that did not fit
    assert any(np.array_equal(got[slot], x[r]) for r in (5, 6, 7, 8, 9))


def _check_update(ctx, state, stream, mem, rows, key, n_smp, size):
  """test_update_keeps_the_highest_valued_candidates for one key:
  ``aser_update``'s memory against the numpy reference."""
  new = aser_update(ctx, state.params, {}, mem, key, rows, jnp.asarray(1),
                    k=5, n_smp_cls=n_smp)
  # The reference: the same draws, values by the tested knn_shapley.
  k_eval, k_cand, k_min = jax.random.split(key, 3)
  e_idx, e_ok, _ = class_balanced_pair(mem, k_eval, n_smp, size)
  thr = float(jax.random.uniform(k_min, (), maxval=1.0 / 10))
  share = np.bincount(np.asarray(mem.y), minlength=10) / 40
  yb = np.asarray(rows["y"])
  minority = share[yb] < thr
  # Classes 2-3 hold half the memory: no minority rows (those are always
  # kept: test_engine_run_compiles_once_and_keeps_new_classes).
  assert not minority.any()
  in_eval = np.zeros(40, bool)
  in_eval[np.asarray(e_idx)[np.asarray(e_ok)]] = True
  m_idx, m_ok = sample(mem, k_cand, size, where=jnp.asarray(~in_eval))
  m_idx = np.asarray(m_idx)[np.asarray(m_ok)]
  ev = np.asarray(e_idx)[np.asarray(e_ok)]
  feat = lambda x: np.asarray(features(ctx, state.params, x))
  y = np.asarray(mem.y)
  f_eval = np.concatenate([feat(mem.x[ev]), feat(rows["x"])])
  y_eval = np.concatenate([y[ev], yb])
  f_cand = np.concatenate([feat(mem.x[m_idx]), feat(rows["x"])])
  y_cand = np.concatenate([y[m_idx], yb])
  d = ((f_eval[:, None] - f_cand[None]) ** 2).sum(-1)
  sv = np.asarray(knn_shapley(jnp.asarray(d), jnp.asarray(y_eval),
                              jnp.asarray(y_cand),
                              jnp.ones(len(y_cand), bool), 5))
  sv = sv[np.concatenate([np.ones(len(ev), bool), minority])].sum(0)
  n_m = len(m_idx)
  keep = np.argsort(-sv, kind="stable")[:n_m]
  inserted = sorted(j - n_m for j in keep if j >= n_m)
  evicted = sorted(m_idx[j] for j in range(n_m) if j not in keep)
  assert 0 < len(inserted) < B  # the case exercises both sides
  changed = np.flatnonzero(np.any(np.asarray(new.x != mem.x).reshape(40, -1),
                                  1))
  np.testing.assert_array_equal(sorted(changed), evicted)
  got_rows = sorted(int(np.flatnonzero(np.all(
      np.asarray(rows["x"]).reshape(B, -1) ==
      np.asarray(new.x[c]).reshape(-1), 1))[0]) for c in changed)
  assert got_rows == inserted
  np.testing.assert_array_equal(np.asarray(new.experience)[changed], 1)
  assert int(new.seen) == int(mem.seen) + B
  assert int(buffers.size(new)) == 40
  return new


def test_update_keeps_the_highest_valued_candidates(stream):
  """Full memory: the memory candidates and incoming rows ranked in the
  top n_m by summed KNN-SV stay; each incoming row among them replaces a
  memory candidate below (numpy reference on the same draws)."""
  ctx = make_ctx(stream)
  state = train.init_state(ctx, aser(mem_size=40), 0)
  e0, e1 = stream.experiences
  mem = memory_of([e0, e1], 20, 40)
  rows = batch_of(e1, start=25)
  n_smp, size = 2, 2 * stream.num_classes
  # Several keys: the minority threshold is drawn below 1 / |Y| = 0.1, so
  # the incoming classes (a quarter of the memory each) never join the
  # evaluation set, whatever the draw.
  for key in (7, 8, 9, 10):
    _check_update(ctx, state, stream, mem, rows, jax.random.PRNGKey(key),
                  n_smp, size)
  key = jax.random.PRNGKey(7)
  # A diverged step (NaN gradient) writes nothing; its rows still count.
  nan = aser_update(ctx, state.params, {}, mem, key, rows, jnp.asarray(1),
                      k=5, n_smp_cls=n_smp, after=jnp.asarray(jnp.nan))
  np.testing.assert_array_equal(nan.x, mem.x)
  assert int(nan.seen) == int(mem.seen) + B


def test_after_step_values_rows_under_the_updated_parameters(stream):
  """The hook's update is ``aser_update`` (tested above) under the
  parameters after the step (the code updates the memory after
  ``opt.step()``), its key drawn from the state's."""
  from jaxcl.state import StepInfo
  ctx = make_ctx(stream)
  s = aser(mem_size=40)
  state = train.init_state(ctx, s, 0)
  e0, e1 = stream.experiences
  mem = memory_of([e0, e1], 20, 40)
  ss = state.strategy._replace(memory=mem,
                               experience=jnp.asarray(1, jnp.int32))
  moved = jax.tree.map(lambda p: p * 1.5 + 0.05, state.params)
  rows = batch_of(e1, start=25)
  info = StepInfo(state.params, moved, state.params, None, rows,
                  jnp.zeros(()))
  got = jax.jit(s.after_step, static_argnums=0)(ctx, ss, info).memory
  key = jax.random.fold_in(ss.key, mem.seen)
  want, other = (aser_update(ctx, p, {}, mem, key, rows, jnp.asarray(1),
                             k=5, n_smp_cls=2) for p in (moved, state.params))
  assert not np.array_equal(want.x, other.x)
  np.testing.assert_array_equal(got.x, want.x)
  np.testing.assert_array_equal(got.y, want.y)


# ---------------------------------------------------------------------------
# Arguments, engine run, resume.


def test_bad_arguments(stream):
  with pytest.raises(ValueError, match=r"aser: mem_size must be a positive "
                     r"int, got 0"):
    aser(mem_size=0)
  with pytest.raises(ValueError, match=r"aser: n_smp_cls must be an int >= "
                     r"1, got 1.5"):
    aser(n_smp_cls=1.5)
  with pytest.raises(ValueError, match=r"aser: k must be an int >= 1, got 0"):
    aser(k=0)
  with pytest.raises(ValueError, match=r"aser: batch_size must be an int >= "
                     r"1, got True"):
    aser(batch_size=True)
  with pytest.raises(ValueError, match=r"unknown aser_type 'mean'; valid: "
                     r"asvm, asv, neg_sv"):
    aser(aser_type="mean")
  with pytest.raises(ValueError, match=r"unknown update 'random'; valid: "
                     r"aser, reservoir"):
    aser(update="random")
  with pytest.raises(ValueError, match=r"batch_size=30 is larger than the "
                     r"memory capacity mem_size=20"):
    aser(mem_size=20, batch_size=10 * 3)
  ctx = make_ctx(stream)
  with pytest.raises(ValueError, match=r"n_smp_cls=3 times the stream's 10 "
                     r"classes is 30, more than mem_size=20; use n_smp_cls "
                     r"<= 2"):
    train.init_state(ctx, aser(mem_size=20, n_smp_cls=3), 0)
  train.init_state(ctx, aser(mem_size=20, n_smp_cls=2), 0)  # 20: allowed


def config(**kw):
  c = replay_config("aser", aser=dict(mem_size=40, **kw))
  c.scenario.online = True
  return c


@pytest.mark.parametrize("kw", [{}, dict(aser_type="asv",
                                         update="reservoir")])
def test_engine_run_compiles_once_and_keeps_new_classes(stream, kw):
  result = experiment.run(config(**kw), scenario=scenarios.online(stream))
  assert result.learner.chunk_fn._cache_size() == 1
  assert np.all(np.isfinite(result.accuracy))
  mem = result.state.strategy.memory
  total = sum(e.num_train for e in stream.experiences)
  assert int(mem.seen) == total
  assert int(buffers.size(mem)) == 40
  ys = np.asarray(mem.y)
  assert set(ys[np.asarray(mem.experience) == 1]) <= {2, 3}
  assert {0, 1, 2, 3} <= set(ys)       # old classes kept, new ones let in
  assert result.accuracy[1, 0] > 0.3   # experience 0 not forgotten


def test_memory_is_updated_in_place_not_copied(stream):
  """As the other replay strategies (test_replay.py): the compiled loop
  holds no copy of the memory's examples."""
  s = experiment.setup(config(), stream)
  state = experiment.initial_state(s, 0)
  exp = stream.experiences[0]
  data = jax.device_put(train.device_experience(
      exp, s.learner.ctx.info.train_size))
  hlo = s.learner.chunk_fn.lower(state, data, exp.num_train, 0, 0,
                                 0).compile().as_text()
  memory = "f32[40,8,8,1]"
  assert memory in hlo
  copies = [l for l in hlo.splitlines() if " copy(" in l
            and l.split("=", 1)[1].strip().startswith(memory)]
  assert not copies, copies


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tmp_path, monkeypatch):
  """The resume audit's 'mid' plan (tests/test_resume_every_strategy.py)
  for aser, with aser added to its PLAIN configs if not listed yet."""
  import signal
  import sys
  import json
  sys.path.insert(0, os.path.dirname(__file__))
  from resume_driver import assert_same, drive
  patch = tmp_path / "patch"
  patch.mkdir()
  (patch / "sitecustomize.py").write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
      "import resume_configs as r\n"
      "if 'aser' not in r.NAMES:\n"
      "  r.PLAIN += ('aser',)\n"
      "  r.NAMES += ('aser',)\n")
  # drive() keeps a PYTHONPATH already set after the repository's.
  monkeypatch.setenv("PYTHONPATH", str(patch))
  env = {}
  args = ["--strategy", "aser"]
  ref = tmp_path / "ref.npz"
  p = drive(tmp_path / "ref", ref, "none", -1, 32, *args, env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  target = dict(experience=1, phase="train", epoch=0, step=6)
  with open(f"{ref}.json") as f:
    assert target in json.load(f)["positions"]
  work = tmp_path / "run"
  p = drive(work, tmp_path / "x.npz", "before", json.dumps(target), 32,
            *args, env=env)
  assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
  p = drive(work, tmp_path / "final.npz", "none", -1, 32, *args, env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resumed from checkpoint" in p.stderr
  assert_same(ref, tmp_path / "final.npz")


def test_split_mnist_config_is_mirs_protocol():
  """The experiment row runs on MIR's protocol with the code's defaults."""
  from experiments.split_mnist_replay import get_config
  c, mir = get_config("strategy=aser"), get_config("strategy=mir")
  assert dict(c.strategy.aser) == dict(mem_size=500, batch_size=10, k=5,
                                       n_smp_cls=2, aser_type="asvm")
  for field in ("widths", "init"):
    assert c.model[field] == mir.model[field]
  assert c.optimizer.learning_rate == mir.optimizer.learning_rate == 0.1
  assert c.train.batch_size == mir.train.batch_size == 10
  assert c.scenario.online and c.name == "split_mnist_aser_500"
  c = get_config("strategy=aser,aser_type=asv")
  assert c.strategy.aser["aser_type"] == "asv"
  assert c.name == "split_mnist_aser_500_asv"
