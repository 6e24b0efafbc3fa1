"""FDR, HAL and MER: the replay methods of Buzzega et al. 2020's table
that follow Mammoth's code (split from test_replay.py so that the two
files' tests run on separate workers)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl import experiment, models, train
from jaxcl.state import cross_entropy
from jaxcl.strategies import fdr as fdr_mod
from jaxcl.strategies import hal as hal_mod
from jaxcl.strategies.fdr import fdr
from jaxcl.strategies.hal import hal
from jaxcl.strategies.mer import mer
from test_replay import B, batch_of, config, der_step, make_ctx


def _jit_der_step(ctx, s):
  """``der_step(ctx, s, state, batch)`` compiled, as the training loop runs
  ``train_step`` (inside its jitted chunk). Eager, a step and the
  hand-written references ran op by op: 170-190 small compiled programs in
  the FDR and HAL step tests, most of their time."""
  return jax.jit(lambda st, b: der_step(ctx, s, st, b))


# ---------------------------------------------------------------------------
# FDR.


def test_fdr_softmax_distance_by_hand():
  rng = np.random.default_rng(0)
  out, z = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
  z[1] = out[1]                       # equal distributions: distance 0
  ok = np.array([1.0, 1.0, 1.0, 0.0])  # the last row is padding
  sm = lambda a: np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  want = np.linalg.norm(sm(out) - sm(z), axis=1)[:3].sum() / 3
  got = jax.jit(fdr_mod.softmax_distance)(jnp.asarray(out), jnp.asarray(z),
                                          jnp.asarray(ok))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The gradient is finite, and 0 on the equal row and on padding.
  g = np.asarray(jax.jit(jax.grad(fdr_mod.softmax_distance))(
      jnp.asarray(out), jnp.asarray(z), jnp.asarray(ok)))
  assert np.isfinite(g).all()
  np.testing.assert_array_equal(g[1], 0.0)
  np.testing.assert_array_equal(g[3], 0.0)
  assert np.abs(g[0]).sum() > 0


def test_fdr_memory_is_experience_balanced_with_logits_at_the_end(stream):
  ctx = make_ctx(stream)
  s = fdr(mem_size=40)
  state = train.init_state(ctx, s, 0)
  e0, e1 = stream.experiences
  fwd = jax.jit(lambda p, m: ctx.logits(p, {}, m.x, m.task))  # compiled once
  logits = lambda p, m: np.asarray(fwd(p, m))
  # Experience 0 ends: all 40 slots are its examples, with the logits of
  # the network as it ends.
  st = s.before_experience(ctx, state, e0)
  st = s.after_experience(ctx, st, e0)
  ss = st.strategy
  mem = ss.memory
  assert np.asarray(mem.valid).all()
  np.testing.assert_array_equal(np.asarray(mem.experience), 0)
  assert set(np.asarray(mem.y).tolist()) <= set(e0.train_y.tolist())
  np.testing.assert_allclose(np.asarray(ss.logits),
                             logits(st.params, mem), rtol=1e-5, atol=1e-6)
  rows = {r.tobytes() for r in np.asarray(mem.x).reshape(40, -1)}
  assert len(rows) == 40      # no example twice
  # Experience 1 ends under other parameters: 20 of each; experience 0's
  # kept entries keep their logits bit for bit, experience 1's are new.
  old = {np.asarray(mem.x[i]).tobytes(): np.asarray(ss.logits[i])
         for i in range(40)}
  moved = jax.tree.map(lambda p: p + 0.5, st.params)
  st = st.replace(params=moved)
  st = s.before_experience(ctx, st, e1)
  st = s.after_experience(ctx, st, e1)
  ss = st.strategy
  mem = ss.memory
  ex = np.asarray(mem.experience)
  assert (ex == 0).sum() == 20 and (ex == 1).sum() == 20
  now = logits(moved, mem)
  for i in range(40):
    if ex[i] == 0:
      np.testing.assert_array_equal(np.asarray(ss.logits[i]),
                                    old[np.asarray(mem.x[i]).tobytes()])
    else:
      np.testing.assert_allclose(np.asarray(ss.logits[i]), now[i],
                                 rtol=1e-5, atol=1e-6)


def test_fdr_step_is_the_codes_two_sgd_steps(stream):
  """One FDR step with plain SGD is Mammoth's two: a cross-entropy step on
  the batch, then a function-distance step (weight alpha) on memory rows
  from the parameters the first one reached."""
  lr, alpha = 0.1, 0.7
  ctx = make_ctx(stream, lr=lr)
  s = fdr(mem_size=30, alpha=alpha, batch_size=8)
  state = train.init_state(ctx, s, 0)
  step = _jit_der_step(ctx, s)
  e0, e1 = stream.experiences
  # During experience 0 the memory is empty: the step is plain SGD.
  b0 = batch_of(e0)
  st, _, prepared = step(state, b0)
  assert not np.asarray(prepared["fdr_ok"]).any()
  # The hand-written steps, each compiled once.
  ce = jax.jit(lambda p, b: cross_entropy(
      ctx.logits(p, {}, b["x"], b["task"], train=True), b["y"], b["mask"]))
  sgd = jax.jit(lambda p, b: jax.tree.map(lambda q, g: q - lr * g, p,
                                          jax.grad(ce)(p, b)))
  want = sgd(state.params, b0)
  for a, b in zip(jax.tree.leaves(st.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)
  st = s.after_experience(ctx, st, e0)
  st = s.before_experience(ctx, st, e1)
  b1 = batch_of(e1)
  new, loss, prepared = step(st, b1)
  assert np.asarray(prepared["fdr_ok"]).all()
  theta = st.params
  theta1 = sgd(theta, b1)

  @jax.jit
  def distance(p):
    out = ctx.logits(p, {}, prepared["fdr_x"], prepared["fdr_task"],
                     train=True)
    sm = jax.nn.softmax
    return jnp.mean(jnp.linalg.norm(sm(out) - sm(prepared["fdr_z"]),
                                    axis=1))

  theta2 = jax.jit(lambda p1: jax.tree.map(
      lambda p, g: p - lr * alpha * g, p1, jax.grad(distance)(p1)))(theta1)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(theta2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)
  # The step's loss reports both terms.
  np.testing.assert_allclose(
      float(loss), float(ce(theta, b1)) + alpha * float(distance(theta1)),
      rtol=1e-5)
  # ... and the second term moved the parameters (not a no-op).
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(new.params), jax.tree.leaves(theta1))) > 1e-5


def test_fdr_keeps_old_outputs_on_split_digits(full_stream):
  """Matching the stored softmax slows forgetting: after the stream, FDR's
  accuracy on the first experience is well above Naive's."""
  accs = {}
  for name, kw in (("naive", {}), ("fdr", dict(fdr=dict(mem_size=100)))):
    cfg = config(name, **kw)
    cfg.train.epochs = 2
    accs[name] = experiment.run(cfg, scenario=full_stream).accuracy
  assert accs["naive"][-1, 0] < 0.1, accs["naive"]
  assert accs["fdr"][-1, 0] > 0.3, accs["fdr"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(alpha=-1.0), "fdr: alpha must be a finite number >= 0, got -1"),
    (dict(alpha=float("inf")), "fdr: alpha must be a finite number"),
    (dict(mem_size=0), "fdr: mem_size must be a positive int, got 0"),
    (dict(batch_size=-2), "fdr: batch_size must be an int >= 0"),
])
def test_fdr_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    fdr(**kwargs)


