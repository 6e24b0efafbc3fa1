"""Mechanism tests of feature distillation (Avalanche's
FeatureDistillationPlugin): the step against the hand-written objective in
both modes, no penalty in the first experience, and the features held in
a run."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import scenarios
from jaxcl.state import cross_entropy
from jaxcl.strategies.feature_distillation import feature_distillation
from jaxcl.train import init_state, train_step

from partial_runs import run_keeping_states
from test_regularisation import _ctx, _tree_close


def _batch(exp, n=8, pad=2):
  """``n`` rows of ``exp``, the last ``pad`` of them padding (mask 0, odd
  inputs) that the penalty must not count."""
  x = np.asarray(exp.train_x[:n]).copy()
  x[n - pad:] = 50.0
  mask = np.r_[np.ones(n - pad), np.zeros(pad)].astype(np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(exp.train_y[:n]),
          "task": jnp.zeros(n, jnp.int32), "mask": jnp.asarray(mask),
          "index": jnp.arange(n)}


def _moved(params):
  """``params`` moved off the previous model, not by a scale alone (a
  scaled ReLU network's features keep their direction, and the cosine
  penalty's gradient would be 0)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(tree, [
      p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("mode", ["cosine", "mse"])
def test_step_is_the_hand_objective(mode):
  """On the second experience one SGD step equals the step of the masked
  cross-entropy plus α times the mode's feature penalty against the
  previous model, over the real rows; the first experience's step is the
  cross-entropy's alone."""
  ctx, sc = _ctx("class", widths=(16,))
  alpha = 0.7
  strategy = feature_distillation(alpha=alpha, mode=mode)
  step = jax.jit(functools.partial(train_step, ctx, strategy))
  state = init_state(ctx, strategy, 0)
  e0, e1 = sc.experiences[:2]
  batch = _batch(e1)

  def objective(p, old, with_penalty):
    logits = ctx.logits(p, state.model_state, batch["x"], batch["task"])
    total = cross_entropy(logits, batch["y"], batch["mask"])
    if not with_penalty:
      return total
    feats = lambda q: ctx.apply(q, state.model_state, batch["x"],
                                batch["task"], features=True)[0][:6]
    f, f_old = feats(p), feats(old)
    if mode == "cosine":
      cos = jnp.sum(f * f_old, 1) / (jnp.linalg.norm(f, axis=1)
                                     * jnp.linalg.norm(f_old, axis=1))
      pen = jnp.mean(1.0 - cos)
    else:
      pen = jnp.mean((f - f_old) ** 2)
    return total + alpha * pen

  @functools.partial(jax.jit, static_argnums=2)
  def reference(p, old, with_penalty):
    g = jax.grad(objective)(p, old, with_penalty)
    return jax.tree.map(lambda q, d: q - 0.1 * d, p, g)

  # Experience 0: the cross-entropy alone.
  after0, _ = step(state, batch)
  _tree_close(after0.params, reference(state.params, state.params, False),
              rtol=1e-5, atol=1e-6)
  for _ in range(3):
    state, _ = step(state, batch)
  state = strategy.after_experience(ctx, state, e0)
  old = state.params
  state = state.replace(params=_moved(old))
  new, _ = step(state, batch)
  want = reference(state.params, old, True)
  _tree_close(new.params, want, rtol=1e-5, atol=1e-6)
  # The penalty moved the step: without it the answer differs.
  plain = reference(state.params, old, False)
  gap = max(float(jnp.abs(a - b).max()) for a, b in
            zip(jax.tree.leaves(want), jax.tree.leaves(plain)))
  assert gap > 1e-4


def test_penalty_value_and_padding(digits):
  """The loss hook's value against NumPy on the real rows, in both modes;
  changing the padding rows' inputs changes nothing."""
  ctx, sc = _ctx("class", widths=(16,))
  e0, e1 = sc.experiences[:2]
  batch = _batch(e1)
  for mode in ("cosine", "mse"):
    strategy = feature_distillation(alpha=2.0, mode=mode)
    state = init_state(ctx, strategy, 0)
    zero = strategy.loss(ctx, state.strategy, state.params, batch, None)
    assert float(zero) == 0.0   # no previous model yet
    ss = strategy.after_experience(ctx, state, e0).strategy
    params = _moved(state.params)
    got = float(strategy.loss(ctx, ss, params, batch, None))
    feats = lambda q: np.asarray(ctx.apply(
        q, state.model_state, batch["x"], batch["task"],
        features=True)[0], np.float64)[:6]
    f, f_old = feats(params), feats(state.params)
    if mode == "cosine":
      cos = np.sum(f * f_old, 1) / (np.linalg.norm(f, axis=1)
                                    * np.linalg.norm(f_old, axis=1))
      want = 2.0 * np.mean(1 - cos)
    else:
      want = 2.0 * np.mean((f - f_old) ** 2)
    assert want > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4)
    other = dict(batch, x=batch["x"].at[6:].set(-7.0))
    np.testing.assert_allclose(
        float(strategy.loss(ctx, ss, params, other, None)), got, rtol=1e-6)


