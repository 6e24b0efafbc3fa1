"""Mechanism tests of CoPE (continual prototype evolution), on scikit-learn
digits and hand-made arrays."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import buffers, experiment, models, scenarios, sweep, train
from jaxcl.state import StepInfo
from jaxcl.buffers import class_balanced_sample, random_class_balanced_add
from jaxcl.strategies.cope import cope, ppp_loss, update_prototypes

B = 10


def make_ctx(sc, outputs=None, widths=(64,), lr=0.05):
  info = train.stream_info(sc, B)
  model = models.build("mlp", outputs or sc.num_classes, widths=widths)
  return train.make_context(model, train.make_optimizer("sgd", lr), info)


def unit(a):
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def config(spec="cope", **kwargs):
  c = experiment.default_config()
  c.model.widths = (64,)
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.scenario.online = True
  c.train.epochs = 1
  c.train.batch_size = B
  c.train.eval_batch_size = 100
  c.report.progress = False
  c.strategy.name = spec
  c.strategy.cope = dict(mem_size=40, momentum=0.9, **kwargs)
  return c


# ---------------------------------------------------------------------------
# The PPP loss.


def reference_ppp(x, y, protos, proto_classes, t, xp=np,
                  const=lambda a: a):
  """The reference code's PPPloss (softmax_joint: attractor + repellor per
  class) over the batch's rows ``x`` (``(n, D)``): in NumPy float64, or
  with ``xp=jnp`` and ``const=jax.lax.stop_gradient`` as a JAX function
  whose gradient is the reference code's (the attractor's
  pseudo-prototypes are constants there; the repellor's are not)."""
  loss = 0.0
  for c in np.unique(y):
    xc, xk = x[y == c], x[y != c]
    n_c = len(xc)
    pc = protos[c][None]
    pk = protos[[k for k in proto_classes if k != c]]
    # Attractor: columns are xc's rows, rows the pseudo-prototypes and
    # p_c; a row's product with itself is 0.
    d = xp.exp(xp.concatenate([const(xc), pc]) @ xc.T / t)
    d = xp.where(np.eye(n_c + 1, n_c, dtype=bool), 0.0, d)
    lk = xp.exp(pk @ xc.T / t).sum(0)
    att = xp.log((d / (d + lk)).sum(0) / n_c).sum()
    rep = 0.0
    if len(xk):
      d = xp.exp(xp.concatenate([xc, pc]) @ xk.T / t)
      p = d / (d + xp.exp(pk @ xk.T / t).sum(0)[None])
      rep = xp.log(1.0 - (p[:-1] + p[-1][None]) / 2.0).sum()
    loss = loss - att - rep
  return loss / len(x)


def test_ppp_loss_equals_the_reference_code_by_hand():
  rng = np.random.default_rng(0)
  d, c, t = 5, 5, 0.3
  # Classes 0 (3 rows), 1 (1 row: no pseudo-prototype), 3 (2 rows); a
  # padding row; class 4 has a prototype, class 2 none (never seen).
  y = np.array([0, 3, 0, 1, 3, 0, 2])
  valid = np.array([True] * 6 + [False])
  x = unit(rng.normal(size=(7, d)))
  protos = unit(rng.normal(size=(c, d)))
  active = np.array([True, True, False, True, True])
  loss = jax.jit(ppp_loss)
  got = loss(jnp.asarray(x, jnp.float32), jnp.asarray(y),
                 jnp.asarray(valid), jnp.asarray(protos, jnp.float32),
                 jnp.asarray(active), t)
  want = reference_ppp(x[valid], y[valid], protos, [0, 1, 3, 4], t)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # A single class in the batch: the attractor alone.
  one = y == 0
  got = loss(jnp.asarray(x[one], jnp.float32), jnp.asarray(y[one]),
                 jnp.ones(3, bool), jnp.asarray(protos, jnp.float32),
                 jnp.asarray(active), t)
  np.testing.assert_allclose(float(got), reference_ppp(
      x[one], y[one], protos, [0, 1, 3, 4], t), rtol=1e-5)
  # One class known: no other prototype to contrast with, no loss (and no
  # NaN in its gradient).
  only = jnp.zeros(c, bool).at[0].set(True)
  f = jax.jit(lambda e: ppp_loss(e, jnp.zeros(3, int), jnp.ones(3, bool),
                                 jnp.asarray(protos, jnp.float32), only, t))
  e = jnp.asarray(x[:3], jnp.float32)
  assert float(f(e)) == 0.0
  assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(f))(e))))