def test_fdr_bad_sizes_at_init(full_stream):
  ctx = make_ctx(full_stream)   # 5 experiences, training batch 10
  params = train.init_variables(ctx, jax.random.PRNGKey(0))[0]
  with pytest.raises(ValueError, match="fdr: batch_size=10 is larger than "
                     "the memory capacity mem_size=8"):
    fdr(mem_size=8).init(ctx, jax.random.PRNGKey(0), params)
  with pytest.raises(ValueError, match="fdr: mem_size=4 is smaller than the "
                     "number of experiences \\(5\\)"):
    fdr(mem_size=4, batch_size=2).init(ctx, jax.random.PRNGKey(0), params)


# ---------------------------------------------------------------------------
# HAL.


def _with_anchors(ss, anchors, y):
  n = anchors.shape[0]
  return ss._replace(anchors=ss.anchors.at[:n].set(anchors),
                     anchor_y=ss.anchor_y.at[:n].set(y),
                     anchor_ok=ss.anchor_ok.at[:n].set(True))


@pytest.mark.parametrize("lookahead_lr", [0.0, 0.3])
def test_hal_step_is_the_codes_two_pass_update(stream, lookahead_lr):
  """With plain SGD a HAL step is the code's: a replay step to θ̃, then,
  from θ, one step on the replay loss plus lam times the mean squared move
  of the anchors' outputs towards f_θ̃ (held constant)."""
  lr, lam = 0.1, 0.7
  ctx = make_ctx(stream, lr=lr)
  s = hal(mem_size=30, batch_size=6, lam=lam, lookahead_lr=lookahead_lr)
  state = train.init_state(ctx, s, 0)
  e0 = stream.experiences[0]
  step = _jit_der_step(ctx, s)
  for i in range(2):   # fill the reservoir with 20 rows
    state = step(state, batch_of(e0, start=B * i))[0]
  anchors = jnp.asarray(np.random.default_rng(1).uniform(
      size=(3,) + e0.train_x.shape[1:]), jnp.float32)
  state = state.replace(strategy=_with_anchors(state.strategy, anchors,
                                               jnp.array([0, 1, 0])))
  b = batch_of(e0, start=2 * B)
  new, loss, prepared = step(state, b)
  assert prepared["x"].shape[0] == B + 6 and prepared["mask"].all()
  theta = state.params
  out = lambda p, x, t: ctx.logits(p, {}, x, t, train=True)

  @jax.jit
  def reference(theta, prepared, anchors):
    """The code's update, its loss and the anchor term at θ, compiled
    once."""
    ce = lambda p: cross_entropy(out(p, prepared["x"], prepared["task"]),
                                 prepared["y"], prepared["mask"])
    g = jax.grad(ce)(theta)
    ahead = jax.tree.map(lambda p, d: p - (lookahead_lr or lr) * d, theta,
                         g)
    t = jnp.zeros((3,), jnp.int32)
    target = out(ahead, anchors, t)
    pen = lambda p: lam * jnp.mean((out(p, anchors, t) - target) ** 2)
    want = jax.tree.map(lambda p, a, c: p - lr * (a + c), theta, g,
                        jax.grad(pen)(theta))
    return want, ce(theta) + pen(theta), pen(theta)

  want, want_loss, pen_theta = reference(theta, prepared, anchors)
  for a, w in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  assert float(pen_theta) > 0
  # The anchors' slots past the three learned ones are left out: zeroing
  # them would change nothing, while an unmasked slot would.
  assert not np.asarray(state.strategy.anchor_ok[3:]).any()


