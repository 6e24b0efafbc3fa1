"""Mechanism tests of the regularisation strategies (EWC, online EWC, SI,
MAS, LwF): each checks a number computed another way (a per-example Python
loop, a closed form, numpy by hand), not just that the code runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxcl import experiment, models, scenarios
from jaxcl.strategies import _penalty
from jaxcl.strategies.ewc import add_experience, ewc
from jaxcl.strategies.lfl import feature_distance, lfl
from jaxcl.strategies.lwf import distillation, lwf
from jaxcl.strategies.lwf_mc import lwf_mc
from jaxcl.strategies.mas import mas
from jaxcl.strategies.online_ewc import online_ewc
from jaxcl.strategies.rwalk import RWalkState, rwalk
from jaxcl.strategies.rwalk import consolidate as rwalk_consolidate
from jaxcl.strategies.si import si
from jaxcl.state import StepInfo
from jaxcl.train import (init_state, make_context, make_optimizer,
                         stream_info)

from partial_runs import predictions_around_the_start, run_keeping_states

D, C = 6, 4  # input size, classes of the toy problems


def _toy_scenario(kind="class", n_exp=2, n=48, seed=0):
  rng = np.random.default_rng(seed)
  train, test = [], []
  for i in range(n_exp):
    cs = [2 * i % C, (2 * i + 1) % C]
    y = rng.choice(cs, n).astype(np.int32)
    x = rng.normal(size=(n, D)).astype(np.float32) + y[:, None] * 0.5
    train.append((x, y))
    test.append((x[:16], y[:16]))
  return scenarios.from_arrays(train, test, kind=kind, num_classes=C)


def _ctx(kind="class", widths=(5,), batch_size=8, n_exp=2, heads=1):
  sc = _toy_scenario(kind, n_exp)
  model = models.build("mlp", C, num_heads=heads, widths=widths)
  tx = make_optimizer("sgd", 0.1)
  return make_context(model, tx, stream_info(sc, batch_size)), sc


@pytest.fixture(scope="module")
def fisher_case():
  """Per setting: the toy context, its scenario and the per-example
  reference's compiled pieces (log p(c | x) and its gradient, the logits),
  built once for the four Fisher kinds (each kind recompiled them)."""
  cases = {}

  def get(setting):
    if setting not in cases:
      ctx, sc = _ctx(setting)

      def log_prob(p, ms, x, t, c):
        logits = ctx.logits(p, ms, x[None], t[None])[0]
        return jax.nn.log_softmax(logits)[c]

      cases[setting] = (ctx, sc, jax.jit(jax.grad(log_prob)),
                        jax.jit(ctx.logits))
    return cases[setting]

  return get


def _tree_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# --------------------------------------------------------------------------
# Fisher and MAS importance: the vmap path against a per-example loop.


@pytest.mark.parametrize("kind", ["exact", "sampled", "predicted",
                                  "empirical"])
@pytest.mark.parametrize("setting", ["class", "task"])
def test_fisher_vmap_equals_python_loop(kind, setting, fisher_case):
  ctx, sc, grad_of, logits_of = fisher_case(setting)
  state = init_state(ctx, ewc(), 0)
  params, ms = state.params, state.model_state
  exp = sc.experiences[1]
  bs, max_examples = 8, 20  # 3 batches, the last one partly padding
  batches = _penalty.importance_batches(exp, bs, max_examples, 0,
                                        ctx.info.train_size)
  key = jax.random.PRNGKey(3)
  got = jax.jit(lambda p, b, k: _penalty.fisher_diagonal(
      ctx, p, ms, b, k, kind=kind))(params, batches, key)

  # Reference: one example at a time, plain jax.grad of log p(c | x),
  # sum then divide.
  grad = lambda p, x, t, c: grad_of(p, ms, x, t, c)
  acc = jax.tree.map(np.zeros_like, params)
  count = 0
  nb = batches["y"].shape[0]
  for b in range(nb):
    x, t, y, m = (np.asarray(batches[k][b]) for k in ("x", "task", "y",
                                                      "mask"))
    logits = logits_of(params, ms, x, t)
    if kind == "sampled":
      labels = np.asarray(jax.random.categorical(
          jax.random.fold_in(key, b), logits, axis=-1))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for j in range(bs):
      if m[j] == 0:
        continue
      count += 1
      if kind == "exact":
        for c in range(C):
          g = grad(params, x[j], t[j], c)
          acc = jax.tree.map(lambda a, gg: a + probs[j, c] * np.square(gg),
                             acc, g)
      else:
        if kind == "empirical":
          c = y[j]
        elif kind == "predicted":  # task-masked logits: within the task
          c = int(np.argmax(np.asarray(logits[j])))
        else:
          c = labels[j]
        g = grad(params, x[j], t[j], c)
        acc = jax.tree.map(lambda a, gg: a + np.square(gg), acc, g)
  assert count == max_examples
  want = jax.tree.map(lambda a: a / count, acc)
  _tree_close(got, want, rtol=2e-4, atol=1e-7)
  # Not trivially zero.
  assert sum(float(np.sum(l)) for l in jax.tree.leaves(got)) > 1e-4


def test_exact_fisher_in_task_il_ignores_other_tasks_classes():
  # With task-masked logits, the classes outside the task have probability
  # 0, so the exact Fisher equals the expectation over the task's 2 classes.
  ctx, sc = _ctx("task")
  state = init_state(ctx, ewc(), 0)
  b = _penalty.importance_batches(sc.experiences[0], 8, 8, 0,
                                  ctx.info.train_size)
  f = _penalty.fisher_diagonal(ctx, state.params, state.model_state, b,
                               jax.random.PRNGKey(0), kind="exact")
  # The head's columns of the other task's classes get no gradient at all.
  w = np.asarray(f["head"]["kernel"])
  others = [c for c in range(C) if c not in sc.experiences[0].classes]
  assert np.all(w[:, others] == 0) and np.all(w[:, list(
      sc.experiences[0].classes)] > 0)


@pytest.mark.parametrize("estimate", ["exact", "sampled", "empirical",
                                      "mas"])
def test_importance_is_estimated_on_augmented_examples(estimate):
  # Mammoth's and FACIL's EWC (and Avalanche's MAS) estimate importance
  # over the training loader, whose transform augments: with a training
  # augmentation that reverses every input, an estimate equals the plain
  # one on reversed batches, and differs from the plain one on the batches.
  import dataclasses
  ctx, sc = _ctx("class")
  rev = dataclasses.replace(ctx, augment=lambda k, x: x[..., ::-1])
  state = init_state(ctx, ewc(), 0)
  p, ms = state.params, state.model_state
  b = _penalty.importance_batches(sc.experiences[0], 8, 16, 0,
                                  ctx.info.train_size)
  reversed_b = {**b, "x": b["x"][..., ::-1]}
  key = jax.random.PRNGKey(3)

  def estimate_of(c, batches):
    if estimate == "mas":
      return _penalty.mas_importance(c, p, ms, batches, key)
    return _penalty.fisher_diagonal(c, p, ms, batches, key, kind=estimate)

  got = estimate_of(rev, b)
  _tree_close(got, estimate_of(ctx, reversed_b), rtol=1e-5, atol=1e-8)
  assert not all(np.allclose(x, y) for x, y in zip(
      jax.tree.leaves(got), jax.tree.leaves(estimate_of(ctx, b))))
  if estimate == "mas":
    with pytest.raises(ValueError, match="needs a key"):
      _penalty.mas_importance(rev, p, ms, b)


def test_mas_importance_equals_python_loop():
  ctx, sc = _ctx("class")
  state = init_state(ctx, mas(), 0)
  params, ms = state.params, state.model_state
  batches = _penalty.importance_batches(sc.experiences[0], 8, 12, 0,
                                        ctx.info.train_size)
  got = jax.jit(lambda p, b: _penalty.mas_importance(ctx, p, ms, b))(
      params, batches)

  def sq_norm(p, x):
    return jnp.sum(jnp.square(ctx.logits(p, ms, x[None],
                                         jnp.zeros((1,), jnp.int32))))

  grad = jax.jit(jax.grad(sq_norm))
  acc, count = jax.tree.map(np.zeros_like, params), 0
  for b in range(batches["y"].shape[0]):
    for j in range(8):
      if batches["mask"][b, j] == 0:
        continue
      count += 1
      g = grad(params, batches["x"][b, j])
      acc = jax.tree.map(lambda a, gg: a + np.abs(gg), acc, g)
  assert count == 12
  _tree_close(got, jax.tree.map(lambda a: a / count, acc), rtol=2e-4,
              atol=1e-6)


# --------------------------------------------------------------------------
# EWC and online EWC penalties.


# 'sampled': the factory's fisher= reaches the estimator (the default would
# pass too otherwise), with the hook's key for experience 0.
@pytest.mark.parametrize("fisher", ["exact", "sampled"])
def test_ewc_penalty_zero_at_anchor_and_hand_quadratic(fisher):
  ctx, sc = _ctx()
  lam = 3.0
  s = ewc(lam=lam, fisher=fisher, max_examples=16, batch_size=8)
  state = init_state(ctx, s, 0)
  state = s.after_experience(ctx, state, sc.experiences[0])
  ss = state.strategy
  assert int(ss.count) == 1 and float(ss.residual) == 0.0
  # One experience: the precision is its Fisher at the end parameters and
  # the centre is those parameters.
  b = _penalty.importance_batches(sc.experiences[0], 8, 16, 0,
                                  ctx.info.train_size)
  # Compiled, arrays as arguments (op by op, the reference Fisher and the
  # penalties below dispatched most of the test's time).
  f0 = jax.jit(lambda p, ms, b, k: _penalty.fisher_diagonal(
      ctx, p, ms, b, k, kind=fisher))(
      state.params, state.model_state, b,
      jax.random.fold_in(jax.random.PRNGKey(0), 0))
  _tree_close(ss.precision, f0, rtol=1e-5, atol=1e-8)
  _tree_close(ss.center, state.params)
  batch = {"x": jnp.zeros((2, D)), "y": jnp.zeros((2,), jnp.int32),
           "task": jnp.zeros((2,), jnp.int32), "mask": jnp.ones((2,))}
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, st, b: s.loss(ctx, st, p, b, None)))
  # Zero at the anchor.
  assert float(loss_and_grad(state.params, ss, batch)[0]) == 0.0
  # Away from it: (λ/2) Σ F (θ − θ*)², by hand in float64 numpy.
  rng = np.random.default_rng(0)
  theta = jax.tree.map(
      lambda p: p + rng.normal(size=p.shape).astype(np.float32), state.params)
  f64 = lambda t: [np.asarray(a, np.float64) for a in jax.tree.leaves(t)]

  def hand(terms, th):  # Σ_k (λ/2) Σ F_k (θ − θ*_k)² and its gradient
    val = sum(np.sum(f * (t - a) ** 2) for fk, ak in terms
              for f, a, t in zip(f64(fk), f64(ak), f64(th)))
    grad = [sum(f * (t - a) for fk, ak in terms
                for f, a in [(f64(fk)[i], f64(ak)[i])])
            for i, t in enumerate(f64(th))]
    return lam / 2 * val, [lam * g for g in grad]

  terms = [(f0, state.params)]
  want, _ = hand(terms, theta)
  got = float(loss_and_grad(theta, ss, batch)[0])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want > 0
  # More experiences: the merged quadratic equals the sum of one penalty
  # per experience, value and gradient (the original EWC), including a
  # Fisher that is zero on some weights.
  for k in range(2):
    fk = jax.tree.map(lambda p: jnp.asarray(
        rng.uniform(0, 2, p.shape) * (rng.uniform(size=p.shape) > 0.3),
        jnp.float32), state.params)
    ak = jax.tree.map(lambda p: p + jnp.asarray(
        rng.normal(size=p.shape), jnp.float32), state.params)
    ss = add_experience(ss, fk, ak)
    terms.append((fk, ak))
  want, want_g = hand(terms, theta)
  got, got_g = loss_and_grad(theta, ss, batch)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_g), want_g):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5)


def test_online_ewc_decays_as_specified():
  ctx, sc = _ctx()
  lam, gamma = 2.0, 0.5
  s = online_ewc(lam=lam, gamma=gamma, fisher="empirical", max_examples=16,
                 batch_size=8)
  state = init_state(ctx, s, 0)
  # Compiled, arrays as arguments (op by op, the reference Fisher and the
  # penalties dispatched most of the test's time).
  fisher = jax.jit(lambda p, ms, b, k: _penalty.fisher_diagonal(
      ctx, p, ms, b, k, kind="empirical"))
  fisher_at = lambda p, exp, i: fisher(
      p, state.model_state,
      _penalty.importance_batches(exp, 8, 16, i, ctx.info.train_size),
      jax.random.fold_in(jax.random.PRNGKey(0), i))
  loss = jax.jit(lambda st, p: s.loss(ctx, st, p, None, None))
  p0 = state.params
  state = s.after_experience(ctx, state, sc.experiences[0])
  f0 = fisher_at(p0, sc.experiences[0], 0)
  _tree_close(state.strategy.fisher, f0, rtol=1e-5, atol=1e-9)
  # Move the parameters, then consolidate the second experience.
  p1 = jax.tree.map(lambda p: p + 0.3, p0)
  state = state.replace(params=p1)
  state = s.after_experience(ctx, state, sc.experiences[1])
  f1 = fisher_at(p1, sc.experiences[1], 1)
  want = jax.tree.map(lambda a, b: gamma * a + b, f0, f1)
  _tree_close(state.strategy.fisher, want, rtol=1e-5, atol=1e-9)
  _tree_close(state.strategy.anchor, p1)
  assert int(state.strategy.count) == 2
  # Penalty: (λ/2) Σ γ F* (θ − θ*)², by hand.
  theta = jax.tree.map(lambda p: p - 0.1, p1)
  hand = sum(np.sum(np.asarray(f, np.float64) * 0.01)
             for f in jax.tree.leaves(want)) * lam / 2 * gamma
  got = float(loss(state.strategy, theta))
  np.testing.assert_allclose(got, hand, rtol=1e-4)
  assert float(loss(state.strategy, p1)) == 0.0


def test_mas_sums_importances_and_penalty_by_hand():
  # Ω gains each experience's importance at its end parameters (the
  # estimator is checked against a loop above), the anchor moves to the
  # latest end, and the penalty is λ Σ Ω (θ − θ*)², with no ½.
  ctx, sc = _ctx()
  lam = 3.0
  s = mas(lam=lam, max_examples=16, batch_size=8)
  state = init_state(ctx, s, 0)
  importance = jax.jit(lambda p, ms, b: _penalty.mas_importance(ctx, p, ms,
                                                                b))
  importance_at = lambda p, exp, i: importance(
      p, state.model_state,
      _penalty.importance_batches(exp, 8, 16, i, ctx.info.train_size))
  p0 = state.params
  state = s.after_experience(ctx, state, sc.experiences[0])
  # Move the parameters, then consolidate the second experience.
  p1 = jax.tree.map(lambda p: p + 0.3, p0)
  state = s.after_experience(ctx, state.replace(params=p1),
                             sc.experiences[1])
  want = jax.tree.map(lambda a, b: a + b,
                      importance_at(p0, sc.experiences[0], 0),
                      importance_at(p1, sc.experiences[1], 1))
  _tree_close(state.strategy.importance, want, rtol=1e-5, atol=1e-8)
  _tree_close(state.strategy.anchor, p1)
  loss = jax.jit(lambda st, p: s.loss(ctx, st, p, None, None))
  theta = jax.tree.map(lambda p: p - 0.1, p1)
  hand = lam * sum(np.sum(np.asarray(w, np.float64) * 0.01)
                   for w in jax.tree.leaves(want))
  np.testing.assert_allclose(float(loss(state.strategy, theta)), hand,
                             rtol=1e-4)
  assert float(loss(state.strategy, p1)) == 0.0


# --------------------------------------------------------------------------
# SI: the path integral on a quadratic loss, in closed form.


def test_si_importance_equals_closed_form_path_integral():
  # L(θ) = ½ Σ a_i θ_i². Gradient descent with step η: θ_t = r^t θ_0,
  # r = 1 − η a, g_t = a θ_t, Δθ_t = −η g_t, so
  #   ω = Σ_t −g_t Δθ_t = η a² θ_0² (1 − r^{2T}) / (1 − r²),
  #   Ω = ω / ((θ_T − θ_0)² + ξ).
  a = np.array([0.5, 1.0, 2.0, 4.0], np.float64)
  theta0 = np.array([1.0, -2.0, 0.5, 3.0], np.float64)
  eta, steps, xi, c = 0.05, 30, 0.1, 0.7
  s = si(c=c, xi=xi)
  params = {"w": jnp.asarray(theta0, jnp.float32)}
  sstate = s.init(None, jax.random.PRNGKey(0), params)

  class FakeState:  # the host hooks only use .params/.strategy/.replace
    def __init__(self, params, strategy):
      self.params, self.strategy = params, strategy

    def replace(self, **kw):
      return FakeState(kw.get("params", self.params),
                       kw.get("strategy", self.strategy))

  st = s.before_experience(None, FakeState(params, sstate), None)
  after_step = jax.jit(lambda ss, info: s.after_step(None, ss, info))

  def descend(st, theta, steps):  # `steps` of gradient descent on L
    for _ in range(steps):
      g = {"w": jnp.asarray(a, jnp.float32) * theta["w"]}
      new = {"w": theta["w"] - eta * g["w"]}
      # The total gradient differs from the task gradient (a penalty's
      # share); SI must use task_grads only.
      info = StepInfo(theta, new, {"w": g["w"] * 10.0}, g, None,
                      jnp.zeros(()))
      st = st.replace(strategy=after_step(st.strategy, info))
      theta = new
    return st, theta

  st, theta = descend(st, params, steps)
  r = 1 - eta * a
  omega = eta * a ** 2 * theta0 ** 2 * (1 - r ** (2 * steps)) / (1 - r ** 2)
  np.testing.assert_allclose(np.asarray(st.strategy.omega["w"]), omega,
                             rtol=1e-4)
  st = st.replace(params=theta)
  st = s.after_experience(None, st, None)
  delta = theta0 * (r ** steps - 1)
  big = omega / (delta ** 2 + xi)
  np.testing.assert_allclose(np.asarray(st.strategy.importance["w"]), big,
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(st.strategy.omega["w"]), 0.0)
  np.testing.assert_allclose(np.asarray(st.strategy.anchor["w"]),
                             np.asarray(theta["w"]))
  # The path integral approaches the loss decrease as η → 0 (first order).
  loss = lambda th: 0.5 * np.sum(a * th ** 2)
  assert abs(omega.sum() - (loss(theta0) - loss(theta0 * r ** steps))) < (
      0.1 * omega.sum())
  # The surrogate loss c Σ Ω (θ̃ − θ)², by hand.
  probe = {"w": jnp.zeros(4, jnp.float32)}
  want = c * np.sum(big * np.asarray(theta["w"], np.float64) ** 2)
  np.testing.assert_allclose(float(s.loss(None, st.strategy, probe, None,
                                          None)), want, rtol=1e-4)
  # A second experience adds its own ω₂ / (Δ₂² + ξ) to Ω (with one
  # experience, replacing Ω passes too). It starts off the last anchor
  # (moved, as another member of a chain may move it), and Δ₂ runs from
  # that start, the new anchor: from the old one, it would differ by the
  # move.
  theta = {"w": theta["w"] + jnp.asarray([0.3, -0.2, 0.1, 0.4], jnp.float32)}
  start2 = np.asarray(theta["w"], np.float64)
  st = s.before_experience(None, st.replace(params=theta), None)
  np.testing.assert_allclose(np.asarray(st.strategy.anchor["w"]), start2)
  steps2 = 20
  st, theta = descend(st, theta, steps2)
  st = s.after_experience(None, st.replace(params=theta), None)
  omega2 = (eta * a ** 2 * start2 ** 2 * (1 - r ** (2 * steps2))
            / (1 - r ** 2))
  delta2 = start2 * (r ** steps2 - 1)
  np.testing.assert_allclose(np.asarray(st.strategy.importance["w"]),
                             big + omega2 / (delta2 ** 2 + xi), rtol=1e-4)


def test_si_total_grads_integrates_the_gradient_the_optimiser_saw():
  # grads='total' (van de Ven & Tolias's code): ω = -Σ g_total Δθ; it needs
  # no separate task-loss gradient.
  s = si(c=1.0, grads="total")
  assert not s.needs_task_grads and si(c=1.0).needs_task_grads
  params = {"w": jnp.asarray([1.0, -2.0], jnp.float32)}
  ss = s.init(None, jax.random.PRNGKey(0), params)
  new = {"w": jnp.asarray([0.5, -1.0], jnp.float32)}
  total = {"w": jnp.asarray([3.0, 4.0])}
  ss = s.after_step(None, ss, StepInfo(params, new, total, None, None,
                                       jnp.zeros(())))
  np.testing.assert_allclose(np.asarray(ss.omega["w"]),
                             [-3.0 * -0.5, -4.0 * 1.0])
  with pytest.raises(ValueError, match="grads"):
    si(grads="data")


# --------------------------------------------------------------------------
# LwF: the distillation loss by hand.


def _np_kd(student, teacher, group, mask, temp):
  out = []
  for s_row, t_row in zip(student, teacher):
    s = np.asarray(s_row, np.float64)[group] / temp
    t = np.asarray(t_row, np.float64)[group] / temp
    p = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
    logq = s - s.max() - np.log(np.exp(s - s.max()).sum())
    out.append(-(p * logq).sum())
  out = np.asarray(out)
  return (out * mask).sum() / mask.sum()


def test_distillation_equals_hand_cross_entropy():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(5, C)).astype(np.float32) * 3
  t = rng.normal(size=(5, C)).astype(np.float32) * 3
  group = np.array([True, False, True, True])
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  for temp in (1.0, 2.0, 5.0):
    got = float(distillation(s, t, group, mask, temp))
    np.testing.assert_allclose(got, _np_kd(s, t, group, mask, temp),
                               rtol=1e-5)
  # KL form: cross-entropy minus the teacher's entropy is >= 0 and 0 when
  # the student equals the teacher.
  self_ce = float(distillation(t, t, group, mask, 2.0))
  assert float(distillation(s, t, group, mask, 2.0)) > self_ce
  assert float(distillation(s, t, np.zeros(C, bool), mask, 2.0)) == 0.0


@pytest.mark.parametrize("setting,n_exp,heads", [
    ("class", 2, 1), ("task", 2, 1),
    # Two old tasks: one softmax per old task's classes, the terms summed
    # (with one old task, any aggregate passes).
    ("task", 3, 1),
    # One head per task: each old task's classes are read from its own
    # head (a single head gives the same logits whatever the task id).
    ("task", 3, 3)])
def test_lwf_loss_over_old_classes_or_old_tasks(setting, n_exp, heads):
  ctx, sc = _ctx(setting, n_exp=n_exp, heads=heads)
  alpha, temp = 0.7, 2.0
  s = lwf(alpha=alpha, temperature=temp)
  state = init_state(ctx, s, 0)
  last = sc.experiences[-1]
  mask = np.array([1, 1, 0, 1, 1, 0], np.float32)  # padding rows: no say
  batch = {"x": jnp.asarray(last.train_x[:6]),
           "y": jnp.asarray(last.train_y[:6]),
           "task": jnp.asarray(last.train_task[:6]), "mask": jnp.asarray(mask)}
  # Before any experience: no teacher, no loss.
  logits = ctx.logits(state.params, state.model_state, batch["x"],
                      batch["task"])
  assert float(s.loss(ctx, state.strategy, state.params, batch, logits)) == 0
  teacher_params = state.params
  for e in sc.experiences[:-1]:
    state = s.after_experience(ctx, state, e)
  old = np.array([np.isin(np.arange(C), e.classes)
                  for e in sc.experiences[:-1]])   # (old experience, class)
  np.testing.assert_array_equal(state.strategy.old_classes, old.any(0))
  student = jax.tree.map(lambda p: p + 0.2, teacher_params)
  logits = ctx.logits(student, state.model_state, batch["x"], batch["task"])
  got = float(jax.jit(lambda ss, p, b, l: s.loss(ctx, ss, p, b, l))(
      state.strategy, student, batch, logits))
  # By hand: teacher and student raw logits, a softmax over the old
  # classes (class-IL) or over each old task's classes, on that task's
  # head (task-IL).
  raw = lambda p, t: np.asarray(ctx.model.apply(
      {"params": p}, batch["x"], jnp.full((6,), t, jnp.int32)))
  groups = ([(old.any(0), 0)] if setting == "class" else
            [(g, e.task_id) for g, e in zip(old, sc.experiences)])
  terms = [_np_kd(raw(student, t), raw(teacher_params, t), g, mask, temp)
           for g, t in groups]
  assert min(terms) > 0
  np.testing.assert_allclose(got, alpha * sum(terms), rtol=1e-5)
  # The teacher is a copy: moving the student leaves it where it was.
  _tree_close(state.strategy.teacher, teacher_params)


def _np_sigmoid_bce(z, t):
  p = 1.0 / (1.0 + np.exp(-z))
  return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def test_lwf_mc_loss_is_hand_sigmoid_distillation():
  ctx, sc = _ctx("class", n_exp=2)
  s = lwf_mc(wd_reg=0.01)
  state = init_state(ctx, s, 0)
  e0, e1 = sc.experiences
  batch = {"x": jnp.asarray(e1.train_x[:6]), "y": jnp.asarray(e1.train_y[:6]),
           "task": jnp.asarray(e1.train_task[:6]), "mask": jnp.ones((6,))}
  raw = lambda p: np.asarray(ctx.model.apply({"params": p}, batch["x"]),
                             np.float64)
  onehot = np.eye(C)[np.asarray(batch["y"])]
  task_loss = jax.jit(lambda ss, l, b: s.task_loss(ctx, ss, l, b))
  # Experience 0: no old class, BCE against one-hot over its classes.
  state = s.before_experience(ctx, state, e0)
  z = raw(state.params)
  got = float(task_loss(state.strategy, jnp.asarray(z, jnp.float32), batch))
  want = _np_sigmoid_bce(z, onehot)[:, :2].mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # After it (the parameters have moved), experience 1: old classes 0, 1
  # take the sigmoid of the model as experience 0 ended.
  teacher = jax.tree.map(lambda p: p - 0.2, state.params)
  state = s.after_experience(ctx, state.replace(params=teacher), e0)
  state = s.before_experience(ctx, state, e1)
  assert np.asarray(state.strategy.seen).tolist() == [True, True, False,
                                                      False]
  student = jax.tree.map(lambda p: p + 0.3, teacher)
  zs, zt = raw(student), raw(teacher)
  targets = np.concatenate([1 / (1 + np.exp(-zt[:, :2])), onehot[:, 2:]], 1)
  got = float(task_loss(state.strategy, jnp.asarray(zs, jnp.float32),
                        batch))
  np.testing.assert_allclose(got, _np_sigmoid_bce(zs, targets).mean(),
                             rtol=1e-5)
  # Mammoth's wd_reg term: wd_reg * sum of squared parameters.
  sq = sum(float(np.sum(np.asarray(p, np.float64) ** 2))
           for p in jax.tree.leaves(student))
  np.testing.assert_allclose(
      float(s.loss(ctx, state.strategy, student, batch, None)), 0.01 * sq,
      rtol=1e-5)
  assert float(lwf_mc().loss(ctx, state.strategy, student, batch, None)) == 0


def test_lwf_mc_bce_over_all_classes_counts_later_ones_as_negatives():
  # bce_classes='all' (iCaRL's authors' code): on experience 0 the BCE
  # averages over every output, the later experiences' classes with
  # target 0, where the default averages over the current two.
  ctx, sc = _ctx("class", n_exp=2)
  e0 = sc.experiences[0]
  batch = {"x": jnp.asarray(e0.train_x[:6]), "y": jnp.asarray(e0.train_y[:6]),
           "task": jnp.asarray(e0.train_task[:6]), "mask": jnp.ones((6,))}
  onehot = np.eye(C)[np.asarray(batch["y"])]
  got = {}
  for which in ("seen", "all"):
    s = lwf_mc(bce_classes=which)
    state = s.before_experience(ctx, init_state(ctx, s, 0), e0)
    z = np.asarray(ctx.model.apply({"params": state.params}, batch["x"]),
                   np.float64)
    got[which] = float(jax.jit(lambda ss, l, b: s.task_loss(ctx, ss, l, b))(
        state.strategy, jnp.asarray(z, jnp.float32), batch))
  bce = _np_sigmoid_bce(z, onehot)
  np.testing.assert_allclose(got["all"], bce.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["seen"], bce[:, :2].mean(), rtol=1e-5)
  assert abs(got["all"] - got["seen"]) > 1e-3
  with pytest.raises(ValueError, match=r"lwf_mc: bce_classes must be one "
                     r"of \['seen', 'all'\], got 'some'"):
    lwf_mc(bce_classes="some")


def test_lwf_mc_keeps_old_classes_where_naive_forgets():
  c = experiment.default_config()  # Split Digits, class-incremental
  c.model.widths = (32,)
  c.train.epochs = 4
  c.train.batch_size = 16
  c.report.progress = False
  sc = experiment.build_scenario(c)
  sc = dataclasses.replace(sc, experiences=sc.experiences[:2])
  out = {}
  for name in ("naive", "lwf_mc"):
    c.strategy.name = name
    out[name] = experiment.run(c, scenario=sc).accuracy
  # Both learn experience 0; after experience 1, naive has lost it and
  # LwF.MC's distillation has kept it.
  assert out["naive"][0, 0] > 0.9 and out["lwf_mc"][0, 0] > 0.9, out
  assert out["naive"][1, 0] < 0.1 and out["lwf_mc"][1, 0] > 0.8, out
  # Classes no experience trained are never predicted (masked logits):
  # the test sets of later experiences score exactly 0.
  assert np.all(out["lwf_mc"][0, 1:] == 0) and np.all(
      out["lwf_mc"][1, 2:] == 0), out


def test_lwf_mc_teacher_is_the_model_as_the_experience_ended():
  """With batch norm: the old classes' targets are the sigmoid of the
  model *and its running statistics* as experience 0 ended (evaluation
  mode), not the statistics the run started with."""
  sc = _toy_scenario("class", 2)
  ctx = make_context(models.build("bn_mlp", C, widths=(5,)),
                     make_optimizer("sgd", 0.1), stream_info(sc, 8))
  s = lwf_mc()
  e0, e1 = sc.experiences
  state = s.before_experience(ctx, init_state(ctx, s, 0), e0)
  assert jax.tree.leaves(state.model_state)     # batch statistics
  teacher = jax.tree.map(lambda p: p - 0.2, state.params)
  stats = jax.tree.map(lambda a: a + 0.7, state.model_state)
  state = s.after_experience(
      ctx, state.replace(params=teacher, model_state=stats), e0)
  state = s.before_experience(ctx, state, e1)
  batch = {"x": jnp.asarray(e1.train_x[:6]), "y": jnp.asarray(e1.train_y[:6]),
           "task": jnp.asarray(e1.train_task[:6]), "mask": jnp.ones((6,))}
  raw = lambda p, ms: np.asarray(ctx.model.apply(
      {"params": p, **ms}, batch["x"], batch["task"], train=False),
      np.float64)
  student = jax.tree.map(lambda p: p + 0.3, teacher)
  zs, zt = raw(student, stats), raw(teacher, stats)
  # The statistics matter (else this checks nothing).
  assert np.abs(zt - raw(teacher, init_state(ctx, s, 0).model_state)
                ).max() > 1e-2
  onehot = np.eye(C)[np.asarray(batch["y"])]
  targets = np.concatenate([1 / (1 + np.exp(-zt[:, :2])), onehot[:, 2:]], 1)
  got = float(s.task_loss(ctx, state.strategy, jnp.asarray(zs, jnp.float32),
                          batch))
  np.testing.assert_allclose(got, _np_sigmoid_bce(zs, targets).mean(),
                             rtol=1e-5)


def test_lwf_mc_predicts_over_the_current_and_earlier_classes():
  """During experience 0 (e.g. an evaluation before it ends) the current
  classes compete and the untrained ones are masked; before any
  experience nothing is masked."""
  ctx, sc = _ctx("class", n_exp=2)
  s = lwf_mc()
  own, before, got = predictions_around_the_start(
      ctx, s, init_state(ctx, s, 0), sc.experiences[0])
  np.testing.assert_array_equal(before, own)
  np.testing.assert_array_equal(got[:, :2], own[:, :2])
  assert np.all(got[:, 2:] <= -1e8)


# --------------------------------------------------------------------------
# RWalk: the path integral, the consolidation and the penalty by hand.


def test_rwalk_consolidation_and_penalty_by_hand():
  rng = np.random.default_rng(3)
  shape = (3, 4)
  f_old, s_old, w, f_t = (np.abs(rng.normal(size=shape)) for _ in range(4))
  w[0, 0] = -5.0  # a parameter whose move raised the loss: score 0
  anchor, params = rng.normal(size=shape), rng.normal(size=shape)
  alpha, damping, lam = 0.3, 0.1, 2.0
  leaf = lambda a: {"k": jnp.asarray(a, jnp.float32)}
  ss = RWalkState(leaf(f_old), leaf(s_old), leaf(w), leaf(anchor),
                  jnp.asarray(lam, jnp.float32))
  out = rwalk_consolidate(ss, leaf(params), leaf(f_t), alpha, damping)
  fisher = alpha * f_old + (1 - alpha) * f_t
  score_t = np.maximum(w / (fisher * (params - anchor) ** 2 + damping), 0)
  assert score_t[0, 0] == 0.0
  np.testing.assert_allclose(out.fisher["k"], fisher, rtol=1e-5)
  np.testing.assert_allclose(out.scores["k"], 0.5 * (s_old + score_t),
                             rtol=1e-5)
  np.testing.assert_array_equal(out.w["k"], 0.0)
  np.testing.assert_allclose(out.anchor["k"], params, rtol=1e-6)
  # The penalty: λ Σ (F + s)(θ − θ*)², 0 at the anchor.
  s = rwalk(lam=lam)
  theta = rng.normal(size=shape)
  got = s.loss(None, out, leaf(theta), None, None)
  want = lam * np.sum((fisher + 0.5 * (s_old + score_t)) *
                      (theta - params) ** 2)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(s.loss(None, out, leaf(params), None, None)) == 0.0


def test_rwalk_integrates_the_unregularised_gradient_along_the_path():
  s = rwalk()
  assert s.needs_task_grads
  params = {"k": jnp.asarray([1.0, -2.0], jnp.float32)}
  ss = s.init(None, jax.random.PRNGKey(0), params)
  path = [params, {"k": jnp.asarray([0.5, -1.0])},
          {"k": jnp.asarray([0.2, -1.5])}]
  task = [{"k": jnp.asarray([3.0, 4.0])}, {"k": jnp.asarray([-1.0, 2.0])}]
  for (a, b), g in zip(zip(path, path[1:]), task):
    # The total gradient (penalty included) must not enter w.
    ss = s.after_step(None, ss, StepInfo(a, b, {"k": g["k"] * 9.0}, g, None,
                                         jnp.zeros(())))
  want = -(3.0 * -0.5 + -1.0 * -0.3), -(4.0 * 1.0 + 2.0 * -0.5)
  np.testing.assert_allclose(np.asarray(ss.w["k"]), want, rtol=1e-6)


def test_rwalk_defaults_are_facils():
  """rwalk() is FACIL's setting: λ = 1, α = 0.5, ξ = 0.1 and the Fisher of
  the predicted label (max_examples 1000, batches of 32, seed 0), checked
  through one consolidation and the penalty after it (the estimator
  itself is checked against a per-example loop above)."""
  ctx, sc = _ctx()
  s = rwalk()
  state = init_state(ctx, s, 0)
  p0 = state.params
  exp = sc.experiences[0]
  w = jax.tree.map(lambda p: jnp.full_like(p, 0.7), p0)
  p1 = jax.tree.map(lambda p: p + 0.2, p0)
  state = state.replace(params=p1, strategy=state.strategy._replace(w=w))
  state = s.after_experience(ctx, state, exp)

  def hand_fisher(kind):
    f = _penalty.fisher_diagonal(
        ctx, p1, state.model_state,
        _penalty.importance_batches(exp, 32, 1000, 0, ctx.info.train_size),
        jax.random.fold_in(jax.random.PRNGKey(0), 0), kind=kind)
    return [0.5 * np.asarray(a, np.float64) for a in jax.tree.leaves(f)]

  fisher = hand_fisher("predicted")
  exact = hand_fisher("exact")
  assert not all(np.allclose(a, b, rtol=1e-3) for a, b in zip(fisher, exact))
  for got, want in zip(jax.tree.leaves(state.strategy.fisher), fisher):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-9)
  scores = [0.5 * 0.7 / (f * 0.04 + 0.1) for f in fisher]
  for got, want in zip(jax.tree.leaves(state.strategy.scores), scores):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
  theta = jax.tree.map(lambda p: p - 0.3, p1)
  want = sum(np.sum((f + sc_) * 0.09) for f, sc_ in zip(fisher, scores))
  got = float(s.loss(ctx, state.strategy, theta, None, None))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_rwalk_holds_parameters_near_their_anchor():
  """After the first experience the penalty holds the parameters: a large
  lam moves them far less during the second than Naive does (at this
  learning rate, lam 100 already diverges: the penalty is stiff)."""
  _, sc = _ctx()
  moved = {}
  for name in ("naive", "rwalk"):
    cfg = experiment.default_config()
    cfg.model.widths = (5,)
    cfg.train.epochs, cfg.train.batch_size = 3, 8
    cfg.report.progress = False
    cfg.strategy.name = name
    if name == "rwalk":
      cfg.strategy.rwalk = dict(lam=10.0, max_examples=0)
    # One run: the state as the first experience ended stands for a run
    # of that experience alone.
    res, states = run_keeping_states(cfg, scenario=sc)
    p0, p1 = states[0].params, res.state.params
    moved[name] = float(sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree.leaves(p0), jax.tree.leaves(p1))))
  assert moved["rwalk"] < 0.25 * moved["naive"], moved


# --------------------------------------------------------------------------
# Bad hyperparameters fail at factory time.


@pytest.mark.parametrize("factory,kwargs,needle", [
    (ewc, dict(lam=-1.0), "lam"),
    (ewc, dict(fisher="diagonal"), "Fisher type"),
    (ewc, dict(max_examples=-3), "max_examples"),
    (ewc, dict(batch_size=0), "batch_size"),
    (online_ewc, dict(lam=-0.5), "lam"),
    (online_ewc, dict(gamma=0.0), "gamma"),
    (online_ewc, dict(gamma=1.5), "gamma"),
    (online_ewc, dict(fisher="kfac"), "Fisher type"),
    (si, dict(c=-1.0), "c"),
    (si, dict(xi=0.0), "xi"),
    (mas, dict(lam=float("nan")), "lam"),
    (lwf, dict(temperature=0.0), "temperature"),
    (lwf, dict(temperature=-2.0), "temperature"),
    (lwf, dict(alpha=-1.0), "alpha"),
    # numpy took these seeds only after the first experience had trained.
    (ewc, dict(seed=-1), "ewc: seed must be an int >= 0, got -1"),
    (online_ewc, dict(seed=2.5), "online_ewc: seed must be an int"),
    (mas, dict(seed=float("nan")), "mas: seed must be an int"),
    (rwalk, dict(lam=-1.0), "rwalk: lam must be a finite number >= 0"),
    (rwalk, dict(alpha=1.5), r"rwalk: alpha must be in \[0, 1\], got 1.5"),
    (rwalk, dict(damping=0.0), "rwalk: damping must be a finite number > 0"),
    (rwalk, dict(fisher="kfac"), "rwalk: unknown Fisher type 'kfac'"),
    (lfl, dict(lambda_e=-1e-4), "lfl: lambda_e must be a finite number >= 0"),
    (lfl, dict(lambda_e=float("inf")), "lfl: lambda_e must be a finite"),
    (lwf_mc, dict(wd_reg=-0.1), r"lwf_mc: wd_reg must be a finite number "
     r">= 0, got -0.1"),
    (lwf_mc, dict(wd_reg=True), "lwf_mc: wd_reg must be"),
])
def test_bad_hyperparameters_raise(factory, kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    factory(**kwargs)


# --------------------------------------------------------------------------
# In the real loop: chained, no recompilation between experiences.


@pytest.mark.parametrize("spec,kwargs,kind", [
    ("ewc+lwf", {"ewc": dict(lam=10.0, max_examples=16, batch_size=8)},
     "class"),
    ("online_ewc+mas", {"online_ewc": dict(lam=10.0, gamma=0.9,
                                           fisher="sampled", max_examples=16),
                        "mas": dict(lam=0.1, max_examples=16)}, "task"),
    ("si+lwf", {"si": dict(c=0.5)}, "task"),
    ("mas+si", {"mas": dict(lam=0.1, max_examples=16)}, "class"),
])
def test_chained_in_loop_without_recompiling(spec, kwargs, kind):
  sc = _toy_scenario(kind, n_exp=2)
  c = experiment.default_config()
  c.model.widths = (8,)
  c.train.epochs = 1
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.report.progress = False
  c.strategy.name = spec
  for k, v in kwargs.items():
    c.strategy[k] = v
  res = experiment.run(c, scenario=sc)
  assert res.learner.chunk_fn._cache_size() == 1
  assert np.all(np.isfinite(res.accuracy))
  # Every member's state was consolidated (no member left at its init).
  for sub in res.state.strategy:
    leaves = jax.tree.leaves(sub)
    assert leaves and all(np.all(np.isfinite(np.asarray(l))) for l in leaves)


def test_ewc_penalty_holds_parameters_in_loop():
  # A large λ keeps the parameters near experience 0's anchor during
  # experience 1 (compared with λ = 0), through the real compiled loop
  # (λ F η stays < 2 here, so plain SGD is stable).
  # Both λ in one compiled loop: EWC keeps λ in its state, so a sweep
  # trains the two runs as one vmapped program (two runs compiled twice).
  from jaxcl.sweep import sweep
  sc = _toy_scenario("class", n_exp=2)
  c = experiment.default_config()
  c.model.widths = (8,)
  c.train.epochs = 2
  c.train.batch_size = 8
  c.optimizer.learning_rate = 0.05
  c.report.progress = False
  c.strategy.name = "ewc"
  c.strategy.ewc = dict(max_examples=32, batch_size=16, fisher="empirical")
  out = sweep(c, values={"strategy.ewc.lam": [0.0, 100.0]}, scenario=sc)
  assert [m["strategy.ewc.lam"] for m in out.members] == [0.0, 100.0]
  state = out.result.state

  def moved(i):
    # The merged quadratic at the final parameters θ₁ is F₀(θ₁ − θ*₀)²:
    # experience 1's own term is zero at its anchor θ₁.
    ss = jax.tree.map(lambda a: a[i], state.strategy)
    assert int(ss.count) == 2
    params = jax.tree.map(lambda a: a[i], state.params)
    return float(_penalty.quadratic(ss.precision, ss.center, params)
                 + ss.residual)

  np.testing.assert_array_equal(state.strategy.lam, [0.0, 100.0])
  free, held = moved(0), moved(1)
  assert held < 0.1 * free


# --------------------------------------------------------------------------
# The experiment configs build for every strategy; a shrunk one runs.


def _load_config(name):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _data_dir():
  import os
  root = os.path.join(os.path.dirname(__file__), "..")
  return os.environ.get("JAXCL_DATA_DIR",
                        os.path.join(root, "..", "shared", "data"))


@pytest.mark.parametrize("file", ["split_mnist_regularisation.py",
                                  "permuted_mnist_regularisation.py"])
def test_experiment_configs_build_every_strategy(file):
  mod = _load_config(file)
  for name in mod.STRATEGIES:
    c = mod.get_config(f"strategy={name},quick,strength=0.5")
    assert c.strategy.name == name
    assert c.strategy[name][mod.STRENGTH[name]] == 0.5
    # The factory accepts every configured hyperparameter.
    from jaxcl import strategies
    strategies.get(name, **dict(c.strategy[name]))
  with pytest.raises(ValueError, match="unknown strategy"):
    mod.get_config("strategy=ewc2")


def test_permuted_config_with_reference_input_runs_hypernetwork():
  # pad=2,first_identity=True: the reference codes' 32x32 input with the
  # first task unpermuted; the hypernetwork's target must take 1024 inputs.
  mod = _load_config("permuted_mnist_regularisation.py")
  c = mod.get_config("strategy=hypernetwork,pad=2,first_identity=True,quick,"
                     "lr=0.001")
  assert c.model.hypernet.input_dim == 32 * 32
  c.dataset.data_dir = _data_dir()
  c.report.progress = False
  sc = experiment.build_scenario(c)
  x0 = sc.experiences[0].train_x
  assert x0.shape[1:] == (32, 32, 1)
  assert np.all(x0[:, :2] == 0) and np.all(x0[:, -2:] == 0)  # unpermuted
  assert np.any(sc.experiences[1].train_x[:, :2] != 0)  # permuted padding
  res = experiment.run(c, scenario=sc)  # the stream just checked, not a reload
  assert res.accuracy.shape == (3, 3)
  # Task given, 10 classes, 2000 examples, one short epoch at Adam 1e-3:
  # every task well above chance (0.1), and the first task kept.
  acc = np.asarray(res.accuracy)
  assert np.all(np.diag(acc) > 0.3), acc
  assert acc[-1, 0] > acc[0, 0] - 0.05, acc


ADAM_ARG = "strategy=online_ewc,quick,lr=0.001,init=torch"


@pytest.fixture(scope="module")
def permuted_quick_two():
  """The quick permuted MNIST stream of ``ADAM_ARG`` cut to two
  experiences (one boundary is enough for Adam's count to tell a kept
  state from a reset one), loaded and permuted once for both cases."""
  c = _load_config("permuted_mnist_regularisation.py").get_config(ADAM_ARG)
  c.dataset.data_dir = _data_dir()
  c.scenario.n_experiences = 2
  return experiment.build_scenario(c)


@pytest.mark.parametrize("keep", [False, True])
def test_permuted_config_reference_network_keeps_adam_across_experiences(
    keep, permuted_quick_two):
  # init=torch,keep_opt: van de Ven's network (PyTorch nn.Linear init, one
  # Adam for the whole stream). Adam's step count shows whether its state
  # survived the experience boundaries.
  mod = _load_config("permuted_mnist_regularisation.py")
  c = mod.get_config(ADAM_ARG + (",keep_opt" if keep else ""))
  assert c.model.init == "torch" and c.train.reset_optimizer is (not keep)
  c.dataset.data_dir = _data_dir()
  c.scenario.n_experiences = 2
  c.report.progress = False
  sc = permuted_quick_two
  assert len(sc.experiences) == c.scenario.n_experiences
  res = experiment.run(c, scenario=sc)
  steps = res.learner.epoch_steps * c.train.epochs
  counts = [int(np.max(x)) for x in jax.tree.leaves(res.state.opt_state)
            if np.asarray(x).dtype == np.int32]
  assert counts, res.state.opt_state
  expected = steps * c.scenario.n_experiences if keep else steps
  assert max(counts) == expected, (counts, expected)
  # Short quick run: every permuted task still well above chance (0.1).
  assert np.all(np.diag(res.accuracy) > 0.3), res.accuracy


def test_split_mnist_quick_config_runs_lwf():
  mod = _load_config("split_mnist_regularisation.py")
  c = mod.get_config("strategy=lwf,kind=task,quick")
  c.dataset.data_dir = _data_dir()
  c.report.progress = False
  res = experiment.run(c)
  assert res.accuracy.shape == (5, 5)
  assert res.learner.chunk_fn._cache_size() == 1
  # Task-incremental 2-way tasks: far above chance even after 1 short epoch.
  assert res.metrics["acc"] > 0.8


# --------------------------------------------------------------------------
# LFL: the feature penalty, the frozen output layer.


def test_lfl_feature_distance_is_mse_over_valid_rows():
  rng = np.random.default_rng(0)
  f, g = rng.normal(size=(2, 5, 3)).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 0], np.float32)
  want = np.mean((f[mask > 0] - g[mask > 0]) ** 2)   # torch's mse_loss
  got = feature_distance(jnp.asarray(f), jnp.asarray(g), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_lfl_step_is_the_hand_objective_with_the_head_frozen():
  """On the second experience one SGD step equals the step of CE + λ_e ·
  MSE(features, θ_o's features), taken by hand, with the head's update
  zero; the first experience's step is plain cross-entropy."""
  import functools
  from jaxcl.state import cross_entropy
  from jaxcl.train import train_step
  ctx, sc = _ctx("domain", widths=(5,))
  lam = 0.7
  strategy = lfl(lambda_e=lam)
  step = jax.jit(functools.partial(train_step, ctx, strategy))
  state = init_state(ctx, strategy, 0)
  e0, e1 = sc.experiences[:2]
  batch = {"x": jnp.asarray(e1.train_x[:8]), "y": jnp.asarray(e1.train_y[:8]),
           "task": jnp.zeros(8, jnp.int32),
           "mask": jnp.ones(8, jnp.float32), "index": jnp.arange(8)}
  # Experience 0: no penalty, the head trains.
  after0, _ = step(state, batch)
  assert not np.allclose(after0.params["head"]["kernel"],
                         state.params["head"]["kernel"])
  ones = jax.tree.map(jnp.ones_like, state.params)
  # Compiled, as the training step runs it (op by op, this and the
  # hand-written reference below compiled some 80 small programs).
  update_grads = jax.jit(
      lambda ss, g, b: strategy.update_grads(ctx, ss, g, None, b, None))
  kept = update_grads(state.strategy, ones, batch)
  _tree_close(kept, ones)
  # θ_o: the model after a few steps, then one step of experience 1.
  for _ in range(3):
    state, _ = step(state, batch)
  state = strategy.after_experience(ctx, state, e0)
  old = state.params
  state = state.replace(params=jax.tree.map(lambda p: p * 1.1, old))
  new, _ = step(state, batch)
  # The head gets no gradient (Avalanche: requires_grad=False), the rest
  # its own.
  cut = update_grads(state.strategy, ones, batch)
  _tree_close(cut["head"], jax.tree.map(jnp.zeros_like, ones["head"]))
  _tree_close(cut["backbone"], ones["backbone"])

  def objective(p, old):
    logits = ctx.logits(p, state.model_state, batch["x"], batch["task"])
    f = ctx.apply(p, state.model_state, batch["x"], batch["task"],
                  features=True)[0]
    f_old = ctx.apply(old, state.model_state, batch["x"], batch["task"],
                      features=True)[0]
    return (cross_entropy(logits, batch["y"], batch["mask"])
            + lam * jnp.mean((f - f_old) ** 2))

  @jax.jit
  def reference(p, old):
    g = jax.grad(objective)(p, old)
    return g, jax.tree.map(lambda q, d: q - 0.1 * d, p, g)

  g, want = reference(state.params, old)
  _tree_close(new.params["backbone"], want["backbone"], rtol=1e-5,
              atol=1e-6)
  # The head is θ_o's, bit for bit (not the scaled one the step began at).
  for a, b in zip(jax.tree.leaves(new.params["head"]),
                  jax.tree.leaves(old["head"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(g["backbone"]["Dense_0"]["kernel"]).max()) > 0


def test_lfl_in_the_loop_freezes_the_head_and_holds_the_features(digits):
  """Momentum and weight decay would move a head whose gradient is merely
  zero; the head stays experience 0's. A large λ_e keeps experience 0's
  features closer than λ_e = 0 does."""
  sc = scenarios.permuted(digits, 3, kind="domain")
  c = experiment.default_config()
  c.model.widths = (16,)
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.05
  c.optimizer.weight_decay = 1e-3
  c.train.epochs = 2
  c.report.progress = False
  c.strategy.name = "lfl"
  drift = {}
  for lam in (0.0, 10.0):
    c.strategy.lfl = dict(lambda_e=lam)
    # One run: the state as experience 0 ended stands for a run of it alone.
    res, states = run_keeping_states(c, scenario=sc)
    first = states[0]
    assert res.learner.chunk_fn._cache_size() == 1
    for a, b in zip(jax.tree.leaves(res.state.params["head"]),
                    jax.tree.leaves(first.params["head"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.asarray(sc.experiences[0].test_x)
    t = jnp.zeros(len(x), jnp.int32)
    features = jax.jit(lambda p, ms, x, t: res.learner.ctx.apply(
        p, ms, x, t, features=True)[0])
    f0 = features(first.params, first.model_state, x, t)
    f = features(res.state.params, res.state.model_state, x, t)
    drift[lam] = float(jnp.mean((f - f0) ** 2))
  assert drift[10.0] < 0.5 * drift[0.0], drift


def test_lfl_needs_an_output_layer_named_head():
  ctx, _ = _ctx("domain")
  with pytest.raises(ValueError, match=r"lfl freezes .* 'head'.*\['w'\]"):
    lfl().init(ctx, jax.random.PRNGKey(0), {"w": jnp.zeros(3)})
  # One head per task: later tasks' heads would never train.
  heads = {"head": {"kernel": jnp.zeros((5, 3 * C)), "bias": jnp.zeros(3 * C)}}
  with pytest.raises(ValueError, match="lfl freezes the whole output layer"):
    lfl().init(ctx, jax.random.PRNGKey(0), heads)


def test_permuted_avalanche_config_builds_and_normalises(data_dir):
  from experiments import permuted_mnist_avalanche as mod
  from jaxcl import strategies
  for name in mod.STRATEGIES:
    c = mod.get_config(f"strategy={name},quick")
    kwargs = {k: dict(v) for k, v in c.strategy.items() if k != "name"}
    assert strategies.from_spec(c.strategy.name, kwargs)[0].name == name
  c = mod.get_config("strategy=lfl,quick")
  assert c.strategy.lfl["lambda_e"] == 1e-4
  c.dataset.data_dir = data_dir
  d = experiment.load_data(c)
  # (x - 0.1307) / 0.3081: a blank pixel is -0.424, a full one 2.821.
  np.testing.assert_allclose([d.train_x.min(), d.train_x.max()],
                             [-0.1307 / 0.3081, 0.8693 / 0.3081], rtol=1e-5)
  with pytest.raises(ValueError, match="unknown strategy"):
    mod.get_config("strategy=ewc")
