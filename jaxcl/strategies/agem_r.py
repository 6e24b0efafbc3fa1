"""A-GEM with a reservoir memory (Mammoth's ``agem_r``).

A-GEM's projection (:mod:`jaxcl.strategies.agem`, Chaudhry et al. 2019,
eq. 11) with the memory of experience replay instead of GEM's episodic
memory: one reservoir of ``mem_size`` examples offered every incoming
batch (Vitter's algorithm R, :func:`jaxcl.buffers.reservoir_add`), so the
reference gradient ``g_ref`` is taken on a uniform sample of everything
seen so far, the current experience included. With ``g`` the step's
gradient,

.. math::
   \\tilde g = \\begin{cases}
     g & g^\\top g_{ref} \\ge 0, \\\\
     g - \\dfrac{g^\\top g_{ref}}{g_{ref}^\\top g_{ref}}\\, g_{ref}
       & \\text{otherwise.}
   \\end{cases}

This is the variant behind Mammoth's ``agem_r`` (Buzzega et al. 2020's
model zoo): it needs no experience boundaries for its memory, and its
constraint protects the reservoir's sample rather than the past
experiences alone. While the memory is empty ``g`` is used unchanged. The
memory rows' loss runs with the model state as the experience started, as
GEM's and A-GEM's do.

References:
  Chaudhry, Ranzato, Rohrbach & Elhoseiny, `Efficient Lifelong Learning
  with A-GEM <https://arxiv.org/abs/1812.00420>`_, ICLR 2019.
  Buzzega et al. 2020, Mammoth's ``models/agem_r.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.strategies._replay_memory import init_memory
from jaxcl.strategies.agem import _DEFAULT_SAMPLE, agem_project
from jaxcl.strategies.gem import memory_loss
from jaxcl.strategies.replay import reservoir_step
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["agem_r", "AGEMRState"]

class AGEMRState(NamedTuple):
  memory: buffers.Memory  # a reservoir of mem_size examples
  model_state: Any        # model state at the start of the experience
  experience: jax.Array   # int32 scalar: the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def agem_r(mem_size: int = 200, sample_size: int = 0) -> Strategy:
  """A-GEM against a reservoir sample.

  Args:
    mem_size: reservoir capacity in examples.
    sample_size: memory examples per reference gradient (0: 256, A-GEM's,
      or the whole memory if smaller).

  Raises:
    ValueError: a non-positive ``mem_size``, a negative ``sample_size`` or
      one larger than ``mem_size``.
  """
  buffers.check_capacity(mem_size, "agem_r: mem_size")
  checks.whole("agem_r: sample_size", sample_size, 0,
               f"0: min({_DEFAULT_SAMPLE}, mem_size)")
  if sample_size > mem_size:
    raise ValueError(f"agem_r: sample_size={sample_size} is larger than "
                     f"mem_size={mem_size}; use at most {mem_size}")
  n_sample = sample_size or min(_DEFAULT_SAMPLE, mem_size)

  def init(ctx, key, params):
    del params
    memory, variables, k_mem = init_memory(ctx, key, mem_size)
    return AGEMRState(memory, variables, jnp.zeros((), jnp.int32), k_mem)

  def update_grads(ctx, sstate, grads, params, batch, key):
    del batch
    mem = sstate.memory
    idx, ok = buffers.sample(mem, key, n_sample)
    g_ref = jax.grad(memory_loss, argnums=1)(
        ctx, params, sstate.model_state, mem.x[idx], mem.y[idx],
        mem.task[idx], ok.astype(jnp.float32))
    # g_ref = 0 leaves g unchanged; ctx.freeze: as in A-GEM.
    return agem_project(grads, ctx.freeze(g_ref))

  def after_step(ctx, sstate, info):
    return sstate._replace(memory=reservoir_step(ctx, sstate, info))

  return Strategy(init=init, before_experience=mark_experience_start,
                  update_grads=update_grads, after_step=after_step,
                  name="agem_r")
