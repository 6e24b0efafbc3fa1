"""SS-IL (Ahn et al. 2021): the separated softmax, the task-wise
distillation, the frozen previous model, the replay batch, bad input and a
run through the normal loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax, np_softmax
from jaxcl import buffers, experiment, train
from jaxcl.strategies.icarl import icarl
from jaxcl.strategies.ss_il import SSILState, separated_cross_entropy, ss_il
from jaxcl.strategy import chain
from partial_runs import predictions_around_the_start
from test_replay import B, after_first, batch_of, config, make_ctx


def test_separated_cross_entropy_by_hand():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 7)) * 2
  # Rows 0-2 incoming (current classes 3, 4), rows 3-5 replayed (old
  # classes 0, 1, 2); row 2 masked out; row 5 a chained member's row of a
  # current class, so scored over every seen class.
  y = np.array([3, 4, 4, 0, 2, 3])
  mask = np.array([1, 1, 0, 1, 1, 1], np.float32)
  current = np.array([0, 0, 0, 1, 1, 0, 0], bool)
  old = np.array([1, 1, 1, 0, 0, 0, 0], bool)
  cols = {"cur": [3, 4], "old": [0, 1, 2], "all": [0, 1, 2, 3, 4]}
  parts = ["cur", "cur", "cur", "old", "old", "all"]
  terms = [-np_log_softmax(z[i][cols[parts[i]]])[cols[parts[i]].index(y[i])]
           for i in range(6)]
  want = np.sum(mask * np.array(terms)) / mask.sum()
  got = separated_cross_entropy(jnp.asarray(z), jnp.asarray(y),
                                jnp.asarray(mask), 3, jnp.asarray(current),
                                jnp.asarray(old))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # New rows never touch an old class's logit and old rows never a
  # current one's: the gradient is zero there (and on unseen classes).
  g = np.asarray(jax.grad(lambda a: separated_cross_entropy(
      a, jnp.asarray(y), jnp.asarray(mask), 3, jnp.asarray(current),
      jnp.asarray(old)))(jnp.asarray(z)))
  assert not g[:3][:, old | ~(current | old)].any()
  assert not g[3:5][:, ~old].any()
  assert g[0, 3] != 0 and g[3, 1] != 0 and g[5, 3] != 0


def test_task_loss_is_separated_ce_plus_task_wise_kd_by_hand(stream):
  """Two old tasks (classes 0-1, 2-3), current 4-5: the loss is L_ss plus
  λ T² Σ_s CE(softmax(z_old_s / T), softmax(z_s / T)) on every row; that
  is the reference's KL term plus T² times the teacher's entropy."""
  lam, temp = 0.5, 3.0
  ctx = make_ctx(stream)
  s = ss_il(mem_size=40, lam=lam, temperature=temp)
  state = train.init_state(ctx, s, 0)
  teacher = train.init_state(ctx, s, 7).params
  c = ctx.info.num_classes
  class_exp = np.full((c,), -1)
  class_exp[:6] = [0, 0, 1, 1, 2, 2]
  ss = state.strategy._replace(
      class_exp=jnp.asarray(class_exp, jnp.int32),
      experience=jnp.asarray(2, jnp.int32),
      seen=jnp.asarray(np.arange(c) < 4),
      current=jnp.asarray((np.arange(c) >= 4) & (np.arange(c) < 6)),
      teacher=teacher)
  rng = np.random.default_rng(1)
  x = jnp.asarray(stream.experiences[0].train_x[:B + 4])
  y = np.concatenate([rng.integers(4, 6, B), [0, 1, 2, 3]])
  mask = np.ones(B + 4, np.float32)
  mask[B + 1] = 0.0
  b = {"x": x, "y": jnp.asarray(y), "task": jnp.zeros(B + 4, jnp.int32),
       "mask": jnp.asarray(mask)}
  z = np.asarray(rng.normal(size=(B + 4, c)) * 2, np.float32)
  got = float(s.task_loss(ctx, ss, jnp.asarray(z), b))
  zt = np.asarray(ctx.logits(teacher, {}, x, b["task"]))
  ce = float(separated_cross_entropy(jnp.asarray(z), b["y"], b["mask"], B,
                                     ss.current, ss.seen))
  kd, kl = 0.0, 0.0
  for cols in ([0, 1], [2, 3]):
    p = np_softmax(zt[:, cols] / temp)
    logq = np.log(np_softmax(z[:, cols] / temp))
    kd += np.sum(mask * -(p * logq).sum(-1)) / mask.sum()
    kl += np.sum(mask * (p * (np.log(p) - logq)).sum(-1)) / mask.sum()
  np.testing.assert_allclose(got, ce + lam * temp ** 2 * kd, rtol=1e-5)
  ent = 0.0
  for cols in ([0, 1], [2, 3]):
    p = np_softmax(zt[:, cols] / temp)
    ent += np.sum(mask * -(p * np.log(p)).sum(-1)) / mask.sum()
  np.testing.assert_allclose(kd, kl + ent, rtol=1e-5)
  # Each old task is its own softmax: shifting one task's logits leaves
  # the distillation alone; the current task's classes are not distilled.
  kd_of = lambda a: float(s.task_loss(ctx, ss, jnp.asarray(a), b)) - float(
      separated_cross_entropy(jnp.asarray(a), b["y"], b["mask"], B,
                              ss.current, ss.seen))
  z2 = z.copy()
  z2[:, 2:4] += 5.0
  z2[:, 4:6] = rng.normal(size=(B + 4, 2)) * 4
  np.testing.assert_allclose(kd_of(z2), kd_of(z), rtol=1e-4)
  # In the first experience there is no old task: the loss is L_ss alone.
  first = ss._replace(experience=jnp.asarray(0, jnp.int32))
  np.testing.assert_allclose(float(s.task_loss(ctx, first, jnp.asarray(z),
                                               b)), ce, rtol=1e-6)


def test_hooks_mark_each_class_experience_and_turn_the_distillation_on(
    stream):
  """Through the hooks alone (no hand-set state): each experience's start
  records its classes' experience and its index, so that in experience 1
  the task loss distils experience 0's classes (0, 1) from the teacher,
  and only those: the loss minus L_ss is λ T² times the tempered
  cross-entropy over that one group, computed here by hand. Were
  ``class_exp`` or ``experience`` left unset, that term would be 0."""
  lam, temp = 0.5, 2.0
  ctx = make_ctx(stream)
  s = ss_il(mem_size=40, lam=lam, temperature=temp)
  c = ctx.info.num_classes
  e0, e1 = stream.experiences
  ss0 = s.before_experience(ctx, train.init_state(ctx, s, 0), e0).strategy
  want = np.full((c,), -1)
  want[:2] = 0
  np.testing.assert_array_equal(np.asarray(ss0.class_exp), want)
  assert int(ss0.experience) == 0
  state, step = after_first(ctx, s, stream, 20)
  want[2:4] = 1
  ss = state.strategy
  np.testing.assert_array_equal(np.asarray(ss.class_exp), want)
  assert int(ss.experience) == 1
  # A few steps into experience 1, so the student is not the teacher.
  for i in range(3):
    state = step(state, batch_of(e1, start=B * i))
  ss = state.strategy
  b = s.prepare_batch(ctx, ss, batch_of(e1, start=B * 3),
                      jax.random.PRNGKey(3))
  z = ctx.logits(state.params, state.model_state, b["x"], b["task"],
                 train=True)
  got = float(s.task_loss(ctx, ss, z, b))
  ce = float(separated_cross_entropy(z, b["y"], b["mask"], B, ss.current,
                                     ss.seen))
  zt = np.asarray(ctx.logits(ss.teacher, ss.teacher_model_state, b["x"],
                             b["task"]))
  z, mask = np.asarray(z), np.asarray(b["mask"])
  p = np_softmax(zt[:, :2] / temp)
  logq = np.log(np_softmax(z[:, :2] / temp))
  kd = np.sum(mask * -(p * logq).sum(-1)) / mask.sum()
  assert lam * temp ** 2 * kd > 0.1, kd
  np.testing.assert_allclose(got - ce, lam * temp ** 2 * kd, rtol=1e-4)


def test_previous_model_is_frozen_at_the_experience_end(stream):
  ctx = make_ctx(stream)
  s = ss_il(mem_size=40)
  state, step = after_first(ctx, s, stream, 20)
  ss = state.strategy
  # Snapshotted at the end of experience 0: the trained params.
  for a, w in zip(jax.tree.leaves(ss.teacher), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
  snap = jax.tree.map(np.asarray, ss.teacher)
  e1 = stream.experiences[1]
  for i in range(5):
    state = step(state, batch_of(e1, start=B * i))
  moved = max(float(np.abs(np.asarray(a) - w).max()) for a, w in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(snap)))
  assert moved > 1e-3
  for a, w in zip(jax.tree.leaves(state.strategy.teacher),
                  jax.tree.leaves(snap)):
    np.testing.assert_array_equal(np.asarray(a), w)
  # The teacher gets no gradient through the loss.
  b = s.prepare_batch(ctx, state.strategy, batch_of(e1),
                      jax.random.PRNGKey(0))
  logits = ctx.logits(state.params, {}, b["x"], b["task"], train=True)
  g = jax.grad(lambda t: s.task_loss(
      ctx, state.strategy._replace(teacher=t), logits, b))(
          state.strategy.teacher)
  assert not any(np.asarray(a).any() for a in jax.tree.leaves(g))
  # The next experience's end replaces it with the params of then.
  after = s.after_experience(ctx, state, e1)
  for a, w in zip(jax.tree.leaves(after.strategy.teacher),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
  np.testing.assert_array_equal(np.asarray(after.strategy.seen)[:5],
                                [1, 1, 1, 1, 0])


def test_replay_batch_keeps_its_ratio(stream):
  ctx = make_ctx(stream)
  s = ss_il(mem_size=40, batch_size=4)
  e0, e1 = stream.experiences
  st0 = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  # During experience 0 the memory is empty: the 4 rows are masked out.
  b = s.prepare_batch(ctx, st0.strategy, batch_of(e0), jax.random.PRNGKey(0))
  assert b["y"].shape == (B + 4,)
  np.testing.assert_array_equal(np.asarray(b["mask"])[B:], 0)
  state, _ = after_first(ctx, s, stream, 20)
  ss = state.strategy
  # Class-balanced memory: K / 2 exemplars of each of classes 0, 1.
  np.testing.assert_array_equal(np.asarray(buffers.counts(ss.memory, 10))[:3],
                                [20, 20, 0])
  for k in range(3):
    b = s.prepare_batch(ctx, ss, batch_of(e1, start=B * k),
                        jax.random.PRNGKey(k))
    # Always B incoming and 4 replayed rows, all valid, all old classes.
    assert b["y"].shape == (B + 4,)
    np.testing.assert_array_equal(np.asarray(b["mask"]), 1)
    assert set(np.asarray(b["y"])[:B].tolist()) <= {2, 3}
    assert set(np.asarray(b["y"])[B:].tolist()) <= {0, 1}
    rows = np.asarray(b["x"])[B:]
    mem = np.asarray(ss.memory.x)[np.asarray(ss.memory.valid)]
    assert all((np.abs(mem - r).sum(-1) == 0).any() for r in rows)
    assert len({r.tobytes() for r in rows}) == 4   # without replacement


def test_predict_masks_the_classes_not_seen_yet(stream):
  """Before any experience no class is masked (the raw logits); from an
  experience's start, only its classes and earlier ones keep theirs."""
  ctx = make_ctx(stream)
  s = ss_il(mem_size=40)
  raw, before, after = predictions_around_the_start(
      ctx, s, train.init_state(ctx, s, 0), stream.experiences[0])
  np.testing.assert_array_equal(before, raw)
  want = np.where(np.arange(10) < 2, raw, -1e9)
  np.testing.assert_array_equal(after, want.astype(raw.dtype))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mem_size=0), "mem_size"),
    (dict(mem_size=10, batch_size=11), "batch_size=11"),
    (dict(batch_size=-1), "batch_size"),
    (dict(lam=-1.0), "lam"),
    (dict(temperature=0.0), "temperature"),
    (dict(per_class=-1), r"ss_il: per_class must be an int >= 0"),
    (dict(mem_size=10, per_class=11), r"ss_il: per_class=11 is more than "
     r"mem_size=10 slots"),
])
def test_ss_il_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    ss_il(**kwargs)


