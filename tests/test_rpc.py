"""RPC (Pernici et al. 2021, as Mammoth's rpc.py): the fixed d-simplex head
and the end-of-experience class-balanced memory (on scikit-learn digits)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import buffers, experiment, train
from jaxcl.strategies.rpc import balanced_add, dsimplex, rpc, simplex_logits
from test_replay import B, batch_of, config, make_ctx


def mammoth_dsimplex(num_classes):
  """Mammoth's ``dsimplex`` (models/rpc.py), loop for loop."""
  m = num_classes - 1
  x = np.zeros([m, m + 1])
  for j in range(m):
    x[j, j] = 1.0
  a = (1.0 - np.sqrt(float(1 + m))) / float(m)
  for i in range(m):
    x[i, m] = a
  c = np.zeros(m)
  for i in range(m):
    s = 0.0
    for j in range(m + 1):
      s = s + x[i, j]
    c[i] = s / float(m + 1)
  for j in range(m + 1):
    for i in range(m):
      x[i, j] = x[i, j] - c[i]
  s = 0.0
  for i in range(m):
    s = s + x[i, 0] ** 2
  s = np.sqrt(s)
  for j in range(m + 1):
    for i in range(m):
      x[i, j] = x[i, j] / s
  return x


@pytest.mark.parametrize("n", [2, 3, 10, 37])
def test_dsimplex_is_mammoths_regular_simplex(n):
  w = dsimplex(n)
  assert w.shape == (n - 1, n)
  np.testing.assert_allclose(w, mammoth_dsimplex(n), atol=1e-12)
  gram = w.T @ w
  # Unit columns, every pair at cosine -1/(n-1), centred at the origin.
  np.testing.assert_allclose(np.diag(gram), 1.0, atol=1e-12)
  off = gram[~np.eye(n, dtype=bool)]
  np.testing.assert_allclose(off, -1.0 / (n - 1), atol=1e-12)
  np.testing.assert_allclose(w.sum(axis=1), 0.0, atol=1e-12)


def test_head_is_fixed_loss_and_prediction_go_through_it(stream):
  ctx = make_ctx(stream)
  c = ctx.info.num_classes
  s = rpc(mem_size=40, batch_size=5)
  state = train.init_state(ctx, s, 0)
  e0 = stream.experiences[0]
  state = s.before_experience(ctx, state, e0)
  batch = batch_of(e0)
  raw = np.asarray(ctx.logits(state.params, {}, batch["x"], batch["task"]),
                   np.float64)
  w = mammoth_dsimplex(c)
  h = raw[:, :c - 1] @ w
  # predict: the raw outputs' first C-1 through the simplex.
  got = s.predict(ctx, state.strategy, state.params, {}, batch["x"],
                  batch["task"])
  np.testing.assert_allclose(np.asarray(got), h, rtol=1e-5, atol=1e-5)
  # task_loss: the cross-entropy of those logits, by hand.
  y = np.asarray(batch["y"])
  lse = np.log(np.exp(h - h.max(1, keepdims=True)).sum(1)) + h.max(1)
  want = np.mean(lse - h[np.arange(B), y])
  loss = s.task_loss(ctx, state.strategy, jnp.asarray(raw, jnp.float32),
                     batch)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # Its gradient wrt the raw outputs is W (softmax - onehot) / B: nothing
  # reaches the dropped last output.
  g = np.asarray(jax.grad(lambda r: s.task_loss(ctx, state.strategy, r,
                                                batch))(
      jnp.asarray(raw, jnp.float32)))
  p = np.exp(h - lse[:, None])
  p[np.arange(B), y] -= 1
  np.testing.assert_allclose(g[:, :c - 1], p @ w.T / B, atol=1e-6)
  np.testing.assert_array_equal(g[:, c - 1], 0.0)
  # One SGD step of the whole chain leaves the last output unit's weights
  # where they were; the others move.
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  new = step(state, batch)
  head = lambda st: jax.tree.leaves(st.params)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max(axis=tuple(
      range(a.ndim - 1))) for a, b in zip(head(new), head(state))
      if a.shape[-1] == c]
  assert moved, "no parameter of the output layer found"
  for m in moved:
    assert m[c - 1] == 0.0 and m[:c - 1].max() > 0


