"""DualNet's model: a slow learner whose features a fast learner modulates.

Pham, Liu & Hoi (2021) split the network in two. The *slow learner* is a
backbone whose stages give features :math:`h_1 .. h_L`; it learns a
general representation (by self-supervision, in
:mod:`jaxcl.strategies.dualnet`). The *fast learner* adapts those features
to the labels: starting from the input, each of its layers :math:`g_l`
transforms the previous modulated features and gates the slow learner's
stage feature with the result (the element-wise product of the authors'
``MaskNet``),

.. math::
   m_0 = x, \\qquad m_l = g_l(m_{l-1}) \\odot h_l \\quad (l = 1..L),
   \\qquad \\text{logits} = W\\,\\mathrm{pool}(m_L) + b,

so the classifier reads the slow features as the fast learner reweights
them, channel by channel and place by place.

Two slow learners:

* ``backbone='mlp'``: ``Dense -> ReLU`` layers of ``widths``; each is a
  stage, and :math:`g_l` is ``Dense -> BatchNorm -> ReLU`` to the same
  width (the fully connected form of the convolutional gate below, for
  MNIST-sized data; the paper and its code give only the convolutional
  one). The batch norm matters: without it each gate multiplies the
  scale of the one before, the outputs grow as a product of the layers,
  and at the authors' learning rate (0.03) a Split MNIST run's weights
  grew a hundredfold in the third experience and the loss became NaN.
* ``backbone='resnet18'``: the authors' ``MaskNet18``: a 3x3 stem with
  batch norm and a 3x3 / 2 max-pool, then ResNet-18's four stages (base
  ``width``; the authors use 64, Avalanche's default is 20). Each
  :math:`g_l` is ``Conv3x3 (bias) -> BatchNorm -> ReLU -> MaxPool 2x2``
  (ceil mode, so its output matches the stage's size for any input
  size), with the stage's channels.

Calls (the :class:`jaxcl.models.Classifier` signature, plus ``slow``):
``features=True`` returns :math:`\\mathrm{pool}(m_L)`, what the head
reads; ``slow=True`` returns :math:`\\mathrm{pool}(h_L)`, the slow
learner's own features (the self-supervised projector's input), without
running the fast learner. Parameters: ``slow``, ``fast`` and ``head``
(the strategy tells the learners apart by these names).

References:
  Pham, Liu & Hoi, `DualNet: Continual Learning, Fast and Slow
  <https://arxiv.org/abs/2110.00175>`_, NeurIPS 2021 (code
  ``phquang/DualNet``, ``model/common.py``: ``MaskNet18``); Avalanche's
  ``avalanche/models/dualnet_model.py``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.models import init as inits
from jaxcl.models.batch_norm import BatchNorm
from jaxcl.models.conv import Conv
from jaxcl.models.resnet import BasicBlock, _conv3x3

__all__ = ["DualNet", "build", "BACKBONES"]

BACKBONES = ("mlp", "resnet18")


def _max_pool_ceil(h: jnp.ndarray, window: int, stride: int,
                   pad: int = 0) -> jnp.ndarray:
  """PyTorch's ``MaxPool2d(window, stride, pad, ceil_mode=True)`` on NHWC:
  the far side padded (with -inf) so a last, partial window counts."""
  pads = []
  for n in h.shape[1:3]:
    out = -(-(n + 2 * pad - window) // stride) + 1
    far = max((out - 1) * stride + window - n - pad, pad)
    pads.append((pad, far))
  return nn.max_pool(h, (window, window), (stride, stride), padding=pads)


class _SlowMLP(nn.Module):
  widths: Sequence[int]

  @nn.compact
  def __call__(self, x, train, mask):
    del train, mask
    h, out = x.reshape(x.shape[0], -1), []
    for w in self.widths:
      h = nn.relu(inits.dense(w, h.shape[-1])(h))
      out.append(h)
    return out


class _FastMLP(nn.Module):
  @nn.compact
  def __call__(self, x, stages, train, mask):
    m_ = None if mask is None else mask[:, None]
    m = x.reshape(x.shape[0], -1)
    for h in stages:
      g = inits.dense(h.shape[-1], m.shape[-1])(m)
      g = nn.relu(BatchNorm(use_running_average=not train,
                            momentum=0.9)(g, mask=m_))
      m = g * h
    return m


class _SlowResNet(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x, train, mask):
    m = None if mask is None else mask[:, None, None, None]
    h = _conv3x3(self.width, 1, nn.linear.default_kernel_init)(x)
    h = nn.relu(BatchNorm(use_running_average=not train,
                          momentum=0.9)(h, mask=m))
    h = nn.max_pool(h, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    out = []
    for i, mult in enumerate((1, 2, 4, 8)):
      for j in range(2):
        stride = 2 if (i > 0 and j == 0) else 1
        h = BasicBlock(self.width * mult, stride)(h, train, m)
      out.append(h)
    return out


class _FastConv(nn.Module):
  @nn.compact
  def __call__(self, x, stages, train, mask):
    m_ = None if mask is None else mask[:, None, None, None]
    m = x
    for h in stages:
      g = Conv(h.shape[-1], (3, 3), padding=((1, 1), (1, 1)))(m)
      g = nn.relu(BatchNorm(use_running_average=not train,
                            momentum=0.9)(g, mask=m_))
      m = _max_pool_ceil(g, 2, 2) * h
    return m


class DualNet(nn.Module):
  """Slow learner, fast learner and a linear head (see the module
  docstring). ``mask`` (bool ``(batch,)``, training mode): the rows the
  batch statistics count."""
  num_classes: int
  backbone: str = "mlp"
  widths: Sequence[int] = (400, 400)
  width: int = 20

  @nn.compact
  def __call__(self, x: jnp.ndarray, task: jnp.ndarray | None = None,
               train: bool = False, features: bool = False,
               mask: jnp.ndarray | None = None,
               slow: bool = False) -> jnp.ndarray:
    del task  # one head: a task-incremental stream masks its logits
    conv = self.backbone == "resnet18"
    pool = (lambda h: jnp.mean(h, axis=(1, 2))) if conv else (lambda h: h)
    slow_net = (_SlowResNet(self.width, name="slow") if conv else
                _SlowMLP(tuple(self.widths), name="slow"))
    stages = slow_net(x, train, mask)
    if slow:
      return pool(stages[-1])
    fast_net = _FastConv(name="fast") if conv else _FastMLP(name="fast")
    f = pool(fast_net(x, stages, train, mask))
    if features:
      return f
    return inits.dense(self.num_classes, f.shape[-1], name="head")(f)


def build(num_classes: int, num_heads: int = 1, backbone: str = "mlp",
          widths: Sequence[int] = (400, 400), width: int = 20) -> DualNet:
  """DualNet's model (``config.model.name = 'dualnet'``, kwargs from
  ``config.model.dualnet``): ``backbone`` ``'mlp'`` (hidden ``widths``)
  or ``'resnet18'`` (base ``width``; images ``(H, W, C)``)."""
  if num_heads != 1:
    raise ValueError(
        f"dualnet has a single head; got num_heads={num_heads} (set "
        "model.multi_head=False: a task-incremental stream then masks the "
        "head's logits to the task's classes, as the authors' task-aware "
        "code does)")
  if backbone not in BACKBONES:
    raise ValueError(f"dualnet: unknown backbone {backbone!r}; valid: "
                     f"{list(BACKBONES)}")
  # models.build has checked that each width is a whole number >= 1.
  widths = tuple(int(w) for w in widths)
  if backbone == "mlp" and not widths:
    raise ValueError("dualnet: the mlp backbone needs at least one hidden "
                     "width, got ()")
  checks.whole("dualnet: width", width, 1)
  return DualNet(num_classes=num_classes, backbone=backbone, widths=widths,
                 width=int(width))