def test_in_a_run_features_held_and_first_experience_untouched(digits):
  """α = 0 is Naive bit for bit; α = 10 keeps experience 0's features
  closer than Naive does, in both modes (a fifth of its drift or less;
  at α = 100 the momentum step of the MSE form diverges); the first
  experience trains as Naive's does whatever α."""
  sc = scenarios.split(digits, 5)
  c = jaxcl.default_config()
  c.model.widths = (32,)
  c.train.epochs = 2
  c.report.progress = False
  c.strategy.name = "naive"
  naive, naive_states = run_keeping_states(c, scenario=sc)
  x = jnp.asarray(sc.experiences[0].test_x)
  t = jnp.zeros(len(x), jnp.int32)
  ctx = naive.learner.ctx
  feats = jax.jit(lambda p, ms: ctx.apply(p, ms, x, t, features=True)[0])
  first = naive_states[0]
  f0 = feats(first.params, first.model_state)

  def drift(state):
    f = feats(state.params, state.model_state)
    cos = jnp.sum(f * f0, 1) / (jnp.linalg.norm(f, axis=1)
                                * jnp.linalg.norm(f0, axis=1) + 1e-12)
    return float(jnp.mean(1 - cos)), float(jnp.mean((f - f0) ** 2))

  base = drift(naive.state)
  c.strategy.name = "feature_distillation"
  c.strategy.feature_distillation = dict(alpha=0.0)
  zero = jaxcl.run(c, scenario=sc)
  for a, b in zip(jax.tree.leaves(zero.state.params),
                  jax.tree.leaves(naive.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for i, mode in enumerate(("cosine", "mse")):
    c.strategy.feature_distillation = dict(alpha=10.0, mode=mode)
    res, states = run_keeping_states(c, scenario=sc)
    for a, b in zip(jax.tree.leaves(states[0].params),
                    jax.tree.leaves(first.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert drift(res.state)[i] < 0.2 * base[i], (mode, drift(res.state),
                                                  base)


def test_composes_with_replay(digits):
  c = jaxcl.default_config()
  c.model.widths = (32,)
  c.train.epochs = 1
  c.report.progress = False
  c.strategy.name = "replay+feature_distillation"
  c.strategy.replay = dict(mem_size=100)
  c.strategy.feature_distillation = dict(alpha=1.0)
  r = jaxcl.run(c)
  assert np.all(np.isfinite(np.asarray(r.accuracy)))
  assert r.learner.chunk_fn._cache_size() == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=-1.0), "feature_distillation: alpha must be a finite "
     "number >= 0"),
    (dict(alpha=float("nan")), "feature_distillation: alpha must be"),
    (dict(mode="l1"), "feature_distillation: mode must be one of "
     r"\['cosine', 'mse'\], got 'l1'"),
])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    feature_distillation(**kwargs)
