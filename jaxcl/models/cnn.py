"""A small convolutional backbone for 28x28 / 32x32 images."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxcl.models.conv import Conv


class CNN(nn.Module):
  """``[conv3x3 -> ReLU -> maxpool2]`` per channel count, then one Dense."""
  channels: Sequence[int] = (32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    h = x
    for c in self.channels:
      h = nn.relu(Conv(c, (3, 3))(h))
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = h.reshape(h.shape[0], -1)
    return nn.relu(nn.Dense(self.hidden)(h))
