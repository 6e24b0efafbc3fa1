"""AutoAugment's CIFAR-10 policy: every operation against Pillow (the
reference's ``SubPolicy`` functions, written out with an explicit sign),
and the policy's draws against the probabilities of its sub-policies."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from jaxcl import augment
from jaxcl import autoaugment as A

_FILL = 128


def reference(name, img, m):
  """DeepVoltaire's ``SubPolicy`` operation ``name`` at the signed
  magnitude ``m`` (Mammoth's utils/autoaugment.py)."""
  fill = (_FILL,) * 3 if img.mode == "RGB" else _FILL
  if name == "shearX":
    return img.transform(img.size, Image.AFFINE, (1, m, 0, 0, 1, 0),
                         Image.BICUBIC, fillcolor=fill)
  if name == "shearY":
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, m, 1, 0),
                         Image.BICUBIC, fillcolor=fill)
  if name == "translateX":
    return img.transform(img.size, Image.AFFINE,
                         (1, 0, m * img.size[0], 0, 1, 0), fillcolor=fill)
  if name == "translateY":
    return img.transform(img.size, Image.AFFINE,
                         (1, 0, 0, 0, 1, m * img.size[1]), fillcolor=fill)
  if name == "rotate":
    rot = img.convert("RGBA").rotate(m)
    return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4),
                           rot).convert(img.mode)
  if name == "color":
    return ImageEnhance.Color(img).enhance(1 + m)
  if name == "posterize":
    return ImageOps.posterize(img, int(m))
  if name == "solarize":
    return ImageOps.solarize(img, m)
  if name == "contrast":
    return ImageEnhance.Contrast(img).enhance(1 + m)
  if name == "sharpness":
    return ImageEnhance.Sharpness(img).enhance(1 + m)
  if name == "brightness":
    return ImageEnhance.Brightness(img).enhance(1 + m)
  if name == "autocontrast":
    return ImageOps.autocontrast(img)
  if name == "equalize":
    return ImageOps.equalize(img)
  if name == "invert":
    return ImageOps.invert(img)
  raise AssertionError(name)


