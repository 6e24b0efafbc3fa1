"""Multi-layer perceptron backbone."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten, then ``Dense -> ReLU`` per width (e.g. 784-400-400)."""
  widths: Sequence[int] = (400, 400)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # no dropout / batch norm
    h = x.reshape(x.shape[0], -1)
    for w in self.widths:
      h = nn.relu(nn.Dense(w)(h))
    return h
