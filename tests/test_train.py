"""The compiled loop: determinism, no recompiles, Naive == plain training,
padding, chain, errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcl
from jaxcl import datasets, experiment, scenarios, train
from jaxcl.state import TrainState
from jaxcl.strategy import Strategy, chain, predict_once_ready
from test_replay import batch_of


def quick_config(**overrides):
  c = jaxcl.default_config()
  c.model.widths = (32,)
  c.train.epochs = 1
  c.train.batch_size = 16
  c.report.progress = False
  return with_overrides(c, overrides)


def with_overrides(c, overrides):
  """``c`` with ``overrides``' dotted paths (``"train.epochs"``) set."""
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_same_seed_bit_identical_and_seed_matters():
  a = jaxcl.run(quick_config())
  b = jaxcl.run(quick_config())
  c = jaxcl.run(quick_config(seed=1))
  np.testing.assert_array_equal(a.accuracy, b.accuracy)
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  pa, pc = jax.tree.leaves(a.state.params), jax.tree.leaves(c.state.params)
  assert any(not np.array_equal(x, y) for x, y in zip(pa, pc))


def test_no_recompilation_between_experiences():
  r = jaxcl.run(quick_config())
  assert r.accuracy.shape == (5, 5)
  assert r.learner.chunk_fn._cache_size() == 1
  assert r.learner.end_eval_fn._cache_size() == 1
  assert "eval_fn" not in vars(r.learner)  # the ends evaluate, even at init


def test_naive_equals_plain_optax_training(digits):
  """One experience through the engine equals a hand-written optax loop over
  the same mini-batches."""
  c = quick_config()
  s = experiment.setup(c, scenarios.split(digits, 5))
  learner, ctx = s.learner, s.learner.ctx
  exp = s.scenario.experiences[0]
  state = train.init_state(ctx, learner.strategy, 0)
  # The chunk function donates the state: keep host copies.
  params0 = jax.tree.map(np.asarray, state.params)
  rng = np.asarray(state.rng)
  size = ctx.info.train_size
  data = jax.device_put(train.device_experience(exp, size))
  state, losses, ran = learner.chunk_fn(state, data, exp.num_train, 0, 0, 0)

  idx = np.asarray(train.epoch_indices(rng, 0, 0, exp.num_train, size,
                                       learner.epoch_steps, 16))
  tx = optax.sgd(c.optimizer.learning_rate)
  params, opt = params0, tx.init(params0)
  n_steps = 0
  for row in idx:
    if (row < 0).all():
      continue
    rows = row[row >= 0]

    def loss_fn(p):
      logits = ctx.model.apply({"params": p}, exp.train_x[rows], None)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, exp.train_y[rows]).mean()

    g = jax.grad(loss_fn)(params)
    u, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, u)
    n_steps += 1
  assert int(state.step) == n_steps == int(np.asarray(ran).sum())
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adamw"])
def test_clip_norm_rescales_the_gradient_before_the_optimiser(name):
  """``clip_norm`` rescales the whole gradient to that global norm before
  weight decay and the optimiser's own transformation (PyTorch's
  ``clip_grad_norm_`` then ``step``); below the norm nothing changes."""
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
  grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # norm 5
  ref = {"sgd": optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.2)),
         "momentum": optax.chain(optax.add_decayed_weights(0.1),
                                 optax.sgd(0.2, momentum=0.9)),
         "adamw": optax.adamw(0.2, weight_decay=0.1)}[name]
  for clip, factor in ((2.0, 0.4), (10.0, 1.0)):
    tx = train.make_optimizer(name, 0.2, weight_decay=0.1, clip_norm=clip)
    st, want_st = tx.init(params), ref.init(params)
    g = grads
    for _ in range(2):  # the second step checks the optimiser's state too
      got, st = tx.update(g, st, params)
      want, want_st = ref.update(jax.tree.map(lambda x: x * factor, g),
                                 want_st, params)
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5)
  off = train.make_optimizer(name, 0.2, weight_decay=0.1)
  got, _ = off.update(grads, off.init(params), params)
  want, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(np.asarray(got["b"]), np.asarray(want["b"]),
                             rtol=1e-5)


def test_predict_once_ready_runs_one_branch_and_selects_per_seed(digits):
  """The model's own logits until ``ready``, the scores after; one
  ``cond`` (not both passes) in an unbatched run, a per-seed selection
  under a seed ``vmap``."""
  c = quick_config()
  s = experiment.setup(c, scenarios.split(digits, 5))
  ctx = s.learner.ctx
  params, model_state = train.init_variables(ctx, jax.random.PRNGKey(0))
  x = jnp.asarray(s.scenario.experiences[0].test_x[:4])
  task = jnp.zeros(4, jnp.int32)
  own = ctx.logits(params, model_state, x, task)
  other = jnp.full_like(own, 3.0)
  pick = lambda ready: predict_once_ready(ready, lambda: other, ctx, params,
                                          model_state, x, task)
  np.testing.assert_array_equal(pick(jnp.array(False)), own)
  np.testing.assert_array_equal(pick(jnp.array(True)), other)
  prims = {e.primitive.name for e in jax.make_jaxpr(pick)(
      jnp.array(True)).jaxpr.eqns}
  assert "cond" in prims, prims
  both = jax.vmap(pick)(jnp.array([True, False]))
  np.testing.assert_array_equal(both[0], other)
  np.testing.assert_array_equal(both[1], own)


def test_epoch_indices_cover_each_example_once():
  idx = np.asarray(train.epoch_indices(jax.random.PRNGKey(0), 1, 2, 37, 50,
                                       steps=7, batch_size=8))
  assert idx.shape == (7, 8)
  valid = idx[idx >= 0]
  assert sorted(valid.tolist()) == list(range(37))
  # Padding only after the valid entries; all-padding rows are skipped.
  flat = idx.ravel()
  assert (flat[:37] >= 0).all() and (flat[37:] == -1).all()
  # The order is a function of (run key, experience, epoch): the same
  # arguments draw it again (a resumed run), and another epoch, experience
  # or seed draws another (an order reused across epochs, or shared by
  # every seed of a sweep, still covers each example once).
  draw = lambda seed, exp, epoch: np.asarray(train.epoch_indices(
      jax.random.PRNGKey(seed), exp, epoch, 37, 50, steps=7, batch_size=8))
  np.testing.assert_array_equal(draw(0, 1, 2), idx)
  for other in (draw(0, 1, 3), draw(0, 2, 2), draw(1, 1, 2)):
    assert sorted(other[other >= 0].tolist()) == list(range(37))
    assert not np.array_equal(other, idx)


def test_batch_index_names_each_rows_place_in_the_experience(digits):
  """``batch['index']`` is each incoming row's position in the
  experience's training data: a probe strategy records, per index, the
  row's pixel sum and how often it came; one epoch covers each example
  once and every sum is that example's."""
  c = quick_config()
  s = experiment.setup(c, scenarios.split(digits, 5))
  ctx = s.learner.ctx
  size = ctx.info.train_size

  def init(ctx, key, params):
    return (jnp.full((size,), jnp.nan, jnp.float32),
            jnp.zeros((size,), jnp.int32))

  def after_step(ctx, ss, info):
    b = info.batch
    at = jnp.where(b["index"] >= 0, b["index"], size)
    sums = jnp.sum(b["x"].reshape(b["x"].shape[0], -1), -1)
    return (ss[0].at[at].set(sums, mode="drop"),
            ss[1].at[at].add(1, mode="drop"))

  probe = Strategy(init=init, after_step=after_step, name="probe")
  learner = dataclasses.replace(s.learner, strategy=probe)
  exp = s.scenario.experiences[1]
  state = train.init_state(ctx, probe, 0)
  data = jax.device_put(train.device_experience(exp, size))
  state, _, _ = learner.chunk_fn(state, data, exp.num_train, 1, 0, 0)
  sums, count = (np.asarray(a) for a in state.strategy)
  n = exp.num_train
  np.testing.assert_array_equal(count[:n], 1)
  np.testing.assert_array_equal(count[n:], 0)
  np.testing.assert_allclose(
      sums[:n], exp.train_x.reshape(n, -1).sum(-1), rtol=1e-6)