def test_hal_learn_anchors_is_sgd_on_each_anchors_objective(stream):
  ctx = make_ctx(stream)
  k = jax.random.PRNGKey(0)
  p_t = train.init_variables(ctx, k)[0]
  p_m = train.init_variables(ctx, jax.random.PRNGKey(1))[0]
  shape = stream.experiences[0].train_x.shape[1:]
  e0 = jax.random.uniform(jax.random.PRNGKey(2), (2,) + shape)
  y = jnp.array([3, 7])
  task = jnp.zeros((2,), jnp.int32)
  phi = jnp.linspace(0.0, 1.0, 32)
  lr, gamma = 0.05, 0.3
  # Compiled, as the strategy's anchors_for runs it.
  got = jax.jit(lambda *a: hal_mod.learn_anchors(ctx, *a, lr, gamma, 3))(
      p_t, p_m, {}, phi, y, task, e0)

  def one(e, c):   # the code's loop body, one anchor at a time
    ce = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        ctx.logits(p, {}, e[None], task[:1]), jnp.array([c]))[0]
    feat = ctx.apply(p_t, {}, e[None], task[:1], features=True)[0][0]
    return -ce(p_m) + ce(p_t) + gamma * jnp.sum((feat - phi) ** 2)

  # One SGD step on an anchor, compiled once (with learn_anchors compiled
  # too, the test compiles 12 programs instead of 72).
  sgd = jax.jit(lambda e, c: e - lr * jax.grad(one)(e, c))
  for i in range(2):
    e = e0[i]
    for _ in range(3):
      e = sgd(e, y[i])
    np.testing.assert_allclose(np.asarray(got[i]), np.asarray(e), rtol=1e-4,
                               atol=1e-5)
  assert float(jnp.abs(got - e0).max()) > 1e-3


