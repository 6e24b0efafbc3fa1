"""Averaged GEM (A-GEM): one projection against an average memory gradient.

Chaudhry et al. (2019) relax GEM's ``t - 1`` constraints to one: the
update must not increase the loss on a random sample of the *whole*
episodic memory. With ``g`` the proposed gradient and ``g_ref`` the
gradient of the loss on ``sample_size`` examples drawn uniformly from the
memory of all past experiences (eq. 11):

.. math::
   \\tilde g = \\begin{cases}
     g & g^\\top g_{ref} \\ge 0, \\\\
     g - \\dfrac{g^\\top g_{ref}}{g_{ref}^\\top g_{ref}}\\, g_{ref}
       & \\text{otherwise,}
   \\end{cases}

a closed form: no QP, one extra forward/backward pass per step. The
episodic memory is GEM's (:mod:`jaxcl.strategies.gem`): ``m`` uniformly
drawn examples per experience, stored when the experience ends, so while
training experience ``t`` the sample comes from experiences ``< t`` only.
While the memory is empty ``g_ref = 0`` and ``g`` is used unchanged.

In a chain beside a member that keeps weights fixed (one that declares
``freeze_grads``; :mod:`jaxcl.strategy` lists them), ``g_ref`` is first
masked to the weights that move (``ctx.freeze``), so the projection
holds on them in either order (the same for A-GEM-R and GEM).

References:
  Chaudhry, Ranzato, Rohrbach & Elhoseiny, `Efficient Lifelong Learning
  with A-GEM <https://arxiv.org/abs/1812.00420>`_, ICLR 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl import buffers
from jaxcl.strategies.gem import (check_memory_args, init_memory,
                                  make_hooks, memory_loss, per_experience,
                                  tree_dot)
from jaxcl.strategy import Strategy

__all__ = ["agem", "agem_project"]

_DEFAULT_SAMPLE = 256  # the paper's reference-gradient batch


def agem_project(g, g_ref):
  """A-GEM's closed-form projection of ``g`` against ``g_ref`` (pytrees)."""
  dot = tree_dot(g, g_ref)
  ref_sq = tree_dot(g_ref, g_ref)
  coef = jnp.where((dot < 0) & (ref_sq > 0), dot / jnp.maximum(ref_sq, 1e-30),
                   0.0)
  return jax.tree.map(lambda a, r: (a - coef * r).astype(a.dtype), g, g_ref)


def agem(mem_size: int | None = None, mem_per_experience: int | None = None,
         sample_size: int = 0) -> Strategy:
  """A-GEM.

  Args:
    mem_size: total memory (examples), split evenly over the experiences.
    mem_per_experience: examples per experience (give this or
      ``mem_size``). Neither given: 256 per experience, as GEM.
    sample_size: memory examples per reference gradient (0: 256, the
      paper's, or the whole memory if smaller).

  Raises:
    ValueError: a memory per experience of 0, both sizes given, a negative
      ``sample_size`` or (at ``init``) one larger than the memory.
  """
  mem_size, mem_per_experience = check_memory_args("agem", mem_size,
                                                   mem_per_experience)
  if isinstance(sample_size, bool) or not isinstance(sample_size, int) or \
      sample_size < 0:
    raise ValueError(f"agem: sample_size must be an int >= 0 (0: "
                     f"min(256, memory)), got {sample_size!r}")

  def m_of(ctx):
    return per_experience("agem", ctx, mem_size, mem_per_experience)

  def n_sample(ctx):
    cap = m_of(ctx) * ctx.info.num_experiences
    return sample_size or min(_DEFAULT_SAMPLE, cap)

  def init(ctx, key, params):
    del params
    cap = m_of(ctx) * ctx.info.num_experiences
    if n_sample(ctx) > cap:
      raise ValueError(f"agem: sample_size={sample_size} is larger than the "
                       f"memory ({cap} examples); use at most {cap}")
    return init_memory(ctx, key, m_of(ctx))

  before_experience, after_experience = make_hooks(m_of)

  def update_grads(ctx, sstate, grads, params, batch, key):
    del batch
    mem = sstate.memory
    idx, ok = buffers.sample(mem, key, n_sample(ctx))
    ok = ok & (mem.experience[idx] < sstate.experience)
    g_ref = jax.grad(memory_loss, argnums=1)(
        ctx, params, sstate.model_state, mem.x[idx], mem.y[idx],
        mem.task[idx], ok.astype(jnp.float32))
    # Over the weights that will move: a chained member's fixed weights
    # (ctx.freeze) would otherwise absorb part of the projection.
    return agem_project(grads, ctx.freeze(g_ref))

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=update_grads,
                  after_experience=after_experience, name="agem")
