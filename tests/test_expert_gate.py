"""Mechanism tests of Expert Gate (on scikit-learn digits)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import models, scenarios, train
from jaxcl.strategies import expert_gate as eg_mod
from jaxcl.strategies.expert_gate import (GateAutoencoder, expert_gate, gate,
                                          reconstruction_errors, relatedness)

from test_regularisation import _np_kd

B = 16
# Small autoencoders for 8x8 digits (64 inputs), trained long enough to
# separate five 2-class tasks in a few seconds.
QUICK = dict(ae_latent=16, ae_epochs=10, ae_batch_size=16, ae_lr=0.01)


def make_ctx(sc):
  info = train.stream_info(sc, B)
  model = models.build("mlp", sc.num_classes, widths=(32,))
  return train.make_context(model, train.make_optimizer("sgd", 0.1), info)


def first(sc, n):
  return dataclasses.replace(sc, experiences=sc.experiences[:n])


def quick_config():
  c = jaxcl.default_config()
  c.model.widths = (32,)
  c.train.epochs = 3
  c.train.batch_size = B
  c.report.progress = False
  return c


def constant_ae(d, latent, value):
  """An autoencoder whose output is ``value`` whatever its input."""
  return {"encoder": {"kernel": jnp.zeros((d, latent)),
                      "bias": jnp.zeros((latent,))},
          "decoder": {"kernel": jnp.zeros((latent, d)),
                      "bias": jnp.full((d,), jax.scipy.special.logit(value))}}


def constant_expert(ctx, cls):
  """MLP parameters that answer class ``cls`` for every input."""
  params, _ = train.init_variables(ctx, jax.random.PRNGKey(cls))
  head = params["head"]
  head = {"kernel": jnp.zeros_like(head["kernel"]),
          "bias": 10.0 * jax.nn.one_hot(cls, head["bias"].shape[0])}
  return {**params, "head": head}


def stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


@pytest.fixture(scope="module")
def stream(digits):
  return scenarios.split(digits, 5)


@pytest.fixture(scope="module")
def run(stream):
  """A full Split Digits run, with a snapshot of the stored experts taken
  when each experience ends."""
  s = expert_gate(**QUICK)
  snaps = []

  def after(ctx, state, exp):
    state = s.after_experience(ctx, state, exp)
    snaps.append(jax.tree.map(np.array, state.strategy.experts))
    return state

  c = quick_config()
  r = jaxcl.run(c, scenario=stream, strategy=s._replace(after_experience=after))
  return r, snaps


# ---------------------------------------------------------------------------
# Hand-built cases.


def test_gate_routes_each_input_to_best_reconstructing_expert(stream):
  # Mutation check: with the gate's argmax taken over +errors (the worst
  # reconstruction), or the routed logits taken from expert 0 for every
  # input, this fails.
  sc = first(stream, 3)
  ctx = make_ctx(sc)
  s = expert_gate(ae_latent=4)
  d = int(np.prod(ctx.info.input_shape))
  params, ms = train.init_variables(ctx, jax.random.PRNGKey(0))
  ss = s.init(ctx, jax.random.PRNGKey(0), params)
  # Slot k's autoencoder outputs the constant image c_k; slot k's expert
  # always answers class k; slot 2 has its autoencoder but no expert yet
  # (the experience being trained), so the current model (class 9) answers.
  levels = (0.1, 0.5, 0.9)
  ss = ss._replace(
      ae=stack([constant_ae(d, 4, v) for v in levels]),
      ae_filled=jnp.array([True, True, True]),
      experts=stack([constant_expert(ctx, k) for k in range(3)]),
      expert_filled=jnp.array([True, True, False]))
  own = constant_expert(ctx, 9)
  rng = np.random.default_rng(0)
  want = np.array([0, 1, 2, 1, 0, 2, 2, 1])
  x = np.stack([np.clip(levels[k] + 0.05 * rng.standard_normal(d), 0, 1)
                for k in want]).reshape((-1,) + ctx.info.input_shape)
  x = jnp.asarray(x, jnp.float32)
  errs = jax.vmap(lambda p: reconstruction_errors(
      GateAutoencoder(4, d), p, x, "none"))(ss.ae)
  probs, choice = gate(errs, ss.ae_filled, 2.0)
  np.testing.assert_array_equal(np.asarray(choice), want)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
  # Eq. 1 by hand for the first input.
  p0 = np.exp(-np.asarray(errs)[:, 0] / 2.0)
  np.testing.assert_allclose(np.asarray(probs)[0], p0 / p0.sum(), rtol=1e-4)
  task = jnp.zeros((len(want),), jnp.int32)
  pred = np.argmax(np.asarray(s.predict(ctx, ss, own, ms, x, task)), -1)
  np.testing.assert_array_equal(pred, np.where(want == 2, 9, want))
  # An empty slot is never chosen, however well it would reconstruct.
  _, choice = gate(errs, jnp.array([True, False, True]), 2.0)
  assert not np.any(np.asarray(choice) == 1)


@pytest.mark.parametrize("preprocess", ["none", "sigmoid"])
def test_reconstruction_error_is_the_summed_squared_error_by_hand(
    preprocess):
  """er(x) = ||sigmoid(W2 relu(W1 z + b1) + b2) - z||^2 summed over the
  features (Avalanche's AE_loss), z = vec(x) or sigmoid(vec(x))."""
  rng = np.random.default_rng(5)
  d, latent = 12, 3
  p = {"encoder": {"kernel": rng.normal(size=(d, latent)),
                   "bias": rng.normal(size=(latent,))},
       "decoder": {"kernel": rng.normal(size=(latent, d)),
                   "bias": rng.normal(size=(d,))}}
  x = rng.normal(size=(5, 3, 4))     # standardised-like inputs
  got = reconstruction_errors(
      GateAutoencoder(latent, d),
      jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p),
      jnp.asarray(x, jnp.float32), preprocess)
  z = x.reshape(5, d)
  if preprocess == "sigmoid":
    z = 1 / (1 + np.exp(-z))
  h = np.maximum(z @ p["encoder"]["kernel"] + p["encoder"]["bias"], 0)
  out = 1 / (1 + np.exp(-(h @ p["decoder"]["kernel"]
                          + p["decoder"]["bias"])))
  np.testing.assert_allclose(np.asarray(got), ((out - z) ** 2).sum(1),
                             rtol=1e-5)


