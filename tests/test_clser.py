"""CLS-ER (jaxcl/strategies/clser.py): the semantic memories' stochastic EMA
updates, the consistency target and loss, prediction with the stable
model, argument checks, and a run through the normal loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_softmax
from jaxcl import buffers, scenarios, train
from jaxcl.state import StepInfo
from jaxcl.strategies import clser as clser_mod
from jaxcl.strategies.clser import clser
from test_replay import B, batch_of, config, make_ctx, run_capture


def _tree(seed, like):
  """A pytree shaped like ``like`` with normal entries drawn from ``seed``."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, l.shape, l.dtype)
                            for k, l in zip(keys, leaves)])


def _close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def _info(ctx, s, ss, exp, params_after, key):
  batch = s.prepare_batch(ctx, ss, batch_of(exp), jax.random.PRNGKey(9))
  return StepInfo(None, params_after, None, None, batch, jnp.zeros(()), key)


@pytest.mark.parametrize("jit", [False, True])
def test_ema_update_is_the_code_formula_when_drawn(stream, jit):
  ctx = make_ctx(stream)
  exp = stream.experiences[0]
  state = train.init_state(ctx, clser(mem_size=20), 0)
  p, s_, w = (_tree(i, state.params) for i in (1, 2, 3))
  cases = ((0, 0.99, 0.9), (5, 0.99, 0.8), (400, 0.95, 0.9))
  # Eagerly (Python branching on values would show) on the ramp's first
  # step only, to keep the file fast.
  for step, alpha_p, alpha_s in (cases if jit else cases[:1]):
    # Always the plastic memory, never the stable one.
    s = clser(mem_size=20, plastic_rate=1.0, plastic_alpha=alpha_p,
              stable_rate=0.0, stable_alpha=alpha_s)
    ss = state.strategy._replace(plastic=p, stable=s_,
                                 step=jnp.asarray(step, jnp.int32))
    hook = lambda ss, info: s.after_step(ctx, ss, info)
    out = (jax.jit(hook) if jit else hook)(
        ss, _info(ctx, s, ss, exp, w, jax.random.PRNGKey(step)))
    t = step + 1   # the code's global_step after the step
    a = min(1 - 1 / (t + 1), alpha_p)
    _close(out.plastic, jax.tree.map(lambda e, x: a * e + (1 - a) * x, p, w),
           rtol=1e-6, atol=1e-6)
    _close(out.stable, s_, rtol=0, atol=0)
    assert int(out.step) == t
  assert a == (0.95 if jit else 0.5)   # past the ramp / its first step


def test_ema_update_follows_the_bernoulli_draw(stream):
  ctx = make_ctx(stream)
  exp = stream.experiences[0]
  # Different decays, so that each memory's own is the one checked.
  s = clser(mem_size=20, plastic_rate=0.3, stable_rate=0.6,
            plastic_alpha=0.9, stable_alpha=0.6)
  state = train.init_state(ctx, s, 0)
  w = _tree(3, state.params)
  ss = state.strategy._replace(step=jnp.asarray(100, jnp.int32))
  hook = jax.jit(lambda ss, info: s.after_step(ctx, ss, info))
  moved = {"plastic": [], "stable": []}
  for i in range(40):
    key = jax.random.PRNGKey(i)
    out = hook(ss, _info(ctx, s, ss, exp, w, key))
    k_p, k_s = jax.random.split(key)
    for name, k, rate, a in (("plastic", k_p, 0.3, 0.9),
                             ("stable", k_s, 0.6, 0.6)):
      want = float(jax.random.uniform(k)) < rate
      old, new = getattr(ss, name), getattr(out, name)
      if want:
        _close(new, jax.tree.map(lambda e, x: a * e + (1 - a) * x, old, w),
               rtol=1e-6, atol=1e-6)
      else:
        _close(new, old, rtol=0, atol=0)
      moved[name].append(want)
  # Both outcomes occur, in about the asked proportions.
  assert 0 < sum(moved["plastic"]) < sum(moved["stable"]) < 40


def test_consistency_target_picks_the_surer_memory_per_row():
  y = jnp.array([0, 1, 2, 1])
  plastic = jnp.array([[2.0, 0.0, 0.0],    # p(y=0) high: plastic wins
                       [0.0, 0.0, 1.0],    # p(y=1) low
                       [1.0, 1.0, 1.0],    # tie with stable: plastic
                       [0.0, 3.0, 0.0]])
  stable = jnp.array([[0.0, 1.0, 0.0],
                      [0.0, 2.0, 0.0],     # stable wins
                      [2.0, 2.0, 2.0],     # same softmax as plastic's
                      [0.0, 1.0, 5.0]])
  got = np.asarray(clser_mod.consistency_target(plastic, stable, y))
  want = np.stack([plastic[0], stable[1], plastic[2], plastic[3]])
  np.testing.assert_array_equal(got, want)
  # Swapping the memories swaps the strict winners; the tie stays with the
  # first argument (the plastic model), as in the code's torch.where.
  got = np.asarray(clser_mod.consistency_target(stable, plastic, y))
  np.testing.assert_array_equal(
      got, np.stack([plastic[0], stable[1], stable[2], plastic[3]]))


