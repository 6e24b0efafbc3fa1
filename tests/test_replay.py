"""Mechanism tests of the replay strategies (on scikit-learn digits)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import np_log_softmax, np_softmax, slow_beyond
from jaxcl import buffers, experiment, models, scenarios, train
from jaxcl.state import StepInfo, cross_entropy
from jaxcl.strategy import chain
from jaxcl.strategies import exstream as exs
from jaxcl.strategies.der import der, logit_mse
from jaxcl.strategies.derpp import derpp
from jaxcl.strategies.er_ace import ace_logits, er_ace
from jaxcl.strategies.er_aml import er_aml, sample_pos_neg, sup_con_loss
from jaxcl.strategies import gss as gss_mod
from jaxcl.strategies.gss import gss
from jaxcl.strategies import latent_replay as lat
from jaxcl.strategies.exstream import exstream
from jaxcl.augment import random_crop
from jaxcl.strategies.gdumb import gdumb, retrain, sgdr_epoch_lr
from jaxcl.strategies.generative_replay import generative_replay
from jaxcl.strategies.latent_replay import latent_replay
from jaxcl.strategies.mir import mir, retrieve
from jaxcl.strategies.naive import naive
from jaxcl.strategies.replay import replay

B = 10


def make_ctx(sc, widths=(32,), lr=0.1, model="mlp", opt="sgd",
             **model_kwargs):
  """A context for an MLP (or the model ``model``) on ``sc`` with SGD (or
  the optimiser ``opt``); shared by other test files: test_hybrid,
  test_scr and the replay families import it."""
  info = train.stream_info(sc, B)
  if widths is not None:  # None: a model without layer widths (a ResNet)
    model_kwargs = {"widths": widths, **model_kwargs}
  net = models.build(model, sc.num_classes, **model_kwargs)
  return train.make_context(net, train.make_optimizer(opt, lr), info)


def jit_ctx(f):
  """``f(ctx, ...)`` compiled with ``ctx`` static. A hook or reference
  called eagerly dispatches (and compiles) each operation on its own; one
  compiled program is several times cheaper (test time)."""
  return jax.jit(f, static_argnums=0)


def logits_fn(ctx):
  """``ctx.logits(params, model_state, x, task, train=True)`` compiled."""
  return jax.jit(lambda p, ms, x, t: ctx.logits(p, ms, x, t, train=True))


# MIR's retrieval compiled (see jit_ctx).
mir_retrieve = jax.jit(retrieve, static_argnums=0,
                       static_argnames=("lr", "candidates", "k"))


def batch_of(exp, n=B, start=0):
  sl = slice(start, start + n)
  return {"x": jnp.asarray(exp.train_x[sl]), "y": jnp.asarray(exp.train_y[sl]),
          "task": jnp.asarray(exp.train_task[sl]),
          "mask": jnp.ones((n,), jnp.float32)}


def after_first(ctx, s, stream, steps, n=B):
  """The state after training experience 0 for ``steps`` batches of ``n``
  rows and its end, then the start of experience 1; and the jitted step."""
  e0, e1 = stream.experiences[:2]
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  for i in range(steps):
    state = step(state, batch_of(e0, n=n,
                                 start=(n * i) % (len(e0.train_y) - n)))
  state = s.after_experience(ctx, state, e0)
  return s.before_experience(ctx, state, e1), step


def assert_steps_as_naive(ctx, s, state, exp, steps=3):
  """Trains ``state`` (strategy ``s``, its experience started) and a
  Naive state from the same seed for ``steps`` batches of ``exp``;
  asserts the losses and the parameters equal bit for bit; returns
  ``s``'s state (for a strategy whose first experience is Naive's)."""
  n = naive()
  ref = train.init_state(ctx, n, 0)
  step_s = jax.jit(lambda st, b: train.train_step(ctx, s, st, b))
  step_n = jax.jit(lambda st, b: train.train_step(ctx, n, st, b))
  for i in range(steps):
    b = batch_of(exp, start=B * i)
    state, loss_s = step_s(state, b)
    ref, loss_n = step_n(ref, b)
    assert float(loss_s) == float(loss_n)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return state


def config(spec, *, widths=(32,), lr=None, **kwargs):
  """A small run's config: ``spec`` with each member's settings in
  ``kwargs`` (by member name), one epoch of batches of ``B``; ``lr`` None
  keeps the default config's rate."""
  c = experiment.default_config()
  c.model.widths = widths
  c.train.epochs = 1
  c.train.batch_size = B
  c.train.eval_batch_size = 100
  if lr is not None:
    c.optimizer.learning_rate = lr
  c.report.progress = False
  c.strategy.name = spec
  for name, kw in kwargs.items():
    c.strategy[name] = kw
  return c


def cut(exp, n):
  """``exp`` with its first ``n`` training examples only: in a stream of
  longer experiences, its rows are then mostly padding."""
  return dataclasses.replace(
      exp, train_y=exp.train_y[:n], train_task=exp.train_task[:n],
      inputs=scenarios.given(exp.train_x[:n], exp.test_x))


def run_capture(monkeypatch, cfg, sc):
  """Runs ``cfg`` on ``sc``; returns the result and its learner."""
  del monkeypatch
  result = experiment.run(cfg, scenario=sc)
  return result, result.learner


# ---------------------------------------------------------------------------
# Every strategy: chained with another, two experiences, no recompilation.

CHAINS = [
    # Strategies in one program: each member's hooks run on its slot.
    # (latent_replay and exstream both write the replayed latents, and gdumb
    # discards what other members train, so chain() refuses those pairs.)
    ("replay+mir+latent_replay", dict(
        replay=dict(mem_size=50), mir=dict(mem_size=60, candidates=20),
        latent_replay=dict(mem_size=50))),
    ("exstream+si", dict(exstream=dict(mem_size=50))),
    ("gdumb+naive", dict(gdumb=dict(mem_size=40, epochs=2))),
    ("generative_replay+si", dict(
        generative_replay=dict(hidden=(32,), latent=8))),
    # DER leaves the training rows alone, so it follows a member that
    # appends some.
    ("replay+derpp", dict(replay=dict(mem_size=50),
                          derpp=dict(mem_size=40, batch_size=8))),
    # ER-ACE's replay term counts every appended row, its own and others'.
    ("mir+er_ace", dict(mir=dict(mem_size=60, candidates=20),
                        er_ace=dict(mem_size=50))),
]


def check_latent_memory(mem, params, sc):
  """Memory entries are the lower network's activations of their
  experience's examples, under the *final* parameters: entries stored after
  experience 0 still match, so the lower part was frozen afterwards."""
  ctx = make_ctx(sc)
  sp = lat.split_model(ctx, "backbone")
  np.testing.assert_array_equal(buffers.counts(mem, 2, by="experience"),
                                [25, 25])
  valid = np.asarray(mem.valid)
  for e, exp in enumerate(sc.experiences):
    h = np.asarray(sp.lower(ctx, params, {}, jnp.asarray(exp.train_x),
                            jnp.zeros(exp.num_train, jnp.int32)))
    rows = np.asarray(mem.x)[valid & (np.asarray(mem.experience) == e)]
    d = ((rows[:, None, :] - h[None]) ** 2).sum(-1).min(1)
    np.testing.assert_allclose(d, 0.0, atol=1e-8)
    ys = np.asarray(mem.y)[valid & (np.asarray(mem.experience) == e)]
    assert set(ys) <= set(exp.classes)


@pytest.mark.parametrize("spec,kwargs", CHAINS, ids=[c[0] for c in CHAINS])
def test_chained_run_compiles_once(monkeypatch, stream, spec, kwargs):
  result, learner = run_capture(monkeypatch, config(spec, **kwargs), stream)
  assert learner.chunk_fn._cache_size() == 1
  assert np.all(np.isfinite(result.accuracy))
  # After two experiences the first one is not entirely forgotten.
  assert result.accuracy[1, 0] > 0.3, result.accuracy
  ss = result.state.strategy
  names = spec.split("+")
  assert len(ss) == len(names)
  total = sum(e.num_train for e in stream.experiences)
  for name, sub in zip(names, ss):
    if name in ("replay", "mir", "derpp", "er_ace"):  # reservoirs saw it
      assert int(sub.memory.seen) == total
    if name == "gdumb":                  # class-balanced, full
      np.testing.assert_array_equal(buffers.counts(sub.memory, 10)[:4],
                                    [10] * 4)
    if name == "latent_replay":
      check_latent_memory(sub.memory, result.state.params, stream)
    if name == "exstream":               # every example in some centroid
      n = np.asarray(sub.buffers.n)
      for exp in stream.experiences:
        for c in exp.classes:
          assert n[c].sum() == (exp.train_y == c).sum()
      assert n[4:].sum() == 0
    if name == "generative_replay":      # snapshots taken, classes seen
      np.testing.assert_array_equal(np.flatnonzero(sub.seen), [0, 1, 2, 3])


# ---------------------------------------------------------------------------
# Replay.


def test_replay_masks_empty_memory_then_replays_stored_examples(stream,
                                                                digits):
  ctx = make_ctx(stream)
  s = replay(mem_size=20, batch_size=5)
  ss = s.init(ctx, jax.random.PRNGKey(0), None)
  # Rows of task 1 (a task-incremental split: a class-incremental one's
  # task ids are all 0, so a dropped task id would go unseen), the last 5
  # masked out (padding): those are not stored.
  exp = scenarios.split(digits, 5, kind="task").experiences[1]
  batch = dict(batch_of(exp), mask=jnp.asarray([1.] * 5 + [0.] * 5))
  prepared = s.prepare_batch(ctx, ss, batch, jax.random.PRNGKey(1))
  assert prepared["x"].shape[0] == B + 5
  np.testing.assert_array_equal(prepared["mask"], [1.] * 5 + [0.] * 10)
  np.testing.assert_array_equal(prepared["task"][:B], [1] * B)
  ss = s.after_step(ctx, ss, StepInfo(None, None, None, None, prepared,
                                      jnp.zeros(())))
  assert int(buffers.size(ss.memory)) == 5
  first = np.asarray(batch["x"]).reshape(B, -1)
  # Each replayed row is one of the stored (first batch's unmasked)
  # examples, with its label; drawn without replacement from the 5
  # stored, they are those 5, each once (at every draw: with replacement,
  # one draw in 26 would still be a permutation).
  for k in range(2, 6):
    prepared = s.prepare_batch(ctx, ss, batch_of(exp, start=B),
                               jax.random.PRNGKey(k))
    np.testing.assert_array_equal(prepared["mask"], [1.] * (B + 5))
    np.testing.assert_array_equal(prepared["task"], [1] * (B + 5))
    rep = np.asarray(prepared["x"][B:]).reshape(5, -1)
    hits = []
    for row, y in zip(rep, np.asarray(prepared["y"][B:])):
      j = np.flatnonzero(np.all(first == row, axis=1))
      assert j.size and np.asarray(batch["y"])[j[0]] == y
      hits.append(j[0])
    assert sorted(hits) == [0, 1, 2, 3, 4], (k, hits)


def test_replay_reservoir_sees_whole_stream(monkeypatch, stream):
  # Online, batch size 1 (one incoming + one replayed example per step).
  cfg = config("replay", replay=dict(mem_size=40))
  cfg.scenario.online = True
  cfg.train.batch_size = 1
  result, _ = run_capture(monkeypatch, cfg, scenarios.online(stream))
  mem = result.state.strategy.memory
  total = sum(e.num_train for e in stream.experiences)
  assert int(mem.seen) == total
  assert int(buffers.size(mem)) == 40
  assert set(np.asarray(mem.experience)) == {0, 1}
  assert set(np.asarray(mem.y)) <= {0, 1, 2, 3}
  assert result.accuracy[1, 0] > 0.3   # experience 0 not forgotten


@pytest.mark.parametrize("spec", ["replay", "mir", "derpp", "er_ace",
                                  "gss", "er_aml"])
def test_memory_is_updated_in_place_not_copied(stream, spec):
  """A step reads replayed rows from the memory and then writes the batch
  into it. Unless the writes depend on the reads, XLA copies the whole
  memory twice per step (a third of a batch-10 Replay step on a CPU); the
  compiled training loop must hold no copy of the memory's examples (nor,
  for DER, of its stored logits)."""
  kw = dict(mir=dict(mem_size=40, candidates=20)).get(spec,
                                                       dict(mem_size=40))
  cfg = config(spec, **{spec: kw})
  s = experiment.setup(cfg, stream)
  learner = s.learner
  state = experiment.initial_state(s, 0)
  exp = stream.experiences[0]
  data = jax.device_put(train.device_experience(exp,
                                                learner.ctx.info.train_size))
  hlo = learner.chunk_fn.lower(state, data, exp.num_train, 0, 0,
                               0).compile().as_text()
  arrays = ["f32[40,8,8,1]"] + (["f32[40,10]"] if spec == "derpp" else [])
  for memory in arrays:
    assert memory in hlo  # the memory is in the program
    copies = [l for l in hlo.splitlines() if " copy(" in l
              and l.split("=", 1)[1].strip().startswith(memory)]
    assert not copies, copies