def test_balanced_add_quotas_by_hand():
  k, c = 11, 5
  mem = buffers.init(k, (1,))
  # Experience 0: 7 rows of class 0, 3 of class 1, 2 rows of padding.
  y0 = np.array([0] * 7 + [1] * 3 + [0, 0])
  x0 = np.arange(12, dtype=np.float32)[:, None]
  mask0 = np.arange(12) < 10
  old, new = np.zeros(c, bool), np.isin(np.arange(c), [0, 1])
  mem = balanced_add(mem, jax.random.PRNGKey(0), x0, y0, y0 * 0, 0, mask0,
                     old, new)
  cnt = np.asarray(buffers.counts(mem, c))
  # 11 slots for 2 classes: 5 each and 1 more to one of them; class 1 has
  # only 3 rows, so it keeps all 3 and 5 or 6 of class 0 go in.
  assert cnt[1] == 3 and cnt[0] in (5, 6) and cnt[2:].sum() == 0
  stored = set(np.asarray(mem.x)[np.asarray(mem.valid), 0].tolist())
  assert stored <= set(range(10))       # no padding row, no row twice
  assert len(stored) == cnt.sum()
  # Experience 1: classes 2, 3, 4, 4 rows each. |S| = 5, so old classes
  # keep 11 // 5 = 2 each (a subset of what they had); 7 slots left: 2
  # per new class and one more to one of them.
  y1 = np.repeat([2, 3, 4], 4)
  x1 = 100 + np.arange(12, dtype=np.float32)[:, None]
  old, new = new, np.isin(np.arange(c), [2, 3, 4])
  before = {int(v): int(l) for v, l, ok in zip(
      np.asarray(mem.x)[:, 0], np.asarray(mem.y), np.asarray(mem.valid))
      if ok}
  mem1 = balanced_add(mem, jax.random.PRNGKey(1), x1, y1, y1 * 0, 1,
                      np.ones(12, bool), old, new)
  cnt = np.asarray(buffers.counts(mem1, c))
  np.testing.assert_array_equal(cnt[:2], [2, 2])
  assert sorted(cnt[2:].tolist()) == [2, 2, 3]
  valid = np.asarray(mem1.valid)
  xs, ys = np.asarray(mem1.x)[valid, 0], np.asarray(mem1.y)[valid]
  ex = np.asarray(mem1.experience)[valid]
  for v, lab, e in zip(xs, ys, ex):
    if lab < 2:
      assert before[int(v)] == lab and e == 0   # kept, not rewritten
    else:
      assert 100 <= v < 112 and y1[int(v) - 100] == lab and e == 1
  assert len(set(xs.tolist())) == valid.sum() == 11


def test_balanced_add_keeps_uniform_random_subsets():
  """Both choices are uniform random subsets (not the first rows or the
  first slots): over many keys a new class's first and last rows go in
  equally often, and an old class's entries survive a shrink equally
  often whatever their slot."""
  k, c, n = 8, 3, 16
  y0 = np.zeros(n, np.int32)
  x0 = np.arange(n, dtype=np.float32)[:, None]
  none, first = np.zeros(c, bool), np.arange(c) == 0
  add = jax.jit(jax.vmap(
      lambda key, mem, old, new, y, x: balanced_add(
          mem, key, x, y, y * 0, 0, np.ones(len(y), bool), old, new),
      in_axes=(0, None, None, None, None, None)))
  keys = jax.random.split(jax.random.PRNGKey(0), 300)
  mems = add(keys, buffers.init(k, (1,)), none, first, y0, x0)
  # 8 of class 0's 16 rows go in: each with probability 1/2.
  got = np.zeros((300, n))
  for i in range(300):
    got[i, np.asarray(mems.x)[i, np.asarray(mems.valid)[i], 0].astype(int)] = 1
  np.testing.assert_array_equal(got.sum(1), 8)
  assert abs(got[:, :8].mean() - 0.5) < 0.08 and \
      abs(got[:, 8:].mean() - 0.5) < 0.08, got.mean(0)
  # Class 1 arrives: class 0 shrinks from its 8 entries to 8 // 2 = 4.
  mem = balanced_add(buffers.init(k, (1,)), jax.random.PRNGKey(1), x0, y0,
                     y0 * 0, 0, np.ones(n, bool), none, first)
  y1 = np.ones(n, np.int32)
  mems = add(keys, mem, first, np.arange(c) == 1, y1, x0 + 100)
  kept = np.zeros((300, k))
  slot_x = np.asarray(mem.x)[:, 0]
  for i in range(300):
    xs = set(np.asarray(mems.x)[i, np.asarray(mems.valid)[i], 0].tolist())
    kept[i] = [v in xs for v in slot_x]
  np.testing.assert_array_equal(kept.sum(1), 4)
  assert abs(kept[:, :4].mean() - 0.5) < 0.08 and \
      abs(kept[:, 4:].mean() - 0.5) < 0.08, kept.mean(0)


