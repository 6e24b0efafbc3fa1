"""Batch normalisation as PyTorch's ``BatchNorm1d`` / ``BatchNorm2d`` do it.

Ioffe & Szegedy (2015): in training mode each feature is normalised by
the batch's mean and (biased) variance,

.. math::  y = \\gamma \\frac{x - \\mu_B}{\\sqrt{\\sigma_B^2 + \\epsilon}}
   + \\beta,

and running averages are kept for evaluation mode,

.. math::  \\hat\\mu \\leftarrow m \\hat\\mu + (1 - m)\\mu_B, \\qquad
   \\hat\\sigma^2 \\leftarrow m \\hat\\sigma^2
   + (1 - m)\\frac{n}{n - 1}\\sigma_B^2,

with ``n`` the values per feature in the batch. PyTorch keeps the
*unbiased* variance ``n / (n - 1) σ_B²`` in its running average; flax's
``nn.BatchNorm`` keeps the biased one, so a model trained by flax's
evaluates with variances ``(n - 1) / n`` of PyTorch's (10 % smaller on
batches of 10, the online protocols' size). This module is flax's
``nn.BatchNorm`` with PyTorch's running variance: the same variables
(``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``) and
auto-name (``BatchNorm_<i>``), so checkpoints carry over, and the same
``mask`` keyword (the rows the statistics count).

``momentum`` is flax's (the running average's weight ``m``; PyTorch's
``momentum=0.1`` is ``0.9``). Statistics are reduced in float32 whatever
the input's dtype; the output has the input's and parameters' promoted
dtype, as flax's does.

References:
  Ioffe & Szegedy, `Batch normalization: accelerating deep network
  training by reducing internal covariate shift
  <https://arxiv.org/abs/1502.03167>`_, ICML 2015.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """Batch norm over every axis but the last, PyTorch's running variance.

  Attributes:
    use_running_average: evaluation mode (the running statistics).
    momentum: the running averages' decay (flax's convention).
    epsilon: added to the variance.
    use_affine: learn a scale and bias (PyTorch's ``affine``); False
      leaves the normalised values, for a conditional batch norm whose
      scale and bias come from elsewhere (TwF's per-task ones).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  use_affine: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None
               ) -> jax.Array:
    """``mask`` (bool, broadcastable to ``x``): the values the batch
    statistics count (training mode); None counts every one."""
    f = x.shape[-1]
    if self.use_affine:
      scale = self.param("scale", nn.initializers.ones, (f,), jnp.float32)
      bias = self.param("bias", nn.initializers.zeros, (f,), jnp.float32)
    else:
      scale, bias = jnp.ones((f,), jnp.float32), jnp.zeros((f,),
                                                           jnp.float32)
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((f,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((f,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      w = (jnp.ones(x.shape, jnp.float32) if mask is None
           else jnp.broadcast_to(mask, x.shape).astype(jnp.float32))
      n = jnp.sum(w, axis=axes)
      mean = jnp.sum(xf * w, axis=axes) / n
      var = jnp.sum(jnp.square(xf - mean) * w, axis=axes) / n
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = (m * ra_var.value
                        + (1 - m) * var * n / jnp.maximum(n - 1, 1))
    dtype = jnp.promote_types(x.dtype, scale.dtype)
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32)
            + bias.astype(jnp.float32)).astype(dtype)
