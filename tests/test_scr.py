"""Mechanism tests of SCR (supervised contrastive replay) and jaxcl.augment
(on scikit-learn digits and hand-made cases)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import augment, buffers, sweep, train
from jaxcl.state import StreamInfo
from jaxcl.strategies import from_spec
from jaxcl.strategies import scr as scr_mod
from jaxcl.strategies.scr import scr

from test_replay import B, batch_of
from test_replay import config as replay_config
from test_replay import make_ctx as replay_make_ctx

# One compiled program per shape, not op-by-op dispatch (test time).
supcon_loss = jax.jit(scr_mod.supcon_loss, static_argnums=3)

# test_replay's helpers on this file's smaller MLP (one hidden layer of 16).
make_ctx = functools.partial(replay_make_ctx, widths=(16,))


def config(spec="scr", **kwargs):
  return replay_config(spec, widths=(16,), **kwargs)


# ---------------------------------------------------------------------------
# The loss.


def test_supcon_loss_by_hand_and_as_the_reference_computes_it():
  # Three embeddings, labels 0, 0, 1: each of the first two has one
  # positive (similarity 1) and one negative (similarity 0), the third no
  # positive, so L = -log(e^{1/τ} / (e^{1/τ} + e^0)) = log(1 + e^{-1/τ}).
  z = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  y = jnp.asarray([0, 0, 1])
  ok = jnp.ones((3,), bool)
  for tau in (1.0, 0.5):
    assert float(supcon_loss(z, y, ok, tau)) == pytest.approx(
        np.log1p(np.exp(-1.0 / tau)), rel=1e-6)

  # The reference (utils/loss.py, SupConLoss, contrast_mode 'all'):
  # features (n, 2 views, d), anchors are both views, the self-contrast
  # masked out, the mean over positives, then over anchors. Transcribed
  # to NumPy; SCR lays the views out as [rows; augmented rows].
  rng = np.random.default_rng(0)
  n, d, tau = 5, 4, 0.07
  f = rng.normal(size=(n, 2, d))
  f /= np.linalg.norm(f, axis=-1, keepdims=True)
  lab = np.array([0, 1, 0, 2, 1])
  contrast = np.concatenate([f[:, 0], f[:, 1]])  # torch.cat(unbind(dim=1))
  logits = contrast @ contrast.T / tau
  logits -= logits.max(1, keepdims=True)
  mask = np.tile(lab[:, None] == lab[None, :], (2, 2)).astype(float)
  logits_mask = 1.0 - np.eye(2 * n)
  mask *= logits_mask
  log_prob = logits - np.log((np.exp(logits) * logits_mask).sum(1,
                                                                 keepdims=True))
  want = -((mask * log_prob).sum(1) / mask.sum(1)).mean()
  got = supcon_loss(jnp.asarray(contrast, jnp.float32),
                    jnp.asarray(np.tile(lab, 2)), jnp.ones((2 * n,), bool), tau)
  assert float(got) == pytest.approx(want, rel=1e-5)

  # Invalid rows (empty memory slots) take no part: the loss equals the
  # loss of the valid rows alone, whatever the invalid rows hold.
  ok = jnp.asarray(np.tile([True, True, False, True, True], 2))
  keep = np.asarray(ok)
  alone = supcon_loss(jnp.asarray(contrast[keep], jnp.float32),
                      jnp.asarray(np.tile(lab, 2)[keep]),
                      jnp.ones((int(keep.sum()),), bool), tau)
  junk = contrast.copy()
  junk[~keep] = contrast[0]  # a copy of a valid row: would be a positive
  got = supcon_loss(jnp.asarray(junk, jnp.float32),
                    jnp.asarray(np.tile(lab, 2)), ok, tau)
  assert float(got) == pytest.approx(float(alone), rel=1e-6)


# ---------------------------------------------------------------------------
# Nearest class mean.


class _Identity(nn.Module):
  """Features = the input; logits from an (unused) dense head."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, task=None, train=False, features=False):
    h = x.reshape(x.shape[0], -1)
    return h if features else nn.Dense(self.num_classes)(h)


def _ncm_setup():
  """``(ctx, strategy, state)``: SCR over 2-d inputs read as features
  (``_Identity``), 3 classes, a memory of 4."""
  info = StreamInfo(num_classes=3, num_tasks=1, num_experiences=1,
                    input_shape=(2,), kind="class",
                    task_classes=((True, True, True),), batch_size=2,
                    train_size=4)
  ctx = train.make_context(_Identity(), train.make_optimizer("sgd", 0.1), info)
  s = scr(mem_size=4, batch_size=2, augment="none")
  state = train.init_state(ctx, s, 0)
  return ctx, s, state


