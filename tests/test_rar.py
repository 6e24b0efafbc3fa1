"""Mechanism tests of RAR (retrospective adversarial replay), on
scikit-learn digits and hand-made linear models."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcl
from conftest import np_softmax
from jaxcl import buffers, experiment, strategies, train
from jaxcl.state import cross_entropy
from jaxcl.strategies import rar as rar_mod
from jaxcl.strategies.rar import rar
import test_replay as replay_tests
from test_replay import B, batch_of


# Replay's helpers, on a narrower MLP.
make_ctx = functools.partial(replay_tests.make_ctx, widths=(16,))


def memory_of(exp, n, experience=0, cap=30):
  mem = buffers.init(cap, exp.train_x.shape[1:])
  return buffers.reservoir_add(mem, jax.random.PRNGKey(experience),
                               jnp.asarray(exp.train_x[:n]),
                               jnp.asarray(exp.train_y[:n]),
                               jnp.zeros(n, jnp.int32), experience)


def np_mi_fgsm(grad, x0, eps, steps, mu, lo=0.0, hi=1.0):
  """MI-FGSM as the authors' Linf_distillation computes it (descending,
  per-row L1 norm, projection, clamp), in NumPy."""
  x, g, a = x0.copy(), np.zeros_like(x0), eps / steps
  for _ in range(steps):
    d = grad(x)
    g = mu * g + d / np.maximum(np.abs(d).sum(1, keepdims=True), 1e-12)
    x = np.clip(np.clip(x - a * np.sign(g), x0 - eps, x0 + eps), lo, hi)
  return x


# ---------------------------------------------------------------------------
# The attack.


def test_mi_fgsm_matches_numpy_on_a_linear_model():
  rng = np.random.default_rng(0)
  n, d, c = 6, 5, 3
  W = rng.normal(size=(d, c)).astype(np.float32)
  b = rng.normal(size=(c,)).astype(np.float32)
  x0 = rng.uniform(0, 1, size=(n, d)).astype(np.float32)
  x0[0, :2] = [0.0, 1.0]          # at the range's edges: clipping acts
  tgt = rng.integers(0, c, size=n)
  hf = rng.normal(size=(n, d)).astype(np.float32)   # feature targets

  # Label attack: d/dx CE(xW + b, t) = (softmax - onehot(t)) W^T.
  ce_grad = lambda x: (np_softmax(x @ W + b) - np.eye(c)[tgt]) @ W.T
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(
      z @ W + b, jnp.asarray(tgt))
  # Feature attack with identity features: d/dx mean((x - h)^2) = 2(x-h)/d.
  fm_grad = lambda x: 2 * (x - hf) / d
  fm = lambda z: jnp.mean((z - hf) ** 2, axis=1)
  for loss, grad in ((ce, ce_grad), (fm, fm_grad)):
    for eps, steps, mu in ((0.3, 3, 1.0), (0.2, 4, 0.5), (0.1, 1, 0.0)):
      got = jax.jit(functools.partial(
          rar_mod.mi_fgsm, loss, epsilon=eps, steps=steps, decay=mu,
          clip=(0.0, 1.0)))(jnp.asarray(x0))
      want = np_mi_fgsm(grad, x0, eps, steps, mu)
      np.testing.assert_allclose(got, want, atol=1e-6)
  # The steps change x (the test is not vacuous) and 0 steps is identity.
  assert np.abs(want - x0).max() > 0.05
  np.testing.assert_array_equal(rar_mod.mi_fgsm(
      ce, jnp.asarray(x0), epsilon=0.3, steps=0, decay=1.0, clip=None), x0)

def test_mi_fgsm_normalises_each_row_by_its_own_l1_norm():
  # Per-sample L1 (the authors' Linf_distillation, MI-FGSM's per-input
  # norm), not Avalanche's batch-wide one: a row's attack does not depend
  # on the scale of another row's loss. Loss s_r |z - t_r|^2, eps 0.2 in
  # 2 steps of 0.1, momentum 1. Row 0's first coordinate overshoots its
  # target (gradient 0.06 of L1 0.66, then -0.14 of L1 0.54), so step 2
  # takes it back to 0.5. Row 1 starts near its target and overshoots: its
  # gradient's L1 grows 17-fold. A batch-wide L1 ends at row 0 = (0.3,
  # 0.3) with s_1 = 100 (row 1's growth shrinks row 0's second gradient)
  # and at row 1 = (0.5, 0.5) with s_1 = 1.
  x0 = np.full((2, 2), 0.5, np.float32)
  t = np.array([[0.47, 0.2], [0.499, 0.49]], np.float32)
  want = np.array([[0.5, 0.3], [0.5, 0.3]], np.float32)
  for s1 in (1.0, 100.0):
    s = np.array([1.0, s1], np.float32)
    got = rar_mod.mi_fgsm(
        lambda z: jnp.asarray(s) * jnp.sum((z - t) ** 2, axis=1),
        jnp.asarray(x0), epsilon=0.2, steps=2, decay=1.0, clip=(0.0, 1.0))
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"s1={s1}")
    # The hand-derived rows are the NumPy reference's.
    np.testing.assert_allclose(np_mi_fgsm(
        lambda x: 2 * s[:, None] * (x - t), x0, 0.2, 2, 1.0), want, atol=1e-6)


def test_nearest_targets_by_brute_force():
  rng = np.random.default_rng(1)
  hm, hi = rng.normal(size=(12, 4)), rng.normal(size=(9, 4))
  ym, yi = rng.integers(0, 3, 12), rng.integers(0, 3, 9)
  valid = np.ones(9, bool)
  valid[[2, 5]] = False
  near = lambda r: np.argsort(((hm[r] - hi) ** 2).sum(1))
  # Not vacuous: for rows 1 and 4 the nearest row is padding, for rows 6,
  # 9 and 10 the nearest valid row has the sample's own label.
  assert all(not valid[near(r)[0]] for r in (1, 4))
  assert all(yi[near(r)[0]] == ym[r] and valid[near(r)[0]] for r in (6, 9, 10))
  for case in ("random", "one label"):
    if case == "one label":   # every valid row has label 0
      yi = np.where(valid, 0, 1)
      ym[:4] = 0
    j, found = rar_mod.nearest_targets(jnp.asarray(hm), jnp.asarray(ym),
                                       jnp.asarray(hi), jnp.asarray(yi),
                                       jnp.asarray(valid))
    for r in range(12):
      ok = [k for k in near(r) if valid[k] and yi[k] != ym[r]]
      assert bool(found[r]) == bool(ok), (case, r)
      if ok:
        assert int(j[r]) == ok[0], (case, r)
  assert not np.any(np.asarray(found[:4]))


def _attack_setup(stream):
  """``(ctx, params, incoming, grads, mem)``: RAR's initial parameters, a
  batch of experience 1, its gradient there, and a memory of 30 rows of
  experience 0."""
  e0, e1 = stream.experiences
  ctx = make_ctx(stream)
  params = train.init_state(ctx, rar(mem_size=30), 0).params
  incoming = batch_of(e1)
  grads = jax.grad(lambda p: cross_entropy(
      ctx.logits(p, {}, incoming["x"], incoming["task"]), incoming["y"],
      incoming["mask"]))(params)
  mem = memory_of(e0, 30)
  return ctx, params, incoming, grads, mem


@pytest.mark.parametrize("attack", ["features", "label"])
def test_attack_stays_in_the_ball_and_moves_towards_the_target(stream,
                                                               attack):
  ctx, params, incoming, grads, mem = _attack_setup(stream)
  eps = 0.1
  rows = jax.jit(functools.partial(
      rar_mod.adversarial_rows, ctx, n=8, opt_lr=0.5, epsilon=eps, steps=5,
      decay=1.0, clip=(0.0, 1.0), attack=attack))(
          params, {}, grads, mem, jax.random.PRNGKey(2), incoming)
  idx, ok = buffers.sample(mem, jax.random.PRNGKey(2), 8)
  x = np.asarray(mem.x[idx])
  xa = np.asarray(rows["x"])
  assert np.all(np.asarray(rows["mask"]) == 1)      # past classes: targets
  np.testing.assert_array_equal(rows["y"], mem.y[idx])
  assert np.abs(xa - x).max() <= eps + 1e-6
  assert np.abs(xa - x).max() > eps / 2           # it moved
  assert xa.min() >= 0 and xa.max() <= 1
  # At the virtual parameters the attack loss falls (towards the target),
  # and the sample's own label loses ground: the replayed point is nearer
  # the boundary with the current classes.
  virtual = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  feats = lambda z, t: np.asarray(ctx.apply(virtual, {}, z, t,
                                            features=True)[0])
  h_in = feats(incoming["x"], incoming["task"])
  j, _ = rar_mod.nearest_targets(feats(x, mem.task[idx]), mem.y[idx], h_in,
                                 incoming["y"], incoming["mask"] > 0)
  t = mem.task[idx]
  ce = lambda z, y: np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      ctx.logits(virtual, {}, z, t), y))
  if attack == "features":
    a = lambda z: ((feats(z, t) - h_in[np.asarray(j)]) ** 2).mean(1)
  else:
    a = lambda z: ce(z, incoming["y"][j])
  assert np.all(a(xa) < a(x)), (a(xa), a(x))
  assert ce(xa, mem.y[idx]).mean() > ce(x, mem.y[idx]).mean()


def test_attack_budget_and_clip_are_in_pixels_on_standardised_inputs(
    stream):
  """With dataset.normalize (here (0.25, 0.5)) the memory holds
  standardised rows; the attack's budget and its (0, 1) clip are pixels',
  so the attacked rows, turned back into pixels, stay within eps of the
  memory's pixels and inside [0, 1], and the black background (below 0
  once standardised) is not clipped up to the standardised 0."""
  ctx, params, incoming, grads, mem = _attack_setup(stream)
  normed = dataclasses.replace(ctx, normalize=(0.25, 0.5))
  std = lambda a: (a - 0.25) / 0.5
  mem = mem._replace(x=std(mem.x))
  incoming = dict(incoming, x=std(incoming["x"]))
  eps = 0.1
  rows = jax.jit(functools.partial(
      rar_mod.adversarial_rows, normed, n=8, opt_lr=0.5, epsilon=eps,
      steps=5, decay=1.0, clip=(0.0, 1.0), attack="features"))(
          params, {}, grads, mem, jax.random.PRNGKey(2), incoming)
  idx, _ = buffers.sample(mem, jax.random.PRNGKey(2), 8)
  pix = np.asarray(mem.x[idx]) * 0.5 + 0.25
  got = np.asarray(rows["x"]) * 0.5 + 0.25
  assert np.abs(got - pix).max() <= eps + 1e-5
  assert np.abs(got - pix).max() > eps / 2           # it moved
  assert got.min() >= -1e-6 and got.max() <= 1 + 1e-6
  assert (got < 0.05).mean() > 0.2  # background pixels stay near black


@pytest.mark.parametrize("attack", ["features", "label"])
def test_adversarial_rows_attack_at_the_virtual_step_by_hand(stream, attack):
  """adversarial_rows against its steps written out: the draw, the
  virtual parameters θ - η_v g, the nearest incoming row of another class
  by brute force in their features, and mi_fgsm (checked against NumPy
  above) on the attack's loss at θ^v; the label kept is the entry's."""
  ctx, params, incoming, grads, mem = _attack_setup(stream)
  kw = dict(n=8, opt_lr=2.0, epsilon=0.2, steps=3, decay=0.5,
            clip=(0.0, 1.0), attack=attack)
  key = jax.random.PRNGKey(7)
  rows = jax.jit(functools.partial(rar_mod.adversarial_rows, ctx, **kw))(
      params, {}, grads, mem, key, incoming)
  idx, ok = buffers.sample(mem, key, 8)
  x, y, t = mem.x[idx], mem.y[idx], mem.task[idx]
  virtual = jax.tree.map(lambda p, g: p - 2.0 * g, params, grads)
  feats = lambda p, z, t: ctx.apply(p, {}, z, t, features=True)[0]
  hm = np.asarray(feats(virtual, x, t), np.float64)
  hi = np.asarray(feats(virtual, incoming["x"], incoming["task"]),
                  np.float64)
  yi = np.asarray(incoming["y"])
  j = []
  for r in range(8):
    dist = ((hm[r] - hi) ** 2).sum(1)
    dist[yi == int(y[r])] = np.inf
    j.append(int(np.argmin(dist)))
  j = np.asarray(j)
  if attack == "features":
    loss = lambda z: jnp.mean((feats(virtual, z, t) - hi[j]) ** 2, axis=1)
  else:
    loss = lambda z: optax.softmax_cross_entropy_with_integer_labels(
        ctx.logits(virtual, {}, z, t), jnp.asarray(yi[j]))
  want = rar_mod.mi_fgsm(loss, x, epsilon=0.2, steps=3, decay=0.5,
                         clip=(0.0, 1.0))
  np.testing.assert_allclose(np.asarray(rows["x"]), np.asarray(want),
                             atol=1e-5)
  np.testing.assert_array_equal(rows["y"], y)
  np.testing.assert_array_equal(rows["mask"], np.asarray(ok, np.float32))
  # Not vacuous: at θ (no virtual step) the attack ends elsewhere.
  at_theta = jax.jit(functools.partial(rar_mod.adversarial_rows, ctx,
                                       **dict(kw, opt_lr=1e-9)))(
      params, {}, grads, mem, key, incoming)
  assert np.abs(np.asarray(at_theta["x"]) - np.asarray(want)).max() > 1e-3


# ---------------------------------------------------------------------------
# The hooks.


def test_prepare_batch_appends_clean_rows_of_past_experiences(stream):
  e0, e1 = stream.experiences
  ctx = make_ctx(stream)
  s = rar(mem_size=30, batch_size_mem=6)
  ss = train.init_state(ctx, s, 0).strategy
  batch = batch_of(e1)
  prep = jax.jit(lambda ss, k: s.prepare_batch(ctx, ss, batch, k))
  key = jax.random.PRNGKey(0)
  # Empty memory: the rows are there (fixed shape), all masked.
  out = prep(ss, key)
  assert out["x"].shape[0] == B + 6 and out["y"].shape == (B + 6,)
  np.testing.assert_array_equal(out["mask"], [1] * B + [0] * 6)
  np.testing.assert_array_equal(out["x"][:B], batch["x"])
  # Entries of the current experience only: still masked (past only).
  ss = ss._replace(memory=memory_of(e0, 20), experience=jnp.asarray(0))
  np.testing.assert_array_equal(prep(ss, key)["mask"][B:], 0)
  # During experience 1 those entries are in the past: 6 valid rows.
  out = prep(ss._replace(experience=jnp.asarray(1)), key)
  np.testing.assert_array_equal(out["mask"][B:], 1)
  assert set(np.asarray(out["y"][B:])) <= set(np.unique(e0.train_y))


def test_update_grads_adds_beta_times_the_adversarial_gradient(stream):
  e0, e1 = stream.experiences
  ctx = make_ctx(stream)
  kw = dict(mem_size=30, batch_size_mem=5, opt_lr=0.5, epsilon_fgsm=0.1,
            iter_fgsm=3, decay_factor_fgsm=0.5)
  s = rar(beta_coef=0.3, **kw)
  state = train.init_state(ctx, s, 0)
  ss, params = state.strategy, state.params
  g0 = jax.tree.map(jnp.ones_like, params)
  key = jax.random.PRNGKey(4)
  batch = s.prepare_batch(ctx, ss, batch_of(e1), key)
  upd = jax.jit(lambda s_, ss, b: s_.update_grads(ctx, ss, g0, params, b,
                                                  key), static_argnums=0)
  # Empty memory: unchanged.
  jax.tree.map(np.testing.assert_array_equal, upd(s, ss, batch), g0)
  ss = ss._replace(memory=memory_of(e0, 30), experience=jnp.asarray(1))
  rows = rar_mod.adversarial_rows(
      ctx, params, {}, g0, ss.memory, key, batch_of(e1), n=5, opt_lr=0.5,
      epsilon=0.1, steps=3, decay=0.5, clip=(0.0, 1.0), attack="features",
      where=ss.memory.experience < 1)
  assert float(rows["mask"].sum()) == 5
  g_adv = jax.grad(lambda p: cross_entropy(
      ctx.logits(p, {}, rows["x"], rows["task"]), rows["y"],
      rows["mask"]))(params)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(
      a, b + 0.3 * c, rtol=1e-4, atol=1e-6), upd(s, ss, batch), g0, g_adv)
  # Valid rows appended after the incoming ones (a partner's, or the
  # clean replay's) are no targets: here copies of the attacked entries
  # under another label, each at distance 0 from its entry.
  idx, _ = buffers.sample(ss.memory, key, 5, ss.memory.experience < 1)
  extra = {"x": ss.memory.x[idx], "y": 5 - ss.memory.y[idx],
           "task": ss.memory.task[idx], "mask": jnp.ones((5,))}
  full = {k: jnp.concatenate([batch_of(e1)[k], extra[k]]) for k in extra}
  # (The step's real gradient: at params - 0.5 * g0 every ReLU feature is
  # 0, so all distances tie and the attack has no gradient.)
  g1 = jax.grad(lambda p: cross_entropy(
      ctx.logits(p, {}, batch_of(e1)["x"], batch_of(e1)["task"]),
      batch_of(e1)["y"], batch_of(e1)["mask"]))(params)
  rows1 = rar_mod.adversarial_rows(
      ctx, params, {}, g1, ss.memory, key, batch_of(e1), n=5, opt_lr=0.5,
      epsilon=0.1, steps=3, decay=0.5, clip=(0.0, 1.0), attack="features",
      where=ss.memory.experience < 1)
  assert np.abs(np.asarray(rows1["x"] - extra["x"])).max() > 0.05
  g_adv1 = jax.grad(lambda p: cross_entropy(
      ctx.logits(p, {}, rows1["x"], rows1["task"]), rows1["y"],
      rows1["mask"]))(params)
  got = jax.jit(lambda ss, b: s.update_grads(ctx, ss, g1, params, b, key))(
      ss, full)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(
      a, b + 0.3 * c, rtol=1e-4, atol=1e-6), got, g1, g_adv1)
  # The same entries during their own experience: not in the past, no term.
  jax.tree.map(np.testing.assert_array_equal,
               upd(s, ss._replace(experience=jnp.asarray(0)), batch), g0)
  # beta 0: no adversarial term (plain ER from the past).
  jax.tree.map(np.testing.assert_array_equal,
               upd(rar(beta_coef=0.0, **kw), ss, batch), g0)
  # Memory labels all present in a one-class batch: no target, no term.
  one = batch_of(e0)
  one["y"] = jnp.full((B,), int(e0.train_y[0]))
  mem = memory_of(e0, 30)
  mem = mem._replace(y=jnp.full_like(mem.y, int(e0.train_y[0])))
  jax.tree.map(np.testing.assert_array_equal,
               upd(s, ss._replace(memory=mem), one), g0)


def _freeze_backbone(tree):
  """A ctx.freeze that keeps the feature extractor fixed (the attack's
  targets are nearest in feature space, which the head does not move)."""
  return {**tree, "backbone": jax.tree.map(jnp.zeros_like, tree["backbone"])}


def test_virtual_step_moves_only_the_weights_that_move(stream):
  """Beside a member that keeps weights fixed (ctx.freeze, here the
  backbone), the virtual step that picks the attack's targets leaves those
  weights alone, as the applied update will, whichever side of rar the
  member stands; what rar adds is masked too."""
  e0, e1 = stream.experiences
  ctx = make_ctx(stream)
  fctx = dataclasses.replace(ctx, freeze=_freeze_backbone)
  kw = dict(mem_size=30, batch_size_mem=5, opt_lr=0.5, epsilon_fgsm=0.1,
            iter_fgsm=3, decay_factor_fgsm=0.5)
  s = rar(beta_coef=0.3, **kw)
  state = train.init_state(ctx, s, 0)
  params = state.params
  ss = state.strategy._replace(memory=memory_of(e0, 30),
                               experience=jnp.asarray(1))
  loss = lambda p, b: cross_entropy(ctx.logits(p, {}, b["x"], b["task"]),
                                    b["y"], b["mask"])
  g0 = jax.grad(loss)(params, batch_of(e1))
  key = jax.random.PRNGKey(4)
  batch = s.prepare_batch(ctx, ss, batch_of(e1), key)
  out = s.update_grads(fctx, ss, g0, params, batch, key)
  attack = lambda g: rar_mod.adversarial_rows(
      ctx, params, {}, g, ss.memory, key, batch_of(e1), n=5, opt_lr=0.5,
      epsilon=0.1, steps=3, decay=0.5, clip=(0.0, 1.0), attack="features",
      where=ss.memory.experience < 1)
  rows = attack(_freeze_backbone(g0))
  # The whole gradient's virtual step attacks otherwise.
  assert np.abs(np.asarray(rows["x"] - attack(g0)["x"])).max() > 1e-3
  g_adv = _freeze_backbone(jax.grad(lambda p: cross_entropy(
      ctx.logits(p, {}, rows["x"], rows["task"]), rows["y"],
      rows["mask"]))(params))
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(
      a, b + 0.3 * c, rtol=1e-4, atol=1e-6), out, g0, g_adv)


def test_after_step_fills_the_reservoir_and_step_compiles(stream):
  e0 = stream.experiences[0]
  ctx = make_ctx(stream)
  s = rar(mem_size=30, batch_size_mem=5)
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  for i in range(2):
    state = step(state, batch_of(e0, start=B * i))
  assert int(buffers.size(state.strategy.memory)) == 2 * B
  assert np.all(np.asarray(state.strategy.memory.experience)[
      np.asarray(state.strategy.memory.valid)] == 0)


# ---------------------------------------------------------------------------
# End to end.


def test_rar_beats_naive_on_old_experiences(digits):
  def cfg(name, **kw):
    c = experiment.default_config()
    c.dataset.name = "digits"
    c.scenario.n_experiences = 5
    c.model.widths = (32,)
    c.train.epochs = 1
    c.train.batch_size = B
    c.train.eval_batch_size = 100
    c.report.progress = False
    c.strategy.name = name
    if kw:
      c.strategy[name] = kw
    return c

  r = jaxcl.run(cfg("rar", mem_size=60, epsilon_fgsm=0.1, iter_fgsm=3))
  n = jaxcl.run(cfg("naive"))
  acc = np.asarray(r.accuracy)
  assert acc.shape == (5, 5) and np.all(np.isfinite(acc))
  old_rar, old_naive = acc[-1, :-1].mean(), np.asarray(n.accuracy)[-1,
                                                                    :-1].mean()
  assert old_rar > old_naive + 0.3, (acc, n.accuracy)
  assert acc[-1, -1] > 0.5


def test_bad_arguments(stream):
  for kw, match in (
      ({"mem_size": 0}, "rar: mem_size must be a positive int"),
      ({"batch_size_mem": -1}, "rar: batch_size_mem must be an int >= 0"),
      ({"mem_size": 20, "batch_size_mem": 30},
       "rar: batch_size=30 is larger than the memory capacity mem_size=20"),
      ({"opt_lr": 0.0}, "rar: opt_lr must be a finite number > 0"),
      ({"beta_coef": 1.5}, r"rar: beta_coef must be a number in \[0, 1\]"),
      ({"beta_coef": -0.1}, r"rar: beta_coef must be a number in \[0, 1\]"),
      ({"epsilon_fgsm": -0.01}, "rar: epsilon_fgsm must be a finite number "
                                ">= 0"),
      ({"iter_fgsm": -1}, "rar: iter_fgsm must be an int >= 0"),
      ({"iter_fgsm": 2.5}, "rar: iter_fgsm must be an int >= 0"),
      ({"decay_factor_fgsm": -1.0}, "rar: decay_factor_fgsm must be"),
      ({"attack": "pgd"}, r"rar: unknown attack 'pgd'; valid: \['features', "
                          r"'label'\]"),
      ({"clip": (1.0, 0.0)}, "rar: clip must be None or"),
      ({"clip": (0.0,)}, "rar: clip must be None or"),
      ({"clip": (0.5, 0.5)}, "rar: clip must be None or"),
      ({"clip": (0.0, float("nan"))}, "rar: clip must be None or"),
  ):
    with pytest.raises(ValueError, match=match):
      rar(**kw)
  # A default replay batch (the training batch, 10) larger than the memory.
  with pytest.raises(ValueError, match="rar: batch_size=10 is larger than "
                     "the memory capacity mem_size=5"):
    train.init_state(make_ctx(stream), rar(mem_size=5), 0)
  with pytest.raises(ValueError, match="bad arguments for strategy 'rar'"):
    strategies.get("rar", eps=0.1)
  assert strategies.get("rar", mem_size=50).name == "rar"