def test_ss_il_per_class_memory_grows_with_the_classes(stream):
  # per_class=3: 3 herded exemplars of each class after every experience
  # (6, then 12 rows), where a shared K = 30 would hold 15 of each.
  ctx = make_ctx(stream)
  s = ss_il(mem_size=30, per_class=3)
  state = train.init_state(ctx, s, 0)
  for i, e in enumerate(stream.experiences):
    state = s.after_experience(ctx, s.before_experience(ctx, state, e), e)
    counts = np.asarray(buffers.counts(state.strategy.memory, 10))
    np.testing.assert_array_equal(counts[:2 * (i + 1)], 3)
    assert counts.sum() == 6 * (i + 1)
  with pytest.raises(ValueError, match=r"ss_il: per_class=4 exemplars of 10 "
                     r"classes need mem_size >= 40, got 39"):
    train.init_state(ctx, ss_il(mem_size=39, per_class=4), 0)


def test_ss_il_bad_streams_and_compositions(stream):
  ctx = make_ctx(stream)
  with pytest.raises(ValueError, match="mem_size=5 gives 0 exemplars"):
    train.init_state(ctx, ss_il(mem_size=5), 0)
  # The default replay share (the training batch) must fit the memory.
  big = train.make_context(ctx.model, ctx.tx, train.stream_info(stream, 13))
  with pytest.raises(ValueError, match="batch_size=13 is larger"):
    train.init_state(big, ss_il(mem_size=12), 0)
  # The limits themselves are allowed: one exemplar per class, and a
  # replay batch as large as the memory.
  train.init_state(ctx, ss_il(mem_size=10), 0)
  ss_il(mem_size=10, batch_size=10)
  task = dataclasses.replace(stream, kind="task")
  with pytest.raises(ValueError, match="class-incremental"):
    train.init_state(make_ctx(task), ss_il(mem_size=20), 0)
  with pytest.raises(ValueError, match="more than one strategy defines"):
    chain(ss_il(mem_size=20), icarl(mem_size=20))
  s = ss_il(mem_size=20)
  state, _ = after_first(ctx, s, stream, 2)
  with pytest.raises(ValueError, match="again"):
    s.before_experience(ctx, state, stream.experiences[0])


