"""A fully connected variational auto-encoder (the DGR generator).

As in van de Ven et al.'s deep generative replay baselines: an MLP encoder
(``hidden`` widths, ReLU) to the mean and log-variance of a diagonal
Gaussian posterior over ``latent`` dimensions, a mirrored MLP decoder to
Bernoulli logits of every pixel, and a standard normal prior. The loss per
example, normalised per input value as in their code, is

.. math::
   \\mathcal{L}(x) = \\frac{1}{D}\\Big[\\sum_{d=1}^{D}
     \\mathrm{BCE}(\\sigma(\\hat{x}_d), x_d)
     + \\mathrm{KL}\\big(\\mathcal{N}(\\mu, \\sigma^2) \\,\\|\\,
       \\mathcal{N}(0, I)\\big)\\Big],
   \\quad \\mathrm{KL} = -\\tfrac12 \\sum_j (1 + \\log\\sigma_j^2 - \\mu_j^2
     - \\sigma_j^2).

This module has no ``build`` function on purpose: it is not a classifier
and is not selectable as ``config.model.name``; strategies use it directly.

References:
  Kingma & Welling, `Auto-encoding variational Bayes
  <https://arxiv.org/abs/1312.6114>`_, 2014.
  van de Ven, Siegelmann & Tolias, `Brain-inspired replay for continual
  learning with artificial neural networks
  <https://doi.org/10.1038/s41467-020-17866-2>`_, 2020.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = ["VAE", "vae_loss", "sample"]


class VAE(nn.Module):
  """MLP VAE over inputs of ``input_shape`` (values in [0, 1])."""
  input_shape: tuple[int, ...]
  hidden: Sequence[int] = (400, 400)
  latent: int = 100

  def setup(self):
    self.enc = [nn.Dense(w) for w in self.hidden]
    self.mu = nn.Dense(self.latent)
    self.logvar = nn.Dense(self.latent)
    self.dec = [nn.Dense(w) for w in reversed(self.hidden)]
    self.out = nn.Dense(math.prod(self.input_shape))

  def encode(self, x):
    h = x.reshape(x.shape[0], -1)
    for layer in self.enc:
      h = nn.relu(layer(h))
    return self.mu(h), self.logvar(h)

  def decode(self, z):
    """Bernoulli logits, shaped like the input."""
    h = z
    for layer in self.dec:
      h = nn.relu(layer(h))
    return self.out(h).reshape((z.shape[0],) + tuple(self.input_shape))

  def __call__(self, x, key):
    """Returns ``(reconstruction logits, mu, logvar)``."""
    mu, logvar = self.encode(x)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
    return self.decode(z), mu, logvar


def vae_loss(recon_logits: jax.Array, x: jax.Array, mu: jax.Array,
             logvar: jax.Array) -> jax.Array:
  """Per-example negative ELBO divided by the number of input values."""
  b = x.shape[0]
  d = math.prod(x.shape[1:])
  bce = optax.sigmoid_binary_cross_entropy(recon_logits.reshape(b, -1),
                                           x.reshape(b, -1)).sum(-1)
  kl = -0.5 * jnp.sum(1 + logvar - mu ** 2 - jnp.exp(logvar), axis=-1)
  return (bce + kl) / d


def sample(vae: VAE, params, key: jax.Array, n: int) -> jax.Array:
  """``n`` samples (pixel probabilities) from the prior through the decoder."""
  z = jax.random.normal(key, (n, vae.latent))
  return jax.nn.sigmoid(vae.apply({"params": params}, z, method=VAE.decode))
