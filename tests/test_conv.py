"""jaxcl.models.conv: the convolution whose gradient is written with
canonical (NHWC / HWIO) convolutions, so XLA:CPU runs it fast in a scan."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcl import models
from jaxcl.models import conv
from test_hybrid import _subjaxprs

DN = ("NHWC", "HWIO", "NHWC")
CANON = conv._specs(2)


def _pair(s, pad, ld=(1, 1), rd=(1, 1)):
  kw = dict(lhs_dilation=ld, rhs_dilation=rd, dimension_numbers=DN)
  return (lambda x, w: lax.conv_general_dilated(x, w, s, pad, **kw),
          lambda x, w: conv.conv_general_dilated(x, w, s, pad, **kw))


def _convs(jaxpr):
  """Every conv_general_dilated equation, nested jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      out.append(eqn)
    for sub in _subjaxprs(eqn):
      out.extend(_convs(sub))
  return out


CASES = [c for c in itertools.product(
    [(3, 3), (2, 3), (1, 1)], [(1, 1), (2, 2), (3, 2)],
    ["SAME", "VALID", ((1, 0), (2, 1)), ((0, 2), (1, -1))],
    [(1, 1), (2, 1)], [(1, 1), (2, 2)])
         if not (isinstance(c[2], str) and c[3] != (1, 1))]


@pytest.mark.parametrize("k,s,pad,ld,rd", CASES[::7])
def test_value_and_gradient_equal_lax(k, s, pad, ld, rd):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 9, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=k + (4, 5)), jnp.float32)
  ref, new = _pair(s, pad, ld, rd)
  y = ref(x, w)
  np.testing.assert_array_equal(new(x, w), y)
  ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  (dx0, dw0), (dx1, dw1) = jax.vjp(ref, x, w)[1](ct), jax.vjp(new, x, w)[1](ct)
  np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw1, dw0, rtol=1e-5, atol=1e-4)


def test_one_dimensional_convolution():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 11, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  spec = ("NWC", "WIO", "NWC")
  ref = lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(
      x, w, (2,), "SAME", dimension_numbers=spec)))
  new = lambda x, w: jnp.sum(jnp.sin(conv.conv_general_dilated(
      x, w, (2,), "SAME", dimension_numbers=spec)))
  for a, b in zip(jax.grad(ref, (0, 1))(x, w), jax.grad(new, (0, 1))(x, w)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s", [(1, 1), (2, 2)])
def test_every_gradient_convolution_is_canonical(s):
  # The mechanism: lax's transpose rules give dx's kernel O/I swapped and
  # dw batch / features swapped, which XLA:CPU runs 20-30x slower in a
  # loop; here every convolution of the gradient is NHWC / HWIO.
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))
  ref, new = _pair(s, "SAME")
  loss = lambda f: (lambda x, w: jnp.sum(f(x, w) ** 2))
  got = _convs(jax.make_jaxpr(jax.grad(loss(new), (0, 1)))(x, w).jaxpr)
  assert len(got) == 3
  assert all(e.params["dimension_numbers"] == CANON for e in got)
  base = _convs(jax.make_jaxpr(jax.grad(loss(ref), (0, 1)))(x, w).jaxpr)
  assert any(e.params["dimension_numbers"] != CANON for e in base)


def test_second_order_gradient_equals_lax():
  # LwM differentiates a loss of an input gradient (Grad-CAM).
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  ref, new = _pair((2, 2), "SAME")
  outer = lambda f: (lambda w: jnp.sum(jax.grad(
      lambda x: jnp.sum(jnp.sin(f(x, w))))(x) ** 2))
  np.testing.assert_allclose(jax.grad(outer(new))(w), jax.grad(outer(ref))(w),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axes,runs", [((0, None), 2), ((None, 0), 2),
                                       ((0, 0), 2), ((0, 0), 10)])
def test_vmapped_gradient_equals_lax_without_feature_groups(axes, runs):
  # A sweep vmaps the step over runs: lax batches kernels by feature
  # groups (slow on XLA:CPU too); the rule folds runs into the batch or
  # the output features, or runs one convolution per run.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(3, 9, 9, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  # More runs than conv._UNROLL take the loop, fewer the unrolled path.
  scale = jnp.linspace(-1.0, 2.0, runs)
  args = (scale[:, None, None, None, None] * x if axes[0] == 0 else x,
          scale[::-1, None, None, None, None] * w if axes[1] == 0 else w)
  ref, new = _pair((2, 2), "SAME")
  grad = lambda f: jax.vmap(jax.grad(
      lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1)), axes)
  for a, b in zip(grad(ref)(*args), grad(new)(*args)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)
  got = _convs(jax.make_jaxpr(grad(new))(*args).jaxpr)
  assert got and all(e.params["feature_group_count"] == 1
                     and e.params["dimension_numbers"] == CANON for e in got)


def test_other_settings_fall_back_to_lax():
  x = jnp.ones((2, 6, 6, 4))
  w = jnp.ones((3, 3, 2, 4))
  got = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                  feature_group_count=2)
  want = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                  feature_group_count=2)
  np.testing.assert_array_equal(got, want)
  eqns = jax.make_jaxpr(lambda x: conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=DN,
      feature_group_count=2))(x).jaxpr.eqns
  assert [e.primitive.name for e in eqns] == ["conv_general_dilated"]
  # lax's own error for string padding on a transposed convolution.
  with pytest.raises(ValueError, match="String padding"):
    conv.conv_general_dilated(x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME",
                              lhs_dilation=(2, 2), dimension_numbers=DN)


def test_cnn_keeps_flax_conv_parameters_and_uses_the_conv():
  model = models.build("cnn", 10, channels=(4, 8), hidden=16)
  x = jnp.ones((2, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(0), x, jnp.zeros(2, jnp.int32))
  back = params["params"]["backbone"]
  assert set(back) == {"Conv_0", "Conv_1", "Dense_0"}
  assert back["Conv_1"]["kernel"].shape == (3, 3, 4, 8)
  loss = lambda p: jnp.sum(model.apply(p, x, jnp.zeros(2, jnp.int32)) ** 2)
  got = _convs(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  assert len(got) >= 5 and all(
      e.params["dimension_numbers"] == CANON for e in got)
