"""A replay memory's arguments and initial state, for the strategies that
keep their own memory of ``mem_size`` examples and replay ``batch_size`` of
them each step (DER, FDR, HAL, GSS, STAR, CLS-ER, LiDER, X-DER; RAR and the
strategies that draw other sizes, A-GEM-R, CaSpeR, MER, MIR and ASER, use
:func:`init_memory` alone; ER-ACE, ER-AML, the ER tricks, AER/ABS, CoPE,
PuriDivER and SCR, whose states start otherwise, :func:`replay_sizer`
alone, as the exemplar strategies do through
:func:`jaxcl.strategies._class_incremental.exemplar_sizer`).

``batch_size`` 0 means the training batch size, known only at ``init``
(from the stream), so the check that the replayed rows fit the memory runs
there as well as at each trace (:func:`jaxcl.buffers.replay_size`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.train import init_variables

__all__ = ["replay_sizer", "init_memory", "add_replay_grads"]


def replay_sizer(name: str, mem_size: int, batch_size: int
                 ) -> Callable[[Any], int]:
  """Checks ``mem_size`` and ``batch_size`` (host side, when the strategy
  is built) and returns ``replay_size(ctx)``: the rows replayed per step,
  ``batch_size`` or the training batch size when it is 0.

  Raises:
    ValueError: naming strategy ``name``: a non-positive ``mem_size`` or a
      negative ``batch_size``; ``replay_size`` raises when the rows it
      gives are more than ``mem_size``.
  """
  buffers.check_capacity(mem_size, f"{name}: mem_size")
  checks.whole(f"{name}: batch_size", batch_size, 0,
               "0: the training batch size")

  def replay_size(ctx) -> int:
    return buffers.replay_size(name, batch_size, mem_size,
                               ctx.info.batch_size)

  return replay_size


def init_memory(ctx, key: jax.Array, mem_size: int,
                replay_size: Callable[[Any], int] | None = None
                ) -> tuple[buffers.Memory, Any, jax.Array]:
  """``(memory, model_state, key)`` to start a replay strategy's state: an
  empty memory of ``mem_size`` slots for the stream's inputs, the model's
  initial state (the structure, and batch statistics, for the forward
  passes on replayed rows), and the key the strategy keeps for the
  memory's draws. ``key`` is split once, the first half kept, the second
  drawing the model state (the order the strategies had before sharing
  this, so their runs are unchanged).

  Raises:
    ValueError: from ``replay_size(ctx)``, checked first (None: a strategy
      whose draw sizes were checked when it was built): the default
      replay batch (the training batch size) larger than the memory.
  """
  if replay_size is not None:
    replay_size(ctx)
  k_mem, k_ms = jax.random.split(key)
  _, model_state = init_variables(ctx, k_ms)
  return buffers.init(mem_size, ctx.info.input_shape), model_state, k_mem


def add_replay_grads(ctx, model_state: Any, grads: Any, params: Any,
                     mem: buffers.Memory, idx: jax.Array, ok: jax.Array
                     ) -> Any:
  """``grads`` plus the gradient of the mean cross-entropy of the memory
  rows ``idx`` that are ``ok`` (training mode, under ``model_state``): the
  two means added, as MIR's and ASER's ``update_grads`` replay. A chained
  member's fixed weights (``ctx.freeze``: e.g. PackNet's, progressive
  networks') get none of the replayed rows' gradient."""

  def replay_loss(p):
    logits, _ = ctx.apply(p, model_state, mem.x[idx], mem.task[idx],
                          train=True, mask=ok)
    return cross_entropy(logits, mem.y[idx], ok.astype(jnp.float32))

  return jax.tree.map(jnp.add, grads,
                      ctx.freeze(jax.grad(replay_loss)(params)))
