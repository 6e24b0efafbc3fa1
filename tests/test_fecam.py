"""Mechanism tests of FeCAM (per-class Mahalanobis over a frozen backbone).

The references are NumPy ports, in float64, of the authors' and
Avalanche's ``_tukeys_transform``, ``shrink_cov`` (applied twice),
``normalize_cov`` and ``_mahalanobis`` (``np.linalg.pinv``); the runs are
Split Digits streams (scikit-learn's digits, 64 pixels, MLP 400-400).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, scenarios
from jaxcl.strategies import fecam as fecam_module
from jaxcl.strategies.fecam import (class_statistics, fecam, mahalanobis,
                                    normalize_cov, shrink_cov,
                                    tukey_transform)

from conftest import (check_frozen_after_first_experience, max_abs_change,
                      np_features, split_digits_rows, split_predictions)


def ref_shrink(cov, a1=1.0, a2=1.0):
  """The references' ``shrink_cov``."""
  diag_mean = np.mean(np.diagonal(cov))
  off = cov.copy()
  np.fill_diagonal(off, 0.0)
  mask = off != 0.0
  off_mean = (off * mask).sum() / mask.sum()
  iden = np.eye(len(cov))
  return cov + a1 * diag_mean * iden + a2 * off_mean * (1 - iden)


def ref_normalize(cov):
  sd = np.sqrt(np.diagonal(cov))
  return cov / np.outer(sd, sd)


def ref_precision(z, a1=1.0, a2=1.0):
  """Transformed features of one class -> Σ^{-1} (shrunk twice, normalised,
  pinv), as the references compute it."""
  cov = ref_shrink(ref_shrink(np.cov(z.T), a1, a2), a1, a2)
  return np.linalg.pinv(ref_normalize(cov))


def ref_mahalanobis(x, mean, prec):
  """The references' ``_mahalanobis`` (with the inverse given)."""
  unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True),
                                  1e-12)
  d = unit(x) - unit(mean)
  return np.einsum("bd,de,be->b", d, prec, d)


def test_tukey_shrink_normalise_match_the_reference():
  rng = np.random.default_rng(0)
  f = np.maximum(rng.normal(size=(30, 6)), 0.0)
  f[:, 2] = 0.0   # a dead unit: its covariances are exactly 0, and the
  #                 reference's V2 leaves them out of the mean
  np.testing.assert_allclose(np.asarray(tukey_transform(jnp.asarray(f),
                                                        0.5)),
                             np.sqrt(f), rtol=1e-6)
  # A negative feature (not post-ReLU) is clipped, not NaN.
  np.testing.assert_array_equal(
      np.asarray(tukey_transform(jnp.asarray([-1.0, 0.0, 4.0]), 0.5)),
      [0.0, 0.0, 2.0])
  z = np.sqrt(f)
  cov = np.cov(z.T)
  assert np.sum(cov == 0) == 11   # row and column 2
  for a1, a2 in [(1.0, 1.0), (0.5, 2.0), (0.0, 0.0)]:
    ours = shrink_cov(jnp.asarray(cov, jnp.float32), a1, a2)
    np.testing.assert_allclose(np.asarray(ours), ref_shrink(cov, a1, a2),
                               rtol=1e-5, atol=1e-6)
  twice = ref_shrink(ref_shrink(cov))
  np.testing.assert_allclose(
      np.asarray(normalize_cov(jnp.asarray(twice, jnp.float32))),
      ref_normalize(twice), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.diagonal(ref_normalize(twice)), 1.0)
  # The whole chain for a class, among others left as they were.
  y = np.repeat([0, 1, 2], 10)
  z[y == 1] += 0.5 * rng.random(size=(10, 6))
  valid = np.ones(30, bool)
  valid[-1] = False   # padding: not in class 2's statistics
  mean0 = jnp.full((3, 6), 7.0)
  prec0 = jnp.full((3, 6, 6), 7.0)
  count, mean, prec = class_statistics(
      jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(valid),
      jnp.asarray([False, True, True]), mean0, prec0, 1.0, 1.0)
  np.testing.assert_array_equal(np.asarray(count), [10, 10, 9])
  for k, rows in [(1, y == 1), (2, (y == 2) & valid)]:
    np.testing.assert_allclose(np.asarray(mean[k]), z[rows].mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(prec[k]), ref_precision(z[rows]),
                               rtol=2e-3, atol=2e-3)
  np.testing.assert_array_equal(np.asarray(mean[0]), 7.0)
  np.testing.assert_array_equal(np.asarray(prec[0]), 7.0)