def test_evaluate_counts_only_each_test_sets_own_rows(digits):
  """Each test set is padded to a multiple of the eval batch (label 0
  there); a predictor that always says class 0 scores each set's share
  of label 0 (NumPy), so padding counted as valid would show."""
  c = quick_config()
  s = experiment.setup(c, scenarios.split(digits, 5))
  exps = s.scenario.experiences[:2]  # classes 0-1, then 2-3
  zero = Strategy(predict=lambda ctx, ss, p, ms, x, t: jnp.zeros(
      (x.shape[0], 10)).at[:, 0].set(1.0), name="zero")
  state = train.init_state(s.learner.ctx, zero, 0)
  test = train.test_arrays(exps, 64)
  assert (test["count"] < test["y"].shape[1]).all()  # both padded
  acc = train.evaluate(s.learner.ctx, zero, state,
                       jax.tree.map(jnp.asarray, test), eval_batch_size=64)
  np.testing.assert_allclose(
      np.asarray(acc), [np.mean(e.test_y == 0) for e in exps], rtol=1e-6)


def test_padding_steps_are_skipped(digits):
  """A small experience in a stream of big ones takes ceil(n/B) steps."""
  s = scenarios.split(digits, 5)
  small = s.experiences[0]
  sc = scenarios.from_arrays(
      [(small.train_x[:40], small.train_y[:40]),
       (s.experiences[1].train_x, s.experiences[1].train_y)],
      [(small.test_x, small.test_y),
       (s.experiences[1].test_x, s.experiences[1].test_y)],
      num_classes=10)
  r = jaxcl.run(quick_config(), scenario=sc)
  steps0 = -(-40 // 16)
  steps1 = -(-s.experiences[1].num_train // 16)
  assert int(r.state.step) == steps0 + steps1


def _scale(factor):
  return Strategy(update_grads=lambda ctx, ss, g, p, b, k: jax.tree.map(
      lambda a: a * factor, g), name=f"scale{factor}")


def _shift(value):
  return Strategy(update_grads=lambda ctx, ss, g, p, b, k: jax.tree.map(
      lambda a: a + value, g), name=f"shift{value}")


def _penalty(weight):

  def init(ctx, key, params):
    return jnp.asarray(weight, jnp.float32)

  def loss(ctx, ss, params, batch, logits):
    return ss * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))

  return Strategy(init=init, loss=loss, name=f"l2_{weight}")


def test_chain_matches_manual_composition():
  g = {"w": jnp.array([1.0, -2.0])}
  ab = chain(_scale(2.0), _shift(1.0))
  ba = chain(_shift(1.0), _scale(2.0))
  key = jax.random.PRNGKey(0)
  np.testing.assert_allclose(ab.update_grads(None, ((), ()), g, None, None,
                                             key)["w"], [3.0, -3.0])
  np.testing.assert_allclose(ba.update_grads(None, ((), ()), g, None, None,
                                             key)["w"], [4.0, -2.0])
  pc = chain(_penalty(0.5), _penalty(0.25))
  params = {"w": jnp.array([1.0, 2.0])}
  ss = pc.init(None, key, params)
  assert isinstance(ss, tuple) and len(ss) == 2
  assert float(pc.loss(None, ss, params, None, None)) == pytest.approx(
      0.75 * 5.0)
  assert pc.name == "l2_0.5+l2_0.25"
  # prepare_batch runs left to right (double then add 1: 2x + 1, not
  # 2(x + 1)), every member's, each with its own key.
  def prep(f, name):
    return Strategy(prepare_batch=lambda ctx, ss, b, k: {
        "x": f(b["x"]), "keys": b["keys"] + (jax.random.key_data(k),)},
        name=name)
  pb = chain(prep(lambda x: 2 * x, "double"), prep(lambda x: x + 1, "inc"))
  out = pb.prepare_batch(None, ((), ()), {"x": jnp.array([1.0, 2.0]),
                                         "keys": ()}, key)
  np.testing.assert_allclose(out["x"], [3.0, 5.0])
  assert len(out["keys"]) == 2
  assert not np.array_equal(out["keys"][0], out["keys"][1])
  # The one predictor gets its own state slot, wherever it sits.
  pr = Strategy(init=lambda ctx, key, params: jnp.asarray(7.0),
                predict=lambda ctx, ss, p, ms, x, t: ss * x, name="pr")
  cp = chain(_penalty(0.5), pr)
  np.testing.assert_allclose(cp.predict(None, cp.init(None, key, params),
                                        None, None, jnp.ones(2), None),
                             [7.0, 7.0])
  # init and update_grads also give each member its own key (two
  # stochastic members would otherwise draw the same numbers).
  keyed = lambda name: Strategy(
      init=lambda ctx, k, params: jax.random.key_data(k),
      update_grads=lambda ctx, ss, g, p, b, k: g + (jax.random.key_data(k),),
      name=name)
  kc = chain(keyed("a"), keyed("b"))
  a, b = kc.init(None, key, None)
  assert not np.array_equal(a, b)
  a, b = kc.update_grads(None, (a, b), (), None, None, key)
  assert not np.array_equal(a, b)
  # Look-ahead penalties add up; one member asking for the task gradient
  # is enough.
  look = lambda w: Strategy(lookahead_loss=lambda ctx, ss, p, b: w * p,
                            name=f"look{w}")
  lc = chain(look(2.0), Strategy(), look(3.0))
  assert float(lc.lookahead_loss(None, ((), (), ()), 1.0, None)) == 5.0
  assert chain(Strategy(), Strategy(needs_task_grads=True)).needs_task_grads
  with pytest.raises(ValueError, match="call init first"):
    pc.loss(None, (ss[0],), params, None, None)


def test_chain_gives_each_after_step_its_own_key():
  def keeper(name):
    return Strategy(init=lambda ctx, key, params: jnp.zeros(2, jnp.uint32),
                    after_step=lambda ctx, ss, info: jax.random.key_data(
                        info.key), name=name)
  c = chain(keeper("a"), keeper("b"))
  info = train.StepInfo(None, None, None, None, None, jnp.zeros(()),
                        jax.random.PRNGKey(3))
  a, b = c.after_step(None, c.init(None, jax.random.PRNGKey(0), None), info)
  assert not np.array_equal(a, b)
  assert not np.array_equal(a, jax.random.key_data(info.key))


def _ctx_and_first_batch(digits, config):
  """Split Digits under ``config``: the learner's context and a full batch
  of the first experience's first 16 rows."""
  s = experiment.setup(config, scenarios.split(digits, 5))
  ctx, exp = s.learner.ctx, s.scenario.experiences[0]
  return ctx, dict(batch_of(exp, n=16), index=jnp.arange(16, dtype=jnp.int32))


def test_after_step_sees_the_steps_parameters_gradient_and_key(digits):
  """after_step's StepInfo holds the parameters before and after this
  step's update and the gradient the optimiser applied (after every
  member's update_grads): under plain SGD, before - after = lr * grads.
  Its key is new at every step (keys fold in the step counter)."""
  lr = 0.1
  ctx, batch = _ctx_and_first_batch(
      digits, quick_config(**{"optimizer.learning_rate": lr}))

  def init(ctx, key, params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return zeros, zeros, zeros, jnp.zeros(2, jnp.uint32)

  probe = Strategy(init=init, after_step=lambda ctx, ss, info: (
      info.params_before, info.params_after, info.grads,
      jax.random.key_data(info.key)), name="probe")
  # _scale(2) doubles the gradient first: the probe must see the doubled
  # one, the one applied.
  strategy = chain(_scale(2.0), probe)
  state = train.init_state(ctx, strategy, 0)
  step = jax.jit(lambda st: train.train_step(ctx, strategy, st, batch)[0])
  keys = []
  for _ in range(2):
    p0 = jax.tree.map(np.asarray, state.params)
    state = step(state)
    before, after, grads, k = state.strategy[1]
    keys.append(np.asarray(k))
    for b, a, g, q0, q1 in zip(*map(jax.tree.leaves, (
        before, after, grads, p0, state.params))):
      np.testing.assert_array_equal(np.asarray(b), q0)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(q1))
      assert np.abs(q0 - np.asarray(q1)).max() > 1e-4
      np.testing.assert_allclose(q0 - np.asarray(q1), lr * np.asarray(g),
                                 rtol=1e-4, atol=1e-6)
  assert not np.array_equal(keys[0], keys[1])