def test_step_loss_is_cross_entropy_plus_lambda_consistency(stream):
  ctx = make_ctx(stream)
  e0 = stream.experiences[0]
  lam, r = 1.7, 6
  s = clser(mem_size=8, batch_size=r, lam=lam)
  state = train.init_state(ctx, s, 0)
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  state = step(state, batch_of(e0))   # 10 offered: the memory is full
  assert int(buffers.size(state.strategy.memory)) == 8
  # Memories far from the working model (and from each other).
  ss = state.strategy._replace(plastic=_tree(1, state.params),
                               stable=_tree(2, state.params))
  state = state.replace(strategy=ss)
  batch = batch_of(e0, start=B)
  # The memory rows the step draws: prepare_batch with the step's key.
  key = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)[0]
  prepared = s.prepare_batch(ctx, ss, batch, key)
  new, loss = jax.jit(lambda st, b: train.train_step(ctx, s, st, b))(
      state, batch)
  f = lambda p: np.asarray(ctx.logits(p, {}, prepared["x"], prepared["task"],
                                      train=True), np.float64)
  z, zp, zs = f(state.params), f(ss.plastic), f(ss.stable)
  y = np.asarray(prepared["y"])
  n = B + r
  assert z.shape[0] == n and np.asarray(prepared["mask"]).sum() == n
  ce = -np.log(np_softmax(z)[np.arange(n), y]).mean()
  rows = slice(B, n)
  pick_s = (np_softmax(zs)[np.arange(n), y] >
            np_softmax(zp)[np.arange(n), y])
  target = np.where(pick_s[:, None], zs, zp)[rows]
  assert 0 < pick_s[rows].sum() < r   # both memories chosen somewhere
  cons = ((z[rows] - target) ** 2).mean()
  np.testing.assert_allclose(float(loss), ce + lam * cons, rtol=1e-5)
  # The consistency term alone, from the hook.
  hook = s.loss(ctx, ss, state.params, prepared,
                jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(float(hook), lam * cons, rtol=1e-5)
  # Only the working model trains; the memories then move towards it.
  assert int(new.strategy.step) == 2


def test_consistency_ignores_empty_memory_rows(stream):
  ctx = make_ctx(stream)
  e0 = stream.experiences[0]
  s = clser(mem_size=20, batch_size=8, lam=5.0)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy._replace(plastic=_tree(1, state.params),
                               stable=_tree(2, state.params))
  prepared = s.prepare_batch(ctx, ss, batch_of(e0), jax.random.PRNGKey(0))
  z = ctx.logits(state.params, {}, prepared["x"], prepared["task"])
  # Empty memory: 0 (the code skips the term).
  assert float(s.loss(ctx, ss, state.params, prepared, z)) == 0.0
  # 3 entries, 8 drawn: the mean runs over the 3 valid rows only.
  mem = buffers.reservoir_add(ss.memory, jax.random.PRNGKey(1),
                              prepared["x"][:3], prepared["y"][:3],
                              prepared["task"][:3], jnp.int32(0),
                              jnp.ones((3,)))
  ss = ss._replace(memory=mem)
  prepared = s.prepare_batch(ctx, ss, batch_of(e0), jax.random.PRNGKey(0))
  ok = np.asarray(prepared["mask"][B:]) > 0
  assert ok.sum() == 3
  z = ctx.logits(state.params, {}, prepared["x"], prepared["task"])
  f = lambda p: np.asarray(ctx.logits(p, {}, prepared["x"][B:],
                                      prepared["task"][B:], train=True))
  t = np.asarray(clser_mod.consistency_target(
      jnp.asarray(f(ss.plastic)), jnp.asarray(f(ss.stable)),
      prepared["y"][B:]))
  want = 5.0 * ((np.asarray(z[B:]) - t) ** 2)[ok].mean()
  np.testing.assert_allclose(
      float(s.loss(ctx, ss, state.params, prepared, z)), want, rtol=1e-5)


def test_memories_start_as_copies_of_the_working_model(stream):
  """Both semantic memories start equal to the initial working weights
  (the code deep-copies the net), as separate arrays."""
  ctx = make_ctx(stream)
  state = train.init_state(ctx, clser(mem_size=20), 0)
  ss = state.strategy
  for mem in (ss.plastic, ss.stable):
    _close(mem, state.params, rtol=0, atol=0)
    for a, b in zip(jax.tree.leaves(mem), jax.tree.leaves(state.params)):
      assert a is not b
  assert int(ss.step) == 0


def _head_only(params, bias):
  """``params`` with a zero head kernel and head bias ``bias``: logits are
  ``bias`` exactly, whatever the input."""
  out = jax.tree.map(jnp.copy, params)
  out["head"]["kernel"] = jnp.zeros_like(out["head"]["kernel"])
  out["head"]["bias"] = jnp.asarray(bias, jnp.float32)
  return out


def test_step_loss_gives_a_tie_to_the_plastic_memory(stream):
  """Memories whose logits differ by a constant have the same softmax: a
  tie on every row, which the plastic model wins (the code's
  ``torch.where(sm_stable > sm_plastic, stable, plastic)``)."""
  ctx = make_ctx(stream)
  e0 = stream.experiences[0]
  s = clser(mem_size=20, batch_size=6, lam=1.5)
  state = train.init_state(ctx, s, 0)
  bias = np.arange(10, dtype=np.float32) * 0.5
  ss = state.strategy._replace(plastic=_head_only(state.params, bias),
                               stable=_head_only(state.params, bias + 1.0))
  # The tie is exact: the same softmax bit for bit.
  assert np.array_equal(np.asarray(jax.nn.softmax(jnp.asarray(bias))),
                        np.asarray(jax.nn.softmax(jnp.asarray(bias + 1.0))))
  ss = ss._replace(memory=buffers.reservoir_add(
      ss.memory, jax.random.PRNGKey(1), jnp.asarray(e0.train_x[:8]),
      jnp.asarray(e0.train_y[:8]), jnp.zeros((8,), jnp.int32), jnp.int32(0),
      jnp.ones((8,))))
  prepared = s.prepare_batch(ctx, ss, batch_of(e0, start=B),
                             jax.random.PRNGKey(0))
  z = ctx.logits(state.params, {}, prepared["x"], prepared["task"])
  want = 1.5 * ((np.asarray(z[B:], np.float64) - bias) ** 2).mean()
  np.testing.assert_allclose(
      float(s.loss(ctx, ss, state.params, prepared, z)), want, rtol=1e-5)


def test_memory_logits_use_each_rows_task(digits):
  """Task-incremental: the memories' logits on the replayed rows are
  masked to each row's own task (as the working model's), so the masked
  entries agree and only the task's classes enter the squared error."""
  ts = scenarios.split(digits, 5, kind="task")
  ctx = make_ctx(ts)
  assert ctx.mask_task_logits
  lam, r = 1.3, 6
  s = clser(mem_size=20, batch_size=r, lam=lam)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy._replace(plastic=_tree(1, state.params),
                               stable=_tree(2, state.params))
  e0, e1, e2 = ts.experiences[:3]
  rows = [(e, slice(0, 2)) for e in (e0, e1, e2)]
  x = np.concatenate([e.train_x[sl] for e, sl in rows])
  y = np.concatenate([e.train_y[sl] for e, sl in rows])
  t = np.concatenate([e.train_task[sl] for e, sl in rows])
  assert set(t) == {0, 1, 2}
  ss = ss._replace(memory=buffers.reservoir_add(
      ss.memory, jax.random.PRNGKey(1), jnp.asarray(x), jnp.asarray(y),
      jnp.asarray(t, jnp.int32), jnp.int32(0), jnp.ones((6,))))
  prepared = s.prepare_batch(ctx, ss, batch_of(e2), jax.random.PRNGKey(0))
  assert np.asarray(prepared["mask"][B:]).sum() == r
  # Unmasked outputs (a class-incremental context on the same model), then
  # NumPy's mask from the scenario's task table.
  raw_ctx = dataclasses.replace(ctx, mask_task_logits=False)
  xr, tr = prepared["x"][B:], np.asarray(prepared["task"][B:])
  allowed = np.asarray(ts.task_classes, bool)[tr]
  raw = lambda p: np.asarray(raw_ctx.logits(p, {}, xr, jnp.asarray(tr),
                                            train=True), np.float64)
  mask = lambda a: np.where(allowed, a, -1e9)
  z, zp, zs = mask(raw(state.params)), mask(raw(ss.plastic)), mask(raw(
      ss.stable))
  yr = np.asarray(prepared["y"][B:])
  i = np.arange(r)
  pick_s = np_softmax(zs)[i, yr] > np_softmax(zp)[i, yr]
  target = np.where(pick_s[:, None], zs, zp)
  want = lam * ((z - target) ** 2).mean()
  z_all = ctx.logits(state.params, {}, prepared["x"], prepared["task"],
                     train=True)
  np.testing.assert_allclose(
      float(s.loss(ctx, ss, state.params, prepared, z_all)), want,
      rtol=1e-5)
  assert want < 1e3   # the -1e9 entries cancel


def test_replayed_rows_follow_the_steps_key(stream):
  """Each step draws its own memory rows (from the key ``prepare_batch``
  is given), uniformly without replacement from the stored ones."""
  ctx = make_ctx(stream)
  e0 = stream.experiences[0]
  s = clser(mem_size=20, batch_size=6)
  ss = train.init_state(ctx, s, 0).strategy
  ss = ss._replace(memory=buffers.reservoir_add(
      ss.memory, jax.random.PRNGKey(1), jnp.asarray(e0.train_x[:20]),
      jnp.asarray(e0.train_y[:20]), jnp.zeros((20,), jnp.int32),
      jnp.int32(0), jnp.ones((20,))))
  prep = jax.jit(lambda ss, k: s.prepare_batch(ctx, ss, batch_of(e0), k))
  stored = np.asarray(e0.train_x[:20]).reshape(20, -1)
  drawn = []
  for k in range(6):
    x = np.asarray(prep(ss, jax.random.PRNGKey(k))["x"][B:]).reshape(6, -1)
    ids = [int(np.flatnonzero((stored == row).all(1))[0]) for row in x]
    assert len(set(ids)) == 6
    drawn.append(frozenset(ids))
  assert len(set(drawn)) == 6   # six keys, six different draws


@pytest.mark.parametrize("which", clser_mod.PREDICT_WITH)
def test_predict_uses_the_chosen_models_parameters(stream, which):
  ctx = make_ctx(stream)
  s = clser(mem_size=20, predict_with=which)
  state = train.init_state(ctx, s, 0)
  models = {"working": state.params, "plastic": _tree(1, state.params),
            "stable": _tree(2, state.params)}
  ss = state.strategy._replace(plastic=models["plastic"],
                               stable=models["stable"])
  x = jnp.asarray(stream.experiences[0].test_x[:7])
  task = jnp.zeros((7,), jnp.int32)
  got = np.asarray(jax.jit(lambda ss, p: s.predict(ctx, ss, p, {}, x, task))(
      ss, state.params))
  for name, params in models.items():
    want = np.asarray(ctx.logits(params, {}, x, task))
    if name == which:
      np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
      assert np.abs(got - want).max() > 1e-3


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mem_size=0), "clser: mem_size must be a positive int"),
    (dict(lam=-1.0), "clser: lam must be a finite number >= 0"),
    (dict(lam=float("nan")), "clser: lam must be a finite number >= 0"),
    (dict(plastic_rate=1.5), r"clser: plastic_rate must be a number in \[0, "
     r"1\], got 1.5"),
    (dict(stable_rate=-0.1), r"clser: stable_rate must be .* got -0.1"),
    (dict(plastic_alpha=float("nan")), "clser: plastic_alpha must be"),
    (dict(stable_alpha=True), "clser: stable_alpha must be .* got True"),
    (dict(batch_size=-1), "clser: batch_size must be an int >= 0"),
    (dict(mem_size=20, batch_size=30), "clser: batch_size=30 is larger than "
     "the memory capacity mem_size=20"),
    (dict(predict_with="ema"), "clser: unknown predict_with 'ema'; valid: "
     r"\['stable', 'plastic', 'working'\]"),
])
def test_clser_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    clser(**kwargs)


