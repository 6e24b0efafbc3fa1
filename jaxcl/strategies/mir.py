"""MIR: replay the memory samples a virtual update would hurt the most.

Maximally Interfered Retrieval (Aljundi et al. 2019), ER-MIR variant. At
each step, with ``g`` the gradient of the loss on the incoming batch:

1. take a virtual SGD step :math:`\\theta^v = \\theta - \\alpha g`;
2. draw ``candidates`` entries :math:`C` uniformly from the memory and score
   each by its loss increase
   :math:`s(x, y) = \\ell(f_{\\theta^v}(x), y) - \\ell(f_\\theta(x), y)`;
3. replay the top ``batch_size`` of :math:`C` by score, adding the gradient
   of their mean loss to ``g``:

.. math::
   g \\leftarrow \\nabla_\\theta \\frac{1}{|B|}\\sum_{B} \\ell
     + \\nabla_\\theta \\frac{1}{k}\\sum_{\\mathrm{top}_k(C, s)} \\ell,

as in the authors' code (two means added). Everything runs in
``update_grads`` inside the compiled step (it receives the parameters and
the incoming gradient, so the virtual step costs no extra backward pass);
the memory is a reservoir updated with the incoming batch in ``after_step``.
While the memory holds fewer than ``candidates`` entries, missing
candidates score ``-inf`` and are never picked; an empty memory adds
nothing.

``lr`` is the virtual step's learning rate; the paper uses the optimiser's
(plain SGD). With ``exclude_current`` the candidates come only from past
experiences, as in the authors' code. Not reproduced: the code's
``--compare_to_old_logits`` (scoring against the lowest loss seen so far
for an entry), whose stored logits are indexed by positions in the
filtered subsample rather than by buffer slot. The scoring runs the model in eval mode with the model state
(e.g. batch-norm statistics) as of the start of the experience, because
``update_grads`` does not receive the current model state.

References:
  Aljundi et al., `Online continual learning with maximally interfered
  retrieval <https://arxiv.org/abs/1908.04742>`_, NeurIPS 2019.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl import buffers, checks
from jaxcl.strategies._replay_memory import add_replay_grads, init_memory
from jaxcl.strategies.replay import after_grads, reservoir_step
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["mir", "MIRState", "retrieve"]


class MIRState(NamedTuple):
  memory: buffers.Memory  # reservoir of input-shaped examples
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key for the reservoir
  model_state: Any        # model state at the start of the experience


def retrieve(ctx, params, model_state, grads, mem: buffers.Memory,
             key: jax.Array, *, lr: float, candidates: int,
             k: int, where: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MIR's retrieval: the ``k`` candidates whose loss rises most.

  Candidates are drawn among the valid entries (and, given ``where``, only
  where it is True). Returns ``(idx, ok, score)``: memory slots ``(k,)``,
  whether each is an eligible entry, and the candidates' scores
  ``(candidates,)`` (loss after the virtual step minus loss before;
  ``-inf`` for ineligible candidates).
  """
  idx, ok = buffers.sample(mem, key, candidates, where)
  x, y, t = mem.x[idx], mem.y[idx], mem.task[idx]
  virtual = jax.tree.map(lambda p, g: p - lr * g, params, grads)

  def losses(p):
    logits = ctx.logits(p, model_state, x, t)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), y)

  score = jnp.where(ok, losses(virtual) - losses(params), -jnp.inf)
  _, top = jax.lax.top_k(score, k)
  return idx[top], ok[top], score


def mir(mem_size: int = 500, batch_size: int = 10, candidates: int = 50,
        lr: float = 0.1, exclude_current: bool = False) -> Strategy:
  """ER-MIR.

  Args:
    mem_size: reservoir capacity in examples.
    batch_size: replayed examples per step (top-k).
    candidates: size of the random memory subsample that is scored.
    lr: learning rate of the virtual SGD step.
    exclude_current: draw candidates only among entries of past
      experiences, as the authors' code does (``buffer.sample(...,
      exclude_task=task)``; so nothing is replayed during the first
      experience). False: the whole memory.

  Raises:
    ValueError: ``batch_size > candidates``, ``candidates > mem_size``,
      non-positive sizes or learning rate.
  """
  buffers.check_capacity(mem_size, "mem_size")
  for name, v in (("batch_size", batch_size), ("candidates", candidates)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"mir {name} must be a positive int, got {v!r}")
  if candidates > mem_size:
    raise ValueError(f"mir candidates={candidates} is larger than the memory "
                     f"capacity mem_size={mem_size}; use candidates <= "
                     f"{mem_size}")
  if batch_size > candidates:
    raise ValueError(f"mir replay batch_size={batch_size} is larger than "
                     f"candidates={candidates}; use batch_size <= candidates")
  checks.positive("mir: lr", lr)
  if not isinstance(exclude_current, bool):
    raise ValueError(f"mir exclude_current must be a bool, got "
                     f"{exclude_current!r}")

  def init(ctx, key, params):
    del params
    memory, variables, k_mem = init_memory(ctx, key, mem_size)
    return MIRState(memory, jnp.zeros((), jnp.int32), k_mem, variables)

  before_experience = mark_experience_start

  def update_grads(ctx, sstate, grads, params, batch, key):
    del batch
    mem = sstate.memory
    where = mem.experience < sstate.experience if exclude_current else None
    # The virtual step moves only the weights the update will move: a
    # chained member's fixed weights (ctx.freeze) are masked out of the
    # applied update whichever side of mir it stands.
    idx, ok, _ = retrieve(ctx, params, sstate.model_state, ctx.freeze(grads),
                          mem, key, lr=float(lr), candidates=candidates,
                          k=batch_size, where=where)
    return add_replay_grads(ctx, sstate.model_state, grads, params, mem,
                            idx, ok)

  def after_step(ctx, sstate, info):
    # after: the gradient read the retrieved rows (update_grads).
    return sstate._replace(memory=reservoir_step(ctx, sstate, info,
                                                 after=after_grads(info)))

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=update_grads, after_step=after_step,
                  name="mir")