def test_ppp_loss_ignores_padding_rows_of_present_classes():
  """Padding rows (valid False) of classes that do have rows in the batch
  are neither pseudo-prototypes nor repelled rows: the loss is the
  reference's over the valid rows alone."""
  rng = np.random.default_rng(5)
  d, c, t = 5, 5, 0.3
  y = np.array([0, 3, 0, 1, 3, 0, 0, 3, 1])
  valid = np.array([True] * 6 + [False] * 3)
  x = unit(rng.normal(size=(9, d)))
  protos = unit(rng.normal(size=(c, d)))
  active = np.array([True, True, False, True, True])
  got = jax.jit(ppp_loss)(jnp.asarray(x, jnp.float32), jnp.asarray(y),
                          jnp.asarray(valid), jnp.asarray(protos,
                                                          jnp.float32),
                          jnp.asarray(active), t)
  want = reference_ppp(x[valid], y[valid], protos, [0, 1, 3, 4], t)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Fewer than two active classes: 0, even for rows of classes that are
  # not active (their terms alone are not).
  only = jnp.zeros(c, bool).at[3].set(True)
  assert float(jax.jit(ppp_loss)(jnp.asarray(x, jnp.float32), jnp.asarray(y),
                                 jnp.asarray(valid), jnp.asarray(
                                     protos, jnp.float32), only, t)) == 0.0


def test_task_loss_activates_the_seen_and_the_valid_rows_classes(stream):
  """The strategy's loss: the PPP loss of the normalised outputs over the
  classes seen before and those of the batch's valid rows (a padding
  row's class gets no prototype in the denominator)."""
  ctx = make_ctx(stream, outputs=6)
  s = cope(mem_size=20, temperature=0.2)
  ss = train.init_state(ctx, s, 0).strategy
  ss = ss._replace(seen=jnp.zeros(10, bool).at[5].set(True))
  y = np.array([0, 1, 0, 1, 1, 0, 0, 1, 7, 9])
  valid = np.array([True] * 8 + [False] * 2)
  batch = {"x": jnp.zeros((B, 64)), "y": jnp.asarray(y),
           "task": jnp.zeros(B, jnp.int32),
           "mask": jnp.asarray(valid, jnp.float32)}
  logits = np.random.default_rng(6).normal(size=(B, 6)) * 2.0
  got = jax.jit(lambda ss, z, b: s.task_loss(ctx, ss, z, b))(
      ss, jnp.asarray(logits, jnp.float32), batch)
  want = reference_ppp(unit(logits)[valid], y[valid],
                       np.asarray(ss.prototypes, np.float64), [0, 1, 5], 0.2)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_ppp_gradient_holds_only_the_attractors_pseudo_prototypes_constant():
  """The gradient of the reference code: in the attractor the
  pseudo-prototypes z_j (and all prototypes) are constants; in the
  repellor the pseudo-prototypes carry gradient (``reference_ppp`` in
  JAX, the attractor's z_j stopped)."""
  rng = np.random.default_rng(3)
  d, c, t = 5, 5, 0.3
  y = np.array([0, 3, 0, 1, 3, 0])
  x = unit(rng.normal(size=(6, d)))
  protos = unit(rng.normal(size=(c, d)))
  active = np.array([True, True, False, True, True])

  def ref(e):
    return reference_ppp(e, y, protos, [0, 1, 3, 4], t, xp=jnp,
                         const=jax.lax.stop_gradient)

  e = jnp.asarray(x, jnp.float32)
  f = lambda e: ppp_loss(e, jnp.asarray(y), jnp.ones(6, bool),
                         jnp.asarray(protos, jnp.float32),
                         jnp.asarray(active), t)
  # Compiled, not op by op (test time).
  np.testing.assert_allclose(float(jax.jit(f)(e)), float(jax.jit(ref)(e)),
                             rtol=1e-5)
  g = np.asarray(jax.jit(jax.grad(f))(e))
  want = np.asarray(jax.jit(jax.grad(ref))(e))
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Prototypes.