def test_ss_il_trains_through_the_loop_and_keeps_old_classes(stream):
  """Split Digits, two experiences, one compiled program. Replayed and
  distilled, the first experience's classes keep their accuracy; the new classes are learnt within their own softmax
  (their separation from the old ones is left to later experiences, when
  they are replayed: one short epoch does not give it here)."""
  r = experiment.run(config("ss_il", ss_il=dict(mem_size=40)),
                     scenario=stream)
  assert r.learner.chunk_fn._cache_size() == 1
  assert isinstance(r.state.strategy, SSILState)
  # The loop's hooks recorded each class's experience (the groups the
  # second experience distilled).
  np.testing.assert_array_equal(np.asarray(r.state.strategy.class_exp)[:5],
                                [0, 0, 1, 1, -1])
  acc = r.accuracy[-1]
  # (Fine-tuning, config("naive"), leaves 0.0 there.)
  assert acc[0] > 0.9, acc
  e1 = stream.experiences[1]
  x = jnp.asarray(e1.test_x)
  st = r.state
  out = np.asarray(r.learner.ctx.logits(st.params, st.model_state, x,
                                        jnp.zeros((x.shape[0],), jnp.int32)))
  within = 2 + out[:, 2:4].argmax(-1)
  assert np.mean(within == e1.test_y) > 0.9