def test_chain_experience_hooks_run_in_order_on_one_state():
  """before_experience and after_experience run left to right on one
  TrainState: each member sees what the members before it wrote into the
  weights (double then add 1: 2p + 1), and writes its own state slot."""
  def writer(f, bump, name):
    def hook(ctx, state, experience):
      return state.replace(params=f(state.params),
                           strategy=state.strategy + bump)
    return Strategy(init=lambda ctx, key, params: jnp.int32(0),
                    before_experience=hook, after_experience=hook, name=name)

  ch = chain(writer(lambda p: 2 * p, 1, "double"),
             writer(lambda p: p + 1, 10, "inc"))
  state = TrainState(step=jnp.int32(0), params=jnp.float32(1.0),
                     opt_state=(), model_state={},
                     strategy=ch.init(None, jax.random.PRNGKey(0), None),
                     rng=jax.random.PRNGKey(0))
  state = ch.before_experience(None, state, None)
  assert float(state.params) == 3.0
  assert tuple(int(a) for a in state.strategy) == (1, 10)
  state = ch.after_experience(None, state, None)
  assert float(state.params) == 7.0
  assert tuple(int(a) for a in state.strategy) == (2, 20)


def test_chain_rejects_two_predictors():
  p = Strategy(predict=lambda *a: None, name="p1")
  q = Strategy(predict=lambda *a: None, name="p2")
  with pytest.raises(ValueError, match="more than one strategy defines "
                     "predict"):
    chain(p, q)


@pytest.mark.parametrize("spec,match", [
    # Each trained while silently undoing or dropping a member's effect
    # (the session-18 fuzz of every pair); now each is a clear refusal.
    ("hat+replay", "hat and replay cannot be composed: hat masks only its "
     "own gradient"),
    ("lwf+hat", "lwf and hat cannot be composed: hat masks only"),
    ("exstream+latent_replay", "both write the batch's replayed latents: "
     "exstream's are replaced by latent_replay's"),
    ("replay+generative_replay", "generative_replay takes the batch's last "
     "rows .* so replay's replayed rows"),
    ("mir+ar1", "ar1 writes a -1e9 bias .* and mir replays"),
    # Session 20's fuzz of DER / DER++ with every strategy: the same two.
    ("der+cwr_star", "cwr_star writes a -1e9 bias .*DER stores the -1e9"),
    ("hat+derpp", "hat and derpp cannot be composed: hat masks only"),
    # Session 21's fuzz of ER-ACE: the groups Replay is in.
    ("er_ace+ar1", "ar1 writes a -1e9 bias .* and er_ace replays"),
    ("er_ace+hat", "er_ace and hat cannot be composed: hat masks only"),
    ("generative_negative_replay+er_ace", "generative_negative_replay takes "
     "the batch's last rows .* so er_ace's replayed rows"),
    ("gss+cwr_star", "cwr_star writes a -1e9 bias .* and gss replays"),
    ("hat+gss", "hat and gss cannot be composed: hat masks only"),
    ("gss+generative_replay", "generative_replay takes the batch's last "
     "rows .* so gss's replayed rows"),
    # Session 22's fuzz of BiC: its appended exemplars, as iCaRL's.
    ("generative_negative_replay+bic", "generative_negative_replay takes "
     "the batch's last rows .* so bic's replayed rows"),
    # Session 23's fuzz of LUCIR and IL2M: appended exemplars, as BiC's.
    ("lucir+generative_replay", "generative_replay takes the batch's last "
     "rows .* so lucir's replayed rows"),
    ("generative_negative_replay+il2m", "generative_negative_replay takes "
     "the batch's last rows .* so il2m's replayed rows"),
    # ... and of ER-AML: the groups ER-ACE is in.
    ("er_aml+cwr_star", "cwr_star writes a -1e9 bias .* and er_aml replays"),
    ("hat+er_aml", "hat and er_aml cannot be composed: hat masks only"),
    ("er_aml+generative_replay", "generative_replay takes the batch's last "
     "rows .* so er_aml's replayed rows"),
    ("gdumb+ewc", r"gdumb retrains the model from scratch .* \['ewc'\]"),
    ("replay+slda", r"slda trains no parameter .* \['replay'\]"),
    ("dmc+lwf", r"dmc trains a fresh model .* \['lwf'\]"),
    ("replay+fecam", r"fecam freezes the whole model .* \['replay'\]"),
    ("fetril+lwf", r"fetril freezes the whole model .* \['lwf'\]"),
    # Session 24's fuzz of LFL: members that write the output layer.
    ("cwr_star+lfl", "lfl freezes part of the model .* cwr_star writes"),
    ("lfl+packnet", "lfl freezes part of the model .* packnet writes"),
    # ... and of X-DER: it stores and matches logits, as DER does.
    ("xder+cwr_star", "cwr_star writes a -1e9 bias .* and xder replays"),
    # ... and of Freezing: PackNet's retraining moved the frozen backbone.
    ("packnet+freezing", "freezing freezes part .* packnet writes"),
    # Session 25's fuzz of FDR, HAL and MER: replaying members, as DER.
    ("hal+ar1", "ar1 writes a -1e9 bias .* and hal replays"),
    ("fdr+hat", "fdr and hat cannot be composed: hat masks only"),
    ("hat+hal", "hat and hal cannot be composed: hat masks only"),
    ("mer+cwr_star", "cwr_star writes a -1e9 bias .* and mer replays"),
    ("mer+hat", "mer and hat cannot be composed: hat masks only"),
    ("ensemble+mas", "mas anchors each new ensemble member"),
    # Session 28: CoPE replays class-balanced memory rows at the batch's end.
    ("generative_replay+cope", "generative_replay takes the batch's last "
     "rows .* so cope's replayed rows"),
    # ... and of the rest of session 28's methods (runs/s28/fuzz).
    ("from_scratch+hat", "from_scratch restores the initial parameters"),
    ("packnet+from_scratch", "from_scratch restores the initial"),
    ("scr+replay", "scr and replay cannot be composed in this order"),
    # Session 36: rows appended after P&C's routing go through its
    # knowledge base, masked while it progresses.
    ("progress_compress+replay", "progress_compress and replay cannot be "
     "composed in this order: .* they train nothing"),
    ("progress_compress+derpp", "put derpp before progress_compress"),
    ("progress_compress+mir", "mir's memory rows keep their stored task, "
     "which routes them through progress_compress's knowledge base"),
    ("agem+progress_compress", "agem does nothing"),
    # Session 36's fuzz of aser and slca.
    ("aser+hat", "hat masks only its own gradient"),
    ("cwr_star+aser", "cwr_star writes a -1e9 bias .* and aser replays"),
    ("ss_il+mir", "mir adds the gradient of a cross-entropy over all "
     "classes on rows of its memory"),
    ("aser+ss_il", "aser adds the gradient of a cross-entropy"),
    ("lucir+aser", "lucir scores its rows over the classes seen so far"),
    ("mir+lucir", "Chain replay instead"),
    ("from_scratch+slca", "from_scratch restores the initial parameters"),
    ("slca+lfl", "lfl freezes part of the model .* SLCA's fresh head"),
    ("puridiver+slca", "slca keeps part of the model fixed or slow"),
    ("cumulative+slca", "slca works on each experience's new classes .* "
     "the run would stop at the second experience"),
    ("slca+eeil", "slca and eeil cannot be composed in this order: slca "
     "keeps a copy of the model"),
    ("exstream+scr", "scr trains only through its contrastive loss"),
    ("si+scr", "si measures importance from the task loss's gradient"),
    ("hat+scr", "hat masks only its own gradient"),
    ("rwalk+ensemble", "rwalk anchors each new ensemble member"),
    ("hat+expert_gate", "expert_gate keeps one whole single-head model"),
    ("agem+lamaml", "agem and lamaml cannot be composed in this order"),
    ("si+lamaml", "si measures importance from the task loss's gradient, "
     "and lamaml's task loss"),
    ("lamaml+generative_replay", "generative_replay weights its generated"),
    ("fdr+lamaml", "fdr's penalty is evaluated after the update"),
    ("rwalk+cope", "rwalk's importance is the Fisher of a softmax"),
    ("cope+ewc", "ewc's importance is the Fisher of a softmax"),
    # Session 30's fuzz of RAR: Replay's groups, and SS-IL's.
    ("rar+hat", "hat masks only its own gradient"),
    ("ar1+rar", "ar1 writes a -1e9 bias .* and rar replays"),
    ("generative_replay+rar", "generative_replay takes the batch's last "
     "rows .* so rar's replayed rows"),
    ("scr+rar", "scr and rar cannot be composed in this order"),
    ("rar+ss_il", "rar adds a cross-entropy over all classes on memory "
     "rows"),
    # Session 30: MER has La-MAML's pattern.
    ("gem+mer", "gem and mer cannot be composed in this order: mer's task "
     "loss"),
    ("si+mer", "si measures importance from the task loss's gradient, and "
     "mer's task loss"),
    # Session 29's fuzz of CLS-ER, RPC and SS-IL.
    ("hat+clser", "hat masks only its own gradient"),
    ("clser+generative_replay", "generative_replay takes the batch's last "
     "rows .* so clser's replayed rows"),
    ("generative_negative_replay+rpc", "generative_negative_replay takes "
     "the batch's last rows .* so rpc's replayed rows"),
    ("generative_replay+ss_il", "generative_replay takes the batch's last "
     "rows .* so ss_il's replayed rows"),
    ("ss_il+replay", "ss_il scores the rows after the incoming ones .* "
     "replay's memory is filled every step"),
    ("hal+ss_il", "ss_il scores the rows .* hal's memory"),
    ("gem+ss_il", "gem keeps the memory's cross-entropy over all classes"),
    # Session 35's probe of the prompt methods beside a projector.
    ("aer_abs+l2p", "more than one strategy replaces the task loss"),
    ("dualprompt+aer_abs", "more than one strategy replaces the task loss"),
    ("hat+hat", "'hat' appears twice"),
    ("supsup+supsup", "'supsup' appears twice"),
])
def test_chain_refuses_compositions_that_are_silently_wrong(spec, match):
  from jaxcl import strategies
  with pytest.raises(ValueError, match=match):
    strategies.from_spec(spec)