def test_prototype_update_is_the_momentum_step_and_stays_unit(stream):
  rng = np.random.default_rng(1)
  ctx = make_ctx(stream, outputs=6)
  s = cope(mem_size=20, momentum=0.7)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy
  p0 = np.asarray(ss.prototypes)
  np.testing.assert_allclose(np.linalg.norm(p0, axis=1), 1.0, rtol=1e-6)
  assert p0.shape == (10, 6) and np.all(p0 >= 0)  # U[0, 1]^D, normalised
  exp = stream.experiences[0]
  batch = {"x": jnp.asarray(exp.train_x[:B]), "y": jnp.asarray(
      [1, 3, 3, 1, 3, 3, 1, 3, 8, 8]), "task": jnp.zeros(B, jnp.int32),
           "mask": jnp.asarray([1.] * 8 + [0.] * 2)}   # class 8: padding
  logits = rng.normal(size=(B, 6)) * 3.0   # the step's raw outputs
  info = StepInfo(None, None, None, None, batch, jnp.zeros(()),
                  jax.random.PRNGKey(0), jnp.asarray(logits, jnp.float32))
  ss = jax.jit(lambda a, b: s.after_step(ctx, a, b))(ss, info)
  p = np.asarray(ss.prototypes)
  z, y = unit(logits), np.asarray(batch["y"])
  for c in (1, 3):
    mean = z[:8][y[:8] == c].mean(0)           # not re-normalised
    want = unit(0.7 * p0[c] + 0.3 * mean)
    np.testing.assert_allclose(p[c], want, rtol=1e-5, atol=1e-6)
  others = [c for c in range(10) if c not in (1, 3)]
  np.testing.assert_array_equal(p[others], p0[others])  # 8 only padded
  np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.flatnonzero(ss.seen), [1, 3])
  # The momentum is the state's (a sweep varies it there), not the
  # argument the strategy was built with.
  ss2 = jax.jit(lambda a, b: s.after_step(ctx, a, b))(
      state.strategy._replace(momentum=jnp.float32(0.25)), info)
  for c in (1, 3):
    want = unit(0.25 * p0[c] + 0.75 * z[:8][y[:8] == c].mean(0))
    np.testing.assert_allclose(np.asarray(ss2.prototypes)[c], want,
                               rtol=1e-5, atol=1e-6)
  # The function itself, at the edges of the momentum.
  e, yy, v = jnp.asarray(z, jnp.float32), batch["y"], batch["mask"] > 0
  np.testing.assert_allclose(update_prototypes(jnp.asarray(p0), e, yy, v, 1.0),
                             p0, rtol=1e-6)
  np.testing.assert_allclose(
      update_prototypes(jnp.asarray(p0), e, yy, v, 0.0)[1],
      unit(z[:8][y[:8] == 1].mean(0)), rtol=1e-5)


# ---------------------------------------------------------------------------
# Prediction.


