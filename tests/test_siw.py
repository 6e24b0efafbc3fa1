"""SIW (Belouadah et al. 2020): standardisation and the corrected scores
against a NumPy transcription of the authors' loop, what an experience's
end keeps, the first state's plain predictions, forgetting on Split
Digits, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import experiment, models, train
from jaxcl.strategies.siw import SIWState, siw, siw_scores, standardise
from test_replay import B, after_first, batch_of, config, make_ctx


def _siw_np(feats, kernel, bias, init_kernel, init_bias, conf, class_exp,
            seen, now, calibrate=True):
  """The authors' inFT_siw_mc loop, rows as classes: past classes' rows
  replaced by their initial ones, every row standardised (np.std), the
  scores of the classes of states before ``now`` times conf[now] /
  conf[state]; classes not seen yet at -1e9."""
  w = kernel.T.copy()
  b = bias.copy()
  w[seen] = init_kernel.T[seen]
  b[seen] = init_bias[seen]
  for i in range(w.shape[0]):
    w[i] = (w[i] - np.mean(w[i])) / np.std(w[i])
  scores = feats @ w.T + b
  if calibrate:
    for o in np.flatnonzero(seen & (class_exp < now)):
      scores[:, o] *= conf[now] / conf[class_exp[o]]
  active = seen | (class_exp == now + 1)
  return np.where(active[None, :], scores, -1e9)


def test_standardise_matches_numpy():
  rng = np.random.default_rng(0)
  k = rng.normal(2.0, 3.0, size=(7, 5)).astype(np.float32)
  k[:, 3] = 0.0   # a zero column (a zero-initialised class): 0, not NaN
  got = np.asarray(standardise(jnp.asarray(k)))
  want = (k - k.mean(0)) / np.where(k.std(0) > 0, k.std(0), 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[:, 3], 0.0)
  keep = [0, 1, 2, 4]
  np.testing.assert_allclose(got[:, keep].mean(0), 0.0, atol=1e-6)
  np.testing.assert_allclose(got[:, keep].std(0), 1.0, rtol=1e-5)


@pytest.mark.parametrize("calibrate", [True, False])
def test_siw_scores_match_the_authors_loop(calibrate):
  # Three finished states of two classes (0-1, 2-3, 4-5), classes 6-7
  # being learned (current), 8-9 unseen; confidences differ per state.
  rng = np.random.default_rng(1)
  d, c, n = 6, 10, 9
  feats = rng.normal(size=(n, d)).astype(np.float32)
  kernel = rng.normal(size=(d, c)).astype(np.float32)
  bias = rng.normal(size=(c,)).astype(np.float32)
  init_kernel = 3.0 * rng.normal(size=(d, c)).astype(np.float32)
  init_bias = rng.normal(size=(c,)).astype(np.float32)
  class_exp = np.array([0, 0, 1, 1, 2, 2, -1, -1, -1, -1], np.int32)
  seen = class_exp >= 0
  current = np.zeros(c, bool)
  current[6:8] = True
  conf = np.array([4.0, 2.5, 5.0, 0.0], np.float32)
  ss = SIWState(jnp.asarray(init_kernel), jnp.asarray(init_bias),
                jnp.asarray(conf), jnp.asarray(class_exp), jnp.asarray(seen),
                jnp.asarray(current))
  got = np.asarray(siw_scores(jnp.asarray(feats), jnp.asarray(kernel),
                              jnp.asarray(bias), ss, calibrate))
  ce = np.where(current, 3, class_exp)
  want = _siw_np(feats, kernel, bias, init_kernel, init_bias, conf, ce,
                 seen, 2, calibrate)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The current classes read the head's own (standardised) weights; the
  # newest finished state's classes are not rescaled, older ones are.
  if calibrate:
    plain = _siw_np(feats, kernel, bias, init_kernel, init_bias, conf, ce,
                    seen, 2, False)
    np.testing.assert_allclose(got[:, 4:8], plain[:, 4:8], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(got[:, 0:2], plain[:, 0:2] * 5.0 / 4.0,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 2:4], plain[:, 2:4] * 5.0 / 2.5,
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ctx(stream):
  return make_ctx(stream)


@pytest.fixture(scope="module")
def first(ctx, stream):
  """``(state, step)``: 15 steps of experience 0, its end, the start of
  experience 1."""
  return after_first(ctx, siw(), stream, 15)


def test_experience_end_keeps_initial_weights_and_confidence(ctx, first,
                                                             stream):
  state, step = first
  ss = state.strategy
  e0, e1 = stream.experiences[:2]
  kernel = np.asarray(state.params["head"]["kernel"])
  bias = np.asarray(state.params["head"]["bias"])
  np.testing.assert_array_equal(np.asarray(ss.init_kernel)[:, :2],
                                kernel[:, :2])
  np.testing.assert_array_equal(np.asarray(ss.init_bias)[:2], bias[:2])
  np.testing.assert_array_equal(np.asarray(ss.init_kernel)[:, 2:], 0.0)
  np.testing.assert_array_equal(np.asarray(ss.class_exp)[:4],
                                [0, 0, -1, -1])
  np.testing.assert_array_equal(np.asarray(ss.current)[:4],
                                [False, False, True, True])
  # μ(M_0): the mean over experience 0's training rows of the top logit
  # over the classes seen (0 and 1), the model in evaluation mode.
  logits = np.asarray(ctx.logits(state.params, {}, jnp.asarray(e0.train_x),
                                 jnp.asarray(e0.train_task)))
  np.testing.assert_allclose(float(ss.confidence[0]),
                             logits[:, :2].max(1).mean(), rtol=1e-5)
  # Training on experience 1 moves the old classes' head columns (they
  # are negatives now); the kept initial ones stay.
  moved = state
  for i in range(10):
    moved = step(moved, batch_of(e1, start=B * i))
  shift = np.abs(np.asarray(moved.params["head"]["kernel"])[:, :2]
                 - kernel[:, :2]).max()
  assert shift > 1e-3
  np.testing.assert_array_equal(np.asarray(moved.strategy.init_kernel),
                                np.asarray(ss.init_kernel))
  # Experience 1's end: its classes' weights join, with its confidence;
  # the prediction is then SIW's (the code's loop), not the network's.
  s = siw()
  ended = s.after_experience(ctx, moved, e1)
  es = ended.strategy
  k1 = np.asarray(moved.params["head"]["kernel"])
  np.testing.assert_array_equal(np.asarray(es.init_kernel)[:, 2:4],
                                k1[:, 2:4])
  np.testing.assert_array_equal(np.asarray(es.init_kernel)[:, :2],
                                kernel[:, :2])
  assert float(es.confidence[1]) > 0 and float(es.confidence[0]) > 0
  x = jnp.asarray(e1.test_x[:12])
  t = jnp.zeros((12,), jnp.int32)
  got = np.asarray(jax.jit(lambda ss, p: s.predict(ctx, ss, p, {}, x, t))(
      es, ended.params))
  feats = np.asarray(ctx.apply(ended.params, {}, x, t, features=True)[0])
  want = _siw_np(feats, k1, np.asarray(moved.params["head"]["bias"]),
                 np.asarray(es.init_kernel), np.asarray(es.init_bias),
                 np.asarray(es.confidence), np.asarray(es.class_exp),
                 np.asarray(es.seen), 1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  plain = np.asarray(ctx.logits(ended.params, {}, x, t))[:, :4]
  assert np.abs(got[:, :4] - plain).max() > 1e-2


def test_first_state_predictions_are_the_networks(ctx, first, stream):
  # After experience 0 no class is past: the network's logits over the
  # classes seen (0-3: the current experience's count as seen).
  state, _ = first
  x = jnp.asarray(stream.experiences[0].test_x[:8])
  t = jnp.zeros((8,), jnp.int32)
  got = np.asarray(siw().predict(ctx, state.strategy, state.params, {}, x,
                                 t))
  logits = np.asarray(ctx.logits(state.params, {}, x, t))
  np.testing.assert_allclose(got[:, :4], logits[:, :4], rtol=1e-6)
  assert (got[:, 4:] < -1e8).all()


def test_siw_keeps_old_classes_on_split_digits(full_stream):
  """No memory: Naive forgets every old class; SIW's initial weights and
  calibration keep part of them, the calibration a large part."""
  accs = {}
  for name, kw in (("naive", None), ("siw", {}),
                   ("nocal", dict(calibrate=False))):
    cfg = config("naive" if kw is None else "siw",
                 **({} if kw is None else dict(siw=kw)))
    cfg.train.epochs = 2
    a = experiment.run(cfg, scenario=full_stream).accuracy
    accs[name] = float(a[-1, :-1].mean())   # the four old experiences
  assert accs["naive"] < 0.02, accs
  assert accs["siw"] > accs["naive"] + 0.25, accs
  assert accs["siw"] > accs["nocal"] + 0.1, accs


def test_bad_input(ctx, first, stream):
  with pytest.raises(ValueError,
                     match=r"siw: calibrate must be True or False, got 1$"):
    siw(calibrate=1)
  domain = dataclasses.replace(stream, kind="domain")
  with pytest.raises(ValueError, match="class-incremental"):
    train.init_state(make_ctx(domain), siw(), 0)
  info = train.stream_info(stream, B)
  opt = train.make_optimizer("sgd", 0.1)
  cosine = train.make_context(
      models.build("mlp", 10, widths=(8,), head="cosine"), opt, info)
  with pytest.raises(ValueError, match=r"siw needs a linear 'head' layer .*"
                     r"the model's head has \['kernel', 'sigma'\]$"):
    train.init_state(cosine, siw(), 0)
  heads = train.make_context(
      models.build("mlp", 10, num_heads=2, widths=(8,)), opt, info)
  with pytest.raises(ValueError, match=r"siw needs a single head over the "
                     r"10 classes"):
    train.init_state(heads, siw(), 0)
  # A class that comes back in a later experience is refused.
  state, _ = first
  ended = siw().after_experience(ctx, state, stream.experiences[1])
  with pytest.raises(ValueError, match="siw"):
    siw().before_experience(ctx, ended, stream.experiences[0])