def test_hal_anchors_and_running_features_on_split_digits(stream):
  beta = 0.6
  ctx = make_ctx(stream)
  s = hal(mem_size=40, beta=beta, anchor_steps=100)
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  state = train.init_state(ctx, s, 0)
  e0, e1 = stream.experiences
  state = s.before_experience(ctx, state, e0)
  # φ: the running mean of the incoming rows' features after each step,
  # from 0 as the experience starts.
  feats_ = jax.jit(lambda p, x: ctx.apply(  # compiled once per shape
      p, {}, x, jnp.zeros((x.shape[0],), jnp.int32), features=True)[0])
  feats = lambda p, x: np.asarray(feats_(p, x))
  phi = np.zeros(32)
  for i in range(2):
    b = batch_of(e0, start=B * i)
    if i:  # a mask made loss weights (the generative replays' 1 / (B + R))
      b["mask"] = b["mask"] / (2 * B)
    state = step(state, b)
    phi = beta * phi + (1 - beta) * feats(state.params, b["x"]).mean(0)
  np.testing.assert_allclose(np.asarray(state.strategy.phi), phi, rtol=1e-5,
                             atol=1e-6)
  assert np.abs(phi).sum() > 0
  for i in range(2, 30):   # train the experience a little
    state = step(state, batch_of(e0, start=(B * i) % len(e0.train_y)))
  state = s.after_experience(ctx, state, e0)
  ss = state.strategy
  classes = sorted(set(e0.train_y.tolist()))
  ok = np.asarray(ss.anchor_ok)
  np.testing.assert_array_equal(np.flatnonzero(ok), classes)
  np.testing.assert_array_equal(np.asarray(ss.anchor_y)[ok], classes)
  # The mean-feature term pulls the anchors' features to φ: closer than
  # those of any of 50 inputs drawn as the anchors start.
  phi = np.asarray(ss.phi)
  dist = lambda x: np.linalg.norm(feats(state.params, x) - phi, axis=1)
  start = jax.random.uniform(jax.random.PRNGKey(5),
                             (50,) + e0.train_x.shape[1:])
  assert dist(ss.anchors[np.asarray(classes)]).max() < dist(start).min()
  # The next experience starts φ again and adds its own two anchors.
  state = s.before_experience(ctx, state, e1)
  assert not np.asarray(state.strategy.phi).any()
  state = s.after_experience(ctx, state, e1)
  both = classes + sorted(set(e1.train_y.tolist()))
  ok = np.asarray(state.strategy.anchor_ok)
  np.testing.assert_array_equal(np.flatnonzero(ok), sorted(both))
  np.testing.assert_array_equal(np.asarray(state.strategy.anchor_y)[ok],
                                sorted(both))


