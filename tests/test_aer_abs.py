"""Mechanism tests of AER + ABS (alternate replay, asymmetric balanced
sampling, sample insertion) on scikit-learn digits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import buffers, experiment, train
from jaxcl.state import StepInfo, cross_entropy
from jaxcl.strategies.aer_abs import (SELECTIONS, aer_abs, clean_order,
                                      insertion_counts, is_replay_epoch)
from jaxcl.strategies.er_ace import ace_logits
from jaxcl.strategies.er_tricks import row_losses

from conftest import np_log_softmax
from test_replay import B, batch_of, config, make_ctx


def _hooks(ctx, s):
  """Jitted ``(info_of, after_step)``: ``info_of(state, batch)`` is the
  ``StepInfo`` of a step on ``batch`` that leaves the parameters where
  they are (the hooks called by hand)."""

  def info_of(state, batch):
    b = s.prepare_batch(ctx, state.strategy, batch, jax.random.PRNGKey(3))
    logits = ctx.logits(state.params, state.model_state, b["x"], b["task"],
                        train=True)
    loss = s.task_loss(ctx, state.strategy, logits, b)
    return StepInfo(state.params, state.params, None, None, b, loss,
                    jax.random.PRNGKey(4), logits)

  return jax.jit(info_of), jax.jit(lambda ss, i: s.after_step(ctx, ss, i))


def _at(ctx, s, stream, i=0, count=0, **replace):
  """A fresh state at step ``count`` of experience ``i``."""
  state = train.init_state(ctx, s, 0)
  state = s.before_experience(ctx, state, stream.experiences[i])
  ss = state.strategy._replace(count=jnp.asarray(count, jnp.int32),
                               **replace)
  return state.replace(strategy=ss)


# ---------------------------------------------------------------------------
# Sample insertion.

def test_insertion_counts_round_half_to_even_as_python():
  # Mammoth: round((1 - alpha) * n), Python's round (2.5 -> 2, 3.5 -> 4).
  np.testing.assert_array_equal(insertion_counts(0.75, 10),
                                [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
  # 1 - 0.85 = 0.15000000000000002 in float64: 10 rows give 2 (float32
  # arithmetic would give 1.4999998 -> 1).
  assert insertion_counts(0.85, 10)[10] == 2
  np.testing.assert_array_equal(insertion_counts(0.0, 4), np.arange(5))


def test_clean_order_offers_exactly_the_lowest_loss_fraction():
  losses = jnp.array([0.9, 0.1, 5.0, 0.3, 0.2, 2.0, 0.05, 7.0])
  mask = jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)  # 6 rows
  counts = jnp.asarray(insertion_counts(0.5, 8))  # 3 of 6
  order, offered = clean_order(losses, mask, counts)
  got = sorted(np.asarray(order)[np.asarray(offered)].tolist())
  assert got == [1, 3, 4]  # the padding row 6 (loss 0.05) is not offered
  # Lowest first, as torch.topk(largest=False) returns them.
  np.testing.assert_array_equal(np.asarray(order)[:3], [1, 4, 3])


@pytest.mark.parametrize("selection", SELECTIONS)
def test_a_forgetting_step_stores_the_lowest_loss_rows_by_masked_loss(
    full_stream, selection):
  ctx = make_ctx(full_stream)
  s = aer_abs(mem_size=50, alpha_sample_insertion=0.6, selection=selection)
  # Experience 1, epoch 0 (forgetting): with classes 0, 1 seen, the ACE
  # mask leaves them out of the incoming rows' loss.
  seen = jnp.zeros((10,), bool).at[jnp.array([0, 1])].set(True)
  state = _at(ctx, s, full_stream, i=1, seen=seen)
  info_of, after_step = _hooks(ctx, s)
  info = info_of(state, batch_of(full_stream.experiences[1]))
  new = after_step(state.strategy, info)
  rows = {f: info.batch[f][:B] for f in ("x", "y", "mask")}
  masked = ace_logits(info.logits[:B], rows["y"], rows["mask"], seen)
  ce = np.asarray(row_losses(masked, rows["y"]))
  full = np.asarray(row_losses(info.logits[:B], rows["y"]))
  assert not np.allclose(ce, full)  # the mask matters here
  k = 4  # round(0.4 * 10)
  want = np.argsort(ce, kind="stable")[:k]
  mem = new.memory
  assert int(mem.seen) == k and int(jnp.sum(mem.valid)) == k
  np.testing.assert_array_equal(np.asarray(mem.x[:k]),
                                np.asarray(rows["x"])[want])
  np.testing.assert_allclose(np.asarray(new.losses[:k]), ce[want],
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(mem.experience[:k]), 1)


# ---------------------------------------------------------------------------
# ABS.

def _mammoth_abs(loss, past):
  """Mammoth's ``ABSSampling``: each group min-max normalised (past ones
  inverted), then a group drawn by its share of the memory."""
  loss = np.asarray(loss, np.float64)
  k = len(loss)

  def norm(v):
    if v.max() - v.min() != 0:
      v = (v - v.min()) / ((v.max() - v.min()) + 1e-9)
    return v

  p = np.zeros(k)
  if past.any():
    imp = 1 - norm(loss[past])
    p[past] = past.sum() / k * imp / imp.sum()
  if (~past).any():
    imp = norm(loss[~past])
    if imp.sum() == 0:
      imp = imp + 1e-9
    p[~past] = (~past).sum() / k * imp / imp.sum()
  return p


def test_abs_probabilities_match_a_numpy_reimplementation():
  loss = np.array([0.3, 2.0, 0.1, 1.2, 0.7, 0.05, 3.0, 0.4], np.float32)
  past = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)
  p = np.asarray(buffers.abs_probs(jnp.asarray(loss), jnp.asarray(past)))
  np.testing.assert_allclose(p, _mammoth_abs(loss, past), atol=1e-6)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
  # Past: the highest loss stays; current: the lowest loss stays.
  assert p[1] == 0.0 and p[5] == 0.0
  np.testing.assert_allclose(p[past].sum(), 0.5, rtol=1e-6)
  # One group only, and all-equal losses (uniform within the group).
  for past in (np.zeros(8, bool), np.ones(8, bool)):
    np.testing.assert_allclose(
        buffers.abs_probs(jnp.asarray(loss), jnp.asarray(past)),
        _mammoth_abs(loss, past), atol=1e-6)
  eq = np.full(8, 0.5, np.float32)
  np.testing.assert_allclose(
      buffers.abs_probs(jnp.asarray(eq), jnp.asarray(np.arange(8) < 3)),
      1 / 8, rtol=1e-6)


def test_loss_aware_add_with_past_draws_the_victim_from_abs():
  k, n = 8, 4000
  loss = np.array([0.3, 2.0, 0.1, 1.2, 0.7, 0.05, 3.0, 0.4], np.float32)
  past = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)
  mem = buffers.init(k, (1,))._replace(
      x=jnp.arange(k, dtype=jnp.float32)[:, None],
      valid=jnp.ones((k,), bool), seen=jnp.asarray(k, jnp.int32))

  def one(key):
    m, new = buffers.loss_aware_add(
        mem, jnp.asarray(loss), key, jnp.full((1, 1), 99.0), jnp.array([3]),
        jnp.array([0]), 1, jnp.array([5.0]), balanced=False, num_classes=4,
        past=jnp.asarray(past))
    slot = jnp.argmax(m.x[:, 0] == 99.0)
    return slot, new[slot]

  slot, news = jax.jit(jax.vmap(one))(jax.random.split(
      jax.random.PRNGKey(0), n))
  freq = np.bincount(np.asarray(slot), minlength=k) / n
  np.testing.assert_allclose(freq, _mammoth_abs(loss, past), atol=0.03)
  assert np.all(np.asarray(news) == 5.0)
  with pytest.raises(ValueError, match="not both"):
    buffers.loss_aware_add(mem, jnp.asarray(loss), jax.random.PRNGKey(0),
                           jnp.zeros((1, 1)), jnp.array([0]), jnp.array([0]),
                           1, jnp.array([1.0]), balanced=True, num_classes=4,
                           past=jnp.asarray(past))


def test_loss_aware_add_with_past_makes_the_rows_it_writes_current():
  """Every slot past, losses [0, 5, 5, 5]: row 97 (n = K: stored) replaces
  slot 0, the lowest past loss, with probability 1. Slot 0 is then a
  current entry: row 98's victim is slot 0 with probability 1/4 (the
  current group's share), else a past slot (equal losses: uniform). Left
  a past entry with 97's loss 0, slot 0 would be its victim every time."""
  k = 4
  mem = buffers.init(k, (1,))._replace(
      x=jnp.arange(k, dtype=jnp.float32)[:, None],
      valid=jnp.ones((k,), bool), seen=jnp.asarray(k, jnp.int32))

  def two(key):
    m, new = buffers.loss_aware_add(
        mem, jnp.asarray([0.0, 5.0, 5.0, 5.0]), key,
        jnp.array([[97.0], [98.0]]), jnp.array([1, 2]), jnp.array([0, 0]), 1,
        jnp.array([0.0, 1.0]), balanced=False, num_classes=4,
        past=jnp.ones((k,), bool))
    return m.x[:, 0], new

  xs, news = map(np.asarray, jax.jit(jax.vmap(two))(
      jax.random.split(jax.random.PRNGKey(4), 64)))
  assert np.all(np.isin(xs[:, 0], [97.0, 98.0]))
  both = [97.0 in x and 98.0 in x for x in xs]
  # Stored with probability 4/5, elsewhere than slot 0 with 3/4: 3/5.
  assert 20 <= sum(both) <= 56, sum(both)
  for x, new in zip(xs, news):  # each slot keeps its row's loss
    np.testing.assert_array_equal(new, [{97.0: 0.0, 98.0: 1.0}.get(v, 5.0)
                                        for v in x])