def test_ncm_predicts_the_nearest_normalised_class_mean():
  ctx, s, state = _ncm_setup()
  # Class 0: (10, 0) and (0, 1); class 1: (1, -0.3); class 2: no exemplar.
  mem = buffers.init(4, (2,))
  mem = buffers.put_rows(mem, jnp.arange(3),
                         jnp.asarray([[10.0, 0.0], [0.0, 1.0], [1.0, -0.3]]),
                         jnp.asarray([0, 0, 1]), jnp.zeros((3,), jnp.int32),
                         jnp.zeros((3,), jnp.int32))
  state = state.replace(strategy=state.strategy._replace(memory=mem))
  # Jitted: one compile is cheaper than dispatching each operation.
  state = jax.jit(lambda st: s.after_experience(ctx, st, None))(state)
  ss = state.strategy
  # By hand: normalise each exemplar, average, renormalise.
  r = np.sqrt(0.5)
  np.testing.assert_allclose(ss.means[0], [r, r], atol=1e-6)
  np.testing.assert_allclose(ss.means[1], np.array([1.0, -0.3]) /
                             np.hypot(1.0, 0.3), atol=1e-6)
  np.testing.assert_array_equal(ss.has_mean, [True, True, False])
  # (1, 0): cosines 0.707 (class 0) and 0.958 (class 1), so class 1 --
  # with unnormalised exemplars class 0's mean would point at (0.995,
  # 0.0995) and win. (0, 1): class 0. The score is -|φ - μ|² = 2 cos - 2.
  x = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
  logits = jax.jit(lambda ss, p, ms, x: s.predict(
      ctx, ss, p, ms, x, jnp.zeros((2,), jnp.int32)))(
          ss, state.params, state.model_state, x)
  c1 = 1.0 / np.hypot(1.0, 0.3)
  np.testing.assert_allclose(logits[:, :2], [[2 * r - 2, 2 * c1 - 2],
                                             [2 * r - 2, -0.6 * c1 - 2]],
                             atol=1e-5)
  assert np.all(np.asarray(logits[:, 2]) <= -1e8)  # no exemplar, no vote
  np.testing.assert_array_equal(jnp.argmax(logits, -1), [1, 0])


# ---------------------------------------------------------------------------
# Augmentations.


def test_augmentations_keep_shape_and_range_and_differ_per_key():
  rng = np.random.default_rng(0)
  gray = jnp.asarray(rng.uniform(size=(6, 8, 8, 1)), jnp.float32)
  rgb = jnp.asarray(rng.uniform(size=(6, 8, 8, 3)), jnp.float32)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  for x, ops in ((gray, ("crop", "flip")), (rgb, augment.SCR_OPS)):
    f = jax.jit(augment.pipeline(ops, x.shape[1:]))
    a, b = f(k1, x), f(k2, x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_array_equal(a, f(k1, x))  # a key, a batch
    assert not np.allclose(a, b)
    # One key, yet each example its own draw: identical inputs differ.
    same = jnp.broadcast_to(x[:1], x.shape)
    out = np.asarray(f(k1, same)).reshape(len(x), -1)
    assert len({row.tobytes() for row in out}) == len(x)


def test_augmentations_at_zero_strength_are_the_identity():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(4, 8, 6, 3)), jnp.float32)

  def run(f, *args, **kwargs):  # jitted: one program, not op by op
    return jax.jit(lambda k, a: f(k, a, *args, **kwargs))(
        jax.random.PRNGKey(0), x)

  # The whole image: all its area at its own aspect ratio (width / height).
  np.testing.assert_allclose(
      run(augment.random_resized_crop, (1.0, 1.0), (0.75, 0.75)), x,
      atol=1e-6)
  np.testing.assert_array_equal(run(augment.horizontal_flip, 0.0), x)
  np.testing.assert_array_equal(run(augment.horizontal_flip, 1.0),
                                x[:, :, ::-1])
  np.testing.assert_allclose(run(augment.color_jitter, 0.0, 0.0, 0.0, 0.0,
                                 p=1.0), x, atol=1e-6)
  np.testing.assert_array_equal(run(augment.color_jitter, p=0.0), x)
  np.testing.assert_array_equal(run(augment.random_grayscale, 0.0), x)
  g = run(augment.random_grayscale, 1.0)
  np.testing.assert_allclose(g[..., 0], x @ jnp.asarray([0.299, 0.587,
                                                         0.114]), atol=1e-6)
  np.testing.assert_array_equal(g[..., 0], g[..., 2])
  np.testing.assert_array_equal(run(augment.pipeline((), x.shape[1:])), x)
  # A hue shift rotates the chroma only: luminance kept, colours changed
  # (mid-range pixels, so nothing is clipped).
  mid = 0.4 + 0.2 * x
  h = jax.jit(lambda k, a: augment.color_jitter(k, a, 0.0, 0.0, 0.0, 0.1,
                                                p=1.0))(jax.random.PRNGKey(4),
                                                         mid)
  luma = jnp.asarray([0.299, 0.587, 0.114])
  np.testing.assert_allclose(h @ luma, mid @ luma, atol=1e-5)
  assert float(jnp.abs(h - mid).max()) > 1e-3


