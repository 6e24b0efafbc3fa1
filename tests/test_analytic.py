"""Mechanism tests of the analytic strategies (Deep SLDA).

The references are NumPy, in float64: a port of the authors' per-example
``fit`` loop and the LDA rule with a pseudo-inverse; the runs are Split
Digits streams (scikit-learn's digits, 64 pixels).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, scenarios, train
from jaxcl.strategies import slda as slda_module
from jaxcl.strategies.slda import classifier, slda, streaming_update

from conftest import (max_abs_change, np_features, split_digits_rows,
                      split_predictions)

SHRINK = 1e-4


def reference_fit(mean, count, cov, n, z, y, valid):
  """The authors' ``SLDA_Model.fit``, one example at a time (float64)."""
  mean, count, cov = mean.copy(), count.copy(), cov.copy()
  for zi, yi, ok in zip(z, y, valid):
    if not ok:
      continue
    d = zi - mean[yi]
    cov = (n * cov + np.outer(d, d) * n / (n + 1)) / (n + 1)
    mean[yi] += d / (count[yi] + 1)
    count[yi] += 1
    n += 1
  return mean, count, cov, n


def reference_classifier(mean, cov, shrinkage):
  lam = np.linalg.pinv((1 - shrinkage) * cov + shrinkage * np.eye(len(cov)))
  w = lam @ mean.T
  return w, 0.5 * np.sum(mean.T * w, axis=0)


def offline_lda(x, y, num_classes, shrinkage):
  """LDA with the exact pooled within-class covariance."""
  mean = np.stack([x[y == k].mean(0) for k in range(num_classes)])
  centred = x - mean[y]
  return reference_classifier(mean, centred.T @ centred / len(x), shrinkage)


def test_streaming_update_equals_the_per_example_recursion():
  rng = np.random.default_rng(0)
  c, d = 4, 6
  stats = (np.zeros((c, d)), np.zeros(c), np.zeros((d, d)), 0.0)
  ours = tuple(jnp.asarray(a, jnp.float32) for a in stats)
  for step in range(6):
    # Repeated classes inside a batch, a class arriving mid-stream and
    # padding rows: each row is measured against the mean before it.
    y = rng.integers(0, c if step else 2, size=7)
    z = rng.normal(size=(7, d)) + 3.0 * y[:, None]
    valid = rng.random(7) > 0.25
    stats = reference_fit(*stats, z, y, valid)
    ours = streaming_update(*ours, jnp.asarray(z, jnp.float32),
                            jnp.asarray(y), jnp.asarray(valid))
  for a, b in zip(ours, stats):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)
  assert stats[3] > 25  # the padding rows were skipped, not all rows


@pytest.mark.parametrize("shrinkage, rank", [(SHRINK, 20), (0.0, 5),
                                             (0.5, 5)])