def test_abs_step_refreshes_losses_and_uses_experience_tags_as_past(
    full_stream):
  # A full memory at experience 1: slots 0-29 from experience 0, 30-49
  # from experience 1. The step's memory is loss_aware_add's with those
  # past slots and the losses refreshed from the replayed rows.
  ctx = make_ctx(full_stream)
  s = aer_abs(mem_size=50, alpha_sample_insertion=0.0)
  e0, e1 = full_stream.experiences[:2]
  x = np.concatenate([e0.train_x[:30], e1.train_x[:20]])
  y = np.concatenate([e0.train_y[:30], e1.train_y[:20]])
  tag = (np.arange(50) >= 30).astype(np.int32)
  mem = buffers.init(50, ctx.info.input_shape)._replace(
      x=jnp.asarray(x, jnp.float32), y=jnp.asarray(y, jnp.int32),
      experience=jnp.asarray(tag), valid=jnp.ones((50,), bool),
      seen=jnp.asarray(60, jnp.int32))
  losses = jnp.linspace(0.1, 2.0, 50)
  info_of, after_step = _hooks(ctx, s)
  # 'lars' (LASS): every slot drawn as a current one, whatever its tag.
  _, lars_step = _hooks(ctx, aer_abs(mem_size=50, alpha_sample_insertion=0.0,
                                     selection="lars"))
  add = jax.jit(lambda m, sc, k, x, y, t, ns, past: buffers.loss_aware_add(
      m, sc, k, x, y, t, 1, ns, jnp.ones((B,)), balanced=False,
      num_classes=10, past=past))

  @jax.jit  # one program, not an eager dispatch of each operation
  def reference_inputs(ss, info):
    """(refreshed losses, incoming rows' masked losses, their order, the
    step's key), computed by hand from the step's logits."""
    b = info.batch
    ce = row_losses(info.logits, b["y"])
    refreshed = ss.losses.at[b["aer_abs_slots"][B:]].set(ce[B:],
                                                          mode="drop")
    inc = row_losses(ace_logits(info.logits[:B], b["y"][:B], b["mask"][:B],
                                ss.seen), b["y"][:B])
    order = jnp.argsort(inc, stable=True)
    return refreshed, inc, order, jax.random.fold_in(ss.key, ss.memory.seen)

  differ = 0
  for seed in range(3):
    state = _at(ctx, s, full_stream, i=1, memory=mem, losses=losses,
                key=jax.random.PRNGKey(seed))
    ss = state.strategy
    info = info_of(state, batch_of(e1, start=100))
    new = after_step(ss, info)
    b = info.batch
    slots = np.asarray(b["aer_abs_slots"])
    assert np.all(slots[:B] == 50) and np.all(slots[B:] < 50)
    refreshed, inc, order, key = reference_inputs(ss, info)
    assert not np.allclose(refreshed, ss.losses)
    got = {}
    for name, past in (("tags", jnp.asarray(tag == 0)),
                       ("none", jnp.zeros((50,), bool))):
      got[name] = add(ss.memory, refreshed, key, b["x"][:B][order],
                      b["y"][:B][order], b["task"][:B][order], inc[order],
                      past)
    np.testing.assert_array_equal(new.memory.x, got["tags"][0].x)
    np.testing.assert_allclose(new.losses, got["tags"][1], rtol=1e-6)
    lars = lars_step(ss, info)
    np.testing.assert_array_equal(lars.memory.x, got["none"][0].x)
    np.testing.assert_allclose(lars.losses, got["none"][1], rtol=1e-6)
    differ += not np.array_equal(got["tags"][0].x, got["none"][0].x)
  assert differ > 0  # the past slots change the draw


