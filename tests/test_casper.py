"""CaSpeR (jaxcl/strategies/casper.py): the k-NN adjacency, its gradient
and the Laplacian against a NumPy port of Mammoth's ``calc_ADL_knn`` /
``normalize_A``, the loss against NumPy's eigenvalues, descent separating
clusters, the balanced draw, no effect (and no NaN) on an empty or
one-class memory, argument checks, and casper+replay in the normal loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import buffers, train
from jaxcl.strategies import casper as cs
from jaxcl.strategies.casper import casper
from test_replay import batch_of, config, run_capture
from test_replay import make_ctx as replay_make_ctx


# --- NumPy port of Mammoth's spectral_analysis.py / knn.py (float64) ------

def np_knn_hard(d, k):
  """``calc_ADL_knn``'s forward adjacency: top-k smallest with the
  diagonal at +inf, then ``((A + A.T) > 0)``."""
  a = d.copy()
  np.fill_diagonal(a, np.inf)
  hard = np.zeros_like(a)
  idx = np.argsort(a, axis=1, kind="stable")[:, :k]
  hard[np.arange(len(a))[:, None], idx] = 1.0
  return ((hard + hard.T) > 0).astype(np.float64)


def np_soft_w(d, k):
  """``NeuralNearestNeighbors(k)`` at temperature 1 on ``-d`` (diagonal
  -inf), summed over the k rounds and symmetrised: the part of ``A``
  that carries the gradient."""
  z = -d.astype(np.float64)
  np.fill_diagonal(z, -np.inf)
  w = np.zeros_like(z)
  for _ in range(k):
    m = np.max(z, axis=1, keepdims=True)
    lw = z - m - np.log(np.sum(np.exp(z - m), axis=1, keepdims=True))
    w += np.exp(lw)
    with np.errstate(divide="ignore"):
      z = z + np.log(-np.expm1(lw))
  return w + w.T


def np_laplacian(a):
  inv = np.diag(a.sum(1) ** -0.5)
  return np.eye(len(a)) - inv @ a @ inv


def np_dist(f):
  return ((f[None, :, :] - f[:, None, :]) ** 2).sum(-1)


def test_adjacency_gradient_and_laplacian_match_the_numpy_port():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(12, 4)) * 0.6
  d = np_dist(f)
  k = 3
  a = jax.jit(cs.knn_adjacency, static_argnums=1)(jnp.asarray(d, jnp.float32),
                                                   k)
  hard = np_knn_hard(d, k)
  # 0/1 up to the rounding of hard + w - sg(w) (the code's too)
  np.testing.assert_allclose(np.asarray(a), hard, atol=1e-6)
  assert hard.sum(1).min() >= k and hard.sum(1).max() > k  # symmetrised
  lap = jax.jit(cs.normalised_laplacian)(a)
  np.testing.assert_allclose(np.asarray(lap), np_laplacian(hard), atol=1e-6)
  # The straight-through gradient: the derivative of A along a symmetric
  # perturbation of the distances is that of the soft weights (central
  # differences of the NumPy port).
  delta = rng.normal(size=d.shape)
  delta = delta + delta.T
  np.fill_diagonal(delta, 0.0)
  _, jvp = jax.jit(lambda x, t: jax.jvp(lambda x: cs.knn_adjacency(x, k),
                                         (x,), (t,)))(
      jnp.asarray(d, jnp.float32), jnp.asarray(delta, jnp.float32))
  eps = 1e-5
  fd = (np_soft_w(d + eps * delta, k) - np_soft_w(d - eps * delta, k)) / (
      2 * eps)
  np.testing.assert_allclose(np.asarray(jvp), fd, rtol=2e-3,
                             atol=2e-4 * np.abs(fd).max())
  assert np.abs(fd).max() > 1e-2


def test_loss_is_the_eigengap_of_numpy_eigenvalues():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(10, 3))
  cases = ((3, 2), (4, 1), (2, 3))
  # One program for the three cases (each compile costs more than its run).
  terms = jax.jit(lambda f: [cs.casper_term(f, k, p) for k, p in cases])(
      jnp.asarray(f, jnp.float32))
  for (k, p), got in zip(cases, terms):
    got = float(got)
    ev = np.linalg.eigvalsh(np_laplacian(np_knn_hard(np_dist(f), k)))
    want = ev[:p + 1].sum() - ev[p + 1]   # the code's indices
    np.testing.assert_allclose(got, want, atol=2e-5)
    # not the paper's g = p (sum of p, minus the (p+1)-th)
    assert abs(got - (ev[:p].sum() - ev[p])) > 1e-3
  # The features enter through squared distances: the gradient in f is
  # the chain rule of d_ij = |f_i - f_j|^2 applied to the one in d.
  k, p = 3, 2
  fj = jnp.asarray(f, jnp.float32)
  g_f = np.asarray(jax.jit(jax.grad(lambda x: cs.casper_term(x, k, p)))(fj))
  g_d = np.asarray(jax.jit(lambda fj: jax.grad(
      lambda d: cs.eigengap_loss(jnp.linalg.eigvalsh(
          cs.normalised_laplacian(cs.knn_adjacency(d, k))), p))(
              cs.sq_distances(fj)))(fj), np.float64)
  diff = f[:, None, :] - f[None, :, :]                  # f_i - f_j
  hand = 2 * np.einsum("ij,ijk->ik", g_d + g_d.T, diff)
  np.testing.assert_allclose(g_f, hand, rtol=1e-3, atol=1e-4 * np.abs(
      hand).max())
  assert np.abs(hand).max() > 1e-3


def test_descent_widens_the_eigengap():
  """Features ``x W`` of three overlapping classes; descending the loss
  in ``W`` lowers it and widens the eigengap of the kNN graph, pulling it
  towards p + 1 components.

  The term sees no labels, so which clusters form follows the features:
  the count of cross-class edges after descent rose on half of twelve
  seeds tried, and flipped on this seed with XLA's optimisation level
  (hard kNN makes the path chaotic). Aligning clusters with classes is
  the job of the balanced draw (tested below) and the classification
  loss, not a property of this term."""
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(3, 6)) * 0.8
  x = jnp.asarray(np.repeat(centres, 6, axis=0)
                  + rng.normal(size=(18, 6)), jnp.float32)
  w0 = jnp.asarray(rng.normal(size=(6, 4)) * 0.5, jnp.float32)
  k, p = 4, 2

  @jax.jit
  def loss(w):
    return cs.casper_term(x @ w, k, p)

  def gap(w):
    f = np.asarray(x @ w, np.float64)
    ev = np.linalg.eigvalsh(np_laplacian(np_knn_hard(np_dist(f), k)))
    return ev[p + 1] - ev[p]

  step = jax.jit(lambda w: w - 0.5 * jax.grad(loss)(w))
  w = w0
  for _ in range(150):
    w = step(w)
  gap0, gap1 = gap(w0), gap(w)
  assert float(loss(w)) < float(loss(w0)) - 0.2, (loss(w0), loss(w))
  assert gap1 > gap0 + 0.2, (gap0, gap1)


def memory_with(counts, capacity=40, dim=3):
  """A memory holding ``counts[c]`` entries of class ``c``, in shuffled
  slots (the rest empty); x[i] = slot index, to identify rows."""
  mem = buffers.init(capacity, (dim,))
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
  slots = np.random.default_rng(3).permutation(capacity)[:len(labels)]
  y = np.zeros(capacity, np.int32)
  y[slots] = labels
  valid = np.zeros(capacity, bool)
  valid[slots] = True
  x = np.repeat(np.arange(capacity, dtype=np.float32)[:, None], dim, 1)
  return mem._replace(x=jnp.asarray(x), y=jnp.asarray(y),
                      valid=jnp.asarray(valid),
                      seen=jnp.asarray(len(labels), jnp.int32))


@pytest.mark.parametrize("counts,r,p,n_want,shares,allowed", [
    ((10, 10, 3, 8), 8, 2, 2, (4, 4), {0, 1, 3}),       # class 2 too small
    ((10, 10, 3, 4), 9, 2, 2, (5, 4), {0, 1}),         # quota 5: not 3
    ((10, 10, 3, 8), 9, 3, 3, (3, 3, 3), {0, 1, 2, 3}),
    ((10, 2), 8, 2, 1, (8,), {0}),                     # reduced to one class
    ((10, 4), 9, 2, 1, (9,), {0}),                     # 4 < ceil(9 / 2)
])
def test_balanced_draw(counts, r, p, n_want, shares, allowed):
  mem = memory_with(counts)
  draw = jax.jit(cs.balanced_draw, static_argnums=(2, 3, 4))
  picked = set()
  for seed in range(12):
    idx, ok, n = draw(mem, jax.random.PRNGKey(seed), r, p, 6)
    idx = np.asarray(idx)
    assert int(n) == n_want and np.all(np.asarray(ok))
    assert len(set(idx)) == r and np.all(np.asarray(mem.valid)[idx])
    labels, per = np.unique(np.asarray(mem.y)[idx], return_counts=True)
    assert set(labels) <= allowed and len(labels) == n_want
    assert sorted(per, reverse=True) == list(shares)
    picked |= set(labels)
  assert picked == allowed  # every eligible class gets drawn


def test_balanced_draw_takes_each_classs_rows_uniformly():
  """Within a class the rows are drawn uniformly without replacement
  (the code's ``np.random.choice(..., replace=False)``): over many keys
  every entry of a class of 10 that gives 4 rows a draw is taken with
  frequency 4 / 10, whichever slot it sits in."""
  mem = memory_with((10, 10, 0, 1))
  draws = jax.jit(jax.vmap(lambda k: cs.balanced_draw(mem, k, 8, 2, 6)[0]))(
      jax.random.split(jax.random.PRNGKey(5), 400))
  freq = np.bincount(np.asarray(draws).ravel(), minlength=40) / 400
  valid = np.asarray(mem.valid)
  y = np.asarray(mem.y)
  for c in (0, 1):
    f = freq[valid & (y == c)]
    assert len(f) == 10 and np.all(np.abs(f - 0.4) < 0.1), f
  assert np.all(freq[~valid] == 0) and freq[valid & (y == 3)].sum() == 0


def test_balanced_draw_without_a_large_enough_class():
  mem = memory_with((3, 2))
  idx, ok, n = jax.jit(cs.balanced_draw, static_argnums=(2, 3, 4))(
      mem, jax.random.PRNGKey(0), 8, 2, 6)
  assert int(n) == 0 and not np.any(np.asarray(ok))


def test_gradient_is_finite_for_repeated_eigenvalues_and_far_clusters():
  """Three far, tight clusters with k below their size: a disconnected
  graph (eigenvalue 0 three times), and softmax weights of exactly 1
  (log(1 - 1) in log1mexp). The gradient is finite, and matches the
  finite difference of the loss."""
  rng = np.random.default_rng(4)
  f = (np.repeat(np.eye(3, 4) * 50.0, 5, axis=0)
       + rng.normal(size=(15, 4)) * 0.3)
  f = jnp.asarray(f, jnp.float32)
  ev = np.linalg.eigvalsh(np_laplacian(np_knn_hard(np_dist(
      np.asarray(f, np.float64)), 3)))
  assert np.sum(np.abs(ev) < 1e-6) == 3
  g = jax.jit(jax.grad(lambda f: cs.casper_term(f, 3, 2)))(f)
  assert np.all(np.isfinite(np.asarray(g)))
  # identical rows too (an all-zero draw)
  g0 = jax.jit(jax.grad(lambda f: cs.casper_term(f, 3, 2)))(
      jnp.zeros((10, 4)))
  assert np.all(np.isfinite(np.asarray(g0)))


# test_replay's context on this file's smaller MLP (one hidden layer of 16).
make_ctx = functools.partial(replay_make_ctx, widths=(16,))


def test_no_effect_on_an_empty_or_one_class_memory(stream):
  ctx = make_ctx(stream)
  s = casper(rho=1.0, knn_laplace=4, mem_size=40)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy._replace(experience=jnp.asarray(1, jnp.int32))
  e0, e1 = stream.experiences
  prep = jax.jit(s.prepare_batch, static_argnums=0)
  lossgrad = jax.jit(jax.value_and_grad(
      lambda p, ss, b: s.loss(ctx, ss, p, b, None), argnums=0))

  def check(ss, on, key=0):
    b = prep(ctx, ss, batch_of(e0), jax.random.PRNGKey(key))
    assert float(b["casper_on"]) == on
    val, g = lossgrad(state.params, ss, b)
    leaves = [np.asarray(x) for x in jax.tree.leaves(g)]
    assert all(np.all(np.isfinite(x)) for x in leaves)
    if not on:
      assert float(val) == 0.0 and all(np.all(x == 0) for x in leaves)
    return float(val), leaves

  check(ss, 0.0)                           # empty
  info = lambda b: train.StepInfo(None, None, None, None, b, jnp.zeros(()))
  one = e0.train_y == 0
  after = jax.jit(s.after_step, static_argnums=0)
  for i in range(3):                       # 30 rows of class 0 only
    b = {"x": jnp.asarray(e0.train_x[one][10 * i:10 * i + 10]),
         "y": jnp.zeros((10,), jnp.int32), "task": jnp.zeros((10,), jnp.int32),
         "mask": jnp.ones((10,))}
    ss = after(ctx, ss, info(b))
  assert int(buffers.size(ss.memory)) == 30
  check(ss, 0.0)                           # one class
  for i in range(2):
    ss = after(ctx, ss, info(batch_of(e1, start=10 * i)))
  val, leaves = check(ss, 1.0)             # classes 0, 2, 3: acts
  assert max(np.abs(x).max() for x in leaves) > 1e-6
  # The term is rho times the eigengap of the drawn rows' graph (rho = 1
  # above would hide a lost or squared rho).
  b = prep(ctx, ss, batch_of(e0), jax.random.PRNGKey(0))
  feats = ctx.apply(state.params, ss.model_state, b["casper_x"],
                    b["casper_task"], train=True, features=True)[0]
  ev = np.linalg.eigvalsh(np_laplacian(np_knn_hard(np_dist(
      np.asarray(feats, np.float64)), 4)))
  pp = ctx.info.num_classes // ctx.info.num_experiences
  np.testing.assert_allclose(val, ev[:pp + 1].sum() - ev[pp + 1], rtol=1e-4,
                             atol=1e-5)
  s3 = casper(rho=0.3, knn_laplace=4, mem_size=40)
  val3 = float(jax.jit(lambda p, ss, b: s3.loss(ctx, ss, p, b, None))(
      state.params, ss, b))
  np.testing.assert_allclose(val3, 0.3 * val, rtol=1e-5)
  # ... but not during the first experience (the code: current_task > 0)
  check(ss._replace(experience=jnp.asarray(0, jnp.int32)), 0.0)


def test_each_step_draws_its_own_rows(stream):
  """prepare_batch draws from the key it is given: different keys, different
  memory rows (of the balanced classes)."""
  ctx = make_ctx(stream)
  s = casper(knn_laplace=4, mem_size=40)
  ss = train.init_state(ctx, s, 0).strategy
  ss = ss._replace(experience=jnp.asarray(1, jnp.int32))
  e0, e1 = stream.experiences
  info = lambda b: train.StepInfo(None, None, None, None, b, jnp.zeros(()))
  after = jax.jit(s.after_step, static_argnums=0)
  for i in range(2):
    ss = after(ctx, ss, info(batch_of(e0, start=10 * i)))
    ss = after(ctx, ss, info(batch_of(e1, start=10 * i)))
  prep = jax.jit(lambda ss, k: s.prepare_batch(ctx, ss, batch_of(e0), k))
  draws = set()
  for k in range(5):
    b = prep(ss, jax.random.PRNGKey(k))
    assert float(b["casper_on"]) == 1.0
    draws.add(np.asarray(b["casper_x"]).tobytes())
  assert len(draws) == 5


def test_own_memory_is_class_balanced(stream):
  """60 rows of class 0, then 20 of class 2, into 40 slots: the greedy
  class-balanced memory ends 20 / 20 (a reservoir would keep ~30 / 10)."""
  ctx = make_ctx(stream)
  s = casper(knn_laplace=4, mem_size=40)
  ss = train.init_state(ctx, s, 0).strategy
  info = lambda b: train.StepInfo(None, None, None, None, b, jnp.zeros(()))
  e0, e1 = stream.experiences
  step = jax.jit(s.after_step, static_argnums=0)
  for c, exp, n in ((0, e0, 6), (2, e1, 2)):
    rows = exp.train_y == c
    for i in range(n):
      ss = step(ctx, ss, info({
          "x": jnp.asarray(exp.train_x[rows][10 * i:10 * i + 10]),
          "y": jnp.full((10,), c, jnp.int32),
          "task": jnp.zeros((10,), jnp.int32), "mask": jnp.ones((10,))}))
  counts = np.asarray(buffers.counts(ss.memory, 10))
  assert counts[0] == counts[2] == 20 and counts.sum() == 40, counts


def test_casper_with_replay_runs_in_the_loop(monkeypatch, stream):
  cfg = config("casper+replay",
               casper=dict(mem_size=40, knn_laplace=5, rho=0.1),
               replay=dict(mem_size=40))
  result, learner = run_capture(monkeypatch, cfg, stream)
  assert learner.chunk_fn._cache_size() == 1  # no recompile
  assert np.all(np.isfinite(result.accuracy))
  assert result.accuracy[1, 0] > 0.3, result.accuracy
  ss, ss_replay = result.state.strategy
  total = sum(e.num_train for e in stream.experiences)
  assert int(ss.memory.seen) == total == int(ss_replay.memory.seen)
  # Class-balanced: four classes, ten entries each.
  np.testing.assert_array_equal(np.asarray(buffers.counts(ss.memory, 10))[:4],
                                [10] * 4)


def test_bad_arguments(stream):
  for kw, match in ((dict(rho=0), "rho must be a finite number > 0"),
                    (dict(rho=-1.0), "rho"),
                    (dict(rho=float("nan")), "rho"),
                    (dict(knn_laplace=0), "knn_laplace must be an int >= 1"),
                    (dict(knn_laplace=2.5), "knn_laplace"),
                    (dict(casper_batch=-1), "casper_batch must be an int"),
                    (dict(p=-1), "p must be an int >= 0"),
                    (dict(mem_size=0), "mem_size"),
                    (dict(mem_size=5, casper_batch=8),
                     "casper_batch=8 is larger than the memory capacity "
                     "mem_size=5")):
    with pytest.raises(ValueError, match=match):
      casper(**kw)
  ctx = make_ctx(stream)  # batch 10, 10 classes, 2 experiences: p = 5
  for kw, match in ((dict(), "knn_laplace=10 must be smaller than "
                     "casper_batch=10 .*; use knn_laplace <= 9 or "
                     "casper_batch >= 11"),
                    # One row: no smaller k would do, only more rows.
                    (dict(casper_batch=1, knn_laplace=5), "casper_batch=1 "
                     r"\(the rows of the graph\); use casper_batch >= 6"),
                    (dict(knn_laplace=3, p=9), "p=9 needs casper_batch >= "
                     "p \\+ 2 = 11"),
                    (dict(knn_laplace=3, mem_size=8, casper_batch=8),
                     "mem_size=8 is smaller than the number of classes"),
                    (dict(knn_laplace=3, mem_size=8),
                     "casper_batch=10 is larger than the memory capacity")):
    with pytest.raises(ValueError, match=match):
      casper(**kw).init(ctx, jax.random.PRNGKey(0), None)
  # The edges that are allowed: one slot per class, k = r - 1, p + 2 = r.
  casper(knn_laplace=7, mem_size=10, casper_batch=8, p=6).init(
      ctx, jax.random.PRNGKey(0), None)