def test_gate_without_autoencoder_is_uniform():
  errs = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 4)),
                     jnp.float32)
  probs, _ = gate(errs, jnp.zeros(3, bool), 2.0)
  np.testing.assert_allclose(np.asarray(probs), 1 / 3, rtol=1e-6)


def test_relatedness_is_eq2():
  # Mutation check: with Rel = 1 - (Er_a - Er_k) / Er_a this fails.
  er_k = jnp.array(2.0)
  er_a = jnp.array([2.0, 3.0, 1.0, 6.0])
  np.testing.assert_allclose(np.asarray(relatedness(er_k, er_a)),
                             [1.0, 0.5, 1.5, -1.0], rtol=1e-6)


def test_autoencoder_is_trained_on_the_valid_rows_by_hand(stream):
  """One epoch of one batch holding the whole (padded) experience: the
  autoencoder is one SGD step, with weight decay added to the gradient,
  on the mean error over the experience's rows only (experience 0 has
  270 rows, padded to 272 with zero rows that must not count)."""
  sc = first(stream, 3)    # experience 2 has 272 rows
  ctx = make_ctx(sc)
  size = ctx.info.train_size
  e0 = sc.experiences[0]
  assert e0.num_train < size
  lr, wd = 0.5, 0.1
  s = expert_gate(ae_latent=4, ae_epochs=1, ae_batch_size=size, ae_lr=lr,
                  ae_weight_decay=wd)
  state = train.init_state(ctx, s, 0)
  d = int(np.prod(ctx.info.input_shape))
  # A stored expert in slot 1 (its autoencoder outputs 0.3 everywhere):
  # the relatedness row's errors are means over the same real rows.
  ss = state.strategy
  ss = ss._replace(
      ae=jax.tree.map(lambda s_, a: s_.at[1].set(a), ss.ae,
                      constant_ae(d, 4, 0.3)),
      ae_filled=ss.ae_filled.at[1].set(True),
      experts=jax.tree.map(lambda s_, a: s_.at[1].set(a), ss.experts,
                           constant_expert(ctx, 3)),
      expert_filled=ss.expert_filled.at[1].set(True))
  state = state.replace(strategy=ss)
  out = s.before_experience(ctx, state, e0).strategy
  ae = GateAutoencoder(4, d)
  # The key before_experience derives for the experience's autoencoder.
  key = jax.random.fold_in(jax.random.fold_in(state.rng, 0xAE6A7E), 0)
  p0 = ae.init(jax.random.split(key)[0],
               jnp.zeros((1, d), jnp.float32))["params"]
  x = jnp.asarray(e0.train_x)
  g = jax.grad(lambda p: jnp.mean(reconstruction_errors(ae, p, x,
                                                        "none")))(p0)
  want = jax.tree.map(lambda p, g: p - lr * (g + wd * p), p0, g)
  for a, b in zip(jax.tree.leaves(jax.tree.map(lambda a: a[0], out.ae)),
                  jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)
  xs = np.asarray(e0.train_x, np.float64).reshape(len(e0.train_y), -1)
  er_k = np.asarray(reconstruction_errors(
      ae, jax.tree.map(lambda a: a[0], out.ae), x, "none")).mean()
  er_a = ((0.3 - xs) ** 2).sum(1).mean()
  np.testing.assert_allclose(float(out.relatedness[0, 1]),
                             1 - (er_a - er_k) / er_k, rtol=1e-4)
  # Not vacuous: the zero rows' errors would move the step.
  gz = jax.grad(lambda p: jnp.mean(reconstruction_errors(
      ae, p, jnp.concatenate([x, jnp.zeros((size - len(x),) + x.shape[1:])]),
      "none")))(p0)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(g), jax.tree.leaves(gz))) * lr > 1e-4