def test_resized_crop_magnifies_by_the_box_size():
  # A horizontal ramp (pixel value = column) cropped to a w-wide box and
  # shown 8 wide climbs w / 8 a pixel. A quarter of the area at ratio 1 is
  # a 4x4 box: 0.5 a pixel.
  ramp = jnp.broadcast_to(jnp.arange(8.0)[None, None, :, None], (6, 8, 8, 1))
  crop = jax.jit(augment.random_resized_crop, static_argnums=(2, 3))
  slope = lambda out: np.diff(np.asarray(out)[:, :, 1:7, 0], axis=2)
  np.testing.assert_allclose(
      slope(crop(jax.random.PRNGKey(3), ramp, (0.25, 0.25), (1.0, 1.0))),
      0.5, atol=1e-5)
  # Areas drawn per example from (0.2, 1): each row its own box width
  # sqrt(s) * 8, so its own slope, in [sqrt(0.2), 1].
  d = slope(crop(jax.random.PRNGKey(3), ramp, (0.2, 1.0), (1.0, 1.0)))
  per_row = d[:, 0, 0]
  np.testing.assert_allclose(d, per_row[:, None, None] + 0 * d, atol=1e-5)
  assert np.all(per_row >= np.sqrt(0.2) - 1e-5) and np.all(per_row <= 1.0)
  assert np.ptp(per_row) > 0.05, per_row


# ---------------------------------------------------------------------------
# Training: the head, the joint step, the memory.


def test_backbone_and_head_take_one_joint_step_on_the_supcon_loss(stream):
  ctx = make_ctx(stream, lr=0.1)
  s = scr(mem_size=30, batch_size=10)
  e0 = stream.experiences[0]
  state = train.init_state(ctx, s, 0)
  # The head steps at the run's learning rate, also when a sweep gives
  # each run its own (an injected hyperparameter of the model's state).
  hp = dict(state.opt_state.hyperparams, learning_rate=jnp.float32(0.05))
  swept = state.replace(opt_state=state.opt_state._replace(hyperparams=hp))
  head_hp = s.before_experience(ctx, swept, e0).strategy.head_opt_state
  assert float(head_hp.hyperparams["learning_rate"]) == pytest.approx(0.05)
  state = s.before_experience(ctx, state, e0)
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  for i in range(4):  # the memory fills
    state = step(state, batch_of(e0, start=B * i))
  assert int(buffers.size(state.strategy.memory)) == 30
  batch = batch_of(e0, start=60)
  # The step's own prepared batch (train_step's key for prepare_batch).
  k_prep = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)[0]
  prepared = jax.jit(lambda ss, b, k: s.prepare_batch(ctx, ss, b, k))(
      state.strategy, batch, k_prep)
  assert prepared["x"].shape[0] == prepared["scr_views"].shape[0] == 2 * B
  assert not np.allclose(prepared["x"], prepared["scr_views"])

  def joint(params, head):  # one model: backbone + head, as the reference
    ss = state.strategy._replace(head=head)
    return s.loss(ctx, ss, params, prepared, None)

  g_p, g_h = jax.jit(jax.grad(joint, argnums=(0, 1)))(state.params,
                                                      state.strategy.head)
  # The loss is SupCon over the 2N views [rows; their augmented copies],
  # built here by hand (the loss above is the strategy's own).
  xv = jnp.concatenate([prepared["x"], prepared["scr_views"]])
  tile = lambda a: jnp.concatenate([a, a])
  f, _ = ctx.apply(state.params, state.strategy.model_state, xv,
                   tile(prepared["task"]), train=True, features=True)
  z = scr_mod.ProjectionHead("mlp", 128).apply(
      {"params": state.strategy.head}, f)
  want = supcon_loss(z, tile(prepared["y"]), tile(prepared["mask"] > 0), 0.07)
  np.testing.assert_allclose(float(joint(state.params, state.strategy.head)),
                             float(want), rtol=1e-5)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_h)) > 1e-3
  new = step(state, batch)
  sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
  for got, want in ((new.params, sgd(state.params, g_p)),
                    (new.strategy.head, sgd(state.strategy.head, g_h))):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, atol=2e-6)


