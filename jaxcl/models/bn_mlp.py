"""GDumb's MNIST MLP: bias-free linear layers, each followed by batch norm.

Prabhu et al. (2020) train GDumb on MNIST with an MLP whose blocks are
``Linear(bias=False) -> BatchNorm1d -> ReLU`` (width 400, two hidden
layers) and whose last block is ``Linear(bias=False) -> BatchNorm1d``
without activation: batch norm is applied to the logits too (their
``FCBlock`` / ``FinalBlock`` with the default ``--bn``, affine, ``eps =
1e-6``). PyTorch's batch-norm momentum 0.1 is flax's ``momentum = 0.9``.
Linear weights use PyTorch's ``nn.Linear`` initialisation
(``U(+-1/sqrt(fan_in))``), as in their code.

The module has the :class:`jaxcl.models.Classifier` call signature
(``x, task, train, features``); ``features=True`` returns the last hidden
layer. Batch statistics live in the ``batch_stats`` collection (the model
state), updated when ``train=True``.

References:
  Prabhu, Torr & Dokania, `GDumb: a simple approach that questions our
  progress in continual learning
  <https://doi.org/10.1007/978-3-030-58536-5_31>`_, ECCV 2020 (code:
  github.com/drimpossible/GDumb, ``src/models/mnist/mlp.py``,
  ``src/models/layers.py``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

import jax

from jaxcl.models.batch_norm import BatchNorm


def _torch_kernel(fan_in: int):
  """PyTorch ``nn.Linear`` weights: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class BNMLP(nn.Module):
  """``(Dense(no bias) -> BatchNorm -> ReLU) x len(widths)``, then
  ``Dense(no bias) -> BatchNorm`` (``final_bn``) to ``num_classes``."""
  num_classes: int
  widths: Sequence[int] = (400, 400)
  final_bn: bool = True
  eps: float = 1e-6
  momentum: float = 0.9   # flax convention (PyTorch's 0.1)

  def _block(self, h, width, train, mask, name):
    # Kernel only: a bias before batch norm is cancelled by its mean.
    h = nn.Dense(width, use_bias=False, kernel_init=_torch_kernel(h.shape[-1]),
                 name=f"{name}_dense")(h)
    return BatchNorm(use_running_average=not train, momentum=self.momentum,
                     epsilon=self.eps, name=f"{name}_bn")(h, mask=mask)

  @nn.compact
  def __call__(self, x: jnp.ndarray, task: jnp.ndarray | None = None,
               train: bool = False, features: bool = False,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """``mask`` (bool ``(batch,)``, training mode): the rows the batch
    statistics count, as a PyTorch batch without the padding rows would."""
    del task  # single head
    h = x.reshape(x.shape[0], -1)
    m = None if mask is None else mask[:, None]
    for i, w in enumerate(self.widths):
      h = nn.relu(self._block(h, w, train, m, f"hidden{i}"))
    if features:
      return h
    if self.final_bn:
      return self._block(h, self.num_classes, train, m, "final")
    return nn.Dense(self.num_classes, use_bias=False,
                    kernel_init=_torch_kernel(h.shape[-1]),
                    name="final_dense")(h)


def build(num_classes: int, num_heads: int = 1,
          widths: Sequence[int] = (400, 400), final_bn: bool = True,
          eps: float = 1e-6) -> BNMLP:
  """GDumb's MLP (``config.model.name = 'bn_mlp'``, kwargs from
  ``config.model.bn_mlp``)."""
  if num_heads != 1:
    raise ValueError(f"bn_mlp has a single head; got num_heads={num_heads}")
  # models.build has checked that each width is a whole number >= 1.
  widths = tuple(int(w) for w in widths)
  if not widths:
    raise ValueError("bn_mlp needs at least one hidden width, got ()")
  if not eps > 0:
    raise ValueError(f"bn_mlp eps must be > 0, got {eps}")
  return BNMLP(num_classes=num_classes, widths=widths, final_bn=final_bn,
               eps=float(eps))