def test_autoencoders_read_pixels_on_standardised_inputs(stream,
                                                          monkeypatch):
  """With dataset.normalize (here (0.25, 0.5)), preprocess='none' hands
  the autoencoders the pixels again, the sigmoid decoder's range: the
  autoencoders, their relatedness and the gate's errors on standardised
  inputs equal the plain run's on the pixels."""
  sc = first(stream, 2)
  std = lambda a: (np.asarray(a) - 0.25) / 0.5
  std_sc = dataclasses.replace(sc, experiences=[
      dataclasses.replace(e, inputs=scenarios.given(std(e.train_x),
                                                     std(e.test_x)))
      for e in sc.experiences])
  plain = make_ctx(sc)
  normed = dataclasses.replace(make_ctx(std_sc), normalize=(0.25, 0.5))
  s = expert_gate(ae_latent=4, ae_epochs=1, ae_batch_size=64, ae_lr=0.05)

  errors = []  # the gate's reconstruction errors, as predict computes them
  monkeypatch.setattr(eg_mod, "gate", lambda errs, *a: (
      errors.append(np.asarray(errs)), gate(errs, *a))[1])

  def through(ctx, stream_):
    state = train.init_state(ctx, s, 0)
    for e in stream_.experiences:
      state = s.after_experience(ctx, s.before_experience(ctx, state, e), e)
    x = jnp.asarray(stream_.experiences[1].test_x[:20])
    s.predict(ctx, state.strategy, state.params, state.model_state, x,
              jnp.zeros((20,), jnp.int32))
    return state.strategy

  a, b = through(plain, sc), through(normed, std_sc)
  for u, v in zip(jax.tree.leaves(a.ae), jax.tree.leaves(b.ae)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4,
                               atol=1e-6)
  np.testing.assert_allclose(np.asarray(a.relatedness),
                             np.asarray(b.relatedness), rtol=1e-4)
  assert len(errors) == 2
  np.testing.assert_allclose(errors[1], errors[0], rtol=1e-4, atol=1e-6)
  # Without the pixels, the autoencoders fit standardised values instead.
  c_ = through(make_ctx(std_sc), std_sc)
  assert max(float(np.abs(np.asarray(u) - np.asarray(v)).max()) for u, v in
             zip(jax.tree.leaves(a.ae), jax.tree.leaves(c_.ae))) > 1e-3