def test_hal_anchors_are_learned_against_the_memory_finetuned_network(
    stream, monkeypatch):
  """θ_M is θ_t after finetune_steps SGD steps (rate anchor_lr) on memory
  batches of the training batch size. With a memory of exactly that size,
  full, each batch is the whole memory (drawn without replacement; the
  mean loss does not depend on the order), so θ_M can be made by hand; the
  anchors' random start is fixed here so the reference starts there too."""
  lr, gamma, steps = 0.05, 0.3, 3
  ctx = make_ctx(stream)
  s = hal(mem_size=B, anchor_lr=lr, gamma=gamma, anchor_steps=steps,
          finetune_steps=2)
  e0 = stream.experiences[0]
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  state = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])(
      state, batch_of(e0))
  ss = state.strategy
  assert np.asarray(ss.memory.valid).all()
  classes = np.unique(e0.train_y).astype(np.int32)
  task = jnp.zeros(classes.shape, jnp.int32)
  start = jax.random.uniform(jax.random.PRNGKey(9),
                             (len(classes),) + e0.train_x.shape[1:])
  learn = hal_mod.learn_anchors
  monkeypatch.setattr(hal_mod, "learn_anchors",
                      lambda c, p_t, p_m, ms, phi, y, t, e, *a:
                      learn(c, p_t, p_m, ms, phi, y, t, start, *a))
  got = s.after_experience(ctx, state, e0).strategy.anchors[classes]
  m = ss.memory
  ce = lambda p: cross_entropy(ctx.logits(p, {}, m.x, m.task, train=True),
                               m.y, jnp.ones((B,)))
  sgd = jax.jit(lambda p: jax.tree.map(lambda a, g: a - lr * g, p,
                                       jax.grad(ce)(p)))
  theta = state.params
  theta_m = sgd(sgd(theta))
  anchors = jax.jit(lambda p_m: learn(ctx, theta, p_m, {}, ss.phi,
                                      jnp.asarray(classes), task, start, lr,
                                      gamma, steps))
  want = anchors(theta_m)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                             atol=1e-5)
  # θ_M matters: without the fine-tuning the anchors would be others.
  assert float(jnp.abs(anchors(theta) - want).max()) > 1e-4


def test_hal_anchors_start_from_random_pixels_standardised(stream,
                                                           monkeypatch):
  """With dataset.normalize (here (0.25, 0.5)) the anchors' uniform random
  start is drawn in pixels and standardised, as the inputs are: the same
  draw as a pixel run's, mapped."""
  starts = []
  learn = hal_mod.learn_anchors

  def spy(c, p_t, p_m, ms, phi, y, t, e, *a):
    jax.debug.callback(lambda v: starts.append(np.asarray(v)), e)
    return learn(c, p_t, p_m, ms, phi, y, t, e, *a)

  monkeypatch.setattr(hal_mod, "learn_anchors", spy)
  e0 = stream.experiences[0]
  for ctx in (make_ctx(stream),
              dataclasses.replace(make_ctx(stream), normalize=(0.25, 0.5))):
    s = hal(mem_size=B, anchor_steps=1, finetune_steps=1)
    state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
    state = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])(
        state, batch_of(e0))
    s.after_experience(ctx, state, e0)
  jax.effects_barrier()
  assert len(starts) == 2 and starts[0].min() >= 0 and starts[0].max() <= 1
  np.testing.assert_allclose(starts[1], (starts[0] - 0.25) / 0.5,
                             rtol=1e-5, atol=1e-5)


def test_hal_anchor_slots(stream):
  """One slot per class (a class brought again replaces its anchor); in a
  domain-incremental stream one per class and experience."""
  ctx = make_ctx(stream)
  info = ctx.info
  assert hal_mod.anchor_capacity(info) == 10
  np.testing.assert_array_equal(
      hal_mod.anchor_slots(info, 3, np.array([4, 5])), [4, 5])
  dom = dataclasses.replace(info, kind="domain")
  assert hal_mod.anchor_capacity(dom) == 20
  np.testing.assert_array_equal(
      hal_mod.anchor_slots(dom, 1, np.arange(10)), np.arange(10, 20))
  s = hal(mem_size=20, anchor_steps=1)
  state = train.init_state(ctx, s, 0)
  e0 = stream.experiences[0]
  state = s.after_experience(ctx, state, e0)
  first = np.asarray(state.strategy.anchors[:2])
  # The same classes again, from a network that has moved.
  state = state.replace(params=jax.tree.map(lambda p: p + 0.1, state.params))
  state = s.after_experience(ctx, state, e0)
  ss = state.strategy
  np.testing.assert_array_equal(np.asarray(ss.anchor_ok),
                                [True] * 2 + [False] * 8)
  assert not np.array_equal(np.asarray(ss.anchors[:2]), first)


