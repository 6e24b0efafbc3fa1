"""LwM (Dhar et al. 2019): Grad-CAM maps, the attention distillation, its
(second-order) gradient, the class the maps are taken for, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import models, train
from jaxcl.strategies.latent_replay import split_model
from jaxcl.strategies.lwf import distillation, lwf
from jaxcl.strategies.lwm import attention_distillation, gradcam, lwm
from test_replay import after_first, batch_of

B = 12
LAYER = "backbone/Conv_1"


def cnn_ctx(sc, lr=0.1):
  info = train.stream_info(sc, B)
  model = models.build("cnn", sc.num_classes, channels=(4, 6), hidden=16)
  return train.make_context(model, train.make_optimizer("sgd", lr), info)


# Compile time dominates these tests, so the context, the first
# experience's training and the references are built once and the
# references run as one jitted program each (not op by op).
@pytest.fixture(scope="module")
def ctx(stream):
  return cnn_ctx(stream)


@pytest.fixture(scope="module")
def first(ctx, stream):
  """The state after 15 steps of experience 0, at the start of
  experience 1. On experience 0 there is no old class, so the loss is
  the cross-entropy whatever β, γ and T (L_D of an empty group is 0 and
  L_AD's cond takes the zero branch): the loss tests share this state,
  trained with γ = 0 (the cheapest step to compile)."""
  state, _ = after_first(ctx, lwm(layer=LAYER, gamma=0.0), stream, 15, n=B)
  return state


def test_gradcam_is_relu_of_gradient_weighted_maps(ctx, stream):
  params, ms = train.init_variables(ctx, jax.random.PRNGKey(0))
  b = batch_of(stream.experiences[0], n=B)
  cls = jnp.arange(B) % 10

  # By another path: the layer's maps from the split model's lower part,
  # and the gradient of the upper part's class score with respect to them.
  sp = split_model(ctx, LAYER)

  @jax.jit
  def both(params, ms, x, task, cls):
    q = gradcam(ctx, LAYER, params, ms, x, task, cls)
    a = sp.lower(ctx, params, ms, x, task)
    g = jax.grad(lambda z: jnp.sum(jnp.take_along_axis(
        sp.upper(ctx, params, ms, z, task)[0], cls[:, None], 1)))(a)
    return q, a, g

  q, a, g = map(np.asarray, both(params, ms, b["x"], b["task"], cls))
  want = np.maximum((a * g.mean(axis=(1, 2))[:, None, None, :]).sum(-1), 0)
  assert q.shape == a.shape[:3]
  np.testing.assert_allclose(q, want, rtol=1e-4, atol=1e-6)
  assert (q > 0).any() and (q == 0).any()


def test_attention_distillation_by_hand():
  rng = np.random.default_rng(0)
  q, q_old = np.abs(rng.normal(size=(2, 5, 3, 3)))
  q_old[4] = 0.0   # a map of zeros: stays zero
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  unit = lambda m: m.reshape(5, -1) / np.maximum(
      np.linalg.norm(m.reshape(5, -1), axis=1, keepdims=True), 1e-12)
  per = np.abs(unit(q_old) - unit(q)).sum(1)
  want = (per * mask).sum() / mask.sum()
  ad = jax.jit(attention_distillation)   # one program for both calls
  got = float(ad(jnp.asarray(q), jnp.asarray(q_old), jnp.asarray(mask)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Only the maps' directions count.
  scaled = float(ad(jnp.asarray(3 * q), jnp.asarray(q_old * 0.1 + 0 * q),
                    jnp.asarray(mask)))
  np.testing.assert_allclose(scaled, want, rtol=1e-5)
  g = jax.jit(jax.grad(lambda z: attention_distillation(
      z, jnp.asarray(q_old), jnp.asarray(mask))))(
      jnp.zeros_like(jnp.asarray(q)))
  assert np.isfinite(np.asarray(g)).all()


def test_lwm_loss_is_lwf_plus_attention_on_the_teachers_top_old_class(
    ctx, first, stream):
  beta, gamma, temp = 0.6, 2.5, 3.0
  s = lwm(layer=LAYER, beta=beta, gamma=gamma, temperature=temp)
  state = first
  ss = state.strategy
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(ss.old_classes)),
                                [0, 1])
  # A teacher whose top class over all classes is a new one (bias +30 on
  # classes 2..9): the maps' class is the top *old* one. The bias moves
  # neither L_D (over the old classes) nor any map.
  th = ss.teacher["head"]
  ss = ss._replace(teacher=dict(ss.teacher, head=dict(
      th, bias=th["bias"] + 30.0 * (jnp.arange(10) >= 2))))
  b = batch_of(stream.experiences[1], n=B)
  # A student that has moved away from the teacher, with its head's
  # classes 0 and 1 swapped: its own top old class is the other one.
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = jax.tree.unflatten(tree, [
      p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  swap = jnp.asarray([1, 0] + list(range(2, 10)))
  params = dict(params, head={k: v[..., swap]
                              for k, v in params["head"].items()})
  lwf_s = lwf(alpha=beta, temperature=temp)
  lwf_ss = lwf_s.init(ctx, jax.random.PRNGKey(0), state.params)._replace(
      teacher=ss.teacher, old_classes=ss.old_classes)
  lwm0 = lwm(layer=LAYER, beta=beta, gamma=0.0, temperature=temp)

  @jax.jit
  def parts(ss, lwf_ss, params, b):
    logits = ctx.logits(params, {}, b["x"], b["task"], train=True)
    got = s.loss(ctx, ss, params, b, logits)
    t = ctx.logits(ss.teacher, {}, b["x"], b["task"])
    old = ss.old_classes
    cls = jnp.argmax(jnp.where(old, t, -1e9), -1)
    own = jnp.argmax(jnp.where(old, logits, -1e9), -1)
    top = jnp.argmax(t, -1)
    q_old = gradcam(ctx, LAYER, ss.teacher, {}, b["x"], b["task"], cls)
    q = gradcam(ctx, LAYER, params, {}, b["x"], b["task"], cls)
    ad = attention_distillation(q, q_old, b["mask"])
    kd = distillation(logits, t, old, b["mask"], temp)
    return (got, cls, own, top, ad, kd,
            lwm0.loss(ctx, ss, params, b, logits),
            lwf_s.loss(ctx, lwf_ss, params, b, logits))

  got, cls, own, top, ad, kd, lwm_g0, lwf_loss = jax.tree.map(
      np.asarray, parts(ss, lwf_ss, params, b))
  assert set(cls.tolist()) <= {0, 1}
  assert (top >= 2).all()
  # The student's own top class differs on some rows; the teacher's is used.
  assert (own != cls).any()
  assert ad > 0.05 and kd > 0
  np.testing.assert_allclose(got, beta * kd + gamma * ad, rtol=1e-5)
  # γ = 0 is LwF (α = β) exactly.
  np.testing.assert_allclose(lwm_g0, lwf_loss, rtol=1e-6)


def test_lwm_first_experience_has_no_attention_term(ctx, stream):
  """No old class yet (experience 0): L_D over an empty group is 0 and
  there is no map to compare, so the loss is 0 whatever γ, even for a
  student far from the teacher (the initialisation); a map for the
  argmax over no old class (class 0) would give a positive L_AD."""
  s = lwm(layer=LAYER, beta=1.0, gamma=5.0)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy
  assert not np.asarray(ss.old_classes).any()
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(11), len(leaves))
  params = jax.tree.unflatten(tree, [
      p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  b = batch_of(stream.experiences[0], n=B)
  got, ad = jax.jit(lambda ss, p, b: (
      s.loss(ctx, ss, p, b, ctx.logits(p, {}, b["x"], b["task"])),
      attention_distillation(
          gradcam(ctx, LAYER, p, {}, b["x"], b["task"], jnp.zeros(B, int)),
          gradcam(ctx, LAYER, ss.teacher, {}, b["x"], b["task"],
                  jnp.zeros(B, int)), b["mask"])))(ss, params, b)
  assert float(ad) > 0.05     # the maps differ: the check is not vacuous
  assert float(got) == 0.0


def test_lwm_old_classes_accumulate_and_teacher_is_the_last_model(
    ctx, first, stream):
  """At each experience's end the teacher becomes the model and the old
  classes grow by the experience's (not replaced by them)."""
  s = lwm(layer=LAYER)
  np.testing.assert_array_equal(
      np.flatnonzero(np.asarray(first.strategy.old_classes)), [0, 1])
  params = jax.tree.map(lambda p: p + 0.5, first.params)
  out = s.after_experience(ctx, first.replace(params=params),
                           stream.experiences[1])
  np.testing.assert_array_equal(
      np.flatnonzero(np.asarray(out.strategy.old_classes)),
      sorted({0, 1} | set(stream.experiences[1].classes)))
  for a, b in zip(jax.tree.leaves(out.strategy.teacher),
                  jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _split_gradcam(ctx, params, x, task, cls):
  """Grad-CAM by another path: the split model's maps, and the gradient
  of its upper part's class scores with respect to them."""
  sp = split_model(ctx, LAYER)
  a = sp.lower(ctx, params, {}, x, task)
  g = jax.grad(lambda z: jnp.sum(jnp.take_along_axis(
      sp.upper(ctx, params, {}, z, task)[0], cls[:, None], 1)))(a)
  return jax.nn.relu(jnp.einsum("bhwk,bk->bhw", a, g.mean(axis=(1, 2))))


def test_lwm_attention_term_has_the_second_order_gradient(ctx, first,
                                                          stream):
  """The attention term trains (FACIL's detached maps give it no
  gradient): its gradient flows through the current model's Grad-CAM map,
  including the map's own gradient, and equals the gradient of the same
  loss built from the split model's maps."""
  s = lwm(layer=LAYER, beta=0.0, gamma=1.0)
  state = first
  ss = state.strategy
  b = batch_of(stream.experiences[1], n=B)
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  params = jax.tree.unflatten(tree, [
      p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  @jax.jit
  def both(ss, params, b):
    f = lambda p: s.loss(ctx, ss, p, b, ctx.logits(p, {}, b["x"], b["task"]))
    g = jax.grad(f)(params)
    t = ctx.logits(ss.teacher, {}, b["x"], b["task"])
    cls = jnp.argmax(jnp.where(ss.old_classes, t, -1e9), -1)
    q_old = _split_gradcam(ctx, ss.teacher, b["x"], b["task"], cls)
    want = jax.grad(lambda p: attention_distillation(
        _split_gradcam(ctx, p, b["x"], b["task"], cls), q_old,
        b["mask"]))(params)
    return g, want

  g, want = both(ss, params, b)
  for a, w in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-3,
                               atol=1e-6)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g)) > 1e-3
  # The map's gradient part matters: with ∂y/∂A held constant the
  # gradient differs (the head gets none at all).
  assert float(jnp.abs(g["head"]["kernel"]).max()) > 1e-4


def test_lwm_attention_keeps_old_inputs_maps(stream):
  """Trained on experience 1, the model with the attention term keeps
  its Grad-CAM maps of experience 0's inputs closer to the teacher's than
  the same training without it (γ = 0: LwF)."""
  e0, e1 = stream.experiences
  x = jnp.asarray(e0.test_x)
  t = jnp.zeros((x.shape[0],), jnp.int32)
  # At SGD 0.1 both runs' maps of the old classes die (all ReLU'd to
  # zero, where L_AD has no gradient left); at 0.03 they do not.
  ctx = cnn_ctx(stream, lr=0.03)
  # Experience 0 trains on the cross-entropy alone (no old class), so
  # both runs start experience 1 from the same state; γ = 0's step
  # trains it and then experience 1 of that run.
  start, step0 = after_first(ctx, lwm(layer=LAYER, gamma=0.0), stream, 30,
                             n=B)
  teacher = start.strategy.teacher
  cls = jnp.asarray(e0.test_y)
  # The data are arguments, not constants XLA would fold while compiling.
  ad_of = jax.jit(lambda p, teacher, x, t, cls: attention_distillation(
      gradcam(ctx, LAYER, p, {}, x, t, cls),
      gradcam(ctx, LAYER, teacher, {}, x, t, cls), jnp.ones(x.shape[:1])))
  out = {}
  for gamma in (0.0, 5.0):
    s = lwm(layer=LAYER, gamma=gamma)
    step = step0 if gamma == 0 else jax.jit(
        lambda st, b, s=s: train.train_step(ctx, s, st, b)[0])
    state = start
    for i in range(30):
      state = step(state, batch_of(e1, n=B, start=(B * i) % (len(e1.train_y) - B)))
    out[gamma] = float(ad_of(state.params, teacher, x, t, cls))
  assert out[5.0] < 0.3 * out[0.0]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(layer=""), "layer"),
    (dict(beta=-1.0), "beta"),
    (dict(gamma=-0.5), "gamma"),
    (dict(temperature=0.0), "temperature"),
])
def test_lwm_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    lwm(**kwargs)


def test_lwm_bad_models_and_streams(stream):
  ctx = cnn_ctx(stream)
  with pytest.raises(ValueError, match="unknown layer 'conv9'.*Conv_1"):
    train.init_state(ctx, lwm(layer="conv9"), 0)
  with pytest.raises(ValueError, match="feature maps"):
    train.init_state(ctx, lwm(layer="backbone/Dense_0"), 0)
  task = dataclasses.replace(stream, kind="task")
  with pytest.raises(ValueError, match="class- or domain-incremental"):
    train.init_state(cnn_ctx(task), lwm(), 0)