def test_replay_experience_policy_quota(monkeypatch, full_stream):
  # The first experience cut to 30 examples: padded to the stream's
  # largest (272 rows), it is mostly padding, which must not be stored.
  sc = dataclasses.replace(full_stream, experiences=(
      cut(full_stream.experiences[0], 30),) + full_stream.experiences[1:])
  result, _ = run_capture(
      monkeypatch, config("replay", replay=dict(mem_size=52,
                                                policy="experience")),
      sc)
  mem = result.state.strategy.memory
  cnt = np.asarray(buffers.counts(mem, 5, by="experience"))
  np.testing.assert_array_equal(cnt, [52 // 5] * 5)
  # Entries of experience e are e's examples, with their labels.
  for e, exp in enumerate(sc.experiences):
    at = np.asarray(mem.valid) & (np.asarray(mem.experience) == e)
    xs = np.asarray(mem.x)[at].reshape(at.sum(), -1)
    d = ((xs[:, None] - exp.train_x.reshape(exp.num_train, -1)[None]) ** 2
         ).sum(-1)
    np.testing.assert_array_equal(d.min(1), 0.0)
    np.testing.assert_array_equal(np.asarray(mem.y)[at],
                                  exp.train_y[d.argmin(1)])


def test_replay_bad_inputs(stream):
  with pytest.raises(ValueError, match="batch_size=30 is larger than the "
                     "memory capacity mem_size=20"):
    replay(mem_size=20, batch_size=30)
  replay(mem_size=20, batch_size=20)   # the whole memory may be replayed
  with pytest.raises(ValueError, match="unknown replay policy 'fifo'"):
    replay(policy="fifo")
  with pytest.raises(ValueError, match="mem_size must be a positive int"):
    replay(mem_size=0)
  ctx = make_ctx(stream)   # training batch 10 > memory 5
  with pytest.raises(ValueError, match="larger than the memory capacity"):
    replay(mem_size=5).init(ctx, jax.random.PRNGKey(0), None)


# ---------------------------------------------------------------------------
# DER / DER++.


def der_step(ctx, s, state, batch):
  """One training step of ``s``; returns the new state, the loss and the
  prepared batch the step used (its memory rows: ``prepare_batch`` again
  with the key ``train.train_step`` derives for it, so this follows that
  derivation)."""
  key = jax.random.fold_in(state.rng, state.step)
  prepared = s.prepare_batch(ctx, state.strategy, batch,
                             jax.random.split(key, 3)[0])
  new, loss = train.train_step(ctx, s, state, batch)
  return new, loss, prepared


def test_der_stores_step_logits_and_matches_them(stream):
  ctx = make_ctx(stream)
  alpha, beta = 0.7, 0.4
  s = derpp(mem_size=30, alpha=alpha, beta=beta, batch_size=6)
  state = train.init_state(ctx, s, 0)
  exp = stream.experiences[0]
  fwd = logits_fn(ctx)
  logits = lambda p, x, t: np.asarray(fwd(p, {}, x, t))
  ce_ = jax.jit(lambda p, b: cross_entropy(
      ctx.logits(p, {}, b["x"], b["task"], train=True), b["y"], b["mask"]))
  ce = lambda p, b: float(ce_(p, b))
  step = jax.jit(lambda st, b: der_step(ctx, s, st, b))
  # Empty memory: both replay terms are 0, the loss is the batch's CE.
  b1 = batch_of(exp)
  state2, loss, prepared = step(state, b1)
  assert not np.asarray(prepared["derpp_ok"]).any()
  np.testing.assert_allclose(float(loss), ce(state.params, b1), rtol=1e-5)
  # The memory holds the batch with the logits of the step's forward pass,
  # i.e. under the parameters *before* the update.
  ss = state2.strategy
  np.testing.assert_array_equal(np.asarray(ss.memory.valid),
                                [True] * B + [False] * 20)
  np.testing.assert_array_equal(np.asarray(ss.memory.y[:B]), b1["y"])
  np.testing.assert_allclose(np.asarray(ss.logits[:B]),
                             logits(state.params, b1["x"], b1["task"]),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(ss.logits[:B]),
                         logits(state2.params, b1["x"], b1["task"]))
  # Next step: CE(batch) + alpha * mean squared logit error on one memory
  # batch + beta * CE on another, each of the stored rows.
  b2 = batch_of(exp, start=B)
  state3, loss, prepared = step(state2, b2)
  ok, ok2 = (np.asarray(prepared[k]) for k in ("derpp_ok", "derpp_ok2"))
  assert ok.all() and ok2.all()   # 10 stored >= 6 drawn
  # The label term's rows are a second draw of their own, not the logit
  # term's rows again (one in 151200 ordered draws of 6 of 10 would be).
  assert not np.array_equal(np.asarray(prepared["derpp_x"]),
                            np.asarray(prepared["derpp_x2"]))
  x1, z1 = prepared["derpp_x"], np.asarray(prepared["derpp_z"])
  stored = np.asarray(ss.memory.x[:B]).reshape(B, -1)
  for row, z in zip(np.asarray(x1).reshape(6, -1), z1):
    j = np.flatnonzero(np.all(stored == row, axis=1))
    assert j.size == 1
    np.testing.assert_array_equal(z, np.asarray(ss.logits)[j[0]])
  p = state2.params
  mse = np.mean((logits(p, x1, prepared["derpp_task"]) - z1) ** 2)
  b_ce = {"x": prepared["derpp_x2"], "y": prepared["derpp_y2"],
          "task": prepared["derpp_task2"], "mask": jnp.ones(6)}
  want = ce(p, b2) + alpha * mse + beta * ce(p, b_ce)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert int(state3.strategy.memory.seen) == 2 * B


def test_der_logit_mse_by_hand():
  """The squared error averaged over the valid rows and the logits; a
  padding row (drawn from a memory holding fewer entries than the replay
  batch) counts in neither. (A step's empty memory does not show this:
  its zero inputs give a fresh MLP zero logits, as stored.)"""
  rng = np.random.default_rng(0)
  out, z = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
  ok = np.array([1.0, 1.0, 1.0, 0.0])   # the last row is padding
  want = np.mean((out[:3] - z[:3]) ** 2)
  got = jax.jit(logit_mse)(jnp.asarray(out), jnp.asarray(z), jnp.asarray(ok))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # No valid row: 0, not a division by zero.
  assert float(jax.jit(logit_mse)(jnp.asarray(out), jnp.asarray(z),
                                  jnp.zeros(4))) == 0.0


def test_der_after_a_member_that_appends_rows_stores_the_incoming_ones(
    stream):
  """Behind replay, the step's logits have the appended rows after the
  stream's: DER stores the incoming rows with the logits of *those* rows
  (the first ones), not of the replayed rows."""
  ctx = make_ctx(stream)
  s = chain(replay(mem_size=20, batch_size=5), der(mem_size=30))
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  exp = stream.experiences[0]
  state = step(train.init_state(ctx, s, 0), batch_of(exp))
  b2 = batch_of(exp, start=B)   # 5 replayed rows appended to these 10
  new = step(state, b2)
  ss = new.strategy[1]
  # 20 seen of 30 slots: the second batch fills slots 10-19 in order.
  np.testing.assert_array_equal(np.asarray(ss.memory.x[B:2 * B]), b2["x"])
  want = np.asarray(logits_fn(ctx)(state.params, {}, b2["x"], b2["task"]))
  np.testing.assert_allclose(np.asarray(ss.logits[B:2 * B]), want,
                             rtol=1e-5, atol=1e-6)


def test_der_without_beta_is_derpp_without_its_label_term(stream):
  """DER's loss is DER++'s less the label term, on the same draw."""
  ctx = make_ctx(stream)
  exp = stream.experiences[0]
  base = train.init_state(ctx, der(mem_size=30, alpha=0.5), 0)
  st = jax.jit(lambda st, b: train.train_step(
      ctx, der(mem_size=30, alpha=0.5), st, b)[0])(base, batch_of(exp))
  b = batch_of(exp, start=B)
  key = jax.random.PRNGKey(3)
  out = {}
  for name, strat in (("der", der(mem_size=30, alpha=0.5)),
                      ("derpp", derpp(mem_size=30, alpha=0.5, beta=2.0))):
    prepared = jit_ctx(strat.prepare_batch)(ctx, st.strategy, b, key)
    out[name] = (prepared, float(jit_ctx(strat.loss)(
        ctx, st.strategy, st.params, prepared, None)))
  (pd, ld), (pp, lp) = out["der"], out["derpp"]
  assert "der_x2" not in pd
  lab = cross_entropy(logits_fn(ctx)(st.params, {}, pp["derpp_x2"],
                                     pp["derpp_task2"]),
                      pp["derpp_y2"], pp["derpp_ok2"])
  assert ld > 0
  # Same key, same first draw: the logit terms agree.
  np.testing.assert_array_equal(pd["der_x"], pp["derpp_x"])
  np.testing.assert_allclose(lp, ld + 2.0 * float(lab), rtol=1e-5)


def test_der_keeps_old_logits_on_split_digits(full_stream):
  """Matching stored logits slows forgetting: after the stream, DER's
  accuracy on the first experience is well above Naive's."""
  accs = {}
  for name, kw in (("naive", {}), ("der", dict(der=dict(mem_size=100,
                                                        alpha=1.0)))):
    cfg = config(name, **kw)
    cfg.train.epochs = 2
    accs[name] = experiment.run(cfg, scenario=full_stream).accuracy
  assert accs["naive"][-1, 0] < 0.1, accs["naive"]
  assert accs["der"][-1, 0] > 0.3, accs["der"]


def test_der_bad_inputs(stream):
  for kw, match in (({"alpha": -0.1}, "der: alpha must be a finite number "
                     ">= 0, got -0.1"),
                    ({"alpha": float("nan")}, "der: alpha must be a finite"),
                    ({"mem_size": 0}, "der: mem_size must be a positive "
                     "int, got 0"),
                    ({"batch_size": 2.5}, "der: batch_size must be an int "
                     ">= 0 \\(0: the training batch size\\), got 2.5")):
    with pytest.raises(ValueError, match=match):
      der(**kw)
  with pytest.raises(ValueError, match="derpp: beta must be a finite number "
                     "> 0, got 0"):
    derpp(beta=0)
  with pytest.raises(ValueError, match="derpp: beta must be a finite number "
                     "> 0, got -1"):
    derpp(beta=-1)
  ctx = make_ctx(stream)   # training batch 10 > memory 5
  params = train.init_variables(ctx, jax.random.PRNGKey(0))[0]
  with pytest.raises(ValueError, match="der: batch_size=10 is larger than "
                     "the memory capacity mem_size=5"):
    der(mem_size=5).init(ctx, jax.random.PRNGKey(0), params)
  with pytest.raises(ValueError, match="batch_size=30 is larger"):
    derpp(mem_size=20, batch_size=30).init(ctx, jax.random.PRNGKey(0),
                                           params)


# ---------------------------------------------------------------------------
# ER-ACE.


def ace_state(ctx, s, exp, experience, seen):
  """An ER-ACE state whose memory holds ``exp``'s first 20 examples."""
  ss = s.init(ctx, jax.random.PRNGKey(0), None)
  b = batch_of(exp, n=20)
  mem = buffers.reservoir_add(ss.memory, jax.random.PRNGKey(1), b["x"],
                              b["y"], b["task"], 0)
  seen = np.isin(np.arange(ctx.info.num_classes), seen)
  return ss._replace(memory=mem, seen=jnp.asarray(seen),
                     experience=jnp.asarray(experience, jnp.int32))


def log_softmax_over(z, classes):
  return np_log_softmax(np.asarray(z, np.float64)[:, classes])


def test_er_ace_loss_is_hand_computed_and_spares_old_logits(stream):
  """From the second experience: the incoming rows' cross-entropy runs over
  the classes of the batch and the unseen ones only, the replayed rows'
  over all classes, and the two means are summed. The incoming term's
  gradient leaves every absent old class's output untouched; the replay
  term's does not."""
  ctx = make_ctx(stream)
  s = er_ace(mem_size=30, batch_size=6)
  e0, e1 = stream.experiences
  ss = ace_state(ctx, s, e0, 1, e0.classes)
  params = train.init_state(ctx, s, 0).params
  batch = batch_of(e1)
  prepared = jit_ctx(s.prepare_batch)(ctx, ss, batch, jax.random.PRNGKey(2))
  assert prepared["x"].shape[0] == B + 6
  np.testing.assert_array_equal(prepared["mask"], np.ones(B + 6))
  assert set(np.asarray(prepared["y"][B:])) <= set(e0.classes)
  z = np.asarray(logits_fn(ctx)(params, {}, prepared["x"], prepared["task"]))
  y = np.asarray(prepared["y"])
  # Incoming classes {2, 3}; unseen {4..9}; old {0, 1} are left out.
  allowed = [c for c in range(10) if c not in e0.classes]
  col = {c: i for i, c in enumerate(allowed)}
  inc = -np.mean([log_softmax_over(z[i:i + 1], allowed)[0, col[y[i]]]
                  for i in range(B)])
  rep = -np.mean([log_softmax_over(z[i:i + 1], list(range(10)))[0, y[i]]
                  for i in range(B, B + 6)])
  got = jit_ctx(s.task_loss)(ctx, ss, jnp.asarray(z), prepared)
  np.testing.assert_allclose(float(got), inc + rep, rtol=1e-5)

  @jax.jit
  def bias_grad(sub):
    lose = lambda p: s.task_loss(ctx, ss, ctx.logits(p, {}, sub["x"],
                                                     sub["task"], train=True),
                                 sub)
    return jax.grad(lose)(params)["head"]["bias"]

  def grad_of(rows):
    return np.asarray(bias_grad({k: v[rows] for k, v in prepared.items()}))

  g_inc = grad_of(slice(0, B))   # no appended rows: the incoming term only
  np.testing.assert_array_equal(g_inc[list(e0.classes)], 0.0)
  assert np.abs(g_inc[allowed]).max() > 1e-3
  assert np.abs(grad_of(slice(None))[list(e0.classes)]).max() > 1e-3
  # Class 9 seen too (in neither batch): left out of the incoming term
  # only; the replayed rows are still scored among all ten classes.
  ss9 = ss._replace(seen=ss.seen.at[9].set(True))
  allowed9 = [c for c in allowed if c != 9]
  col9 = {c: i for i, c in enumerate(allowed9)}
  inc9 = -np.mean([log_softmax_over(z[i:i + 1], allowed9)[0, col9[y[i]]]
                   for i in range(B)])
  assert 9 not in set(y)
  np.testing.assert_allclose(
      float(jit_ctx(s.task_loss)(ctx, ss9, jnp.asarray(z), prepared)),
      inc9 + rep, rtol=1e-5)


def test_er_ace_first_experience_is_plain_cross_entropy(stream):
  """During the first experience nothing is masked and nothing replayed,
  though the reservoir already holds examples."""
  ctx = make_ctx(stream)
  s = er_ace(mem_size=30)
  e0 = stream.experiences[0]
  ss = ace_state(ctx, s, e0, 0, e0.classes)
  params = train.init_state(ctx, s, 0).params
  prepared = s.prepare_batch(ctx, ss, batch_of(e0, start=20),
                             jax.random.PRNGKey(2))
  np.testing.assert_array_equal(prepared["mask"], [1.] * B + [0.] * B)
  z = ctx.logits(params, {}, prepared["x"], prepared["task"], train=True)
  np.testing.assert_allclose(
      float(s.task_loss(ctx, ss, z, prepared)),
      float(cross_entropy(z[:B], prepared["y"][:B], prepared["mask"][:B])),
      rtol=1e-6)
  # A batch of one class: the other (seen, absent) class is not masked.
  rows = np.flatnonzero(np.asarray(e0.train_y) == e0.classes[0])[20:20 + B]
  one = {"x": jnp.asarray(e0.train_x[rows]),
         "y": jnp.asarray(e0.train_y[rows]),
         "task": jnp.asarray(e0.train_task[rows]),
         "mask": jnp.ones((B,), jnp.float32)}
  prepared = s.prepare_batch(ctx, ss, one, jax.random.PRNGKey(2))
  z = ctx.logits(params, {}, prepared["x"], prepared["task"], train=True)
  zn, yn = np.asarray(z[:B], np.float64), np.asarray(one["y"])
  np.testing.assert_allclose(
      float(s.task_loss(ctx, ss, z, prepared)),
      -np.mean(np_log_softmax(zn)[np.arange(B), yn]), rtol=1e-5)


def test_ace_logits_masks_seen_classes_absent_from_the_batch():
  z = jnp.arange(12, dtype=jnp.float32).reshape(1, 12) * jnp.ones((3, 1))
  seen = jnp.asarray([True] * 4 + [False] * 6)      # 10 classes, 2 extra
  y, mask = jnp.asarray([2, 2, 3]), jnp.asarray([1., 1., 0.])
  out = np.asarray(ace_logits(z, y, mask, seen))
  # 3 is seen and only on a padded row: masked like 0 and 1; 2 (present),
  # 4-9 (unseen) and the two outputs beyond the classes are kept.
  keep = [2, 4, 5, 6, 7, 8, 9, 10, 11]
  np.testing.assert_array_equal(out[:, keep], np.asarray(z)[:, keep])
  np.testing.assert_array_equal(out[:, [0, 1, 3]], -1e9)


def test_er_ace_tracks_classes_and_fills_reservoir(stream):
  ctx = make_ctx(stream)
  s = er_ace(mem_size=15)
  ss = s.init(ctx, jax.random.PRNGKey(0), None)
  e0, e1 = stream.experiences
  b = batch_of(e1)
  b["mask"] = b["mask"].at[-3:].set(0.0)
  ss = s.after_step(ctx, ss, StepInfo(None, None, None, None, b,
                                      jnp.zeros(())))
  want = np.isin(np.arange(10), np.asarray(b["y"])[:B - 3])
  np.testing.assert_array_equal(np.asarray(ss.seen), want)
  assert int(ss.memory.seen) == B - 3
  # A later batch adds its classes to them: here its valid rows are of
  # one class of experience 0, its padded rows of the other.
  c0, c1 = e0.classes[:2]
  ey = np.asarray(e0.train_y)
  rows = np.r_[np.flatnonzero(ey == c0)[:B - 3], np.flatnonzero(ey == c1)[:3]]
  b0 = {"x": jnp.asarray(e0.train_x[rows]), "y": jnp.asarray(ey[rows]),
        "task": jnp.asarray(e0.train_task[rows]),
        "mask": jnp.asarray([1.0] * (B - 3) + [0.0] * 3)}
  ss = s.after_step(ctx, ss, StepInfo(None, None, None, None, b0,
                                      jnp.zeros(())))
  want[c0] = True
  np.testing.assert_array_equal(np.asarray(ss.seen), want)
  assert not want[c1] and want[list(e1.classes)].any()


@pytest.fixture(scope="module")
def replay_100(full_stream):
  """Replay's run on Split Digits with memory 100: the baseline that ER-ACE
  and ER-AML are compared with (run once for both)."""
  return experiment.run(config("replay", replay=dict(mem_size=100)),
                        scenario=full_stream)


def test_er_ace_keeps_old_classes_better_than_replay(full_stream,
                                                      replay_100):
  """Class-incremental Split Digits, same memory and replay batch: ER-ACE's
  accuracy on the four earlier experiences after the stream is well above
  Replay's (the incoming batches no longer push the old classes down)."""
  old = {"replay": replay_100.accuracy[-1, :-1]}
  cfg = config("er_ace", er_ace=dict(mem_size=100))
  old["er_ace"] = experiment.run(cfg, scenario=full_stream).accuracy[-1, :-1]
  assert old["er_ace"].mean() > old["replay"].mean() + 0.1, old


def test_er_ace_bad_inputs(stream):
  for kw, match in (({"mem_size": 0}, "er_ace: mem_size must be a positive "
                     "int, got 0"),
                    ({"batch_size": -1}, "er_ace: batch_size must be an int "
                     ">= 0 \\(0: the training batch size\\), got -1")):
    with pytest.raises(ValueError, match=match):
      er_ace(**kw)
  ctx = make_ctx(stream)   # training batch 10 > memory 5
  with pytest.raises(ValueError, match="er_ace: batch_size=10 is larger "
                     "than the memory capacity mem_size=5"):
    er_ace(mem_size=5).init(ctx, jax.random.PRNGKey(0), None)


# ---------------------------------------------------------------------------
# GSS.



# ---------------------------------------------------------------------------
# ER-AML: positives / negatives from memory + batch, supervised contrast.


def test_er_aml_samples_valid_positives_and_negatives():
  # Candidates: 6 memory rows, then the 4 anchors themselves.
  y = jnp.asarray([2, 3, 2, 5])
  task = jnp.asarray([1, 1, 1, 1])
  ok = jnp.asarray([True, True, True, True])
  cy = jnp.asarray([0, 1, 2, 3, 3, 9] + [2, 3, 2, 5])
  ct = jnp.asarray([0, 0, 1, 1, 1, 0] + [1, 1, 1, 1])
  cok = jnp.asarray([True] * 5 + [False] + [True] * 4)
  drawn = {i: (set(), set()) for i in range(4)}
  for k in range(300):
    pos, neg, valid = sample_pos_neg(jax.random.PRNGKey(k), y, task, ok,
                                     cy, ct, cok, offset=6)
    np.testing.assert_array_equal(valid, [True, True, True, False])
    for i in range(3):
      drawn[i][0].add(int(pos[i]))
      drawn[i][1].add(int(neg[i]))
  # Anchor 0 (class 2): positives are the other class-2 rows (memory 2,
  # anchor 2 = candidate 8), never itself (6); negatives are the valid
  # same-task rows of other classes (3, 4, 7, 9), never another task's.
  assert drawn[0] == ({2, 8}, {3, 4, 7, 9})
  assert drawn[1] == ({3, 4}, {2, 6, 8, 9})
  assert drawn[2] == ({2, 6}, {3, 4, 7, 9})
  # Anchor 3 (class 5) has no positive: left out.


def np_sup_con(h, y, hp, yp, hn, yn, valid, t, tb):
  """The authors' sup_con_loss (``pclucas14/AML``) on the valid rows
  only: each anchor ``h`` twice, against its positive and its negative."""
  v = valid
  anchors = np.concatenate([h[v], h[v]])
  contrasts = np.concatenate([hp[v], hn[v]])
  ya, yc = np.concatenate([y[v], y[v]]), np.concatenate([yp[v], yn[v]])
  logits = anchors @ contrasts.T / t
  logits -= logits.max(1, keepdims=True)
  log_prob = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  mask = (ya[:, None] == yc[None, :]).astype(float)
  return -(t / tb) * ((mask * log_prob).sum(1) / mask.sum(1)).mean()


def test_er_aml_sup_con_loss_matches_the_authors_formula():
  rng = np.random.default_rng(4)
  n, t, tb = 5, 0.2, 0.07
  norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  h, hp, hn = (norm(rng.normal(size=(n, 8))) for _ in range(3))
  y = np.array([0, 1, 0, 2, 1])
  yp, yn = y.copy(), np.array([1, 0, 2, 0, 2])
  valid = np.array([True, True, False, True, True])
  want = np_sup_con(h, y, hp, yp, hn, yn, valid, t, tb)
  twice = np.concatenate([valid, valid])
  got = sup_con_loss(jnp.asarray(np.concatenate([h, h])),
                     jnp.asarray(np.concatenate([y, y])), jnp.asarray(twice),
                     jnp.asarray(np.concatenate([hp, hn])),
                     jnp.asarray(np.concatenate([yp, yn])),
                     jnp.asarray(twice), t, tb)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _aml_memory(ctx, s, stream):
  """ER-AML's initial state and a memory of 20 rows of experience 0 and 8
  of experience 1 (reservoir, 30 slots)."""
  e0, e1 = stream.experiences
  ss = s.init(ctx, jax.random.PRNGKey(0), None)
  mem = ss.memory
  for e, n, start in ((e0, 20, 0), (e1, 8, 50)):
    b = batch_of(e, n=n, start=start)
    mem = jax.jit(buffers.reservoir_add)(mem, jax.random.PRNGKey(start),
                                         b["x"], b["y"], b["task"],
                                         jnp.int32(e.index))
  return ss, mem


def test_er_aml_incoming_rows_train_features_only(stream):
  """From the second experience: the incoming rows' loss is the contrast of
  their features with drawn candidates (rows of the memory or the batch
  with the right labels), and its gradient never reaches the head; the
  replayed rows carry the cross-entropy. In the first experience the
  incoming rows take the plain cross-entropy and nothing is contrasted."""
  ctx = make_ctx(stream)
  s = er_aml(mem_size=30, batch_size=6)
  e0, e1 = stream.experiences
  ss, mem = _aml_memory(ctx, s, stream)
  ss = ss._replace(memory=mem, experience=jnp.ones((), jnp.int32))
  params = train.init_state(ctx, s, 0).params
  prepare, loss, task_loss = map(jit_ctx, (s.prepare_batch, s.loss,
                                           s.task_loss))
  fwd = logits_fn(ctx)
  prepared = prepare(ctx, ss, batch_of(e1), jax.random.PRNGKey(2))
  assert prepared["x"].shape[0] == B + 6
  valid = np.asarray(prepared["aml_valid"])
  assert valid.all()
  y = np.asarray(prepared["y"][:B])
  cand = np.concatenate([np.asarray(ss.memory.x)[np.asarray(ss.memory.valid)],
                         np.asarray(e1.train_x[:B])]).reshape(-1, 64)
  ax = np.asarray(prepared["aml_x"]).reshape(2 * B, -1)
  ay = np.asarray(prepared["aml_y"])
  np.testing.assert_array_equal(ay[:B], y)            # positives
  assert np.all(ay[B:] != y) and set(ay[B:]) <= {2, 3}  # same-task negatives
  for row in ax:  # every drawn row is a candidate's pixels
    assert np.any(np.all(np.isclose(cand, row), axis=1))
  feats = jax.jit(lambda x: ctx.apply(params, {}, x,
                                      jnp.zeros(len(x), jnp.int32),
                                      features=True)[0])
  f = lambda x: np.asarray(feats(jnp.asarray(x)), np.float64)
  norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  h, hc = norm(f(np.asarray(prepared["x"][:B]))), norm(f(ax))
  want = float(jax.jit(sup_con_loss, static_argnums=(6, 7))(
      jnp.asarray(np.concatenate([h, h])),
                            jnp.asarray(np.concatenate([y, y])),
                            jnp.ones(2 * B, bool), jnp.asarray(hc),
                            jnp.asarray(ay), jnp.ones(2 * B, bool),
                            0.2, 0.07))
  got = float(loss(ctx, ss, params, prepared, None))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  g = jax.jit(jax.grad(lambda p: s.loss(ctx, ss, p, prepared, None)))(params)
  np.testing.assert_array_equal(np.asarray(g["head"]["kernel"]), 0.0)
  assert np.abs(np.asarray(g["backbone"]["Dense_0"]["kernel"])).max() > 1e-4
  z = fwd(params, {}, prepared["x"], prepared["task"])
  np.testing.assert_allclose(
      float(task_loss(ctx, ss, z, prepared)),
      float(cross_entropy(z[B:], prepared["y"][B:], prepared["mask"][B:])),
      rtol=1e-6)
  # First experience: plain cross-entropy, no replay, no contrast.
  ss0 = ss._replace(experience=jnp.zeros((), jnp.int32))
  p0 = prepare(ctx, ss0, batch_of(e0, start=20), jax.random.PRNGKey(2))
  assert not np.asarray(p0["aml_valid"]).any()
  np.testing.assert_array_equal(p0["mask"][B:], 0.0)
  assert float(loss(ctx, ss0, params, p0, None)) == 0.0
  z0 = fwd(params, {}, p0["x"], p0["task"])
  np.testing.assert_allclose(
      float(task_loss(ctx, ss0, z0, p0)),
      float(cross_entropy(z0[:B], p0["y"][:B], p0["mask"][:B])), rtol=1e-6)


def test_er_aml_draws_skip_padding_and_emptied_slots(stream):
  """Padded incoming rows are no anchors, and what was drawn for them is
  no contrast; emptied memory slots (their rows still there) are never
  drawn; negatives also come from the memory's rows of the current
  experience (same task = same experience, not the task id)."""
  ctx = make_ctx(stream)
  s = er_aml(mem_size=30, batch_size=6)
  e0, e1 = stream.experiences
  ss, mem = _aml_memory(ctx, s, stream)
  flat = lambda a: np.asarray(a).reshape(len(a), -1)
  mx = flat(mem.x)
  e1_slots = np.flatnonzero(np.asarray(mem.experience) == 1)
  assert len(e1_slots) == 8
  gone = e1_slots[-2:]
  mem = mem._replace(valid=mem.valid.at[gone].set(False))
  ss = ss._replace(memory=mem, experience=jnp.ones((), jnp.int32))
  batch = batch_of(e1)
  batch["mask"] = batch["mask"].at[-2:].set(0.0)
  params = train.init_state(ctx, s, 0).params
  prepare = jit_ctx(s.prepare_batch)
  is_row = lambda rows, pool: np.array(
      [np.any(np.all(np.isclose(pool, r), axis=1)) for r in rows])
  neg_from_memory = 0
  for key in range(12):
    p = prepare(ctx, ss, batch, jax.random.PRNGKey(key))
    valid = np.asarray(p["aml_valid"])
    np.testing.assert_array_equal(valid, [True] * (B - 2) + [False] * 2)
    ax = flat(p["aml_x"])
    drawn = np.concatenate([ax[:B][valid], ax[B:][valid]])
    assert not is_row(drawn, mx[gone]).any()
    neg_from_memory += is_row(ax[B:][valid], mx[e1_slots[:-2]]).sum()
  assert neg_from_memory > 0
  # The loss: the authors' formula over the valid anchors only.
  feats = jax.jit(lambda x: ctx.apply(params, {}, x,
                                      jnp.zeros(len(x), jnp.int32),
                                      features=True)[0])
  norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  f = lambda x: norm(np.asarray(feats(jnp.asarray(x)), np.float64))
  h, hc = f(p["x"][:B]), f(p["aml_x"])
  y, ay = np.asarray(p["y"][:B]), np.asarray(p["aml_y"])
  want = np_sup_con(h, y, hc[:B], ay[:B], hc[B:], ay[B:], valid, 0.2, 0.07)
  got = float(jit_ctx(s.loss)(ctx, ss, params, p, None))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_er_aml_keeps_old_classes_better_than_replay(full_stream,
                                                      replay_100):
  """Class-incremental Split Digits, same memory and replay batch: ER-AML's
  accuracy on the four earlier experiences after the stream is well above
  Replay's (measured when written, seed 0: 0.870 against 0.543)."""
  old = {}
  for name in ("replay", "er_aml"):
    if name == "replay":
      r = replay_100
    else:
      r = experiment.run(config(name, **{name: dict(mem_size=100)}),
                         scenario=full_stream)
    assert r.learner.chunk_fn._cache_size() == 1
    old[name] = r.accuracy[-1, :-1]
  assert old["er_aml"].mean() > old["replay"].mean() + 0.15, old


def test_er_aml_bad_inputs(stream):
  for kw, match in (({"mem_size": 0}, "er_aml: mem_size must be a positive "
                     "int, got 0"),
                    ({"batch_size": -1}, "er_aml: batch_size must be an int "
                     ">= 0"),
                    ({"temperature": 0.0}, "er_aml: temperature must be"),
                    ({"base_temperature": -1.0},
                     "er_aml: base_temperature must be")):
    with pytest.raises(ValueError, match=match):
      er_aml(**kw)
  ctx = make_ctx(stream)
  with pytest.raises(ValueError, match="er_aml: batch_size=10 is larger "
                     "than the memory capacity mem_size=5"):
    er_aml(mem_size=5).init(ctx, jax.random.PRNGKey(0), None)


def brute_gram(ctx, params, x, y, task, groups):
  """The Gram matrix of the groups' gradients, each formed by jax.grad of
  its weighted loss (evaluation mode) and flattened."""
  def lose(p, w):
    z = ctx.logits(p, {}, x, task, train=False)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, y) * w)

  grad = jax.jit(jax.grad(lose))  # one program for every group
  flat = []
  for k in range(groups.shape[1]):
    g = grad(params, groups[:, k])
    flat.append(np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)]))
  flat = np.stack(flat).astype(np.float64)
  return flat @ flat.T


