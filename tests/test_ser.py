"""SER (Zhuo et al. 2023): the loss by hand against NumPy, its gradient,
the first experience's plain cross-entropy, the memory and the old model
an experience's end keeps, forgetting on Split Digits, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax
from jaxcl import experiment, train
from jaxcl.strategies.ser import ser, ser_terms
from test_replay import (B, after_first, assert_steps_as_naive, batch_of,
                         config, jit_ctx, make_ctx)

ALPHA, BETA = 0.7, 1.9


def _np_ser(out_mem, y_mem, z_mem, out, out_old):
  """SER's terms after the batch's cross-entropy, in NumPy (all rows
  valid): the memory rows' cross-entropy, ALPHA times their mean squared
  error to the stored logits, BETA times the batch's to the old model."""
  ce = -np_log_softmax(out_mem)[np.arange(len(y_mem)), y_mem].mean()
  return (ce + ALPHA * np.mean((out_mem - z_mem) ** 2)
          + BETA * np.mean((out - out_old) ** 2))


@pytest.fixture(scope="module")
def second(stream):
  """A SER learner after 6 steps of experience 0, its end, and 3 steps
  of experience 1 (the parameters then differ from the old model's):
  ``(ctx, strategy, state, step)``."""
  ctx = make_ctx(stream)
  s = ser(mem_size=40, alpha=ALPHA, beta=BETA)
  state, step = after_first(ctx, s, stream, steps=6)
  e1 = stream.experiences[1]
  for i in range(3):
    state = step(state, batch_of(e1, start=B * i))
  return ctx, s, state, step


def test_ser_loss_is_hand_computed(second, stream):
  ctx, s, state, _ = second
  ss = state.strategy
  assert bool(ss.ready)
  batch = batch_of(stream.experiences[1], start=5 * B)
  prepared = jit_ctx(s.prepare_batch)(ctx, ss, batch, jax.random.PRNGKey(4))
  # One memory batch of the training batch's size, with labels.
  assert prepared["ser_x"].shape == (B,) + batch["x"].shape[1:]
  assert float(prepared["ser_ok"].sum()) == B
  fwd = jax.jit(lambda p, x, t: ctx.logits(p, {}, x, t, train=True))
  out = fwd(state.params, batch["x"], batch["task"])
  got = float(jit_ctx(s.loss)(ctx, ss, state.params, prepared, out))
  out_mem = np.asarray(fwd(state.params, prepared["ser_x"],
                           prepared["ser_task"]))
  out_old = np.asarray(fwd(ss.old, batch["x"], batch["task"]))
  want = _np_ser(out_mem, np.asarray(prepared["ser_y"]),
                 np.asarray(prepared["ser_z"]), np.asarray(out), out_old)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Every term counts: the forward one (the model has moved since the old
  # one was kept) and the backward one (stored logits are not today's).
  assert np.mean((np.asarray(out) - out_old) ** 2) > 1e-3
  assert np.mean((out_mem - np.asarray(prepared["ser_z"])) ** 2) > 1e-3
  # The stored rows are the memory's, labels and logits at their slots.
  mem_x = np.asarray(ss.memory.x)
  for x, y, z in zip(np.asarray(prepared["ser_x"]),
                     np.asarray(prepared["ser_y"]),
                     np.asarray(prepared["ser_z"])):
    slot = np.flatnonzero((mem_x == x).reshape(len(mem_x), -1).all(1))[0]
    assert y == int(ss.memory.y[slot])
    np.testing.assert_array_equal(z, np.asarray(ss.logits[slot]))


def test_ser_gradient_is_that_of_its_terms(second, stream):
  # The gradient of the loss hook is that of ser_terms written out (the
  # memory rows' and the batch's outputs from the parameters, the old
  # model's a constant): no term is lost from the differentiated path.
  ctx, s, state, _ = second
  ss = state.strategy
  batch = batch_of(stream.experiences[1], start=6 * B)
  prepared = jit_ctx(s.prepare_batch)(ctx, ss, batch, jax.random.PRNGKey(5))

  def hook(params):
    out = ctx.logits(params, {}, batch["x"], batch["task"], train=True)
    return s.loss(ctx, ss, params, prepared, out)

  def by_hand(params):
    out = ctx.logits(params, {}, batch["x"], batch["task"], train=True)
    out_mem = ctx.logits(params, {}, prepared["ser_x"],
                         prepared["ser_task"], train=True)
    old = ctx.logits(ss.old, {}, batch["x"], batch["task"])
    return ser_terms(out_mem, prepared["ser_y"], prepared["ser_z"],
                     prepared["ser_ok"], out, old, batch["mask"], ALPHA, BETA)

  g_hook = jax.jit(jax.grad(hook))(state.params)
  g_hand = jax.jit(jax.grad(by_hand))(state.params)
  for a, b in zip(jax.tree.leaves(g_hook), jax.tree.leaves(g_hand)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-7)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g_hook)) > 0