@pytest.mark.parametrize("threshold,lwf", [(-np.inf, True), (np.inf, False)])
def test_new_expert_starts_from_most_related_expert(stream, threshold, lwf):
  # Mutation check: taking the latest expert (slot i-1) or the least related
  # one (argmin) as the source fails one of the two cases; comparing
  # `rel > rel_threshold` the other way round fails the LwF checks.
  sc = first(stream, 3)
  ctx = make_ctx(sc)
  e2 = sc.experiences[2]
  d = int(np.prod(ctx.info.input_shape))
  mean = np.clip(e2.train_x.reshape(len(e2.train_y), -1).mean(0), 0.01, 0.99)
  s = expert_gate(ae_latent=4, ae_epochs=3, ae_batch_size=16, ae_lr=0.01,
                  rel_threshold=threshold)
  for best in (0, 1):
    state = train.init_state(ctx, s, 0)
    ss = state.strategy
    # Slot `best` reconstructs experience 2 as its mean image, the other
    # as a blank one: `best` is the more related.
    aes = [constant_ae(d, 4, 0.01), constant_ae(d, 4, 0.01)]
    aes[best] = constant_ae(d, 4, mean)
    experts = [constant_expert(ctx, 3), constant_expert(ctx, 4)]
    ss = ss._replace(ae=jax.tree.map(
        lambda s_, a: s_.at[:2].set(a), ss.ae, stack(aes)),
        ae_filled=jnp.array([True, True, False]),
        experts=jax.tree.map(lambda s_, a: s_.at[:2].set(a), ss.experts,
                             stack(experts)),
        expert_filled=jnp.array([True, True, False]),
        classes=ss.classes.at[0, :2].set(True).at[1, 2:4].set(True))
    out = s.before_experience(ctx, state.replace(strategy=ss), e2)
    new = out.strategy
    assert int(new.source[2]) == best
    for a, b in zip(jax.tree.leaves(out.params),
                    jax.tree.leaves(experts[best])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Relatedness row: eq. 2 with the errors of the stored autoencoders on
    # experience 2's training data.
    x = jnp.asarray(e2.train_x)
    ae = GateAutoencoder(4, d)
    errs = [float(jnp.mean(reconstruction_errors(ae, p, x, "none")))
            for p in [jax.tree.map(lambda a: a[k], new.ae) for k in range(3)]]
    want = [1 - (errs[a] - errs[2]) / errs[2] for a in range(2)]
    np.testing.assert_allclose(np.asarray(new.relatedness[2, :2]), want,
                               rtol=1e-4)
    assert bool(new.ae_filled[2]) and not bool(new.expert_filled[2])
    # LwF from the source expert when the relatedness exceeds the threshold.
    assert bool(new.lwf_on) == lwf and bool(new.used_lwf[2]) == lwf
    assert int(new.teacher) == best
    b = {"x": x[:B], "y": jnp.asarray(e2.train_y[:B]),
         "task": jnp.zeros((B,), jnp.int32), "mask": jnp.ones((B,))}
    logits = ctx.logits(out.params, out.model_state, b["x"], b["task"])
    z = logits + 1.0 * jax.random.normal(jax.random.PRNGKey(1), logits.shape)
    extra = float(s.loss(ctx, new, out.params, b, z))
    assert (extra > 0) == lwf
    if lwf:
      # lwf_alpha (0.01) times the T = 2 cross-entropy, over the source
      # expert's classes, to that expert's softened outputs.
      teacher = ctx.logits(experts[best], {}, b["x"], b["task"])
      np.testing.assert_allclose(
          extra, 0.01 * _np_kd(z, teacher, np.asarray(new.classes[best]),
                               np.ones(B), 2.0), rtol=1e-5)


# ---------------------------------------------------------------------------
# A run on Split Digits (class-incremental, task-free at test time).


def test_stored_experts_never_change(run):
  # Mutation check: storing with `.at[:i + 1].set` (overwriting earlier
  # slots) in after_experience fails this.
  r, snaps = run
  final = r.state.strategy.experts
  for i, snap in enumerate(snaps):
    for a, b in zip(jax.tree.leaves(snap), jax.tree.leaves(final)):
      np.testing.assert_array_equal(a[:i + 1], np.asarray(b)[:i + 1])
  # The last slot is the final model; slots differ.
  last = jax.tree.map(lambda a: a[-1], final)
  for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(r.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  k = np.asarray(final["head"]["kernel"])
  assert not np.array_equal(k[0], k[1])


def test_state_shapes_fixed_and_no_recompilation(run, stream):
  r, _ = run
  ctx = r.learner.ctx
  start = r.learner.strategy.init(ctx, jax.random.PRNGKey(0), r.state.params)
  shape = lambda t: [(a.shape, a.dtype) for a in jax.tree.leaves(t)]
  assert shape(start) == shape(r.state.strategy)
  assert jax.tree.structure(start) == jax.tree.structure(r.state.strategy)
  assert r.learner.chunk_fn._cache_size() == 1
  assert r.learner.end_eval_fn._cache_size() == 1
  assert "eval_fn" not in vars(r.learner)  # the ends evaluate, even at init


def test_gate_routes_and_remembers_where_naive_forgets(run, stream):
  # Mutation check: predict returning the current model's logits (no
  # routing) drops ACC to Naive's and fails this.
  r, _ = run
  ss = r.state.strategy
  assert bool(ss.expert_filled.all()) and bool(ss.ae_filled.all())
  assert int(ss.source[0]) == -1 and all(
      0 <= int(ss.source[k]) < k for k in range(1, 5))
  ae = GateAutoencoder(QUICK["ae_latent"], 64)
  routed = []
  for e in stream.experiences:
    x = jnp.asarray(e.test_x)
    errs = jax.vmap(lambda p: reconstruction_errors(ae, p, x, "none"))(ss.ae)
    routed.append(float(jnp.mean(jnp.argmin(errs, 0) == e.index)))
  assert np.mean(routed) > 0.85, routed
  naive = jaxcl.run(quick_config(), scenario=stream)
  acc = np.asarray(r.accuracy)
  assert r.metrics["acc"] > 0.8 and naive.metrics["acc"] < 0.3
  # Old tasks keep what they learned (within the gate's routing errors).
  assert r.metrics["bwt"] > -0.12, acc
  assert naive.metrics["bwt"] < -0.8


# ---------------------------------------------------------------------------
# Bad hyperparameters.


@pytest.mark.parametrize("kwargs,match", [
    (dict(ae_latent=0), "ae_latent"),
    (dict(ae_latent=2.5), "ae_latent"),
    (dict(ae_epochs=0), "ae_epochs"),
    (dict(ae_batch_size=0), "ae_batch_size"),
    (dict(ae_lr=0.0), "ae_lr"),
    (dict(ae_lr=float("nan")), "ae_lr"),
    (dict(ae_momentum=1.0), "ae_momentum"),
    (dict(ae_weight_decay=-1e-4), "ae_weight_decay"),
    (dict(temperature=0), "temperature"),
    (dict(rel_threshold=float("nan")), "rel_threshold"),
    (dict(rel_threshold="0.85"), "rel_threshold"),
    (dict(rel_threshold=True), "rel_threshold"),
    (dict(lwf_alpha=-1.0), "lwf_alpha"),
    (dict(lwf_temperature=0.0), "lwf_temperature"),
    (dict(preprocess="standardize"), "preprocess"),
])
def test_bad_hyperparameters_raise(kwargs, match):
  # Mutation check: dropping any one validation line fails its case.
  with pytest.raises(ValueError, match=match):
    expert_gate(**kwargs)


def test_overcomplete_autoencoder_raises(stream):
  ctx = make_ctx(first(stream, 2))
  s = expert_gate(ae_latent=64)  # digits have 64 inputs
  params, _ = train.init_variables(ctx, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="ae_latent must be below the input"):
    s.init(ctx, jax.random.PRNGKey(0), params)