@pytest.fixture(scope="module")
def trained(stream):
  """``(ctx, strategy, state)`` after one pass over experience 1 alone
  (classes 2 and 3): no other class is seen."""
  ctx = make_ctx(stream)
  s = cope(mem_size=40, momentum=0.9)
  exp = stream.experiences[1]
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), exp)
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  for i in range(exp.num_train // B):
    sl = slice(B * i, B * (i + 1))
    state = step(state, {"x": jnp.asarray(exp.train_x[sl]),
                         "y": jnp.asarray(exp.train_y[sl]),
                         "task": jnp.zeros(B, jnp.int32),
                         "mask": jnp.ones(B, jnp.float32)})
  return ctx, s, state


def test_predict_is_the_nearest_prototype_by_cosine(stream, trained):
  ctx, s, state = trained
  x = jnp.asarray(np.concatenate([e.test_x[:30] for e in
                                  stream.experiences]))
  t = jnp.zeros(x.shape[0], jnp.int32)
  z = unit(np.asarray(ctx.logits(state.params, {}, x, t), np.float64))
  # Prototypes near ten of the embeddings (so the answers spread).
  rng = np.random.default_rng(2)
  protos = unit(z[::6][:10] + 0.05 * rng.normal(size=(10, 10)))
  ss = state.strategy._replace(prototypes=jnp.asarray(protos, jnp.float32),
                               seen=jnp.ones(10, bool))
  scores = np.asarray(s.predict(ctx, ss, state.params, {}, x, t))
  np.testing.assert_allclose(scores, z @ protos.T, atol=1e-5)  # cosines
  # The largest cosine is the smallest Euclidean distance on the sphere.
  dist = ((z[:, None, :] - protos[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(scores.argmax(1), dist.argmin(1))
  assert len(set(scores.argmax(1))) > 3, scores.argmax(1)


def test_unseen_classes_are_never_predicted(trained, digits):
  ctx, s, state = trained
  ss = state.strategy
  np.testing.assert_array_equal(np.flatnonzero(ss.seen), [2, 3])
  full = scenarios.split(digits, 5)
  x = jnp.asarray(np.concatenate([e.test_x for e in full.experiences]))
  y = np.concatenate([e.test_y for e in full.experiences])
  t = jnp.zeros(x.shape[0], jnp.int32)
  # Make every unseen class's prototype its own test examples' mean
  # embedding: the nearest prototype for most of them, yet never chosen.
  z = unit(np.asarray(ctx.logits(state.params, {}, x, t), np.float64))
  protos = np.asarray(ss.prototypes).copy()
  for c in set(range(10)) - {2, 3}:
    protos[c] = unit(z[y == c].mean(0))
  cos = z @ protos.T
  assert np.mean(~np.isin(cos.argmax(1), [2, 3])) > 0.5
  ss = ss._replace(prototypes=jnp.asarray(protos, jnp.float32))
  pred = np.asarray(s.predict(ctx, ss, state.params, {}, x, t)).argmax(1)
  assert set(pred) == {2, 3}
  # And it learned them: examples of 2 and 3 are told apart.
  mine = np.isin(y, [2, 3])
  assert np.mean(pred[mine] == y[mine]) > 0.8


# ---------------------------------------------------------------------------
# Memory and replay.


def offer(mem, prio, key, ids, ys, quota):
  """Offers rows whose input is their id (shape (1,))."""
  n = len(ids)
  return random_class_balanced_add(
      mem, prio, key, jnp.asarray(ids, jnp.float32)[:, None],
      jnp.asarray(ys), jnp.zeros(n, jnp.int32), jnp.zeros((), jnp.int32),
      jnp.ones(n, bool), jnp.asarray(quota), num_classes=10)


def test_memory_stays_class_balanced_with_random_replacement():
  k = 30
  mem = buffers.init(k, (1,))
  prio = jnp.zeros((k,), jnp.float32)
  add = jax.jit(offer)
  offered = {}          # class -> ids offered
  prio_of = {}          # id -> its priority (the function's own draw)
  seen = set()
  ids = iter(range(10_000))
  # Classes arrive as in a split stream: (0, 1), then (2, 3), then (4..8).
  plan = [(0, 1)] * 8 + [(2, 3)] * 8 + [(4, 5, 6, 7, 8)] * 6
  for step, classes in enumerate(plan):
    ys = [classes[i % len(classes)] for i in range(B)]
    batch_ids = [next(ids) for _ in ys]
    seen |= set(ys)
    quota = k // len(seen)
    mem, prio = add(mem, prio, jax.random.PRNGKey(step), batch_ids, ys,
                    quota)
    u = jax.random.uniform(jax.random.PRNGKey(step), (B,))
    for i, y, p in zip(batch_ids, ys, np.asarray(u)):
      offered.setdefault(y, []).append(i)
      prio_of[i] = p
    cnt = np.asarray(buffers.counts(mem, 10))
    v = np.asarray(mem.valid)
    kept = np.asarray(mem.x)[v, 0].astype(int)
    for c in seen:
      assert cnt[c] == min(len(offered[c]), quota), (step, cnt)
      # Exactly the class's `quota` highest priorities so far (the new
      # class's shrinking quota included).
      top = sorted(offered[c], key=prio_of.get)[-quota:]
      assert set(kept[np.asarray(mem.y)[v] == c]) == set(top), (step, c)
    # Every entry is an example offered with its label.
    for i, y in zip(np.asarray(mem.x)[v, 0], np.asarray(mem.y)[v]):
      assert int(i) in offered[int(y)]
  assert int(mem.seen) == len(plan) * B
  assert k // 9 * 9 == int(buffers.size(mem))   # 30 // 9 = 3 each
  # Random replacement: over many draws each of a class's rows is kept
  # with the same probability, the first offered and the last alike.
  many = jax.jit(jax.vmap(lambda key: _keep_of_40(key)))
  keep = np.asarray(many(jax.random.split(jax.random.PRNGKey(7), 400)))
  freq = keep.mean(0)                        # per offered row: 8/40 = 0.2
  assert abs(freq[:10].mean() - 0.2) < 0.05, freq
  assert abs(freq[-10:].mean() - 0.2) < 0.05, freq
  np.testing.assert_array_equal(keep.sum(1), 8)


def _keep_of_40(key):
  """Which of 40 rows of one class, offered 10 at a time to a quota of 8,
  end up in memory (bool (40,))."""
  mem, prio = buffers.init(16, (1,)), jnp.zeros((16,), jnp.float32)
  for j in range(4):
    ids = jnp.arange(10 * j, 10 * j + 10, dtype=jnp.float32)[:, None]
    mem, prio = random_class_balanced_add(
        mem, prio, jax.random.fold_in(key, j), ids, jnp.zeros(10, jnp.int32),
        jnp.zeros(10, jnp.int32), jnp.zeros((), jnp.int32),
        jnp.ones(10, bool), jnp.asarray(8), num_classes=1)
  return jnp.zeros(40, bool).at[mem.x[:, 0].astype(jnp.int32)].max(
      mem.valid)


def test_replay_draws_classes_evenly_from_an_uneven_memory():
  mem = buffers.init(100, (1,))
  mem = mem._replace(y=jnp.asarray([0] * 90 + [1] * 10),
                     valid=jnp.ones(100, bool))
  draw = jax.jit(jax.vmap(lambda k: class_balanced_sample(mem, k, 4, 2)))
  idx, ok = draw(jax.random.split(jax.random.PRNGKey(0), 500))
  assert np.all(ok)
  first = np.asarray(mem.y)[np.asarray(idx)[:, 0]]
  assert abs(first.mean() - 0.5) < 0.07   # uniform over memory: 0.1
  for row in np.asarray(idx):            # without replacement
    assert len(set(row)) == 4


def test_strategy_replays_class_balanced_rows(stream):
  """cope's own replay (prepare_batch) draws a class uniformly, then an
  entry: from a 90 / 10 memory the first replayed row is of either class
  about half the time (a uniform draw over entries: 0.1)."""
  ctx = make_ctx(stream)
  s = cope(mem_size=100, batch_size=4)
  ss = train.init_state(ctx, s, 0).strategy
  mem = ss.memory._replace(y=jnp.asarray([0] * 90 + [1] * 10),
                           valid=jnp.ones(100, bool))
  ss = ss._replace(memory=mem)
  batch = batch_of_stream(stream.experiences[0])
  ys = jax.jit(jax.vmap(lambda k: s.prepare_batch(ctx, ss, batch, k)["y"]))(
      jax.random.split(jax.random.PRNGKey(0), 500))
  ys = np.asarray(ys)
  assert ys.shape == (500, B + 4)
  assert abs(ys[:, B].mean() - 0.5) < 0.07, ys[:, B].mean()


def batch_of_stream(exp, start=0):
  sl = slice(start, start + B)
  return {"x": jnp.asarray(exp.train_x[sl]), "y": jnp.asarray(exp.train_y[sl]),
          "task": jnp.zeros(B, jnp.int32), "mask": jnp.ones(B, jnp.float32)}


def test_after_step_stores_only_incoming_rows_each_with_its_own_draw(stream):
  """The memory takes the step's incoming rows, not the replayed ones
  appended after them, and every example gets a fresh uniform priority
  (the same batch position at two steps draws two numbers)."""
  ctx = make_ctx(stream)
  s = cope(mem_size=40)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy
  exp = stream.experiences[0]
  prep = jax.jit(lambda ss, b, k: s.prepare_batch(ctx, ss, b, k))
  after = jax.jit(lambda ss, i: s.after_step(ctx, ss, i))
  for step in range(2):
    b = prep(ss, batch_of_stream(exp, start=B * step),
             jax.random.PRNGKey(step))
    assert b["y"].shape == (2 * B,)
    assert np.asarray(b["mask"][B:]).sum() == (0 if step == 0 else B)
    info = StepInfo(None, None, None, None, b, jnp.zeros(()),
                    jax.random.PRNGKey(10 + step),
                    jax.random.normal(jax.random.PRNGKey(20 + step),
                                      (2 * B, 10)))
    ss = after(ss, info)
  mem = ss.memory
  assert int(mem.seen) == 2 * B and int(buffers.size(mem)) == 2 * B
  v = np.asarray(mem.valid)
  stored = sorted(map(tuple, np.asarray(mem.x)[v].reshape(2 * B, -1)
                       .tolist()))
  offered = sorted(map(tuple, np.asarray(exp.train_x[:2 * B], np.float32)
                       .reshape(2 * B, -1).tolist()))
  assert stored == offered
  prio = np.asarray(ss.priority)[v]
  assert len(set(prio.tolist())) == 2 * B, prio


# ---------------------------------------------------------------------------
# Whole runs.


def test_online_run_compiles_once_and_keeps_old_classes(digits):
  full = scenarios.split(digits, 5)
  sc = dataclasses.replace(full, experiences=full.experiences[:3])
  result = experiment.run(config(), scenario=scenarios.online(sc))
  assert result.learner.chunk_fn._cache_size() == 1
  acc = np.asarray(result.accuracy)
  assert np.all(np.isfinite(acc))
  assert acc[-1, :3].min() > 0.6, acc     # no experience forgotten
  ss = result.state.strategy
  np.testing.assert_array_equal(np.flatnonzero(ss.seen), range(6))
  np.testing.assert_array_equal(buffers.counts(ss.memory, 10),
                                [40 // 6] * 6 + [0] * 4)
  np.testing.assert_allclose(np.linalg.norm(ss.prototypes, axis=1), 1.0,
                             rtol=1e-5)


def test_model_outputs_set_the_embedding_width_and_others_are_refused(
    stream):
  """model.outputs=32 gives CoPE a 32-d embedding (the prototypes' width)
  on a 10-class stream; a strategy that scores the outputs as classes is
  refused that model, and a bad width is named."""
  c = config()
  c.model.outputs = 32
  s = experiment.setup(c, scenario=scenarios.online(stream))
  state = train.init_state(s.learner.ctx, s.learner.strategy, 0)
  assert state.strategy.prototypes.shape == (10, 32)
  assert state.params["head"]["kernel"].shape == (64, 32)
  r = experiment.run(c, scenario=scenarios.online(stream))
  assert np.all(np.isfinite(np.asarray(r.accuracy)))
  assert r.accuracy[-1, 0] > 0.5
  c.model.outputs = 10       # the stream's classes: any strategy
  c.strategy.name = "naive"
  del c.strategy["cope"]
  experiment.setup(c, scenario=stream)
  c.model.outputs = 32
  with pytest.raises(experiment.ConfigError,
                     match="model.outputs=32 differs from the stream's 10 "
                           "classes.*not 'naive'"):
    experiment.setup(c, scenario=stream)
  c.model.outputs = -1
  with pytest.raises(experiment.ConfigError, match="model.outputs=-1"):
    experiment.setup(c, scenario=stream)


def test_sweep_over_seeds_and_temperature_is_one_program(stream):
  c = config()
  r = sweep.sweep(c, seeds=[0, 1], scenario=scenarios.online(stream),
                  values={"strategy.cope.temperature": [0.1, 0.5]})
  assert r.result.learner.chunk_fn._cache_size() == 1
  assert r.accuracy.shape == (4, 2, 5) and np.all(np.isfinite(r.accuracy))
  np.testing.assert_allclose(r.result.state.strategy.temperature,
                             [0.1, 0.1, 0.5, 0.5])
  assert not np.allclose(r.accuracy[0], r.accuracy[2])  # T is used
  assert not np.allclose(r.accuracy[0], r.accuracy[1])  # so is the seed


# ---------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "cope: temperature must be a finite number > 0, "
     "got 0.0"),
    (dict(temperature=-0.1), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=True), "temperature must be a finite number"),
    (dict(momentum=-0.1), r"cope: momentum must be a number in \[0, 1\], "
     "got -0.1"),
    (dict(momentum=1.5), r"momentum must be a number in \[0, 1\], got 1.5"),
    (dict(momentum=float("nan")), r"momentum must be a number in \[0, 1\]"),
    (dict(momentum="0.9"), r"momentum must be a number in \[0, 1\]"),
    (dict(mem_size=0), "cope: mem_size must be a positive int, got 0"),
    (dict(mem_size=20.5), "mem_size must be a positive int, got 20.5"),
    (dict(batch_size=-1), "cope: batch_size must be an int >= 0"),
    (dict(mem_size=20, batch_size=30), "cope: batch_size=30 is larger than "
     "the memory capacity mem_size=20"),
])
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    cope(**kwargs)


def test_bad_streams_and_models(stream):
  ctx = make_ctx(stream)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="cope: mem_size=8 leaves no memory "
                     "slot for some of the 10 classes; use mem_size >= 10"):
    cope(mem_size=8, batch_size=4).init(ctx, key, None)
  big = dataclasses.replace(ctx, info=dataclasses.replace(ctx.info,
                                                          batch_size=16))
  with pytest.raises(ValueError, match="cope: batch_size=16 is larger than "
                     "the memory capacity mem_size=12"):
    cope(mem_size=12).init(big, key, None)   # replays the training batch
  task = dataclasses.replace(ctx, mask_task_logits=True)
  with pytest.raises(ValueError, match="task-incremental stream"):
    cope(mem_size=20).init(task, key, None)
  with pytest.raises(ValueError, match="the model has 1 output"):
    cope(mem_size=20).init(make_ctx(stream, outputs=1), key, None)
  cope(mem_size=10).init(ctx, key, None)  # the smallest that fits
