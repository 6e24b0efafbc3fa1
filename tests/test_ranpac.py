"""Mechanism tests of RanPAC (random projection + closed-form ridge head).

The references are NumPy, in float64: explicit sums over stored projected
features, ``np.linalg.solve`` for the ridge head, and the reference's
``optimise_ridge_parameter`` (fit on the 80 % rows, mean squared error on
the 20 %) on stored features; the runs are Split Digits streams
(scikit-learn's digits, 64 pixels).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, scenarios
from jaxcl.strategies import ranpac as ranpac_module
from jaxcl.strategies.ranpac import (accumulate, project, ranpac,
                                     ridge_losses, ridge_solve, split_rows)

from conftest import (max_abs_change, np_features, split_digits_rows,
                      split_predictions)

M = 128


def np_ridge(h, y, lam):
  return np.linalg.solve(h.T @ h + lam * np.eye(h.shape[1]), h.T @ y)


def np_losses(h_fit, y_fit, h_val, y_val, grid):
  """The reference's validation MSE of the ridge fit, per λ."""
  return np.array([np.mean((h_val @ np_ridge(h_fit, y_fit, lam) - y_val)
                           ** 2) for lam in grid])


def test_statistics_head_and_split_equal_numpy():
  rng = np.random.default_rng(0)
  n, d, k = 203, 12, 5
  z = rng.normal(size=(n, d))
  y = rng.integers(0, k, size=n)
  proj = rng.normal(size=(d, 40))
  h = np.maximum(z @ proj, 0.0)
  np.testing.assert_allclose(
      np.asarray(project(jnp.asarray(z, jnp.float32),
                         jnp.asarray(proj, jnp.float32), "relu")), h,
      rtol=1e-4, atol=1e-4)
  # 190 valid rows of 203 (13 padding rows): the split keeps floor(0.8 n)
  # of them to fit, the rest to score, and never a padding row.
  fit, val = (np.asarray(a) for a in split_rows(jax.random.PRNGKey(3),
                                                jnp.int32(190), n))
  assert fit.sum() == 152 and val.sum() == 38
  assert not np.any((fit | val)[190:]) and not np.any(fit & val)
  other, _ = split_rows(jax.random.PRNGKey(4), jnp.int32(190), n)
  assert np.any(np.asarray(other) != fit)   # a draw, not the first rows
  # Chunks of 50 (the last one padded): each mask's sums, no row twice.
  masks = np.stack([fit, val])
  gram, corr = accumulate(
      lambda a: project(a, jnp.asarray(proj, jnp.float32), "relu"),
      jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(masks), k,
      chunk=50)
  onehot = np.eye(k)[y]
  for s, mask in enumerate(masks):
    hm = h[mask]
    scale = np.abs(hm.T @ hm).max()
    np.testing.assert_allclose(np.asarray(gram[s]) / scale,
                               hm.T @ hm / scale, atol=1e-5)
    np.testing.assert_allclose(np.asarray(corr[s]), hm.T @ onehot[mask],
                               rtol=1e-4, atol=1e-3)
  # The head is NumPy's ridge solution on the same features.
  g, c = gram[0] + gram[1], corr[0] + corr[1]
  hv = h[fit | val]
  for lam in (1e-1, 10.0, 1e3):
    want = np_ridge(hv, onehot[fit | val], lam)
    got = np.asarray(ridge_solve(g, c, jnp.float32(lam)))
    np.testing.assert_allclose(got, want, rtol=2e-3,
                               atol=2e-3 * np.abs(want).max())


def test_linear_projection_and_the_fit_count_is_floored():
  """``activation='none'`` keeps the negative projections; the fit part is
  ``floor(0.8 n)`` rows (the reference's ``int(0.8 n)``) for any ``n``."""
  rng = np.random.default_rng(5)
  z, proj = rng.normal(size=(9, 4)), rng.normal(size=(4, 6))
  want = z @ proj
  assert np.mean(want < 0) > 0.3
  np.testing.assert_allclose(
      np.asarray(project(jnp.asarray(z, jnp.float32),
                         jnp.asarray(proj, jnp.float32), "none")), want,
      rtol=1e-5, atol=1e-5)
  for n, n_fit in [(1, 0), (2, 1), (4, 3), (7, 5), (9, 7), (203, 162)]:
    fit, val = (np.asarray(a) for a in split_rows(jax.random.PRNGKey(n),
                                                  jnp.int32(n), 210))
    assert (fit.sum(), val.sum()) == (n_fit, n - n_fit), n
    assert not np.any((fit | val)[n:])