@pytest.mark.parametrize("spec", ["ewc+replay", "agem+packnet", "der+derpp",
                                  "replay+scr", "from_scratch+replay",
                                  "mir+progressive", "hat+si", "lwf+replay",
                                  "replay+latent_replay", "gdumb+naive",
                                  "naive+slda", "lamaml+agem",
                                  "lamaml+packnet", "agem_r+lfl",
                                  "lamaml+replay", "cope+lwf",
                                  "ss_il+agem", "clser+replay",
                                  "rpc+ewc", "mer+agem", "mer+packnet",
                                  "mer+generative_replay", "mer+fdr",
                                  "rar+packnet", "rar+latent_replay",
                                  "rar+scr", "rar+freezing", "lider+derpp",
                                  "packnet+lamaml", "progressive+mer",
                                  "replay+progress_compress", "scr+mir",
                                  "mer+latent_replay", "exstream+mer",
                                  "lamaml+latent_replay",
                                  "agem+l2p", "gem+dualprompt",
                                  "lfl+agem_r", "l2p+agem",
                                  "coda_prompt+agem_r", "dualprompt+gem",
                                  "packnet+agem", "progressive+agem_r",
                                  "packnet+mir", "progressive+mir",
                                  "packnet+rar"])
def test_chain_accepts_compositions_that_work(spec):
  from jaxcl import strategies
  assert strategies.from_spec(spec)[0].name == spec


@pytest.mark.parametrize("inner, outer, match", [
    (("lwf", "ewc"), "wa", "lwf and wa cannot be composed in this order"),
    (("replay", "ewc"), "replay", "'replay' appears twice"),
    (("hat", "si"), "replay", "hat and replay cannot be composed"),
    (("scr", "mir"), "replay", "scr and replay cannot be composed"),
])
def test_chain_refuses_through_a_nested_chain(inner, outer, match):
  """A chain given as a member is checked as the methods it holds:
  before session 54 chain() saw it as one member named 'lwf+ewc' and let
  every one of these through. Nested the other way, and with two levels,
  the same."""
  from jaxcl import strategies
  get = strategies.get
  with pytest.raises(ValueError, match=match):
    chain(chain(*map(get, inner)), get(outer))
  with pytest.raises(ValueError, match=match):
    chain(chain(chain(*map(get, inner[:1])), get(inner[1])), get(outer))
  # The flat chain is refused for the same reason.
  with pytest.raises(ValueError, match=match):
    chain(*map(get, inner), get(outer))


def test_a_declared_writer_of_ones_own_is_ordered():
  """A strategy of one's own declaring writes_params takes the registered
  writers' rules: after a saver it is refused, first it is accepted; a
  bad declaration names itself and the allowed hooks."""
  from jaxcl import strategies
  mine = Strategy(name="my_aligner",
                  writes_params=frozenset({"after_experience"}))
  with pytest.raises(ValueError, match="lwf and my_aligner cannot be "
                     "composed in this order: lwf keeps a copy"):
    chain(strategies.get("lwf"), mine)
  assert chain(mine, strategies.get("lwf")).name == "my_aligner+lwf"
  starter = Strategy(name="my_reset",
                     writes_params=frozenset({"before_experience"}))
  with pytest.raises(ValueError, match="aer_abs and my_reset cannot be "
                     "composed in this order"):
    chain(strategies.get("aer_abs"), starter)
  bad = Strategy(name="my_bad", writes_params=frozenset({"after_step"}))
  with pytest.raises(ValueError, match=r"my_bad's writes_params must be a "
                     r"frozenset of \['after_experience', "
                     r"'before_experience'\], got frozenset\(\{'after_step'"):
    chain(bad, strategies.get("lwf"))


def test_nested_chain_trains_as_the_flat_one():
  """chain(chain(ewc, lwf), si) and chain(ewc, lwf, si) compose the same
  deterministic methods: over two experiences their accuracy matrices are
  equal (the states differ only in nesting)."""
  from jaxcl import strategies
  get = strategies.get
  c = quick_config()
  c.scenario.n_experiences = 2
  runs = []
  for strategy in (chain(get("ewc"), get("lwf"), get("si")),
                   chain(chain(get("ewc"), get("lwf")), get("si"))):
    assert strategy.name == "ewc+lwf+si"
    runs.append(jaxcl.run(c, strategy=strategy))
  np.testing.assert_array_equal(runs[0].accuracy, runs[1].accuracy)
  assert runs[0].accuracy[1, 0] > 0  # it trained


def test_chained_penalty_trains_in_engine():
  """A chain with a penalty runs in the loop and shrinks the weights."""
  r0 = jaxcl.run(quick_config())
  c = quick_config()
  s = experiment.setup(c)
  strategy = chain(_penalty(0.0), _penalty(0.05))
  learner = train.make_learner(s.learner.ctx, strategy, epochs=1)
  state = train.init_state(learner.ctx, strategy, 0)
  exp = s.scenario.experiences[0]
  data = jax.device_put(train.device_experience(exp,
                                                learner.ctx.info.train_size))
  state, _, _ = learner.chunk_fn(state, data, exp.num_train, 0, 0, 0)
  norm = lambda p: sum(float(jnp.sum(a ** 2)) for a in jax.tree.leaves(p))
  ref = train.init_state(learner.ctx, train.Strategy(), 0)
  ref_learner = train.make_learner(learner.ctx, train.Strategy(), epochs=1)
  data = jax.device_put(train.device_experience(exp,
                                                learner.ctx.info.train_size))
  ref, _, _ = ref_learner.chunk_fn(ref, data, exp.num_train, 0, 0, 0)
  assert norm(state.params) < norm(ref.params)
  assert r0.accuracy.shape == (5, 5)


def test_project_params_and_task_loss_hooks_in_the_step():
  """project_params acts on the updated parameters (a clamp holds after
  every step); task_loss replaces the cross-entropy (a zero task loss
  leaves the parameters where they started)."""
  c = quick_config()
  s = experiment.setup(c)
  exp = s.scenario.experiences[0]
  ctx = s.learner.ctx

  def one_chunk(strategy):
    learner = train.make_learner(ctx, strategy, epochs=1)
    state = train.init_state(ctx, strategy, 0)
    p0 = jax.tree.map(np.asarray, state.params)
    data = jax.device_put(train.device_experience(exp, ctx.info.train_size))
    state, _, _ = learner.chunk_fn(state, data, exp.num_train, 0, 0, 0)
    return p0, state.params

  clamp = Strategy(project_params=lambda ctx, ss, p: jax.tree.map(
      lambda a: jnp.clip(a, -0.01, 0.01), p), name="clamp")
  # Each member's projection applies in turn: the clamp first or last.
  for pair in ((Strategy(), clamp), (clamp, Strategy())):
    p0, p1 = one_chunk(chain(*pair))
    leaves = jax.tree.leaves(p1)
    assert max(float(jnp.abs(a).max()) for a in leaves) <= 0.01
    assert max(float(np.abs(a).max()) for a in jax.tree.leaves(p0)) > 0.01
  # The task loss scales the logits by its own state slot (0), in either
  # place in the chain; the other member's slot holds 1.
  zero = Strategy(init=lambda ctx, key, params: jnp.asarray(0.0),
                  task_loss=lambda ctx, ss, logits, batch: ss * jnp.sum(
                      logits), name="zero")
  one = Strategy(init=lambda ctx, key, params: jnp.asarray(1.0), name="one")
  for pair in ((zero, one), (one, zero)):
    p0, p1 = one_chunk(chain(*pair))
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
      np.testing.assert_array_equal(a, np.asarray(b))
  p0, p1 = one_chunk(chain(zero, Strategy()))
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_array_equal(a, np.asarray(b))
  with pytest.raises(ValueError, match="more than one strategy replaces "
                     "the task loss"):
    chain(zero, zero)