def test_degenerate_covariances():
  """A dimension of variance 0 gets the identity's row and column when
  normalised; a class of one example (Σ = 0, which shrinkage leaves 0)
  gets the identity as its precision, not NaN; with no shrinkage and two
  identical features (a singular normalised matrix), the pseudo-inverse."""
  cov = np.array([[4.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, 9.0]])
  np.testing.assert_allclose(
      np.asarray(normalize_cov(jnp.asarray(cov, jnp.float32))),
      [[1.0, 0.0, 1 / 3], [0.0, 1.0, 0.0], [1 / 3, 0.0, 1.0]], rtol=1e-6)
  rng = np.random.default_rng(3)
  z = rng.random(size=(21, 4))
  z[:, 3] = z[:, 1]
  y = np.array([0] * 20 + [1])
  stored = (jnp.zeros((2, 4)), jnp.zeros((2, 4, 4)))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  _, mean, prec = class_statistics(f32(z), jnp.asarray(y),
                                   jnp.ones(21, bool), jnp.ones(2, bool),
                                   *stored, 1.0, 1.0)
  np.testing.assert_allclose(np.asarray(mean[1]), z[20], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(prec[1]), np.eye(4), atol=1e-6)
  _, _, prec = class_statistics(f32(z), jnp.asarray(y), jnp.ones(21, bool),
                                jnp.ones(2, bool), *stored, 0.0, 0.0)
  want = ref_precision(z[:20], 0.0, 0.0)
  assert np.linalg.matrix_rank(np.linalg.pinv(want)) == 3
  np.testing.assert_allclose(np.asarray(prec[0]), want, rtol=2e-3,
                             atol=2e-3 * np.abs(want).max())


def test_mahalanobis_equals_numpy_and_differs_from_nearest_mean():
  # Class 0 spreads along its second axis, class 1 is tight: the point is
  # nearer to class 1's mean, but far less unlikely under class 0.
  mean = np.array([[1.0, 0.0], [0.6, 0.8]])
  cov = [np.array([[0.01, 0.0], [0.0, 1.0]]), 0.01 * np.eye(2)]
  prec = np.stack([np.linalg.inv(c) for c in cov])
  x = np.array([[0.8, 0.6], [1.0, 0.05], [0.5, 0.9]])
  ours = np.asarray(mahalanobis(jnp.asarray(x, jnp.float32),
                                jnp.asarray(mean, jnp.float32),
                                jnp.asarray(prec, jnp.float32)))
  want = np.stack([ref_mahalanobis(x, mean[k], prec[k]) for k in range(2)],
                  axis=1)
  np.testing.assert_allclose(ours, want, rtol=1e-5)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  euclid = ((unit[:, None] - mean[None] / np.linalg.norm(
      mean, axis=1)[None, :, None]) ** 2).sum(-1)
  assert euclid.argmin(1).tolist() == [1, 0, 1]
  assert ours.argmin(1).tolist() == [0, 0, 1]   # the covariance decides
  # Scale does not matter: both the features and the means are normalised.
  np.testing.assert_allclose(
      np.asarray(mahalanobis(jnp.asarray(3 * x, jnp.float32),
                             jnp.asarray(5 * mean, jnp.float32),
                             jnp.asarray(prec, jnp.float32))), ours,
      rtol=1e-5)


def _config(name="fecam", **kwargs):
  c = jaxcl.default_config()   # Split Digits, 5 x 2 classes, MLP 400-400
  c.strategy.name = name
  if name == "fecam":
    c.strategy.fecam = dict(kwargs)
  c.report.progress = False
  return c