def test_balanced_add_split_mnist_quotas():
  """Mammoth's sequence on Split MNIST with K = 200 and 500 (one draw)."""
  for k, want in ((200, [[100] * 2, [50] * 4, [33] * 4 + [34] * 2,
                         [25] * 8, [20] * 10]),
                  (500, [[250] * 2, [125] * 4, [83] * 4 + [84, 84],
                         [62] * 6 + [64, 64], [50] * 10])):
    mem = buffers.init(k, (1,))
    seen = np.zeros(10, bool)
    add = jax.jit(balanced_add)
    for e in range(5):
      y = np.repeat([2 * e, 2 * e + 1], 300)
      new = np.isin(np.arange(10), [2 * e, 2 * e + 1])
      mem = add(mem, jax.random.PRNGKey(e), np.zeros((600, 1)), y,
                y * 0, e, np.ones(600, bool), seen, new)
      seen = seen | new
      cnt = np.asarray(buffers.counts(mem, 10))
      assert sorted(cnt[:2 * e + 2].tolist()) == want[e], (k, e, cnt)


def test_rpc_bad_inputs(stream):
  with pytest.raises(ValueError, match="mem_size must be a positive int"):
    rpc(mem_size=0)
  with pytest.raises(ValueError, match="batch_size"):
    rpc(batch_size=-1)
  with pytest.raises(ValueError, match="batch_size=30 is larger than "
                     "mem_size=20"):
    rpc(mem_size=20, batch_size=30)
  with pytest.raises(ValueError, match="num_classes >= 2"):
    dsimplex(1)
  with pytest.raises(ValueError, match="num_classes - 1 = 9 model outputs"):
    simplex_logits(jnp.zeros((2, 5)), 10)
  ctx = make_ctx(stream)
  with pytest.raises(ValueError, match="mem_size=8 gives 0 exemplars per "
                     "class for 10 classes"):
    rpc(mem_size=8).init(ctx, jax.random.PRNGKey(0), None)
  task_ctx = make_ctx(dataclasses.replace(stream, kind="task"))
  with pytest.raises(ValueError, match="class-incremental.*kind='task'"):
    rpc().init(task_ctx, jax.random.PRNGKey(0), None)
  # A class that comes back in a later experience.
  s = rpc(mem_size=20)
  e0 = stream.experiences[0]
  st = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  st = s.after_experience(ctx, st, e0)
  with pytest.raises(ValueError, match="rpc: experience 1 brings classes"):
    s.before_experience(ctx, st, dataclasses.replace(e0, index=1))