def test_ridge_losses_take_g_as_psd_and_overflow_as_infinite():
  """An eigenvalue of ``G_A`` below 0 (rounding) counts as 0: the error is
  the held-out rows' explicit error of the ridge fit on the PSD part, even
  at the ``λ`` it would cancel; an error that overflows is ``inf``, never
  NaN (argmin would pick a NaN)."""
  rng = np.random.default_rng(6)
  v, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  s = np.array([4.0, 1.0, -1e-3])
  c_fit = rng.normal(size=(3, 2))
  h_val = rng.normal(size=(5, 3))
  y_val = np.eye(2)[rng.integers(0, 2, size=5)]
  grid = np.array([1e-3, 1.0])
  g_psd = v @ np.diag(np.maximum(s, 0.0)) @ v.T
  want = [np.mean((h_val @ np.linalg.solve(g_psd + lam * np.eye(3), c_fit)
                   - y_val) ** 2) for lam in grid]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = np.asarray(ridge_losses(f32(v @ np.diag(s) @ v.T), f32(c_fit),
                                f32(h_val.T @ h_val), f32(h_val.T @ y_val),
                                jnp.float32(5), f32(grid)))
  np.testing.assert_allclose(got, want, rtol=1e-3)
  # Weights of 1e26 at λ = 1e-8: both terms overflow (inf - inf).
  got = np.asarray(ridge_losses(
      jnp.zeros((2, 2)), jnp.full((2, 1), 1e18), jnp.eye(2),
      jnp.full((2, 1), 1e20), jnp.float32(2), f32([1e-8, 1e8])))
  assert got[0] == np.inf and np.isfinite(got[1]), got


def _search(seed, n):
  """The chosen λ on synthetic classes, checked against the explicit
  split."""
  rng = np.random.default_rng(seed)
  k, d = 4, 10
  centres = rng.normal(size=(k, d))
  y = rng.integers(0, k, size=n)
  z = centres[y] + 1.5 * rng.normal(size=(n, d))
  h = np.maximum(z @ rng.normal(size=(d, 64)), 0.0)
  fit, val = (np.asarray(a) for a in split_rows(jax.random.PRNGKey(seed),
                                                jnp.int32(n), n))
  onehot = np.eye(k)[y]
  grid = np.asarray(ranpac_module.RIDGE_GRID)
  want = np_losses(h[fit], onehot[fit], h[val], onehot[val], grid)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = np.asarray(ridge_losses(
      f32(h[fit].T @ h[fit]), f32(h[fit].T @ onehot[fit]),
      f32(h[val].T @ h[val]), f32(h[val].T @ onehot[val]),
      jnp.float32(val.sum()), f32(grid)))
  assert got.argmin() == want.argmin(), (got, want)
  # Where the fit is not wild (λ >= 1e-2; below it float32 cannot hold
  # the near-singular solutions), each λ's error within 1 %.
  ok = grid >= 1e-2
  np.testing.assert_allclose(got[ok], want[ok], rtol=1e-2)
  assert want.min() < 0.9 * want[-1]   # the search matters here
  return float(grid[want.argmin()])


def test_ridge_search_from_statistics_equals_the_explicit_split():
  """Fewer or more rows than the 64 projected features: the best λ moves,
  and the error of each λ from second moments equals the held-out rows'
  explicit error."""
  chosen = [_search(s, n) for s, n in [(0, 150), (1, 400), (2, 900)]]
  assert len(set(chosen)) >= 2, chosen


def _config(**strategy_args):
  c = jaxcl.default_config()   # Split Digits, 5 experiences, batch 32
  c.strategy.name = "ranpac"
  c.strategy.ranpac = {"features": "input", "proj_dim": M, **strategy_args}
  c.report.progress = False
  return c


@pytest.fixture(scope="module")
def digits_run():
  c = _config()
  c.train.epochs = 2   # the second pass must fold nothing in again
  return jaxcl.run(c)


def _flat(a):
  return a.reshape(len(a), -1).astype(np.float64)


