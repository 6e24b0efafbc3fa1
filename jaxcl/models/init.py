"""Weight initialisations by name, so a protocol can match its reference code.

Published continual-learning numbers (Mammoth, Avalanche, FACIL, GEM's code)
come from PyTorch, whose ``nn.Linear`` draws weights *and* biases from
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; flax's default is LeCun normal
weights and zero biases. On one-epoch, batch-10 protocols the difference is
visible in the final accuracy, so the initialisation is a config choice
(``config.model.init``) rather than a hidden constant.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

INITS = ("lecun_normal", "torch", "xavier_uniform", "he_normal")


def check(init: str) -> str:
  if init not in INITS:
    raise ValueError(f"unknown model init {init!r}; valid: {list(INITS)}")
  return init


def _torch_uniform(fan_in: int):
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def kernel_init(init: str, fan_in: int):
  """The weight initialiser ``init`` names (see :data:`INITS`)."""
  check(init)
  if init == "torch":
    return _torch_uniform(fan_in)
  return {"lecun_normal": nn.initializers.lecun_normal(),
          "xavier_uniform": nn.initializers.xavier_uniform(),
          "he_normal": nn.initializers.he_normal()}[init]


def dense(features: int, fan_in: int, init: str = "lecun_normal",
          name: str | None = None) -> nn.Dense:
  """An ``nn.Dense`` initialised as ``init`` names (see :data:`INITS`)."""
  if init == "torch":
    return nn.Dense(features, kernel_init=kernel_init(init, fan_in),
                    bias_init=_torch_uniform(fan_in), name=name)
  return nn.Dense(features, kernel_init=kernel_init(init, fan_in), name=name)