def test_rpc_runs_through_the_loop(full_stream):
  """Five experiences through ``experiment.run``: one compilation, replay
  only from the second experience, a balanced memory at the end, and the
  first experience remembered."""
  ctx = make_ctx(full_stream)
  s = rpc(mem_size=40, batch_size=B)
  ss = s.init(ctx, jax.random.PRNGKey(0), None)
  prepared = s.prepare_batch(ctx, ss, batch_of(full_stream.experiences[0]),
                             jax.random.PRNGKey(1))
  assert prepared["x"].shape[0] == 2 * B
  np.testing.assert_array_equal(prepared["mask"][B:], 0.0)  # empty memory

  result = experiment.run(config("rpc", rpc=dict(mem_size=40)),
                          scenario=full_stream)
  assert result.learner.chunk_fn._cache_size() == 1
  acc = result.accuracy
  assert np.all(np.isfinite(acc))
  mem = result.state.strategy.memory
  np.testing.assert_array_equal(buffers.counts(mem, 10), 4)
  np.testing.assert_array_equal(result.state.strategy.seen, True)
  # (Naive fine-tuning ends at 0 on the first experience here.)
  assert acc[-1, 0] > 0.5, acc
  # The run's accuracy is the simplex head's: its predictions on a test
  # split reproduce the recorded accuracy.
  e = full_stream.experiences[2]
  st = result.state
  pred = np.asarray(simplex_logits(
      ctx.logits(st.params, st.model_state, jnp.asarray(e.test_x),
                 jnp.asarray(e.test_task)), 10)).argmax(1)
  np.testing.assert_allclose(np.mean(pred == e.test_y), acc[-1, 2],
                             atol=1e-6)



def test_task_loss_is_the_mean_over_real_rows_only(stream):
  """Padding rows (mask 0: an empty memory's draws) add nothing to the
  loss, whatever their outputs and labels: the mean over the real rows."""
  ctx = make_ctx(stream)
  s = rpc(mem_size=40, batch_size=5)
  rng = np.random.default_rng(0)
  raw = rng.normal(size=(B, 10)) * 3
  y = rng.integers(0, 10, B)
  mask = (np.arange(B) < 6).astype(np.float32)
  h = raw[:, :9] @ mammoth_dsimplex(10)
  lse = np.log(np.exp(h - h.max(1, keepdims=True)).sum(1)) + h.max(1)
  want = np.mean((lse - h[np.arange(B), y])[:6])
  got = s.task_loss(ctx, None, jnp.asarray(raw, jnp.float32),
                    {"y": jnp.asarray(y), "mask": jnp.asarray(mask)})
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_balanced_add_counts_real_rows_and_drops_other_classes():
  """``seen`` grows by the real rows offered (not the padding), and an
  entry whose class is neither old nor new is dropped (docstring)."""
  k, c = 6, 4
  y0 = np.array([0, 0, 0, 1, 1, 1, 0, 0])
  mask = np.arange(8) < 6
  none = np.zeros(c, bool)
  mem = balanced_add(buffers.init(k, (1,)), jax.random.PRNGKey(0),
                     np.arange(8, dtype=np.float32)[:, None], y0, y0 * 0, 0,
                     mask, none, np.isin(np.arange(c), [0, 1]))
  assert int(mem.seen) == 6
  np.testing.assert_array_equal(buffers.counts(mem, c), [3, 3, 0, 0])
  # Class 1 is neither old nor new now: its entries go; class 0 keeps
  # 6 // 2 = 3, class 2 gets the other 3.
  y1 = np.full(5, 2)
  mem = balanced_add(mem, jax.random.PRNGKey(1),
                     10 + np.arange(5, dtype=np.float32)[:, None], y1,
                     y1 * 0, 1, np.ones(5, bool), np.arange(c) == 0,
                     np.arange(c) == 2)
  assert int(mem.seen) == 11
  np.testing.assert_array_equal(buffers.counts(mem, c), [3, 0, 3, 0])


def test_end_of_experience_reads_only_the_real_rows(full_stream):
  # An experience shorter than the padded size: the padding rows past
  # num_train are not offered (seen counts the real ones).
  ctx = make_ctx(full_stream)
  e = min(full_stream.experiences, key=lambda e: e.num_train)
  assert e.num_train < ctx.info.train_size
  s = rpc(mem_size=40, batch_size=5)
  st = s.before_experience(ctx, train.init_state(ctx, s, 0), e)
  st = s.after_experience(ctx, st, e)
  mem = st.strategy.memory
  assert int(mem.seen) == e.num_train
  np.testing.assert_array_equal(
      np.asarray(buffers.counts(mem, 10))[sorted(set(e.train_y))], 20)
