"""GSA (Guo et al. 2023; Avalanche's GSA): the gradient ratio and its
weights by hand, the batch's layout, the loss by hand against NumPy,
the statistics a step adds, a run on Split Digits against Naive, and
bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax
from jaxcl import experiment, train, strategy as strategy_lib
from jaxcl.strategies import replay as replay_lib
from jaxcl.strategies.gsa import ant, gsa, mixed_selection, target_weights
from test_replay import (B, after_first, batch_of, config, jit_ctx,
                         logits_fn, make_ctx)


def test_ant_and_weights_by_hand():
  # Class 0: 4 rows with p_0 summing to 1.0, p_0 on other rows 0.5:
  # (4 - 1) / 0.5 = 6. Class 1: no negative mass yet -> 1.
  a = np.asarray(ant(jnp.array([4.0, 2.0]), jnp.array([1.0, 1.5]),
                     jnp.array([0.5, 0.0])))
  np.testing.assert_allclose(a, [6.0, 1.0])
  w = np.asarray(target_weights(jnp.array([1.0, 6.0, -3.0])))
  np.testing.assert_allclose(w, [1.0, 2 / (1 + np.exp(-5.0)),
                                 2 / (1 + np.exp(4.0))], rtol=1e-6)


def test_mixed_selection_layout_by_hand():
  # 3 incoming rows (the last one padding), 2 drawn of the current
  # experience, 3 old rows (the last past the mixed share), mirrored,
  # then 2 rows another member appended (one valid).
  block = [1, 1, 0, 1, 1, 1, 1, 0]
  mask = jnp.asarray(block * 2 + [1, 0], jnp.float32)
  cur, mixed = mixed_selection(mask, 3, 2, 3, 2, jnp.int32(3))
  # Current rows: the valid incoming and B_cur rows of each copy.
  want_cur = [1, 1, 0, 1, 1, 0, 0, 0] * 2 + [0, 0]
  # Mixed: the first 3 valid of incoming | B_cur (rows 0, 1, 3), the valid
  # old rows (5, 6), in each copy; the appended valid row.
  want_mixed = [1, 1, 0, 1, 0, 1, 1, 0] * 2 + [1, 0]
  np.testing.assert_array_equal(np.asarray(cur), np.asarray(want_cur, bool))
  np.testing.assert_array_equal(np.asarray(mixed),
                                np.asarray(want_mixed, bool))


def _np_loss(z, y, mask, current, seen, n_in, n_cur, n_old, ss, warm):
  """GSA's loss from the prepared batch's logits, row by row in NumPy."""
  z = np.asarray(z, np.float64)
  block = n_in + n_cur + n_old
  n_new, n_all = current.sum(), (seen | current).sum()
  take = 16 * n_new // n_all  # batch_size_mem = 16: the current share
  cur_rows, mixed_rows = [], []
  for rep in range(2):
    valid = [i for i in range(rep * block, rep * block + n_in + n_cur)
             if mask[i] > 0]
    cur_rows += valid
    mixed_rows += valid[:take]
    mixed_rows += [i for i in range(rep * block + n_in + n_cur,
                                    (rep + 1) * block) if mask[i] > 0]
  cc = np.flatnonzero(current)
  lp = np_log_softmax(z[:, cc])
  loss_p = -np.mean([lp[i, list(cc).index(y[i])] for i in cur_rows])
  sc = np.flatnonzero(seen | current)
  logp = np.full(z.shape, -np.inf)
  logp[:, sc] = np_log_softmax(z[:, sc])
  p = np.exp(logp)
  count, pos, neg = (np.array(ss.count, np.float64),
                     np.array(ss.pos, np.float64),
                     np.array(ss.neg, np.float64))
  for i in mixed_rows:
    count[y[i]] += 1
    pos[y[i]] += p[i, y[i]]
    neg += p[i]
    neg[y[i]] -= p[i, y[i]]
  a = np.ones_like(count) if warm else np.where(
      neg > 0, (count - pos) / np.where(neg > 0, neg, 1), 1)
  w = 2 / (1 + np.exp(1 - a))
  loss_n = np.mean([-w[y[i]] * logp[i, y[i]] for i in mixed_rows])
  return loss_p + 2 * loss_n, len(mixed_rows)


@pytest.mark.parametrize("warmup", [0, 5])
def test_gsa_batch_and_loss_are_hand_computed(stream, warmup):
  # Experience 1 after two steps (classes 2, 3 new; 0, 1 seen): the
  # batch is [incoming | 6 rows of experience 1 | old rows] and its mirror;
  # the loss is NumPy's L_p + 2 L_n, with ANT from the statistics and
  # this step's mixed rows (warmup 0), or 1 (still in the warm-up).
  ctx = make_ctx(stream)
  s = gsa(mem_size=40, batch_size_mem=16, batch_size_mem_cur=6,
          warmup_steps=warmup)
  state, step = after_first(ctx, s, stream, steps=8)
  e1 = stream.experiences[1]
  for i in range(2):
    state = step(state, batch_of(e1, start=B * i))
  ss = state.strategy
  np.testing.assert_array_equal(np.asarray(ss.seen), np.arange(10) < 2)
  np.testing.assert_array_equal(np.asarray(ss.current),
                                (np.arange(10) >= 2) & (np.arange(10) < 4))
  assert int(ss.step) == 2 and float(ss.count.sum()) > 0
  batch = batch_of(e1, start=3 * B)
  prepared = jit_ctx(s.prepare_batch)(ctx, ss, batch, jax.random.key(5))
  n = B + 6 + 16
  assert prepared["x"].shape[0] == 2 * n
  mem = ss.memory
  tags = {tuple(np.asarray(x).ravel()): int(e) for x, e, v in zip(
      np.asarray(mem.x), np.asarray(mem.experience), np.asarray(mem.valid))
      if v}
  x, m = np.asarray(prepared["x"]), np.asarray(prepared["mask"])
  # B_cur: entries of experience 1; the old draw: of experience 0, at most
  # the mixed share (16 * 2 // 4 = 8) valid.
  assert all(tags[tuple(r.ravel())] == 1
             for r, ok in zip(x[B:B + 6], m[B:B + 6]) if ok)
  assert m[B:B + 6].sum() > 0
  assert all(tags[tuple(r.ravel())] == 0
             for r, ok in zip(x[B + 6:n], m[B + 6:n]) if ok)
  assert m[B + 6:n].sum() == 8
  # The second copy is the first mirrored left-right.
  np.testing.assert_array_equal(x[n:], x[:n, :, ::-1, :])
  np.testing.assert_array_equal(np.asarray(prepared["y"])[n:],
                                np.asarray(prepared["y"])[:n])
  out = logits_fn(ctx)(
      state.params, {}, prepared["x"], prepared["task"])
  got = float(jit_ctx(s.task_loss)(ctx, ss, out, prepared))
  want, n_mixed = _np_loss(out, np.asarray(prepared["y"]), m,
                           np.asarray(ss.current), np.asarray(ss.seen),
                           B, 6, 16, ss, warm=int(ss.step) < warmup)
  assert n_mixed == 2 * (8 + 8)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The current rows' term alone (an empty memory: no mixed term) gives
  # the classes outside the experience no gradient.
  empty = ss._replace(memory=ss.memory._replace(
      valid=jnp.zeros_like(ss.memory.valid)))
  g = jax.grad(lambda o: jit_ctx(s.task_loss)(ctx, empty, o, prepared))(out)
  assert float(jnp.abs(g[:, :2]).max()) == 0.0
  assert float(jnp.abs(g[:, 4:]).max()) == 0.0
  assert float(jnp.abs(g[:, 2:4]).max()) > 0.0


def test_a_step_adds_its_mixed_rows_to_the_statistics(stream):
  # One step of experience 1: 2 copies x (8 old + 8 current) mixed rows;
  # each row's probabilities over the seen classes sum to 1, so the
  # positive and negative sums grow by the row count together. The
  # incoming rows join the reservoir tagged with experience 1.
  ctx = make_ctx(stream)
  s = gsa(mem_size=40, batch_size_mem=16, batch_size_mem_cur=6)
  state, step = after_first(ctx, s, stream, steps=8)
  before = state.strategy
  assert int(jnp.sum(before.memory.experience[before.memory.valid] == 1)) \
      == 0
  after = step(state, batch_of(stream.experiences[1])).strategy
  dc = np.asarray(after.count - before.count)
  assert dc.sum() == 32 and dc[4:].sum() == 0
  dpn = np.asarray(after.pos - before.pos + after.neg - before.neg)
  np.testing.assert_allclose(dpn.sum(), 32.0, rtol=1e-5)
  assert int(after.step) == int(before.step) + 1
  assert int(after.memory.seen) == int(before.memory.seen) + B


def test_a_memory_smaller_than_the_draws_gives_what_it_holds(stream):
  # mem_size 12 < 16 and < 22 (the defaults' 64 and 22 likewise): the
  # draws take at most 12 slots each; the old share still counts 16 rows
  # (16 * 2 // 4 = 8 of experience 0).
  ctx = make_ctx(stream)
  s = gsa(mem_size=12, batch_size_mem=16, batch_size_mem_cur=22)
  state, step = after_first(ctx, s, stream, steps=4)
  state = step(state, batch_of(stream.experiences[1]))
  prepared = jit_ctx(s.prepare_batch)(ctx, state.strategy,
                                      batch_of(stream.experiences[1],
                                               start=B),
                                      jax.random.key(2))
  assert prepared["x"].shape[0] == 2 * (B + 12 + 12)
  m = np.asarray(prepared["mask"])
  assert m[B + 12:B + 24].sum() == min(8, int(np.sum(
      np.asarray(state.strategy.memory.experience)[
          np.asarray(state.strategy.memory.valid)] == 0)))
  loss = float(jit_ctx(s.task_loss)(ctx, state.strategy, jnp.zeros(
      (prepared["x"].shape[0], 10)), prepared))
  assert np.isfinite(loss)


def test_first_step_of_the_stream_is_the_current_classes_loss(stream):
  # Memory empty: no mixed term; L_p over the experience's classes on the
  # incoming rows and their mirrored copies.
  ctx = make_ctx(stream)
  s = gsa(mem_size=40, batch_size_mem=16, batch_size_mem_cur=6)
  e0 = stream.experiences[0]
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  ss = state.strategy
  prepared = jit_ctx(s.prepare_batch)(ctx, ss, batch_of(e0),
                                      jax.random.key(1))
  m = np.asarray(prepared["mask"])
  assert m.sum() == 2 * B  # nothing drawn from the empty memory
  out = logits_fn(ctx)(
      state.params, {}, prepared["x"], prepared["task"])
  got = float(jit_ctx(s.task_loss)(ctx, ss, out, prepared))
  z, y = np.asarray(out, np.float64), np.asarray(prepared["y"])
  rows = np.flatnonzero(m)
  lp = np_log_softmax(z[rows][:, :2])
  np.testing.assert_allclose(got, -lp[np.arange(len(rows)), y[rows]].mean(),
                             rtol=1e-5)


def test_gsa_on_split_digits_keeps_old_classes(digits):
  # One pass, batches of 10, memory 100: GSA keeps earlier experiences
  # where Naive forgets them, and predicts only classes seen so far.
  res = {}
  for spec, kw in (("gsa", {"gsa": dict(mem_size=100)}), ("naive", {})):
    c = config(spec, lr=1e-3, **kw)
    c.optimizer.name = "adam"
    res[spec] = experiment.run(c)
  acc = {k: np.asarray(r.accuracy) for k, r in res.items()}
  final = {k: float(a[-1].mean()) for k, a in acc.items()}
  assert final["gsa"] > final["naive"] + 0.25, final
  # Earlier experiences kept on average (Naive's are near 0).
  assert acc["gsa"][-1, :-1].mean() > 0.3, acc["gsa"]
  assert acc["gsa"][0, 1:].max() == 0.0  # unseen classes never predicted
  ss = res["gsa"].state.strategy
  tags = np.asarray(ss.memory.experience)[np.asarray(ss.memory.valid)]
  assert set(tags.tolist()) == set(range(5))
  assert np.all(np.asarray(ss.count) > 0)


def test_bad_input_and_compositions():
  for kw, msg in ((dict(mem_size=0), "mem_size"),
                  (dict(batch_size_mem=0), "batch_size_mem must be"),
                  (dict(batch_size_mem_cur=-1), "batch_size_mem_cur must"),
                  (dict(flip="yes"), "gsa: flip must be True or False"),
                  (dict(warmup_steps=-1), "warmup_steps")):
    with pytest.raises(ValueError, match=msg):
      gsa(**kw)
  with pytest.raises(ValueError, match="put gsa first"):
    strategy_lib.chain(replay_lib.replay(), gsa())
  strategy_lib.chain(gsa(), replay_lib.replay())  # gsa first: allowed


def test_task_stream_and_flat_inputs_are_refused(stream):
  ctx = make_ctx(stream)
  task = dataclasses.replace(ctx, info=dataclasses.replace(ctx.info,
                                                           kind="task"))
  with pytest.raises(ValueError, match=r"gsa learns the classes of each "
                     r"experience apart from the earlier ones of a "
                     r"class-incremental stream \(scenario.kind='class'\), "
                     r"got kind='task'"):
    gsa().init(task, jax.random.key(0), None)
  flat = dataclasses.replace(ctx, info=dataclasses.replace(
      ctx.info, input_shape=(64,)))
  with pytest.raises(ValueError, match=r"gsa: flip=True mirrors images "
                     r"\(height, width, channels\), but the inputs are "
                     r"shaped \(64,\); use flip=False"):
    gsa().init(flat, jax.random.key(0), None)
  gsa(flip=False).init(flat, jax.random.key(0), None)