@pytest.fixture(scope="module")
def digits_run():
  c = _config()
  # Weight decay moves parameters under a zero gradient: only restoring
  # the frozen copy keeps them.
  c.optimizer.weight_decay = 0.01
  return jaxcl.run(c)


def test_backbone_frozen_after_the_first_experience(digits_run, digits):
  check_frozen_after_first_experience(digits_run, _config(), digits)


def test_statistics_and_predictions_equal_numpy(digits_run, digits):
  r = digits_run
  ss = r.state.strategy
  ctx = r.learner.ctx
  sc = scenarios.split(digits, 5)
  feats = lambda x: np_features(ctx, ss.params, ss.model_state, x)
  x, y = split_digits_rows(digits)
  f = feats(x)
  assert f.min() >= 0 and np.mean(f == 0) > 0.1   # post-ReLU features
  z = np.sqrt(f)
  means = np.stack([z[y == k].mean(0) for k in range(10)])
  np.testing.assert_allclose(np.asarray(ss.mean), means, rtol=1e-4,
                             atol=1e-4)
  precs = np.stack([ref_precision(z[y == k]) for k in range(10)])
  got = np.asarray(ss.precision, np.float64)
  for k in range(10):
    scale = np.abs(precs[k]).max()
    np.testing.assert_allclose(got[k] / scale, precs[k] / scale, atol=2e-3)
  # The reference's prediction over the test rows, from those statistics.
  tx, ty = split_digits_rows(digits, "test")
  tz = np.sqrt(feats(tx))
  dist = np.stack([ref_mahalanobis(tz, means[k], precs[k])
                   for k in range(10)], axis=1)
  # The features are the frozen copy's, whatever parameters are passed.
  zeros = jax.tree.map(jnp.zeros_like, r.state.params)
  scores = np.asarray(r.learner.strategy.predict(
      ctx, ss, zeros, r.state.model_state, jnp.asarray(tx),
      jnp.zeros(len(tx), jnp.int32)))
  np.testing.assert_allclose(-scores, dist, rtol=2e-3, atol=2e-3)
  ours = scores.argmax(1)
  assert np.mean(ours == dist.argmin(1)) > 0.995
  # ... and the run's own evaluation, experience by experience.
  sizes = np.cumsum([0] + [len(e.test_y) for e in sc.experiences])
  per = [np.mean(ours[a:b] == ty[a:b]) for a, b in zip(sizes, sizes[1:])]
  np.testing.assert_allclose(r.accuracy[-1], per, atol=1e-6)


def test_old_classes_kept_where_naive_forgets(digits_run):
  r = digits_run
  naive = jaxcl.run(_config("naive"))
  acc = np.asarray(r.accuracy)
  assert np.all(np.isfinite(acc))
  old = acc[-1, :-1].mean()
  assert np.asarray(naive.accuracy)[-1, :-1].mean() < 0.1
  assert old > 0.9, acc[-1]
  assert r.metrics["acc"] > 0.9
  # Classes without statistics are never predicted: 0 on future ones.
  assert np.all(acc[np.triu_indices(5, 1)] == 0.0)