def _check_last_search(r, sc, h4, y4, grid):
  """The run's last λ and errors are the explicit 80/20 search's over
  ``grid`` on the last experience's projected rows ``h4`` (the split drawn
  as the strategy draws it)."""
  ss = r.state.strategy
  e4 = sc.experiences[4]
  fit, val = (np.asarray(a)[:e4.num_train] for a in split_rows(
      jax.random.fold_in(ss.key, 4), jnp.int32(e4.num_train),
      r.learner.ctx.info.train_size))
  want = np_losses(h4[fit], y4[fit], h4[val], y4[val], grid)
  assert float(ss.ridge) == pytest.approx(grid[want.argmin()])
  # (Pixels up to 16 give a larger G than the synthetic features: float32
  # holds the solutions from λ = 1 on, the chosen λ 10 among them.)
  ok = grid >= 1.0
  assert np.asarray(ss.losses).shape == grid.shape
  np.testing.assert_allclose(np.asarray(ss.losses)[ok], want[ok], rtol=1e-2)


def test_split_digits_statistics_head_and_search(digits_run, digits):
  r = digits_run
  ss = r.state.strategy
  sc = scenarios.split(digits, 5)
  proj = np.asarray(ss.proj, np.float64)
  assert proj.shape == (64, M)
  assert abs(proj.std() - 1.0) < 0.05 and abs(proj.mean()) < 0.05
  hs = [np.maximum(_flat(e.train_x) @ proj, 0.0) for e in sc.experiences]
  ys = [np.eye(10)[e.train_y] for e in sc.experiences]
  h, onehot = np.concatenate(hs), np.concatenate(ys)
  # Every training row once (two epochs; experiences of unequal sizes are
  # padded to the largest), G and C their explicit sums.
  np.testing.assert_array_equal(np.asarray(ss.count), onehot.sum(0))
  scale = np.abs(h.T @ h).max()
  np.testing.assert_allclose(np.asarray(ss.gram) / scale, h.T @ h / scale,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(ss.corr), h.T @ onehot, rtol=1e-4,
                             atol=1e-2)
  # The last experience's λ is the one the explicit 80/20 search on its
  # own rows picks (the split drawn as the strategy draws it) ...
  grid = np.asarray(ranpac_module.RIDGE_GRID)
  _check_last_search(r, sc, hs[4], ys[4], grid)
  # ... and the head is the ridge solution on all the rows with that λ.
  w = np_ridge(h, onehot, float(ss.ridge))
  np.testing.assert_allclose(np.asarray(ss.weight), w, rtol=2e-3,
                             atol=2e-3 * np.abs(w).max())
  # The predictions are those of that head, and so is the run's own
  # evaluation, experience by experience.
  tx = np.concatenate([e.test_x for e in sc.experiences])
  ty = np.concatenate([e.test_y for e in sc.experiences])
  ours = np.asarray(r.learner.strategy.predict(
      r.learner.ctx, ss, r.state.params, r.state.model_state,
      jnp.asarray(tx), jnp.zeros(len(tx), jnp.int32))).argmax(1)
  want_pred = (np.maximum(_flat(tx) @ proj, 0.0) @ w).argmax(1)
  assert np.mean(ours == want_pred) > 0.995
  sizes = np.cumsum([0] + [len(e.test_y) for e in sc.experiences])
  per = [np.mean(ours[a:b] == ty[a:b]) for a, b in zip(sizes, sizes[1:])]
  np.testing.assert_allclose(r.accuracy[-1], per, atol=1e-6)
  assert r.metrics["acc"] > 0.9


def test_the_given_ridge_grid_is_searched(digits):
  grid = (2.0, 30.0, 500.0)   # none of them on the default grid
  r = jaxcl.run(_config(ridge_grid=grid))
  sc = scenarios.split(digits, 5)
  e4 = sc.experiences[4]
  h4 = np.maximum(_flat(e4.train_x) @ np.asarray(r.state.strategy.proj,
                                                  np.float64), 0.0)
  _check_last_search(r, sc, h4, np.eye(10)[e4.train_y], np.asarray(grid))


def test_fixed_ridge_and_no_projection(digits, tmp_path):
  c = _config(ridge=3.0, proj_dim=0, activation="none")
  c.train.epochs = 1
  # Checkpointed after each experience (no empty array in the state).
  r = jaxcl.run(c, str(tmp_path))
  ss = r.state.strategy
  assert ss.proj.shape == (1, 1)
  sc = scenarios.split(digits, 5)
  x = np.concatenate([_flat(e.train_x) for e in sc.experiences])
  y = np.eye(10)[np.concatenate([e.train_y for e in sc.experiences])]
  assert ss.gram.shape == (64, 64) and float(ss.ridge) == 3.0
  w = np_ridge(x, y, 3.0)
  np.testing.assert_allclose(np.asarray(ss.weight), w, rtol=2e-3,
                             atol=2e-3 * np.abs(w).max())