def test_hal_diverging_anchors_are_a_clear_error(stream):
  ctx = make_ctx(stream)
  s = hal(mem_size=20, anchor_lr=1e30, anchor_steps=5)
  state = train.init_state(ctx, s, 0)
  with pytest.raises(ValueError, match=r"hal: the anchors learned at the end "
                     r"of experience 0 diverged \(non-finite values\) at "
                     r"anchor_lr=1e\+30 over anchor_steps=5; lower anchor_lr"):
    s.after_experience(ctx, state, stream.experiences[0])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(lam=-1.0), "hal: lam must be a finite number >= 0"),
    (dict(beta=1.5), r"hal: beta must be in \[0, 1\], got 1.5"),
    (dict(beta=-0.1), "hal: beta must be a finite number >= 0"),
    (dict(gamma=float("nan")), "hal: gamma must be a finite number"),
    (dict(anchor_lr=0.0), "hal: anchor_lr must be a finite number > 0"),
    (dict(anchor_steps=0), "hal: anchor_steps must be an int >= 1"),
    (dict(finetune_steps=-1), "hal: finetune_steps must be an int >= 0"),
    (dict(mem_size=0), "hal: mem_size must be a positive int, got 0"),
    (dict(lookahead_lr=-0.1), "hal: lookahead_lr must be a finite number"),
])
def test_hal_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    hal(**kwargs)


# ---------------------------------------------------------------------------
# MER.


def _mer_reference(ctx, params, prepared, lr, beta, gamma, batches,
                   per_example):
  """Riemer et al.'s Algorithm 1 (``model/meralg1.py``) as a Python loop
  over the prepared batch's incoming rows and drawn memory rows."""
  def ce(p, x, y, t, w):
    return cross_entropy(ctx.logits(p, {}, x, t, train=True), y, w)

  @jax.jit
  def sgd(p, x, y, t, w):
    return jax.tree.map(lambda a, g: a - lr * g, p,
                        jax.grad(ce)(p, x, y, t, w))

  mix = jax.jit(lambda a, b, r: jax.tree.map(lambda u, v: u + r * (v - u),
                                             a, b))
  theta = params
  # Rows picked on the host: indexing device arrays by Python ints compiled
  # one small program per index.
  prepared = {k: np.asarray(v) for k, v in prepared.items()}
  one = np.ones((1,), np.float32)
  for i in range(prepared["y"].shape[0]):
    if not prepared["mask"][i]:
      continue
    before = theta
    for s in range(batches):
      wb = theta
      x = np.concatenate([prepared["x"][i][None], prepared["mer_x"][i, s]])
      y = np.concatenate([prepared["y"][i][None], prepared["mer_y"][i, s]])
      t = np.concatenate([prepared["task"][i][None],
                          prepared["mer_task"][i, s]])
      w = np.concatenate([one, prepared["mer_ok"][i, s]])
      if per_example:
        for j in range(len(y)):
          if w[j]:
            theta = sgd(theta, x[j:j + 1], y[j:j + 1], t[j:j + 1], one)
      else:
        theta = sgd(theta, x, y, t, w)
      theta = mix(wb, theta, beta)
    theta = mix(before, theta, gamma)
  return theta


def _mer_state(ctx, s, exp, steps):
  """The state after ``steps`` steps on ``exp``, and the compiled
  ``der_step`` that took them."""
  state = train.init_state(ctx, s, 0)
  step = _jit_der_step(ctx, s)
  n = ctx.info.batch_size
  for i in range(steps):
    state = step(state, batch_of(exp, n=n, start=n * i))[0]
  return state, step


@pytest.mark.parametrize("stored", [
    B,
    # 2 rows in memory for 3 x 2 draws per incoming row: the draws that
    # found no valid row (mer_ok 0) take no part in the step.
    2])
