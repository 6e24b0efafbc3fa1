"""Freezing: train the whole model on the first experience(s), then only
the output layer.

The baseline of FACIL (Masana et al. 2022, `freezing.py`): until the
experience ``freeze_after`` has ended, the model trains as in fine-tuning;
from then on the backbone (the model's ``backbone`` parameters) is fixed,
and each experience trains only the output weights of its own classes,
with the cross-entropy over those classes (FACIL's per-task heads, trained
one at a time):

.. math::
   \\mathcal{L}_e(\\theta_{\\text{head}}) = \\frac{1}{B}\\sum_{b}
     -\\log \\mathrm{softmax}_{C_e}\\big(h(f_{\\theta^*}(x_b))\\big)_{y_b},
   \\qquad \\theta_{\\text{backbone}} = \\theta^*,

``C_e`` the experience's classes. The head columns of other classes get no
gradient, so what earlier experiences trained there stays. Prediction is
the model's own, over all classes (class-incremental) or the task's
(task-incremental). ``all_outputs=True`` is FACIL's ``--all-outputs``: the
cross-entropy over every class and the whole head trained.

What to expect class-incrementally (session 32, Split Digits): the
softmax over ``C_e`` is unchanged when one constant is added to all of
``C_e``'s logits, so nothing lifts the new classes' logits above the first
experience's, which the end-to-end first experience made large; new
classes are then predicted only where they happen to win (MLP 64-64: 0.27
after five experiences; after the second experience every test accuracy
is what it was after the first). This is the baseline, as FACIL's
task-agnostic column shows it, not a defect. A head alone also learns
slowly: at 2 epochs of Adam 1e-3 (about 17 steps per experience) the
task-incremental heads stay near chance; at 20 epochs they reach
0.78-0.91.

The backbone is frozen as :mod:`jaxcl.strategies._freeze` does it (zero
gradient, and the copy taken when it froze restored after every update).
Deviation: FACIL also puts the frozen backbone in evaluation mode, so its
batch-norm statistics stop moving; here the training step runs the model in
training mode, and a batch-norm backbone keeps updating its running
statistics (models without batch norm are unaffected). FACIL's exemplar
variant (all heads trained, on the data and exemplars) is
``freezing(all_outputs=True)`` chained with a replay strategy; with
``all_outputs=False`` a chained member's replayed rows take the
cross-entropy over every class, but only the current classes' output
weights move.

References:
  Masana et al., `Class-incremental learning: survey and performance
  evaluation on image classification
  <https://arxiv.org/abs/2010.15277>`_, TPAMI 2022 (FACIL).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.state import cross_entropy, cross_entropy_over
from jaxcl.strategies._freeze import require_part, restore_part, zero_part
from jaxcl.strategy import Strategy, experience_classes, frozen_update

__all__ = ["freezing", "FreezingState"]

BACKBONE, HEAD = "backbone", "head"


class FreezingState(NamedTuple):
  frozen_params: Any   # like params: the model when the backbone froze
  frozen: jax.Array    # bool scalar: the backbone is frozen
  current: jax.Array   # bool (C,): the current experience's classes


def freezing(freeze_after: int = 0, all_outputs: bool = False) -> Strategy:
  """Freezing (FACIL's baseline).

  Args:
    freeze_after: the index of the last experience that trains the whole
      model (FACIL's ``--freeze-after``; 0: only the first).
    all_outputs: the cross-entropy over all classes and the whole head
      trained (FACIL's ``--all-outputs``), instead of the experience's own.

  Raises:
    ValueError: a bad argument; at ``init``, a model without ``backbone``
    and ``head`` parameters.
  """
  checks.whole("freezing: freeze_after", freeze_after)
  checks.flag("freezing: all_outputs", all_outputs)

  def init(ctx, key, params):
    del key
    require_part("freezing", params, BACKBONE, "backbone")
    require_part("freezing", params, HEAD, "output layer")
    return FreezingState(jax.tree.map(jnp.copy, params), jnp.zeros((), bool),
                         jnp.zeros((ctx.info.num_classes,), bool))

  def before_experience(ctx, state, experience):
    ss = state.strategy._replace(
        current=experience_classes(ctx.info.num_classes, experience))
    return state.replace(strategy=ss)

  def task_loss(ctx, sstate, logits, batch):
    del ctx
    if all_outputs:
      return cross_entropy(logits, batch["y"], batch["mask"])
    # Rows of the experience's classes: its classes only. Rows of other
    # classes (a chained replay member's) over every class, as FACIL's
    # criterion with exemplars.
    return cross_entropy_over(logits, batch["y"], batch["mask"],
                              sstate.current)

  def class_columns(sstate, leaf):
    """Where ``leaf``'s last axis holds the current classes' weights (its
    last axis is the class axis when it is a multiple of the classes:
    kernel ``(D, C)``, bias ``(C,)``, a multi-head block ``(D, H C)``)."""
    c = sstate.current.shape[0]
    if leaf.ndim == 0 or leaf.shape[-1] % c:
      return None
    return jnp.tile(sstate.current, leaf.shape[-1] // c)

  def others(sstate, leaf, old, new):
    """``new``, with ``old`` in the other classes' columns once frozen."""
    own = class_columns(sstate, leaf)
    if own is None or all_outputs:
      return new
    return jnp.where(sstate.frozen & ~own, old, new)

  def freeze_grads(ctx, sstate, grads):
    del ctx
    grads = zero_part(grads, BACKBONE, sstate.frozen)
    head = jax.tree.map(lambda g: others(sstate, g, jnp.zeros_like(g), g),
                        grads[HEAD])
    return {**grads, HEAD: head}

  def project_params(ctx, sstate, params):
    del ctx
    params = restore_part(params, sstate.frozen_params, BACKBONE,
                          sstate.frozen)
    # The other classes' output weights as the last experience left them
    # (FACIL's optimiser holds only the current head: no momentum or
    # weight decay reaches the others).
    head = jax.tree.map(lambda p, o: others(sstate, p, o, p), params[HEAD],
                        sstate.frozen_params[HEAD])
    return {**params, HEAD: head}

  # jit outputs are fresh buffers: the copy never aliases the (donated)
  # parameters.
  @jax.jit
  def keep(ss, params):
    return ss._replace(frozen_params=params, frozen=jnp.ones((), bool))

  def after_experience(ctx, state, experience):
    del ctx
    if experience.index < freeze_after:
      return state
    # From the freeze on, the copy follows the head (the backbone in it
    # stays the frozen one: it is restored after every update).
    return state.replace(strategy=keep(state.strategy, state.params))

  return Strategy(init=init, before_experience=before_experience,
                  task_loss=task_loss, update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads,
                  project_params=project_params,
                  after_experience=after_experience, name="freezing")
