"""Progressive neural network: one MLP column per task, lateral connections.

Rusu et al. (2016), eq. 1: layer ``i`` of column ``k`` is

.. math::  h_i^{(k)} = f\\big(W_i^{(k)} h_{i-1}^{(k)}
           + \\textstyle\\sum_{j<k} U_i^{(k:j)} h_{i-1}^{(j)}\\big)

with ``f`` = ReLU on hidden layers and the identity on the output layer
(each column has its own classifier). All ``num_columns`` columns are
allocated at init and stacked along a leading axis, so the parameter pytree
has one fixed shape for the whole stream (nothing recompiles between
experiences); a column that no task has trained yet is simply unused. The
lateral weights ``U`` are ``(K, K, in, out)``, and a constant strictly
lower-triangular mask keeps ``j < k`` (column ``k`` reads only earlier
columns). The example's task id picks its column.

The freezing of earlier columns is the strategy's job
(:mod:`jaxcl.strategies.progressive`): every leaf's axis 0 is the column.

References:
  Rusu et al., `Progressive Neural Networks
  <https://arxiv.org/abs/1606.04671>`_, 2016.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Progressive(nn.Module):
  """All columns at once; see the module docstring."""
  num_classes: int
  num_columns: int
  widths: Sequence[int] = (100, 100)

  @nn.compact
  def __call__(self, x: jax.Array, task: jax.Array | None = None,
               train: bool = False, features: bool = False) -> jax.Array:
    del train
    k_n = self.num_columns
    b = x.shape[0]
    if task is None:
      task = jnp.zeros((b,), jnp.int32)
    task = jnp.clip(task.astype(jnp.int32), 0, k_n - 1)
    lateral = jnp.asarray(np.tril(np.ones((k_n, k_n), np.float32), -1))
    kinit = nn.initializers.lecun_normal(batch_axis=(0,))
    kinit_lat = nn.initializers.lecun_normal(batch_axis=(0, 1))
    h0 = x.reshape(b, -1)
    h = None  # (K, B, width) activations of every column
    sizes = list(self.widths) + [self.num_classes]
    for i, w in enumerate(sizes):
      last = i == len(sizes) - 1
      name = "head" if last else f"layer_{i}"
      d_in = h0.shape[-1] if h is None else h.shape[-1]
      kernel = self.param(f"{name}_W", kinit, (k_n, d_in, w))
      bias = self.param(f"{name}_b", nn.initializers.zeros, (k_n, w))
      if h is None:
        pre = jnp.einsum("bi,kio->kbo", h0, kernel)
      else:
        u = self.param(f"{name}_U", kinit_lat, (k_n, k_n, d_in, w))
        pre = (jnp.einsum("kbi,kio->kbo", h, kernel)
               + jnp.einsum("jbi,kjio->kbo", h,
                            u * lateral[:, :, None, None]))
      pre = pre + bias[:, None, :]
      if last:
        if features:
          break
        out = pre
      else:
        h = nn.relu(pre)
    if features:
      return jnp.take_along_axis(h, task[None, :, None], axis=0)[0]
    return jnp.take_along_axis(out, task[None, :, None], axis=0)[0]


def build(num_classes: int, num_heads: int = 1, *,
          widths: Sequence[int] = (100, 100),
          num_columns: int = 0) -> Progressive:
  """Builds a :class:`Progressive` network.

  Args:
    num_classes: outputs per column.
    num_heads: used as ``num_columns`` when that is 0
      (``model.multi_head=True`` gives one column per task).
    widths: hidden widths of each column.
    num_columns: columns (one per task).
  """
  cols = num_columns or num_heads
  if cols < 1:
    raise ValueError(f"num_columns must be >= 1, got {cols}")
  if not widths:
    raise ValueError("widths must name at least one hidden layer")
  return Progressive(num_classes=num_classes, num_columns=cols,
                     widths=tuple(int(w) for w in widths))