def test_update_grads_hands_its_state_to_after_step_in_a_chain():
  """A grads_state member's update_grads returns (grads, state); in a
  chain beside a plain member, the engine gives that state to after_step
  (each step: update_grads adds 1 to a counter, after_step copies the
  counter it receives into a second slot), and the other member's
  gradient surgery still applies."""
  c = quick_config()
  s = experiment.setup(c)
  exp = s.scenario.experiences[0]
  ctx = s.learner.ctx

  def counted(ctx, ss, g, p, b, k):
    return g, ss.at[0].add(1)

  counter = Strategy(init=lambda ctx, key, params: jnp.zeros(2, jnp.int32),
                     update_grads=counted,
                     after_step=lambda ctx, ss, info: ss.at[1].set(ss[0]),
                     grads_state=True, name="counter")
  strategy = chain(_scale(0.0), counter)
  assert strategy.grads_state and not chain(_scale(0.0)).grads_state
  learner = train.make_learner(ctx, strategy, epochs=1)
  state = train.init_state(ctx, strategy, 0)
  p0 = jax.tree.map(np.asarray, state.params)
  data = jax.device_put(train.device_experience(exp, ctx.info.train_size))
  state, _, ran = learner.chunk_fn(state, data, exp.num_train, 0, 0, 0)
  steps = int(np.asarray(ran).sum())
  assert steps > 1
  np.testing.assert_array_equal(np.asarray(state.strategy[1]),
                                [steps, steps])
  # _scale(0) zeroed the gradient before the counter saw it.
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_lookahead_loss_gradient_is_taken_after_the_candidate_step():
  """lookahead_loss is differentiated at Θ + ΔΘ, ΔΘ the optimiser's update
  from the rest of the loss. With plain SGD (lr η) and the penalty
  ½‖Θ - Θ₀‖² anchored at the starting point, its gradient there is ΔΘ =
  -η g, so the step is -η (g - η g): (1 - η) times Naive's step. The same
  penalty as a plain ``loss`` has zero gradient at Θ₀ (step = Naive's)."""
  eta = 0.5
  c = quick_config(**{"optimizer.momentum": 0.0,
                      "optimizer.learning_rate": eta})
  s = experiment.setup(c)
  ctx = s.learner.ctx
  exp = s.scenario.experiences[0]
  batch = {"x": jnp.asarray(exp.train_x[:16], jnp.float32),
           "y": jnp.asarray(exp.train_y[:16], jnp.int32),
           "task": jnp.asarray(exp.train_task[:16], jnp.int32),
           "mask": jnp.ones((16,), jnp.float32)}

  def anchored(lookahead):
    def init(ctx, key, params):
      return jax.tree.map(jnp.array, params)  # Θ₀, a copy

    def penalty(ctx, ss, params, batch):
      return 0.5 * sum(jnp.sum((p - a) ** 2) for p, a in zip(
          jax.tree.leaves(params), jax.tree.leaves(ss)))

    if lookahead:
      return Strategy(init=init, lookahead_loss=penalty, name="ahead")
    return Strategy(init=init, name="plain",
                    loss=lambda ctx, ss, p, b, logits: penalty(ctx, ss, p, b))

  def step(strategy):
    state = train.init_state(ctx, strategy, 0)
    p0 = jax.tree.map(np.asarray, state.params)
    new, _ = train.train_step(ctx, strategy, state, batch)
    return [np.asarray(b) - a for a, b in zip(jax.tree.leaves(p0),
                                               jax.tree.leaves(new.params))]

  naive = step(Strategy())
  assert max(float(np.abs(d).max()) for d in naive) > 1e-3
  for d, n in zip(step(anchored(False)), naive):
    np.testing.assert_allclose(d, n, rtol=1e-5, atol=1e-7)
  for d, n in zip(step(chain(Strategy(), anchored(True))), naive):
    np.testing.assert_allclose(d, (1 - eta) * n, rtol=1e-4, atol=1e-7)


def test_non_finite_loss_names_experience_and_step():
  c = quick_config(**{"optimizer.learning_rate": 1e12})
  with pytest.raises(jaxcl.NonFiniteLossError, match="experience 0.*step"):
    jaxcl.run(c)


@pytest.mark.parametrize("key,value,match", [
    ("optimizer.name", "rmsprop", "unknown optimizer 'rmsprop'; valid"),
    ("strategy.name", "bogus", "unknown strategy 'bogus'; valid"),
    ("dataset.name", "bogus", "unknown dataset 'bogus'; valid"),
    ("model.name", "bogus", "unknown model 'bogus'; valid"),
    ("scenario.type", "bogus", "unknown scenario type 'bogus'; valid"),
    ("scenario.n_experiences", 3, "does not divide"),
    ("train.batch_size", 100000, "larger than the smallest experience"),
    ("optimizer.learning_rate", -1.0, "learning_rate must be > 0"),
    ("optimizer.learning_rate", float("inf"),
     "learning_rate must be > 0 and finite, got inf"),
    ("train.epochs", 0, "epochs must be >= 1"),
    ("model.multi_head", True, "multi_head=True needs a task-incremental"),
    # Each of these once raised a bare ZeroDivisionError from deep inside,
    # diverged, or ran while silently ignoring or misreading the value.
    ("model.widths", (32, 0), r"widths=\(32, 0\); every layer size must "
     "be a whole number >= 1"),
    ("train.batch_size", 0, "train.batch_size must be >= 1, got 0"),
    ("optimizer.momentum", 1.5, r"momentum must be in \[0, 1\) .*got 1.5"),
    ("optimizer.weight_decay", -0.1, "weight_decay must be >= 0"),
    ("optimizer.clip_norm", -1.0, r"clip_norm must be >= 0 and finite "
     r"\(0: no clipping; > 0: the gradient's largest global L2 norm\), "
     r"got -1.0"),
    ("dataset.train_subset", -5, "train_subset must be >= 0"),
    ("dataset.test_subset", -1, "test_subset must be >= 0"),
    ("scenario.order_seed", -3, "order_seed must be >= 0 .* or -1"),
    ("seed", -1, "seed must be an int >= 0, got -1"),
    ("scenario.seed", -2, "scenario.seed must be an int >= 0, got -2"),
    ("scenario.angles", (10.0, 20.0), r"scenario.angles=\(10.0, 20.0\) is "
     "read by rotated streams only; scenario.type='split' would ignore it"),
    ("scenario.pad", 2, "scenario.pad=2 is read by permuted streams only"),
    ("scenario.class_order", (0, 1, 2, 3, 4, 5, 6, 7, 8, 8),
     r"class_order \[0, 1, 2, 3, 4, 5, 6, 7, 8, 8\] is not a permutation"),
    ("checkpoint.every_steps", -1, "checkpoint.every_steps must be >= 0"),
    ("parallel.devices", -2, "parallel.devices must be >= 0"),
    ("dataset.validation", 1.0, r"validation must be a fraction in \(0, 1\)"),
])
def test_bad_config_clear_error(key, value, match):
  with pytest.raises(ValueError, match=match):
    jaxcl.run(quick_config(**{key: value}))


def test_validation_split_replaces_the_test_sets(tmp_path):
  c = quick_config(**{"dataset.validation": 0.2})
  s = experiment.setup(c)
  held = datasets.load("digits").validation(0.2)
  for e in s.scenario.experiences:
    m = np.isin(held.test_y, e.classes)
    assert m.sum() > 0
    np.testing.assert_array_equal(e.test_x, held.test_x[m])
    np.testing.assert_array_equal(e.test_y, held.test_y[m])
  assert sum(e.num_train for e in s.scenario.experiences) == len(held.train_y)
  jaxcl.run(c, str(tmp_path))
  with open(tmp_path / "accuracy_matrix.json") as f:
    assert json.load(f)["evaluated_on"] == "validation"
  with pytest.raises(ValueError, match="dataset.test_subset=50 with "
                     "dataset.validation=0.2: the test set is not read"):
    jaxcl.run(quick_config(**{"dataset.validation": 0.2,
                              "dataset.test_subset": 50}))


