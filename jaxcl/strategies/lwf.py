"""Learning without Forgetting (LwF): distillation from the previous model.

At the end of each experience the model is frozen as the teacher
(``θ_o``); while training the next experiences, the new model's outputs on
the *current* data are kept close to the teacher's, on the outputs that
belong to what was learned before:

.. math::

  \\mathcal{L}(\\theta) = \\mathcal{L}_{\\text{task}}(\\theta)
    + \\alpha \\sum_{g \\in G_{\\text{old}}}
      \\frac{1}{B} \\sum_{b=1}^{B} \\Big( -\\sum_{c \\in g}
      \\mathrm{softmax}_g(z^{o}_b / T)_c \\,
      \\log \\mathrm{softmax}_g(z_b / T)_c \\Big)

where ``z`` and ``z^o`` are the student's and the teacher's logits,
``softmax_g`` is taken over the classes of group ``g`` only, and the groups
are

* class- and domain-incremental streams: one group, the classes seen in
  earlier experiences (the "old classes");
* task-incremental streams: one group per earlier task, its classes (the
  "old heads", whose logits come from calling the model with that task id,
  so multi-head models distil every old head).

(Li & Hoiem 2017, eq. 2 with ``T = 2`` in the paper.) ``α`` is ``alpha``,
``T`` is ``temperature``. The teacher is stored in ``LwFState`` (a copy of
the parameters, fixed shape) when an experience ends, so nothing is
recorded per example.

.. warning::

  This is the cross-entropy of the paper; it differs from the KL divergence
  ``KL(p_o ‖ p)`` by the teacher's entropy, a constant with the same
  gradient. Hinton et al. multiply by ``T²`` to keep gradient scales
  comparable across temperatures; Li & Hoiem do not, nor does this module
  (fold it into ``alpha`` if wanted). The paper's warm-up phase (training
  the new head alone first) is not done here.

References:
  Li & Hoiem, `Learning without Forgetting
  <https://arxiv.org/abs/1606.09282>`_, ECCV 2016 / TPAMI 2017.

  Hinton, Vinyals & Dean, `Distilling the knowledge in a neural network
  <https://arxiv.org/abs/1503.02531>`_, 2015.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.models.classifier import Classifier
from jaxcl.strategy import Strategy
from jaxcl.train import init_variables

__all__ = ["LwFState", "lwf", "distillation"]

_NEG = -1e9  # logit of a class outside the group (finite: no 0 * inf)


class LwFState(NamedTuple):
  teacher: Any             # like params: the previous model θ_o
  teacher_state: Any       # like model_state: its non-trained variables
  old_classes: jax.Array   # bool (num_classes,): seen in earlier experiences
  old_tasks: jax.Array     # bool (num_tasks,): tasks of earlier experiences


def distillation(student: jax.Array, teacher: jax.Array, group: jax.Array,
                 mask: jax.Array, temperature: float) -> jax.Array:
  """Mask-weighted mean of the temperature-scaled cross-entropy over a group.

  Args:
    student, teacher: logits ``(B, C)``.
    group: bool ``(C,)``: the classes the softmaxes run over.
    mask: ``(B,)`` example weights.
    temperature: ``T > 0``.

  Returns:
    ``mean_b -Σ_{c∈group} softmax(teacher/T)_c log softmax(student/T)_c``
    (0 for an empty group).
  """
  s = jnp.where(group, student.astype(jnp.float32) / temperature, _NEG)
  t = jnp.where(group, teacher.astype(jnp.float32) / temperature, _NEG)
  p = jax.nn.softmax(t, axis=-1)
  ce = -jnp.sum(jnp.where(group, p * jax.nn.log_softmax(s, axis=-1), 0.),
                axis=-1)
  ce = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return jnp.where(jnp.any(group), ce, 0.)


def _raw_logits(ctx, params, model_state, x, task, train, mask=None):
  """The model's logits without the task-incremental mask (``mask``: the
  real rows, for batch statistics in training mode)."""
  return ctx.forward(params, model_state, x, task, train=train,
                     mask=mask)[0]


def _per_task_logits(ctx, params, model_state, x, train, mask=None):
  """Logits ``(num_tasks, B, C)`` with each task's id given to the model.

  A single-head :class:`Classifier` ignores the task id, so one forward
  pass serves every task; other models (multi-head, hypernetworks) are run
  once per task id with ``vmap``.
  """
  n = ctx.info.num_tasks
  b = x.shape[0]
  if isinstance(ctx.model, Classifier) and ctx.model.num_heads == 1:
    out = _raw_logits(ctx, params, model_state, x,
                      jnp.zeros((b,), jnp.int32), train, mask)
    return jnp.broadcast_to(out, (n,) + out.shape)
  return jax.vmap(lambda t: _raw_logits(
      ctx, params, model_state, x, jnp.full((b,), t, jnp.int32), train,
      mask))(
          jnp.arange(n))


def lwf(alpha: float = 1.0, temperature: float = 2.0) -> Strategy:
  """Learning without Forgetting.

  Args:
    alpha: weight ``α`` (>= 0) of the distillation loss (the paper's
      ``λ_o``).
    temperature: ``T > 0`` (the paper uses 2).

  Raises:
    ValueError: negative ``alpha`` or non-positive ``temperature``.
  """
  checks.nonnegative("lwf: alpha", alpha)
  checks.positive("lwf: temperature T", temperature)

  def init(ctx, key, params):
    del key
    info = ctx.info
    _, variables = init_variables(ctx, jax.random.PRNGKey(0))
    # Copies: the loop donates the state (teacher and params must not alias).
    return LwFState(jax.tree.map(jnp.copy, params), variables,
                    jnp.zeros((info.num_classes,), bool),
                    jnp.zeros((info.num_tasks,), bool))

  def loss(ctx, sstate, params, batch, logits):
    x, mask = batch["x"], batch["mask"]
    teacher = jax.lax.stop_gradient
    if ctx.info.kind != "task":
      t = teacher(_raw_logits(ctx, sstate.teacher, sstate.teacher_state, x,
                              batch["task"], False))
      return alpha * distillation(logits, t, sstate.old_classes, mask,
                                  temperature)
    groups = jnp.asarray(ctx.info.task_classes, bool)  # (num_tasks, C)
    # The hook does not see the student's model_state; in train mode it
    # does not matter (batch norm uses batch statistics), so the teacher's,
    # of the same structure, stands in.
    s_all = _per_task_logits(ctx, params, sstate.teacher_state, x, True,
                             mask)
    t_all = teacher(_per_task_logits(ctx, sstate.teacher,
                                     sstate.teacher_state, x, False))
    per_task = jax.vmap(distillation, in_axes=(0, 0, 0, None, None))(
        s_all, t_all, groups, mask, temperature)
    return alpha * jnp.sum(jnp.where(sstate.old_tasks, per_task, 0.))

  # Compiled once per factory; jit outputs are fresh buffers, so the
  # teacher never aliases the (donated) parameters.
  @jax.jit
  def freeze(ss, params, model_state, classes, task_id):
    return LwFState(params, model_state, ss.old_classes | classes,
                    ss.old_tasks.at[task_id].set(True))

  def after_experience(ctx, state, experience):
    classes = np.zeros((ctx.info.num_classes,), bool)
    classes[list(experience.classes)] = True
    ss = freeze(state.strategy, state.params, state.model_state, classes,
                np.int32(experience.task_id))
    return state.replace(strategy=ss)

  return Strategy(init=init, loss=loss, after_experience=after_experience,
                  name="lwf")
