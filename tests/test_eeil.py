"""EEIL (Castro et al. 2018): the per-group distillation, the balanced
subset, the balanced fine-tuning's update, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_softmax
from jaxcl import buffers, train
from jaxcl.state import cross_entropy_over
from jaxcl.strategies.eeil import balanced_subset, eeil, group_distillation
from jaxcl.strategy import chain
from jaxcl.strategies.generative_replay import generative_replay
from test_replay import B, after_first, batch_of, make_ctx


def _group_kd(s, t, class_exp, upto, w, temp):
  """The paper's eq. 3 summed over groups, by hand (NumPy)."""
  total = 0.0
  for e in range(upto):
    cols = np.flatnonzero(class_exp == e)
    if not cols.size:
      continue
    p = np_softmax(t[:, cols] / temp)
    logq = np.log(np_softmax(s[:, cols] / temp))
    total += np.sum(w * -(p * logq).sum(-1)) / max(w.sum(), 1.0)
  return total


# Compile time dominates these tests: functions under test run jitted (one
# program per shape, not one per operation), and the trained states the
# step tests start from are built once per module.
_gd = jax.jit(group_distillation, static_argnums=5,
              static_argnames="num_groups")


def test_group_distillation_by_hand():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 6, 8)) * 3
  class_exp = np.array([0, 0, 1, 1, 1, 2, -1, -1])
  w = np.array([1, 1, 0, 1, 1, 1], np.float32)
  for upto, temp in ((0, 2.0), (1, 2.0), (2, 2.0), (3, 0.5)):
    got = float(_gd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(class_exp),
                    jnp.asarray(upto), jnp.asarray(w), temp))
    np.testing.assert_allclose(got, _group_kd(s, t, class_exp, upto, w, temp),
                               rtol=1e-5, atol=1e-7)
    # Three experiences: three groups suffice.
    few = float(_gd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(class_exp),
                    jnp.asarray(upto), jnp.asarray(w), temp, num_groups=3))
    np.testing.assert_allclose(few, got, rtol=1e-6)
  # Each group is its own softmax: one group's logits moving together
  # (a shift within the group) changes nothing.
  shifted = s.copy()
  shifted[:, 2:5] += 7.0
  a, b = (float(_gd(jnp.asarray(z), jnp.asarray(t), jnp.asarray(class_exp),
                    jnp.asarray(3), jnp.asarray(w), 2.0))
          for z in (s, shifted))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  # The teacher gets no gradient.
  g = jax.jit(jax.grad(lambda tt: group_distillation(
      jnp.asarray(s), tt, jnp.asarray(class_exp), jnp.asarray(3),
      jnp.asarray(w), 2.0)))(jnp.asarray(t))
  assert not np.asarray(g).any()


def test_balanced_subset_takes_per_class_random_rows():
  y = jnp.asarray(np.repeat(np.arange(5), [7, 2, 6, 9, 4]))
  valid = jnp.ones(y.shape, bool).at[20].set(False)   # a class-3 row
  classes = jnp.asarray([False, True, True, True, False])
  picks = []
  subset = jax.jit(balanced_subset, static_argnums=5)
  for seed in range(3):
    idx, ok = subset(jax.random.PRNGKey(seed), y, valid, classes,
                              jnp.asarray(4), 16)
    idx, ok = np.asarray(idx), np.asarray(ok)
    assert idx.shape == ok.shape == (16,)
    chosen = idx[ok]
    assert len(set(chosen.tolist())) == chosen.size       # no duplicate
    assert np.asarray(valid)[chosen].all()
    counts = np.bincount(np.asarray(y)[chosen], minlength=5)
    # min(4, available): class 1 has 2 rows; class 3 has 8 valid.
    np.testing.assert_array_equal(counts, [0, 2, 4, 4, 0])
    picks.append(frozenset(chosen.tolist()))
  assert len(set(picks)) > 1   # random within a class
  # Fewer slots than chosen rows: truncated, still flagged.
  idx, ok = subset(jax.random.PRNGKey(0), y, valid, classes,
                   jnp.asarray(4), 5)
  assert np.asarray(ok).all()
  # Many rows of a lower class after the eligible ones (an experience's
  # padding, label 0): each class's count is still cut at per_class.
  y = jnp.asarray(np.r_[np.full(6, 3), np.full(6, 4), np.zeros(40, int)])
  idx, ok = subset(jax.random.PRNGKey(0), y, jnp.arange(52) < 12, classes
                   .at[4].set(True), jnp.asarray(4), 12)
  np.testing.assert_array_equal(np.bincount(
      np.asarray(y)[np.asarray(idx)[np.asarray(ok)]], minlength=5),
      [0, 0, 0, 4, 4])


