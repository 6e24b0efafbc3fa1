"""WA (Zhao et al. 2020): weight aligning against a NumPy reference, the
training loss by hand, weight clipping, what an experience's end does to
the model and the teacher, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax, np_softmax
from jaxcl import buffers, models, train
from jaxcl.strategies.wa import align_weights, clip_head, wa
from test_replay import B, after_first, batch_of, make_ctx


def _align_np(kernel, old, new, norm, clamp):
  """The paper's eq. (weight aligning), in NumPy."""
  norms = np.linalg.norm(kernel, ord=norm, axis=0)
  gamma = norms[old].mean() / norms[new].mean()
  if clamp:
    gamma = min(gamma, 1.0)
  out = kernel.copy()
  out[:, new] *= gamma
  return out, gamma


_align = jax.jit(align_weights, static_argnums=(3, 4))


@pytest.mark.parametrize("norm", [1, 2])
def test_align_weights_matches_numpy(norm):
  rng = np.random.default_rng(norm)
  kernel = rng.normal(size=(6, 8)).astype(np.float32)
  old = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
  new = np.array([0, 0, 0, 1, 1, 0, 0, 0], bool)
  # New classes' vectors 3x longer than the old ones': γ well below 1.
  kernel[:, new] *= 3.0
  for clamp in (True, False):
    got, gamma = _align(jnp.asarray(kernel), jnp.asarray(old),
                        jnp.asarray(new), norm, clamp)
    want, want_gamma = _align_np(kernel, old, new, norm, clamp)
    assert want_gamma < 0.5
    np.testing.assert_allclose(float(gamma), want_gamma, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # Old and unseen classes' columns are untouched, bit for bit.
    np.testing.assert_array_equal(np.asarray(got)[:, ~new], kernel[:, ~new])
    # The new classes' mean norm now equals the old classes'.
    norms = np.linalg.norm(np.asarray(got), ord=norm, axis=0)
    np.testing.assert_allclose(norms[new].mean(), norms[old].mean(),
                               rtol=1e-5)
  # Shorter new vectors: γ > 1 scales them up unless clamped.
  short = kernel.copy()
  short[:, new] /= 9.0
  got, gamma = _align(jnp.asarray(short), jnp.asarray(old),
                      jnp.asarray(new), norm, True)
  assert float(gamma) == 1.0
  np.testing.assert_array_equal(np.asarray(got), short)
  got, gamma = _align(jnp.asarray(short), jnp.asarray(old),
                      jnp.asarray(new), norm, False)
  want, want_gamma = _align_np(short, old, new, norm, False)
  assert want_gamma > 1.0
  np.testing.assert_allclose(float(gamma), want_gamma, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  # Nothing to align against: no old class, or new vectors all zero.
  for o, k in ((np.zeros(8, bool), kernel),
               (old, np.where(new[None, :], 0.0, kernel).astype(np.float32))):
    got, gamma = _align(jnp.asarray(k), jnp.asarray(o), jnp.asarray(new),
                        norm, False)
    assert float(gamma) == 1.0
    np.testing.assert_array_equal(np.asarray(got), k)


def test_clip_head_clips_only_the_output_weights():
  rng = np.random.default_rng(0)
  params = {"backbone": {"Dense_0": {"kernel": jnp.asarray(
      rng.normal(size=(4, 3)))}},
            "head": {"kernel": jnp.asarray(rng.normal(size=(3, 5))),
                     "bias": jnp.asarray(rng.normal(size=(5,)))}}
  out = clip_head(params)
  np.testing.assert_array_equal(np.asarray(out["head"]["kernel"]),
                                np.maximum(params["head"]["kernel"], 0))
  for path in (("head", "bias"), ("backbone", "Dense_0", "kernel")):
    a, b = out, params
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) < 0).any()   # negatives elsewhere are kept


MEM = 400


@pytest.fixture(scope="module")
def ctx(stream):
  return make_ctx(stream)


@pytest.fixture(scope="module")
def first(ctx, stream):
  """``(state, step)``: 20 steps of experience 0 (clipping on, the
  default), then the start of experience 1."""
  return after_first(ctx, wa(mem_size=MEM), stream, 20)