# ---------------------------------------------------------------------------
# AER: the epoch alternation and the restore.

def test_replay_epochs_are_the_odd_ones_and_the_last():
  for epochs, want in ((2, [0, 1]), (4, [0, 1, 0, 1]), (3, [0, 1, 1]),
                       (5, [0, 1, 0, 1, 1])):
    got = [bool(is_replay_epoch(jnp.asarray(e), epochs))
           for e in range(epochs)]
    assert got == [bool(w) for w in want], epochs


def _memory_of_first_rows(ctx, experience, n: int):
  """A 50-slot memory holding ``experience``'s first ``n`` training rows
  (task 0)."""
  return buffers.reservoir_add(
      buffers.init(50, ctx.info.input_shape), jax.random.PRNGKey(0),
      jnp.asarray(experience.train_x[:n]),
      jnp.asarray(experience.train_y[:n]), jnp.zeros((n,), jnp.int32), 0)


def test_no_replay_term_in_forgetting_epochs_no_insertion_in_replay_ones(
    full_stream):
  ctx = make_ctx(full_stream)
  s = aer_abs(mem_size=50, train_epochs=4)
  e0, e1 = full_stream.experiences[:2]
  mem = _memory_of_first_rows(ctx, e0, 50)
  steps = -(-e1.num_train // B)
  info_of, after_step = _hooks(ctx, s)

  @jax.jit  # one program, not an eager dispatch of each operation
  def terms(ss, info):
    """(the incoming rows' masked loss, the replayed rows' loss) by hand."""
    b = info.batch
    inc = cross_entropy(ace_logits(info.logits[:B], b["y"][:B],
                                   b["mask"][:B], ss.seen), b["y"][:B],
                        b["mask"][:B])
    return inc, cross_entropy(info.logits[B:], b["y"][B:], b["mask"][B:])

  for epoch in range(4):
    state = _at(ctx, s, full_stream, i=1, count=epoch * steps + 3,
                memory=mem)
    ss = state.strategy
    info = info_of(state, batch_of(e1))
    inc, rep = terms(ss, info)
    assert float(rep) > 0.5
    replay = epoch % 2 == 1 or epoch == 3
    np.testing.assert_allclose(float(info.loss),
                               float(inc + rep) if replay else float(inc),
                               rtol=1e-6)
    new = after_step(ss, info)
    inserted = int(new.memory.seen) - int(ss.memory.seen)
    assert inserted == (0 if replay else 2), epoch  # round(0.25 * 10)
    assert int(new.count) == int(ss.count) + 1
  # aer=False: replay and insertion in every epoch.
  s = aer_abs(mem_size=50, aer=False, train_epochs=4)
  state = _at(ctx, s, full_stream, i=1, count=3, memory=mem)
  info_of, after_step = _hooks(ctx, s)
  info = info_of(state, batch_of(e1))
  assert float(info.loss) > float(terms(state.strategy, info)[0]) + 0.5
  assert int(after_step(state.strategy, info).memory.seen) == 52


def test_replay_term_counts_only_valid_draws(full_stream):
  # A memory of 3 entries, 10 draws: the replay term is the mean
  # cross-entropy of the 3 entries, not of the 7 empty draws as well.
  ctx = make_ctx(full_stream)
  s = aer_abs(mem_size=50, train_epochs=2)
  e0, e1 = full_stream.experiences[:2]
  mem = _memory_of_first_rows(ctx, e0, 3)
  steps = -(-e1.num_train // B)
  state = _at(ctx, s, full_stream, i=1, count=steps + 2, memory=mem)  # replay
  info_of, _ = _hooks(ctx, s)
  info = info_of(state, batch_of(e1))
  # Nothing seen yet: the ACE mask keeps every class for the incoming rows.
  o = np.asarray(ctx.logits(state.params, state.model_state,
                            jnp.asarray(e1.train_x[:B]),
                            jnp.asarray(e1.train_task[:B])), np.float64)
  inc = -np.mean(np_log_softmax(o)[np.arange(B), e1.train_y[:B]])
  om = np.asarray(ctx.logits(state.params, state.model_state,
                             jnp.asarray(e0.train_x[:3]),
                             jnp.zeros((3,), jnp.int32)), np.float64)
  rep = -np.mean(np_log_softmax(om)[np.arange(3), e0.train_y[:3]])
  np.testing.assert_allclose(float(info.loss), inc + rep, rtol=1e-5)


def test_seen_classes_grow_by_the_unpadded_rows_only(full_stream):
  ctx = make_ctx(full_stream)
  s = aer_abs(mem_size=50)
  e1, e2 = full_stream.experiences[1:3]
  seen = jnp.zeros((10,), bool).at[jnp.array([0, 1])].set(True)
  state = _at(ctx, s, full_stream, i=1, seen=seen)
  batch = batch_of(e1)
  # Rows 7-9 are padding that carries classes 4, 5 of the next experience.
  batch["x"] = batch["x"].at[7:].set(jnp.asarray(e2.train_x[:3]))
  batch["y"] = batch["y"].at[7:].set(jnp.asarray(e2.train_y[:3]))
  batch["mask"] = jnp.asarray([1.0] * 7 + [0.0] * 3)
  info_of, after_step = _hooks(ctx, s)
  new = after_step(state.strategy, info_of(state, batch))
  want = np.zeros(10, bool)
  want[[0, 1]] = True
  want[np.asarray(e1.train_y[:7])] = True
  np.testing.assert_array_equal(np.asarray(new.seen), want)


def test_epoch_length_rounds_up_and_the_start_weights_are_saved(
    full_stream):
  ctx = make_ctx(full_stream)
  s = aer_abs(mem_size=50)
  e4 = full_stream.experiences[4]
  assert e4.num_train == 265  # not a multiple of B
  state = train.init_state(ctx, s, 0)
  assert not bool(s.before_experience(ctx, state, full_stream.experiences[0])
                  .strategy.has_saved)
  # Weights changed since the last replay epoch (a chained member's hook):
  # the experience starts from them, so they are what a restore brings back.
  moved = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
  ss = s.before_experience(ctx, moved, e4).strategy
  assert int(ss.epoch_steps) == 27 and int(ss.count) == 0
  assert int(ss.experience) == 4
  assert bool(ss.has_saved) and _same(ss.saved, moved.params)
  assert not _same(ss.saved, state.strategy.saved)


@pytest.mark.parametrize("epochs", [3, 4])
def test_project_params_restores_exactly_after_forgetting_epochs(
    full_stream, epochs):
  # 5 steps per epoch: the saved weights come back after the last step of
  # each forgetting epoch (even, not the last) and only when saved; never
  # between two replay epochs (1 and 2 of 3).
  ctx = make_ctx(full_stream)
  s = aer_abs(mem_size=50, train_epochs=epochs)
  state = train.init_state(ctx, s, 0)
  saved = jax.tree.map(lambda p: p + 1.0, state.params)
  proj = jax.jit(lambda ss, p: s.project_params(ctx, ss, p))
  for has_saved in (True, False):
    for count in range(5 * epochs):
      ss = state.strategy._replace(
          count=jnp.asarray(count, jnp.int32),
          epoch_steps=jnp.asarray(5, jnp.int32), saved=saved,
          has_saved=jnp.asarray(has_saved))
      e = count // 5
      restore = (has_saved and count % 5 == 4 and e % 2 == 0
                 and e != epochs - 1)
      got = proj(ss, state.params)
      assert _same(got, saved if restore else state.params), (count,
                                                               has_saved)


def _run_epochs(ctx, s, stream, n_exp, epochs):
  """Trains ``n_exp`` experiences epoch by epoch through the compiled
  loop; returns the parameters and strategy state after each epoch (host
  copies) and the learner."""
  learner = train.make_learner(ctx, s, epochs=epochs)
  state = train.init_state(ctx, s, 0)
  snaps = []
  host = lambda t: jax.tree.map(np.array, t)
  for exp in stream.experiences[:n_exp]:
    state = train.reset_opt_state(ctx, s.before_experience(ctx, state, exp))
    data = train.device_experience(exp, ctx.info.train_size)
    for e in range(epochs):
      state, _, _ = learner.chunk_fn(state, data, exp.num_train, exp.index,
                                     e, 0)
      snaps.append((exp.index, e, host(state.params), host(state.strategy)))
    state = s.after_experience(ctx, state, exp)
  return snaps, learner


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_replay_epochs_start_from_the_last_replay_epochs_weights(
    full_stream):
  ctx = make_ctx(full_stream)
  s = aer_abs(mem_size=50, train_epochs=4)
  snaps, learner = _run_epochs(ctx, s, full_stream, 2, 4)
  assert learner.chunk_fn._cache_size() == 1
  by = {(i, e): (p, ss) for i, e, p, ss in snaps}
  steps = [-(-x.num_train // B) for x in full_stream.experiences[:2]]
  for (i, e), (p, ss) in by.items():
    assert int(ss.count) == (e + 1) * steps[i]
    replay = e % 2 == 1
    # Saved after a replay epoch; restored after a forgetting epoch.
    assert bool(ss.has_saved) == ((i, e) != (0, 0))
    if replay:
      assert _same(ss.saved, p)
  # Experience 0, epoch 0: nothing saved yet, so its training is kept.
  assert not _same(by[0, 0][0], jax.tree.map(
      np.array, train.init_state(ctx, s, 0).params))
  # The restore follows a forgetting epoch's last step: epoch 3 starts
  # from epoch 1's end, and experience 1's epoch 1 from experience 0's.
  assert _same(by[0, 2][0], by[0, 1][0])
  assert _same(by[1, 0][0], by[0, 3][0])
  assert _same(by[1, 2][0], by[1, 1][0])
  # The memory is fed in forgetting epochs only.
  seen = {k: int(v[1].memory.seen) for k, v in by.items()}
  assert seen[0, 0] > 0 and seen[0, 1] == seen[0, 0]
  assert seen[0, 2] > seen[0, 1] and seen[0, 3] == seen[0, 2]
  assert seen[1, 0] > seen[0, 3] and seen[1, 1] == seen[1, 0]
  # Replay epochs did train: the weights moved during them.
  assert not _same(by[0, 3][0], by[0, 2][0])
  assert not _same(by[1, 1][0], by[1, 0][0])


def test_aer_false_never_restores(full_stream):
  ctx = make_ctx(full_stream)
  snaps, _ = _run_epochs(ctx, aer_abs(mem_size=50, aer=False,
                                      train_epochs=2), full_stream, 2, 2)
  by = {(i, e): p for i, e, p, _ in snaps}
  assert not _same(by[1, 0], by[0, 1])
  assert not any(bool(ss.has_saved) for *_, ss in snaps)


# ---------------------------------------------------------------------------
# Arguments and the normal loop.

def test_bad_arguments_raise_clear_errors(full_stream):
  for kw, match in [
      (dict(alpha_sample_insertion=1.0), r"alpha_sample_insertion must be "
       r"a number in \[0, 1\).*got 1.0"),
      (dict(alpha_sample_insertion=-0.1), r"in \[0, 1\).*got -0.1"),
      (dict(alpha_sample_insertion=75), r"percentages are not accepted.*"
       r"got 75"),
      (dict(alpha_sample_insertion=float("nan")), r"in \[0, 1\)"),
      (dict(alpha_sample_insertion=True), r"in \[0, 1\)"),
      (dict(selection="labrs"), r"unknown selection 'labrs'; valid: "
       r"\['abs', 'lars', 'reservoir'\]"),
      (dict(train_epochs=1), r"aer=True needs train_epochs >= 2.*got 1.*"
       "aer=False"),
      (dict(train_epochs=0, aer=False), r"train_epochs must be an int >= 1"),
      (dict(aer="yes"), "aer must be True or False"),
      (dict(mem_size=0), "mem_size must be a positive int, got 0"),
      (dict(mem_size=5, batch_size=6), "batch_size=6 is larger than the "
       "memory capacity mem_size=5")]:
    with pytest.raises(ValueError, match=match):
      aer_abs(**kw)
  aer_abs(train_epochs=1, aer=False)  # one pass without AER is fine


def test_runs_split_digits_without_recompiling_and_checks_epochs(stream):
  c = config("aer_abs", aer_abs=dict(mem_size=40))
  c.train.epochs = 2
  r = experiment.run(c, scenario=stream)
  assert r.learner.chunk_fn._cache_size() == 1
  ss = r.state.strategy
  assert int(jnp.sum(ss.memory.valid)) == 40
  # Both experiences are in memory, and it learned both (chance is 0.25).
  assert set(np.unique(np.asarray(ss.memory.experience))) == {0, 1}
  assert np.all(r.accuracy[-1, :2] > 0.5), r.accuracy
  # Not given, train_epochs is the run's train.epochs (build_strategy).
  c.train.epochs = 3
  one = dataclasses.replace(stream, experiences=stream.experiences[:1])
  experiment.run(c, scenario=one)
  c.strategy.aer_abs.train_epochs = 2  # given, and not the run's
  with pytest.raises(ValueError, match=r"strategy.aer_abs.train_epochs=2, "
                     r"but the run trains 3 epoch"):
    experiment.run(c, scenario=one)   # refused before training (setup)
  # A record built in a script skips the config: the strategy itself
  # refuses as the experience ends.
  with pytest.raises(ValueError, match=r"experience 0 ran .* 3 epochs.*"
                     r"train_epochs=2"):
    experiment.run(c, scenario=one,
                   strategy=aer_abs(mem_size=40, train_epochs=2))


@pytest.mark.parametrize("spec", ["replay+aer_abs", "aer_abs+replay"])
def test_beside_another_row_appender(stream, spec):
  # Session 32's fuzz: with a partner's rows in the batch, the slots'
  # losses were read from every appended row (a broadcasting error while
  # tracing). Each member's rows now stay its own.
  c = config(spec, aer_abs=dict(mem_size=40), replay=dict(mem_size=40))
  c.train.epochs = 2
  r = experiment.run(c, scenario=stream)
  assert r.learner.chunk_fn._cache_size() == 1
  assert np.all(np.isfinite(r.accuracy))
  ss = r.state.strategy[spec.split("+").index("aer_abs")]
  assert int(jnp.sum(ss.memory.valid)) == 40
  # Its slot array ends at its own rows: each names the memory slot whose
  # example sits in that row of the prepared batch.
  from jaxcl.strategies import aer_abs as aer_mod
  ctx, strat = r.learner.ctx, r.learner.strategy
  out = jax.jit(lambda ss, b, k: strat.prepare_batch(ctx, ss, b, k))(
      r.state.strategy, batch_of(stream.experiences[1]),
      jax.random.PRNGKey(3))
  slots = np.asarray(out[aer_mod._SLOTS])
  first = spec.startswith("replay")
  assert len(slots) == B + (B if first else 0) + B  # incoming, replay's, own
  assert np.all(slots[:-B] == 40)
  own = slots[-B:]
  np.testing.assert_array_equal(
      np.asarray(out["x"])[len(slots) - B:len(slots)][own < 40],
      np.asarray(ss.memory.x)[own[own < 40]])