@pytest.mark.parametrize("per_example", [True, False])
def test_mer_step_is_algorithm_1(stream, per_example, stored):
  lr, beta, gamma, batches = 0.1, 0.4, 0.7, 2
  ctx = make_ctx(stream, lr=lr)
  s = mer(mem_size=20, batch_size=3, batches=batches, beta=beta, gamma=gamma,
          lr=lr, per_example=per_example)
  e0 = stream.experiences[0]
  step = _jit_der_step(ctx, s)
  first = batch_of(e0)
  first["mask"] = (jnp.arange(B) < stored).astype(jnp.float32)
  state = step(train.init_state(ctx, s, 0), first)[0]
  assert int(state.strategy.memory.valid.sum()) == stored
  b = batch_of(e0, start=B)
  b["mask"] = b["mask"].at[3].set(0.0)   # a padding row changes nothing
  new, loss, prepared = step(state, b)
  assert prepared["mer_x"].shape == (B, batches, 3) + e0.train_x.shape[1:]
  ok = np.asarray(prepared["mer_ok"])
  assert ok.all() if stored == B else (ok.any() and not ok.all())
  # Each incoming row's s batches, and each row's, are draws of their own
  # (the reference below reads the draws from the batch, so one draw
  # repeated would pass it).
  draws = np.asarray(prepared["mer_x"]).reshape(B * batches, -1)
  if stored == B:   # 20 ordered draws of 3 of 10 (720 such): few repeats
    assert len({r.tobytes() for r in draws}) > B
  want = _mer_reference(ctx, state.params, prepared, lr, beta, gamma,
                        batches, per_example)
  for a, w in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4,
                               atol=2e-6)
  # The loss reported is the incoming rows' cross-entropy.
  ce = jax.jit(lambda p, b: cross_entropy(
      ctx.logits(p, {}, b["x"], b["task"], train=True), b["y"],
      b["mask"]))(state.params, b)
  np.testing.assert_allclose(float(loss), float(ce), rtol=1e-5)
  assert int(new.strategy.memory.seen) == stored + B - 1


def test_mer_per_example_differs_from_batch_mode_and_unit_rates_are_replay(
    stream):
  """With one batch and beta = gamma = 1, Mammoth's batch mode is one step
  of experience replay on a stream batch of 1 plus the memory rows; the
  paper's single-example steps are another update."""
  lr = 0.1
  info = train.stream_info(stream, 1)
  ctx = train.make_context(models.build("mlp", stream.num_classes,
                                        widths=(32,)),
                           train.make_optimizer("sgd", lr), info)
  e0 = stream.experiences[0]
  out = {}
  for per_example in (True, False):
    s = mer(mem_size=20, batch_size=5, lr=lr, per_example=per_example)
    state, step = _mer_state(ctx, s, e0, 8)
    new, _, prepared = step(state, batch_of(e0, n=1, start=8))
    out[per_example] = new.params
  x = jnp.concatenate([prepared["x"], prepared["mer_x"][0, 0]])
  y = jnp.concatenate([prepared["y"], prepared["mer_y"][0, 0]])
  t = jnp.concatenate([prepared["task"], prepared["mer_task"][0, 0]])
  w = jnp.concatenate([jnp.ones((1,)), prepared["mer_ok"][0, 0]])
  assert int(w.sum()) == 6

  @jax.jit
  def replay_step(p, x, y, t, w):
    """One step of experience replay by hand, compiled once."""
    g = jax.grad(lambda q: cross_entropy(ctx.logits(q, {}, x, t, train=True),
                                         y, w))(p)
    return jax.tree.map(lambda q, d: q - lr * d, p, g)

  er = replay_step(state.params, x, y, t, w)
  for a, w_ in zip(jax.tree.leaves(out[False]), jax.tree.leaves(er)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w_), rtol=1e-5,
                               atol=1e-6)
  gap = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(out[True]), jax.tree.leaves(out[False])))
  assert gap > 1e-4