# The memory of the shared runs: larger than the classes' data, so it holds
# every row of experience 0.
MEM = 400


@pytest.fixture(scope="module")
def ctx(stream):
  return make_ctx(stream)


@pytest.fixture(scope="module")
def first(ctx, stream):
  """``(state, step)``: 20 steps of experience 0, then the start of
  experience 1. Training does not depend on λ, T or the fine-tuning's
  settings (experience 0 has no old group; the fine-tuning runs in
  ``after_experience``), so each test applies its own EEIL's hooks and
  loss to this state."""
  return after_first(ctx, eeil(mem_size=MEM), stream, 20)


def test_eeil_task_loss_is_ce_plus_old_group_distillation(ctx, first,
                                                         stream):
  lam, temp = 0.7, 3.0
  s = eeil(mem_size=MEM, lam=lam, temperature=temp)
  state, _ = first
  ss = state.strategy
  np.testing.assert_array_equal(np.asarray(ss.class_exp)[:4], [0, 0, 1, 1])
  assert int(ss.experience) == 1
  b = s.prepare_batch(ctx, ss, batch_of(stream.experiences[1]),
                      jax.random.PRNGKey(1))
  assert b["y"].shape == (2 * B,)   # exemplars appended

  @jax.jit
  def parts(ss, params, b):
    logits = ctx.logits(params, {}, b["x"], b["task"], train=True)
    teacher = ctx.logits(ss.teacher, {}, b["x"], b["task"])
    ce = cross_entropy_over(logits, b["y"], b["mask"], ss.seen | ss.current)
    return logits, s.task_loss(ctx, ss, logits, b), teacher, ce

  logits, got, teacher, ce = jax.tree.map(np.asarray,
                                          parts(ss, state.params, b))
  kd = _group_kd(np.asarray(logits), teacher, np.asarray(ss.class_exp), 1,
                 np.asarray(b["mask"]), temp)
  assert kd > 0
  np.testing.assert_allclose(got, ce + lam * kd, rtol=1e-5)


