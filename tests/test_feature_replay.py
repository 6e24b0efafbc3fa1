"""Mechanism tests of feature replay (Avalanche's FeatureReplay) and its
class-balanced memory (``buffers.class_balanced_experience_add``, Avalanche's
ClassBalancedBuffer): quotas, random subsets, the loss against a
hand-written one, what the memory holds, and the classifier-only replay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import buffers, scenarios
from jaxcl.strategies.feature_replay import feature_replay
from jaxcl.train import init_state

from partial_runs import run_keeping_states
from test_regularisation import _ctx


def _add(mem, pr, key, ids, y, num_classes=6, pad=0):
  """Offers rows whose input is their id (1-dim), ``pad`` padding rows
  (id -1) after them."""
  x = np.r_[ids, -np.ones(pad)].astype(np.float32)[:, None]
  yy = np.r_[y, np.zeros(pad, int)].astype(np.int32)
  ok = np.r_[np.ones(len(ids), bool), np.zeros(pad, bool)]
  return buffers.class_balanced_experience_add(
      mem, pr, key, jnp.asarray(x), jnp.asarray(yy),
      jnp.zeros(len(yy), jnp.int32), 0, jnp.asarray(ok),
      num_classes=num_classes)


def _entries(mem):
  valid = np.asarray(mem.valid)
  return (np.asarray(mem.x)[valid, 0].astype(int),
          np.asarray(mem.y)[valid], np.flatnonzero(valid))


def test_class_balanced_experience_add_quotas_and_subsets():
  mem = buffers.init(12, (1,))
  pr = jnp.zeros(12)
  key = jax.random.PRNGKey(0)
  # Classes 0 (10 rows) and 1 (3 rows), 4 padding rows: quota 12 // 2.
  mem, pr = _add(mem, pr, key, np.arange(13), [0] * 10 + [1] * 3, pad=4)
  ids, y, slots1 = _entries(mem)
  assert np.bincount(y, minlength=6).tolist() == [6, 3, 0, 0, 0, 0]
  assert len(set(ids)) == len(ids) and ids.min() >= 0
  assert set(ids[y == 0]) <= set(range(10)) and set(ids[y == 1]) == {10, 11,
                                                                     12}
  first = dict(zip(slots1, ids))
  # Classes 2 and 3: quota 12 // 4 = 3; old classes shrink to subsets and
  # what stays keeps its slot.
  mem, pr = _add(mem, pr, jax.random.PRNGKey(1), np.arange(100, 120),
                 [2] * 10 + [3] * 10)
  ids, y, slots = _entries(mem)
  assert np.bincount(y, minlength=6).tolist() == [3, 3, 3, 3, 0, 0]
  assert len(set(ids)) == 12
  for s, i in zip(slots, ids):
    if i < 100:
      assert first[s] == i
  # Class 2 returns with 10 more rows beside class 4: quota 12 // 5 = 2,
  # class 2's two drawn from its 20 rows.
  mem, pr = _add(mem, pr, jax.random.PRNGKey(2), np.arange(200, 212),
                 [2] * 10 + [4] * 2)
  ids, y, _ = _entries(mem)
  assert np.bincount(y, minlength=6).tolist() == [2, 2, 2, 2, 2, 0]
  assert set(ids[y == 2]) <= set(range(100, 110)) | set(range(200, 210))
  assert int(mem.seen) == 13 + 20 + 12


def test_class_balanced_experience_add_is_uniform():
  """Every row of a class is kept with the same probability, a returning
  class's rows from both experiences alike (2000 draws; the binomial
  standard error is 0.01, the tolerance 0.04)."""
  def once(key):
    k1, k2 = jax.random.split(key)
    mem, pr = buffers.init(5, (1,)), jnp.zeros(5)
    x = jnp.arange(10, dtype=jnp.float32)[:, None]
    y = jnp.zeros(10, jnp.int32)
    t = jnp.zeros(10, jnp.int32)
    mem, pr = buffers.class_balanced_experience_add(
        mem, pr, k1, x, y, t, 0, None, num_classes=2)
    mem, pr = buffers.class_balanced_experience_add(
        mem, pr, k2, x + 10, y, t, 1, None, num_classes=2)
    return jnp.zeros(20).at[mem.x[:, 0].astype(jnp.int32)].add(
        mem.valid.astype(jnp.float32))

  freq = np.asarray(jax.vmap(once)(jax.random.split(jax.random.PRNGKey(3),
                                                    2000))).mean(0)
  np.testing.assert_allclose(freq, 0.25, atol=0.04)


def _hand_loss(ctx, params, model_state, batch, classes, w, replaying):
  """Avalanche's loss by hand: the masked cross-entropy of the incoming
  rows (half once replaying), plus half of the classifier's terms on the
  replayed features and the incoming rows' detached features; the head is
  ``Dense``: ``f @ kernel + bias``."""
  y, m = batch["y"], batch["mask"]
  logits = ctx.logits(params, model_state, batch["x"], batch["task"])
  masked = jnp.where(classes, logits, -1e9)
  lp = jax.nn.log_softmax(masked)
  ce = -jnp.sum(m * lp[jnp.arange(len(y)), y]) / jnp.sum(m)
  if not replaying:
    return ce
  head = lambda f: f @ params["head"]["kernel"] + params["head"]["bias"]
  f = jax.lax.stop_gradient(ctx.apply(params, model_state, batch["x"],
                                      batch["task"], features=True)[0])
  cur = jax.nn.log_softmax(head(f))
  cur = -jnp.sum(m * cur[jnp.arange(len(y)), y]) / jnp.sum(m)
  fm, fy, fok = (batch["feature_x"], batch["feature_y"],
                 batch["feature_mask"])
  rep = jax.nn.log_softmax(head(fm))
  rep = -jnp.sum(fok * rep[jnp.arange(len(fy)), fy]) / jnp.sum(fok)
  return 0.5 * ce + 0.5 * ((1 - w) * rep + w * cur)


@pytest.mark.parametrize("mask", ["seen", "new"])
def test_loss_and_gradient_equal_the_hand_objective(mask):
  ctx, sc = _ctx("class", widths=(16,), n_exp=2)
  s = feature_replay(mem_size=8, batch_size=4, mask=mask)
  state = init_state(ctx, s, 0)
  e0, e1 = sc.experiences[:2]

  def total(params, ss, batch):
    logits = ctx.logits(params, ss.model_state, batch["x"], batch["task"])
    return (s.task_loss(ctx, ss, logits, batch)
            + s.loss(ctx, ss, params, batch, logits))

  def batch_of(e):
    return {"x": jnp.asarray(e.train_x[:8]), "y": jnp.asarray(e.train_y[:8]),
            "task": jnp.zeros(8, jnp.int32),
            "mask": jnp.asarray([1.] * 7 + [0.]), "index": jnp.arange(8)}

  state = s.before_experience(ctx, state, e0)
  b0 = s.prepare_batch(ctx, state.strategy, batch_of(e0),
                       jax.random.PRNGKey(1))
  assert float(jnp.sum(b0["feature_mask"])) == 0.0   # nothing stored yet
  c0 = np.isin(np.arange(4), e0.classes)             # seen = new here
  for p in (state.params, jax.tree.map(lambda a: a * 0.7, state.params)):
    np.testing.assert_allclose(
        total(p, state.strategy, b0),
        _hand_loss(ctx, p, state.model_state, b0, c0, 1.0, False),
        rtol=1e-5)
  state = s.after_experience(ctx, state, e0)
  state = s.before_experience(ctx, state, e1)
  ss = state.strategy
  assert int(jnp.sum(ss.memory.valid)) == 8
  b1 = s.prepare_batch(ctx, ss, batch_of(e1), jax.random.PRNGKey(2))
  assert float(jnp.sum(b1["feature_mask"])) == 4.0
  classes = np.isin(np.arange(4), e1.classes)
  if mask == "seen":
    classes |= c0
  params = jax.tree.map(lambda a: a * 1.1, state.params)
  want = _hand_loss(ctx, params, state.model_state, b1, classes, 0.5, True)
  np.testing.assert_allclose(total(params, ss, b1), want, rtol=1e-5)
  g = jax.grad(total)(params, ss, b1)
  g_want = jax.grad(lambda p: _hand_loss(ctx, p, state.model_state, b1,
                                         classes, 0.5, True))(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The classifier terms train the output layer alone.
  g_cls = jax.grad(lambda p: s.loss(ctx, ss, p, b1, None))(params)
  assert all(float(jnp.abs(a).max()) == 0.0
             for a in jax.tree.leaves(g_cls["backbone"]))
  assert float(jnp.abs(g_cls["head"]["kernel"]).max()) > 0
  # ... and the replayed features: stored ones, with their own labels.
  fx, fy = np.asarray(ss.memory.x), np.asarray(ss.memory.y)
  for row, c in zip(np.asarray(b1["feature_x"]), np.asarray(
      b1["feature_y"])):
    i = np.flatnonzero(np.all(fx == row, axis=1))
    assert i.size and c in fy[i]


def test_memory_holds_each_experiences_own_features(digits):
  """Per class ``mem_size // classes seen`` entries; each is the
  evaluation-mode feature of one of its class's training rows under the
  model as its experience ended, and never recomputed after."""
  sc = scenarios.split(digits, 5)
  c = jaxcl.default_config()
  c.model.widths = (32,)
  c.train.epochs = 1
  c.report.progress = False
  c.strategy.name = "feature_replay"
  c.strategy.feature_replay = dict(mem_size=100)
  res, states = run_keeping_states(c, scenario=sc)
  mem = res.state.strategy.memory
  y, x = np.asarray(mem.y)[np.asarray(mem.valid)], np.asarray(
      mem.x)[np.asarray(mem.valid)]
  assert np.bincount(y, minlength=10).tolist() == [10] * 10
  ctx = res.learner.ctx
  for i, e in enumerate(sc.experiences):
    st = states[i]
    f = np.asarray(ctx.apply(st.params, st.model_state,
                             jnp.asarray(e.train_x),
                             jnp.zeros(e.num_train, jnp.int32),
                             features=True)[0])
    for k in e.classes:
      d = ((x[y == k][:, None] - f[None]) ** 2).sum(-1)
      np.testing.assert_allclose(d.min(1), 0.0, atol=1e-6)
      assert np.all(e.train_y[d.argmin(1)] == k)
  # Old classes keep their old features: the first experience's features
  # under the final model are elsewhere.
  final = res.state
  f_now = np.asarray(ctx.apply(final.params, final.model_state,
                               jnp.asarray(sc.experiences[0].train_x),
                               jnp.zeros(sc.experiences[0].num_train,
                                         jnp.int32), features=True)[0])
  d = ((x[y == 0][:, None] - f_now[None]) ** 2).sum(-1)
  assert d.min(1).max() > 1e-2
  assert res.learner.chunk_fn._cache_size() == 1


def test_keeps_old_classes_where_naive_forgets(digits):
  """With the default ``mask='new'``; Avalanche's code default
  (``'seen'``) loses them as Naive does (docs/notes_replay.md)."""
  c = jaxcl.default_config()
  c.model.widths = (64,)
  c.report.progress = False
  c.strategy.name = "naive"
  naive = np.asarray(jaxcl.run(c).accuracy)
  c.strategy.name = "feature_replay"
  c.strategy.feature_replay = dict(mem_size=200)
  acc = np.asarray(jaxcl.run(c).accuracy)
  assert np.all(np.isfinite(acc))
  assert naive[-1, :-1].mean() < 0.1
  assert acc[-1, :-1].mean() > naive[-1, :-1].mean() + 0.2, acc[-1]


def test_bad_arguments(digits):
  ctx, _ = _ctx("class", widths=(16,))   # 4 classes, batch 8
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="feature_replay: mem_size=3 is below "
                     r"the number of classes \(4\).*use mem_size >= 4"):
    feature_replay(mem_size=3, batch_size=2).init(ctx, key, None)
  # batch_size 0: the training batch (8), which must fit the memory.
  with pytest.raises(ValueError, match="feature_replay: batch_size=8 is "
                     "larger than the memory capacity mem_size=5; use "
                     "batch_size <= 5"):
    feature_replay(mem_size=5, batch_size=0).init(ctx, key, None)
  with pytest.raises(ValueError, match="feature_replay: mask must be one of "
                     r"\['new', 'seen'\], got 'old'"):
    feature_replay(mask="old")
  with pytest.raises(ValueError, match="feature_replay: batch_size must be "
                     "an int >= 0"):
    feature_replay(batch_size=-1)
  with pytest.raises(ValueError, match="feature_replay: mem_size"):
    feature_replay(mem_size=0)
  c = jaxcl.default_config()
  c.strategy.name, c.model.name, c.scenario.kind = ("feature_replay",
                                                    "hypernet", "task")
  with pytest.raises(ValueError, match=r"the model \(HyperNetwork\) has no "
                     "named layers to split at 'backbone'"):
    jaxcl.run(c)