@pytest.mark.parametrize("path", ["factored", "per_example"])
def test_gss_gradient_gram_equals_formed_gradients(stream, monkeypatch,
                                                   path):
  ctx = make_ctx(stream, widths=(16, 12))
  params = train.init_state(ctx, gss(mem_size=20), 0).params
  exp = stream.experiences[0]
  b = batch_of(exp, n=7)
  groups = jnp.asarray(np.random.RandomState(0).rand(7, 4), jnp.float32)
  if path == "per_example":
    monkeypatch.setattr(gss_mod, "factored_calls", lambda *a: None)
  # A fresh function, traced here: the patched path is the one compiled.
  got = np.asarray(jax.jit(lambda *a: gss_mod.gradient_gram(ctx, params, {},
                                                            *a))(
      b["x"], b["y"], b["task"], groups))
  want = brute_gram(ctx, params, b["x"], b["y"], b["task"], groups)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


def test_gss_cosine_scores_by_hand():
  # Groups: 2 incoming rows, 3 drawn rows (the last invalid), the batch.
  v = np.array([[1., 0.], [0., 1.], [1., 1.], [-1., 0.], [1., 0.1],
                [2., 1.]])
  gram = jnp.asarray(v @ v.T)
  c_batch, c_rows = gss_mod.cosine_scores(gram, 2,
                                          jnp.asarray([True, True, False]))
  cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  # Row 0 (1, 0) against (1, 1) and (-1, 0); (1, 0.1), closest to it, is
  # not a valid draw.
  np.testing.assert_allclose(c_rows, [cos(v[0], v[2]) + 1,
                                      cos(v[1], v[2]) + 1], rtol=1e-6)
  np.testing.assert_allclose(c_batch, cos(v[5], v[2]) + 1, rtol=1e-6)
  c_batch, c_rows = gss_mod.cosine_scores(gram, 2, jnp.zeros(3, bool))
  np.testing.assert_allclose([c_batch, *c_rows], 0.1)  # empty memory