def test_hyperparameters_reach_the_statistics(digits):
  """λ, γ1 and γ2 as given (not the defaults), on the first experience's
  end with the untrained model; before it, the model's own logits."""
  c = _config(tukey=1.0, gamma1=0.5, gamma2=2.0)
  s = experiment.setup(c)
  ctx, strategy = s.learner.ctx, s.learner.strategy
  state = experiment.initial_state(s, c.seed)
  e0 = scenarios.split(digits, 5).experiences[0]
  tx = jnp.asarray(e0.test_x)
  t0 = jnp.zeros(len(tx), jnp.int32)
  np.testing.assert_array_equal(
      np.asarray(strategy.predict(ctx, state.strategy, state.params,
                                  state.model_state, tx, t0)),
      np.asarray(ctx.logits(state.params, state.model_state, tx, t0)))
  state = strategy.after_experience(ctx, state, e0)
  ss = state.strategy
  f = np.asarray(ctx.apply(state.params, state.model_state,
                           jnp.asarray(e0.train_x), e0.train_task,
                           features=True)[0], np.float64)
  u = np.asarray(ctx.apply(state.params, state.model_state, tx, t0,
                           features=True)[0], np.float64)
  dist = []
  for k in (0, 1):
    z = f[e0.train_y == k]    # λ = 1: no transform
    np.testing.assert_allclose(np.asarray(ss.mean[k]), z.mean(0),
                               rtol=1e-4, atol=1e-5)
    want = ref_precision(z, 0.5, 2.0)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(ss.precision[k]) / scale,
                               want / scale, atol=2e-3)
    dist.append(ref_mahalanobis(u, z.mean(0), want))
  assert np.asarray(ss.count).tolist() == np.bincount(
      e0.train_y, minlength=10).tolist()
  # From the first statistics on (not once every class has them), the
  # prediction is the Mahalanobis rule over the classes with statistics.
  scores = np.asarray(strategy.predict(ctx, ss, state.params,
                                       state.model_state, tx, t0))
  assert np.all(scores[:, 2:] <= -1e8)
  np.testing.assert_allclose(-scores[:, :2], np.stack(dist, 1), rtol=2e-3,
                             atol=2e-3)


def test_batch_norm_statistics_from_the_copy_at_the_freeze(digits):
  """A batch-norm backbone: the engine's steps after the freeze move the
  model's running averages, but every class's mean is of the copy's
  features in evaluation mode."""
  c = _config()
  c.model.name, c.model.bn_mlp = "bn_mlp", dict(widths=(32,))
  r = jaxcl.run(c)
  ss = r.state.strategy
  assert max_abs_change(ss.model_state, r.state.model_state) > 1e-2
  x, y = split_digits_rows(digits)
  z = np.sqrt(np_features(r.learner.ctx, ss.params, ss.model_state, x))
  np.testing.assert_allclose(np.asarray(ss.mean),
                             np.stack([z[y == k].mean(0) for k in range(10)]),
                             rtol=1e-4, atol=1e-4)


def test_task_incremental_scores_stay_in_the_task(digits, digits_run):
  c = _config()
  c.scenario.kind = "task"
  c.train.epochs = 1
  r = jaxcl.run(c)
  pred, tt = split_predictions(r, digits)
  np.testing.assert_array_equal(pred // 2, tt)   # tasks are class pairs
  assert np.mean(r.accuracy[-1]) > np.mean(digits_run.accuracy[-1])


def test_repeated_class_is_refused(digits_run, digits):
  r = digits_run
  e0 = scenarios.split(digits, 5).experiences[0]
  with pytest.raises(ValueError, match=r"fecam: experience 0 brings classes "
                     r"\[0, 1\] again"):
    r.learner.strategy.before_experience(r.learner.ctx, r.state, e0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tukey=0.0), "fecam: tukey must be a finite number > 0"),
    (dict(tukey=-0.5), "fecam: tukey must be a finite number > 0"),
    (dict(tukey=float("nan")), "fecam: tukey must be a finite"),
    (dict(gamma1=-1.0), "fecam: gamma1 must be a finite number >= 0"),
    (dict(gamma2=float("inf")), "fecam: gamma2 must be a finite"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fecam(**kwargs)


def test_features_too_wide_for_per_class_covariances():
  c = _config()
  c.model.widths = (6000,)   # 10 x 6000 x 6000 = 360M floats
  with pytest.raises(ValueError, match=r"fecam: 10 classes of 6000-dim.*"
                     r"at most 250000000 floats"):
    experiment.initial_state(experiment.setup(c), 0)
  assert fecam_module.MAX_FLOATS == 250_000_000
  # The limit is inclusive: 10 x 5000 x 5000 is exactly MAX_FLOATS.
  fecam_module.check_class_matrices("fecam", 10, 5000, "matrices")
  with pytest.raises(ValueError, match="10 classes of 5001-dimensional"):
    fecam_module.check_class_matrices("fecam", 10, 5001, "matrices")
