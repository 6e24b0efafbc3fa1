"""WA: weight aligning of the newest classes' output weights.

Zhao et al. (2020) observe that after an experience of class-incremental
training on many new examples and few exemplars of the old classes, the
output layer's weight vectors of the new classes have larger norms than the
old classes', so the model favours the new classes. WA trains, then
corrects the norms.

**Training** (the whole experience): the new data plus herded exemplars of
the old classes, with knowledge distillation toward the previous model
(eq. 1-3 of the paper):

.. math::
   L = (1 - \\lambda) L_{CE} + \\lambda L_{KD}, \\qquad
   L_{KD} = \\sum_{k=1}^{n} -\\hat\\pi_k(x) \\log \\pi_k(x), \\qquad
   \\lambda = \\frac{n}{n + m},

with ``n`` old and ``m`` new classes, ``π`` and ``π̂`` the softmaxes at
temperature ``T = 2`` of the model's and the previous model's logits over
the old classes, and ``L_CE`` the cross-entropy over the classes seen so
far: BiC's first stage (:func:`jaxcl.strategies.bic.bic_loss`), without a
``T²`` factor, as the authors' code.

**Weight clipping**: after every optimiser step the output layer's weights
are clipped at zero (the authors' code's default, ``clip=True``). The
features an MLP or ResNet hands its output layer are non-negative (after a
ReLU), and so are the weights; a weight vector's norm then measures how
strongly its class responds.

**Weight aligning** (when an experience ends, from the second on, before
its exemplars are chosen and the model becomes the next teacher): with
``W_k`` the output weights of class ``k``,

.. math::
   \\gamma = \\frac{\\mathrm{Mean}(\\|W_1\\|, \\dots, \\|W_n\\|)}
                  {\\mathrm{Mean}(\\|W_{n+1}\\|, \\dots, \\|W_{n+m}\\|)},
   \\qquad \\hat W_{k} = \\gamma W_{k} \\quad (n < k \\le n + m).

The old classes' vectors, the bias and every other parameter are left
alone. The new classes' logits ``W_kᵀ φ(x)`` shrink by ``γ``, which keeps
their order among themselves and removes the norm's advantage over the old
classes.

Implementation notes. Three settings differ between the paper's
descriptions and its two public implementations:

* the norm: ``norm=2`` (the default), the Euclidean norm, as PyCIL's
  ``weight_align``; the authors' code (``bwbwzhao/Weight-Aligning``)
  defaults to the L1 norm (``--norm 1``, with ``--norm 2`` one of its
  runs): ``norm=1``;
* ``clamp_gamma=True`` (the default): ``γ ≤ 1``, as the authors' code
  (new classes are only ever shrunk); PyCIL scales by any ``γ``;
* the bias: the authors' output layer has none (``--withbias`` is an
  ablation); PyCIL's has one and aligns only the weights, as here.

The authors' code applies ``γ`` as a scale on the newest experience's
logits (and rebuilds the output layer at each experience); PyCIL scales
the weights in place and keeps training them, as here. As in
:mod:`jaxcl.strategies.icarl`, exemplars are mixed into every training
step (``batch_size`` per step) instead of being concatenated into one
shuffled training set; one head covers all classes, the classes not seen
yet left out of the cross-entropy and the prediction.

References:
  Zhao, Xiao, Gan, Zhang & Xia, `Maintaining discrimination and fairness
  in class incremental learning <https://arxiv.org/abs/1911.07053>`_,
  CVPR 2020.
  Zhou et al., `PyCIL: a Python toolbox for class-incremental learning
  <https://arxiv.org/abs/2112.12533>`_, 2023 (``models/wa.py``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.strategies._class_incremental import (
    append_exemplars, exemplar_sizer, herding_update, init_teacher_exemplars,
    mark_class_experience, predict_seen)
from jaxcl.strategies.bic import bic_loss
from jaxcl.strategies.icarl import check_per_class, exemplar_hook
from jaxcl.strategy import Strategy, require_single_head

__all__ = ["WAState", "wa", "align_weights", "clip_head"]


class WAState(NamedTuple):
  memory: buffers.Memory  # exemplars (K slots)
  rank: jax.Array         # int32 (K,): herding position within the class
  class_exp: jax.Array    # int32 (C,): experience of each class, -1 unseen
  experience: jax.Array   # int32 scalar: the current experience
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): classes of the current experience
  teacher: Any            # params of the model after the last experience
  teacher_model_state: Any
  gamma: jax.Array        # float32 (E,): each experience's γ (1: none)


def align_weights(kernel: jax.Array, old: jax.Array, new: jax.Array,
                  norm: int = 2, clamp_gamma: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
  """Weight aligning: the ``new`` classes' columns of ``kernel`` scaled by
  ``γ``, the mean norm of the ``old`` classes' columns over the new ones'.

  Args:
    kernel: the output layer's ``(D, C)`` weights (one column per class).
    old, new: bool ``(C,)``: the classes of finished experiences and of
      the one that just ended.
    norm: 1 or 2, the vector norm of each column.
    clamp_gamma: ``γ ≤ 1`` (the authors' code).

  Returns:
    ``(kernel, γ)``; ``γ = 1`` (kernel unchanged) when either set is empty
    or the new columns are all zero.
  """
  k = kernel.astype(jnp.float32)
  norms = (jnp.sum(jnp.abs(k), axis=0) if norm == 1
           else jnp.sqrt(jnp.sum(jnp.square(k), axis=0)))
  mean = lambda m: jnp.sum(jnp.where(m, norms, 0.0)) / jnp.maximum(
      jnp.sum(m), 1)
  m_old, m_new = mean(old), mean(new)
  gamma = jnp.where(jnp.any(old) & jnp.any(new) & (m_new > 0),
                    m_old / jnp.where(m_new > 0, m_new, 1.0), 1.0)
  if clamp_gamma:
    gamma = jnp.minimum(gamma, 1.0)
  scaled = jnp.where(new[None, :], k * gamma, k).astype(kernel.dtype)
  return scaled, gamma


def clip_head(params: dict) -> dict:
  """``params`` with the output layer's weights clipped at zero."""
  head = dict(params["head"], kernel=jnp.maximum(params["head"]["kernel"], 0))
  return dict(params, head=head)


def wa(mem_size: int = 2000, batch_size: int = 0, temperature: float = 2.0,
       lam: float | None = None, align: bool = True, norm: int = 2,
       clamp_gamma: bool = True, clip: bool = True,
       per_class: int = 0) -> Strategy:
  """WA (class-incremental streams).

  Args:
    mem_size: total exemplars ``K`` (fixed, shared by the classes seen;
      the authors' code: 20 per class of the data set, 2000 for CIFAR-100).
    batch_size: exemplars appended to each training batch (0: the training
      batch size).
    temperature: ``T`` of the distillation (the paper: 2).
    lam: the distillation's weight ``λ``; None for the paper's
      ``n / (n + m)`` (old over seen classes), else a number in [0, 1].
    align: align the new classes' weights when an experience ends (False:
      the paper's "KD" row, exemplars and distillation only).
    norm: 2 (Euclidean; the paper's description and PyCIL) or 1 (the
      authors' code's default).
    clamp_gamma: never scale the new classes' weights up (``γ ≤ 1``).
    clip: clip the output layer's weights at zero after every step.
    per_class: > 0: every class keeps this many exemplars, a memory that
      grows with the classes (``mem_size`` its capacity); 0: a fixed
      ``K = mem_size`` shared by the classes seen.

  Raises:
    ValueError: on a bad argument; at ``init``, on a stream that is not
    class-incremental, ``mem_size`` smaller than the number of classes (or
    than ``per_class`` times it), or a model without a linear ``head``
    over all classes; at an experience's start, on classes that came in
    an earlier one.
  """
  replay_size = exemplar_sizer("wa", mem_size, batch_size)
  checks.positive("wa: temperature", temperature)
  if lam is not None and (isinstance(lam, bool) or not isinstance(
      lam, (int, float)) or not 0.0 <= lam <= 1.0):
    raise ValueError(f"wa: lam must be None (the paper's n / (n + m)) or a "
                     f"number in [0, 1], got {lam!r}")
  for flag, value in (("align", align), ("clamp_gamma", clamp_gamma),
                      ("clip", clip)):
    if not isinstance(value, bool):
      raise ValueError(f"wa: {flag} must be True or False, got {value!r}")
  if isinstance(norm, bool) or norm not in (1, 2):
    raise ValueError(f"wa: norm must be 1 or 2 (the vector norm of each "
                     f"class's weights), got {norm!r}")
  check_per_class("wa", mem_size, per_class)

  def init(ctx, key, params):
    fields = init_teacher_exemplars(
        "wa", "aligns the new classes' weights with the old ones'", ctx,
        key, params, mem_size, replay_size, per_class)
    require_single_head(
        "wa", params, ctx.info.num_classes,
        (frozenset({"kernel", "bias"}), frozenset({"kernel"})),
        "a linear 'head' layer (a kernel, with or without a "
        "bias; model.head='linear': a cosine head normalises the weights "
        "whose norms wa aligns)")
    return WAState(**fields, gamma=jnp.ones((ctx.info.num_experiences,),
                                            jnp.float32))

  def task_loss(ctx, sstate, logits, batch):
    # The teacher is a constant of the step (its params live in the
    # strategy state); evaluation mode, as a frozen copy.
    teacher = ctx.logits(sstate.teacher, sstate.teacher_model_state,
                         batch["x"], batch["task"])
    active = sstate.seen | sstate.current
    weight = (jnp.sum(sstate.seen) / jnp.maximum(jnp.sum(active), 1)
              if lam is None else jnp.float32(lam))
    return bic_loss(logits, teacher, batch["y"], batch["mask"],
                    sstate.seen, active, weight, temperature)

  def project_params(ctx, sstate, params):
    del ctx, sstate
    return clip_head(params) if clip else params

  @jax.jit
  def aligned(params, ss):
    kernel, gamma = align_weights(params["head"]["kernel"], ss.seen,
                                  ss.current, norm, clamp_gamma)
    params = dict(params, head=dict(params["head"], kernel=kernel))
    return params, ss._replace(gamma=ss.gamma.at[ss.experience].set(gamma))

  def weight_align(ctx, state, experience, x, y, task, n_valid):
    # Runs before herding (exemplar_hook's ``train``): the state's
    # ``seen`` still holds the old classes and ``current`` the new ones,
    # and the aligned model becomes the next teacher.
    del ctx, x, y, task, n_valid
    if not align or experience.index == 0:
      return state
    params, ss = aligned(state.params, state.strategy)
    return state.replace(params=params, strategy=ss)

  return Strategy(init=init, before_experience=mark_class_experience("wa"),
                  prepare_batch=append_exemplars(replay_size),
                  task_loss=task_loss, project_params=project_params,
                  after_experience=exemplar_hook(
                      herding_update(mem_size, per_class),
                      train=weight_align),
                  predict=predict_seen, name="wa",
                  writes_params=frozenset({"after_experience"}))