def test_gss_offers_fill_then_replace_by_score():
  scores = jnp.zeros(4)
  key = jax.random.PRNGKey(0)
  mask = jnp.asarray([1., 0., 1., 1., 1.] + [1.] * 5)
  rows = jnp.asarray([0.3, 0.2, 0.4, 0.5, 0.6] + [0.1] * 5)
  # Filling: rows take the free slots in order, with the batch's score;
  # the padded row is not offered. Once full, a batch scoring >= 1 (its
  # gradient agrees with some stored one) replaces nothing, though its
  # rows' own scores are low.
  slots, sc, seen = gss_mod.offer_slots(key, scores, jnp.asarray(0), mask,
                                        jnp.asarray(1.5), rows)
  np.testing.assert_array_equal(slots, [0, 4, 1, 2, 3] + [4] * 5)
  np.testing.assert_allclose(sc, [1.5] * 4)
  assert int(seen) == 9
  # Full, batch score < 1: slot j is replaced with probability
  # C_j / sum(C) * C_j / (C_j + c).
  c = 0.5
  sc = jnp.asarray([0.2, 0.6, 1.0, 1.8])
  keys = jax.random.split(jax.random.PRNGKey(1), 20000)
  one = lambda k: gss_mod.offer_slots(k, sc, jnp.asarray(9), jnp.ones(1),
                                      jnp.asarray(0.9), jnp.asarray([c]))[0][0]
  got = np.bincount(np.asarray(jax.vmap(one)(keys)), minlength=5) / 20000
  s = np.asarray(sc)
  want = s / s.sum() * s / (s + c)
  np.testing.assert_allclose(got[:4], want, atol=0.012)
  np.testing.assert_allclose(got[4], 1 - want.sum(), atol=0.012)
  # A replaced slot takes the row's own score.
  k = next(k for k in keys if int(one(k)) < 4)
  slot, after, _ = gss_mod.offer_slots(k, sc, jnp.asarray(9), jnp.ones(1),
                                       jnp.asarray(0.9), jnp.asarray([c]))
  want_scores = s.copy()
  want_scores[int(slot[0])] = c
  np.testing.assert_allclose(after, want_scores)
  # Just full (seen = K): the next row is offered for replacement (here
  # certain: C_j / (C_j + 0) = 1), not given a slot past the end.
  slot, _, _ = gss_mod.offer_slots(key, jnp.ones(4), jnp.asarray(4),
                                   jnp.ones(1), jnp.asarray(0.5),
                                   jnp.asarray([0.0]))
  assert int(slot[0]) < 4
  # One slot, several rows replacing it in turn: the last one is written.
  c_rows = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06], np.float32)
  slot, after, _ = gss_mod.offer_slots(
      jax.random.PRNGKey(3), jnp.ones(1), jnp.asarray(5), jnp.ones(6),
      jnp.asarray(0.5), jnp.asarray(c_rows))
  last = int(np.flatnonzero(np.isclose(c_rows, float(after[0])))[0])
  np.testing.assert_array_equal(slot, np.where(np.arange(6) == last, 0, 1))


def test_gss_after_step_scores_batch_against_drawn_entries(stream):
  """While the memory fills, the batch is stored with its score: one plus
  the largest cosine between its mean-loss gradient and the gradients of
  the drawn stored examples, computed here by forming each gradient."""
  ctx = make_ctx(stream)
  s = gss(mem_size=30, score_size=4)
  state = train.init_state(ctx, s, 0)
  e0 = stream.experiences[0]
  b0 = batch_of(e0)
  info = lambda b, p: StepInfo(p, p, None, None, b, jnp.zeros(()))
  after_step = jit_ctx(s.after_step)
  ss = after_step(ctx, state.strategy, info(b0, state.params))
  np.testing.assert_allclose(np.asarray(ss.scores[:B]), 0.1)  # empty before
  b1 = batch_of(e0, start=B)
  key = jax.random.fold_in(ss.key, ss.memory.seen)
  idx, ok = jax.jit(buffers.sample, static_argnums=2)(
      ss.memory, jax.random.split(key)[0], 4)
  assert np.asarray(ok).all()
  ss2 = after_step(ctx, ss, info(b1, state.params))
  x = jnp.concatenate([b1["x"], ss.memory.x[idx]])
  y = jnp.concatenate([b1["y"], ss.memory.y[idx]])
  t = jnp.concatenate([b1["task"], ss.memory.task[idx]])
  groups = np.zeros((B + 4, 5))
  groups[B:, :4] = np.eye(4)
  groups[:B, 4] = 1.0 / B
  gram = brute_gram(ctx, state.params, x, y, t, jnp.asarray(groups))
  norms = np.sqrt(np.diag(gram))
  want = (gram[4, :4] / norms[4] / norms[:4]).max() + 1.0
  np.testing.assert_allclose(np.asarray(ss2.scores[B:2 * B]), want,
                             rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(ss2.memory.y[B:2 * B]), b1["y"])
  assert int(ss2.memory.seen) == 2 * B
  # Padded rows are not in the batch's gradient, nor stored; the
  # gradients are those after the step (the code scores after opt.step).
  moved = jax.tree.map(lambda p: p * 1.3 + 0.02, state.params)
  bp = dict(b1, mask=b1["mask"].at[-3:].set(0.0))
  ss3 = after_step(ctx, ss, StepInfo(moved, state.params, None, None, bp,
                                     jnp.zeros(())))
  groups[:B, 4] = np.r_[np.ones(B - 3), np.zeros(3)] / (B - 3)
  gram = brute_gram(ctx, state.params, x, y, t, jnp.asarray(groups))
  norms = np.sqrt(np.diag(gram))
  want = (gram[4, :4] / norms[4] / norms[:4]).max() + 1.0
  np.testing.assert_allclose(np.asarray(ss3.scores[B:2 * B - 3]), want,
                             rtol=1e-4)
  assert int(ss3.memory.seen) == 2 * B - 3
  assert int(np.asarray(ss3.memory.valid).sum()) == 2 * B - 3
  # A diverged step (NaN loss) writes nothing; its rows still count.
  ss4 = after_step(ctx, ss, info(b1, state.params)._replace(
      loss=jnp.asarray(jnp.nan)))
  np.testing.assert_array_equal(ss4.memory.valid, ss.memory.valid)
  assert int(ss4.memory.seen) == 2 * B


def test_gss_stream_keeps_scored_memory(full_stream):
  cfg = config("gss", gss=dict(mem_size=60, score_size=5))
  result = experiment.run(cfg, scenario=full_stream)
  ss = result.state.strategy
  total = sum(e.num_train for e in full_stream.experiences)
  assert int(ss.memory.seen) == total
  assert bool(np.asarray(ss.memory.valid).all())
  sc = np.asarray(ss.scores)
  assert (sc >= 0).all() and (sc <= 2).all() and sc.std() > 0
  assert result.learner.chunk_fn._cache_size() == 1
  # The memory is not a reservoir: its scores steer what is replaced.
  assert result.accuracy[-1, :-1].mean() > 0.2, result.accuracy


def test_gss_bad_inputs(stream):
  for kw, match in (({"mem_size": 0}, "gss: mem_size must be a positive "
                     "int, got 0"),
                    ({"score_size": 0}, "gss: score_size must be an int "
                     ">= 1, got 0"),
                    ({"mem_size": 5, "score_size": 8}, "gss: score_size=8 "
                     "is larger than the memory capacity mem_size=5"),
                    ({"batch_size": -2}, "gss: batch_size must be an int")):
    with pytest.raises(ValueError, match=match):
      gss(**kw)
  ctx = make_ctx(stream)   # training batch 10 > memory 5
  with pytest.raises(ValueError, match="gss: batch_size=10 is larger than "
                     "the memory capacity mem_size=5"):
    gss(mem_size=5, score_size=2).init(ctx, jax.random.PRNGKey(0), None)
  gss(mem_size=5, score_size=5)   # the whole memory may be scored


# ---------------------------------------------------------------------------
# GDumb.


def test_gdumb_learns_nothing_from_stream_and_retrains_from_memory(
    full_stream):
  ctx = make_ctx(full_stream)
  s = gdumb(mem_size=50, epochs=10, batch_size=10)
  state = train.init_state(ctx, s, 0)
  learner = train.make_learner(ctx, s, epochs=1, eval_batch_size=100)
  test = train.test_arrays(full_stream.experiences, 100)
  for exp in full_stream.experiences:
    state = s.before_experience(ctx, state, exp)
    data = train.device_experience(exp, ctx.info.train_size)
    p0 = jax.tree.map(np.asarray, state.params)
    state, _, _ = learner.chunk_fn(state, data, exp.num_train, exp.index, 0,
                                   0)
    # Zero gradients: the stream itself moved no parameter.
    jax.tree.map(np.testing.assert_array_equal, p0,
                 jax.tree.map(np.asarray, state.params))
    mem = state.strategy.memory
    state = s.after_experience(ctx, state, exp)
  cnt = np.asarray(buffers.counts(mem, 10))
  np.testing.assert_array_equal(cnt, [5] * 10)   # class-balanced
  # The model is a function of the memory alone: other stream parameters,
  # same memory and key -> the same retrained parameters.
  other = state.replace(params=jax.tree.map(lambda a: a + 1.0, state.params))
  again = s.after_experience(ctx, other, full_stream.experiences[-1])
  jax.tree.map(np.testing.assert_allclose, again.params, state.params)
  acc = np.asarray(learner.eval_fn(state, test))
  assert acc.mean() > 0.6, acc    # naive fine-tuning gets ~0.2


