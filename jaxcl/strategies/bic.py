"""BiC: bias correction of the newest classes' logits, on held-out exemplars.

Wu et al. (2019) observe that a class-incremental learner trained on many
new examples and few exemplars of the old classes is biased toward the new
classes, mostly in the last layer. BiC trains in two stages per experience:

**Stage 1** (the whole experience): the model learns the new data plus the
exemplars of the old classes with a distillation term toward the previous
model (eq. 1-3):

.. math::
   L = \\lambda L_d + (1 - \\lambda) L_c, \\qquad
   L_d = \\sum_{k=1}^{n} -\\hat\\pi_k(x) \\log \\pi_k(x), \\qquad
   \\lambda = \\frac{n}{n + m},

with ``n`` old and ``m`` new classes, ``π`` and ``π̂`` the softmaxes at
temperature ``T`` of the new and previous model's (bias-corrected) logits
over the old classes, and ``L_c`` the softmax cross-entropy over all
classes seen so far.

**Stage 2** (when the experience ends, from the second on): the model is
frozen and two scalars ``α, β`` act on the newest experience's logits,
trained on a small validation set balanced over all classes seen so far
(eq. 4-5):

.. math::
   q_k = \\begin{cases} o_k & k \\le n \\\\
                        \\alpha o_k + \\beta & n < k \\le n + m,
         \\end{cases} \\qquad
   L_b = -\\sum_k [y = k] \\log \\mathrm{softmax}(q)_k .

Earlier experiences keep the ``(α, β)`` they were given when they were the
newest, so every logit goes through its own experience's correction, in
training (both models) and in prediction.

**Validation split.** With a total memory of ``K`` examples and ``c``
classes seen, each class gets ``m = ⌊K / c⌋`` slots, of which
``v = ⌈f·m⌉`` (``f = val_fraction``; the paper's 9:1 train:validation
split) hold *validation* exemplars that are never trained on, and
``m - v`` hold training exemplars. When an experience starts, the first
``v`` training examples of each new class (in the data set's order, as in
FACIL) are held out: they go into the validation memory and their rows are
masked out of every training batch (the stream's rows carry their index,
``batch['index']``). Old classes keep their first ``v`` validation
exemplars. Training exemplars are selected by herding
(:func:`jaxcl.strategies.icarl.select_exemplars`, iCaRL's Algorithm 4) from
the rows that were not held out.

Implementation notes, following FACIL's ``bic.py`` (Masana et al. 2022):
the distillation is the cross-entropy of the softmaxes at ``T``, without a
``T²`` factor (as the paper; Mammoth multiplies by ``T²``); stage 2 is SGD
with momentum 0.9 for ``bias_epochs`` epochs and an L2 penalty
``0.1 β² / 2`` on the bias (the authors' code, as FACIL notes); the
previous model's logits are bias-corrected before distillation. As in
:mod:`jaxcl.strategies.icarl`, exemplars are mixed into every training step
(``batch_size`` per step) instead of being concatenated into one shuffled
training set, and the model's logits for stage 2 are computed once, since
the model is frozen. The validation and training exemplars live in two
memories of ``K`` slots each, of which ``K`` hold examples in total.

References:
  Wu, Chen, Wang, Ye, Liu, Guo & Fu, `Large scale incremental learning
  <https://arxiv.org/abs/1905.13260>`_, CVPR 2019.
  Masana et al., `Class-incremental learning: survey and performance
  evaluation on image classification
  <https://arxiv.org/abs/2010.15277>`_, TPAMI 2022 (FACIL).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies._class_incremental import (exemplar_sizer,
                                                 require_class_stream)
from jaxcl.strategies._epochs import over_epochs
from jaxcl.strategies.icarl import (backbone_features, features,
                                    select_exemplars)
from jaxcl.strategies.lwf import distillation
from jaxcl.strategies.replay import append_rows
from jaxcl.strategy import Strategy, new_classes
from jaxcl.train import device_experience, init_variables

__all__ = ["BiCState", "bic", "bias_correct", "bic_loss", "fit_bias",
           "split_sizes"]

_NEG = -1e9
_BIG = np.iinfo(np.int32).max


class BiCState(NamedTuple):
  memory: buffers.Memory  # training exemplars (K slots)
  rank: jax.Array         # int32 (K,): herding position within the class
  val: buffers.Memory     # held-out validation exemplars (K slots)
  val_rank: jax.Array     # int32 (K,): position within the class
  held: jax.Array         # int32 (K,): this experience's held-out rows, -1
  alpha: jax.Array        # float32 (E,): each experience's scale
  beta: jax.Array         # float32 (E,): each experience's shift
  class_exp: jax.Array    # int32 (C,): experience of each class, -1 unseen
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): classes of the current experience
  teacher: Any            # params of the model after the last experience
  teacher_model_state: Any
  key: jax.Array          # PRNG key (exemplar sampling, stage 2 order)


def split_sizes(mem_size: int, n_seen: int, val_fraction: float
                ) -> tuple[int, int]:
  """``(training, validation)`` exemplars per class with ``n_seen``
  classes: ``m - v`` and ``v = ⌈f·m⌉``, ``m = ⌊K / n_seen⌋``."""
  m = mem_size // max(n_seen, 1)
  v = math.ceil(val_fraction * m)
  return m - v, v


def bias_correct(logits: jax.Array, alpha: jax.Array, beta: jax.Array,
                 class_exp: jax.Array) -> jax.Array:
  """``α_e o_k + β_e`` for each class ``k`` of experience ``e`` (classes
  not seen yet are left alone)."""
  e = jnp.maximum(class_exp, 0)
  a = jnp.where(class_exp >= 0, alpha[e], 1.0)
  b = jnp.where(class_exp >= 0, beta[e], 0.0)
  return logits.astype(jnp.float32) * a + b


def bic_loss(logits: jax.Array, teacher_logits: jax.Array, y: jax.Array,
             mask: jax.Array, old: jax.Array, active: jax.Array,
             lam: jax.Array, temperature: float) -> jax.Array:
  """Stage 1's ``λ L_d + (1 - λ) L_c`` (mask-weighted means over rows).

  Args:
    logits, teacher_logits: bias-corrected ``(B, C)``.
    y: labels ``(B,)``; mask: row weights ``(B,)``.
    old: bool ``(C,)``: the distilled classes; active: bool ``(C,)``: the
      classes of the cross-entropy (old and new).
    lam: the weight ``λ`` of the distillation.
    temperature: ``T``.
  """
  ce = cross_entropy(jnp.where(active, logits, _NEG), y, mask)
  kd = distillation(logits, jax.lax.stop_gradient(teacher_logits), old,
                    mask, temperature)
  return (1.0 - lam) * ce + lam * kd


def fit_bias(key: jax.Array, logits: jax.Array, y: jax.Array,
             valid: jax.Array, alpha: jax.Array, beta: jax.Array,
             class_exp: jax.Array, experience: jax.Array, active: jax.Array,
             *, epochs: int, batch_size: int, learning_rate: float,
             beta_decay: float, momentum: float | None = 0.9
             ) -> tuple[jax.Array, jax.Array]:
  """Stage 2: ``(α, β)`` of ``experience`` fitted on frozen logits.

  SGD with ``momentum`` (BiC's 0.9; None: plain SGD, as ER with tricks'
  bias control) over ``epochs`` passes through the valid rows in a
  fresh random order (steps with no valid row are skipped), minimising the
  cross-entropy over the ``active`` classes of the corrected logits plus
  ``beta_decay · β² / 2``. The other experiences' ``(α, β)`` are constants.
  Returns the updated ``alpha`` and ``beta`` arrays.
  """
  tx = optax.sgd(learning_rate, momentum=momentum)
  p0 = (alpha[experience], beta[experience])

  def loss_fn(p, idx, ok):
    a = alpha.at[experience].set(p[0])
    b = beta.at[experience].set(p[1])
    q = bias_correct(logits[idx], a, b, class_exp)
    q = jnp.where(active, q, _NEG)
    return (cross_entropy(q, y[idx], ok.astype(jnp.float32))
            + beta_decay * jnp.square(p[1]) / 2)

  def step(carry, idx, ok, *_):
    p, opt = carry
    g = jax.grad(loss_fn)(p, idx, ok)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt

  p, _ = over_epochs(key, valid, (p0, tx.init(p0)), epochs=epochs,
                     batch_size=batch_size, step=step)
  return alpha.at[experience].set(p[0]), beta.at[experience].set(p[1])


def bic(mem_size: int = 2000, batch_size: int = 0, val_fraction: float = 0.1,
        temperature: float = 2.0, lam: float | None = None,
        bias_epochs: int = 200, bias_lr: float = 0.1,
        bias_batch_size: int = 0, beta_decay: float = 0.1) -> Strategy:
  """BiC (class-incremental streams).

  Args:
    mem_size: total exemplars ``K`` (training and validation together).
    batch_size: training exemplars appended to each training batch (0: the
      training batch size).
    val_fraction: share ``f`` of each class's slots held out for stage 2
      (the paper: 0.1); at least one per class.
    temperature: ``T`` of the distillation (the paper: 2).
    lam: the distillation's weight ``λ``; None for the paper's
      ``n / (n + m)`` (old over seen classes), else a number in [0, 1].
    bias_epochs: stage 2's epochs over the validation exemplars (FACIL:
      200).
    bias_lr: stage 2's learning rate (SGD, momentum 0.9; FACIL uses the
      model's, 0.1 by default).
    bias_batch_size: stage 2's batch size (0: the training batch size).
    beta_decay: weight of stage 2's ``β² / 2`` penalty (the authors'
      code: 0.1).

  Raises:
    ValueError: on a bad argument; at ``init``, on a stream that is not
    class-incremental, or a ``mem_size`` that leaves no training exemplar
    per class once every class is seen.
  """
  replay_size = exemplar_sizer("bic", mem_size, batch_size)
  if isinstance(val_fraction, bool) or not isinstance(
      val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
    raise ValueError(f"bic: val_fraction must be in (0, 1), got "
                     f"{val_fraction!r}")
  checks.positive("bic: temperature", temperature)
  if lam is not None and (isinstance(lam, bool) or not isinstance(
      lam, (int, float)) or not 0.0 <= lam <= 1.0):
    raise ValueError(f"bic: lam must be None (the paper's n / (n + m)) or "
                     f"a number in [0, 1], got {lam!r}")
  checks.whole("bic: bias_epochs", bias_epochs)
  checks.positive("bic: bias_lr", bias_lr)
  checks.whole("bic: bias_batch_size", bias_batch_size,
               note="0: the training batch size")
  checks.nonnegative("bic: beta_decay", beta_decay)

  def init(ctx, key, params):
    info = ctx.info
    require_class_stream("bic", info, "corrects the bias toward the newest "
                         "classes")
    c = info.num_classes
    per_class, _ = split_sizes(mem_size, c, val_fraction)
    if per_class < 1:
      raise ValueError(
          f"bic: mem_size={mem_size} leaves no training exemplar per class "
          f"for {c} classes with val_fraction={val_fraction}; use mem_size "
          f">= {2 * c}")
    replay_size(ctx)
    _, variables = init_variables(ctx, jax.random.fold_in(key, 1))
    e = info.num_experiences
    return BiCState(
        memory=buffers.init(mem_size, info.input_shape),
        rank=jnp.full((mem_size,), _BIG, jnp.int32),
        val=buffers.init(mem_size, info.input_shape),
        val_rank=jnp.full((mem_size,), _BIG, jnp.int32),
        held=jnp.full((mem_size,), -1, jnp.int32),
        alpha=jnp.ones((e,), jnp.float32), beta=jnp.zeros((e,), jnp.float32),
        class_exp=jnp.full((c,), -1, jnp.int32),
        seen=jnp.zeros((c,), bool), current=jnp.zeros((c,), bool),
        teacher=jax.tree.map(jnp.copy, params),
        teacher_model_state=variables, key=key)

  def before_experience(ctx, state, experience):
    ss = state.strategy
    c = ctx.info.num_classes
    seen = np.asarray(ss.seen)
    y = np.asarray(experience.train_y)
    new = new_classes("bic", seen, experience)
    cur = np.zeros((c,), bool)
    cur[new] = True
    _, v = split_sizes(mem_size, int(np.sum(seen | cur)), val_fraction)
    held = []
    for cls in new:
      rows = np.flatnonzero(y == cls)[:v]
      if rows.size < v:
        raise ValueError(f"bic: class {cls} of experience "
                         f"{experience.index} has {rows.size} training "
                         f"examples, fewer than the {v} held out for "
                         f"validation; lower mem_size or val_fraction")
      held.append(rows)
    held = np.concatenate(held)
    # Old classes keep their first v validation exemplars; the new ones
    # take the free slots.
    val_rank = np.asarray(ss.val_rank)
    keep = np.asarray(ss.val.valid) & (val_rank < v)
    free = np.flatnonzero(~keep)[:held.size]
    if free.size < held.size:  # cannot happen: v * classes <= mem_size
      raise AssertionError("bic: validation memory overflow")
    pos = np.concatenate([np.arange(np.sum(y == cls))[:v] for cls in new])
    val = ss.val
    x = experience.train_x[held]
    val = buffers.Memory(
        x=val.x.at[free].set(jnp.asarray(x, val.x.dtype)),
        y=val.y.at[free].set(jnp.asarray(y[held], jnp.int32)),
        task=val.task.at[free].set(
            jnp.asarray(experience.train_task[held], jnp.int32)),
        experience=val.experience.at[free].set(experience.index),
        valid=jnp.asarray(keep).at[free].set(True),
        seen=val.seen + held.size)
    ss = ss._replace(
        val=val,
        val_rank=jnp.asarray(np.where(keep, val_rank, _BIG)).at[free].set(
            jnp.asarray(pos, jnp.int32)),
        held=jnp.full((mem_size,), -1, jnp.int32).at[:held.size].set(
            jnp.asarray(held, jnp.int32)),
        class_exp=ss.class_exp.at[new].set(experience.index),
        current=jnp.asarray(cur))
    return state.replace(strategy=ss)

  def prepare_batch(ctx, sstate, batch, key):
    if "index" not in batch:
      raise ValueError("bic needs the stream's row indices (batch['index']) "
                       "to hold out its validation exemplars")
    b = ctx.info.batch_size
    held = jnp.any(batch["index"][:b, None] == sstate.held[None, :], -1)
    batch = dict(batch, mask=batch["mask"].at[:b].multiply(
        1.0 - held.astype(jnp.float32)))
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    return append_rows(batch, buffers.gather(sstate.memory, idx, ok))

  def task_loss(ctx, sstate, logits, batch):
    corr = functools.partial(bias_correct, alpha=sstate.alpha,
                             beta=sstate.beta, class_exp=sstate.class_exp)
    teacher = ctx.logits(sstate.teacher, sstate.teacher_model_state,
                         batch["x"], batch["task"])
    n_old = jnp.sum(sstate.seen)
    active = sstate.seen | sstate.current
    weight = (n_old / jnp.maximum(jnp.sum(active), 1)
              if lam is None else jnp.float32(lam))
    return bic_loss(corr(logits), corr(teacher), batch["y"], batch["mask"],
                    sstate.seen, active, weight, temperature)

  @functools.partial(jax.jit, static_argnums=0)
  def correct_bias(ctx, ss, params, model_state, experience):
    val = ss.val
    logits = features(lambda p, ms, x, t: ctx.logits(p, ms, x, t), params,
                      model_state, val.x, val.task)
    alpha, beta = fit_bias(
        jax.random.fold_in(ss.key, experience), logits, val.y, val.valid,
        ss.alpha, ss.beta, ss.class_exp, experience, ss.seen | ss.current,
        epochs=bias_epochs,
        batch_size=bias_batch_size or ctx.info.batch_size,
        learning_rate=bias_lr, beta_decay=beta_decay)
    return ss._replace(alpha=alpha, beta=beta)

  @functools.partial(jax.jit, static_argnums=0)
  def update_memory(ctx, ss, params, model_state, x, y, task, n_valid,
                    experience):
    rows = jnp.arange(x.shape[0])
    held = jnp.any(rows[:, None] == ss.held[None, :], -1)
    valid = (rows < n_valid) & ~held
    feats = features(backbone_features(ctx), params, model_state, x, task)
    seen = ss.seen | ss.current
    m = mem_size // jnp.maximum(jnp.sum(seen), 1)
    v = jnp.ceil(val_fraction * m).astype(jnp.int32)
    mem, rank = select_exemplars(feats, ss.memory, ss.rank, x, y, task,
                                 valid, experience, m - v,
                                 ctx.info.num_classes)
    return ss._replace(memory=mem, rank=rank, seen=seen,
                       current=jnp.zeros_like(ss.current),
                       teacher=params, teacher_model_state=model_state)

  def after_experience(ctx, state, experience):
    ss = state.strategy
    if experience.index > 0 and bias_epochs > 0:
      ss = correct_bias(ctx, ss, state.params, state.model_state,
                        jnp.asarray(experience.index, jnp.int32))
    data = device_experience(experience, ctx.info.train_size)
    ss = update_memory(ctx, ss, state.params, state.model_state,
                       data["x"], data["y"], data["task"],
                       jnp.asarray(experience.num_train, jnp.int32),
                       jnp.asarray(experience.index, jnp.int32))
    return state.replace(strategy=ss)

  def predict(ctx, sstate, params, model_state, x, task):
    return bias_correct(ctx.logits(params, model_state, x, task),
                        sstate.alpha, sstate.beta, sstate.class_exp)

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, task_loss=task_loss,
                  after_experience=after_experience, predict=predict,
                  name="bic")
