"""ER-ACE: experience replay with an asymmetric cross-entropy.

Caccia et al. (2022) observe that when new classes arrive, plain replay's
cross-entropy on the incoming batch pushes the logits of *every* old class
down on the new examples, and that this abrupt change of the old classes'
representation, not a lack of replay, drives much of the forgetting. ER-ACE
keeps replay but splits the loss: the incoming batch ``B`` is scored only
among the classes it contains (and those never seen yet), the replayed
batch ``M_B`` among all classes,

.. math::
   \\mathcal{L}(\\theta) =
     \\frac{1}{|B|} \\sum_{(x, y) \\in B}
       -\\log \\frac{e^{h_\\theta(x)_y}}
                   {\\sum_{c \\in C_B} e^{h_\\theta(x)_c}}
   + \\frac{1}{|M_B|} \\sum_{(x, y) \\in M_B}
       \\ell\\big(y, h_\\theta(x)\\big),
   \\qquad C_B = \\{y : (x, y) \\in B\\} \\cup C_{\\text{unseen}},

so a gradient step on new data never moves an old class's logit, while the
replayed examples still separate old from new classes (the paper's
asymmetric loss :math:`\\mathcal{L}_{ace}` on incoming data plus
:math:`\\mathcal{L}_{ce}` on the memory).

As in Mammoth's ``er_ace.py`` (read for this module; it follows the
authors' ``ER_ACE``, which was not read here): the mask and the replay
term start with the second experience (the first is trained with plain
cross-entropy and no replay); the memory is a reservoir fed with every
incoming batch, so the method works online; the two terms are each a
mean, and they are summed. One deviation, on purpose: the code unmasks
the classes with an index ``>= max(seen)``, which are the unseen ones
only when classes arrive in increasing label order (and it also unmasks
the largest seen class). Here :math:`C_{\\text{unseen}}` is the set of
classes never in an incoming batch, whatever the order; on Split MNIST's
ordered stream the two differ only in a batch that lacks the largest
class seen so far.

Mechanics: ``prepare_batch`` appends ``batch_size`` memory rows after the
incoming ones (masked out during the first experience), so one forward pass
scores both; ``task_loss`` applies the two terms. Rows a chained member
appends after the incoming ones count in the replay term. ``after_step``
offers the incoming rows to the reservoir and records their classes.

State: :class:`ERACEState`, fixed shapes, so nothing recompiles between
experiences and it checkpoints, vmaps and shards like any state.

References:
  Caccia, Aljundi, Asadi, Tuytelaars, Pineau & Belilovsky, `New insights on
  reducing abrupt representation change in online continual learning
  <https://arxiv.org/abs/2104.05025>`_, ICLR 2022.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers
from jaxcl.state import allow_extra_outputs, cross_entropy
from jaxcl.strategies._replay_memory import replay_sizer
from jaxcl.strategies.replay import (append_rows, incoming_rows,
                                     reservoir_step)
from jaxcl.strategy import Strategy, mark_experience

__all__ = ["er_ace", "ERACEState", "ace_logits"]

_NEG = -1e9  # logit of a masked class (finite: keeps gradients finite)


class ERACEState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  seen: jax.Array         # (num_classes,) bool: in some incoming batch so far
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def present_classes(y: jax.Array, mask: jax.Array, num_classes: int
                    ) -> jax.Array:
  """``(num_classes,)`` bool: the classes of the rows with ``mask > 0``."""
  return jnp.zeros((num_classes,), bool).at[y].max(mask > 0)


def ace_logits(logits: jax.Array, y: jax.Array, mask: jax.Array,
               seen: jax.Array) -> jax.Array:
  """The incoming rows' logits with every class outside :math:`C_B` set to
  a large negative: classes seen before but absent from this batch.

  ``seen`` covers the stream's classes; outputs beyond them (SupSup's
  superfluous neurons) are never masked.
  """
  c = seen.shape[0]
  present = present_classes(y, mask, c)
  allowed = allow_extra_outputs(present | ~(seen | present),
                                logits.shape[-1])
  return jnp.where(allowed, logits.astype(jnp.float32), _NEG)


def er_ace(mem_size: int = 200, batch_size: int = 0) -> Strategy:
  """ER-ACE.

  Args:
    mem_size: memory capacity in examples (a reservoir).
    batch_size: replayed examples per step; 0 means the training batch size
      (the authors' and Mammoth's default: as many as incoming).

  Raises:
    ValueError: a non-positive ``mem_size``, a negative ``batch_size`` or
      one larger than ``mem_size`` (at ``init`` for the default).
  """
  replay_size = replay_sizer("er_ace", mem_size, batch_size)

  def init(ctx, key, params):
    del params
    replay_size(ctx)
    return ERACEState(buffers.init(mem_size, ctx.info.input_shape),
                      jnp.zeros((ctx.info.num_classes,), bool),
                      jnp.zeros((), jnp.int32), key)

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    # No replay during the first experience (the memory holds only it).
    ok = ok & (sstate.experience > 0)
    return append_rows(batch, buffers.gather(sstate.memory, idx, ok))

  def task_loss(ctx, sstate, logits, batch):
    b = ctx.info.batch_size
    y, mask = batch["y"], batch["mask"]
    inc = jnp.where(sstate.experience > 0,
                    ace_logits(logits[:b], y[:b], mask[:b], sstate.seen),
                    logits[:b].astype(jnp.float32))
    return (cross_entropy(inc, y[:b], mask[:b])
            + cross_entropy(logits[b:], y[b:], mask[b:]))

  def after_step(ctx, sstate, info):
    rows = incoming_rows(ctx, info.batch)
    mem = reservoir_step(ctx, sstate, info)
    seen = sstate.seen | present_classes(rows["y"], rows["mask"],
                                         sstate.seen.shape[0])
    return sstate._replace(memory=mem, seen=seen)

  return Strategy(init=init, before_experience=mark_experience,
                  prepare_batch=prepare_batch, task_loss=task_loss,
                  after_step=after_step, name="er_ace")