def test_gdumb_retrain_reads_valid_entries_under_the_class_mask(stream):
  """The retraining reads only the memory's valid entries (what its empty
  slots hold does not matter) and, masking the logits, trains only those
  of the classes in memory: the head's weights of the other classes keep
  their fresh initialisation, the same for two memories of one key."""
  ctx = make_ctx(stream)
  fit = jax.jit(functools.partial(
      retrain, epochs=2, batch_size=8, learning_rate=0.05,
      min_learning_rate=0.0005, momentum=0.9, mask_logits=True),
                static_argnums=0)
  e0 = stream.experiences[0]           # classes 0 and 1
  add = jax.jit(buffers.reservoir_add)

  def memory(start):                   # 12 of 20 slots
    sl = slice(start, start + 12)
    return add(buffers.init(20, e0.train_x.shape[1:]), jax.random.PRNGKey(0),
               jnp.asarray(e0.train_x[sl]), jnp.asarray(e0.train_y[sl]),
               jnp.zeros(12, jnp.int32), jnp.int32(0))

  key = jax.random.PRNGKey(3)
  mem = memory(0)
  p = fit(ctx, key, mem)[0]
  empty = ~mem.valid
  junk = mem._replace(x=jnp.where(empty[:, None, None, None], 1.0, mem.x),
                      y=jnp.where(empty, 3, mem.y))
  jax.tree.map(np.testing.assert_array_equal, fit(ctx, key, junk)[0], p)
  q = fit(ctx, key, memory(12))[0]
  for name in ("kernel", "bias"):
    a, b = np.asarray(p["head"][name]), np.asarray(q["head"][name])
    np.testing.assert_array_equal(a[..., 2:], b[..., 2:])
    assert not np.array_equal(a[..., :2], b[..., :2])


def test_gdumb_predict_masks_classes_not_in_memory(stream):
  ctx = make_ctx(stream)
  s = gdumb(mem_size=20)
  ss = s.init(ctx, jax.random.PRNGKey(0), None)
  exp = stream.experiences[0]          # classes 0 and 1
  info = StepInfo(None, None, None, None, batch_of(exp), jnp.zeros(()))
  ss = s.after_step(ctx, ss, info)
  params = train.init_state(ctx, s, 0).params
  x = jnp.asarray(stream.experiences[1].test_x[:20])
  pred = np.argmax(np.asarray(s.predict(ctx, ss, params, {}, x, jnp.zeros(20, int))), -1)
  stored = set(np.asarray(ss.memory.y)[np.asarray(ss.memory.valid)])
  assert set(pred) <= stored and stored <= {0, 1}


def test_gdumb_bad_inputs(stream):
  ctx = make_ctx(stream)
  with pytest.raises(ValueError, match="smaller than the number of classes"):
    gdumb(mem_size=5, batch_size=4).init(ctx, jax.random.PRNGKey(0), None)
  with pytest.raises(ValueError, match="epochs must be an int >= 1"):
    gdumb(epochs=0)
  with pytest.raises(ValueError, match="min_learning_rate"):
    gdumb(learning_rate=0.01, min_learning_rate=0.1)
  with pytest.raises(ValueError, match="unknown gdumb schedule 'step'"):
    gdumb(schedule="step")
  with pytest.raises(ValueError, match="clip must be a finite number >= 0"):
    gdumb(clip=-1.0)
  with pytest.raises(ValueError, match="crop_padding must be an int"):
    gdumb(crop_padding=1.5)
  # Crops larger than the 8x8 digits, or of inputs that are not images
  # (the crop used to be skipped silently there).
  with pytest.raises(ValueError, match=r"crop_padding=8 must be smaller "
                     r"than the images' side \(8x8\)"):
    gdumb(mem_size=20, crop_padding=8).init(ctx, jax.random.PRNGKey(0), None)
  gdumb(mem_size=20, crop_padding=7).init(ctx, jax.random.PRNGKey(0), None)
  flat = dataclasses.replace(
      ctx, info=dataclasses.replace(ctx.info, input_shape=(64,)))
  with pytest.raises(ValueError, match=r"crop_padding=2 crops images shaped "
                     r"\(H, W, C\); this stream's inputs are shaped \(64,\)"):
    gdumb(mem_size=20, crop_padding=2).init(flat, jax.random.PRNGKey(0), None)
  # NaN passed `<= 0` checks and trained to NaN weights (found by a fuzz):
  # NaN clip and weight decay read as "off"; 'no' read as True.
  nan = float("nan")
  for kw, match in (({"learning_rate": nan}, "learning_rate must be a "
                     "finite number > 0, got nan"),
                    ({"min_learning_rate": nan}, "min_learning_rate"),
                    ({"clip": nan}, "clip must be a finite"),
                    ({"weight_decay": float("inf")}, "weight_decay"),
                    ({"mask_logits": "no"}, "mask_logits must be True or "
                     "False, got 'no'"),
                    ({"mem_size": 10, "batch_size": 16}, "batch_size=16 is "
                     "larger than the memory")):
    with pytest.raises(ValueError, match=match):
      gdumb(**kw)


def test_sgdr_epoch_lr_matches_pytorch_warm_restarts():
  hi, lo = 0.05, 0.0005
  cos = lambda t, T: lo + (hi - lo) * (1 + np.cos(np.pi * t / T)) / 2
  # Warm-up epoch, then torch's CosineAnnealingWarmRestarts(T_0=1,
  # T_mult=2) stepped once per epoch from epoch 2: restarts at 2, 4, 8, ...
  want = [0.1 * hi, hi, cos(0, 2), cos(1, 2), cos(0, 4), cos(1, 4),
          cos(2, 4), cos(3, 4), cos(0, 8), cos(7, 8), cos(0, 16)]
  epochs = [0, 1, 2, 3, 4, 5, 6, 7, 8, 15, 16]
  got = [float(sgdr_epoch_lr(e, hi, lo)) for e in epochs]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # 128 epochs end a cycle near the minimum.
  assert float(sgdr_epoch_lr(127, hi, lo)) == pytest.approx(cos(63, 64))


def test_random_crop_is_a_window_of_the_padded_image():
  x = jnp.asarray(np.random.default_rng(0).random((6, 5, 5, 1)),
                  jnp.float32)
  np.testing.assert_array_equal(random_crop(jax.random.PRNGKey(0), x, 0), x)
  out = np.asarray(random_crop(jax.random.PRNGKey(1), x, 2))
  xp = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = []
  for i in range(6):
    hits = [(a, b) for a in range(5) for b in range(5)
            if np.array_equal(xp[i, a:a + 5, b:b + 5], out[i])]
    assert hits, i                 # some window of the padded image
    offsets.append(hits[0])
  assert len(set(offsets)) > 1     # offsets drawn per example


def test_gdumb_code_recipe_with_batch_norm_mlp(stream):
  info = train.stream_info(stream, B)
  model = models.build("bn_mlp", stream.num_classes, widths=(32,))
  ctx = train.make_context(model, train.make_optimizer("sgd", 0.1), info)
  # (Crops of 8x8 digits: 1-pixel padding; MNIST uses 4 on 28x28.)
  s = gdumb(mem_size=40, epochs=8, batch_size=8, schedule="sgdr", clip=10.0,
            weight_decay=1e-6, crop_padding=1)
  learner = train.make_learner(ctx, s, epochs=1, eval_batch_size=100)
  state = train.init_state(ctx, s, 0)
  ms0 = jax.tree.map(np.asarray, state.model_state)
  for exp in stream.experiences:
    state = s.before_experience(ctx, state, exp)
    data = train.device_experience(exp, ctx.info.train_size)
    state, _, _ = learner.chunk_fn(state, data, exp.num_train, exp.index, 0,
                                   0)
    state = s.after_experience(ctx, state, exp)
  # The retraining updated the batch-norm statistics it installs.
  assert "batch_stats" in state.model_state
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       state.model_state, ms0)
  assert min(jax.tree.leaves(moved)) > 0
  acc = np.asarray(learner.eval_fn(state, train.test_arrays(
      stream.experiences, 100)))
  assert acc.mean() > 0.8, acc     # 4 digit classes, 10 per class
  assert learner.chunk_fn._cache_size() == 1


def test_bn_mlp_normalises_hidden_layers_and_logits():
  m = models.build("bn_mlp", 10, widths=(16, 8))
  x = jnp.asarray(np.random.default_rng(0).random((32, 4, 4, 1)),
                  jnp.float32)
  v = m.init(jax.random.PRNGKey(0), x, None, train=False)
  assert "bias" not in v["params"]["hidden0_dense"]   # cancelled by BN
  logits, _ = m.apply(v, x, None, train=True, mutable=["batch_stats"])
  # Batch norm on the logits (scale 1, shift 0 at init): per-class batch
  # mean 0 and variance 1 in training mode.
  np.testing.assert_allclose(np.asarray(logits).mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits).var(0), 1, atol=1e-3)
  assert m.apply(v, x, features=True).shape == (32, 8)
  with pytest.raises(ValueError, match="single head"):
    models.build("bn_mlp", 10, num_heads=2)


# ---------------------------------------------------------------------------
# MIR.


def _full_memory(exp, n):
  mem = buffers.init(n, exp.train_x.shape[1:])
  return jax.jit(buffers.reservoir_add)(mem, jax.random.PRNGKey(0),
                                        jnp.asarray(exp.train_x[:n]),
                                        jnp.asarray(exp.train_y[:n]),
                                        jnp.zeros(n, jnp.int32), jnp.int32(0))


def test_mir_retrieves_largest_loss_increase(stream):
  ctx = make_ctx(stream)
  state = train.init_state(ctx, mir(mem_size=30, candidates=30), 0)
  mem = _full_memory(stream.experiences[0], 30)
  incoming = batch_of(stream.experiences[1])
  loss = lambda p, b: cross_entropy(ctx.logits(p, {}, b["x"], b["task"]),
                                    b["y"], b["mask"])
  grads = jax.jit(jax.grad(loss))(state.params, incoming)
  idx, ok, score = mir_retrieve(ctx, state.params, {}, grads, mem,
                            jax.random.PRNGKey(3), lr=0.5, candidates=30, k=5)
  # By hand: per-example loss after the virtual step minus before.
  virtual = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grads)
  per = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      ctx.logits(p, {}, mem.x, mem.task), mem.y)
  per = jax.jit(per)
  rise = np.asarray(per(virtual) - per(state.params))
  assert np.all(np.asarray(ok))
  assert set(np.asarray(idx)) == set(np.argsort(-rise)[:5])
  # It is not simply the examples with the largest loss.
  assert np.max(rise) > 0
  # Entries that are not valid are never picked, even the ones whose loss
  # would rise most (here the top 10; drawn as candidates, they score -inf).
  part = mem._replace(valid=mem.valid.at[np.argsort(-rise)[:10]].set(False))
  idx, ok, _ = mir_retrieve(ctx, state.params, {}, grads, part,
                            jax.random.PRNGKey(3), lr=0.5, candidates=30, k=5)
  assert np.all(np.asarray(ok))
  assert set(np.asarray(idx)) == set(np.argsort(-rise)[10:15])


def test_mir_update_grads_adds_replay_gradient(stream):
  ctx = make_ctx(stream)
  s = mir(mem_size=30, batch_size=5, candidates=30, lr=0.5)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy
  g0 = jax.tree.map(jnp.ones_like, state.params)
  key = jax.random.PRNGKey(4)
  # Empty memory: gradient unchanged.
  out = jit_ctx(s.update_grads)(ctx, ss, g0, state.params, None, key)
  jax.tree.map(np.testing.assert_array_equal, out, g0)
  ss = ss._replace(memory=_full_memory(stream.experiences[0], 30))
  out = jit_ctx(s.update_grads)(ctx, ss, g0, state.params, None, key)
  idx, ok, _ = mir_retrieve(ctx, state.params, {}, g0, ss.memory, key, lr=0.5,
                        candidates=30, k=5)
  m = ss.memory
  g_rep = jax.jit(jax.grad(lambda p: cross_entropy(
      ctx.logits(p, {}, m.x[idx], m.task[idx]), m.y[idx],
      ok.astype(jnp.float32))))(state.params)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, b + c,
                                                          rtol=1e-5,
                                                          atol=1e-6),
               out, g0, g_rep)


def _freeze_head(tree):
  """A ctx.freeze that keeps the head fixed (as LFL's mask does)."""
  return {**tree, "head": jax.tree.map(jnp.zeros_like, tree["head"])}


def test_mir_virtual_step_moves_only_the_weights_that_move(stream):
  """Beside a member that keeps weights fixed (ctx.freeze, here the
  head), the virtual step, like the update it forecasts, leaves those
  weights alone, whichever side of mir that member stands: the
  retrieval is the one for the masked gradient, not the whole one."""
  ctx = make_ctx(stream)
  fctx = dataclasses.replace(ctx, freeze=_freeze_head)
  s = mir(mem_size=30, batch_size=5, candidates=30, lr=0.5)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy._replace(memory=_full_memory(stream.experiences[0],
                                                   30))
  m, params = ss.memory, state.params
  loss = lambda p, b: cross_entropy(ctx.logits(p, {}, b["x"], b["task"]),
                                    b["y"], b["mask"])
  g0 = jax.jit(jax.grad(loss))(params, batch_of(stream.experiences[1]))
  key = jax.random.PRNGKey(4)
  out = jit_ctx(s.update_grads)(fctx, ss, g0, params, None, key)
  pick = lambda g: mir_retrieve(ctx, params, {}, g, m, key, lr=0.5,
                            candidates=30, k=5)[:2]
  idx, ok = pick(_freeze_head(g0))
  # The whole gradient's virtual step ranks the memory otherwise.
  assert set(np.asarray(idx)) != set(np.asarray(pick(g0)[0]))
  g_rep = _freeze_head(jax.jit(jax.grad(lambda p: cross_entropy(
      ctx.logits(p, {}, m.x[idx], m.task[idx]), m.y[idx],
      ok.astype(jnp.float32))))(params))
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(
      a, b + c, rtol=1e-5, atol=1e-6), out, g0, g_rep)


def test_mir_exclude_current_replays_past_experiences_only(stream):
  ctx = make_ctx(stream)
  s = mir(mem_size=30, batch_size=5, candidates=20, lr=0.5,
          exclude_current=True)
  state = train.init_state(ctx, s, 0)
  e0, e1 = stream.experiences
  mem = buffers.init(30, e0.train_x.shape[1:])
  for e, exp in enumerate((e0, e1)):   # 15 entries from each experience
    mem = jax.jit(buffers.reservoir_add)(mem, jax.random.PRNGKey(e),
                                         jnp.asarray(exp.train_x[:15]),
                                         jnp.asarray(exp.train_y[:15]),
                                         jnp.zeros(15, jnp.int32),
                                         jnp.int32(e))
  g0 = jax.tree.map(jnp.ones_like, state.params)
  key = jax.random.PRNGKey(4)
  # During experience 0 nothing is in the past: the gradient is unchanged.
  ss = state.strategy._replace(memory=mem, experience=jnp.asarray(0))
  out = jit_ctx(s.update_grads)(ctx, ss, g0, state.params, None, key)
  jax.tree.map(np.testing.assert_array_equal, out, g0)
  # During experience 1 the replayed rows are experience-0 entries only.
  where = mem.experience < 1
  idx, ok, _ = mir_retrieve(ctx, state.params, {}, g0, mem, key, lr=0.5,
                        candidates=20, k=5, where=where)
  assert np.all(np.asarray(ok))
  assert set(np.asarray(mem.experience)[np.asarray(idx)]) == {0}
  ss = ss._replace(experience=jnp.asarray(1))
  out = jit_ctx(s.update_grads)(ctx, ss, g0, state.params, None, key)
  g_rep = jax.jit(jax.grad(lambda p: cross_entropy(
      ctx.logits(p, {}, mem.x[idx], mem.task[idx]), mem.y[idx],
      ok.astype(jnp.float32))))(state.params)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(
      a, b + c, rtol=1e-5, atol=1e-6), out, g0, g_rep)


