"""ER-ACL (Avalanche's ER_ACL): the loss by hand against NumPy, the
class-balanced memory filled as an experience starts, the first
experience's plain cross-entropy, no replay without an old class,
forgetting on Split Digits, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax
from jaxcl import experiment, scenarios, train
from jaxcl.strategies.er_acl import er_acl
from test_replay import (B, after_first, assert_steps_as_naive, config,
                         jit_ctx, logits_fn, make_ctx)


def _np_ce(logits, y):
  return float(-np_log_softmax(logits)[np.arange(len(y)), y].mean())


def test_er_acl_loss_is_hand_computed(stream):
  # In experience 1 (classes 2, 3; classes 0, 1 old) the incoming rows are
  # scored over every class but the old ones, the replayed rows over all.
  # (state.strategy's seen classes cover 0-3, so ER-ACE's mask differs.)
  ctx = make_ctx(stream)
  s = er_acl(mem_size=40, batch_size=6)
  state, _ = after_first(ctx, s, stream, steps=5)
  ss = state.strategy
  np.testing.assert_array_equal(np.asarray(ss.old),
                                np.arange(10) < 2)  # classes 0, 1
  # A batch of class 2 alone: ER-ACE would mask class 3 as well (seen,
  # absent from the batch); ER-ACL masks by experience, the old classes.
  e1 = stream.experiences[1]
  rows = np.flatnonzero(e1.train_y == 2)[:B]
  batch = {"x": jnp.asarray(e1.train_x[rows]),
           "y": jnp.asarray(e1.train_y[rows]),
           "task": jnp.asarray(e1.train_task[rows]),
           "mask": jnp.ones((B,), jnp.float32)}
  prepared = jit_ctx(s.prepare_batch)(ctx, ss, batch, jax.random.key(3))
  assert prepared["x"].shape[0] == B + 6
  assert float(prepared["mask"][B:].sum()) == 6
  out = logits_fn(ctx)(
      state.params, {}, prepared["x"], prepared["task"])
  got = float(jit_ctx(s.task_loss)(ctx, ss, out, prepared))
  z, y = np.asarray(out, np.float64), np.asarray(prepared["y"])
  want = (_np_ce(z[:B, 2:], y[:B] - 2)     # old classes 0, 1 left out
          + _np_ce(z[B:], y[B:]))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The replayed rows hold current classes too (the memory has them).
  assert set(y[B:].tolist()) <= {0, 1, 2, 3}
  # The incoming rows' term leaves the old logits alone: their gradient
  # through it is zero.
  g = jax.grad(lambda o: jit_ctx(s.task_loss)(
      ctx, ss, o, {**prepared, "mask": prepared["mask"].at[B:].set(0)}))(out)
  assert float(jnp.abs(g[:B, :2]).max()) == 0.0
  assert float(jnp.abs(g[:B, 2:]).max()) > 0.0


def test_er_acl_memory_is_class_balanced_and_filled_at_the_start(stream):
  # The memory is filled before the experience's first step, with each
  # class seen keeping mem_size // classes of its own rows.
  ctx = make_ctx(stream)
  s = er_acl(mem_size=40)
  e0, e1 = stream.experiences[:2]
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  mem = state.strategy.memory
  counts = np.bincount(np.asarray(mem.y)[np.asarray(mem.valid)],
                       minlength=10)
  np.testing.assert_array_equal(counts[:2], [20, 20])
  assert counts[2:].sum() == 0 and not bool(state.strategy.old.any())
  state = s.after_experience(ctx, state, e0)
  state = s.before_experience(ctx, state, e1)
  mem = state.strategy.memory
  valid = np.asarray(mem.valid)
  counts = np.bincount(np.asarray(mem.y)[valid], minlength=10)
  np.testing.assert_array_equal(counts[:4], [10, 10, 10, 10])
  # Every entry is a training row of its class, once.
  xs = np.concatenate([e0.train_x, e1.train_x]).reshape(-1, 64)
  ys = np.concatenate([e0.train_y, e1.train_y])
  rows = np.asarray(mem.x)[valid].reshape(-1, 64)
  for x, y in zip(rows, np.asarray(mem.y)[valid]):
    hit = np.flatnonzero((xs == x).all(1))
    assert len(hit) >= 1 and ys[hit[0]] == y
  assert len(np.unique(rows, axis=0)) == len(rows)


def test_er_acl_first_experience_trains_as_naive(stream):
  # No class is old yet: no row replayed, the plain cross-entropy, and the
  # step is Naive's bit for bit.
  ctx = make_ctx(stream)
  e0 = stream.experiences[0]
  s = er_acl(mem_size=40)
  assert_steps_as_naive(
      ctx, s, s.before_experience(ctx, train.init_state(ctx, s, 0), e0), e0)


def test_er_acl_never_replays_when_every_experience_brings_every_class(
    digits):
  # A domain-incremental stream has no old class (Avalanche's condition,
  # len(new) == len(seen)), so ER-ACL trains as Naive there: same
  # accuracy matrix.
  sc = scenarios.permuted(digits, n_experiences=2, seed=0)
  runs = {}
  for spec, kw in (("naive", {}), ("er_acl", dict(er_acl=dict(mem_size=40)))):
    runs[spec] = experiment.run(config(spec, **kw), scenario=sc).accuracy
  np.testing.assert_allclose(runs["er_acl"], runs["naive"], atol=1e-6)


def test_er_acl_keeps_old_classes_on_split_digits(full_stream):
  """Replay with the asymmetric loss keeps the earlier experiences where
  Naive loses them."""
  old = {}
  for spec, kw in (("naive", {}), ("er_acl", dict(er_acl=dict(
      mem_size=100)))):
    acc = experiment.run(config(spec, **kw), scenario=full_stream).accuracy
    old[spec] = float(acc[-1, :-1].mean())
  assert old["naive"] < 0.1, old
  assert old["er_acl"] > old["naive"] + 0.4, old


def test_er_acl_bad_inputs(stream):
  for kw, match in (({"mem_size": 0}, "er_acl: mem_size must be a positive "
                     "int"),
                    ({"batch_size": -1}, "er_acl: batch_size must be an int "
                     ">= 0")):
    with pytest.raises(ValueError, match=match):
      er_acl(**kw)
  ctx = make_ctx(stream)
  with pytest.raises(ValueError, match=r"er_acl: mem_size=8 is smaller than "
                     r"the stream's 10 classes.* use mem_size >= 10"):
    train.init_state(ctx, er_acl(mem_size=8, batch_size=4), 0)
  with pytest.raises(ValueError, match="er_acl: batch_size=11 is larger "
                     "than the memory capacity mem_size=10"):
    train.init_state(ctx, er_acl(mem_size=10, batch_size=11), 0)