def _cases(name, shape, seed):
  """Every magnitude level (and both signs where signed) on a random
  image: full-range noise, and a narrower range on every third level (so
  that autocontrast and equalize have something to stretch)."""
  rng = np.random.default_rng(seed)
  for level in range(10):
    for sign in ((1, -1) if name in A._SIGNED else (1,)):
      arr = rng.integers(0, 256, size=shape).astype(np.uint8)
      if level % 3 == 0:
        arr = (arr // 4 + 60).astype(np.uint8)
      yield float(A.RANGES[name][level]) * sign, arr


def _compare(name, shape, seed):
  diffs = []
  for m, arr in _cases(name, shape, seed):
    img = Image.fromarray(arr[..., 0] if shape[-1] == 1 else arr,
                          "L" if shape[-1] == 1 else "RGB")
    want = np.asarray(reference(name, img, m)).reshape(shape).astype(int)
    got = np.asarray(A.apply_operation(
        name, jnp.asarray(arr, jnp.float32), A.argument(name, m)))
    assert got.shape == shape and np.all(got == np.round(got))
    diffs.append(np.abs(got.astype(int) - want))
  return np.stack(diffs)


_SHAPES = [(32, 32, 3), (28, 28, 1)]
_EXACT = [n for n in A.OPERATIONS if not n.startswith("shear")]


@pytest.mark.parametrize("shape", _SHAPES, ids=["rgb32", "gray28"])
@pytest.mark.parametrize("name", _EXACT)
def test_operation_is_pillows_to_the_level(name, shape):
  d = _compare(name, shape, seed=A.OPERATIONS.index(name))
  assert d.max() == 0, (name, int(d.max()), float((d > 0).mean()))


@pytest.mark.parametrize("shape", _SHAPES, ids=["rgb32", "gray28"])
@pytest.mark.parametrize("name", ["shearX", "shearY"])
def test_bicubic_shear_is_pillows_up_to_float32_rounding(name, shape):
  """PIL interpolates in double precision, this in float32: a few
  results on a whole level's edge, or points on the image's edge, fall
  the other way (0.7 % of pixels measured); a wrong filter, clamp or
  sign moves most of them."""
  d = _compare(name, shape, seed=7)
  assert (d > 0).mean() < 0.02, float((d > 0).mean())
  assert d.mean() < 0.3, float(d.mean())
  assert np.mean(d[d > 0] == 1) > 0.8


def test_rotation_map_is_pils_fixed_point_arithmetic():
  """rotation_fixed is computed in double precision as PIL's: a float32
  matrix moves pixels at some angles (20 degrees on 32 x 32 did)."""
  rng = np.random.default_rng(3)
  for degrees in (20.0, 6.666666666666667, 29.5, 45.0):
    arr = rng.integers(0, 256, size=(32, 32, 3)).astype(np.uint8)
    want = np.asarray(reference("rotate", Image.fromarray(arr, "RGB"),
                                degrees))
    got = np.asarray(A.apply_operation("rotate", jnp.asarray(
        arr, jnp.float32), degrees))
    np.testing.assert_array_equal(got, want)
  fixed = A.rotation_fixed(32, 32, 0.0)
  np.testing.assert_array_equal(fixed[[0, 1, 3, 4]], [65536, 0, 0, 65536])


def _changes(name, arg, v):
  out = A.apply_operation(name, jnp.asarray(v), arg)
  return not np.array_equal(np.asarray(out), v)


def test_policy_draws_sub_policies_and_coins_at_their_probabilities():
  """On one image that every operation but color-at-0 changes, the share
  of rows left as they were is the policy's mean over its sub-policies of
  (1 - p1)(1 - p2) (with an operation that changes nothing counted as
  not applied), within four standard errors of 4000 draws; a swapped p,
  a slot read from the wrong column or a pick from 24 would move it."""
  rng = np.random.default_rng(0)
  img = rng.integers(50, 200, size=(8, 8, 3)).astype(np.float32)
  img[0, 0], img[1, 1] = 220.0, 30.0   # solarize's thresholds bite
  expected = 0.0
  for p1, n1, l1, p2, n2, l2 in A.CIFAR10_POLICY:
    e = []
    for p, n, lvl in ((p1, n1, l1), (p2, n2, l2)):
      m = float(A.RANGES[n][lvl])
      # The probability that the drawn operation changes the image.
      signs = (1, -1) if n in A._SIGNED else (1,)
      ch = np.mean([_changes(n, A.argument(n, s * m), img) for s in signs])
      e.append(p * ch)
    # A second operation on a changed image still counts as a change, so
    # only (no change, no change) leaves the row as it was (inverse pairs
    # aside: none in this policy changes the image back).
    expected += (1 - e[0]) * (1 - e[1]) / len(A.CIFAR10_POLICY)
  n = 4000
  x = jnp.broadcast_to(jnp.asarray(img / 255.0), (n,) + img.shape)
  out = np.asarray(jax.jit(A.cifar10_policy)(jax.random.PRNGKey(0), x))
  same = np.mean(np.all(np.abs(out - img / 255.0) < 1e-6, axis=(1, 2, 3)))
  se = math.sqrt(expected * (1 - expected) / n)
  assert abs(same - expected) < 4 * se, (same, expected, se)
  assert 0.05 < expected < 0.5  # the test can tell


def test_policy_is_per_row_deterministic_and_on_the_8_bit_grid():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(16, 12, 12, 3)), jnp.float32)
  f = jax.jit(lambda key, x: A.cifar10_policy(key, x))
  a, b = f(jax.random.PRNGKey(0), x), f(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(a, b)
  c = f(jax.random.PRNGKey(1), x)
  assert not np.array_equal(a, c)
  assert a.shape == x.shape and a.dtype == x.dtype
  levels = np.asarray(a) * 255.0
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
  # Rows draw apart: a batch of one image gives different rows.
  same = f(jax.random.PRNGKey(2), jnp.broadcast_to(x[:1], x.shape))
  assert len({np.asarray(r).tobytes() for r in same}) > 4
  assert f._cache_size() == 1


def test_pipeline_runs_it_after_the_flip_on_standardised_inputs():
  """``train.augment=('pad_crop', 'flip', 'autoaugment')``: CNLL's strong
  view. On standardised inputs it works on the pixels and standardises
  again; flat inputs are refused by name."""
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  f = augment.pipeline(("pad_crop", "flip", "autoaugment"), (8, 8, 3),
                       normalize=(mean, std))
  rng = np.random.default_rng(2)
  pix = rng.integers(0, 256, size=(6, 8, 8, 3)) / 255.0
  x = jnp.asarray((pix - np.asarray(mean)) / np.asarray(std), jnp.float32)
  out = np.asarray(f(jax.random.PRNGKey(0), x)) * np.asarray(std) + mean
  np.testing.assert_allclose(out * 255, np.round(out * 255), atol=2e-3)
  assert not np.allclose(out, pix)
  with pytest.raises(ValueError, match="'autoaugment' needs images"):
    augment.pipeline(("autoaugment",), (64,))
  with pytest.raises(ValueError, match="unknown operation 'warp'"):
    A.apply_operation("warp", jnp.zeros((4, 4, 1)), 0.0)
  with pytest.raises(ValueError, match=r"autoaugment needs images shaped "
                     r"\(N, H, W, C\); got shape \(4, 4\)"):
    A.cifar10_policy(jax.random.PRNGKey(0), jnp.zeros((4, 4)))


def test_draws_pick_every_sub_policy_and_its_coins_and_signs():
  """20000 draws: each of the 25 sub-policies about 1/25 of the time,
  each slot's operation applied at its sub-policy's probability, signed
  magnitudes with either sign about half the time and the argument PIL
  gets (all within five standard errors)."""
  n = 20000
  pick, apply, args = jax.jit(jax.vmap(A.draws))(
      jax.random.split(jax.random.PRNGKey(3), n))
  pick, apply, args = (np.asarray(a) for a in (pick, apply, args))
  counts = np.bincount(pick, minlength=25)
  assert len(counts) == 25
  se = math.sqrt(n * (1 / 25) * (24 / 25))
  assert np.all(np.abs(counts - n / 25) < 5 * se), counts
  for i, sub in enumerate(A.CIFAR10_POLICY):
    rows = pick == i
    for s in range(2):
      p, name, level = sub[3 * s:3 * s + 3]
      got = apply[rows, s].mean()
      assert abs(got - p) < 5 * math.sqrt(max(p * (1 - p), 1e-4) /
                                           rows.sum()) + 1e-9, (i, s)
      m = float(A.RANGES[name][level])
      want = {np.float32(A.argument(name, m))}
      if name in A._SIGNED and m:
        want.add(np.float32(A.argument(name, -m)))
        share = np.mean(args[rows, s] == np.float32(A.argument(name, m)))
        assert abs(share - 0.5) < 5 * math.sqrt(0.25 / rows.sum())
      assert set(args[rows, s].tolist()) == want, (i, s)