def test_mir_bad_inputs():
  with pytest.raises(ValueError, match="batch_size=20 is larger than "
                     "candidates=10"):
    mir(batch_size=20, candidates=10)
  with pytest.raises(ValueError, match="candidates=600 is larger than the "
                     "memory capacity mem_size=500; use candidates <= 500"):
    mir(mem_size=500, candidates=600)
  mir(mem_size=20, batch_size=20, candidates=20)   # the bounds are allowed
  with pytest.raises(ValueError, match="exclude_current must be a bool"):
    mir(exclude_current=1)
  # An infinite virtual step ran and ranked by meaningless scores.
  with pytest.raises(ValueError, match="mir: lr must be a finite number"):
    mir(lr=float("inf"))


# ---------------------------------------------------------------------------
# ExStream.


def _reference_exstream(points, labels, per_class, num_classes):
  """Brute-force ExStream in NumPy (float64)."""
  bufs = {c: [] for c in range(num_classes)}
  for z, c in zip(points, labels):
    buf = bufs[c]
    buf.append([z.astype(np.float64), 1.0])
    if len(buf) > per_class:
      best = None
      for i in range(len(buf)):
        for j in range(i + 1, len(buf)):
          d = np.sum((buf[i][0] - buf[j][0]) ** 2)
          if best is None or d < best[0]:
            best = (d, i, j)
      _, i, j = best
      (wi, ni), (wj, nj) = buf[i], buf[j]
      buf[i] = [(ni * wi + nj * wj) / (ni + nj), ni + nj]
      del buf[j]
  return bufs


def test_exstream_merge_is_count_weighted_mean():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(60, 3)).astype(np.float32)
  y = rng.integers(0, 2, 60).astype(np.int32)
  buf = exs.init_buffers(2, 4, (3,))
  buf = jax.jit(exs.insert_many)(buf, z, y, jnp.ones(60, bool))
  w, n = np.asarray(buf.w), np.asarray(buf.n)
  ref = _reference_exstream(z, y, 4, 2)
  for c in range(2):
    # Merging preserves the count-weighted sum and the total count.
    np.testing.assert_allclose((n[c][:, None] * w[c]).sum(0),
                               z[y == c].sum(0), rtol=1e-4, atol=1e-4)
    assert n[c].sum() == (y == c).sum() and (n[c] > 0).sum() == 4
    got = sorted(map(tuple, np.round(w[c], 4)))
    want = sorted(tuple(np.round(v, 4)) for v, _ in ref[c])
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert sorted(n[c]) == sorted(k for _, k in ref[c])


# ---------------------------------------------------------------------------
# Latent replay.


def test_latent_split_composes_to_the_full_model(stream):
  ctx = make_ctx(stream, widths=(16, 16))
  params = train.init_state(ctx, latent_replay(), 0).params
  x = jnp.asarray(stream.experiences[0].train_x[:8])
  t = jnp.zeros(8, jnp.int32)
  full = ctx.logits(params, {}, x, t)
  for layer in ("backbone/Dense_0", "backbone/Dense_1", "backbone"):
    sp = lat.split_model(ctx, layer)
    h = sp.lower(ctx, params, {}, x, t)
    np.testing.assert_allclose(sp.upper(ctx, params, {}, h, t)[0], full,
                               rtol=1e-5, atol=1e-5)
  feats = ctx.apply(params, {}, x, t, features=True)[0]
  np.testing.assert_allclose(
      lat.split_model(ctx, "backbone").lower(ctx, params, {}, x, t), feats)
  mask = lat.split_model(ctx, "backbone/Dense_0").lower_mask(params)
  assert mask["backbone"]["Dense_0"]["kernel"]
  assert not mask["backbone"]["Dense_1"]["kernel"] and not mask["head"]["bias"]


def test_latent_bad_layer_name(stream):
  ctx = make_ctx(stream)
  with pytest.raises(ValueError, match="unknown layer 'Dense_7'.*valid layer "
                     "names: \\['backbone/Dense_0'"):
    latent_replay(layer="Dense_7").init(ctx, jax.random.PRNGKey(0), None)
  with pytest.raises(ValueError, match="unknown layer"):
    exstream(layer="nope").init(ctx, jax.random.PRNGKey(0), None)
  with pytest.raises(ValueError, match="lower_lr_scale must be in"):
    latent_replay(lower_lr_scale=2.0)
  with pytest.raises(ValueError, match="smaller than the number of classes"):
    exstream(mem_size=5).init(ctx, jax.random.PRNGKey(0), None)
  # More replayed rows than stored ones: given, or the training batch (10).
  with pytest.raises(ValueError, match="latent_replay replay batch_size=6 is "
                     "larger than the memory capacity mem_size=5"):
    latent_replay(mem_size=5, batch_size=6)
  with pytest.raises(ValueError, match=r"latent_replay: the replay batch "
                     r"\(10: batch_size, ar1's replay_batch_size; 0 means the "
                     r"training batch\) is larger than mem_size=5; use a "
                     r"replay batch <= 5 or mem_size >= 10"):
    latent_replay(mem_size=5).init(ctx, jax.random.PRNGKey(0), None)
  with pytest.raises(ValueError, match="exstream batch size 12 is larger than "
                     "the 10 centroid slots"):   # 12 // 10 classes: 1 each
    exstream(mem_size=12, batch_size=12).init(ctx, jax.random.PRNGKey(0),
                                              None)