def test_scr_in_a_two_seed_sweep_and_chained():
  c = config(scr=dict(mem_size=60, batch_size=20))
  c.dataset.name = "digits"
  c.scenario.n_experiences = 2
  r = sweep.sweep(c, seeds=[0, 1])
  assert r.accuracy.shape == (2, 2, 2)
  # One program for both runs and both experiences: nothing recompiled.
  assert r.result.learner.chunk_fn._cache_size() == 1
  assert not np.allclose(r.accuracy[0], r.accuracy[1])  # runs differ
  # Four classes by nearest mean: both experiences well above chance
  # (0.25) after the second, the first kept by the memory.
  assert np.all(r.accuracy[:, 1] > 0.6), r.accuracy
  # A penalty composes (its loss adds to SCR's); a second predictor or
  # task loss does not.
  strat, _ = from_spec("scr+ewc", {"scr": dict(mem_size=40, batch_size=10)})
  assert strat.name == "scr+ewc"
  with pytest.raises(ValueError, match="more than one strategy defines "
                     "predict: \\['scr', 'icarl'\\]"):
    from_spec("scr+icarl")


def test_scr_bad_inputs(stream):
  for kw, match in (
      ({"mem_size": 0}, "scr: mem_size must be a positive int"),
      ({"batch_size": -1}, "scr: batch_size must be an int >= 0"),
      ({"mem_size": 50}, "scr: batch_size=100 is larger than the memory "
                         "capacity mem_size=50"),
      ({"temperature": 0.0}, "scr: temperature must be a finite number > 0"),
      ({"temperature": float("nan")}, "scr: temperature must be"),
      ({"head": "deep"}, "scr: unknown head 'deep'; valid: \\['mlp', "
                         "'linear', 'none'\\]"),
      ({"head_dim": 0}, "scr: head_dim must be an int >= 1"),
      ({"augment": "cifar"}, "scr: augment must be 'auto', 'none' or a "
                             "sequence of names"),
      ({"augment": ("crop", "blur")},
       "scr: augment: unknown augmentation 'blur'; valid: \\['pad_crop', "
       "'crop', 'flip', 'autoaugment', 'jitter', 'gray'\\]"),
      ({"crop_scale": (0.0, 1.0)}, "scr: crop_scale must be \\(lo, hi\\)"),
      ({"crop_scale": (0.8, 0.5)}, "scr: crop_scale must be")):
    with pytest.raises(ValueError, match=match):
      scr(**kw)
  ctx = make_ctx(stream)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="scr: batch_size=10 is larger than "
                     "the memory capacity mem_size=5"):
    scr(mem_size=5, batch_size=0).init(ctx, key, None)
  # Digits are single-channel: colour jitter does not apply.
  params = train.init_state(ctx, scr(augment="none"), 0).params
  with pytest.raises(ValueError, match="scr: augment: 'jitter' needs RGB "
                     "images \\(H, W, 3\\); the inputs are shaped "
                     "\\(8, 8, 1\\)"):
    scr(augment=("crop", "jitter")).init(ctx, key, params)


