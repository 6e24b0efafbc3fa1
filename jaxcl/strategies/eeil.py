"""EEIL: end-to-end incremental learning with a balanced fine-tuning.

Castro et al. (2018) train the whole network on the new data plus a fixed
memory of exemplars, with a classification loss over every class seen and
a distillation loss that keeps the old classes' outputs (eq. 1-3):

.. math::
   L(\\omega) = L_C(\\omega) + \\lambda \\sum_{f=1}^{F} L_{D_f}(\\omega),
   \\qquad
   L_{D_f} = -\\frac{1}{N} \\sum_{i=1}^{N} \\sum_{j \\in f}
     p^{dist}_{ij} \\log q^{dist}_{ij},

where ``L_C`` is the softmax cross-entropy over all classes seen so far,
``f`` runs over the old experiences' groups of classes (the paper's old
classification layers), and ``p^dist = softmax(o_old / T)``, ``q^dist =
softmax(o / T)`` are the previous and current model's softmaxes *within
the group* at temperature ``T`` (2 in the paper).

**Balanced fine-tuning** (the paper's Sec. 4.3): training on many new
examples and few exemplars leaves the classifier biased toward the new
classes. When an experience ends (from the second on), the network is
fine-tuned for a few epochs at a small learning rate on a *balanced*
subset: the memory's exemplars of the old classes and, for each new
class, as many of its training examples (drawn at random) as an old class
has exemplars (``per_class`` of them when the memory grows). Because that
subset is small, "a temporary distillation loss for the new classes" is
added: their targets are the outputs of the model as it was before the
fine-tuning, the old classes' still those of the previous experience's
model. Then the memory is updated: herding (iCaRL's Algorithm 4,
:func:`jaxcl.strategies.icarl.select_exemplars`) picks ``K / |seen|``
exemplars per class (or a fixed ``per_class``) with the fine-tuned
network, which becomes the next experience's teacher. Prediction is the
network's own output over the classes seen so far (no nearest-mean
classifier).

Implementation notes, against FACIL's ``eeil.py`` (Masana et al. 2022):

* The distillation is the paper's cross-entropy between the tempered
  softmaxes of each old group, without a ``T²`` factor; FACIL uses
  ``binary_cross_entropy`` between them.
* FACIL's unbalanced stage distils every old head but the newest
  (``range(t - 1)``) and its fine-tuning distils all old heads from the
  previous model (``range(t)``), with no target for the new ones. Here the
  paper's: every old group in both stages, and the new group in the
  fine-tuning from the model before it.
* FACIL's balanced subset takes ``|memory|`` random rows of the new data
  in all; here, per new class, as many as an old class holds (the
  paper), capped at ``K / |new|`` so the subset fits ``2K`` static slots.
* The fine-tuning is SGD with momentum (default 0.9) from
  ``finetune_lr`` (the paper: 0.01, a tenth of the training rate), divided
  by ``lr_decay`` every ``decay_epochs`` epochs (the paper: 10 and 10,
  as for training); ``finetune_epochs`` defaults to 30 (FACIL: 40).
* The paper's crops and mirroring are the run's ``train.augment``
  (``('pad_crop', 'flip')``), which also augments the balanced
  fine-tuning's batches (its targets then come from the augmented rows,
  as a PyTorch loader's transform gives them). Not reproduced: its
  brightness and contrast changes, its gradient noise (FACIL's default
  leaves that off too), and its L2 weight decay (use the optimiser's).
* As in :mod:`jaxcl.strategies.icarl`, exemplars are mixed into every
  training step (``batch_size`` per step) instead of being concatenated
  into one shuffled training set; one head covers all classes, the
  classes not seen yet masked out of the cross-entropy and the prediction.

References:
  Castro, Marín-Jiménez, Guil, Schmid & Alahari, `End-to-end incremental
  learning <https://arxiv.org/abs/1807.09536>`_, ECCV 2018.
  Masana et al., `Class-incremental learning: survey and performance
  evaluation on image classification
  <https://arxiv.org/abs/2010.15277>`_, TPAMI 2022 (FACIL).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy_over
from jaxcl.strategies._class_incremental import (
    append_exemplars, exemplar_sizer, herding_update,
    init_teacher_exemplars, mark_class_experience, predict_seen)
from jaxcl.strategies._epochs import over_epochs
from jaxcl.strategies.icarl import check_per_class, exemplar_hook, features
from jaxcl.strategies.lwf import distillation
from jaxcl.strategy import Strategy

__all__ = ["EEILState", "eeil", "group_distillation", "distil_old_groups",
           "balanced_subset"]


class EEILState(NamedTuple):
  memory: buffers.Memory  # exemplars (K slots)
  rank: jax.Array         # int32 (K,): herding position within the class
  class_exp: jax.Array    # int32 (C,): experience of each class, -1 unseen
  experience: jax.Array   # int32 scalar: the current experience
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): classes of the current experience
  teacher: Any            # params of the model after the last experience
  teacher_model_state: Any
  key: jax.Array          # PRNG key (balanced subset, fine-tuning order)


def group_distillation(logits: jax.Array, teacher_logits: jax.Array,
                       class_exp: jax.Array, upto: jax.Array,
                       mask: jax.Array, temperature: float,
                       num_groups: int | None = None) -> jax.Array:
  """``Σ_f L_{D_f}``: the tempered cross-entropy within each group ``f``
  of classes that came in one experience before ``upto``.

  Args:
    logits, teacher_logits: ``(B, C)``.
    class_exp: int32 ``(C,)``: each class's experience (-1: not seen).
    upto: groups of experiences ``< upto`` are distilled.
    mask: ``(B,)`` row weights (each group's term is their weighted mean).
    temperature: ``T``.
    num_groups: the number of experiences (default: one per class, the
      most there can be); each group costs a softmax over the batch.
  """
  n = num_groups or class_exp.shape[0]
  groups = (class_exp[None, :] == jnp.arange(n)[:, None]) & (
      jnp.arange(n)[:, None] < upto)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  per = jax.vmap(distillation, in_axes=(None, None, 0, None, None))(
      logits, teacher_logits, groups, mask, temperature)
  return jnp.sum(per)


def distil_old_groups(ctx, sstate, logits: jax.Array, batch: dict,
                      temperature: float) -> jax.Array:
  """:func:`group_distillation` of a training batch's ``logits`` from the
  state's teacher (the model as the previous experience ended), over the
  groups of the experiences before the current one: EEIL's distillation
  term, and SS-IL's task-wise one (which scales it by ``T²``).

  ``sstate`` has ``teacher``, ``teacher_model_state``, ``class_exp`` and
  ``experience`` (see :func:`jaxcl.strategies._class_incremental.
  mark_class_experience`).
  """
  # The teacher is a constant of the step: its params live in the strategy
  # state, not in the differentiated ``params``; evaluation mode, as a
  # frozen copy.
  teacher = ctx.logits(sstate.teacher, sstate.teacher_model_state,
                       batch["x"], batch["task"])
  return group_distillation(logits, teacher, sstate.class_exp,
                            sstate.experience, batch["mask"], temperature,
                            ctx.info.num_experiences)


def balanced_subset(key: jax.Array, y: jax.Array, valid: jax.Array,
                    classes: jax.Array, per_class: jax.Array, size: int
                    ) -> tuple[jax.Array, jax.Array]:
  """Up to ``per_class`` random valid rows of each class in ``classes``.

  Returns ``(idx, ok)`` of ``size`` slots: the chosen rows' indices first
  (grouped by class), ``ok`` False on the unused slots.
  """
  n = y.shape[0]
  eligible = valid & classes[y]
  score = jax.random.uniform(key, (n,))
  # Sorted by class, in random order within a class; the rest last.
  order = jnp.argsort(jnp.where(eligible, y + score, classes.shape[0] + 1.0))
  ys = jnp.where(eligible[order], y[order], classes.shape[0])
  pos = jnp.arange(n) - jnp.searchsorted(ys, ys, side="left")
  chosen = eligible[order] & (pos < per_class)
  first = jnp.argsort(~chosen, stable=True)[:size]
  return order[first], chosen[first]


def eeil(mem_size: int = 2000, batch_size: int = 0, lam: float = 1.0,
         temperature: float = 2.0, finetune_epochs: int = 30,
         finetune_lr: float = 0.01, finetune_batch_size: int = 0,
         momentum: float = 0.9, decay_epochs: int = 10,
         lr_decay: float = 10.0, per_class: int = 0) -> Strategy:
  """EEIL (class-incremental streams).

  Args:
    mem_size: total exemplars ``K`` (fixed, shared by the classes seen).
    batch_size: exemplars appended to each training batch (0: the training
      batch size).
    lam: weight ``λ`` of the distillation (FACIL: 1).
    temperature: ``T`` (the paper: 2).
    finetune_epochs: epochs of the balanced fine-tuning (0: none; then
      EEIL is herding replay with distillation).
    finetune_lr: its initial learning rate (SGD; the paper: 0.01).
    finetune_batch_size: its batch size (0: the training batch size).
    momentum: its SGD momentum (0: plain SGD).
    decay_epochs, lr_decay: the rate is divided by ``lr_decay`` every
      ``decay_epochs`` epochs.
    per_class: > 0: every class keeps this many exemplars, a memory that
      grows with the classes (``mem_size`` its capacity); 0: the paper's
      fixed ``K = mem_size`` shared by the classes seen.

  Raises:
    ValueError: on a bad argument; at ``init``, on a stream that is not
    class-incremental or ``mem_size`` smaller than the number of classes
    (or than ``per_class`` times it); at an experience's start, on
    classes that came in an earlier one.
  """
  replay_size = exemplar_sizer("eeil", mem_size, batch_size)
  checks.nonnegative("eeil: lam", lam)
  checks.positive("eeil: temperature", temperature)
  checks.whole("eeil: finetune_epochs", finetune_epochs)
  checks.positive("eeil: finetune_lr", finetune_lr)
  checks.whole("eeil: finetune_batch_size", finetune_batch_size,
               note="0: the training batch size")
  checks.fraction("eeil: momentum", momentum)
  checks.whole("eeil: decay_epochs", decay_epochs, minimum=1)
  checks.at_least("eeil: lr_decay", lr_decay, 1,
                  note=" (the rate is divided by it)")
  check_per_class("eeil", mem_size, per_class)

  def init(ctx, key, params):
    k_ms, k_run = jax.random.split(key)
    return EEILState(**init_teacher_exemplars(
        "eeil", "balances old and new classes", ctx, k_ms, params, mem_size,
        replay_size, per_class), key=k_run)

  def task_loss(ctx, sstate, logits, batch):
    ce = cross_entropy_over(logits, batch["y"], batch["mask"],
                            sstate.seen | sstate.current)
    return ce + lam * distil_old_groups(ctx, sstate, logits, batch,
                                        temperature)

  @functools.partial(jax.jit, static_argnums=0)
  def finetune(ctx, ss, params, model_state, x, y, task, n_valid):
    """The balanced fine-tuning: ``(params, model_state)`` after it."""
    k_sub, k_fit = jax.random.split(jax.random.fold_in(ss.key,
                                                       ss.experience))
    n_old = jnp.maximum(jnp.sum(ss.seen), 1)
    n_new = jnp.maximum(jnp.sum(ss.current), 1)
    # As many as an old class holds (check_memory_fits keeps a growing
    # memory's per_class * |new| within the mem_size slots).
    held = per_class or mem_size // n_old
    take = jnp.minimum(held, mem_size // n_new)
    valid = jnp.arange(x.shape[0]) < n_valid
    idx, ok = balanced_subset(k_sub, y, valid, ss.current, take, mem_size)
    mem = ss.memory
    xs = jnp.concatenate([mem.x, x[idx].astype(mem.x.dtype)])
    ys = jnp.concatenate([mem.y, y[idx]])
    ts = jnp.concatenate([mem.task, task[idx]])
    rows = jnp.concatenate([mem.valid & ss.seen[mem.y], ok])
    # Targets: the old classes' from the previous experience's model, the
    # new classes' from the model before this fine-tuning (both frozen,
    # so computed once; per batch, on the rows as augmented, when
    # train.augment augments them).
    logit_fn = lambda p, ms, xb, tb: ctx.logits(p, ms, xb, tb)
    start, start_ms = params, model_state

    def targets_of(run, xb, tb):
      # ``run``: logit_fn for a batch, or over all rows in batches.
      return jnp.where(ss.current[None, :], run(start, start_ms, xb, tb),
                       run(ss.teacher, ss.teacher_model_state, xb, tb))

    if ctx.augment is None:
      all_targets = targets_of(
          lambda p, ms, x, t: features(logit_fn, p, ms, x, t), xs, ts)
    active = ss.seen | ss.current
    tx = optax.sgd(1.0, momentum=momentum or None)

    def step(carry, idx, ok, key, epoch, j):
      del j
      p, ms, opt = carry
      xb = ctx.augmented(key, xs[idx])
      tgt = (all_targets[idx] if ctx.augment is None
             else targets_of(logit_fn, xb, ts[idx]))

      def loss_fn(p):
        logits, ms2 = ctx.apply(p, ms, xb, ts[idx], train=True, mask=ok)
        w = ok.astype(jnp.float32)
        ce = cross_entropy_over(logits, ys[idx], w, active)
        kd = group_distillation(logits, tgt, ss.class_exp,
                                ss.experience + 1, w, temperature,
                                ctx.info.num_experiences)
        return ce + lam * kd, ms2

      (_, ms2), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
      upd, opt = tx.update(g, opt, p)
      rate = finetune_lr / lr_decay ** (epoch // decay_epochs)
      upd = jax.tree.map(lambda u: rate * u, upd)
      return optax.apply_updates(p, upd), ms2, opt

    params, model_state, _ = over_epochs(
        k_fit, rows, (params, model_state, tx.init(params)),
        epochs=finetune_epochs,
        batch_size=finetune_batch_size or ctx.info.batch_size, step=step)
    return params, model_state

  def balance(ctx, state, experience, x, y, task, n_valid):
    if experience.index == 0 or finetune_epochs == 0:
      return state
    params, model_state = finetune(ctx, state.strategy, state.params,
                                   state.model_state, x, y, task, n_valid)
    return state.replace(params=params, model_state=model_state)

  after_experience = exemplar_hook(herding_update(mem_size, per_class),
                                   train=balance)

  return Strategy(init=init, before_experience=mark_class_experience("eeil"),
                  prepare_batch=append_exemplars(replay_size),
                  task_loss=task_loss, after_experience=after_experience,
                  predict=predict_seen, name="eeil",
                  writes_params=frozenset({"after_experience"}))