@pytest.mark.parametrize("spec", ["latent_replay", "exstream"])
def test_latents_replayed_with_their_labels_through_the_upper_part(stream,
                                                                    spec):
  """The replayed latents are stored ones with their own labels, and the
  loss hook is their mean cross-entropy through the upper part alone (split
  at the backbone: the head, logits = h @ kernel + bias)."""
  ctx = make_ctx(stream)
  s = {"latent_replay": latent_replay, "exstream": exstream}[spec](
      mem_size=40, batch_size=6)
  # The first experience cut to 30 examples: the rest of its 270 rows is
  # padding, which is not stored.
  e0 = cut(stream.experiences[0], 30)
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  state = s.after_experience(ctx, state, e0)
  ss, params = state.strategy, state.params
  if spec == "latent_replay":   # memory entries: an example's features
    valid = np.asarray(ss.memory.valid)
    z, y = np.asarray(ss.memory.x)[valid], np.asarray(ss.memory.y)[valid]
    feats = np.asarray(ctx.apply(params, {}, jnp.asarray(e0.train_x),
                                 jnp.zeros(e0.num_train, jnp.int32),
                                 features=True)[0])
    d = ((z[:, None, :] - feats[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d.min(1), 0.0, atol=1e-8)
    np.testing.assert_array_equal(y, e0.train_y[d.argmin(1)])
  else:                         # each class's buffer of centroids
    n = np.asarray(ss.buffers.n)
    np.testing.assert_array_equal(n.sum(1), np.bincount(e0.train_y,
                                                        minlength=10))
    c, k = np.nonzero(n)
    z, y = np.asarray(ss.buffers.w)[c, k], c
  b = jit_ctx(s.prepare_batch)(ctx, ss, batch_of(e0), jax.random.PRNGKey(7))
  h, lab = np.asarray(b["latent_x"]), np.asarray(b["latent_y"])
  np.testing.assert_array_equal(b["latent_mask"], [1.] * 6)
  for row, c in zip(h, lab):
    i = np.flatnonzero(np.all(z == row, axis=1))
    assert i.size and c in y[i], (row, c)
  kernel, bias = (np.asarray(params["head"][n], np.float64)
                  for n in ("kernel", "bias"))
  want = -np_log_softmax(h @ kernel + bias)[np.arange(6), lab].mean()
  np.testing.assert_allclose(s.loss(ctx, ss, params, b, None), want,
                             rtol=1e-5)


def test_latent_replay_on_a_model_without_layers_says_so():
  # It listed "valid layer names: []".
  from jaxcl import experiment
  c = experiment.default_config()
  c.strategy.name, c.model.name, c.scenario.kind = ("latent_replay",
                                                    "hypernet", "task")
  with pytest.raises(ValueError, match=r"the model \(HyperNetwork\) has no "
                     "named layers to split at 'backbone'"):
    experiment.run(c)


# ---------------------------------------------------------------------------
# Deep generative replay.


def test_dgr_labels_from_previous_solver_and_loss_weights(stream):
  ctx = make_ctx(stream)
  s = generative_replay(batch_size=6, hidden=(16,), latent=4)
  state = train.init_state(ctx, s, 0)
  exp0, exp1 = stream.experiences
  state = s.after_experience(ctx, state, exp0)   # snapshot + seen {0, 1}
  state = s.before_experience(ctx, state, exp1)
  ss = state.strategy
  np.testing.assert_array_equal(np.flatnonzero(ss.seen), [0, 1])
  key = jax.random.PRNGKey(5)
  prepare = jit_ctx(s.prepare_batch)
  fwd = jax.jit(lambda p, x, t: ctx.logits(p, {}, x, t))
  batch = prepare(ctx, ss, batch_of(exp1), key)
  x_rep = batch["x"][B:]
  prev = fwd(ss.prev_params, x_rep, jnp.zeros(6, jnp.int32))
  want = np.argmax(np.where(np.asarray(ss.seen), prev, -np.inf), -1)
  np.testing.assert_array_equal(batch["y"][B:], want)
  # Another previous solver gives other labels for the same samples; the
  # generator being trained (changed too) does not make them, the previous
  # one does.
  other = ss._replace(prev_params=jax.tree.map(lambda a: -a, ss.prev_params),
                      gen_params=jax.tree.map(lambda a: a + 1.0,
                                              ss.gen_params))
  flipped = prepare(ctx, other, batch_of(exp1), key)
  np.testing.assert_array_equal(flipped["x"][B:], x_rep)
  assert not np.array_equal(flipped["y"][B:], batch["y"][B:])
  # Loss = w * mean(current) + (1 - w) * mean(replay), the current mean
  # over the batch's valid rows (7 of 10 here): w = 1/(t+1) at experience
  # t, or current_weight if given, but 1 at t = 0 (nothing to replay).
  # (At t = 1, 1/(t+1) = 1/2: a fixed half-half mix would pass there.)
  cur = dict(batch_of(exp1), mask=jnp.asarray([1.] * 7 + [0.] * 3))
  fixed = generative_replay(batch_size=6, hidden=(16,), latent=4,
                            current_weight=0.3)
  prepare_fixed = jit_ctx(fixed.prepare_batch)
  for prep, t, w in ((prepare, 1, 1 / 2), (prepare, 2, 1 / 3),
                     (prepare_fixed, 1, 0.3), (prepare_fixed, 0, 1.0)):
    b = prep(ctx, ss._replace(experience=jnp.asarray(t, jnp.int32)), cur,
             key)
    logits = fwd(state.params, b["x"], b["task"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])
    want = w * ce[:7].mean() + (1 - w) * ce[B:].mean()
    np.testing.assert_allclose(cross_entropy(logits, b["y"], b["mask"]),
                               want, rtol=1e-5, err_msg=f"t={t}, w={w}")
  # Distilled: the replayed rows leave the cross-entropy, and the loss hook
  # is (1 - w) T^2 CE(softmax(S_prev / T), softmax(S / T)) over them, the
  # previous solver's outputs over the classes seen before.
  temp = 2.0
  dist = generative_replay(batch_size=6, hidden=(16,), latent=4,
                           distill=True, temperature=temp)
  b = jit_ctx(dist.prepare_batch)(ctx, ss, batch_of(exp1), key)   # t = 1
  np.testing.assert_array_equal(b["mask"][B:], [0.] * 6)
  prev = np.asarray(fwd(ss.prev_params, b["x"][B:], jnp.zeros(6, jnp.int32)),
                    np.float64) / temp
  prev = np.where(np.asarray(ss.seen), prev, -np.inf)
  logits = np.asarray(fwd(state.params, b["x"], b["task"]), np.float64)
  logq = np_log_softmax(logits[B:] / temp)
  want = 0.5 * temp ** 2 * -(np_softmax(prev) * logq).sum(1).mean()
  np.testing.assert_allclose(dist.loss(ctx, ss, state.params, b,
                                       jnp.asarray(logits, jnp.float32)),
                             want, rtol=1e-5)


def test_dgr_generator_learns_and_snapshots_are_copies(stream):
  ctx = make_ctx(stream)
  s = generative_replay(hidden=(32,), latent=4, gen_lr=3e-3)
  state = train.init_state(ctx, s, 0)
  from jaxcl.models.vae import VAE, vae_loss
  vae = VAE(tuple(ctx.info.input_shape), (32,), 4)
  exp = stream.experiences[0]
  x = jnp.asarray(exp.train_x[:100])

  @jax.jit
  def gen_loss_(p):
    r, mu, lv = vae.apply({"params": p}, x, jax.random.PRNGKey(0))
    return vae_loss(r, x, mu, lv).mean()

  gen_loss = lambda p: float(gen_loss_(p))

  ss = state.strategy
  before = gen_loss(ss.gen_params)
  @jax.jit
  def step(ss, b, key):
    b = s.prepare_batch(ctx, ss, b, key)
    return s.after_step(ctx, ss, StepInfo(None, None, None, None, b,
                                          jnp.zeros(())))

  # From experience 1 on the generator also learns its own replayed
  # samples: the fresh generator's first step on a batch whose current rows
  # are all masked out moves it then, but not at experience 0 (nothing is
  # replayed; Adam's first step on a zero gradient is zero).
  empty = dict(batch_of(exp), mask=jnp.zeros((B,), jnp.float32))
  for t, moves in ((0, False), (1, True)):
    new = step(ss._replace(experience=jnp.asarray(t, jnp.int32)), empty,
               jax.random.PRNGKey(99))
    same = [np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(new.gen_params), jax.tree.leaves(ss.gen_params))]
    assert not any(same) if moves else all(same), (t, same)

  for i in range(60):
    ss = step(ss, batch_of(exp, start=(i * B) % 300), jax.random.PRNGKey(i))
  assert gen_loss(ss.gen_params) < 0.8 * before
  state = s.after_experience(ctx, state.replace(strategy=ss), exp)
  jax.tree.map(np.testing.assert_array_equal, state.strategy.prev_params,
               state.params)
  jax.tree.map(np.testing.assert_array_equal,
               state.strategy.prev_gen_params, ss.gen_params)


def test_dgr_bad_inputs():
  with pytest.raises(ValueError, match="temperature must be a finite number "
                     "> 0"):
    generative_replay(temperature=0.0)
  with pytest.raises(ValueError, match="temperature must be a finite"):
    generative_replay(temperature=float("inf"), distill=True)
  with pytest.raises(ValueError, match="distill must be True or False"):
    generative_replay(distill="no")
  with pytest.raises(ValueError, match=r"hidden\[1\] must be an int >= 1, "
                     "got 0"):
    generative_replay(hidden=(16, 0))
  with pytest.raises(ValueError, match="gen_lr must be a finite number"):
    generative_replay(gen_lr=float("inf"))
  with pytest.raises(ValueError, match="current_weight must be in"):
    generative_replay(current_weight=1.5)


# ---------------------------------------------------------------------------
# Experiment configs.


def _load_config(name):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                      "experiments", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


# The default suite builds one config of each kind of set-up (the online
# protocol, a latent split, a generator, a table of Mammoth's settings on
# batch 1, a model of its own); the rest run with -m slow (session 56).
@pytest.mark.parametrize("arg", slow_beyond([
    "strategy=replay", "strategy=mir", "strategy=gdumb",
    "strategy=latent_replay,layer=backbone/Dense_0", "strategy=exstream",
    "strategy=generative_replay,distill", "strategy=der,mem_size=200",
    "strategy=derpp,mem_size=500", "strategy=er_ace,mem_size=200",
    "strategy=gss,mem_size=200", "strategy=fdr,mem_size=200",
    "strategy=hal,mem_size=200", "strategy=mer,mem_size=200",
    "strategy=gsa,mem_size=200,flip=False",
    "strategy=dualnet,mem_size=200"], [
        "strategy=replay", "strategy=latent_replay,layer=backbone/Dense_0",
        "strategy=generative_replay,distill", "strategy=mer,mem_size=200",
        "strategy=dualnet,mem_size=200"]))
def test_split_mnist_configs_build(data_dir, arg):
  c = _load_config("split_mnist_replay.py")(arg + ",quick")
  c.dataset.data_dir = data_dir
  s = experiment.setup(c)
  state = train.init_state(s.learner.ctx, s.learner.strategy, 0)
  assert state.strategy is not None
  assert s.scenario.online == (c.strategy.name != "gdumb" and
                               c.strategy.name != "generative_replay")


@pytest.mark.parametrize("arg", ["mem_size=200,lr=0.1",
                                 "strategy=derpp,mem_size=200"])
def test_split_mnist_replay_quick_end_to_end(data_dir, arg):
  c = _load_config("split_mnist_replay.py")(arg + ",quick")
  c.dataset.data_dir = data_dir
  r = experiment.run(c)
  assert r.accuracy.shape == (5, 5)
  assert r.metrics["acc"] > 0.4    # naive ends near 0.2 (last classes only)
  assert r.learner.chunk_fn._cache_size() == 1


def test_split_mnist_replayed_argument_and_rar_branch():
  """``replayed`` sets the memory rows per step of Replay and RAR (and
  names the run); the default stays the protocol's 10."""
  get = _load_config("split_mnist_replay.py")
  c = get("mem_size=200,replayed=20")
  assert c.strategy.replay.batch_size == 20
  assert c.name == "split_mnist_replay_200_replayed20"
  assert get("mem_size=200").strategy.replay.batch_size == 10
  c = get("strategy=rar,mem_size=500")
  assert c.strategy.name == "rar"
  assert dict(c.strategy.rar) == dict(mem_size=500, batch_size_mem=10)
  assert c.optimizer.learning_rate == 0.1  # Replay's rate at memory 500


@pytest.mark.parametrize("name", ["permuted_mnist_replay.py",
                                  "rotated_mnist_replay.py"])
def test_domain_configs_build(data_dir, name):
  c = _load_config(name)("mem_size=200,quick")
  c.dataset.data_dir = data_dir
  s = experiment.setup(c)
  assert s.scenario.kind == "domain" and len(s.scenario.experiences) == 3
  assert c.strategy.replay["batch_size"] == c.train.batch_size
  # DER++ takes its scenario's row of Mammoth's best_args.
  d = _load_config(name)("strategy=derpp,mem_size=200,quick")
  assert d.strategy.derpp["beta"] == (1.0 if name.startswith("permuted")
                                      else 0.5)
  assert d.optimizer.learning_rate == 0.1
  # So does FDR (lr 0.1 on perm-mnist, 0.2 on rot-mnist).
  f = _load_config(name)("strategy=fdr,mem_size=200,quick")
  assert f.optimizer.learning_rate == (0.1 if name.startswith("permuted")
                                       else 0.2)
  assert f.strategy.fdr["batch_size"] == 128
  if name.startswith("rotated"):
    # Mammoth's nearest-neighbour rotation keeps MNIST's k / 255 levels.
    x = s.scenario.experiences[1].train_x * 255
    np.testing.assert_allclose(x, np.round(x), atol=1e-4)


def test_permuted_mer_protocol_config():
  """protocol=mer: Riemer et al.'s 20 x 1000 images online at batch 10,
  PyTorch's init, Replay at 10 + 10; an unknown protocol is refused."""
  get = _load_config("permuted_mnist_replay.py")
  c = get("strategy=replay,mem_size=200,protocol=mer")
  assert (c.dataset.train_subset, c.train.batch_size,
          c.scenario.n_experiences) == (1000, 10, 20)
  assert c.model.init == "torch" and c.optimizer.learning_rate == 0.1
  assert dict(c.strategy.replay) == dict(mem_size=200, batch_size=10)
  lamaml = get("strategy=lamaml,mem_size=200,protocol=mer").strategy.lamaml
  assert dict(lamaml) == dict(mem_size=200)
  assert get("mem_size=200").dataset.train_subset == 0
  with pytest.raises(ValueError, match="protocol='gem'.*'buzzega' or 'mer'"):
    get("protocol=gem")


# ---------------------------------------------------------------------------
# X-DER: logit transplants, the balanced memory, the constraints.


def _np_update_logits(old, new, gt, cols, gamma):
  """Mammoth's xder_ce.update_logits, on a boolean column set."""
  old = old.copy()
  transplant = new[:, cols].copy()
  gt_values = old[np.arange(len(gt)), gt]
  max_values = transplant.max(1)
  coeff = gamma * gt_values / max_values
  mask = max_values > gt_values
  transplant[mask] *= coeff[mask][:, None]
  old[:, cols] = transplant
  return old


def test_xder_transplant_equals_the_code():
  from jaxcl.strategies.xder import transplant
  rng = np.random.default_rng(0)
  old = rng.normal(size=(6, 5)).astype(np.float32) * 3
  new = rng.normal(size=(6, 5)).astype(np.float32) * 3
  y = np.array([0, 1, 0, 1, 0, 1])
  old[0, 0] = old[3, 1] = 20.0   # rows whose own logit tops the new ones
  cols = np.array([False, False, True, True, True])
  want = _np_update_logits(old, new, y, cols, 0.85)
  got = transplant(jnp.asarray(old), jnp.asarray(new), jnp.asarray(y),
                   jnp.asarray(cols), 0.85)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  # Both branches were exercised: some rows scaled, some copied as they are.
  top = new[:, cols].max(1)
  gt = old[np.arange(6), y]
  assert (top > gt).any() and (top <= gt).any()


def test_xder_margin_loss_is_the_mean_over_violations():
  from jaxcl.strategies.xder import margin_loss
  bad = jnp.asarray([0.5, 0.1, 0.9, 2.0])
  good = jnp.asarray([0.6, 0.9, 0.2, 0.0])
  valid = jnp.asarray([True, True, True, False])
  # bad + 0.3 - good: 0.2, -0.5, 1.0, (2.3 invalid) -> mean(0.2, 1.0)
  np.testing.assert_allclose(float(margin_loss(bad, good, 0.3, valid)), 0.6,
                             rtol=1e-6)
  assert float(margin_loss(bad, good, 0.3, jnp.zeros(4, bool))) == 0.0


def test_xder_memory_is_rebalanced_and_its_logits_transplanted(stream):
  """Hooks only, no training: after experience 0 each class holds K / 2
  entries; after experience 1 the two old classes keep their first K / 4
  and the new ones fill the rest, an even split. New entries' past-class
  logits are capped at γ times their own; old entries get the current
  classes' logits from the network, capped the same way."""
  from jaxcl.strategies.xder import xder
  ctx = make_ctx(stream)
  k, gamma = 24, 0.5
  s = xder(mem_size=k, gamma=gamma, batch_size=4)
  state = train.init_state(ctx, s, 0)
  e0, e1 = stream.experiences
  state = s.before_experience(ctx, state, e0)
  state = s.after_experience(ctx, state, e0)
  mem = state.strategy.memory
  y0 = np.asarray(mem.y)[np.asarray(mem.valid)]
  np.testing.assert_array_equal(np.bincount(y0, minlength=4)[:2], [12, 12])
  # Experience-0 entries' logits are the network's own (nothing is past).
  out0 = np.asarray(ctx.logits(state.params, state.model_state, mem.x,
                               mem.task, train=True))
  v0 = np.asarray(mem.valid)
  np.testing.assert_allclose(np.asarray(state.strategy.logits)[v0], out0[v0],
                             rtol=1e-5, atol=1e-5)
  slots0 = np.flatnonzero(v0)
  # A different network for experience 1, so transplants change values.
  state = state.replace(params=jax.tree.map(lambda p: p * 1.5 + 0.05,
                                            state.params))
  state = s.before_experience(ctx, state, e1)
  state = s.after_experience(ctx, state, e1)
  ss = state.strategy
  mem, logits = ss.memory, np.asarray(ss.logits)
  valid = np.asarray(mem.valid)
  y = np.asarray(mem.y)
  np.testing.assert_array_equal(np.bincount(y[valid], minlength=4),
                                [6, 6, 6, 6])
  # The old classes kept their first six entries by slot.
  for c in (0, 1):
    first = [i for i in slots0 if y0[list(slots0).index(i)] == c][:6]
    assert set(np.flatnonzero(valid & (y == c))) == set(first)
  out = np.asarray(ctx.logits(state.params, state.model_state, mem.x,
                              mem.task, train=True))
  old = valid & (y < 2)
  new = valid & (y >= 2)
  cur = np.array([False, False, True, True] + [False] * 6)
  past = np.array([True, True] + [False] * 8)
  want_old = _np_update_logits(out0[old], out[old], y[old], cur, gamma)
  np.testing.assert_allclose(logits[old], want_old, rtol=1e-4, atol=1e-5)
  want_new = _np_update_logits(out[new], out[new], y[new], past, gamma)
  np.testing.assert_allclose(logits[new], want_new, rtol=1e-4, atol=1e-5)
  assert not np.allclose(want_new, out[new])   # some were capped
  np.testing.assert_array_equal(np.asarray(ss.seen)[:4], [1, 1, 1, 1])


def test_xder_step_terms_and_online_update(stream):
  """One step on experience 1 (past classes 0, 1): the loss is the sum of
  the hand-computed terms; past entries drawn for the first time have
  their current and future logits rewritten (1 / k = 1), their past ones
  kept."""
  from jaxcl.strategies.xder import margin_loss, xder
  ctx = make_ctx(stream)
  k, r = 24, 4
  alpha, beta, gamma, eta, m = 0.7, 0.9, 0.85, 0.4, 0.3
  s = xder(mem_size=k, alpha=alpha, beta=beta, gamma=gamma, eta=eta, m=m,
           batch_size=r)
  state = train.init_state(ctx, s, 0)
  e0, e1 = stream.experiences
  state = s.before_experience(ctx, state, e0)
  state = s.after_experience(ctx, state, e0)
  state = s.before_experience(ctx, state, e1)
  ss = state.strategy
  batch = dict(batch_of(e1), index=jnp.arange(B))
  prepared = jit_ctx(s.prepare_batch)(ctx, ss, batch, jax.random.PRNGKey(3))
  params = state.params
  fwd = logits_fn(ctx)
  logits = fwd(params, ss.model_state, prepared["x"], prepared["task"])
  got = float(jit_ctx(s.loss)(ctx, ss, params, prepared, logits))
  # By hand.
  lg = np.asarray(logits, np.float64)
  f = lambda x: np.asarray(fwd(params, ss.model_state, x,
                               jnp.zeros(len(x), jnp.int32)), np.float64)
  o1, o2 = f(prepared["xder_x1"]), f(prepared["xder_x2"])
  z1 = np.asarray(ss.logits)[np.asarray(prepared["xder_i1"])]
  der_t = np.mean((o1 - z1) ** 2)
  y2 = np.asarray(prepared["xder_y2"])
  p2 = o2[:, :2] - np.log(np.exp(o2[:, :2]).sum(1, keepdims=True))
  derpp_t = -np.mean(p2[np.arange(r), y2])
  seen = np.array([1, 1] + [0] * 8, bool)
  cur = np.array([0, 0, 1, 1] + [0] * 6, bool)
  fut = ~(seen | cur)
  sp = np.exp(lg[:, :4]) / np.exp(lg[:, :4]).sum(1, keepdims=True)
  past_t = float(margin_loss(jnp.asarray(sp[:, :2].max(1)),
                             jnp.asarray(sp[:, 2:4].max(1)), m,
                             jnp.ones(B, bool)))
  ok2u = np.asarray(prepared["xder_ok2u"])
  yb = np.concatenate([np.asarray(prepared["xder_y1"]), y2])
  ob = np.concatenate([o1, o2])
  bad = np.concatenate([lg[:, fut].max(1), ob[:, fut].max(1)])
  good = np.concatenate([lg[:, cur].max(1), ob[:, :2].max(1)])
  rows = np.concatenate([np.ones(B, bool), np.ones(r, bool), ok2u])
  fut_t = float(margin_loss(jnp.asarray(bad), jnp.asarray(good), m,
                            jnp.asarray(rows)))
  assert all(yb < 2)   # the memory holds the past classes only
  want = alpha * der_t + beta * derpp_t + eta * (past_t + fut_t)
  assert past_t > 0 and fut_t > 0
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # The constraints' gradient with respect to the stream's logits, by hand:
  # the past constraint moves only the current classes' top probability
  # (its past side is held constant), the future one its two maxima.
  only_c = xder(mem_size=k, alpha=0.0, beta=0.0, gamma=gamma, eta=1.0, m=m,
                batch_size=r)
  gz = np.asarray(jax.jit(jax.grad(
      lambda z: only_c.loss(ctx, ss, params, prepared, z)))(logits),
                  np.float64)
  want_g = np.zeros_like(lg)
  hit_p = sp[:, :2].max(1) + m - sp[:, 2:4].max(1) > 0
  for i in np.flatnonzero(hit_p):
    c = 2 + sp[i, 2:4].argmax()
    want_g[i, :4] -= sp[i, c] * ((np.arange(4) == c) - sp[i]) / hit_p.sum()
  hit_f = rows & (bad + m - good > 0)
  for i in np.flatnonzero(hit_f[:B]):
    want_g[i, np.flatnonzero(fut)[lg[i, fut].argmax()]] += 1 / hit_f.sum()
    want_g[i, 2 + lg[i, 2:4].argmax()] -= 1 / hit_f.sum()
  assert hit_p.any() and hit_f[:B].any()
  np.testing.assert_allclose(gz, want_g, atol=1e-6)
  # The stream's cross-entropy leaves the past classes out.
  task_loss = jit_ctx(s.task_loss)
  tl = float(task_loss(ctx, ss, logits, prepared))
  pl = lg[:, 2:] - np.log(np.exp(lg[:, 2:]).sum(1, keepdims=True))
  np.testing.assert_allclose(
      tl, -np.mean(pl[np.arange(B), np.asarray(batch["y"]) - 2]), rtol=1e-5)
  # A chained member's replayed row of a past class: over every class.
  mixed = dict(prepared, y=prepared["y"].at[0].set(1))
  tl = float(task_loss(ctx, ss, logits, mixed))
  ym = np.asarray(mixed["y"])
  full = lg - np.log(np.exp(lg).sum(1, keepdims=True))
  per = [full[0, 1]] + [pl[i, ym[i] - 2] for i in range(1, B)]
  np.testing.assert_allclose(tl, -np.mean(per), rtol=1e-5)
  # future_ce=False: the stream's cross-entropy over the current classes.
  tl = float(jit_ctx(xder(mem_size=k, batch_size=r,
                          future_ce=False).task_loss)(
      ctx, ss, logits, prepared))
  pc = lg[:, 2:4] - np.log(np.exp(lg[:, 2:4]).sum(1, keepdims=True))
  np.testing.assert_allclose(
      tl, -np.mean(pc[np.arange(B), np.asarray(batch["y"]) - 2]), rtol=1e-5)
  # The online update: every drawn entry is a past one, drawn once.
  info = StepInfo(params, params, None, None, prepared, jnp.float32(0.0),
                  jax.random.PRNGKey(5), logits)
  after_step = jit_ctx(s.after_step)
  after = after_step(ctx, ss, info)
  idx = np.concatenate([np.asarray(prepared["xder_i1"]),
                        np.asarray(prepared["xder_i2"])[ok2u]])
  assert np.all(np.asarray(after.counter)[idx] == 1)
  new = np.asarray(after.logits)[idx]
  old = np.asarray(ss.logits)[idx]
  np.testing.assert_array_equal(new[:, :2], old[:, :2])
  want_new = _np_update_logits(old, ob[np.r_[0:r, r + np.flatnonzero(ok2u)]],
                               yb[np.r_[0:r, r + np.flatnonzero(ok2u)]],
                               ~seen, gamma)
  np.testing.assert_allclose(new, want_new, rtol=1e-4, atol=1e-5)
  # Entries drawn many times before are rewritten with probability 1 / k.
  worn = after_step(ctx, ss._replace(counter=jnp.full((k,), 1e9)), info)
  np.testing.assert_array_equal(np.asarray(worn.logits), np.asarray(ss.logits))
  # The rewrite takes the network's outputs before the step (the code's
  # buffer outputs come from the step's forward pass), not after it.
  moved = jax.tree.map(lambda p: p * 1.3 + 0.02, params)
  info2 = info._replace(params_before=moved)
  after2 = after_step(ctx, ss, info2)
  sel = np.r_[0:r, r + np.flatnonzero(ok2u)]
  fm = lambda x: np.asarray(fwd(moved, ss.model_state, x,
                                jnp.zeros(len(x), jnp.int32)), np.float64)
  ob_m = np.concatenate([fm(prepared["xder_x1"]), fm(prepared["xder_x2"])])
  np.testing.assert_allclose(
      np.asarray(after2.logits)[idx],
      _np_update_logits(old, ob_m[sel], yb[sel], ~seen, gamma),
      rtol=1e-4, atol=1e-5)
  # At its second draw of the experience an entry is rewritten with
  # probability 1 / 2 (its counter counts this draw too).
  hits = []
  for i in range(40):
    a = after_step(ctx, ss._replace(counter=jnp.ones((k,)),
                                    key=jax.random.PRNGKey(100 + i)), info2)
    hits.append(np.any(np.asarray(a.logits)[idx] != old, axis=1))
  assert 0.35 < np.mean(hits) < 0.65, np.mean(hits)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(gamma=0.0), "xder: gamma must be a finite number > 0"),
    (dict(gamma=1.5), r"xder: gamma must be in \(0, 1\]"),
    (dict(eta=-1.0), "xder: eta must be a finite number >= 0"),
    (dict(alpha=-0.1), "xder: alpha must be a finite number >= 0"),
    (dict(beta=-0.1), "xder: beta must be a finite number >= 0"),
    (dict(m=float("nan")), "xder: m must be a finite number >= 0"),
    (dict(mem_size=0), "xder: mem_size"),
    (dict(future_ce="no"), "xder: future_ce"),
])
def test_xder_bad_arguments(kwargs, needle):
  from jaxcl.strategies.xder import xder
  with pytest.raises(ValueError, match=needle):
    xder(**kwargs)


