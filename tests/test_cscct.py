"""CSCCT (jaxcl/strategies/cscct.py): CSC and CT against a NumPy port of
Mammoth's ``cscct_model.py`` (sign matrix, KLDivLoss's 'mean' reduction),
the hook's weighted sum on the model's features, no term in the first
experience, the previous model frozen at the experience's end, a chained
run that compiles once, and argument checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax, np_softmax
from jaxcl import train
from jaxcl.strategies import cscct as cc
from jaxcl.strategies.cscct import cscct
from test_replay import after_first, batch_of, config, make_ctx, run_capture


# --- NumPy port of Mammoth's models/cscct_utils/cscct_model.py (float64) ---

def np_sim(a, b, eps=1e-8):
  """``sim_matrix``: cosines with the norms clamped at ``eps``."""
  an = np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
  bn = np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
  return (a / an) @ (b / bn).T


def np_csc(y, f, f_old):
  """``get_csc_loss`` without the weight."""
  idx = (y[:, None] == y[None, :]).astype(int)
  idx[idx == 0] = -1
  return np.mean((1 - np_sim(f, f_old)).flatten() * idx.flatten())


def np_ct(cur, prev, f, f_old, t):
  """``get_ct_loss`` without the weight: ``KLDivLoss()`` (reduction
  'mean': over every element) of log_softmax(current) against
  softmax(previous), times ``t²``."""
  inp = np_log_softmax(np_sim(f[cur], f[prev]) / t)
  target = np_softmax(np_sim(f_old[cur], f_old[prev]) / t)
  return np.mean(target * (np.log(target) - inp)) * t ** 2


csc_loss = jax.jit(cc.csc_loss)
ct_loss = jax.jit(cc.ct_loss, static_argnums=4)


def fixed_case():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(7, 5))
  f_old = f + 0.7 * rng.normal(size=(7, 5))
  f_old[6] = 0.0   # a zero feature vector: the norm clamp, no NaN
  y = np.array([2, 3, 0, 2, 1, 0, 3])
  return f, f_old, y


def test_csc_matches_the_numpy_port():
  f, f_old, y = fixed_case()
  got = csc_loss(jnp.asarray(f, jnp.float32), jnp.asarray(f_old,
                                                             jnp.float32),
                    jnp.asarray(y), jnp.ones(7, bool))
  np.testing.assert_allclose(float(got), np_csc(y, f, f_old), rtol=1e-5)
  # By hand on two rows of different classes: the mean over the 4 pairs
  # of +(1 - cos) on the diagonal and -(1 - cos) off it.
  a = np.array([[1.0, 0.0], [0.0, 2.0]])
  b = np.array([[1.0, 1.0], [0.0, -3.0]])
  c = 1 / np.sqrt(2)   # cos(a0, b0) = cos(a1, b0)
  want = ((1 - c) + (1 - (-1.0)) - (1 - 0.0) - (1 - c)) / 4
  got = csc_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                    jnp.array([0, 1]), jnp.ones(2, bool))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # Masked rows leave the mean: the valid rows' value.
  valid = np.array([1, 1, 0, 1, 1, 1, 0], bool)
  got = csc_loss(jnp.asarray(f, jnp.float32),
                    jnp.asarray(f_old, jnp.float32), jnp.asarray(y),
                    jnp.asarray(valid))
  np.testing.assert_allclose(float(got),
                             np_csc(y[valid], f[valid], f_old[valid]),
                             rtol=1e-5)


def test_ct_matches_the_numpy_port():
  f, f_old, y = fixed_case()
  cur = np.isin(y, [2, 3])     # the current experience's classes
  prev = np.isin(y, [0, 1])    # earlier ones
  for t in (2.0, 0.5):
    got = ct_loss(jnp.asarray(f, jnp.float32),
                     jnp.asarray(f_old, jnp.float32), jnp.asarray(cur),
                     jnp.asarray(prev), t)
    want = np_ct(cur, prev, f, f_old, t)
    assert want > 1e-3
    np.testing.assert_allclose(float(got), want, rtol=1e-4)
  # 'mean', not 'batchmean': 4 current rows x 3 earlier rows, so the mean
  # KL per current row is 3 times the value.
  assert cur.sum() == 4 and prev.sum() == 3
  # A row outside both sets (masked or neither) changes nothing.
  cur2, prev2 = cur.copy(), prev.copy()
  cur2[0] = False
  got = ct_loss(jnp.asarray(f, jnp.float32),
                   jnp.asarray(f_old, jnp.float32), jnp.asarray(cur2),
                   jnp.asarray(prev2), 2.0)
  np.testing.assert_allclose(float(got), np_ct(cur2, prev2, f, f_old, 2.0),
                             rtol=1e-4)
  # Without earlier (or current) rows: 0, with a finite gradient.
  for c, p in ((cur, np.zeros(7, bool)), (np.zeros(7, bool), prev)):
    val, g = jax.jit(jax.value_and_grad(cc.ct_loss), static_argnums=4)(
        jnp.asarray(f, jnp.float32), jnp.asarray(f_old, jnp.float32),
        jnp.asarray(c), jnp.asarray(p), 2.0)
    assert float(val) == 0.0 and np.all(np.isfinite(np.asarray(g)))


def mixed_batch(stream):
  """Rows of experience 1 (classes 2, 3), then of experience 0 (0, 1) as
  a partner appends them, the last one masked."""
  b1, b0 = batch_of(stream.experiences[1], n=6), batch_of(
      stream.experiences[0], n=5)
  out = {k: jnp.concatenate([b1[k], b0[k]]) for k in b1}
  out["mask"] = out["mask"].at[-1].set(0.0)
  return out


def test_hook_is_the_weighted_sum_and_zero_in_the_first_experience(stream):
  ctx = make_ctx(stream)
  s = cscct(csc_weight=3.0, ct_weight=1.5, ct_temperature=2.0)
  e0 = stream.experiences[0]
  batch = mixed_batch(stream)
  # First experience: no previous model, no term, no gradient.
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  ss = state.strategy
  params = jax.tree.map(lambda w: w * 1.3 + 0.01, state.params)
  val, g = jax.jit(jax.value_and_grad(
      lambda p: s.loss(ctx, ss, p, batch, None)))(params)
  assert float(val) == 0.0
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
  # Second experience: the teacher is the model of experience 0's end.
  state, _ = after_first(ctx, s, stream, steps=3)
  ss = state.strategy
  np.testing.assert_array_equal(np.flatnonzero(ss.seen), [0, 1])
  np.testing.assert_array_equal(np.flatnonzero(ss.current), [2, 3])
  leaves, tree = jax.tree.flatten(state.params)
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(tree, [
      w + 1.0 * jnp.asarray(rng.normal(size=w.shape), w.dtype)
      for w in leaves])
  # Each weight scales its own term; 0 turns that term off alone.
  ct_only, csc_only = cscct(csc_weight=0.0, ct_weight=1.0), cscct(
      csc_weight=1.0, ct_weight=0.0)
  # The hook passes its own temperature on (not the default 2).
  ct_cold = cscct(csc_weight=0.0, ct_weight=1.0, ct_temperature=0.05)
  # The same rows with a current-class row (0, class 2 or 3) masked too:
  # it leaves C (and CSC's pairs).
  batch2 = dict(batch, mask=batch["mask"].at[0].set(0.0))
  got, got_ct, got_csc, got_cold, got_ct2 = jax.jit(lambda ss, p, b, b2: [
      m.loss(ctx, ss, p, b, None) for m in (s, ct_only, csc_only,
                                            ct_cold)]
      + [ct_only.loss(ctx, ss, p, b2, None)])(ss, params, batch, batch2)

  def feats(p):
    return np.asarray(ctx.apply(p, {}, batch["x"], batch["task"],
                                features=True)[0], np.float64)

  f, f_old = feats(params), feats(state.params)
  y, ok = np.asarray(batch["y"]), np.asarray(batch["mask"]) > 0
  csc = np_csc(y[ok], f[ok], f_old[ok])
  cur, prev = ok & np.isin(y, [2, 3]), ok & np.isin(y, [0, 1])
  ct = np_ct(cur, prev, f, f_old, 2.0)
  # CT is small here (ReLU features: cosines in [0, 1], a flat softmax at
  # T = 2, and the 'mean' over |P| = 4 earlier rows), hence the atol.
  assert abs(csc) > 1e-2 and ct > 1e-4, (csc, ct)
  np.testing.assert_allclose(float(got), 3.0 * csc + 1.5 * ct, rtol=1e-4)
  np.testing.assert_allclose(float(got_ct), ct, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(got_csc), csc, rtol=1e-4)
  cold = np_ct(cur, prev, f, f_old, 0.05)
  assert abs(cold - ct) > 0.1 * ct, (cold, ct)
  np.testing.assert_allclose(float(got_cold), cold, rtol=1e-4, atol=1e-7)
  ok2 = ok.copy()
  ok2[0] = False
  assert y[0] in (2, 3)
  ct2 = np_ct(cur & ok2, prev, f, f_old, 2.0)
  assert abs(ct2 - ct) > 1e-3 * ct, (ct2, ct)
  np.testing.assert_allclose(float(got_ct2), ct2, rtol=1e-4, atol=1e-7)


def test_teacher_is_the_last_experience_model_and_stays_fixed(stream):
  ctx = make_ctx(stream)
  s = cscct()
  state, step = after_first(ctx, s, stream, steps=3)
  teacher = jax.tree.map(np.asarray, state.strategy.teacher)
  # The model of experience 0's end (before_experience moves no weight).
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  e1 = stream.experiences[1]
  start = jax.tree.map(np.asarray, state.params)
  for i in range(3):
    state = step(state, batch_of(e1, start=10 * i))
  moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in
              zip(jax.tree.leaves(state.params), jax.tree.leaves(start)))
  assert moved > 1e-3
  for a, b in zip(jax.tree.leaves(state.strategy.teacher),
                  jax.tree.leaves(teacher)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # At experience 1's end the teacher becomes that experience's model.
  state = s.after_experience(ctx, state, e1)
  for a, b in zip(jax.tree.leaves(state.strategy.teacher),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.flatnonzero(state.strategy.seen),
                                [0, 1, 2, 3])
  assert not np.any(state.strategy.current)


def test_cscct_with_replay_runs_in_the_loop(monkeypatch, stream):
  cfg = config("replay+cscct", replay=dict(mem_size=40), cscct=dict())
  result, learner = run_capture(monkeypatch, cfg, stream)
  assert learner.chunk_fn._cache_size() == 1  # no recompile
  assert np.all(np.isfinite(result.accuracy))
  assert result.accuracy[1, 0] > 0.3, result.accuracy
  _, ss = result.state.strategy
  np.testing.assert_array_equal(np.flatnonzero(ss.seen), [0, 1, 2, 3])
  for a, b in zip(jax.tree.leaves(ss.teacher),
                  jax.tree.leaves(result.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_arguments(stream):
  for kw, match in ((dict(csc_weight=-1.0),
                     "csc_weight must be a finite number >= 0"),
                    (dict(ct_weight=-0.5), "ct_weight must be"),
                    (dict(csc_weight=float("nan")), "csc_weight"),
                    (dict(csc_weight=0, ct_weight=0.0),
                     "both 0, so cscct would change nothing"),
                    (dict(ct_temperature=0),
                     "ct_temperature must be a finite number > 0, got 0"),
                    (dict(ct_temperature=-2.0), "ct_temperature"),
                    (dict(ct_temperature=float("inf")), "ct_temperature")):
    with pytest.raises(ValueError, match=match):
      cscct(**kw)
  ctx = make_ctx(stream)
  domain = dataclasses.replace(
      ctx, info=dataclasses.replace(ctx.info, kind="domain"))
  with pytest.raises(ValueError, match="domain-incremental.*kind='domain'"):
    cscct().init(domain, jax.random.PRNGKey(0), None)
  # A class that comes again (experience 0 after experience 0).
  s = cscct()
  state, _ = after_first(ctx, s, stream, steps=1)
  with pytest.raises(ValueError, match=r"brings classes \[0, 1\] again"):
    s.before_experience(ctx, state, stream.experiences[0])
