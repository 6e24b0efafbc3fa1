"""A backbone followed by one head, or one head per task."""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.models import init as inits

# Head layers by name (``config.model.head``).
HEADS = ("linear", "cosine")


def check_head(head: str) -> str:
  if head not in HEADS:
    raise ValueError(f"unknown model head {head!r}; valid: {list(HEADS)}")
  return head


def l2_normalise(x: jnp.ndarray, axis: int = -1,
                 eps: float = 1e-12) -> jnp.ndarray:
  """``x / max(‖x‖, eps)`` along ``axis`` (PyTorch's ``F.normalize``).

  The norm is clamped before the square root, so an all-zero vector (a
  ReLU backbone on a zero padding row) has a zero gradient, not NaN.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def takes_mask(module: nn.Module) -> bool:
  """Whether ``module``'s ``__call__`` takes a ``mask`` keyword: the
  ``(batch,)`` rows its batch statistics count (padding excluded)."""
  return "mask" in inspect.signature(type(module).__call__).parameters


class CosineDense(nn.Module):
  """Cosine normalisation (Hou et al. 2019, eq. 4): ``σ ⟨w̄_c, x̄⟩``.

  Each output is the cosine between the input and the class's weight
  vector, times one learned scale ``σ`` (``sigma``, initialised to 1 as in
  the authors' code). Variables: ``kernel`` (in, out), ``sigma`` ().
  """
  features: int
  initializer: str = "lecun_normal"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", inits.kernel_init(self.initializer, fan_in),
                        (fan_in, self.features))
    sigma = self.param("sigma", nn.initializers.ones, ())
    return sigma * (l2_normalise(x) @ l2_normalise(kernel, axis=0))


class Classifier(nn.Module):
  """Backbone + linear (or cosine) head(s).

  With ``num_heads > 1`` the head layer has ``num_heads * num_classes``
  outputs and the ``num_classes`` logits of each example's task are returned
  (multi-head, task-incremental); the task id must then be given.
  """
  backbone: nn.Module
  num_classes: int
  num_heads: int = 1
  initializer: str = "lecun_normal"  # the head's; see jaxcl.models.init.INITS
  head: str = "linear"  # linear | cosine (CosineDense; LUCIR)

  @nn.compact
  def __call__(self, x: jnp.ndarray, task: jnp.ndarray | None = None,
               train: bool = False, features: bool = False,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    # ``mask``: the rows a batch-norm backbone's statistics count (see
    # jaxcl.state.Context.apply); only passed to a backbone that takes it.
    if mask is not None and takes_mask(self.backbone):
      h = self.backbone(x, train=train, mask=mask)
    else:
      h = self.backbone(x, train=train)
    if features:
      return h
    n = self.num_heads * self.num_classes
    if self.head == "cosine":
      layer = CosineDense(n, self.initializer, name="head")
    else:
      layer = inits.dense(n, h.shape[-1], self.initializer, name="head")
    logits = layer(h)
    if self.num_heads == 1:
      return logits
    logits = logits.reshape(x.shape[0], self.num_heads, self.num_classes)
    if task is None:
      raise ValueError("a multi-head model needs the task id")
    task = jnp.clip(task, 0, self.num_heads - 1)
    return jnp.take_along_axis(logits, task[:, None, None], axis=1)[:, 0]
