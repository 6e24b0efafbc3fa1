"""LwF.MC: Learning without Forgetting, multi-class (iCaRL without exemplars).

Rebuffi et al. (2017, Sec. 4) compare iCaRL against "LwF.MC": the same
training objective, a sigmoid binary cross-entropy over the classes seen
so far whose targets are one-hot for the current experience's classes and
the previous model's sigmoid outputs for the earlier ones,

.. math::
   \\ell(x, y) = \\frac{1}{|A|}\\sum_{c \\in A}
     \\mathrm{BCE}\\big(\\sigma(z_c(x)),\\ t_c\\big), \\qquad
   t_c = \\begin{cases} \\sigma(z^{old}_c(x)) & c \\text{ old} \\\\
                       [y = c] & c \\text{ current} \\end{cases}

(:func:`jaxcl.strategies.icarl.icarl_loss`; ``A`` is the old and current
classes, or every class with ``bce_classes='all'`` as in iCaRL's authors'
code), but with no exemplar memory and the network's own outputs as the
classifier. It is Li & Hoiem's distillation (:mod:`jaxcl.strategies.lwf`)
carried into one multi-class head: the old model's outputs on the new data
are the targets of the old classes. This is Mammoth's ``lwf_mc``,
including its optional L2 term ``wd_reg · Σ θ²`` added to the loss.

On the first experience there are no old classes, so the loss is the
sigmoid cross-entropy over the current classes. Prediction is the
network's argmax over the classes trained so far: the sigmoid loss never
trains a later experience's logits (no softmax pushes them down), so they
are masked out (Mammoth's newer evaluation likewise cuts the outputs to
the classes seen). The BCE *replaces* the
softmax cross-entropy through the ``task_loss`` hook (at most one chain
member may do that).

References:
  Rebuffi, Kolesnikov, Sperl & Lampert, `iCaRL: Incremental Classifier and
  Representation Learning <https://arxiv.org/abs/1611.07725>`_, CVPR 2017
  (LwF.MC, their multi-class LwF baseline).
  Li & Hoiem, `Learning without Forgetting
  <https://arxiv.org/abs/1606.09282>`_, ECCV 2016.
  Buzzega et al. 2020, Mammoth's ``models/lwf_mc.py``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.strategies.icarl import BCE_CLASSES, bce_active, icarl_loss
from jaxcl.strategy import Strategy, experience_classes
from jaxcl.train import init_variables


_NEG = -1e9  # the logit of a class no experience has trained yet


class LwFMCState(NamedTuple):
  teacher: Any              # parameters after the previous experience
  teacher_model_state: Any  # and its model state
  seen: jax.Array           # bool (C,): classes of earlier experiences
  current: jax.Array        # bool (C,): classes of this experience


def lwf_mc(wd_reg: float = 0.0, bce_classes: str = "seen") -> Strategy:
  """LwF.MC (iCaRL's sigmoid distillation loss, no exemplars).

  Args:
    wd_reg: weight of the L2 term ``wd_reg · Σ θ²`` added to the loss
      (Mammoth's ``--wd_reg``; 0 leaves it out).
    bce_classes: the classes the BCE averages over: ``'seen'`` (old and
      current, Mammoth's) or ``'all'`` (every output: iCaRL's authors'
      code, :mod:`jaxcl.strategies.icarl`).

  Raises:
    ValueError: a negative or non-finite ``wd_reg``; a ``bce_classes``
    other than ``'seen'`` or ``'all'``.
  """
  if isinstance(wd_reg, bool) or not isinstance(wd_reg, (int, float)) or \
      not math.isfinite(wd_reg) or wd_reg < 0:
    raise ValueError(f"lwf_mc: wd_reg must be a finite number >= 0, got "
                     f"{wd_reg!r}")
  wd_reg = float(wd_reg)
  checks.one_of("lwf_mc: bce_classes", bce_classes, BCE_CLASSES)

  def init(ctx, key, params):
    c = ctx.info.num_classes
    _, model_state = init_variables(ctx, key)
    return LwFMCState(teacher=jax.tree.map(jnp.copy, params),
                      teacher_model_state=model_state,
                      seen=jnp.zeros((c,), bool),
                      current=jnp.zeros((c,), bool))

  def before_experience(ctx, state, experience):
    ss = state.strategy._replace(
        current=experience_classes(ctx.info.num_classes, experience))
    return state.replace(strategy=ss)

  def task_loss(ctx, sstate, logits, batch):
    # The teacher is a constant of the step: its parameters live in the
    # strategy state, not in the differentiated ``params``.
    teacher = ctx.logits(sstate.teacher, sstate.teacher_model_state,
                         batch["x"], batch["task"])
    return icarl_loss(logits, teacher, batch["y"], batch["mask"],
                      sstate.seen, bce_active(bce_classes, sstate.seen,
                                              sstate.current))

  def loss(ctx, sstate, params, batch, logits):
    if not wd_reg:
      return jnp.zeros((), jnp.float32)
    sq = sum(jnp.sum(jnp.square(p.astype(jnp.float32)))
             for p in jax.tree.leaves(params))
    return wd_reg * sq

  def predict(ctx, sstate, params, model_state, x, task):
    # Only the classes trained so far compete: the sigmoid loss leaves the
    # logits of later experiences' classes untrained (no softmax pushes
    # them down), so one of them could win by chance.
    logits = ctx.logits(params, model_state, x, task)
    known = sstate.seen | sstate.current
    return jnp.where(jnp.any(known), jnp.where(known[None, :], logits,
                                                _NEG), logits)

  def after_experience(ctx, state, experience):
    ss = state.strategy
    ss = ss._replace(teacher=state.params,
                     teacher_model_state=state.model_state,
                     seen=ss.seen | ss.current)
    return state.replace(strategy=ss)

  return Strategy(init=init, before_experience=before_experience,
                  task_loss=task_loss, loss=loss, predict=predict,
                  after_experience=after_experience, name="lwf_mc")
