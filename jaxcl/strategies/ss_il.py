"""SS-IL: separated softmax for incremental learning.

Ahn et al. (2021) trace the classifier's bias toward new classes to the
softmax shared by old and new classes: with many new examples and few
exemplars, the cross-entropy on new data keeps pushing every old class's
score down. SS-IL separates the softmax: each incoming example of the
current task's classes :math:`C_t` is scored only among :math:`C_t`, each
replayed exemplar only among the old classes :math:`C_{<t}`, so neither
part of the batch pulls the other part's scores down (the
*separated-softmax* loss, averaged over the combined batch):

.. math::
   \\mathcal{L}_{ss} = \\frac{1}{|B| + |M_B|} \\Big(
     \\sum_{(x, y) \\in B}
       -\\log \\frac{e^{z_y(x)}}{\\sum_{c \\in C_t} e^{z_c(x)}}
     + \\sum_{(x, y) \\in M_B}
       -\\log \\frac{e^{z_y(x)}}{\\sum_{c \\in C_{<t}} e^{z_c(x)}} \\Big).

Old and new classes are still told apart, by *task-wise knowledge
distillation*: on every row of the combined batch, the previous
experience's model :math:`z^{old}` (frozen at the end of that experience)
is distilled separately within each old task :math:`s`'s classes
:math:`C_s`, at temperature :math:`T`,

.. math::
   \\mathcal{L}_{tkd} = \\frac{T^2}{|B| + |M_B|}
     \\sum_{x \\in B \\cup M_B} \\sum_{s < t} \\sum_{c \\in C_s}
     -\\sigma_c\\big(z^{old}_{C_s}(x) / T\\big)
       \\log \\sigma_c\\big(z_{C_s}(x) / T\\big),

and the loss is :math:`\\mathcal{L}_{ss} + \\lambda \\mathcal{L}_{tkd}`
(the paper's :math:`\\lambda = 1`). The third part is *ratio-preserving*
replay: every mini-batch holds ``B`` incoming rows and a fixed number
``batch_size`` of exemplars drawn from the memory (the paper's replay
batch; 32 per 128 on ImageNet), so old classes make up the same share of
every step however many new examples an experience has. The memory is
class-balanced, ``mem_size // |seen|`` exemplars per class, and updated
when an experience ends; prediction is the network's output over the
classes seen so far.

Implementation notes, against the authors' ``trainer/ssil.py`` (SS-IL-
Official, read for this module):

* Both cross-entropies are summed and divided by the number of rows, one
  mean over the combined batch, as there (not two separate means as in
  :mod:`jaxcl.strategies.er_ace`); rows masked out count for nothing.
* The distillation is the cross-entropy between the tempered softmaxes of
  each old task (:func:`jaxcl.strategies.eeil.group_distillation`) times
  ``T²``; the reference uses ``kl_div(..., 'batchmean') * T²``, which is
  this minus the teacher's entropy: a constant with the same gradient, so
  the reported loss, not the training, differs. As there, it covers every
  row of the combined batch, each old task (experience) its own softmax,
  and the first experience has none (no previous model).
* Exemplars are chosen by herding (iCaRL's Algorithm 4, as this library's
  other exemplar methods: :func:`jaxcl.strategies._class_incremental.
  herding_update`), with ``mem_size // |seen|`` per class (or a fixed
  ``per_class``, a memory that grows with the classes). The reference
  keeps the first ``ceil(K / |seen|)`` rows of each class in data-set
  order (a random choice) and trims single rows to fit ``K``.
* Replayed rows are drawn uniformly without replacement within a step
  (:func:`jaxcl.buffers.sample`); the reference cycles reshuffled passes
  over the memory. No replay during the first experience (the memory is
  empty then, as in the reference).
* A row whose label lies outside its part's classes (a chained member's
  appended rows, e.g. another replay's current-class rows after the first
  ``B``) is scored over every class seen so far, so no row's own label is
  masked out of its loss.
* Not reproduced: the reference's SGD with momentum and weight decay and
  its step schedule (use the optimiser's), and its data augmentation.

State: :class:`SSILState`, fixed shapes, so nothing recompiles between
experiences and it checkpoints and vmaps like any state.

References:
  Ahn, Kwak, Lim, Bang, Kim & Moon, `SS-IL: separated softmax for
  incremental learning <https://openaccess.thecvf.com/content/ICCV2021/html/Ahn_SS-IL_Separated_Softmax_for_Incremental_Learning_ICCV_2021_paper.html>`_,
  ICCV 2021.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies._class_incremental import (
    NEG, append_exemplars, exemplar_sizer, herding_update,
    init_teacher_exemplars, mark_class_experience, predict_seen)
from jaxcl.strategies.eeil import distil_old_groups
from jaxcl.strategies.icarl import check_per_class, exemplar_hook
from jaxcl.strategy import Strategy

__all__ = ["SSILState", "ss_il", "separated_cross_entropy"]


class SSILState(NamedTuple):
  memory: buffers.Memory  # exemplars (K slots)
  rank: jax.Array         # int32 (K,): herding position within the class
  class_exp: jax.Array    # int32 (C,): experience of each class, -1 unseen
  experience: jax.Array   # int32 scalar: the current experience
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): classes of the current experience
  teacher: Any            # params of the model after the last experience
  teacher_model_state: Any


def separated_cross_entropy(logits: jax.Array, y: jax.Array,
                            mask: jax.Array, incoming: int,
                            current: jax.Array, old: jax.Array
                            ) -> jax.Array:
  """``L_ss``: the first ``incoming`` rows' cross-entropy over the classes
  ``current`` (bool ``(C,)``), the other rows' over ``old``; one
  mask-weighted mean over all rows.

  A row whose label is outside its part's classes is scored over
  ``current | old`` instead.
  """
  rows = jnp.arange(logits.shape[0]) < incoming
  part = jnp.where(rows[:, None], current[None, :], old[None, :])
  inside = jnp.take_along_axis(part, y[:, None], axis=1)
  allowed = jnp.where(inside, part, (current | old)[None, :])
  return cross_entropy(jnp.where(allowed, logits.astype(jnp.float32), NEG),
                       y, mask)


def ss_il(mem_size: int = 2000, batch_size: int = 0, lam: float = 1.0,
          temperature: float = 2.0, per_class: int = 0) -> Strategy:
  """SS-IL (class-incremental streams).

  Args:
    mem_size: total exemplars ``K`` (fixed, shared by the classes seen).
    batch_size: exemplars appended to every training batch, the fixed
      replay share of each step (0: the training batch size; the paper:
      32 with batches of 128).
    lam: weight ``λ`` of the task-wise distillation (the paper: 1).
    temperature: ``T`` (the paper: 2).
    per_class: > 0: every class keeps this many exemplars, a memory that
      grows with the classes (``mem_size`` its capacity); 0: the paper's
      fixed ``K = mem_size`` shared by the classes seen.

  Raises:
    ValueError: on a bad argument; at ``init``, on a stream that is not
    class-incremental or ``mem_size`` smaller than the number of classes
    (or than ``per_class`` times it); at an experience's start, on
    classes that came in an earlier one.
  """
  replay_size = exemplar_sizer("ss_il", mem_size, batch_size)
  checks.nonnegative("ss_il: lam", lam)
  checks.positive("ss_il: temperature", temperature)
  check_per_class("ss_il", mem_size, per_class)

  def init(ctx, key, params):
    return SSILState(**init_teacher_exemplars(
        "ss_il", "separates the softmax of old and new classes", ctx, key,
        params, mem_size, replay_size, per_class))

  def task_loss(ctx, sstate, logits, batch):
    ce = separated_cross_entropy(logits, batch["y"], batch["mask"],
                                 ctx.info.batch_size, sstate.current,
                                 sstate.seen)
    # The teacher in evaluation mode, as the reference's frozen copy.
    kd = distil_old_groups(ctx, sstate, logits, batch, temperature)
    return ce + lam * temperature ** 2 * kd

  # Herding at the experience's end; the trained model becomes the frozen
  # teacher of the next experience.
  after_experience = exemplar_hook(herding_update(mem_size, per_class))

  return Strategy(init=init, before_experience=mark_class_experience("ss_il"),
                  prepare_batch=append_exemplars(replay_size),
                  task_loss=task_loss, after_experience=after_experience,
                  predict=predict_seen, name="ss_il")