def test_training_clips_the_head_and_the_first_experience_is_not_aligned(
    ctx, first, stream):
  state, step = first
  ss = state.strategy
  kernel = np.asarray(state.params["head"]["kernel"])
  assert kernel.min() >= 0.0 and (kernel > 0).any()
  # The backbone keeps negative weights: only the head is clipped.
  assert (np.asarray(state.params["backbone"]["Dense_0"]["kernel"]) < 0).any()
  np.testing.assert_array_equal(np.asarray(ss.gamma), 1.0)
  # Without clipping the head's weights go negative.
  s = wa(mem_size=MEM, clip=False)
  plain = train.init_state(ctx, s, 0)
  plain = s.before_experience(ctx, plain, stream.experiences[0])
  plain_step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])
  plain = plain_step(plain, batch_of(stream.experiences[0]))
  assert (np.asarray(plain.params["head"]["kernel"]) < 0).any()


def test_task_loss_is_weighted_ce_plus_distillation(ctx, first, stream):
  """``(1 - λ) CE + λ KD`` with ``λ = n / (n + m)`` = 2 / 4 at experience
  1, or the given ``lam``: the cross-entropy over the four classes seen,
  the distillation over the two old ones at ``T``."""
  state, _ = first
  ss = state.strategy
  b = wa(mem_size=MEM).prepare_batch(ctx, ss, batch_of(stream.experiences[1]),
                                     jax.random.PRNGKey(1))
  assert b["y"].shape == (2 * B,)   # exemplars appended
  assert np.asarray(b["mask"])[B:].all()

  @jax.jit
  def parts(ss, params, b):
    logits = ctx.logits(params, {}, b["x"], b["task"], train=True)
    teacher = ctx.logits(ss.teacher, {}, b["x"], b["task"])
    return logits, teacher, tuple(
        s.task_loss(ctx, ss, logits, b) for s in (
            wa(mem_size=MEM), wa(mem_size=MEM, lam=0.3, temperature=3.0)))

  logits, teacher, got = jax.tree.map(np.asarray, parts(ss, state.params, b))
  y, w = np.asarray(b["y"]), np.asarray(b["mask"])
  ce = -np.sum(w * np_log_softmax(logits[:, :4])[np.arange(len(y)), y]) / (
      w.sum())

  def kd(temp):
    p = np_softmax(teacher[:, :2] / temp)
    return np.sum(w * -(p * np_log_softmax(logits[:, :2] / temp)).sum(-1)
                  ) / w.sum()

  assert kd(2.0) > 0
  np.testing.assert_allclose(got[0], 0.5 * ce + 0.5 * kd(2.0), rtol=1e-5)
  np.testing.assert_allclose(got[1], 0.7 * ce + 0.3 * kd(3.0), rtol=1e-5)


@pytest.fixture(scope="module")
def trained_second(first, stream):
  """``first`` after 10 steps of experience 1."""
  state, step = first
  for i in range(10):
    state = step(state, batch_of(stream.experiences[1], start=B * i))
  return state


