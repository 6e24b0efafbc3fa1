"""Image augmentations as pure, jit-able functions of a key and a batch.

Every function takes a PRNG ``key`` and a batch ``x`` of images shaped
``(N, H, W, C)`` and returns a batch of the same shape and dtype. Each
example draws its own random parameters (one call, one key, different
crops or flips per row), so the same key gives the same batch and another
key another one. Shapes never depend on the draw: the functions run inside
``jit``, ``lax.scan`` and ``vmap`` without recompiling, and without a host
sync (contrastive methods augment inside the training step: SCR in
:mod:`jaxcl.strategies.scr`).

The operations (``OPS``): the standard training augmentation of the
image benchmarks (Mammoth's and FACIL's CIFAR transforms, torchvision's
``RandomCrop(H, padding)`` then ``RandomHorizontalFlip``), for
``train.augment``:

* ``pad_crop``: :func:`random_crop`, a random ``H x W`` window of the
  image zero-padded by ``padding`` pixels on each side;
* ``autoaugment``: :func:`jaxcl.autoaugment.cifar10_policy`, AutoAugment's
  CIFAR-10 policy (25 sub-policies of two PIL operations each; the strong
  view of CNLL's authors, after the crop and the flip);

and those SCR's authors use through kornia (``agents/scr.py`` of
RaptorMai/online-continual-learning; :data:`SCR_OPS`):

* ``crop``: :func:`random_resized_crop`, a random box of area
  ``s·H·W``, ``s ~ U(scale)``, and aspect ratio ``r``, ``log r ~
  U(log ratio)``, resized back to ``H x W`` bilinearly.
* ``flip``: :func:`horizontal_flip`, a left-right mirror with
  probability ``p``.
* ``jitter``: :func:`color_jitter`, random brightness, contrast,
  saturation and hue, applied with probability ``p`` (RGB only).
* ``gray``: :func:`random_grayscale`, the luminance in every channel with
  probability ``p`` (RGB only).

:func:`default_ops` picks what makes sense for an input shape: the
reference's four for RGB images (``C = 3``: CIFAR, its data); only
``crop`` for single-channel images (MNIST, digits: a mirrored 2, 3, 4, 5,
7 or 9 is not the digit it was, and colour means nothing there); nothing
for inputs that are not images (flat vectors). :func:`pipeline` composes
named operations into one ``(key, x) -> x`` function.

Differences from kornia, on purpose (kept simple and exactly invertible
at zero strength): crop boxes are continuous (sub-pixel), not rounded to
whole pixels, and a box too large for the image is clipped to it instead
of being redrawn up to ten times; the colour changes apply in a fixed
order (brightness, contrast, saturation, hue), not a random one, and the
hue shift rotates the chroma in YIQ space (as ``tf.image`` once did)
instead of shifting the HSV hue; pixels are clipped to ``[lo, hi]``
(default ``[0, 1]``, the range jaxcl's loaders give) after colour changes
only, so crops and flips work on standardised data too.

References:
  Chen, Kornblith, Norouzi & Hinton, `A simple framework for contrastive
  learning of visual representations <https://arxiv.org/abs/2002.05709>`_,
  ICML 2020 (the augmentation family).
  Mai, Li, Kim & Sanner, `Supervised contrastive replay
  <https://arxiv.org/abs/2103.13885>`_, CVPR Workshops 2021.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxcl import autoaugment, datasets

__all__ = ["OPS", "SCR_OPS", "random_crop", "random_resized_crop",
           "horizontal_flip", "color_jitter",
           "random_grayscale", "default_ops", "check_ops", "pipeline",
           "in_pixels", "pixel_maps", "view_augmenter"]

OPS = ("pad_crop", "crop", "flip", "autoaugment", "jitter", "gray")
# SCR's kornia pipeline (and default_ops' set for RGB images).
SCR_OPS = ("crop", "flip", "jitter", "gray")

# ITU-R BT.601 luma weights (torchvision's and kornia's rgb_to_grayscale).
_LUMA = (0.299, 0.587, 0.114)

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def _check_images(x: jax.Array, name: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name} takes images shaped (N, H, W, C), got shape "
                     f"{tuple(x.shape)}")


def _check_rgb(x: jax.Array, name: str) -> None:
  _check_images(x, name)
  if x.shape[-1] != 3:
    raise ValueError(f"{name} needs RGB images (3 channels), got "
                     f"{x.shape[-1]}")


def _check_p(name: str, p: float) -> None:
  if not (isinstance(p, (int, float)) and not isinstance(p, bool)
          and 0.0 <= p <= 1.0):
    raise ValueError(f"{name}: p must be a probability in [0, 1], got {p!r}")


def _interp_matrix(coord: jax.Array, size: int) -> jax.Array:
  """``(N, n_out, size)`` bilinear weights: output pixel ``i`` of row ``n``
  reads source position ``coord[n, i]`` (clamped to the image, so the
  border is repeated). Each row of weights sums to 1."""
  c = jnp.clip(coord, 0.0, size - 1.0)
  src = jnp.arange(size, dtype=coord.dtype)
  return jnp.maximum(0.0, 1.0 - jnp.abs(c[..., None] - src))


def random_resized_crop(key: jax.Array, x: jax.Array,
                        scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)
                        ) -> jax.Array:
  """Per-example random box, resized back to the image's size.

  For each example: area fraction ``s ~ U(scale)``, aspect ratio ``r``
  with ``log r ~ U(log ratio)``; the box is ``w = √(s H W r)`` by ``h =
  √(s H W / r)`` (clipped to the image), at a uniform position inside it.
  Output pixel ``(i, j)`` samples the source at

  .. math::
     y_i = t + (i + \\tfrac12)\\,\\frac{h}{H} - \\tfrac12, \\qquad
     x_j = l + (j + \\tfrac12)\\,\\frac{w}{W} - \\tfrac12

  (pixel centres, so the whole image, ``scale = ratio = (1, 1)``, maps
  every pixel onto itself) by bilinear interpolation, written as two
  ``(H, H)`` and ``(W, W)`` weight matrices per example: a fixed-shape
  ``einsum`` rather than a gather. Outputs are convex combinations of
  input pixels, so they stay within the image's range.
  """
  _check_images(x, "random_resized_crop")
  n, h, w, _ = x.shape
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (n,), minval=scale[0],
                            maxval=scale[1]) * (h * w)
  log_r = jax.random.uniform(k_ratio, (n,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  r = jnp.exp(log_r)
  cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
  ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
  top = jax.random.uniform(k_top, (n,)) * (h - ch)
  left = jax.random.uniform(k_left, (n,)) * (w - cw)
  ys = top[:, None] + (jnp.arange(h) + 0.5)[None, :] * (ch / h)[:, None] - 0.5
  xs = left[:, None] + (jnp.arange(w) + 0.5)[None, :] * (cw / w)[:, None] - 0.5
  wy = _interp_matrix(ys, h)  # (N, H_out, H_src)
  wx = _interp_matrix(xs, w)  # (N, W_out, W_src)
  out = jnp.einsum("nih,nhwc,njw->nijc", wy, x.astype(jnp.float32), wx,
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(x.dtype)


def random_crop(key: jax.Array, x: jax.Array, padding: int) -> jax.Array:
  """Per-example random crops of ``(N, H, W, C)`` images zero-padded by
  ``padding`` on each side (torchvision's ``RandomCrop(H, padding)``)."""
  if padding == 0:
    return x
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  off = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

  def one(img, o):
    return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(one)(xp, off)


def horizontal_flip(key: jax.Array, x: jax.Array, p: float = 0.5
                    ) -> jax.Array:
  """Each example mirrored left-right with probability ``p``."""
  _check_images(x, "horizontal_flip")
  flip = jax.random.bernoulli(key, p, (x.shape[0],))
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def _gray(x: jax.Array) -> jax.Array:
  """``(N, H, W, 1)`` luminance of RGB images."""
  return jnp.tensordot(x, jnp.asarray(_LUMA, x.dtype), axes=([-1], [0]))[
      ..., None]


def _factor(key: jax.Array, n: int, strength: float) -> jax.Array:
  """``(N, 1, 1, 1)`` factors ``~ U[max(0, 1 - strength), 1 + strength]``
  (torchvision's and kornia's range for brightness, contrast,
  saturation)."""
  f = jax.random.uniform(key, (n,), minval=max(0.0, 1.0 - strength),
                         maxval=1.0 + strength)
  return f[:, None, None, None]


def color_jitter(key: jax.Array, x: jax.Array, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 0.8, lo: float = 0.0,
                 hi: float = 1.0) -> jax.Array:
  """Random colour changes of RGB images, each example with probability
  ``p`` (kornia's ``ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8)`` by default).

  In order, with per-example factors ``b, c, s ~ U[1 - strength, 1 +
  strength]`` and ``δ ~ U[-hue, hue]``: brightness ``x b``; contrast
  ``m + c (x - m)`` with ``m`` the image's mean luminance; saturation
  ``g + s (x - g)`` with ``g`` each pixel's luminance; hue: the chroma
  ``(I, Q)`` in YIQ space rotated by ``2πδ``. Results are clipped to
  ``[lo, hi]`` after each change. All strengths 0 (or ``p = 0``) leave
  the images unchanged.
  """
  _check_rgb(x, "color_jitter")
  n = x.shape[0]
  kb, kc, ks, kh, kp = jax.random.split(key, 5)
  y = x.astype(jnp.float32)
  clip = lambda a: jnp.clip(a, lo, hi)
  if brightness:
    y = clip(y * _factor(kb, n, brightness))
  if contrast:
    m = jnp.mean(_gray(y), axis=(1, 2, 3), keepdims=True)
    y = clip(m + _factor(kc, n, contrast) * (y - m))
  if saturation:
    g = _gray(y)
    y = clip(g + _factor(ks, n, saturation) * (y - g))
  if hue:
    to_yiq = jnp.asarray([[0.299, 0.587, 0.114],
                          [0.596, -0.274, -0.322],
                          [0.211, -0.523, 0.312]], jnp.float32)
    yiq = y @ to_yiq.T
    theta = 2.0 * jnp.pi * jax.random.uniform(kh, (n,), minval=-hue,
                                               maxval=hue)
    cos, sin = (t[:, None, None] for t in (jnp.cos(theta), jnp.sin(theta)))
    i, q = yiq[..., 1], yiq[..., 2]
    yiq = jnp.stack([yiq[..., 0], cos * i - sin * q, sin * i + cos * q], -1)
    y = clip(yiq @ jnp.linalg.inv(to_yiq).T)
  apply = jax.random.bernoulli(kp, p, (n,))[:, None, None, None]
  return jnp.where(apply, y.astype(x.dtype), x)


def random_grayscale(key: jax.Array, x: jax.Array, p: float = 0.2
                     ) -> jax.Array:
  """Each RGB example replaced by its luminance (in all three channels)
  with probability ``p``."""
  _check_rgb(x, "random_grayscale")
  gray = jnp.broadcast_to(_gray(x), x.shape)
  apply = jax.random.bernoulli(key, p, (x.shape[0],))[:, None, None, None]
  return jnp.where(apply, gray, x)


def default_ops(input_shape: Sequence[int]) -> tuple[str, ...]:
  """SCR's operations that make sense for one example's shape: all four
  for RGB images ``(H, W, 3)`` (:data:`SCR_OPS`, the reference set),
  ``('crop',)`` for single-channel images ``(H, W, 1)``, none for
  anything else."""
  shape = tuple(input_shape)
  if len(shape) == 3 and shape[-1] == 3:
    return SCR_OPS
  if len(shape) == 3 and shape[-1] == 1:
    return ("crop",)
  return ()


def check_ops(ops: Sequence[str], who: str = "augment") -> tuple[str, ...]:
  """Validates operation names (host side, before tracing).

  Raises:
    ValueError: naming ``who``, for a name outside :data:`OPS` or one
      given twice.
  """
  if isinstance(ops, str):
    raise ValueError(f"{who}: expected a sequence of operation names from "
                     f"{list(OPS)}, got the string {ops!r}")
  ops = tuple(ops)
  for op in ops:
    if op not in OPS:
      raise ValueError(f"{who}: unknown augmentation {op!r}; valid: "
                       f"{list(OPS)}")
  if len(set(ops)) != len(ops):
    raise ValueError(f"{who}: an augmentation is named twice in {ops}")
  return ops


def pipeline(ops: Sequence[str], input_shape: Sequence[int], *,
             crop_padding: int = 4,
             crop_scale: tuple[float, float] = (0.2, 1.0),
             crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
             flip_p: float = 0.5, jitter: tuple[float, ...] = (0.4, 0.4,
                                                              0.4, 0.1),
             jitter_p: float = 0.8, gray_p: float = 0.2,
             normalize: Sequence = (),
             who: str = "augment") -> Augment:
  """``(key, x) -> x``: the named operations applied in :data:`OPS` order
  (torchvision's pad-and-crop, then SCR's kornia pipeline: crop, flip,
  with AutoAugment's policy after the flip as torchvision pipelines place
  it, then jitter, grayscale), each with its own key. ``x`` is a batch of
  examples of ``input_shape``.

  Args:
    ops: names from :data:`OPS` (empty: the identity).
    input_shape: one example's shape; images are ``(H, W, C)``.
    crop_padding: :func:`random_crop`'s padding in pixels (4: the CIFAR
      protocols').
    crop_scale, crop_ratio: :func:`random_resized_crop`'s ranges.
    flip_p: :func:`horizontal_flip`'s probability.
    jitter: brightness, contrast, saturation, hue strengths of
      :func:`color_jitter`; jitter_p its probability.
    gray_p: :func:`random_grayscale`'s probability.
    normalize: the inputs' standardisation ``(mean, std)``, one value or
      one per channel (``dataset.normalize``; ``()``: none). The
      operations then run on the pixels, as torchvision's transforms run
      before its ``Normalize``: ``pad_crop`` pads with black, not with
      the mean colour, and the colour changes clip to ``[0, 1]``; the
      result is standardised again.
    who: the name errors begin with.

  Raises:
    ValueError: an unknown operation, one that does not fit
      ``input_shape`` (``crop`` / ``flip`` need ``(H, W, C)`` images,
      ``jitter`` / ``gray`` three channels), or a bad strength.
  """
  ops = check_ops(ops, who)
  shape = tuple(input_shape)
  image = len(shape) == 3
  for op in ops:
    if op in ("pad_crop", "crop", "flip", "autoaugment") and not image:
      raise ValueError(f"{who}: {op!r} needs images shaped (H, W, C); the "
                       f"inputs are shaped {shape}")
    if op in ("jitter", "gray") and not (image and shape[-1] == 3):
      raise ValueError(f"{who}: {op!r} needs RGB images (H, W, 3); the "
                       f"inputs are shaped {shape}")
  if not (isinstance(crop_padding, int) and not isinstance(
      crop_padding, bool) and crop_padding >= 0):
    raise ValueError(f"{who}: crop_padding must be a whole number of "
                     f"pixels >= 0, got {crop_padding!r}")
  lo_s, hi_s = (float(v) for v in crop_scale)
  if not 0.0 < lo_s <= hi_s <= 1.0:
    raise ValueError(f"{who}: crop_scale must be (lo, hi) with 0 < lo <= "
                     f"hi <= 1, got {tuple(crop_scale)}")
  lo_r, hi_r = (float(v) for v in crop_ratio)
  if not 0.0 < lo_r <= hi_r < math.inf:
    raise ValueError(f"{who}: crop_ratio must be (lo, hi) with 0 < lo <= "
                     f"hi, got {tuple(crop_ratio)}")
  _check_p(f"{who}: flip", flip_p)
  _check_p(f"{who}: jitter", jitter_p)
  _check_p(f"{who}: gray", gray_p)
  jitter = tuple(float(v) for v in jitter)
  if len(jitter) != 4 or not all(0.0 <= v < math.inf for v in jitter) \
      or jitter[3] > 0.5:
    raise ValueError(f"{who}: jitter must be (brightness, contrast, "
                     f"saturation, hue) strengths >= 0, hue <= 0.5, got "
                     f"{jitter}")
  steps: list[Augment] = []
  if "pad_crop" in ops:
    steps.append(lambda k, x: random_crop(k, x, crop_padding))
  if "crop" in ops:
    steps.append(lambda k, x: random_resized_crop(k, x, (lo_s, hi_s),
                                                  (lo_r, hi_r)))
  if "flip" in ops:
    steps.append(lambda k, x: horizontal_flip(k, x, flip_p))
  if "autoaugment" in ops:
    steps.append(autoaugment.cifar10_policy)
  if "jitter" in ops:
    steps.append(lambda k, x: color_jitter(k, x, *jitter, p=jitter_p))
  if "gray" in ops:
    steps.append(lambda k, x: random_grayscale(k, x, gray_p))

  def apply(key: jax.Array, x: jax.Array) -> jax.Array:
    for k, step in zip(jax.random.split(key, len(steps)), steps):
      x = step(k, x)
    return x

  on_pixels = in_pixels(apply, normalize, shape, who)  # checks normalize
  return on_pixels if steps else (lambda key, x: x)


def pixel_maps(normalize: Sequence, input_shape: Sequence[int],
               who: str = "augment"
               ) -> tuple[Callable[[jax.Array], jax.Array],
                          Callable[[jax.Array], jax.Array]]:
  """``(to_pixels, to_inputs)`` for inputs standardised by ``normalize``
  ``(mean, std)`` (one value or one per channel; ``dataset.normalize``):
  ``x * std + mean`` and its inverse; both the identity when
  ``normalize`` is ``()``. For a strategy's own work on pixels: an
  augmentation, a generator that models pixels in ``[0, 1]``, auxiliary
  images loaded unstandardised.

  Raises:
    ValueError: naming ``who``: a ``normalize`` that is not ``()`` or
      ``(mean, std)``, or whose values do not fit the channels.
  """
  if not normalize:
    return (lambda x: x), (lambda x: x)
  if len(normalize) != 2:
    raise ValueError(f"{who}: normalize must be () or (mean, std), got "
                     f"{tuple(normalize)!r}")
  try:
    mean, std = datasets.standardisation(*normalize, tuple(input_shape))
  except datasets.DataError as e:
    raise ValueError(f"{who}: {e}") from None
  return (lambda x: x * std + mean), (lambda x: (x - mean) / std)


def in_pixels(step: Augment, normalize: Sequence, input_shape: Sequence[int],
              who: str = "augment") -> Augment:
  """``step`` run on the pixels of inputs standardised by ``normalize``
  (:func:`pixel_maps`): the standardisation undone, ``step`` applied, the
  result standardised again, as torchvision's transforms run before its
  ``Normalize``. ``step`` itself when ``normalize`` is ``()``.

  Raises:
    ValueError: as :func:`pixel_maps`.
  """
  to_pixels, to_inputs = pixel_maps(normalize, input_shape, who)
  if not normalize:
    return step
  return lambda key, x: to_inputs(step(key, to_pixels(x)))


def view_augmenter(who: str, augment: str | Sequence[str] = "auto",
                   crop_scale: Sequence[float] = (0.2, 1.0)
                   ) -> Callable[..., Augment]:
  """For strategies that make their own augmented views (SCR's second
  view, DualNet's two): checks ``augment`` and ``crop_scale`` now (host
  side, when the strategy is built) and returns ``augmenter(ctx)``, the
  :func:`pipeline` for the run's input shape and standardisation, built
  once per context (it raises there, at ``init``, on an operation that
  does not fit the inputs).

  ``augment``: ``'auto'`` (by input shape, :func:`default_ops`: crop,
  flip, jitter, gray for RGB images; crop for single-channel ones; none
  otherwise), ``'none'``, or a sequence of names from :data:`OPS`;
  ``crop_scale``: the resized crop's area range.

  Raises:
    ValueError: naming ``who``, for an unknown augmentation or a bad
      ``crop_scale``.
  """
  if isinstance(augment, str):
    if augment not in ("auto", "none"):
      raise ValueError(
          f"{who}: augment must be 'auto', 'none' or a sequence of names "
          f"from {list(OPS)}, got {augment!r}")
  else:
    augment = check_ops(augment, f"{who}: augment")
  crop_scale = tuple(crop_scale)
  if not (len(crop_scale) == 2 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool)
      for v in crop_scale) and 0 < crop_scale[0] <= crop_scale[1] <= 1):
    raise ValueError(f"{who}: crop_scale must be (lo, hi) with 0 < lo <= "
                     f"hi <= 1, got {crop_scale!r}")
  built = {}

  def augmenter(ctx) -> Augment:
    if ctx not in built:
      shape = ctx.info.input_shape
      ops = (default_ops(shape) if augment == "auto" else
             () if augment == "none" else augment)
      built[ctx] = pipeline(ops, shape, crop_scale=crop_scale,
                            normalize=ctx.normalize, who=f"{who}: augment")
    return built[ctx]

  return augmenter
