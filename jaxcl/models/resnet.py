"""Reduced ResNet-18 for 32x32 images (Lopez-Paz & Ranzato 2017, GEM).

The GEM paper's "reduced ResNet18" has three times fewer feature maps than
ResNet-18 (``width=20`` instead of 64) and a 3x3 stem without max-pooling,
as used for Split CIFAR in GEM, A-GEM and Mammoth.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxcl.models.conv import Conv


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    norm = lambda h: nn.BatchNorm(use_running_average=not train,
                                  momentum=0.9)(h, mask=mask)
    y = Conv(self.features, (3, 3), (self.stride, self.stride),
             use_bias=False)(x)
    y = nn.relu(norm(y))
    y = Conv(self.features, (3, 3), use_bias=False)(y)
    y = norm(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), (self.stride, self.stride),
               use_bias=False)(x)
      x = norm(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 (2 blocks per stage) with ``width`` base channels."""
  width: int = 20

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """``mask`` (bool ``(batch,)``, training mode): the rows the batch
    statistics count, as a PyTorch batch without the padding rows would."""
    m = None if mask is None else mask[:, None, None, None]
    h = Conv(self.width, (3, 3), use_bias=False)(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not train,
                             momentum=0.9)(h, mask=m))
    for i, mult in enumerate((1, 2, 4, 8)):
      for j in range(2):
        stride = 2 if (i > 0 and j == 0) else 1
        h = BasicBlock(self.width * mult, stride)(h, train, m)
    return jnp.mean(h, axis=(1, 2))