def test_projection_heads_are_the_named_layers_with_unit_outputs():
  """``linear``: one affine map; ``mlp``: affine, ReLU, affine; ``none``:
  the features; each output L2-normalised (the z of the SupCon loss)."""
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  key = jax.random.PRNGKey(0)
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  lin = scr_mod.ProjectionHead("linear", 4)
  p = lin.init(key, h)["params"]
  (w, b), = [(v["kernel"], v["bias"]) for v in p.values()]
  assert w.shape == (6, 4)
  np.testing.assert_allclose(lin.apply({"params": p}, h),
                             unit(np.asarray(h) @ w + b), atol=1e-6)
  mlp = scr_mod.ProjectionHead("mlp", 4)
  p = mlp.init(key, h)["params"]
  assert [v["kernel"].shape for v in p.values()] == [(6, 6), (6, 4)]
  (w1, b1), (w2, b2) = [(v["kernel"], v["bias"]) for v in p.values()]
  want = np.maximum(np.asarray(h) @ w1 + b1, 0.0) @ w2 + b2
  np.testing.assert_allclose(mlp.apply({"params": p}, h), unit(want),
                             atol=1e-6)
  none = scr_mod.ProjectionHead("none", 4)
  assert not none.init(key, h).get("params", {})
  np.testing.assert_allclose(none.apply({}, h), unit(np.asarray(h)),
                             atol=1e-6)


def test_padding_rows_of_a_short_memory_take_no_part_in_the_loss(stream):
  # An empty memory: the prepared batch has B padding rows (mask 0). The
  # loss is that of the B real rows alone, whatever the padding holds.
  ctx = make_ctx(stream)
  s = scr(mem_size=30, batch_size=10, augment="none")
  state = train.init_state(ctx, s, 0)
  ss = state.strategy
  prepared = s.prepare_batch(ctx, ss, batch_of(stream.experiences[0]),
                             jax.random.PRNGKey(0))
  np.testing.assert_array_equal(prepared["mask"][B:], 0.0)
  loss = jax.jit(lambda b: s.loss(ctx, ss, state.params, b, None))
  full = float(loss(prepared))
  real = float(loss({k: v[:B] for k, v in prepared.items()}))
  assert full == pytest.approx(real, rel=1e-6)
  junk = dict(prepared)
  junk["x"] = prepared["x"].at[B:].set(prepared["x"][:B])
  junk["scr_views"] = junk["x"]
  junk["y"] = prepared["y"].at[B:].set(prepared["y"][:B])
  assert float(loss(junk)) == pytest.approx(real, rel=1e-6)


def test_class_means_ignore_dropped_slots():
  """A slot whose entry was dropped (valid False) keeps its old contents;
  they must not count towards any class's mean or make a class seen."""
  ctx, s, state = _ncm_setup()
  mem = buffers.put_rows(buffers.init(4, (2,)), jnp.arange(4),
                         jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0],
                                      [1.0, 1.0]]),
                         jnp.asarray([0, 0, 2, 1]), jnp.zeros((4,), jnp.int32),
                         jnp.zeros((4,), jnp.int32))
  mem = mem._replace(valid=jnp.asarray([True, False, False, True]))
  state = state.replace(strategy=state.strategy._replace(memory=mem))
  ss = jax.jit(lambda st: s.after_experience(ctx, st, None))(state).strategy
  np.testing.assert_array_equal(ss.has_mean, [True, True, False])
  np.testing.assert_allclose(ss.means[0], [1.0, 0.0], atol=1e-6)
  r = np.sqrt(0.5)
  np.testing.assert_allclose(ss.means[1], [r, r], atol=1e-6)


def test_head_optimiser_restarts_and_experience_is_recorded(stream):
  """As each experience starts the head's optimiser state is a fresh one
  (momentum zeroed, as the model's) and ``experience`` is its index (the
  reservoir tags the stored rows with it)."""
  info = train.stream_info(stream, B)
  from jaxcl import models
  ctx = train.make_context(models.build("mlp", stream.num_classes,
                                        widths=(16,)),
                           train.make_optimizer("momentum", 0.1), info)
  s = scr(mem_size=30, batch_size=10)
  state = train.init_state(ctx, s, 0)
  fresh = jax.tree.leaves(state.strategy.head_opt_state)
  dirty = jax.tree.map(lambda a: a + jnp.ones_like(a),
                       state.strategy.head_opt_state)
  state = state.replace(strategy=state.strategy._replace(
      head_opt_state=dirty))
  e1 = stream.experiences[1]
  new = s.before_experience(ctx, state, e1)
  assert int(new.strategy.experience) == 1
  for a, b in zip(jax.tree.leaves(new.strategy.head_opt_state), fresh):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  new = step(new, batch_of(e1))
  mem = new.strategy.memory
  np.testing.assert_array_equal(np.asarray(mem.experience)[
      np.asarray(mem.valid)], 1)
