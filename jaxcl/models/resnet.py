"""Residual networks for 32x32 images.

* :class:`ResNet18`: the reduced ResNet-18 of Lopez-Paz & Ranzato (2017,
  GEM): three times fewer feature maps than ResNet-18 (``width=20``
  instead of 64) and a 3x3 stem without max-pooling, as used for Split
  CIFAR in GEM, A-GEM and Mammoth (Mammoth's ``seq-cifar10`` runs
  ``width=64``).
* :class:`CifarResNet`: He et al.'s (2016, Sec. 4.2) CIFAR family of depth
  ``6n + 2``: a 3x3 stem of 16 channels, three stages of ``n`` basic
  blocks at 16, 32 and 64 channels, global average pooling. ``resnet32``
  (``n = 5``) is the backbone of FACIL's and PyCIL's CIFAR-100
  class-incremental results (iCaRL, LUCIR, BiC, EEIL, ...).

Every 3x3 convolution pads one pixel on each side, as PyTorch's
``padding=1`` does: flax's ``'SAME'`` pads a stride-2 convolution of an
even-sized input on the far side only, which moves its output grid one
pixel off the strided 1x1 shortcut's (inputs ``2i - 1 .. 2i + 1`` against
the shortcut's ``2i`` in PyTorch; ``2i .. 2i + 2`` under ``'SAME'``).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.models.batch_norm import BatchNorm
from jaxcl.models.conv import Conv

# The shortcut of a block that changes the resolution or the width:
# 'conv' is a strided 1x1 convolution + batch norm (He et al.'s option B;
# FACIL's resnet32, and every ResNet-18 here), 'pad' the strided identity
# with the new channels zero (option A, parameter-free; PyCIL's resnet32).
SHORTCUTS = ("conv", "pad")

# The collection the ResNets sow their pre-activation stage maps into (the
# stem's and each stage's last block's, in call order): what TwF distils,
# as Mammoth's ResNets return with ``returnt='full'`` and
# ``set_return_prerelu(True)``.
PREACT = "preact"

# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu') of FACIL's
# and PyCIL's CIFAR ResNets: N(0, 2 / fan_out), not truncated.
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv3x3(features: int, stride: int, kernel_init: Callable[..., Any]):
  return Conv(features, (3, 3), (stride, stride), padding=((1, 1), (1, 1)),
              use_bias=False, kernel_init=kernel_init)


class BasicBlock(nn.Module):
  """``relu(shortcut(x) + BN(conv(relu(BN(conv(x))))))``; without the
  outer ReLU when ``relu`` is False (a network's last block, see
  ``last_relu``)."""
  features: int
  stride: int = 1
  shortcut: str = "conv"
  kernel_init: Callable[..., Any] = nn.linear.default_kernel_init
  relu: bool = True
  # Sow the pre-activation sum (``shortcut(x) + BN(...)``) into the
  # "preact" collection: a stage's last block does, for the methods that
  # distil stage feature maps (TwF). Free unless "preact" is mutable.
  sow_preact: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    norm = lambda h: BatchNorm(use_running_average=not train,
                               momentum=0.9)(h, mask=mask)
    y = _conv3x3(self.features, self.stride, self.kernel_init)(x)
    y = nn.relu(norm(y))
    y = norm(_conv3x3(self.features, 1, self.kernel_init)(y))
    if self.stride != 1 or x.shape[-1] != self.features:
      if self.shortcut == "conv":
        x = Conv(self.features, (1, 1), (self.stride, self.stride),
                 use_bias=False, kernel_init=self.kernel_init)(x)
        x = norm(x)
      else:
        x = x[:, ::self.stride, ::self.stride, :]
        x = jnp.pad(x, ((0, 0),) * 3 + ((0, self.features - x.shape[-1]),))
    if self.sow_preact and not self.is_initializing():
      self.sow(PREACT, "map", x + y)
    return nn.relu(x + y) if self.relu else x + y


def _stem(module, h, width, train, mask, kernel_init):
  """The 3x3 stem of ``module`` (its compact ``__call__``), which sows its
  pre-activation map as ``stem``."""
  h = _conv3x3(width, 1, kernel_init)(h)
  h = BatchNorm(use_running_average=not train, momentum=0.9)(h, mask=mask)
  if not module.is_initializing():  # not a variable of the model state
    module.sow(PREACT, "stem", h)
  return nn.relu(h)


class ResNet18(nn.Module):
  """ResNet-18 (2 blocks per stage) with ``width`` base channels;
  ``last_relu=False`` leaves out the last block's ReLU, so the features
  can be negative (LUCIR's cosine head reads them so, in the authors'
  and FACIL's code)."""
  width: int = 20
  last_relu: bool = True

  def __post_init__(self):
    checks.flag("resnet last_relu", self.last_relu)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """``mask`` (bool ``(batch,)``, training mode): the rows the batch
    statistics count, as a PyTorch batch without the padding rows would."""
    m = None if mask is None else mask[:, None, None, None]
    h = _stem(self, x, self.width, train, m, nn.linear.default_kernel_init)
    for i, mult in enumerate((1, 2, 4, 8)):
      for j in range(2):
        stride = 2 if (i > 0 and j == 0) else 1
        last = (i, j) == (3, 1)
        h = BasicBlock(self.width * mult, stride,
                       relu=self.last_relu or not last,
                       sow_preact=j == 1)(h, train, m)
    return jnp.mean(h, axis=(1, 2))


class CifarResNet(nn.Module):
  """He et al.'s CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44,
  56, 110), ``width`` channels in the first stage (16 in the paper).

  Convolutions start from He et al.'s N(0, 2 / fan_out), as FACIL's and
  PyCIL's do (the head keeps ``model.init``). ``last_relu=False`` leaves
  out the last block's ReLU, as iCaRL's and LUCIR's authors' code does.
  """
  depth: int = 32
  width: int = 16
  shortcut: str = "conv"
  last_relu: bool = True

  def __post_init__(self):
    if not isinstance(self.depth, int) or self.depth < 8 or \
        (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth={self.depth!r}: must be 6n + 2 "
                       "with n >= 1 (20, 32, 44, 56, 110)")
    checks.flag("resnet last_relu", self.last_relu)
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f"CIFAR ResNet shortcut={self.shortcut!r}: valid "
                       f"{list(SHORTCUTS)} ('conv': 1x1 convolution + batch "
                       "norm, as FACIL; 'pad': zero channels, as PyCIL)")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """``mask``: as :class:`ResNet18`'s."""
    m = None if mask is None else mask[:, None, None, None]
    h = _stem(self, x, self.width, train, m, he_fan_out)
    n = (self.depth - 2) // 6
    for i, mult in enumerate((1, 2, 4)):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        last = (i, j) == (2, n - 1)
        h = BasicBlock(self.width * mult, stride, self.shortcut, he_fan_out,
                       relu=self.last_relu or not last,
                       sow_preact=j == n - 1)(h, train, m)
    return jnp.mean(h, axis=(1, 2))
