"""ER-ACL: ER-ACE's asymmetric loss with a class-balanced memory filled as
each experience starts (Avalanche's ``ER_ACL``).

Caccia et al. (2022) find that a cross-entropy on incoming data over every
class pushes the old classes' logits down on the new examples and abruptly
changes their representation. Avalanche's ``ER_ACL`` (its adaptation of
the paper's ER-ACE to training by epochs) scores the incoming batch ``B``
among the classes that are not old, and a batch ``M_B`` drawn from memory
among all classes:

.. math::
   \\mathcal{L}(\\theta) =
     \\frac{1}{|B|} \\sum_{(x, y) \\in B}
       -\\log \\frac{e^{h_\\theta(x)_y}}
                   {\\sum_{c \\notin C_{old}} e^{h_\\theta(x)_c}}
   + \\frac{1}{|M_B|} \\sum_{(x, y) \\in M_B}
       -\\log \\frac{e^{h_\\theta(x)_y}}{\\sum_{c} e^{h_\\theta(x)_c}},

``C_old`` the classes of earlier experiences that this one does not bring.
What sets it apart from ER-ACE (:mod:`jaxcl.strategies.er_ace`):

* the memory is class-balanced (each of the ``C`` classes seen keeps a
  uniformly random ``mem_size // C`` of its rows: Avalanche's
  ``ClassBalancedBuffer(adaptive_size=True)``,
  :func:`jaxcl.buffers.class_balanced_experience_add`), and the whole
  experience is offered to it **as the experience starts**, so the
  replayed batch holds current classes too, in their share;
* the incoming rows' mask is by experience (``C_old``), not by batch
  (ER-ACE unmasks only the classes present in the batch and the unseen
  ones).

As in Avalanche's code: while no class is old (the first experience; in
a domain-incremental stream, where every experience brings every class,
always) the loss is the plain cross-entropy and nothing is replayed;
otherwise every step replays ``batch_size`` rows drawn uniformly without
replacement from the memory; the two terms are each a mean, summed. One deviation, on purpose:
Avalanche keeps the logits from index ``|seen| - |new|`` on, which masks
exactly ``C_old`` only when classes arrive in increasing label order;
here ``C_old`` is the set itself, whatever the order. Avalanche's online
variant (``OnlineER_ACL``, memory filled as the batches arrive) is not
this module: with the memory filled at the start, the method sees each
experience's data before training on it, as training by epochs does.

Mechanics: ``before_experience`` (host side) marks the classes and offers
the experience's rows to the memory (one jitted call); ``prepare_batch``
appends the replayed rows after the incoming ones (masked out while no
class is old); ``task_loss`` applies the two terms. Rows a chained member
appends after the incoming ones count in the replay term. State:
:class:`ERACLState`, fixed shapes, so nothing recompiles between
experiences and it checkpoints, vmaps and shards like any state.

References:
  Caccia, Aljundi, Asadi, Tuytelaars, Pineau & Belilovsky, `New insights on
  reducing abrupt representation change in online continual learning
  <https://arxiv.org/abs/2104.05025>`_, ICLR 2022; Avalanche's
  ``avalanche/training/supervised/er_ace.py`` (``ER_ACL``,
  ``er_acl_criterion``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers
from jaxcl.state import allow_extra_outputs, cross_entropy
from jaxcl.strategies._replay_memory import replay_sizer
from jaxcl.strategies.er_ace import present_classes
from jaxcl.strategies.icarl import exemplar_hook
from jaxcl.strategies.replay import append_rows
from jaxcl.strategy import Strategy

__all__ = ["er_acl", "ERACLState", "acl_logits"]

_NEG = -1e9  # logit of a masked class (finite: keeps gradients finite)


class ERACLState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  priority: jax.Array     # float32 (mem_size,): each entry's random draw
  seen: jax.Array         # bool (C,): classes of the experiences so far
  old: jax.Array          # bool (C,): seen earlier, not in this experience
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; each experience's offer folds it in


def acl_logits(logits: jax.Array, old: jax.Array) -> jax.Array:
  """``logits`` with the old classes' set to a large negative (outputs
  beyond the stream's classes are never masked)."""
  allowed = allow_extra_outputs(~old, logits.shape[-1])
  return jnp.where(allowed, logits.astype(jnp.float32), _NEG)


def er_acl(mem_size: int = 200, batch_size: int = 0) -> Strategy:
  """ER-ACL.

  Args:
    mem_size: memory capacity in examples, shared equally by the classes
      seen (at least one slot per class of the stream).
    batch_size: replayed examples per step; 0 means the training batch size
      (ER-ACE's default; Avalanche's ``batch_size_mem`` defaults to 10).

  Raises:
    ValueError: a non-positive ``mem_size``, a negative ``batch_size`` or
      one larger than ``mem_size``; at ``init``, ``mem_size`` below the
      stream's number of classes.
  """
  replay_size = replay_sizer("er_acl", mem_size, batch_size)

  def init(ctx, key, params):
    del params
    replay_size(ctx)
    c = ctx.info.num_classes
    if mem_size < c:
      raise ValueError(
          f"er_acl: mem_size={mem_size} is smaller than the stream's {c} "
          f"classes; the class-balanced memory keeps mem_size // classes "
          f"rows of each, so use mem_size >= {c}")
    return ERACLState(buffers.init(mem_size, ctx.info.input_shape),
                      jnp.zeros((mem_size,), jnp.float32),
                      jnp.zeros((c,), bool), jnp.zeros((c,), bool),
                      jnp.zeros((), jnp.int32), key)

  @functools.partial(jax.jit, static_argnums=0)
  def offer(ctx, ss, params, model_state, x, y, task, n_valid, index):
    del params, model_state
    ok = jnp.arange(x.shape[0]) < n_valid
    c = ss.seen.shape[0]
    current = present_classes(y, ok, c)
    mem, priority = buffers.class_balanced_experience_add(
        ss.memory, ss.priority, jax.random.fold_in(ss.key, index), x, y,
        task, index, ok, num_classes=c)
    return ss._replace(memory=mem, priority=priority,
                       old=ss.seen & ~current, seen=ss.seen | current,
                       experience=index)

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    # No replay while no class is old (Avalanche: the first experience).
    ok = ok & jnp.any(sstate.old)
    return append_rows(batch, buffers.gather(sstate.memory, idx, ok))

  def task_loss(ctx, sstate, logits, batch):
    b = ctx.info.batch_size
    y, mask = batch["y"], batch["mask"]
    # acl_logits masks nothing while no class is old.
    return (cross_entropy(acl_logits(logits[:b], sstate.old), y[:b],
                          mask[:b])
            + cross_entropy(logits[b:], y[b:], mask[b:]))

  # The experience's rows padded once and offered in one jitted call, as
  # it starts (the exemplar strategies' hook, used here before training).
  return Strategy(init=init, before_experience=exemplar_hook(offer),
                  prepare_batch=prepare_batch, task_loss=task_loss,
                  name="er_acl")