def test_ser_first_experience_trains_as_naive_while_its_memory_fills(stream):
  # Before an experience has ended the hook adds nothing and the step is
  # Naive's, bit for bit; the reservoir still stores the incoming rows
  # with the step's logits.
  ctx = make_ctx(stream)
  e0 = stream.experiences[0]
  s = ser(mem_size=40, alpha=ALPHA, beta=BETA)
  st_s = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  first = batch_of(e0)
  logits0 = np.asarray(ctx.logits(st_s.params, {}, first["x"],
                                  first["task"], train=True))
  ss = assert_steps_as_naive(ctx, s, st_s, e0).strategy
  assert not bool(ss.ready) and int(ss.memory.seen) == 3 * B
  np.testing.assert_array_equal(np.asarray(ss.memory.x[:B]), first["x"])
  np.testing.assert_allclose(np.asarray(ss.logits[:B]), logits0, rtol=1e-5,
                             atol=1e-6)


def test_ser_experience_end_keeps_the_model_as_the_old_one(second, stream):
  # At the first experience's end the old model is the parameters as they
  # were; later steps move the parameters, not the old model.
  ctx = make_ctx(stream)
  s = ser(mem_size=40)
  e0 = stream.experiences[0]
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  state = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])(
      state, batch_of(e0))
  ended = s.after_experience(ctx, state, e0)
  assert bool(ended.strategy.ready)
  for a, b in zip(jax.tree.leaves(ended.strategy.old),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, _, later, _ = second
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(later.params), jax.tree.leaves(later.strategy.old))]
  assert max(moved) > 1e-4


def test_ser_keeps_old_classes_on_split_digits(full_stream):
  """The two consistency terms slow forgetting: after the stream, SER's
  accuracy on the first experience is well above Naive's, and above its
  own run without the forward term (beta 0) on average over the stream's
  earlier experiences."""
  accs = {}
  for name, spec, kw in (
      ("naive", "naive", {}),
      ("ser", "ser", dict(ser=dict(mem_size=100, alpha=0.5, beta=1.0))),
      ("ser_b0", "ser", dict(ser=dict(mem_size=100, alpha=0.5, beta=0.0)))):
    cfg = config(spec, **kw)
    cfg.train.epochs = 2
    accs[name] = experiment.run(cfg, scenario=full_stream).accuracy
  assert accs["naive"][-1, 0] < 0.1, accs["naive"]
  assert accs["ser"][-1, 0] > 0.5, accs["ser"]
  old = lambda a: float(a[-1, :-1].mean())  # noqa: E731
  assert old(accs["ser"]) > old(accs["ser_b0"]), (accs["ser"],
                                                   accs["ser_b0"])


def test_ser_bad_inputs(stream):
  for kw, match in (
      ({"alpha": -0.1}, "ser: alpha must be a finite number >= 0, got -0.1"),
      ({"beta": float("nan")}, "ser: beta must be a finite number >= 0"),
      ({"mem_size": 0}, "ser: mem_size"),
      ({"batch_size": -1}, "ser: batch_size")):
    with pytest.raises(ValueError, match=match):
      ser(**kw)
  # A replayed batch larger than the memory: refused at init.
  ctx = make_ctx(stream)
  with pytest.raises(ValueError, match="ser"):
    train.init_state(ctx, ser(mem_size=5), 0)