def test_classes_not_seen_yet_are_left_out(digits, digits_run):
  """After experience 0, no test row goes to a class other than 0 or 1;
  before it, the model's own logits."""
  r = digits_run
  sc = scenarios.split(digits, 5)
  ctx, strategy = r.learner.ctx, r.learner.strategy
  c = _config()
  state = experiment.initial_state(experiment.setup(c), c.seed)
  tx = jnp.asarray(np.concatenate([e.test_x for e in sc.experiences]))
  t0 = jnp.zeros(len(tx), jnp.int32)
  np.testing.assert_array_equal(
      np.asarray(strategy.predict(ctx, state.strategy, state.params,
                                  state.model_state, tx, t0)),
      np.asarray(ctx.logits(state.params, state.model_state, tx, t0)))
  state = strategy.after_experience(ctx, state, sc.experiences[0])
  ss = state.strategy
  scores = np.asarray(strategy.predict(ctx, ss, state.params,
                                       state.model_state, tx, t0))
  assert set(np.unique(scores.argmax(1))) <= {0, 1}
  assert np.all(scores[:, 2:] <= -1e8)
  # Unmasked, the unseen classes score 0 (their columns of C are 0),
  # which wins wherever both seen classes score below 0 (no test row here;
  # the mask makes it never, not rarely).
  raw = np.asarray(project(tx.reshape(len(tx), -1), ss.proj, "relu")
                   @ ss.weight)
  np.testing.assert_array_equal(raw[:, 2:], 0.0)


def _assert_gram_of(r, ss, params, model_state, digits):
  """``G`` is ``Σ h hᵀ`` of every training row's ReLU-projected features
  under ``params`` / ``model_state``."""
  x, _ = split_digits_rows(digits)
  z = np_features(r.learner.ctx, params, model_state, x)
  h = np.maximum(z @ np.asarray(ss.proj, np.float64), 0.0)
  scale = np.abs(h.T @ h).max()
  np.testing.assert_allclose(np.asarray(ss.gram) / scale, h.T @ h / scale,
                             atol=1e-5)


def test_backbone_is_frozen_as_the_stream_starts(digits):
  """Weight decay moves the model under zero gradients; the statistics are
  still those of the initial model's features."""
  c = _config()
  c.strategy.ranpac = dict(features="backbone", proj_dim=M)
  c.model.widths = (16,)
  c.optimizer.name = "sgd"
  c.optimizer.weight_decay = 0.5
  c.train.epochs = 1
  r = jaxcl.run(c)
  init = experiment.initial_state(experiment.setup(c), c.seed)
  assert max_abs_change(init.params, r.state.params) > 1e-3
  ss = r.state.strategy
  assert max_abs_change(init.params, ss.params) == 0.0
  _assert_gram_of(r, ss, init.params, init.model_state, digits)
  # The scores are the head's on the frozen copy's features, whatever
  # parameters are passed (here zeros, and they are not the model's).
  zeros = jax.tree.map(jnp.zeros_like, r.state.params)
  tx, _ = split_digits_rows(digits, "test")
  scores = np.asarray(r.learner.strategy.predict(
      r.learner.ctx, ss, zeros, r.state.model_state, jnp.asarray(tx),
      jnp.zeros(len(tx), jnp.int32)))
  tz = np_features(r.learner.ctx, init.params, init.model_state, tx)
  want = np.maximum(tz @ np.asarray(ss.proj, np.float64), 0.0) @ np.asarray(
      ss.weight, np.float64)
  np.testing.assert_allclose(scores, want, rtol=1e-3,
                             atol=1e-3 * np.abs(want).max())
  assert r.metrics["acc"] > 0.7