def test_classifier_is_the_lda_rule_with_a_pseudo_inverse(shrinkage, rank):
  rng = np.random.default_rng(1)
  a = rng.normal(size=(rank, 8))
  cov = a.T @ a / rank       # rank 5 of 8: singular, and pinv leaves the
  #                            null space out
  mean = rng.normal(size=(3, 8))
  w, b = classifier(jnp.asarray(mean, jnp.float32),
                    jnp.asarray(cov, jnp.float32), jnp.float32(shrinkage))
  rw, rb = reference_classifier(mean, cov, shrinkage)
  np.testing.assert_allclose(np.asarray(w), rw, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(np.asarray(b), rb, rtol=2e-3, atol=2e-3)


def test_classifier_with_all_shrinkage_is_the_nearest_mean_rule():
  """ε = 1 (allowed): Λ = I, so W = μᵀ and b = ½ ‖μ_k‖², whatever Σ."""
  slda(shrinkage=1.0)
  rng = np.random.default_rng(2)
  mean = rng.normal(size=(3, 5))
  a = rng.normal(size=(5, 5))
  w, b = classifier(jnp.asarray(mean, jnp.float32),
                    jnp.asarray(a @ a.T, jnp.float32), jnp.float32(1.0))
  np.testing.assert_allclose(np.asarray(w), mean.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(b), 0.5 * np.sum(mean ** 2, 1),
                             rtol=1e-5)


def _config(**strategy_args):
  c = jaxcl.default_config()   # Split Digits, 5 experiences, batch 32
  c.strategy.name = "slda"
  c.strategy.slda = dict(features="input", **strategy_args)
  c.report.progress = False
  return c


@pytest.fixture(scope="module")
def digits_run():
  c = _config()
  c.train.epochs = 2   # the second pass must fold nothing in
  return jaxcl.run(c)


def test_split_digits_statistics_classifier_and_offline_lda(digits_run,
                                                             digits):
  r = digits_run
  sc = scenarios.split(digits, 5)
  x, y = split_digits_rows(digits)
  x = x.reshape(-1, 64).astype(np.float64)
  ss = r.state.strategy
  # Every training row once (two epochs ran), class by class.
  np.testing.assert_array_equal(np.asarray(ss.count),
                                np.bincount(y, minlength=10))
  assert float(ss.updates) == len(y)
  np.testing.assert_allclose(
      np.asarray(ss.mean), np.stack([x[y == k].mean(0) for k in range(10)]),
      atol=1e-4)
  # The stored classifier is the LDA rule on the stored statistics.
  rw, rb = reference_classifier(np.asarray(ss.mean, np.float64),
                                np.asarray(ss.cov, np.float64), SHRINK)
  tx, ty = split_digits_rows(digits, "test")
  tx = tx.reshape(-1, 64)
  ours = np.asarray(r.learner.strategy.predict(
      r.learner.ctx, ss, r.state.params, r.state.model_state,
      jnp.asarray(tx), jnp.zeros(len(tx), jnp.int32))).argmax(1)
  assert np.mean(ours == (tx @ rw - rb).argmax(1)) > 0.995
  # The streaming covariance estimates the pooled one: the final accuracy
  # is offline LDA's, within 0.03.
  ow, ob = offline_lda(x, y, 10, SHRINK)
  offline = np.mean((tx @ ow - ob).argmax(1) == ty)
  final = np.mean(ours == ty)
  assert abs(final - offline) < 0.03, (final, offline)
  assert final > 0.85
  # ... and the run's own evaluation, experience by experience.
  sizes = np.cumsum([0] + [len(e.test_y) for e in sc.experiences])
  per = [np.mean(ours[a:b] == ty[a:b]) for a, b in zip(sizes, sizes[1:])]
  np.testing.assert_allclose(r.accuracy[-1], per, atol=1e-6)


def test_shrinkage_reaches_the_stored_classifier():
  """ε = 0.75, not the default: the head stored at each experience's end is
  the LDA rule with that ε on the stored statistics."""
  c = _config(shrinkage=0.75)
  r = jaxcl.run(c)
  ss = r.state.strategy
  rw, rb = reference_classifier(np.asarray(ss.mean, np.float64),
                                np.asarray(ss.cov, np.float64), 0.75)
  np.testing.assert_allclose(np.asarray(ss.weight), rw, rtol=2e-3,
                             atol=2e-3 * np.abs(rw).max())
  np.testing.assert_allclose(np.asarray(ss.bias), rb, rtol=2e-3,
                             atol=2e-3 * np.abs(rb).max())
  # ... which is far from the default's (the pixels' Σ is near singular).
  dw, _ = reference_classifier(np.asarray(ss.mean, np.float64),
                               np.asarray(ss.cov, np.float64), SHRINK)
  assert np.abs(dw).max() > 10 * np.abs(rw).max()


def test_classes_not_seen_yet_are_left_out(digits, digits_run):
  """After experience 0, no test row of any class is given a class other
  than 0 or 1, though their score 0 beats the seen classes. on some."""
  r = digits_run
  sc = scenarios.split(digits, 5)
  ctx, strategy = r.learner.ctx, r.learner.strategy
  state = train.init_state(ctx, strategy, 0)
  e0 = sc.experiences[0]
  state = strategy.before_experience(ctx, state, e0)
  batch = {"x": jnp.asarray(e0.train_x), "y": jnp.asarray(e0.train_y),
           "task": jnp.asarray(e0.train_task),
           "mask": jnp.ones(e0.num_train, jnp.float32),
           "index": jnp.arange(e0.num_train, dtype=jnp.int32)}
  ss = state.strategy
  mean, count, cov, n = streaming_update(
      ss.mean, ss.count, ss.cov, ss.updates,
      jnp.asarray(e0.train_x.reshape(e0.num_train, -1)), batch["y"],
      batch["mask"] > 0)
  state = state.replace(strategy=ss._replace(mean=mean, count=count, cov=cov,
                                             updates=n))
  state = strategy.after_experience(ctx, state, e0)
  tx = np.concatenate([e.test_x for e in sc.experiences])
  scores = np.asarray(strategy.predict(
      ctx, state.strategy, state.params, state.model_state, jnp.asarray(tx),
      jnp.zeros(len(tx), jnp.int32)))
  assert set(np.unique(scores.argmax(1))) <= {0, 1}
  raw = tx.reshape(len(tx), -1) @ np.asarray(state.strategy.weight) - \
      np.asarray(state.strategy.bias)
  assert np.mean(raw.argmax(1) >= 2) > 0.05  # what the mask prevents (0.10)


def test_backbone_is_frozen_as_the_stream_starts(digits):
  """Weight decay moves the model's parameters under zero gradients; the
  statistics are still those of the initial model's features."""
  c = _config()
  c.strategy.slda = dict(features="backbone")
  c.model.widths = (16,)
  c.optimizer.name = "sgd"
  c.optimizer.weight_decay = 0.5
  c.train.epochs = 1
  r = jaxcl.run(c)
  s = experiment.setup(c)
  init = experiment.initial_state(s, c.seed)
  assert max_abs_change(init.params, r.state.params) > 1e-3
  x, y = split_digits_rows(digits)
  z = np_features(r.learner.ctx, init.params, init.model_state, x)
  ss = r.state.strategy
  assert ss.mean.shape == (10, 16)
  np.testing.assert_allclose(
      np.asarray(ss.mean), np.stack([z[y == k].mean(0) for k in range(10)]),
      rtol=1e-4, atol=1e-4)
  assert r.metrics["acc"] > 0.7


def test_task_incremental_scores_stay_in_the_task(digits, digits_run):
  c = _config()
  c.scenario.kind = "task"
  r = jaxcl.run(c)
  pred, tt = split_predictions(r, digits)
  np.testing.assert_array_equal(pred // 2, tt)   # tasks are class pairs
  # Two classes per task instead of ten: the final row gains.
  assert np.mean(r.accuracy[-1]) > np.mean(digits_run.accuracy[-1]) + 0.02


@pytest.mark.parametrize("kwargs, match", [
    (dict(shrinkage=-1e-4), "slda: shrinkage must be a finite number >= 0"),
    (dict(shrinkage=1.5), r"slda: shrinkage must be in \[0, 1\]"),
    (dict(shrinkage=float("nan")), "slda: shrinkage must be a finite"),
    (dict(features="pixels"), "slda: unknown features 'pixels'"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    slda(**kwargs)


def test_features_too_wide_for_a_covariance(digits):
  sc = scenarios.split(digits, 5)
  info = train.stream_info(sc, 10)
  info = type(info)(**{**info.__dict__, "input_shape": (160, 160)})
  ctx = train.make_context(None, train.make_optimizer("sgd", 0.1), info)
  with pytest.raises(ValueError, match=r"25600 dimensions.*at most 20000"):
    slda(features="input").init(ctx, jax.random.PRNGKey(0), {})
  assert slda_module.MAX_DIM == 20000


def test_features_at_the_width_limit_are_accepted(digits, monkeypatch):
  """The limit is inclusive: D = MAX_DIM builds, D = MAX_DIM + 1 does not
  (the limit lowered to 64 so the covariance is small)."""
  monkeypatch.setattr(slda_module, "MAX_DIM", 64)
  info = train.stream_info(scenarios.split(digits, 5), 10)
  for shape, ok in [((8, 8), True), ((5, 13), False)]:
    info = type(info)(**{**info.__dict__, "input_shape": shape})
    ctx = train.make_context(None, train.make_optimizer("sgd", 0.1), info)
    init = lambda: slda(features="input").init(ctx, jax.random.PRNGKey(0),
                                               {})
    if ok:
      assert init().cov.shape == (64, 64)
    else:
      with pytest.raises(ValueError, match=r"65 dimensions.*at most 64"):
        init()


def test_config_variants_build_and_offline_reference(digits):
  from experiments import split_mnist_analytic as mod
  from jaxcl import strategies
  for arg in ("features=input", "features=backbone,dataset=fashion_mnist"):
    c = mod.get_config(arg + ",quick")
    kwargs = {k: dict(v) for k, v in c.strategy.items() if k != "name"}
    assert strategies.from_spec(c.strategy.name, kwargs)[0].name == "slda"
    assert (c.train.batch_size, c.train.epochs, c.scenario.kind) == (
        10, 1, "class")
  c = mod.get_config("strategy=fecam,quick")
  assert strategies.from_spec("fecam", dict(c.strategy.fecam))[0].name == (
      "fecam")
  assert (c.model.widths, c.model.pretrained, c.optimizer.learning_rate) == (
      (400, 400), "", 0.01)
  # FeTrIL: FeCAM's stream, backbone and first experience.
  f = mod.get_config("strategy=fetril,quick")
  assert strategies.from_spec("fetril", dict(f.strategy.fetril))[0].name == (
      "fetril")
  for key in ("model", "optimizer", "train", "scenario", "dataset"):
    assert f[key].to_dict() == c[key].to_dict(), key
  # The papers' regime: 5 classes first, then one per experience.
  b = mod.get_config("strategy=fetril,first=5,quick")
  assert (b.scenario.first_classes, b.scenario.n_experiences) == (5, 6)
  with pytest.raises(ValueError, match="first=5 is for strategy=fecam or "
                     "fetril"):
    mod.get_config("features=input,first=5")
  # The backbone's run: the Piggyback rows' recipe on the other data set.
  c = mod.get_config("strategy=pretrain")
  assert (c.dataset.name, c.model.widths) == ("fashion_mnist", (100, 100))
  with pytest.raises(ValueError, match="unknown strategy 'nope'"):
    mod.get_config("strategy=nope")
  # The offline reference the rows are read against, on Split Digits.
  sc = scenarios.split(digits, 5)
  flat = lambda a: a.reshape(len(a), -1).astype(np.float64)
  x = np.concatenate([flat(e.train_x) for e in sc.experiences])
  y = np.concatenate([e.train_y for e in sc.experiences])
  w, b = offline_lda(x, y, 10, SHRINK)
  want = np.mean([np.mean((flat(e.test_x) @ w - b).argmax(1) == e.test_y)
                  for e in sc.experiences])
  assert mod.offline_lda_accuracy("digits", "") == pytest.approx(want,
                                                                 abs=1e-12)
