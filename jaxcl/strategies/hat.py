"""HAT: hard attention to the task.

Serra et al. (2018). The model (:mod:`jaxcl.models.hat_mlp`, config
``model.name='hat_mlp'``) gates hidden unit ``i`` of layer ``l`` for task
``t`` by :math:`a_{l,i}^t = \\sigma(s\\, e_{l,i}^t)`, with ``s`` annealed to
``s_max`` over each epoch's batches. This strategy adds the rest of the
method:

* **cumulative attention** after task ``t`` (eq. 4), with ``s = s_max``:
  :math:`a_l^{\\le t} = \\max(a_l^{\\le t-1}, a_l^t)`;
* **gradient conditioning** (eq. 5): a weight from unit ``j`` of layer
  ``l-1`` to unit ``i`` of layer ``l`` is reserved as far as both ends are:

  .. math::  g_{l,ij} \\leftarrow g_{l,ij}\\,
             \\big(1 - \\min(a_{l,i}^{<t}, a_{l-1,j}^{<t})\\big)

  (the first layer uses :math:`a_{l,i}^{<t}` alone, biases too; of the
  task heads only the current task's trains). A unit with :math:`a^{<t} = 1` (``s_max``
  saturates ``sigma`` to exactly 1.0 in float32 for :math:`s e > 17`) is
  frozen exactly;
* **attention regulariser** (eq. 6), added to the loss with weight ``c``:

  .. math::  R = \\frac{\\sum_l \\sum_i a_{l,i}^t (1 - a_{l,i}^{<t})}
                       {\\sum_l \\sum_i (1 - a_{l,i}^{<t})}

* **embedding-gradient compensation** (sec. 2.5, as the authors' code):

  .. math::  g_e \\leftarrow g_e\\, \\frac{s_{max}}{s}\\,
             \\frac{\\cosh(\\mathrm{clip}(s e, \\pm\\theta)) + 1}{\\cosh(e) + 1}

  with :math:`\\theta` = ``thres_cosh`` (50).

``s`` at a step comes from the position in the epoch: this strategy keeps a
step counter in its state (for the regulariser and the compensation) and
resets the model's own counter (``model_state['hat']``) before each
experience; both advance once per optimiser step.

As the authors' code (``joansj/hat``, ``src/approaches/hat.py``), the
gradient is then clipped to global norm ``clipgrad`` (10000) and, after each
optimiser step, the embeddings are clamped to :math:`[-\\theta_e, \\theta_e]`
with :math:`\\theta_e` = ``thres_emb`` (6; the ``project_params`` hook):
the compensated gradient is about
:math:`s_{max} / (2(\\cosh e + 1))\\, \\partial L/\\partial a` whatever
``s``, so it vanishes as :math:`|e|` grows; the clamp keeps every gate
trainable.

Warning:
  Reserved weights stay frozen only if a zero gradient gives a zero update
  (``init`` rejects weight decay).

References:
  Serra, Surís, Miron & Karatzoglou, `Overcoming Catastrophic Forgetting
  with Hard Attention to the Task <https://arxiv.org/abs/1801.01423>`_, 2018.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl import checks
from jaxcl.models.hat_mlp import anneal
from jaxcl.models.masked import (check_zero_grad_is_zero_update, hat_gate,
                                 head_task_grads)
from jaxcl.strategy import Strategy, check_task_seen


class HATState(NamedTuple):
  cum: tuple          # per layer float32 (width_l,): cumulative attention
  count: jax.Array    # int32 scalar: training steps in this experience
  steps: jax.Array    # int32 scalar: batches per epoch (B)
  task: jax.Array     # int32 scalar: the task being trained
  seen: jax.Array     # bool (num_tasks,)


def _layers(params) -> int:
  n = 0
  while f"embedding_{n}" in params:
    n += 1
  return n


def hat(c: float = 0.75, thres_cosh: float = 50.0, thres_emb: float = 6.0,
        clipgrad: float = 10000.0) -> Strategy:
  """HAT (see the module docstring); needs the ``hat_mlp`` model.

  Args:
    c: weight of the attention regulariser (the paper's c; 0.75).
    thres_cosh: clip of ``s e`` in the compensation (50).
    thres_emb: the embeddings are clamped to ``[-thres_emb, thres_emb]``
      after every step (6).
    clipgrad: the gradient's global norm is clipped to this (10000).

  Raises:
    ValueError: ``c < 0`` or ``thres_cosh``, ``thres_emb`` or ``clipgrad``
      not > 0.
  """
  checks.nonnegative("hat: c", c)
  checks.positive("hat: thres_cosh", thres_cosh)
  checks.positive_or_inf("hat: thres_emb", thres_emb)
  checks.positive_or_inf("hat: clipgrad", clipgrad)

  def s_max_of(ctx) -> float:
    return float(ctx.model.s_max)

  def init(ctx, key, params):
    del key
    if not hasattr(ctx.model, "s_max") or not isinstance(params, dict) \
        or _layers(params) == 0:
      raise ValueError("hat needs the 'hat_mlp' model "
                       "(config.model.name='hat_mlp')")
    ctx.info.require_task_per_experience("hat")
    n = _layers(params)
    rows = params["embedding_0"].shape[0]
    ctx.info.require_task_slots("hat", rows, "task embeddings",
                                "model.hat_mlp.num_tasks")
    check_zero_grad_is_zero_update(ctx.tx, params, "hat")
    cum = tuple(jnp.zeros(params[f"embedding_{l}"].shape[1:], jnp.float32)
                for l in range(n))
    return HATState(cum, jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32),
                    jnp.zeros((), jnp.int32), jnp.zeros((rows,), bool))

  def before_experience(ctx, state, experience):
    t = int(experience.task_id)
    ss = state.strategy
    if not 0 <= t < ss.seen.shape[0]:
      raise ValueError(f"task id {t} outside [0, {ss.seen.shape[0]})")
    steps = -(-experience.num_train // ctx.info.batch_size)
    # Separate buffers for the model's and the strategy's copies: the
    # training state is donated, and one buffer may not be donated twice.
    model_state = dict(state.model_state)
    model_state["hat"] = {"count": jnp.zeros((), jnp.int32),
                          "steps": jnp.asarray(steps, jnp.int32)}
    ss = ss._replace(count=jnp.zeros((), jnp.int32),
                     steps=jnp.asarray(steps, jnp.int32),
                     task=jnp.asarray(t, jnp.int32))
    return state.replace(model_state=model_state, strategy=ss)

  def loss(ctx, sstate, params, batch, logits):
    del batch, logits
    s = anneal(sstate.count, sstate.steps, s_max_of(ctx))
    num = jnp.zeros((), jnp.float32)
    den = jnp.zeros((), jnp.float32)
    for l, cum in enumerate(sstate.cum):
      a = hat_gate(params[f"embedding_{l}"][sstate.task], s)
      num = num + jnp.sum(a * (1.0 - cum))
      den = den + jnp.sum(1.0 - cum)
    return c * num / jnp.maximum(den, 1e-12)

  def update_grads(ctx, sstate, grads, params, batch, key):
    del batch, key
    s_max = s_max_of(ctx)
    s = anneal(sstate.count, sstate.steps, s_max)
    grads = dict(grads)
    prev = None
    for l, cum in enumerate(sstate.cum):
      name = f"Dense_{l}"
      g = dict(grads[name])
      if prev is None:
        keep = 1.0 - cum[None, :]
      else:
        keep = 1.0 - jnp.minimum(cum[None, :], prev[:, None])
      g["kernel"] = g["kernel"] * keep
      g["bias"] = g["bias"] * (1.0 - cum)
      grads[name] = g
      prev = cum
      e = params[f"embedding_{l}"]
      num = jnp.cosh(jnp.clip(s * e, -thres_cosh, thres_cosh)) + 1.0
      den = jnp.cosh(e) + 1.0
      grads[f"embedding_{l}"] = grads[f"embedding_{l}"] * (s_max / s) * num / den
    # Other tasks' heads stay put whatever a chained strategy adds.
    grads = head_task_grads(grads, sstate.task, ctx.model.num_tasks)
    # Global-norm clip after masking and compensation (the authors' order);
    # zero entries stay zero, so reserved weights stay frozen.
    norm = optax.tree.norm(grads)  # optax.global_norm is deprecated
    scale = jnp.minimum(1.0, clipgrad / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda g: g * scale, grads)

  def project_params(ctx, sstate, params):
    del ctx, sstate
    params = dict(params)
    for l in range(_layers(params)):
      name = f"embedding_{l}"
      params[name] = jnp.clip(params[name], -thres_emb, thres_emb)
    return params

  def after_step(ctx, sstate, info):
    del ctx, info
    return sstate._replace(count=sstate.count + 1)

  def after_experience(ctx, state, experience):
    ss = state.strategy
    t = int(experience.task_id)
    s_max = s_max_of(ctx)
    cum = tuple(jnp.maximum(cm, hat_gate(state.params[f"embedding_{l}"][t],
                                         s_max))
                for l, cm in enumerate(ss.cum))
    return state.replace(strategy=ss._replace(cum=cum,
                                              seen=ss.seen.at[t].set(True)))

  return Strategy(init=init, before_experience=before_experience, loss=loss,
                  update_grads=update_grads, project_params=project_params,
                  after_step=after_step,
                  after_experience=after_experience, name="hat")


def checked_masks(state, s_max: float, task: int) -> tuple:
  """Task ``task``'s unit attention at ``s_max`` (host side).

  Raises:
    ValueError: ``task`` is outside the tasks seen so far.
  """
  check_task_seen(state.strategy.seen, task)
  p = state.params
  return tuple(hat_gate(p[f"embedding_{l}"][int(task)], s_max)
               for l in range(_layers(p)))