def test_backbone_features_in_evaluation_mode(digits):
  """A batch-norm backbone: ``G`` is of the initial model's features with
  its initial running averages, not of batch statistics, nor of the
  running averages the engine's steps have moved since."""
  c = _config()
  c.strategy.ranpac = dict(features="backbone", proj_dim=M)
  c.model.name, c.model.bn_mlp = "bn_mlp", dict(widths=(16,))
  r = jaxcl.run(c)
  init = experiment.initial_state(experiment.setup(c), c.seed)
  ss = r.state.strategy
  assert max_abs_change(init.model_state, r.state.model_state) > 1e-2
  assert max_abs_change(init.model_state, ss.model_state) == 0.0
  _assert_gram_of(r, ss, init.params, init.model_state, digits)


def test_adapt_first_trains_then_freezes(digits):
  """Phase 1: the first experience moves the model; from its end on the
  model is restored after every update (weight decay cannot move it) and
  the features are that model's."""
  c = _config()
  c.strategy.ranpac = dict(features="backbone", proj_dim=M,
                           adapt_first=True)
  c.model.widths = (16,)
  c.optimizer.weight_decay = 0.01
  c.train.epochs = 1
  r = jaxcl.run(c)
  init = experiment.initial_state(experiment.setup(c), c.seed)
  ss = r.state.strategy
  assert bool(ss.frozen)
  assert max_abs_change(init.params, r.state.params) > 1e-2
  assert max_abs_change(r.state.params, ss.params) == 0.0
  ones = jax.tree.map(jnp.ones_like, r.state.params)
  out = r.learner.strategy.update_grads(r.learner.ctx, ss, ones,
                                        r.state.params, {}, None)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(out))
  _assert_gram_of(r, ss, ss.params, ss.model_state, digits)
  assert r.metrics["acc"] > 0.7


def test_task_incremental_scores_stay_in_the_task(digits, digits_run):
  c = _config()
  c.scenario.kind = "task"
  r = jaxcl.run(c)
  pred, tt = split_predictions(r, digits)
  np.testing.assert_array_equal(pred // 2, tt)   # tasks are class pairs
  assert np.mean(r.accuracy[-1]) > np.mean(digits_run.accuracy[-1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(proj_dim=-1), "ranpac: proj_dim must be an int >= 0"),
    (dict(proj_dim=64.0), "ranpac: proj_dim must be an int >= 0"),
    (dict(proj_dim=15001), r"ranpac: proj_dim=15001 .* at most 15000"),
    (dict(activation="tanh"), "ranpac: unknown activation 'tanh'"),
    (dict(proj_dim=0), "ranpac: proj_dim=0 .* activation='none'"),
    (dict(ridge=0.0), "ranpac: ridge must be a finite number > 0"),
    (dict(ridge=float("nan")), "ranpac: ridge must be a finite number"),
    (dict(ridge_grid=()), "ranpac: ridge_grid must be a non-empty"),
    (dict(ridge_grid="1e-3"), "ranpac: ridge_grid must be a non-empty"),
    (dict(ridge_grid=(1.0, -1.0)), r"ranpac: ridge_grid\[1\] must be a "
     "finite number > 0"),
    (dict(features="pixels"), "ranpac: unknown features 'pixels'"),
    (dict(adapt_first="yes"), "ranpac: adapt_first must be True or False"),
    (dict(features="input", adapt_first=True),
     "ranpac: adapt_first=True .* needs features='backbone'"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ranpac(**kwargs)


def test_features_too_wide_without_a_projection():
  c = _config(proj_dim=0, activation="none")
  c.strategy.ranpac["features"] = "backbone"
  c.model.widths = (16000,)
  with pytest.raises(ValueError, match=r"ranpac: proj_dim=0 uses the 16000 "
                     r"features.*at most 15000"):
    experiment.initial_state(experiment.setup(c), 0)
  assert ranpac_module.MAX_DIM == 15000


def test_config_variants_build():
  from experiments import split_mnist_analytic as mod
  from jaxcl import strategies
  for arg, dim in [("strategy=ranpac,features=input", 10000),
                   ("strategy=ranpac,features=backbone,proj_dim=2000", 2000)]:
    c = mod.get_config(arg)
    kwargs = dict(c.strategy.ranpac)
    assert kwargs["proj_dim"] == dim
    assert strategies.from_spec("ranpac", {"ranpac": kwargs})[0].name == (
        "ranpac")
    assert (c.train.batch_size, c.train.epochs, c.scenario.kind,
            c.model.widths) == (10, 1, "class", (100, 100))
  # quick (the smoke runs): a small projection.
  c = mod.get_config("strategy=ranpac,quick")
  assert c.strategy.ranpac["proj_dim"] == 256