@pytest.mark.parametrize("norm,clamp", [(2, False), (1, False), (2, True)])
def test_experience_end_aligns_new_classes_then_herds_and_teaches(
    ctx, trained_second, stream, norm, clamp):
  state = trained_second
  s = wa(mem_size=MEM, norm=norm, clamp_gamma=clamp)
  kernel = np.asarray(state.params["head"]["kernel"])
  old = np.zeros(10, bool)
  old[:2] = True
  new = np.zeros(10, bool)
  new[2:4] = True
  want, gamma = _align_np(kernel, old, new, norm, clamp)
  after = s.after_experience(ctx, state, stream.experiences[1])
  got = np.asarray(after.params["head"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  if not clamp:
    assert abs(gamma - 1.0) > 1e-3   # the alignment moved the new columns
  np.testing.assert_allclose(float(after.strategy.gamma[1]), gamma,
                             rtol=1e-6)
  assert float(after.strategy.gamma[0]) == 1.0
  # Only the head's kernel changed.
  for k in ("backbone",):
    for a, b in zip(jax.tree.leaves(after.params[k]),
                    jax.tree.leaves(state.params[k])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(after.params["head"]["bias"]),
                                np.asarray(state.params["head"]["bias"]))
  # The aligned model is the next teacher; herding keeps K / 4 = 100 of
  # each class seen.
  for a, b in zip(jax.tree.leaves(after.strategy.teacher),
                  jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ss = after.strategy
  np.testing.assert_array_equal(np.asarray(ss.seen)[:5],
                                [True] * 4 + [False])
  counts = np.asarray(buffers.counts(ss.memory, 10))
  np.testing.assert_array_equal(counts, [100] * 4 + [0] * 6)


def test_without_aligning_the_experience_end_keeps_the_model(
    ctx, trained_second, stream):
  state = trained_second
  after = wa(mem_size=MEM, align=False).after_experience(
      ctx, state, stream.experiences[1])
  for a, b in zip(jax.tree.leaves(after.params),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(after.strategy.gamma), 1.0)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mem_size=0), "mem_size"),
    (dict(mem_size=10, batch_size=11), "batch_size=11"),
    (dict(temperature=0.0), "temperature"),
    (dict(lam=1.5), r"wa: lam must be None .* got 1.5$"),
    (dict(lam=True), r"wa: lam must be None .* got True$"),
    (dict(norm=3), r"wa: norm must be 1 or 2 .* got 3$"),
    (dict(norm=True), r"wa: norm must be 1 or 2 .* got True$"),
    (dict(align="yes"), r"wa: align must be True or False, got 'yes'$"),
    (dict(clip=1), r"wa: clip must be True or False, got 1$"),
    (dict(per_class=-1), r"wa: per_class must be an int >= 0"),
])
def test_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    wa(**kwargs)


def test_bad_streams_models_and_classes(ctx, first, stream):
  task = dataclasses.replace(stream, kind="task")
  with pytest.raises(ValueError, match="class-incremental"):
    train.init_state(make_ctx(task), wa(mem_size=20), 0)
  with pytest.raises(ValueError, match="mem_size=5 gives 0 exemplars"):
    train.init_state(ctx, wa(mem_size=5), 0)
  info = train.stream_info(stream, B)
  opt = train.make_optimizer("sgd", 0.1)
  cosine = train.make_context(
      models.build("mlp", 10, widths=(8,), head="cosine"), opt, info)
  with pytest.raises(ValueError, match=r"wa needs a linear "
                     r"'head' layer \(a kernel, with or without a bias; .*"
                     r"\); the model's head has \['kernel', 'sigma'\]$"):
    train.init_state(cosine, wa(mem_size=20), 0)
  heads = train.make_context(
      models.build("mlp", 10, num_heads=2, widths=(8,)), opt, info)
  with pytest.raises(ValueError, match=r"wa needs a single head over the 10 "
                     r"classes; the head's kernel has shape \(8, 20\)"):
    train.init_state(heads, wa(mem_size=20), 0)
  # The same check (jaxcl.strategy.require_single_head) guards CWR*'s and
  # LUCIR's heads.
  from jaxcl.strategies.cwr_star import cwr_star
  from jaxcl.strategies.lucir import lucir
  with pytest.raises(ValueError, match=r"cwr_star needs a linear "
                     r"'head' layer with a kernel and a bias .*; the "
                     r"model's head has \['kernel', 'sigma'\]$"):
    train.init_state(cosine, cwr_star(), 0)
  with pytest.raises(ValueError, match=r"cwr_star needs a single head over "
                     r"the 10 classes; the head's kernel has shape \(8, 20\)"):
    train.init_state(heads, cwr_star(), 0)
  with pytest.raises(ValueError, match=r"lucir needs the cosine-normalised "
                     r"head .*; the model's head has \['bias', 'kernel'\]$"):
    train.init_state(ctx, lucir(mem_size=20), 0)
  state, _ = first
  with pytest.raises(ValueError, match="again"):
    wa(mem_size=MEM).before_experience(ctx, state, stream.experiences[0])
