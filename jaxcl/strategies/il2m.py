"""IL2M: class-incremental learning with a dual memory.

Belouadah & Popescu (2019) fine-tune the model on new data plus a bounded
memory of exemplars, and keep a second, tiny memory of *statistics* that
undoes the resulting bias toward the newest classes at prediction time.
For each class ``c`` it stores ``μ^p(c)``, the mean score of ``c`` on its
own training images in the state where it was new, and ``μ^n(c)``, its mean
score on its exemplars in the current state; for each state ``s`` it
stores the model's confidence ``μ(M_s)``, the mean top score over the
images of the classes new in ``s``. When the top prediction for an image
is one of the newest classes, the scores of every older class ``c`` (new
in state ``s_c``) are rectified (eq. 1):

.. math::
   p^r(c) = p(c) \\cdot \\frac{\\mu^p(c)}{\\mu^n(c)} \\cdot
            \\frac{\\mu(M_{now})}{\\mu(M_{s_c})},

and the prediction is taken again; when an old class is on top already,
the scores are left alone.

Implementation notes, following FACIL's ``il2m.py`` (Masana et al. 2022),
which Avalanche's ``IL2MPlugin`` also follows: the scores are the raw
logits (the authors' ``il2m.py`` reads "raw prediction scores" too; a
negative mean makes a negative ratio, as there), computed in
evaluation mode at the end of each experience on its training rows (the
new classes' ``μ^p`` and the state's confidence; the confidence is the top
logit over the classes seen so far) and on the exemplars of the old
classes (their ``μ^n``), before the memory is updated; a class whose
``μ^n`` is 0 keeps its score (Avalanche's guard). The paper's ratio
assumes positive scores: an under-trained model whose old class has a
negative mean logit on its exemplars gets a negative factor, which turns
that class's negative logits into large positive ones (BUILD_NOTES shows
such a case on Split Digits after one epoch). Training is plain
cross-entropy over the classes seen so far. As in
:mod:`jaxcl.strategies.icarl`, exemplars are selected by herding (FACIL's
default is random selection) and mixed into every training step
(``batch_size`` per step); one head covers all classes, and classes not
seen yet are masked out of the cross-entropy and the prediction.

References:
  Belouadah & Popescu, `IL2M: class incremental learning with dual memory
  <https://openaccess.thecvf.com/content_ICCV_2019/html/Belouadah_IL2M_Class_Incremental_Learning_With_Dual_Memory_ICCV_2019_paper.html>`_,
  ICCV 2019.
  Masana et al., `Class-incremental learning: survey and performance
  evaluation on image classification
  <https://arxiv.org/abs/2010.15277>`_, TPAMI 2022 (FACIL).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import buffers, checks
from jaxcl.strategies._class_incremental import (
    append_exemplars, exemplar_sizer, mark_new_classes, predict_seen,
    require_class_stream, seen_cross_entropy)
from jaxcl.strategies.icarl import (backbone_features, exemplar_hook,
                                    features, require_per_class,
                                    select_exemplars)
from jaxcl.strategy import Strategy

__all__ = ["IL2MState", "il2m", "class_statistics", "rectify"]

_NEG = -1e9
_BIG = np.iinfo(np.int32).max


class IL2MState(NamedTuple):
  memory: buffers.Memory  # exemplars (K slots)
  rank: jax.Array         # int32 (K,): herding position within the class
  init_mean: jax.Array    # float32 (C,): μ^p, each class's score when new
  cur_mean: jax.Array     # float32 (C,): μ^n, its score on its exemplars now
  confidence: jax.Array   # float32 (E,): μ(M_s), each state's confidence
  class_exp: jax.Array    # int32 (C,): the experience each class came in, -1
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): classes of the current experience
  newest: jax.Array       # bool (C,): classes of the last finished one


def class_statistics(logits: jax.Array, y: jax.Array, valid: jax.Array,
                     active: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-class mean own score and the mean top score over the rows.

  Args:
    logits: ``(N, C)`` scores; y: labels; valid: bool ``(N,)``.
    active: bool ``(C,)``, the classes the top score is taken over.

  Returns:
    ``(mean, top)``: ``mean[c]`` the mean of ``logits[i, c]`` over the
    valid rows of class ``c`` (0 for a class without one), and ``top`` the
    mean over the valid rows of ``max_c logits[i, c]`` over ``active``.
  """
  w = valid.astype(jnp.float32)
  own = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  c = logits.shape[-1]
  sums = jnp.zeros((c,), jnp.float32).at[y].add(w * own)
  counts = jnp.zeros((c,), jnp.float32).at[y].add(w)
  mean = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)
  top = jnp.max(jnp.where(active[None, :], logits, _NEG), axis=-1)
  return mean, jnp.sum(w * top) / jnp.maximum(jnp.sum(w), 1.0)


