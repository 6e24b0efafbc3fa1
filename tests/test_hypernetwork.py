"""The hypernetwork model and strategy (von Oswald et al. 2020): generated
weights against a hand-built MLP, the output regulariser by hand, old
generated weights held within tolerance, frozen embeddings, entropy-based
task inference, and the compiled loop without recompilation."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxcl import experiment, models, scenarios
from jaxcl.models.hypernet import HyperNetwork
from jaxcl.strategies.hypernetwork import (generated_weights, hypernetwork)
from jaxcl.train import (device_experience, init_state, make_context,
                         make_optimizer, stream_info)

D, C = 6, 4
HN = dict(input_dim=D, target_widths=(8,), num_embeddings=3, embedding_dim=4,
          chunk_size=20, chunk_embedding_dim=3, hidden=(10,))


def _toy(kind="task", n_exp=3, n=64, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(C, D)) * 2
  train, test = [], []
  for i in range(n_exp):
    cs = [2 * i % C, (2 * i + 1) % C]
    y = rng.choice(cs, n).astype(np.int32)
    x = (centres[y] + rng.normal(size=(n, D))).astype(np.float32)
    train.append((x, y))
    test.append((x[:16], y[:16]))
  return scenarios.from_arrays(train, test, kind=kind, num_classes=C)


def jitted(m):
  """``m.init`` and ``m.apply`` jitted: compile time dominates these
  tests, and one program per shape compiles faster than one per op."""
  return jax.jit(m.init), jax.jit(m.apply, static_argnames="method")


def _config(beta, kind="task", epochs=2, lr=1e-2):
  c = experiment.default_config()
  c.model.name = "hypernet"
  c.model.hypernet = dict(HN)
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = lr
  c.train.epochs = epochs
  c.train.batch_size = 16
  c.train.eval_batch_size = 16
  c.report.progress = False
  c.strategy.name = "hypernetwork"
  c.strategy.hypernetwork = dict(beta=beta)
  return c


def test_generated_weights_drive_a_hand_built_mlp():
  m = models.build("hypernet", C, **HN)
  init, apply = jitted(m)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, D))
  v = init(jax.random.PRNGKey(0), x, jnp.zeros((5,), jnp.int32))
  p = m.num_target_params
  assert p == D * 8 + 8 + 8 * C + C and m.num_chunks == math.ceil(p / 20)
  flat = np.asarray(apply(v, jnp.array([2]), method=HyperNetwork.generate))
  assert flat.shape == (1, p)
  f = flat[0].astype(np.float64)
  w1 = f[:D * 8].reshape(D, 8) / math.sqrt(D)
  b1 = 0.1 * f[D * 8:D * 8 + 8]
  o = D * 8 + 8
  w2 = f[o:o + 8 * C].reshape(8, C) / math.sqrt(8)
  b2 = 0.1 * f[o + 8 * C:]
  want = np.maximum(np.asarray(x, np.float64) @ w1 + b1, 0) @ w2 + b2
  got = apply(v, x, jnp.full((5,), 2, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # Mixed-task batches route each example to its task's weights.
  mixed = apply(v, x, jnp.array([0, 1, 2, 1, 0]))
  for i, t in enumerate([0, 1, 2, 1, 0]):
    alone = apply(v, x, jnp.full((5,), t, jnp.int32))
    np.testing.assert_allclose(np.asarray(mixed[i]), np.asarray(alone[i]),
                               rtol=1e-5, atol=1e-6)
  # The strategy's generated_weights are the weights the target runs with
  # (raw values times the fixed scales): what the regulariser holds.
  ctx = make_context(m, make_optimizer("sgd", 0.1), stream_info(_toy("task"),
                                                                16))
  eff = np.asarray(jax.jit(lambda p, t: generated_weights(ctx, p, t))(
      v["params"], jnp.array([2])))[0]
  np.testing.assert_allclose(
      eff, np.concatenate([w1.ravel(), b1, w2.ravel(), b2]), rtol=1e-5,
      atol=1e-7)
  # Different embeddings give different weights; generated values start
  # near unit variance (the fixed scales then give a LeCun-like target).
  flats = np.asarray(apply(v, jnp.arange(3), method=HyperNetwork.generate))
  assert not np.allclose(flats[0], flats[1])
  assert 0.3 < flats.std() < 3.0


def test_regulariser_by_hand_and_zero_after_consolidation():
  sc = _toy("task")
  model = models.build("hypernet", C, **HN)
  ctx = make_context(model, make_optimizer("adam", 1e-2),
                     stream_info(sc, 16))
  beta = 0.3
  s = hypernetwork(beta=beta)
  state = init_state(ctx, s, 0)
  batch = {"x": jnp.zeros((2, D)), "y": jnp.zeros((2,), jnp.int32),
           "task": jnp.zeros((2,), jnp.int32), "mask": jnp.ones((2,))}
  assert float(s.loss(ctx, state.strategy, state.params, batch, None)) == 0.
  state = s.after_experience(ctx, state, sc.experiences[0])
  state = s.after_experience(ctx, state, sc.experiences[1])
  assert np.asarray(state.strategy.filled).tolist() == [True, True, False]
  assert float(s.loss(ctx, state.strategy, state.params, batch, None)) < 1e-9
  moved = jax.tree.map(lambda a: a + 0.05, state.params)
  gen = np.asarray(generated_weights(ctx, moved, jnp.arange(3)), np.float64)
  tgt = np.asarray(state.strategy.targets, np.float64)
  want = beta * ((gen[0] - tgt[0]) ** 2).sum() / 2 + beta * (
      (gen[1] - tgt[1]) ** 2).sum() / 2
  got = float(jax.jit(lambda ss, p: s.loss(ctx, ss, p, batch, None))(
      state.strategy, moved))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # The sampled regulariser: exact with one learned slot, unbiased with
  # two (k draws average to the full mean).
  one = state.strategy._replace(filled=jnp.array([True, False, False]))
  sampled = hypernetwork(beta=beta, reg_samples=3)
  got1 = float(sampled.loss(ctx, one, moved, batch, None))
  np.testing.assert_allclose(got1, beta * ((gen[0] - tgt[0]) ** 2).sum(),
                             rtol=1e-4)
  many = hypernetwork(beta=beta, reg_samples=4000)
  est = float(jax.jit(lambda ss, p: many.loss(ctx, ss, p, batch, None))(
      state.strategy, moved))
  np.testing.assert_allclose(est, want, rtol=0.05)
  s0 = sampled.after_step(ctx, state.strategy, None)
  assert int(s0.count) == int(state.strategy.count) + 1
  # With the look-ahead the same regulariser moves to lookahead_loss (the
  # step evaluates it at Θ + ΔΘ; tests/test_train.py checks that part) and
  # the plain loss adds nothing.
  ahead = hypernetwork(beta=beta, lookahead=True)
  np.testing.assert_allclose(
      float(ahead.lookahead_loss(ctx, state.strategy, moved, batch)), want,
      rtol=1e-4)
  assert float(ahead.loss(ctx, state.strategy, moved, batch, None)) == 0.0
  assert s.lookahead_loss is None


def test_targets_are_every_slot_at_the_latest_consolidation():
  """Θ_h* is the hypernetwork as the last experience ended: every slot's
  target is refreshed then, not kept from its own experience's end; and
  the sampled regulariser draws fresh slots each step (the step count
  enters its key)."""
  sc = _toy("task")
  model = models.build("hypernet", C, **HN)
  ctx = make_context(model, make_optimizer("adam", 1e-2),
                     stream_info(sc, 16))
  s = hypernetwork(beta=1.0)
  state = init_state(ctx, s, 0)
  state = s.after_experience(ctx, state, sc.experiences[0])
  moved = jax.tree.map(lambda a: a + 0.05, state.params)
  state = s.after_experience(ctx, state.replace(params=moved),
                             sc.experiences[1])
  want = np.asarray(generated_weights(ctx, moved, jnp.arange(3)))
  np.testing.assert_allclose(state.strategy.targets, want, rtol=1e-6)
  # Sampled: one draw of the two learned slots per step, whose squared
  # distances differ; over 12 steps both slots come up.
  sampled = hypernetwork(beta=1.0, reg_samples=1)
  away = jax.tree.map(lambda a: a - 0.1, moved)
  gen = np.asarray(generated_weights(ctx, away, jnp.arange(2)), np.float64)
  per_slot = ((gen - want[:2]) ** 2).sum(-1)
  assert abs(per_slot[0] - per_slot[1]) > 1e-3 * per_slot.max()
  loss = jax.jit(lambda ss: sampled.loss(ctx, ss, away, None, None))
  ss, got = state.strategy, []
  for _ in range(12):
    got.append(float(loss(ss)))
    ss = sampled.after_step(ctx, ss, None)
  for g in got:
    assert min(abs(g - per_slot[0]), abs(g - per_slot[1])) <= (
        1e-4 * per_slot.max()), (got, per_slot)
  assert {int(np.argmin(abs(per_slot - g))) for g in got} == {0, 1}, got
  # Learned slots' embeddings get no gradient (the task loss of a mixed
  # batch, or momentum, would otherwise move them); the others keep theirs.
  ones = jax.tree.map(jnp.ones_like, moved)
  g = s.update_grads(ctx, state.strategy, ones, moved, None, None)
  np.testing.assert_array_equal(g["task_embeddings"][:2], 0.0)
  np.testing.assert_array_equal(g["task_embeddings"][2], 1.0)
  for k in ones:
    if k != "task_embeddings":
      for leaf in jax.tree.leaves(g[k]):
        np.testing.assert_array_equal(leaf, 1.0)


def _train(config, sc):
  """The experiment loop by hand, recording the weights generated for
  every embedding after each experience."""
  st = experiment.setup(config, sc)
  learner, ctx, strategy = st.learner, st.learner.ctx, st.learner.strategy
  state = init_state(ctx, strategy, config.seed)
  gens, embs = [], []
  for i, exp in enumerate(st.scenario.experiences):
    state = strategy.before_experience(ctx, state, exp)
    state = state.replace(opt_state=ctx.tx.init(state.params))
    data = jax.device_put(device_experience(exp, ctx.info.train_size))
    for epoch in range(learner.epochs):
      for start in range(0, learner.epoch_steps, learner.chunk_steps):
        state, _, _ = learner.chunk_fn(state, data, exp.num_train, i, epoch,
                                       start)
    state = strategy.after_experience(ctx, state, exp)
    gens.append(np.asarray(generated_weights(
        ctx, state.params, jnp.arange(HN["num_embeddings"]))))
    embs.append(np.asarray(state.params["task_embeddings"]))
  return gens, embs, learner


def test_old_generated_weights_stay_within_tolerance():
  sc = _toy("task", n_exp=3)
  gens, embs, learner = _train(_config(beta=10.0), sc)
  free, free_embs, _ = _train(_config(beta=0.0), sc)
  assert learner.chunk_fn._cache_size() == 1

  def drift(g, t, k):  # relative change of task t's weights from k to end
    return np.linalg.norm(g[-1][t] - g[k][t]) / np.linalg.norm(g[k][t])

  # Without the regulariser the old tasks' weights move by tens of per
  # cent; with it they stay within a few per cent (the floor is set by
  # Adam's step size, lr 1e-2 here: Adam's steps do not shrink with the
  # penalty's gradient). β = 10: the regulariser acts on the target's
  # weights, which are the generated values times 1/sqrt(fan_in).
  for t in (0, 1):
    held, loose = drift(gens, t, t), drift(free, t, t)
    assert held < 0.05, (t, held)
    assert loose > 5 * held, (t, held, loose)
  # The look-ahead regulariser holds them too.
  c = _config(beta=10.0)
  c.strategy.hypernetwork.lookahead = True
  ahead, _, _ = _train(c, sc)
  for t in (0, 1):
    assert drift(ahead, t, t) < 0.05, (t, drift(ahead, t, t))
  # Learned embeddings are frozen exactly; the current one was trained.
  np.testing.assert_array_equal(embs[-1][0], embs[0][0])
  np.testing.assert_array_equal(embs[-1][1], embs[1][1])
  assert not np.allclose(embs[0][1], embs[1][1])


def test_task_inference_by_lowest_entropy():
  sc = _toy("class", n_exp=2)
  c = _config(beta=0.5, kind="class")
  st = experiment.setup(c, sc)
  ctx, s = st.learner.ctx, st.learner.strategy
  state = init_state(ctx, s, 0)
  state = s.after_experience(ctx, state, sc.experiences[0])
  state = s.after_experience(ctx, state, sc.experiences[1])
  # Both experiences' test rows: each learned slot is the surest on some.
  x = jnp.asarray(np.concatenate([e.test_x for e in sc.experiences]))
  task = jnp.zeros((x.shape[0],), jnp.int32)  # no task id in class-IL
  predict = jax.jit(lambda ss, p, x, t: s.predict(ctx, ss, p, {}, x, t))
  got = np.asarray(predict(state.strategy, state.params, x, task))
  _, apply = jitted(ctx.model)
  flats = apply({"params": state.params}, jnp.arange(3),
                method=HyperNetwork.generate)  # raw values
  per = [np.asarray(apply({"params": state.params}, flats[t], x,
                          method=HyperNetwork.target))
         for t in range(3)]

  def entropy(logits):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(p + 1e-30)).sum(-1)

  ent = np.stack([entropy(l) for l in per[:2]])  # slot 2 is not learned
  best = ent.argmin(0)
  assert 0 < best.sum() < len(best), best   # a per-row, not per-batch, choice
  want = np.stack([per[b][i] for i, b in enumerate(best)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The unlearned embedding is never used, even if it were most confident.
  ss = state.strategy._replace(filled=jnp.array([True, False, False]))
  got0 = np.asarray(predict(ss, state.params, x, task))
  np.testing.assert_allclose(got0, per[0], rtol=1e-4, atol=1e-5)
  # Only learned slots compete, slot 0 included: with slot 1 alone
  # learned (a state made by hand), slot 1 predicts every row.
  ss = state.strategy._replace(filled=jnp.array([False, True, False]))
  got1 = np.asarray(predict(ss, state.params, x, task))
  np.testing.assert_allclose(got1, per[1], rtol=1e-4, atol=1e-5)


def test_chains_with_si_class_incremental_without_recompiling():
  # Class-IL: the stream's task id is 0 throughout, yet experience i must
  # train embedding i (and leave the unused embedding 2 at its init).
  sc = _toy("class", n_exp=2)
  c = _config(beta=0.1, kind="class", epochs=1)
  c.strategy.name = "hypernetwork+si"
  res = experiment.run(c, scenario=sc)
  learner = res.learner
  assert learner.chunk_fn._cache_size() == 1
  assert np.all(np.isfinite(res.accuracy))
  assert np.asarray(res.state.strategy[0].filled).tolist() == [True, True,
                                                                False]
  init = init_state(learner.ctx, learner.strategy, c.seed)
  e0 = np.asarray(init.params["task_embeddings"])
  e1 = np.asarray(res.state.params["task_embeddings"])
  assert not np.allclose(e0[0], e1[0]) and not np.allclose(e0[1], e1[1])
  np.testing.assert_array_equal(e0[2], e1[2])


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="beta"):
    hypernetwork(beta=-1.0)
  with pytest.raises(ValueError, match="reg_samples"):
    hypernetwork(reg_samples=-1)
  with pytest.raises(ValueError, match="lookahead must be True or False, "
                     "got 'yes'"):
    hypernetwork(lookahead="yes")
  sc = _toy("task")
  ctx = make_context(models.build("mlp", C, widths=(8,)),
                     make_optimizer("sgd", 0.1), stream_info(sc, 16))
  with pytest.raises(ValueError, match="hypernet"):
    init_state(ctx, hypernetwork(), 0)
  small = models.build("hypernet", C, **{**HN, "num_embeddings": 2})
  ctx = make_context(small, make_optimizer("sgd", 0.1), stream_info(sc, 16))
  with pytest.raises(ValueError, match="num_embeddings"):
    init_state(ctx, hypernetwork(), 0)
  with pytest.raises(ValueError, match="multi_head"):
    models.build("hypernet", C, num_heads=3, **HN)
  with pytest.raises(ValueError, match="unknown activation 'tanh'"):
    models.build("hypernet", C, activation="tanh", **HN)
  with pytest.raises(ValueError, match="unknown hidden_init 'xavier'; "
                     "valid: he, glorot"):
    models.build("hypernet", C, hidden_init="xavier", **HN)


def test_hidden_init_glorot_is_uniform_within_its_limit():
  """hidden_init='glorot' (the reference code's init): hidden kernels
  uniform in ±sqrt(6 / (fan_in + fan_out)); the default He normal
  exceeds that bound on the first layer (std sqrt(2 / fan_in) is larger
  than the Glorot limit / sqrt(3))."""
  x = jnp.zeros((2, D))
  t = jnp.zeros((2,), jnp.int32)
  wide = {**HN, "hidden": (50,)}
  fan_in = HN["embedding_dim"] + HN["chunk_embedding_dim"]
  limit = math.sqrt(6 / (fan_in + 50))
  g = jitted(models.build("hypernet", C, hidden_init="glorot", **wide))[0](
      jax.random.PRNGKey(0), x, t)["params"]["kernel_0"]
  h = jitted(models.build("hypernet", C, **wide))[0](
      jax.random.PRNGKey(0), x, t)["params"]["kernel_0"]
  assert float(jnp.abs(g).max()) <= limit
  assert float(jnp.abs(g).max()) > 0.9 * limit  # uniform fills the range
  np.testing.assert_allclose(float(jnp.std(g)), limit / math.sqrt(3),
                             rtol=0.15)
  assert float(jnp.std(h)) > 1.3 * float(jnp.std(g))


def test_elu_hypernetwork_generates_by_hand():
  """activation='elu' (the reference's Permuted MNIST hypernetwork): the
  generated chunks equal a NumPy forward pass with ELU hidden units."""
  m = models.build("hypernet", C, activation="elu", **HN)
  init, apply = jitted(m)
  v = init(jax.random.PRNGKey(0), jnp.zeros((1, D)), jnp.zeros((1,),
                                                                jnp.int32))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  emb = np.concatenate([np.repeat(p["task_embeddings"][1][None],
                                  m.num_chunks, 0), p["chunk_embeddings"]], 1)
  h, i = emb, 0
  while f"kernel_{i}" in p:
    h = h @ p[f"kernel_{i}"] + p[f"bias_{i}"]
    if f"kernel_{i + 1}" in p:
      h = np.where(h > 0, h, np.expm1(h))
    i += 1
  want = h.reshape(-1)[:m.num_target_params]
  got = apply(v, jnp.array([1]), method=HyperNetwork.generate)[0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  relu = jitted(models.build("hypernet", C, **HN))[1](
      v, jnp.array([1]), method=HyperNetwork.generate)[0]
  assert not np.allclose(np.asarray(relu), want)


def test_single_task_routing_without_cond():
  """mixed_batches=False: the same logits as the routed model on a
  one-task batch, NaN on rows of another task (a mixed batch is loud)."""
  x = jax.random.normal(jax.random.PRNGKey(1), (4, D))
  routed = models.build("hypernet", C, **HN)
  first = models.build("hypernet", C, mixed_batches=False, **HN)
  (r_init, r_apply), (_, f_apply) = jitted(routed), jitted(first)
  v = r_init(jax.random.PRNGKey(0), x, jnp.zeros((4,), jnp.int32))
  one = jnp.full((4,), 2, jnp.int32)
  np.testing.assert_allclose(np.asarray(f_apply(v, x, one)),
                             np.asarray(r_apply(v, x, one)), rtol=1e-6)
  out = np.asarray(f_apply(v, x, jnp.array([2, 2, 0, 2])))
  assert np.isnan(out[2]).all() and np.isfinite(out[[0, 1, 3]]).all()
  # Under vmap (a seeds sweep) no lax.cond is left to turn into a select.
  jaxpr = str(jax.make_jaxpr(jax.vmap(lambda t: first.apply(v, x, t)))(
      jnp.stack([one, one])))
  assert "cond" not in jaxpr and "select_n" in jaxpr


def test_test_set_padding_rows_carry_the_sets_task():
  from jaxcl.train import test_arrays
  sc = _toy("task", n_exp=3)
  t = test_arrays(sc.experiences, 100)
  for i, e in enumerate(sc.experiences):
    assert (t["task"][i] == e.test_task[0]).all()


def test_generation_and_target_gradients_equal_plain_slicing():
  """The fast paths (bias as a rank-1 dot, the custom gradient of the flat
  weight vector's split) give the same values and gradients as the plain
  formulation: broadcast bias add and one slice per target array."""
  m = HyperNetwork(num_classes=C, **HN)
  params = jax.jit(m.init)(jax.random.key(0), jnp.zeros((2, D)),
                           jnp.zeros((2,), jnp.int32))["params"]
  x = jax.random.normal(jax.random.key(1), (5, D))

  def plain(p):
    e = p["task_embeddings"][jnp.array([1])]
    h = jnp.concatenate([jnp.broadcast_to(e[:, None], (1, m.num_chunks, 4)),
                         p["chunk_embeddings"][None]], -1)
    for i in range(len(HN["hidden"]) + 1):
      h = h @ p[f"kernel_{i}"] + p[f"bias_{i}"]
      if i < len(HN["hidden"]):
        h = jax.nn.relu(h)
    flat, out, off = h.reshape(-1)[:m.num_target_params], x, 0
    for j, shape in enumerate(m.target_shapes):
      w = flat[off:off + math.prod(shape)].reshape(shape)
      w = w / math.sqrt(shape[0]) if len(shape) == 2 else 0.1 * w
      off += math.prod(shape)
      out = out @ w if len(shape) == 2 else out + w
      if len(shape) == 1 and j < len(m.target_shapes) - 1:
        out = jax.nn.relu(out)
    return jnp.sum(jnp.sin(out))

  def fast(p):
    return jnp.sum(jnp.sin(m.apply({"params": p}, x,
                                   jnp.ones((5,), jnp.int32))))

  # Values and gradients of both, in one program.
  (v_fast, g_fast), (v_plain, g_plain) = jax.jit(lambda p: (
      jax.value_and_grad(fast)(p), jax.value_and_grad(plain)(p)))(params)
  np.testing.assert_allclose(v_fast, v_plain, rtol=1e-5)
  for k in g_plain:
    np.testing.assert_allclose(g_fast[k], g_plain[k], rtol=1e-4,
                               atol=1e-6, err_msg=k)
  assert float(jnp.abs(g_plain["bias_1"]).sum()) > 0  # a real check


def test_output_scale_none_uses_generated_values_as_weights():
  """output_scale='none' (the reference code's parametrisation): the target
  runs on the generated values themselves, which a Glorot output layer
  keeps small at init; 'fan_in' scales unit-variance values instead."""
  big = dict(HN, chunk_size=400)  # a wide output layer, as in practice
  none = HyperNetwork(num_classes=C, output_scale="none", **big)
  fan = HyperNetwork(num_classes=C, **big)
  x = jax.random.normal(jax.random.key(1), (5, D))
  t = jnp.zeros((5,), jnp.int32)
  (n_init, n_apply), (f_init, f_apply) = jitted(none), jitted(fan)
  p_none = n_init(jax.random.key(0), x, t)["params"]
  p_fan = f_init(jax.random.key(0), x, t)["params"]
  np.testing.assert_array_equal(none.weight_scales, 1.0)
  assert np.all(fan.weight_scales < 1.0)
  flat = n_apply({"params": p_none}, jnp.array([0]),
                 method=HyperNetwork.generate)[0]
  assert 0 < float(jnp.std(flat)) < 0.2  # small weights at init
  assert float(jnp.std(f_apply({"params": p_fan}, jnp.array([0]),
                               method=HyperNetwork.generate))) > 0.5
  # The target MLP on the raw generated values, by hand.
  w1 = flat[:D * 8].reshape(D, 8)
  b1 = flat[D * 8:D * 8 + 8]
  w2 = flat[D * 8 + 8:D * 8 + 8 + 8 * C].reshape(8, C)
  b2 = flat[D * 8 + 8 + 8 * C:D * 8 + 8 + 8 * C + C]
  want = jax.nn.relu(x @ w1 + b1) @ w2 + b2
  np.testing.assert_allclose(n_apply({"params": p_none}, x, t), want,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="output_scale 'x'; valid"):
    models.build("hypernet", num_classes=C, output_scale="x")


def test_target_input_size_comes_from_the_stream_unless_given():
  """Without model.hypernet.input_dim the target MLP takes the stream's
  input size (the field's default is MNIST's 784); a given one is kept and
  a wrong one is still reported."""
  sc = _toy()
  c = _config(beta=0.01)
  c.model.hypernet = {k: v for k, v in HN.items() if k != "input_dim"}
  assert experiment.setup(c, sc).learner.ctx.model.input_dim == D
  c.model.hypernet = dict(HN, input_dim=D + 1)
  s = experiment.setup(c, sc)
  assert s.learner.ctx.model.input_dim == D + 1
  with pytest.raises(ValueError, match="input_dim"):
    init_state(s.learner.ctx, s.learner.strategy, 0)


def test_target_heads_task_reads_its_own_head():
  """With target_heads = h the target has h * C outputs, all generated for
  every task, and task t's logits are head t's slice."""
  m = models.build("hypernet", C, **dict(HN, target_heads=3))
  assert m.target_shapes[-2] == (8, 3 * C) and m.target_shapes[-1] == (3 * C,)
  init, apply = jitted(m)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, D))
  v = init(jax.random.PRNGKey(0), x, jnp.zeros((5,), jnp.int32))
  for t in range(3):
    flat = apply(v, jnp.array([t]), method=HyperNetwork.generate)[0]
    full = np.asarray(apply(v, flat, x, method=HyperNetwork.target))
    got = np.asarray(apply(v, x, jnp.full((5,), t, jnp.int32)))
    assert got.shape == (5, C)
    np.testing.assert_allclose(got, full[:, t * C:(t + 1) * C], rtol=1e-5,
                               atol=1e-6)
  with pytest.raises(ValueError, match="target_heads"):
    models.build("hypernet", C, **dict(HN, target_heads=0))
  # Fewer heads than tasks: the last tasks would silently share a head.
  with pytest.raises(ValueError, match="target_heads=2 is fewer than the 3"):
    models.build("hypernet", C, **dict(HN, target_heads=2))