def test_clser_default_batch_larger_than_memory_fails_at_init(stream):
  ctx = make_ctx(stream)   # training batch 10 > memory 5
  with pytest.raises(ValueError, match="clser: batch_size=10 is larger"):
    clser(mem_size=5).init(ctx, jax.random.PRNGKey(0), None)


def test_clser_trains_through_the_loop(monkeypatch, stream):
  # Digits has ~36 steps per experience: faster averages than the
  # defaults, so that the stable model catches up within one.
  cfg = config("clser", clser=dict(mem_size=60, stable_rate=0.8,
                                   plastic_alpha=0.8, stable_alpha=0.9))
  result, learner = run_capture(monkeypatch, cfg, stream)
  assert learner.chunk_fn._cache_size() == 1   # no recompilation
  ss = result.state.strategy
  assert np.all(np.isfinite(result.accuracy))
  # Every optimiser step counted (the ramp's t), the reservoir fed.
  assert int(ss.step) == int(result.state.step) > 0
  total = sum(e.num_train for e in stream.experiences)
  assert int(ss.memory.seen) == total
  assert int(buffers.size(ss.memory)) == 60
  # The memories are averages, not copies, of the working model, and the
  # reported accuracy is the stable model's: it keeps experience 0.
  for mem in (ss.plastic, ss.stable):
    diff = max(float(jnp.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(mem), jax.tree.leaves(result.state.params)))
    assert diff > 1e-4
  assert result.accuracy[1, 0] > 0.3, result.accuracy
  assert result.accuracy[1, 1] > 0.5, result.accuracy