def test_mer_keeps_a_chained_members_gradient(stream):
  ctx = make_ctx(stream)
  s = mer(mem_size=20, batch_size=3)
  state = _mer_state(ctx, s, stream.experiences[0], 1)[0]
  # prepare_batch, update_grads and task_loss compiled, as the training
  # step runs them (op by op, the test compiled 84 small programs).
  b = jax.jit(lambda ss, b, k: s.prepare_batch(ctx, ss, b, k))(
      state.strategy, batch_of(stream.experiences[0]), jax.random.PRNGKey(0))
  zero = jax.tree.map(jnp.zeros_like, state.params)
  one = jax.tree.map(jnp.ones_like, state.params)
  ug = jax.jit(lambda ss, g, p, b: s.update_grads(ctx, ss, g, p, b, None))
  g0 = ug(state.strategy, zero, state.params, b)
  g1 = ug(state.strategy, one, state.params, b)
  for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(c) - np.asarray(a), 1.0,
                               rtol=1e-4)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 0
  # The task loss is reported without a gradient of its own on the
  # incoming rows; rows another member appends keep theirs.
  extra = batch_of(stream.experiences[0], n=4, start=3 * B)
  wide = {k: jnp.concatenate([b[k], extra[k]]) for k in extra}
  logits = jax.jit(lambda p, b: ctx.logits(p, {}, b["x"], b["task"],
                                           train=True))(state.params, wide)
  task_loss = jax.jit(lambda ss, z, b: s.task_loss(ctx, ss, z, b))
  value = task_loss(state.strategy, logits, wide)
  np.testing.assert_allclose(
      float(value), float(jax.jit(cross_entropy)(logits, wide["y"],
                                                 wide["mask"])),
      rtol=1e-6)
  gl = np.asarray(jax.jit(jax.grad(
      lambda z, ss, b: s.task_loss(ctx, ss, z, b)))(logits, state.strategy,
                                                    wide))
  assert not gl[:B].any()
  assert np.abs(gl[B:]).sum(1).min() > 0


def test_mer_reads_the_incoming_mask_as_validity(stream):
  """A member chained before MER may scale the mask into loss weights
  (the generative replays: 1 / (B + R)); each valid incoming row is still
  one example of MER's SGD steps, and a 0 still a padding row."""
  ctx = make_ctx(stream)
  s = mer(mem_size=20, batch_size=3)
  state = _mer_state(ctx, s, stream.experiences[0], 1)[0]
  # Compiled, as the training step runs them.
  b = jax.jit(lambda ss, b, k: s.prepare_batch(ctx, ss, b, k))(
      state.strategy, batch_of(stream.experiences[0]), jax.random.PRNGKey(0))
  b["mask"] = b["mask"].at[2].set(0.0)
  zero = jax.tree.map(jnp.zeros_like, state.params)
  ug = jax.jit(lambda ss, g, p, b: s.update_grads(ctx, ss, g, p, b, None))
  g = lambda batch: ug(state.strategy, zero, state.params, batch)
  want = g(b)
  got = g(dict(b, mask=b["mask"] / (2 * B)))
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-5,
                               atol=1e-7)


def test_mer_refuses_an_optimiser_that_rescales_its_displacement(stream):
  info = train.stream_info(stream, B)
  model = models.build("mlp", stream.num_classes, widths=(8,))
  for name, lr, ok, opt in (("sgd", 0.1, True, {}), ("momentum", 0.1, True, {}),
                            ("sgd", 0.01, False, {}), ("adam", 0.1, False, {}),
                            ("sgd", 0.1, False, dict(clip_norm=1.0))):
    ctx = train.make_context(model, train.make_optimizer(name, lr, **opt),
                             info)
    params = train.init_variables(ctx, jax.random.PRNGKey(0))[0]
    if ok:
      mer(lr=0.1).init(ctx, jax.random.PRNGKey(0), params)
      continue
    with pytest.raises(ValueError, match=r"mer: the optimiser's first update "
                       r"for a gradient of 2 is -0\.\d+, not -2 \* lr = "
                       r"-0\.2\. mer hands.*another optimiser \(or "
                       r"optimizer.clip_norm\) rescales it"):
      mer(lr=0.1).init(ctx, jax.random.PRNGKey(0), params)
    mer(lr=0.1, check_optimizer=False).init(ctx, jax.random.PRNGKey(0),
                                            params)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(beta=0.0), "mer: beta must be a finite number > 0"),
    (dict(gamma=1.5), r"mer: gamma must be in \(0, 1\], got 1.5"),
    (dict(lr=-0.1), "mer: lr must be a finite number > 0"),
    (dict(batches=0), "mer: batches must be an int >= 1"),
    (dict(batch_size=-1), "mer: batch_size must be an int >= 0"),
    (dict(mem_size=5, batch_size=8), "mer: batch_size=8 is larger than the "
     "memory capacity mem_size=5"),
    (dict(per_example="yes"), "mer: per_example"),
    (dict(check_optimizer=1), "mer: check_optimizer"),
])
def test_mer_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    mer(**kwargs)
