"""AutoAugment's CIFAR-10 policy as a jit-able JAX function.

Cubuk, Zoph, Mané, Vasudevan & Le, `AutoAugment: learning augmentation
strategies from data <https://arxiv.org/abs/1805.09501>`_, CVPR 2019. The
policy searched on reduced CIFAR-10 is 25 sub-policies; each image draws
one uniformly, then applies its first operation with probability ``p1``
and its second with probability ``p2``:
``x' = op2(op1(x, m1) if u1 < p1 else x, m2) if u2 < p2 else ...``.

What is reproduced is the implementation continual-learning code uses:
DeepVoltaire's ``autoaugment.py`` (``CIFAR10Policy``, ``SubPolicy``; PIL),
which Mammoth copies as ``utils/autoaugment.py`` and CNLL's authors
import for their strong view. Its magnitudes are 10-level grids
(:data:`RANGES`); shears, translations, colour, contrast, sharpness and
brightness take a random sign, rotations are counter-clockwise only. Each
operation here follows PIL's arithmetic on 8-bit images, and
``tests/test_autoaugment.py`` checks every one against Pillow:

* shearX / shearY: an affine map with PIL's bicubic filter (its ``a = -1``
  cubic, neighbours clamped to the image) and grey fill 128;
* translateX / translateY, rotate: nearest neighbour (PIL's default),
  grey fill 128 (the reference rotates over a transparent background and
  composites it on grey, which is the same);
* color, contrast, sharpness, brightness: ``ImageEnhance``'s blend with a
  degenerate image (the luminance, its mean grey, a 3x3 smoothing with
  the border kept, black), truncated to 8 bits;
* posterize, solarize, autocontrast, equalize, invert: ``ImageOps``' 8-bit
  look-up tables.

Inputs are batches ``(N, H, W, C)`` of pixels in ``[0, 1]`` (jaxcl's
loaders' range; :func:`jaxcl.augment.in_pixels` wraps standardised
inputs), taken to 8-bit levels ``round(255 x)`` as PIL's images are, and
returned as ``level / 255``. Each row draws its own sub-policy, signs and
coin flips from one key; shapes never depend on the draw (under ``vmap``
every operation is computed and the drawn one selected). On a
single-channel image colour is the identity, as PIL's ``Color`` is on an
``L`` image.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CIFAR10_POLICY", "OPERATIONS", "RANGES", "apply_operation",
           "argument", "cifar10_policy", "draws", "rotation_fixed"]

# (p1, operation 1, magnitude index 1, p2, operation 2, magnitude index 2):
# CIFAR10Policy's 25 sub-policies, in its order.
CIFAR10_POLICY = (
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)

OPERATIONS = ("shearX", "shearY", "translateX", "translateY", "rotate",
              "color", "posterize", "solarize", "contrast", "sharpness",
              "brightness", "autocontrast", "equalize", "invert")

# SubPolicy's magnitude grids (index 0-9); translations are fractions of
# the image's side.
RANGES = {
    "shearX": np.linspace(0, 0.3, 10),
    "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10),
    "translateY": np.linspace(0, 150 / 331, 10),
    "rotate": np.linspace(0, 30, 10),
    "color": np.linspace(0.0, 0.9, 10),
    "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int),
    "solarize": np.linspace(256, 0, 10),
    "contrast": np.linspace(0.0, 0.9, 10),
    "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10),
    "autocontrast": np.zeros(10),
    "equalize": np.zeros(10),
    "invert": np.zeros(10),
}
# Operations whose magnitude takes a random sign (the reference's
# random.choice([-1, 1])).
_SIGNED = frozenset({"shearX", "shearY", "translateX", "translateY",
                     "color", "contrast", "sharpness", "brightness"})
_ENHANCE = frozenset({"color", "contrast", "sharpness", "brightness"})
_FILL = 128.0  # the reference's fillcolor


# ---------------------------------------------------------------------------
# Geometry: PIL's AFFINE transform maps an output pixel's centre (x + .5,
# y + .5) to the input point (a X + b Y + c, d X + e Y + f).


def _source(shape, m):
  h, w = shape[0], shape[1]
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                        jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
  a, b, c, d, e, f = m
  return a * xx + b * yy + c, d * xx + e * yy + f


def _pixels_or_fill(v, ix, iy):
  """``v[iy, ix]`` where the integer point is inside the image, grey
  elsewhere (both nearest-neighbour paths)."""
  h, w = v.shape[0], v.shape[1]
  inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  got = v[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
  return jnp.where(inside[..., None], got, _FILL)


def _affine_nearest(v, m):
  """PIL's nearest-neighbour affine: the input pixel ``int(coordinate)``
  (negative coordinates are outside), grey where it is outside."""
  sx, sy = _source(v.shape, m)
  ix = jnp.where(sx < 0, -1, jnp.floor(sx)).astype(jnp.int32)
  iy = jnp.where(sy < 0, -1, jnp.floor(sy)).astype(jnp.int32)
  return _pixels_or_fill(v, ix, iy)


def _cubic(v1, v2, v3, v4, d):
  """PIL's BICUBIC macro, in its Horner form: ``v2 + d (v3 - v1 + d (2 (v1
  - v2) + v3 - v4 + d (-v1 + v2 - v3 + v4)))`` (the ``a = -1`` cubic)."""
  return v2 + d * ((v3 - v1) + d * ((2.0 * (v1 - v2) + v3 - v4)
                                    + d * (-v1 + v2 - v3 + v4)))


def _affine_bicubic(v, m):
  """PIL's bicubic affine: grey outside ``[0, W) x [0, H)``; inside, the
  4 x 4 neighbours around ``coordinate - 0.5``, clamped to the image,
  interpolated along x then y (:func:`_cubic`), clipped to [0, 255] and
  truncated. PIL computes in double precision and this in float32: a
  result within float32 rounding of a whole level, or a point within it
  of the image's edge, can come out on the other side (0.7 % of pixels in
  the test)."""
  h, w = v.shape[0], v.shape[1]
  sx, sy = _source(v.shape, m)
  inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
  x, y = sx - 0.5, sy - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  dx, dy = (x - x0)[..., None], (y - y0)[..., None]
  cx = [jnp.clip(x0.astype(jnp.int32) + k, 0, w - 1) for k in (-1, 0, 1, 2)]
  cy = [jnp.clip(y0.astype(jnp.int32) + k, 0, h - 1) for k in (-1, 0, 1, 2)]
  rows = [_cubic(*(v[r, c] for c in cx), dx) for r in cy]
  out = jnp.floor(jnp.clip(_cubic(*rows, dy), 0.0, 255.0))
  return jnp.where(inside[..., None], out, _FILL)


def rotation_fixed(height: int, width: int, degrees: float) -> np.ndarray:
  """PIL's ``Image.rotate(degrees)`` (counter-clockwise about the centre,
  same size) as the 16.16 fixed-point affine map its nearest-neighbour
  path runs (``affine_fixed``): int32 ``(a0, a1, a2, a3, a4, a5)``, the
  input point of output pixel ``(x, y)`` being ``((a2 + y a1 + x a0) >>
  16, (a5 + y a4 + x a3) >> 16)``. Computed on the host in double
  precision, as PIL does: float32 would move a few pixels across."""
  r = -math.radians(degrees % 360.0)
  a, b = round(math.cos(r), 15), round(math.sin(r), 15)
  d, e = round(-math.sin(r), 15), round(math.cos(r), 15)
  cx, cy = width / 2.0, height / 2.0
  c = a * -cx + b * -cy + cx
  f = d * -cx + e * -cy + cy
  fix = lambda v: math.floor(v * 65536.0 + 0.5)
  return np.asarray([fix(a), fix(b), fix(c + a * 0.5 + b * 0.5), fix(d),
                     fix(e), fix(f + d * 0.5 + e * 0.5)], np.int32)


def _affine_fixed(v, fixed):
  """PIL's fixed-point nearest-neighbour affine (:func:`rotation_fixed`),
  grey outside the image."""
  h, w = v.shape[0], v.shape[1]
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.int32),
                        jnp.arange(w, dtype=jnp.int32), indexing="ij")
  a0, a1, a2, a3, a4, a5 = (fixed[i] for i in range(6))
  return _pixels_or_fill(v, (a2 + yy * a1 + xx * a0) >> 16,
                         (a5 + yy * a4 + xx * a3) >> 16)


# ---------------------------------------------------------------------------
# Colour and look-up tables, on 8-bit levels held as float32.


def _blend(degenerate, v, factor):
  """``Image.blend(degenerate, v, factor)``: truncated, clipped to 8 bits."""
  return jnp.floor(jnp.clip(degenerate + factor * (v - degenerate), 0.0,
                            255.0))


def _luma(v):
  """PIL's ``convert('L')``: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``
  for RGB; the image itself for one channel."""
  if v.shape[-1] == 1:
    return v
  r, g, b = (v[..., i].astype(jnp.int32) for i in range(3))
  return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(
      jnp.float32)[..., None]


def _smooth(v):
  """``ImageFilter.SMOOTH`` (3 x 3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13),
  rounded; PIL keeps the border pixels as they are."""
  h, w = v.shape[0], v.shape[1]
  p = jnp.pad(v, ((1, 1), (1, 1), (0, 0)))
  s = sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) + 4 * v
  out = jnp.clip(jnp.floor(s / 13.0 + 0.5), 0.0, 255.0)
  border = jnp.zeros((h, w), bool).at[0].set(True).at[-1].set(True) \
      .at[:, 0].set(True).at[:, -1].set(True)
  return jnp.where(border[..., None], v, out)


def _histogram(channel):
  return jnp.zeros((256,), jnp.int32).at[channel.astype(jnp.int32).ravel()
                                         ].add(1)


def _per_channel(fn, v):
  return jnp.stack([fn(v[..., c]) for c in range(v.shape[-1])], axis=-1)


def _autocontrast_channel(ch):
  """``ImageOps.autocontrast`` (no cutoff): level ``i`` to ``(i - lo) ·
  255 / (hi - lo)``, truncated; the identity when ``hi <= lo``. In whole
  numbers: PIL's double arithmetic gives one level less where that
  quotient is whole and its rounding falls short (0.5 % of pixels in the
  test, by one level)."""
  lo, hi = jnp.min(ch), jnp.max(ch)
  span = jnp.maximum(hi - lo, 1).astype(jnp.int32)
  out = ((ch - lo).astype(jnp.int32) * 255) // span
  return jnp.where(hi > lo, jnp.clip(out, 0, 255).astype(jnp.float32), ch)


def _equalize_channel(ch):
  """``ImageOps.equalize``: ``step = (n - h[last level present]) // 255``;
  level ``i`` maps to ``(step // 2 + Σ_{j<i} h[j]) // step``; the identity
  for one level present or ``step`` 0."""
  hist = _histogram(ch)
  present = hist > 0
  last = 255 - jnp.argmax(present[::-1])
  step = (jnp.sum(hist) - hist[last]) // 255
  below = jnp.cumsum(hist) - hist
  lut = jnp.clip((step // 2 + below) // jnp.maximum(step, 1), 0, 255)
  out = lut[ch.astype(jnp.int32)].astype(jnp.float32)
  keep = (jnp.sum(present) <= 1) | (step == 0)
  return jnp.where(keep, ch, out)


def _operation(name: str, v: jax.Array, arg: jax.Array,
               fixed: jax.Array) -> jax.Array:
  """:func:`apply_operation` with rotations given as their fixed-point
  map ``fixed`` (:func:`rotation_fixed`), which may be traced."""
  h, w = v.shape[0], v.shape[1]
  m = jnp.asarray(arg, jnp.float32)
  if name == "shearX":
    return _affine_bicubic(v, (1.0, m, 0.0, 0.0, 1.0, 0.0))
  if name == "shearY":
    return _affine_bicubic(v, (1.0, 0.0, 0.0, m, 1.0, 0.0))
  if name == "translateX":
    return _affine_nearest(v, (1.0, 0.0, m * w, 0.0, 1.0, 0.0))
  if name == "translateY":
    return _affine_nearest(v, (1.0, 0.0, 0.0, 0.0, 1.0, m * h))
  if name == "rotate":
    return _affine_fixed(v, fixed)
  if name == "color":
    return _blend(jnp.broadcast_to(_luma(v), v.shape), v, m)
  if name == "posterize":
    bits = m.astype(jnp.int32)
    mask = 255 - ((1 << (8 - bits)) - 1)
    return (v.astype(jnp.int32) & mask).astype(jnp.float32)
  if name == "solarize":
    return jnp.where(v < m, v, 255.0 - v)
  if name == "contrast":
    mean = jnp.floor(jnp.mean(_luma(v)) + 0.5)
    return _blend(jnp.full_like(v, mean), v, m)
  if name == "sharpness":
    return _blend(_smooth(v), v, m)
  if name == "brightness":
    return _blend(jnp.zeros_like(v), v, m)
  if name == "autocontrast":
    return _per_channel(_autocontrast_channel, v)
  if name == "equalize":
    return _per_channel(_equalize_channel, v)
  if name == "invert":
    return 255.0 - v
  raise ValueError(f"autoaugment: unknown operation {name!r}; valid: "
                   f"{list(OPERATIONS)}")


def argument(name: str, magnitude: float) -> float:
  """What the reference passes PIL for ``magnitude`` (a signed value of
  :data:`RANGES`): the enhancement factor ``1 + m`` for color, contrast,
  sharpness and brightness, ``m`` itself otherwise. In double precision,
  then float32, as PIL's blend receives it (float32 ``1 + m`` moves a
  level in a fifth of the pixels)."""
  return 1.0 + magnitude if name in _ENHANCE else magnitude


def apply_operation(name: str, v: jax.Array, arg: float) -> jax.Array:
  """One operation of :data:`OPERATIONS` on one image ``v`` ``(H, W, C)``
  of 8-bit levels (float32, 0-255), with PIL's argument ``arg``
  (:func:`argument`: a shear, a fraction of the side, degrees, an
  enhancement factor, bits, a threshold; a host number). Returns
  levels."""
  fixed = (rotation_fixed(v.shape[0], v.shape[1], float(arg))
           if name == "rotate" else np.zeros(6, np.int32))
  return _operation(name, v, arg, jnp.asarray(fixed))


# The policy as arrays, per slot (first / second operation): probability,
# operation index, and PIL's argument for a + and a - sign (the same for
# unsigned operations), computed in double precision.
def _slot(s: int) -> tuple[np.ndarray, ...]:
  subs = [sub[3 * s:3 * s + 3] for sub in CIFAR10_POLICY]
  mags = [float(RANGES[name][level]) for _, name, level in subs]
  return (np.asarray([p for p, _, _ in subs], np.float32),
          np.asarray([OPERATIONS.index(name) for _, name, _ in subs],
                     np.int32),
          np.asarray([argument(name, m) for (_, name, _), m in
                      zip(subs, mags)], np.float32),
          np.asarray([argument(name, -m if name in _SIGNED else m)
                      for (_, name, _), m in zip(subs, mags)], np.float32))


_TABLE = (_slot(0), _slot(1))


def _rotations(s: int, height: int, width: int) -> np.ndarray:
  """Slot ``s``'s fixed-point rotation maps for this image size (zeros
  for the sub-policies whose operation there is not a rotation)."""
  return np.stack([
      rotation_fixed(height, width, float(RANGES["rotate"][sub[3 * s + 2]]))
      if sub[3 * s + 1] == "rotate" else np.zeros(6, np.int32)
      for sub in CIFAR10_POLICY])


_BRANCHES = tuple(
    (lambda v, arg, fixed, name=name: _operation(name, v, arg, fixed))
    for name in OPERATIONS)


def draws(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One image's draw: its sub-policy's index (uniform over the 25), and
  per slot (first, second operation) whether it applies (with the
  sub-policy's probability) and PIL's argument for it, with a random sign
  where the reference draws one (it draws the sign only for an operation
  it applies; drawn always here, and independently, it has the same
  distribution). Returns ``(pick, apply (2,), argument (2,))``."""
  k_pick, *k_slots = jax.random.split(key, 3)
  pick = jax.random.randint(k_pick, (), 0, len(CIFAR10_POLICY))
  apply, args = [], []
  for (probs, _, plus, minus), k in zip(_TABLE, k_slots):
    k_coin, k_sign = jax.random.split(k)
    args.append(jnp.where(jax.random.bernoulli(k_sign),
                          jnp.asarray(plus)[pick], jnp.asarray(minus)[pick]))
    apply.append(jax.random.uniform(k_coin) < jnp.asarray(probs)[pick])
  return pick, jnp.stack(apply), jnp.stack(args)


def _one(key: jax.Array, v: jax.Array) -> jax.Array:
  """One image through the sub-policy :func:`draws` picks for it."""
  pick, apply, args = draws(key)
  for s, (_, ops, _, _) in enumerate(_TABLE):
    fixed = jnp.asarray(_rotations(s, v.shape[0], v.shape[1]))[pick]
    out = jax.lax.switch(jnp.asarray(ops)[pick], _BRANCHES, v, args[s],
                         fixed)
    v = jnp.where(apply[s], out, v)
  return v


def cifar10_policy(key: jax.Array, x: jax.Array) -> jax.Array:
  """``CIFAR10Policy`` on each row of ``x`` ``(N, H, W, C)`` (pixels in
  [0, 1]), one draw per row from ``key``; returns pixels in [0, 1] on the
  8-bit grid."""
  if x.ndim != 4:
    raise ValueError(f"autoaugment needs images shaped (N, H, W, C); got "
                     f"shape {tuple(x.shape)}")
  levels = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.float32)
  out = jax.vmap(_one)(jax.random.split(key, x.shape[0]), levels)
  return (out / 255.0).astype(x.dtype)