def test_rotated_angles_must_match_the_experiences_and_fields():
  c = quick_config(**{"scenario.type": "rotated", "scenario.kind": "domain",
                      "scenario.angles": (0.0, 90.0)})
  with pytest.raises(ValueError, match="2 angles but n_experiences=5; "
                     "give one angle per experience"):
    jaxcl.run(c)
  c = quick_config(**{"scenario.type": "rotated", "scenario.kind": "domain",
                      "scenario.class_order": tuple(range(9, -1, -1))})
  with pytest.raises(ValueError, match="class_order=.* is read by split and "
                     "blurry streams only; scenario.type='rotated'"):
    jaxcl.run(c)


def test_task_incremental_masks_logits_to_task_classes(digits):
  c = quick_config(**{"scenario.kind": "task"})
  r = jaxcl.run(c)
  # Task-IL on digits: each 2-way task is easy and never forgotten much.
  assert r.metrics["acc"] > 0.9
  naive_class = jaxcl.run(quick_config())
  assert naive_class.metrics["acc"] < 0.5


def test_multi_head_model_task_incremental():
  r = jaxcl.run(quick_config(**{"scenario.kind": "task",
                                "model.multi_head": True}))
  head = r.state.params["head"]["kernel"]
  assert head.shape == (32, 5 * 10)
  assert r.metrics["acc"] > 0.9