def rectify(logits: jax.Array, init_mean: jax.Array, cur_mean: jax.Array,
            confidence: jax.Array, class_exp: jax.Array, old: jax.Array,
            newest: jax.Array, now: jax.Array) -> jax.Array:
  """Eq. 1 on ``(N, C)`` logits whose top class is among ``newest``.

  The scores of the ``old`` classes are multiplied by
  ``(init_mean / cur_mean) · (confidence[now] / confidence[class_exp])``
  (1 where ``cur_mean`` is 0); other rows and classes are unchanged.
  """
  safe = jnp.where(cur_mean != 0, cur_mean, 1.0)
  then = confidence[jnp.maximum(class_exp, 0)]
  factor = (init_mean / safe) * (confidence[now] / jnp.where(
      then != 0, then, 1.0))
  factor = jnp.where(old & (cur_mean != 0), factor, 1.0)
  top_is_new = newest[jnp.argmax(logits, axis=-1)]
  return jnp.where(top_is_new[:, None], logits * factor[None, :], logits)


def il2m(mem_size: int = 2000, batch_size: int = 0,
         rectify_scores: bool = True) -> Strategy:
  """IL2M (class-incremental streams).

  Args:
    mem_size: total exemplars ``K`` (fixed, shared by the classes seen).
    batch_size: exemplars appended to each training batch (0: the training
      batch size).
    rectify_scores: apply eq. 1 at prediction (False: herded replay with
      the same memory, the ablation).

  Raises:
    ValueError: on a bad argument; at ``init``, on a stream that is not
    class-incremental or ``mem_size`` smaller than the number of classes;
    at an experience's start, on classes that came in an earlier one.
  """
  replay_size = exemplar_sizer("il2m", mem_size, batch_size)
  checks.flag("il2m: rectify_scores", rectify_scores)

  def init(ctx, key, params):
    del key, params
    info = ctx.info
    require_class_stream("il2m", info, "rectifies the scores of the old "
                         "classes")
    c = info.num_classes
    require_per_class("il2m", mem_size, c)
    replay_size(ctx)
    zeros = jnp.zeros((c,), jnp.float32)
    no = jnp.zeros((c,), bool)
    return IL2MState(
        memory=buffers.init(mem_size, info.input_shape),
        rank=jnp.full((mem_size,), _BIG, jnp.int32),
        init_mean=zeros, cur_mean=zeros,
        confidence=jnp.zeros((info.num_experiences,), jnp.float32),
        class_exp=jnp.full((c,), -1, jnp.int32),
        seen=no, current=no, newest=no)

  @functools.partial(jax.jit, static_argnums=0)
  def update_memory(ctx, ss, params, model_state, x, y, task, n_valid,
                    experience):
    valid = jnp.arange(x.shape[0]) < n_valid
    seen = ss.seen | ss.current
    logit_fn = lambda p, ms, xs, t: ctx.logits(p, ms, xs, t)
    # The state's statistics, before the memory changes (FACIL): the new
    # classes on their training rows, the old ones on their exemplars.
    new_mean, conf = class_statistics(
        features(logit_fn, params, model_state, x, task), y, valid, seen)
    mem = ss.memory
    old_mean, _ = class_statistics(
        features(logit_fn, params, model_state, mem.x, mem.task), mem.y,
        mem.valid & ss.seen[mem.y], seen)
    feats = features(backbone_features(ctx), params, model_state, x, task)
    m = mem_size // jnp.maximum(jnp.sum(seen), 1)
    mem, rank = select_exemplars(feats, mem, ss.rank, x, y, task, valid,
                                 experience, m, ctx.info.num_classes)
    return ss._replace(
        memory=mem, rank=rank,
        init_mean=jnp.where(ss.current, new_mean, ss.init_mean),
        cur_mean=old_mean,  # 0 for classes without exemplars yet
        confidence=ss.confidence.at[experience].set(conf),
        class_exp=jnp.where(ss.current, experience, ss.class_exp),
        seen=seen, newest=ss.current, current=jnp.zeros_like(ss.current))

  def predict(ctx, sstate, params, model_state, x, task):
    logits = predict_seen(ctx, sstate, params, model_state, x, task)
    if not rectify_scores:
      return logits
    now = jnp.max(sstate.class_exp)
    old = sstate.seen & ~sstate.newest
    return rectify(logits, sstate.init_mean, sstate.cur_mean,
                   sstate.confidence, sstate.class_exp, old, sstate.newest,
                   jnp.maximum(now, 0))

  return Strategy(init=init, before_experience=mark_new_classes("il2m"),
                  prepare_batch=append_exemplars(replay_size),
                  task_loss=seen_cross_entropy,
                  after_experience=exemplar_hook(update_memory),
                  predict=predict, name="il2m")