def test_xder_needs_a_class_incremental_stream(digits):
  from jaxcl.strategies.xder import xder
  sc = scenarios.split(digits, 5, kind="task")
  ctx = make_ctx(sc)
  with pytest.raises(ValueError, match="xder .* class-incremental"):
    train.init_state(ctx, xder(mem_size=20), 0)
  ctx = make_ctx(scenarios.split(digits, 5))
  with pytest.raises(ValueError, match="mem_size=5 gives 0 examples"):
    train.init_state(ctx, xder(mem_size=5, batch_size=2), 0)
  # One output per class: a wider head is refused, gamma = 1 is allowed.
  info = train.stream_info(scenarios.split(digits, 5), B)
  wide = train.make_context(models.build("mlp", 12, widths=(32,)),
                            train.make_optimizer("sgd", 0.1), info)
  with pytest.raises(ValueError, match=r"xder needs one output per class "
                     r"\(10\); this model has 12"):
    train.init_state(wide, xder(mem_size=20), 0)
  train.init_state(ctx, xder(mem_size=20, gamma=1.0), 0)


def test_xder_first_experience_label_term_over_its_classes(stream):
  """In the first experience no class is past: the label term on the
  second memory batch is the cross-entropy over the current classes."""
  from jaxcl.strategies.xder import xder
  ctx = make_ctx(stream)
  r = 4
  s = xder(mem_size=24, alpha=0.0, beta=1.0, eta=0.0, batch_size=r)
  e0 = stream.experiences[0]
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  b = batch_of(e0, n=20)
  ss = state.strategy
  ss = ss._replace(memory=buffers.reservoir_add(
      ss.memory, jax.random.PRNGKey(1), b["x"], b["y"], b["task"], 0))
  prepared = jit_ctx(s.prepare_batch)(ctx, ss, batch_of(e0, start=20),
                                      jax.random.PRNGKey(3))
  fwd = logits_fn(ctx)
  logits = fwd(state.params, ss.model_state, prepared["x"], prepared["task"])
  got = float(jit_ctx(s.loss)(ctx, ss, state.params, prepared, logits))
  o2 = np.asarray(fwd(state.params, ss.model_state, prepared["xder_x2"],
                      prepared["xder_task2"]), np.float64)
  y2 = np.asarray(prepared["xder_y2"])
  assert np.asarray(prepared["xder_ok2"]).all()
  want = -np.mean(np_log_softmax(o2[:, :2])[np.arange(r), y2])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_xder_memory_stays_full_with_an_uneven_share(stream):
  """K = 25: the free slots do not split evenly between the two new
  classes (25 after experience 0; 13 after experience 1, when the old
  classes keep 6 each); one of them takes the remainder, and the memory
  stays full."""
  from jaxcl.strategies.xder import xder
  ctx = make_ctx(stream)
  s = xder(mem_size=25, batch_size=4)
  state = train.init_state(ctx, s, 0)
  counts = []
  for e in stream.experiences:
    state = s.after_experience(ctx, s.before_experience(ctx, state, e), e)
    mem = state.strategy.memory
    valid = np.asarray(mem.valid)
    counts.append(np.bincount(np.asarray(mem.y)[valid], minlength=10))
    assert valid.all()
  assert sorted(counts[0][:2]) == [12, 13] and counts[0][2:].sum() == 0
  assert list(counts[1][:2]) == [6, 6] and sorted(counts[1][2:4]) == [6, 7]


def _momentum_config(spec, **kwargs):
  """``config`` with momentum, weight decay and the optimiser state kept
  across experiences: what a frozen lower part must withstand."""
  cfg = config(spec, **kwargs)
  cfg.optimizer.name = "momentum"
  cfg.optimizer.weight_decay = 0.05
  cfg.train.reset_optimizer = False
  return cfg


@pytest.fixture(scope="module")
def naive_first_params(stream):
  """Fine-tuning's parameters after the first experience under
  ``_momentum_config`` (run once for both frozen specs)."""
  first = dataclasses.replace(stream, experiences=stream.experiences[:1])
  return experiment.run(_momentum_config("naive"),
                        scenario=first).state.params


@pytest.mark.parametrize("spec", ["latent_replay", "exstream"])
def test_frozen_lower_part_stays_put(stream, spec, naive_first_params):
  # A zero gradient is not enough to freeze: weight decay, and momentum
  # carried over from the first experience, move the lower part, and the
  # stored latents would go stale (session 32). The lower part after the
  # second experience must be exactly what the first left.
  cfg = _momentum_config(spec, **{spec: dict(mem_size=40)})
  first = dataclasses.replace(stream, experiences=stream.experiences[:1])
  p1 = experiment.run(cfg, scenario=first).state.params
  p2 = experiment.run(cfg, scenario=stream).state.params
  jax.tree.map(np.testing.assert_array_equal, p1["backbone"], p2["backbone"])
  assert not np.allclose(p1["head"]["kernel"], p2["head"]["kernel"])
  # ... and the first experience trained it, as fine-tuning does (an empty
  # memory adds nothing).
  p0 = naive_first_params
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-7), p1["backbone"], p0["backbone"])


@pytest.mark.parametrize("spec", ["latent_replay", "exstream"])
def test_frozen_lower_part_is_a_declared_mask(stream, spec):
  """Frozen, the lower part's gradient mask is declared (freeze_grads):
  a member after it in a chain that adds gradient (MIR, RAR) reads it as
  ctx.freeze and adds none to the lower part, so that order is allowed
  (session 36), as La-MAML and MER beside it are. Slowed, it is a scale,
  not a mask: nothing is declared and chain() refuses those."""
  from jaxcl import strategies
  from jaxcl.strategy import Strategy, chain
  kw = {"mem_size": 40}
  member = strategies.get(spec, **kw)
  ctx = make_ctx(stream)
  state = train.init_state(ctx, member, 0)
  ones = jax.tree.map(jnp.ones_like, state.params)
  lower = lat.split_model(ctx, "backbone").lower_mask(state.params)
  for e, want in ((0, 1.0), (1, 0.0)):   # frozen from experience 1 on
    ss = state.strategy._replace(experience=jnp.asarray(e))
    out = member.freeze_grads(ctx, ss, ones)
    jax.tree.map(lambda g, m: np.testing.assert_array_equal(
        g, want if m else 1.0), out, lower)
  # A member after it that adds gradient, as MIR and RAR do.
  adder = Strategy(update_grads=lambda c, ss, g, p, b, k: jax.tree.map(
      jnp.add, g, c.freeze(jax.tree.map(jnp.ones_like, g))), name="adder")
  c = chain(member, adder)
  cs = train.init_state(ctx, c, 0).strategy
  cs = (cs[0]._replace(experience=jnp.asarray(1)), cs[1])
  out = c.update_grads(ctx, cs, ones, state.params, None,
                       jax.random.PRNGKey(0))
  jax.tree.map(lambda g, m: np.testing.assert_array_equal(
      g, 0.0 if m else 2.0), out, lower)
  # Slowed: no mask declared, and an adder after it is refused, as is La-MAML
  # or MER, whose look-ahead would move the lower part at the full rate,
  # on either side (frozen, they keep it fixed in every inner step).
  assert strategies.get(spec, lower_lr_scale=0.5, **kw).freeze_grads is None
  for stepper in ("lamaml", "mer"):
    for order in ((spec, stepper), (stepper, spec)):
      with pytest.raises(ValueError, match=f"{spec} slows the layers below "
                         f"its split .* {stepper}'s step is an inner loop"):
        strategies.from_spec("+".join(order),
                             {spec: dict(lower_lr_scale=0.5, **kw)})
      strategies.from_spec("+".join(order), {spec: kw})
  for adder_name in ("mir", "rar"):
    with pytest.raises(ValueError, match=f"{spec} slows the layers below "
                       f"its split .* {adder_name}, after it, adds its own "
                       f"rows' gradient at the full rate"):
      strategies.from_spec(f"{spec}+{adder_name}",
                           {spec: dict(lower_lr_scale=0.5, **kw)})
    strategies.from_spec(f"{spec}+{adder_name}", {spec: kw})
    strategies.from_spec(f"{adder_name}+{spec}",
                         {spec: dict(lower_lr_scale=0.5, **kw)})