def test_ensemble_stores_one_model_per_experience():
  r = jaxcl.run(quick_config(**{"strategy.name": "ensemble",
                                "scenario.kind": "task"}))
  ss = r.state.strategy
  assert bool(ss.filled.all())
  # The last slot holds the final params; slots differ (fresh init each).
  last = jax.tree.map(lambda a: a[-1], ss.params)
  for x, y in zip(jax.tree.leaves(last), jax.tree.leaves(r.state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  k = np.asarray(ss.params["head"]["kernel"])
  assert not np.array_equal(k[0], k[1])
  # Routed by task id, every model keeps its own task: no forgetting.
  assert r.metrics["acc"] > 0.9
  assert r.metrics["bwt"] > -0.02


def test_ensemble_class_incremental_averages_the_stored_members():
  """Class-incremental: log of the mean of the *filled* members' softmax
  outputs (empty slots take no part); each new member starts from a fresh
  draw per experience and a fresh optimiser state."""
  from conftest import np_softmax
  c = quick_config(**{"strategy.name": "ensemble", "optimizer.name": "adam"})
  sc = jaxcl.experiment.build_scenario(c)
  two = dataclasses.replace(sc, experiences=sc.experiences[:2])
  r = jaxcl.run(c, scenario=two)
  ctx, strategy, st = r.learner.ctx, r.learner.strategy, r.state
  ss = st.strategy
  assert np.asarray(ss.filled).tolist() == [True, True]
  x = jnp.asarray(sc.experiences[0].test_x[:16])
  task = jnp.zeros((16,), jnp.int32)
  predict = jax.jit(lambda s, p, m: strategy.predict(ctx, s, p, m, x, task))
  got = np.asarray(predict(ss, st.params, st.model_state))
  probs = [np_softmax(np.asarray(ctx.logits(
      jax.tree.map(lambda a: a[k], ss.params),
      jax.tree.map(lambda a: a[k], ss.model_state), x, task), np.float64))
      for k in range(2)]
  np.testing.assert_allclose(got, np.log((probs[0] + probs[1]) / 2 + 1e-12),
                             rtol=1e-4, atol=1e-5)
  # A slot not filled yet takes no part (here slot 1, though it holds
  # parameters): the mean is over the filled slot alone.
  one = ss._replace(filled=jnp.asarray([True, False]))
  np.testing.assert_allclose(np.asarray(predict(one, st.params,
                                                st.model_state)),
                             np.log(probs[0] + 1e-12), rtol=1e-4, atol=1e-5)
  # The members differ (two trained models), and the prediction is not
  # either one's alone.
  assert np.abs(probs[0] - probs[1]).max() > 0.1
  # The next experiences' members: fresh draws, one per experience, and
  # a fresh Adam state (no moments carried from the trained member).
  leaves = lambda t: [np.asarray(a) for a in jax.tree.leaves(t)]
  nxt = [strategy.before_experience(ctx, st, e) for e in sc.experiences[2:4]]
  assert any(not np.array_equal(a, b) for a, b in
             zip(leaves(nxt[0].params), leaves(nxt[1].params)))
  for n in nxt:
    assert any(not np.array_equal(a, b) for a, b in
               zip(leaves(n.params), leaves(st.params)))
    for a, b in zip(leaves(n.opt_state), leaves(ctx.tx.init(n.params))):
      np.testing.assert_array_equal(a, b)
  assert any(np.any(a != 0) for a in leaves(st.opt_state)
             if a.dtype.kind == "f")


@pytest.mark.parametrize("reset", ["initial", "fresh"])
def test_from_scratch_restarts_every_experience(reset):
  c = quick_config(**{"strategy.name": "from_scratch",
                      "optimizer.name": "adam"})
  c.strategy.from_scratch = dict(reset=reset)
  sc = jaxcl.experiment.build_scenario(c)
  two = dataclasses.replace(sc, experiences=sc.experiences[:2])
  r = jaxcl.run(c, scenario=two)
  ctx, strategy = r.learner.ctx, r.learner.strategy
  start = train.init_state(ctx, strategy, 0)
  leaves = lambda t: [np.asarray(a) for a in jax.tree.leaves(t)]
  # Trained: the parameters moved and Adam counted steps.
  assert any(not np.array_equal(a, b) for a, b in
             zip(leaves(r.state.params), leaves(start.params)))
  restarted = strategy.before_experience(ctx, r.state, sc.experiences[2])
  if reset == "initial":
    want = start.params
  else:  # a new draw per experience, from the run's own key
    key = jax.random.fold_in(jax.random.fold_in(r.state.rng, 0x5C4), 2)
    want = train.init_variables(ctx, key)[0]
    assert any(not np.array_equal(a, b) for a, b in
               zip(leaves(want), leaves(start.params)))
  for a, b in zip(leaves(restarted.params), leaves(want)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(leaves(restarted.opt_state), leaves(start.opt_state)):
    np.testing.assert_array_equal(a, b)
  # The first experience keeps its start (nothing to reset).
  same = strategy.before_experience(ctx, start, sc.experiences[0])
  for a, b in zip(leaves(same.params), leaves(start.params)):
    np.testing.assert_array_equal(a, b)
  # The accuracy matrix of a model that sees one experience at a time:
  # class-incremental, it knows only the newest experience's classes.
  assert r.accuracy[1, 1] > 0.9 and r.accuracy[1, 0] < 0.05


def test_from_scratch_keeps_pretrained_start_and_checks_reset(tmp_path):
  from jaxcl import pretrained
  c = quick_config(**{"strategy.name": "from_scratch"})
  s = jaxcl.experiment.setup(c)
  start = train.init_state(s.learner.ctx, s.learner.strategy, 7)
  path = str(tmp_path / "start.npz")
  pretrained.save(path, start.params)
  c.model.pretrained = path
  s = jaxcl.experiment.setup(c)
  state = jaxcl.experiment.initial_state(s, 0)
  back = s.learner.strategy.before_experience(
      s.learner.ctx, state.replace(params=jax.tree.map(
          lambda a: a + 1.0, state.params)), s.scenario.experiences[1])
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(
      start.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The model state restored is the run's own as it began (masked models
  # keep fixed random or pretrained weights there), not a new draw.
  own = {"frozen": {"w": jnp.arange(3.0)}}
  first = s.learner.strategy.before_experience(
      s.learner.ctx, state.replace(model_state=own), s.scenario.experiences[0])
  moved = first.replace(model_state={"frozen": {"w": jnp.zeros(3)}})
  back = s.learner.strategy.before_experience(s.learner.ctx, moved,
                                              s.scenario.experiences[1])
  np.testing.assert_array_equal(np.asarray(back.model_state["frozen"]["w"]),
                                [0.0, 1.0, 2.0])
  with pytest.raises(ValueError, match=r"reset must be one of \['initial', "
                     r"'fresh'\], got 'random'"):
    jaxcl.strategies.get("from_scratch", reset="random")


def test_strategy_state_aliasing_params_is_donated_safely():
  """A strategy whose state is the params themselves (an anchor) must not
  break buffer donation; the README's script example."""

  def l2_to_init(weight):

    def init(ctx, key, params):
      return params

    def loss(ctx, anchor, params, batch, logits):
      sq = jax.tree.map(lambda p, a: ((p - a) ** 2).sum(), params, anchor)
      return weight * sum(jax.tree.leaves(sq))

    return Strategy(init=init, loss=loss, name="l2_to_init")

  c = quick_config()
  strong = jaxcl.run(c, strategy=chain(l2_to_init(1.0), jaxcl.identity()))
  free = jaxcl.run(c)
  init = train.init_state(strong.learner.ctx, strong.learner.strategy, 0)
  dist = lambda p: sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(
      jax.tree.leaves(p), jax.tree.leaves(init.params)))
  assert dist(strong.state.params) < 0.1 * dist(free.state.params)


def test_max_over_runs_gives_a_sweep_one_unbatched_loop_bound():
  """Inside the sweep's vmap the bound is the runs' maximum, unbatched: the
  loop's predicate is one scalar (a batched bound gives a predicate per
  run, which XLA runs as selects over the whole carry at every
  iteration). Outside a sweep it is the value itself."""
  from jaxcl import runs

  def count(n, use):
    bound = runs.max_over_runs(n) if use else n
    return jax.lax.fori_loop(0, bound, lambda i, c: c + 1, jnp.int32(0))

  n = jnp.array([1, 3, 2], jnp.int32)
  run = lambda use: jax.vmap(lambda x: count(x, use),
                             axis_name=runs.RUNS_AXIS)
  np.testing.assert_array_equal(run(True)(n), [3, 3, 3])
  np.testing.assert_array_equal(run(False)(n), [1, 3, 2])

  def predicate_shape(use):
    (loop,) = [e for e in jax.make_jaxpr(run(use))(n).eqns
               if e.primitive.name == "while"]
    return loop.params["cond_jaxpr"].out_avals[0].shape
  assert predicate_shape(True) == ()  # one loop for all runs
  assert predicate_shape(False) == (3,)  # a predicate per run
  assert int(count(jnp.int32(4), True)) == 4  # a single run


def test_in_sweep_is_true_only_under_the_sweeps_named_vmap():
  from jaxcl import runs
  seen = []

  def f(x):
    seen.append(runs.in_sweep())
    return x

  jax.vmap(f, axis_name=runs.RUNS_AXIS)(jnp.ones(2))
  jax.vmap(f)(jnp.ones(2))  # another vmap, not a sweep's
  jax.jit(f)(jnp.ones(2))
  assert seen == [True, False, False]


def test_per_task_keeps_its_one_task_shortcut_in_a_sweep():
  """In a sweep's vmap, masked.per_task's cond stays a cond (one call when
  every run's batch holds one task) and still routes a run's mixed batch
  correctly (the mixed branch then runs for all runs)."""
  from jaxcl import runs
  from jaxcl.models.masked import per_task
  w = jnp.arange(1.0, 4.0)  # task t's "weights": output x * w[t]
  fn = lambda x, task: per_task(lambda t: x * w[t], task, 3)
  x = jnp.ones((2, 4))
  one_task = jnp.array([[1, 1, 1, 1], [2, 2, 2, 2]])
  mixed = jnp.array([[1, 1, 1, 1], [0, 2, 1, 2]])
  sweep = jax.vmap(fn, axis_name=runs.RUNS_AXIS)
  for task in (one_task, mixed):
    np.testing.assert_allclose(sweep(x, task), w[task])
  prims = lambda f: {e.primitive.name
                     for e in jax.make_jaxpr(f)(x, one_task).eqns}
  assert "cond" in prims(sweep)
  assert "cond" not in prims(jax.vmap(fn))  # batched predicate: a select


def test_device_experience_pads_short_experiences_and_keeps_full_ones(
    digits):
  """A shorter experience is padded to the stream's largest; one that fills
  it (every experience of a permuted stream) is used as it is, uncopied."""
  # A task stream: experience 1's task ids are 1 (a domain stream's are
  # all 0, and the "task" check below would compare zeros with zeros).
  sc = scenarios.permuted(digits, 2, seed=0, kind="task")
  exp = sc.experiences[1]
  n = exp.num_train
  assert np.all(exp.train_task == 1)
  full = train.device_experience(exp, n)
  assert np.shares_memory(full["x"], exp.train_x)
  padded = train.device_experience(exp, n + 7)
  assert padded["x"].shape[0] == n + 7
  for k, src in (("x", exp.train_x), ("y", exp.train_y),
                 ("task", exp.train_task)):
    np.testing.assert_array_equal(full[k], src)
    np.testing.assert_array_equal(padded[k][:n], src)
    assert full[k].dtype == padded[k].dtype


@pytest.mark.parametrize("spec", ["ss_il+latent_replay", "latent_replay+ss_il",
                                  "ss_il+exstream", "exstream+ss_il"])
def test_chain_refuses_ss_il_beside_a_latent_freezer(spec):
  # Session 32 (docs/composition_fuzz.md): no new class was predicted at
  # the end of its experience, both orders, 3 seeds.
  from jaxcl import strategies
  other = [n for n in spec.split("+") if n != "ss_il"][0]
  with pytest.raises(ValueError, match=(
      f"ss_il scores every row by a softmax within one group of classes .* "
      f"{other} fixes the layers below its split")):
    strategies.from_spec(spec)
  # Its neighbours stay accepted: another replay beside each member.
  assert strategies.from_spec(f"{other}+replay")[0].name == f"{other}+replay"
  assert strategies.from_spec("ss_il+agem")[0].name == "ss_il+agem"


@pytest.mark.parametrize("spec,match", [
    ("aer_abs+hat", "hat masks only its own gradient"),
    ("hat+aer_abs", "hat masks only its own gradient"),
    ("cwr_star+aer_abs", "cwr_star writes a -1e9 bias"),
    ("aer_abs+cwr_star", "cwr_star writes a -1e9 bias"),
    ("ar1+aer_abs", "ar1 writes a -1e9 bias"),
    ("aer_abs+from_scratch", "aer_abs and from_scratch cannot be composed "
     "in this order: .* put from_scratch before aer_abs"),
    # Refused in both orders for ensemble's fresh members (since session
    # 54 that reason comes first: "put ensemble before aer_abs" was no
    # way out).
    ("aer_abs+ensemble", "ensemble trains a freshly initialised model per "
     "experience .* no new class was predicted"),
    ("ensemble+aer_abs", "ensemble trains a freshly initialised model per "
     "experience .* no new class was predicted"),
    ("aer_abs+expert_gate", "put expert_gate before aer_abs"),
    ("aer_abs+multihead", "restores that copy at the end of each "
     "forgetting epoch, so what multihead's before_experience"),
])
def test_chain_refuses_aer_abs_compositions_that_are_silently_wrong(
    spec, match):
  # Session 32's aer_abs pass (docs/composition_fuzz.md): hat's old tasks
  # drifted, cwr_star / ar1 and ensemble scored below either member alone,
  # and aer_abs's restore undid the before_experience write of a member
  # after it.
  from jaxcl import strategies
  with pytest.raises(ValueError, match=match):
    strategies.from_spec(spec)
  # The neighbours stay accepted: the writer before aer_abs (its copy then
  # holds the written weights), aer_abs beside another task-IL member, and
  # ensemble beside a replay whose loss is the full cross-entropy.
  for ok in ("from_scratch+aer_abs", "multihead+aer_abs",
             "expert_gate+aer_abs", "aer_abs+packnet", "ensemble+replay"):
    assert strategies.from_spec(ok)[0].name == ok


@pytest.mark.parametrize("spec,match", [
    ("hat+cscct", "cscct runs the model in training mode on a model state "
     "it stored .* hat's embedding-gradient compensation"),
    ("cscct+hat", "cscct runs the model in training mode on a model state"),
    ("casper+hat", "casper runs the model in training mode on a model "
     "state"),
    ("hat+casper", "casper runs the model in training mode"),
    ("cscct+cumulative", "cumulative brings every earlier experience's "
     "classes again"),
    ("cumulative+cscct", "cscct works on each experience's new classes "
     r"\(CSCCT distils their features"),
    ("cscct+eeil", "cscct and eeil cannot be composed in this order: .* "
     "put eeil before cscct"),
    ("cscct+packnet", "put packnet before cscct"),
    ("cscct+progress_compress", "put progress_compress before cscct"),
    # puridiver: its buffer fitting writes the weights at the end; its
    # step is replay's, so replay's refusals by analogy.
    ("cscct+puridiver", "put puridiver before cscct"),
    ("hat+puridiver", "hat masks only its own gradient"),
    ("scr+puridiver", "put puridiver before scr"),
    ("ar1+puridiver", "ar1 writes a -1e9 bias"),
    ("puridiver+ss_il", "ss_il scores the rows after the incoming ones"),
    # The puridiver pass: cope's prototypes against the refitted outputs,
    # and the fitting moving a frozen part (the saver-first order is
    # refused as a copy before an end write).
    ("cope+puridiver", "cope trains the model's outputs as an embedding"),
    ("puridiver+cope", "cope trains the model's outputs as an embedding"),
    ("puridiver+lfl", "lfl keeps part of the model fixed .* puridiver's "
     "buffer fitting"),
    ("puridiver+freezing", "freezing keeps part of the model fixed"),
    ("puridiver+latent_replay", "latent_replay keeps part of the model "
     "fixed"),
    ("puridiver+exstream", "exstream keeps part of the model fixed"),
])
def test_chain_refuses_cscct_compositions_that_are_silently_wrong(
    spec, match):
  # Session 33's cscct pass (docs/composition_fuzz.md): hat's new tasks
  # were not learned beside a member that runs hat_mlp on a stored model
  # state; cumulative stopped the run at the second experience; cscct's
  # teacher missed the weights a later member writes at an experience's
  # end.
  from jaxcl import strategies
  with pytest.raises(ValueError, match=match):
    strategies.from_spec(spec)
  # The neighbours stay accepted: the end writer before cscct, and cscct
  # or casper beside a replay member.
  for ok in ("eeil+cscct", "packnet+cscct", "progress_compress+cscct",
             "cscct+er_ace", "casper+er_ace", "hat+si", "puridiver+cscct",
             "puridiver+scr"):
    assert strategies.from_spec(ok)[0].name == ok


@pytest.mark.parametrize("spec", [
    "lwf+eeil", "ewc+packnet", "mas+progress_compress", "icarl+puridiver",
    "xder+eeil", "generative_replay+packnet", "eeil+puridiver",
    "latent_replay+packnet", "er_tricks+puridiver", "freezing+eeil",
    "ser+wa", "lwf+wa", "lwf+slca", "ewc+slca", "feature_replay+puridiver",
    "feature_distillation+eeil", "wa+puridiver"])
def test_chain_refuses_a_copy_taken_before_an_end_of_experience_write(spec):
  # Session 33's probe (docs/composition_fuzz.md): the member's copy of
  # the model (teacher, anchor, stored logits / latents / statistics)
  # missed the writer's write by 0.009-0.70; 0 with the writer first.
  # WA's alignment (session 53) scales the new classes' weights by its
  # gamma (0.91-0.99 from experience 2 on, docs/notes_hybrid.md); SLCA's
  # classifier alignment (session 54) moved lwf's teacher off the final
  # weights by 2.3-5.4. feature_replay's stored features,
  # feature_distillation's frozen copy and wa's teacher: savers found by
  # session 54's audit (tests/test_hook_writes.py).
  from jaxcl import strategies
  saver, writer = spec.split("+")
  with pytest.raises(ValueError, match=(
      f"{saver} and {writer} cannot be composed in this order: {saver} "
      f"keeps a copy of the model.* put {writer} before {saver}")):
    strategies.from_spec(spec)


@pytest.mark.parametrize("spec", [
    "eeil+lwf", "packnet+ewc", "progress_compress+mas", "puridiver+eeil",
    "packnet+generative_replay", "si+eeil", "aer_abs+packnet",
    "rpc+puridiver", "wa+ser", "wa+lwf", "slca+lwf", "slca+ewc",
    "puridiver+feature_replay", "eeil+feature_distillation", "si+slca"])
def test_writer_first_and_immune_savers_are_accepted(spec):
  # The writer first, or a member that takes its copy in before_experience
  # (si's anchor, aer_abs's) or never from the weights (rpc's memory).
  from jaxcl import strategies
  assert strategies.from_spec(spec)[0].name == spec


def test_scale_updates_scales_the_optimisers_step_and_the_lookahead(digits):
  """``scale_updates`` multiplies the optimiser's update, not the gradient:
  under Adam (invariant to a gradient scale) the step is exactly the scale
  times the plain one while the moments are the plain ones; a chain applies
  its members' scales in turn, and a look-ahead penalty is taken at the
  scaled step."""
  ctx, batch = _ctx_and_first_batch(digits, quick_config(**{
      "optimizer.name": "adam", "optimizer.learning_rate": 1e-3}))

  def scaler(f, name):
    return Strategy(scale_updates=lambda ctx, ss, u: jax.tree.map(
        lambda a: f * a, u), name=name)

  # A look-ahead penalty linear in the weights: its value at θ + s·Δθ
  # reads s·⟨c, Δθ⟩ off the step's loss.
  coef = jax.tree.map(lambda p: jnp.full_like(p, 1e-2),
                      train.init_state(ctx, Strategy(), 0).params)
  looker = Strategy(lookahead_loss=lambda ctx, ss, p, b: sum(
      jnp.vdot(a, w) for a, w in zip(jax.tree.leaves(coef),
                                     jax.tree.leaves(p))), name="looker")

  def step(strategy):
    state = train.init_state(ctx, strategy, 0)
    new, loss = jax.jit(lambda st: train.train_step(ctx, strategy, st,
                                                    batch))(state)
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                         new.params, state.params)
    return delta, new.opt_state, float(loss)

  plain, opt_plain, _ = step(Strategy())
  for strategy, f in ((scaler(0.25, "q"), 0.25),
                      (chain(scaler(0.5, "h1"), scaler(3.0, "h2")), 1.5)):
    delta, opt, _ = step(strategy)
    for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(plain)):
      assert np.abs(b).max() > 1e-5
      np.testing.assert_allclose(a, f * b, rtol=1e-3, atol=1e-8)
    for a, b in zip(jax.tree.leaves(opt), jax.tree.leaves(opt_plain)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, _, full = step(looker)
  _, _, none = step(chain(scaler(0.0, "z"), looker))
  _, _, half = step(chain(scaler(0.5, "h"), looker))
  assert abs(full - none) > 1e-4
  np.testing.assert_allclose(half - none, 0.5 * (full - none), rtol=1e-2)


def test_a_precomputed_batch_table_trains_the_same_steps():
  """The loop computes an epoch's batch table once (``order_fn``) and
  passes it as ``data['order']`` when the epoch runs in several chunks;
  a chunk given it trains exactly as one that draws it itself, for one
  run and for a sweep whose runs have their own data and keys."""
  import dataclasses as dc

  from jaxcl import experiment
  s = experiment.setup(quick_config(**{"checkpoint.every_steps": 5}))
  exp = s.scenario.experiences[1]
  for members in (0, 2):
    learner = s.learner if not members else dc.replace(
        s.learner, members=2, member_data=True)
    states = [experiment.initial_state(s, seed) for seed in (0, 1)]
    state = states[0] if not members else experiment._stack(states)
    data = train.device_experience(exp, learner.ctx.info.train_size)
    if members:
      data = train.stacked_experiences([exp, exp],
                                       learner.ctx.info.train_size)
    order = learner.order_fn(state.rng, 1, 0, exp.num_train)
    # Another epoch's table is another order.
    other = learner.order_fn(state.rng, 1, 1, exp.num_train)
    assert order.shape[-2:] == (learner.epoch_steps + 5, 16)
    # (chunk_fn donates the state it is given: one copy per call.)
    copies = [jax.tree.map(jnp.copy, state) for _ in range(2)]
    a, la, _ = learner.chunk_fn(state, data, exp.num_train, 1, 0, 10)
    b, lb, _ = learner.chunk_fn(copies[0], {**data, "order": order},
                                exp.num_train, 1, 0, 10)
    np.testing.assert_array_equal(la, lb)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
    # The table given is really the one used.
    _, lc, _ = learner.chunk_fn(copies[1], {**data, "order": other},
                                exp.num_train, 1, 0, 10)
    assert not np.array_equal(lb, lc)
