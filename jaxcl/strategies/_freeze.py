"""Freezing a part of the parameters from a point in the stream on (LFL's
output layer, Freezing's and CWR*'s backbone, latent replay's and
ExStream's layers below the latent layer).

A part is frozen twice over: its gradient is zeroed in ``update_grads``
(PyTorch's ``requires_grad=False``, so chained members see no gradient
there), and its weights are restored from a stored copy in
``project_params``, since momentum and weight decay move a parameter whose
gradient is zero. ``on`` is a traced bool scalar (the strategy state's
flag), so the program is the same before and after the part freezes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["require_part", "zero_part", "restore_part", "restore_masked",
           "zero_all", "restore_all", "zero_grads_once_frozen",
           "restore_once_frozen"]


def require_part(method: str, params: Any, part: str, what: str) -> None:
  """Raises unless ``params`` has a top-level ``part`` (at ``init``)."""
  if not (isinstance(params, dict) and part in params):
    names = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(f"{method} freezes the model's {what}, the params named "
                     f"{part!r}; this model's params are {names}")


def zero_part(grads: dict, part: str, on: jax.Array) -> dict:
  """``grads`` with ``grads[part]`` zero where ``on``."""
  return {**grads, part: jax.tree.map(lambda g: jnp.where(on, 0.0, g),
                                      grads[part])}


def restore_part(params: dict, saved: dict, part: str,
                 on: jax.Array) -> dict:
  """``params`` with ``params[part]`` set to ``saved[part]`` where ``on``."""
  return {**params, part: jax.tree.map(lambda p, o: jnp.where(on, o, p),
                                       params[part], saved[part])}


def restore_masked(params: Any, saved: Any, mask: Any, on: jax.Array) -> Any:
  """``params`` with every leaf whose (static, Python bool) ``mask`` leaf
  is True set to ``saved``'s leaf where ``on``; for a part that is not a
  top-level name (the layers below a latent layer). ``saved`` has
  ``params``' structure; its unmasked leaves are never read."""
  return jax.tree.map(lambda p, s, m: jnp.where(on, s, p) if m else p,
                      params, saved, mask)


def zero_all(grads: Any, on: jax.Array) -> Any:
  """Every gradient zero where ``on`` (the whole model frozen: FeCAM and
  RanPAC after their first experience)."""
  return jax.tree.map(lambda g: jnp.where(on, 0.0, g), grads)


def restore_all(params: Any, saved: Any, on: jax.Array) -> Any:
  """``params`` replaced by ``saved`` where ``on``."""
  return jax.tree.map(lambda p, o: jnp.where(on, o, p), params, saved)


# The two hooks of a whole model frozen from a point on, for a strategy
# state with ``params`` (the stored copy) and ``frozen`` (a bool scalar):
# FeCAM's and RanPAC's (``adapt_first``) after the first experience.


def zero_grads_once_frozen(ctx, sstate, grads: Any, params: Any, batch: dict,
                           key: jax.Array) -> Any:
  """An ``update_grads``: every gradient zero once ``sstate.frozen``."""
  del ctx, params, batch, key
  return zero_all(grads, sstate.frozen)


def restore_once_frozen(ctx, sstate, params: Any) -> Any:
  """A ``project_params``: ``params`` set back to ``sstate.params`` once
  ``sstate.frozen``."""
  del ctx
  return restore_all(params, sstate.params, sstate.frozen)