@pytest.fixture(scope="module")
def before_finetuning(first, stream):
  """``first`` after 5 steps of experience 1."""
  state, step = first
  for i in range(5):
    state = step(state, batch_of(stream.experiences[1], start=B * i))
  return state


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_eeil_finetuning_is_sgd_on_the_balanced_loss(ctx, before_finetuning,
                                                     stream, momentum):
  """With a memory larger than the classes' data, the balanced set is
  every row of the four classes, and one batch covers it: each epoch is
  one SGD (heavy-ball) step on CE + λ Σ_f L_D_f with the new group's
  targets from the model before the fine-tuning; the rate drops by
  ``lr_decay`` after ``decay_epochs``."""
  lam, temp, lr = 2.0, 2.0, 0.3
  s = eeil(mem_size=MEM, lam=lam, temperature=temp, finetune_epochs=3,
           finetune_lr=lr, finetune_batch_size=800, momentum=momentum,
           decay_epochs=2, lr_decay=10.0)
  state = before_finetuning
  e0, e1 = stream.experiences
  ss = state.strategy
  xs = jnp.concatenate([jnp.asarray(e0.train_x), jnp.asarray(e1.train_x)])
  ys = jnp.concatenate([jnp.asarray(e0.train_y), jnp.asarray(e1.train_y)])
  ts = jnp.zeros(ys.shape, jnp.int32)
  # The memory holds every row of classes 0-1 (200 slots each > rows).
  assert int(jnp.sum(ss.memory.valid)) == len(e0.train_y)

  # One program for both group counts; the data are arguments, not
  # constants XLA would fold while compiling.
  @jax.jit
  def fine_tune(groups, ss, params, xs, ys, ts):
    old = ctx.logits(ss.teacher, {}, xs, ts)
    new = ctx.logits(params, {}, xs, ts)
    targets = jnp.where(ss.current[None, :], new, old)
    active = ss.seen | ss.current

    def loss(p):
      out = ctx.logits(p, {}, xs, ts, train=True)
      w = jnp.ones(ys.shape, jnp.float32)
      return (cross_entropy_over(out, ys, w, active) + lam *
              group_distillation(out, targets, ss.class_exp,
                                 groups, w, temp))

    p, buf = params, None
    for epoch in range(3):
      g = jax.grad(loss)(p)
      buf = g if buf is None else jax.tree.map(
          lambda m, d: momentum * m + d, buf, g)
      rate = lr / 10.0 ** (epoch // 2)
      p = jax.tree.map(lambda a, m: a - rate * m, p, buf)
    return p

  p = fine_tune(jnp.asarray(2), ss, state.params, xs, ys, ts)
  after = s.after_experience(ctx, state, e1)
  for a, w in zip(jax.tree.leaves(after.params), jax.tree.leaves(p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4,
                               atol=2e-6)
  # The new group's temporary distillation matters to that result.
  p1 = fine_tune(jnp.asarray(1), ss, state.params, xs, ys, ts)
  gap = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(p1), jax.tree.leaves(p)))
  assert gap > 1e-3
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(after.params), jax.tree.leaves(state.params)))
  assert moved > 1e-3
  # Then herding stores K / 4 = 100 per class (all rows here), and the
  # fine-tuned model is the next teacher.
  ss = after.strategy
  np.testing.assert_array_equal(
      np.asarray(buffers.counts(ss.memory, 10))[:4],
      np.bincount(np.asarray(ys), minlength=4)[:4].clip(max=100))
  for a, w in zip(jax.tree.leaves(ss.teacher), jax.tree.leaves(p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4,
                               atol=2e-6)


@pytest.mark.parametrize("old,new,kw,want_memory,want_subset", [
    ([0, 1, 2], [3, 4], {}, [4, 4, 4, 0, 0], [0, 0, 0, 4, 4]),
    ([0], [1, 2, 3], {}, [12, 0, 0, 0, 0], [0, 4, 4, 4, 0]),
    ([0, 1, 2], [3, 4], dict(mem_size=30, per_class=3), [3, 3, 3, 0, 0],
     [0, 0, 0, 3, 3])])
def test_eeil_finetuning_set_cuts_new_classes_to_an_old_class_share(
    digits, monkeypatch, old, new, kw, want_memory, want_subset):
  """The balanced set, memory K = 12. 3 old classes (0-2), then 2 new ones
  (3, 4): the memory holds K / 3 = 4 exemplars of each old class, so each
  new class brings 4 random rows of its ~140 (not all of them, nor
  K / 2 = 6: uneven class counts tell the old classes' share apart).
  1 old class (12 exemplars), then 3 new ones: an old class's share is
  capped at K / 3 = 4 per new class, so that the set fits its K slots
  (12 each would fill them with the first new class alone). A memory that
  grows by 3 per class (capacity 30): 3 of each old class and 3 rows of
  each new one (a shared K = 30 would give 10), and afterwards 3 of all
  five."""
  from jaxcl import scenarios
  from jaxcl.strategies import eeil as eeil_mod
  pick = lambda x, y, cs: (x[np.isin(y, cs)], y[np.isin(y, cs)])
  sc = scenarios.from_arrays(
      [pick(digits.train_x, digits.train_y, cs) for cs in (old, new)],
      [pick(digits.test_x, digits.test_y, cs) for cs in (old, new)],
      num_classes=10)
  ctx = make_ctx(sc)
  counts, real = [], eeil_mod.balanced_subset

  def spy(key, y, valid, classes, per_class, size):
    idx, ok = real(key, y, valid, classes, per_class, size)
    jax.debug.callback(lambda yy, oo: counts.append(np.bincount(
        np.asarray(yy)[np.asarray(oo)], minlength=10)), y[idx], ok)
    return idx, ok

  monkeypatch.setattr(eeil_mod, "balanced_subset", spy)
  trained, real_epochs = [], eeil_mod.over_epochs

  def spy_epochs(key, valid, carry, **kw):   # the rows fine-tuned on
    jax.debug.callback(lambda v: trained.append(int(np.sum(v))), valid)
    return real_epochs(key, valid, carry, **kw)

  monkeypatch.setattr(eeil_mod, "over_epochs", spy_epochs)
  s = eeil(**{"mem_size": 12, "batch_size": 2, "finetune_epochs": 1, **kw})
  state, _ = after_first(ctx, s, sc, 5)
  np.testing.assert_array_equal(
      np.asarray(buffers.counts(state.strategy.memory, 10))[:5],
      want_memory)
  end = s.after_experience(ctx, state, sc.experiences[1])
  jax.effects_barrier()   # the callback has run
  assert len(counts) == 1
  np.testing.assert_array_equal(counts[0], want_subset + [0] * 5)
  # Fine-tuned on those and the memory's exemplars, no other slot.
  assert trained == [sum(want_memory) + sum(want_subset)]
  if "per_class" in kw:
    np.testing.assert_array_equal(
        np.asarray(buffers.counts(end.strategy.memory, 10)),
        [3] * 5 + [0] * 5)


def test_eeil_balanced_finetuning_removes_the_new_class_bias(stream):
  """With few exemplars replayed (2 per step), training on experience 1
  biases the network toward classes 2-3; the balanced fine-tuning gives
  old classes' test rows back to them, and keeps the new ones'."""
  ctx = make_ctx(stream)
  s = eeil(mem_size=10, batch_size=2, finetune_epochs=20, finetune_lr=0.05)
  state, step = after_first(ctx, s, stream, 30)
  e0, e1 = stream.experiences
  for i in range(60):
    state = step(state, batch_of(e1, start=(B * i) % (len(e1.train_y) - B)))

  predict = jax.jit(lambda st, x, t: s.predict(ctx, st.strategy, st.params,
                                                st.model_state, x, t))

  def called_new(st, exp):
    x = jnp.asarray(exp.test_x)
    t = jnp.zeros((x.shape[0],), jnp.int32)
    out = predict(st, x, t)
    return float(np.mean(np.asarray(out).argmax(-1) >= 2))

  after = s.after_experience(ctx, state, e1)
  assert called_new(state, e0) > 0.15
  assert called_new(after, e0) < called_new(state, e0) / 3
  assert called_new(after, e1) > 0.9


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mem_size=0), "mem_size"),
    (dict(mem_size=10, batch_size=11), "batch_size=11"),
    (dict(lam=-1.0), "lam"),
    (dict(temperature=0.0), "temperature"),
    (dict(finetune_epochs=-1), "finetune_epochs"),
    (dict(finetune_lr=0.0), "finetune_lr"),
    (dict(momentum=1.0), "momentum"),
    (dict(decay_epochs=0), "decay_epochs"),
    (dict(lr_decay=0.5), r"eeil: lr_decay must be a number >= 1 \(the rate "
     r"is divided by it\), got 0.5$"),
    (dict(finetune_batch_size=-2), r"eeil: finetune_batch_size must be an "
     r"int >= 0 \(0: the training batch size\), got -2$"),
    (dict(batch_size=-1), r"eeil: batch_size must be an int >= 0 \(0: the "
     r"training batch size\), got -1$"),
    (dict(per_class=-1), r"eeil: per_class must be an int >= 0"),
    (dict(mem_size=10, per_class=11), r"eeil: per_class=11 is more than "
     r"mem_size=10 slots"),
])
def test_eeil_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    eeil(**kwargs)


def test_eeil_bad_streams_and_compositions(ctx, first, stream):
  with pytest.raises(ValueError, match="mem_size=5 gives 0 exemplars"):
    train.init_state(ctx, eeil(mem_size=5), 0)
  with pytest.raises(ValueError, match=r"eeil: per_class=3 exemplars of 10 "
                     r"classes need mem_size >= 30, got 29"):
    train.init_state(ctx, eeil(mem_size=29, per_class=3), 0)
  task = dataclasses.replace(stream, kind="task")
  with pytest.raises(ValueError, match="class-incremental"):
    train.init_state(make_ctx(task), eeil(mem_size=20), 0)
  with pytest.raises(ValueError, match="generative_replay takes"):
    chain(generative_replay(), eeil())
  state, _ = first
  with pytest.raises(ValueError, match="again"):
    eeil(mem_size=MEM).before_experience(ctx, state, stream.experiences[0])
