"""LUCIR: a unified classifier learned incrementally via rebalancing.

Hou et al. (2019) trace the imbalance between the few exemplars of old
classes and the many examples of new ones to three places, and treat each
(class-incremental streams, with an exemplar memory):

**Cosine normalisation** (eq. 4): the head's logits are
``σ ⟨w̄_c, f̄(x)⟩``, cosines between the normalised features and class
weights times one learned scale ``σ``, so new classes cannot win by the
magnitude of their weights or biases (``model.head='cosine'``,
:class:`jaxcl.models.classifier.CosineDense`).

**Less-forget constraint** (eq. 6-7): the normalised features of the
current model ``f̄`` stay close to the previous model's ``f̄*`` on every
training row (new data and exemplars), with the old classes' weights
frozen:

.. math::
   L_{dis}^G = 1 - \\langle \\bar f^*(x), \\bar f(x) \\rangle, \\qquad
   \\lambda = \\lambda_{base} \\sqrt{|C_o| / |C_n|},

``|C_o|`` old and ``|C_n|`` new classes.

**Inter-class separation** (eq. 8): for each exemplar ``x`` of an old
class, its ground-truth cosine must exceed each of its ``K`` highest
new-class cosines ``⟨θ̄^k, f̄(x)⟩`` by a margin ``m``:

.. math::
   L_{mr} = \\sum_{k=1}^{K} \\max\\big(m - \\langle \\bar\\theta(x),
            \\bar f(x) \\rangle + \\langle \\bar\\theta^k, \\bar f(x)
            \\rangle, 0\\big).

The objective (eq. 9) is ``L_ce + λ L_dis^G + λ_mr L_mr``, with ``L_ce``
the cross-entropy of the scaled cosines over the classes seen so far.

**Weight imprinting** (``imprint``, the authors' ``--imprint_weights``,
which their ``run.sh`` sets for the full method): before each experience
after the first, a new class ``c``'s weight starts as the renormalised
mean of the normalised features of its training images under the model
as the last experience left it (evaluation mode, no augmentation), scaled
to the mean norm of the old classes' weights:

.. math::
   w_c = \\frac{\\bar\\mu_c}{\\lVert\\bar\\mu_c\\rVert}\\cdot
         \\frac{1}{|C_o|}\\sum_{o \\in C_o}\\lVert w_o\\rVert, \\qquad
   \\bar\\mu_c = \\frac{1}{n_c}\\sum_{y_i = c} \\bar f(x_i).

**Classifier** (``classifier``): the network's scaled cosines over the
classes seen (``'cnn'``, the paper's "CNN" rows), or the nearest mean of
exemplars as in iCaRL (``'nme'``, the paper's "NME" rows;
:func:`jaxcl.strategies.icarl.ncm_predict`): the renormalised mean of
each class's exemplars' normalised features, computed after every
experience with the model it ended with (with ``mirror_means`` over the
exemplars and their mirror images, as the authors' CIFAR-100 code does).

Implementation notes, following FACIL's ``lucir.py`` (Masana et al. 2022),
which follows the authors' code: ``λ_base = 5``, ``λ_mr = 1``, ``m = 0.5``,
``K = 2``; ``L_mr`` is the mean over old-class rows and their ``K``
negatives (PyTorch's ``MarginRankingLoss``); the less-forget term is the
mean over rows (``CosineEmbeddingLoss``); the previous model runs in
evaluation mode; the old classes' head weights are not trained (here:
restored after each update, so momentum or weight decay cannot move them
either) while ``σ`` is. As in :mod:`jaxcl.strategies.icarl`, exemplars are
selected by herding and mixed into every training step (``batch_size`` per
step) instead of being concatenated into one shuffled training set. One
head covers all classes; the classes not seen yet are masked out of the
cross-entropy and the prediction (FACIL adds a head per experience).
FACIL does not imprint (``imprint=False``, the default here too) and has
no NME. Not done: the authors' class-balanced finetuning (their ImageNet
``cbf_`` scripts). The authors and FACIL remove the last ReLU of their
ResNets, so the cosine head reads signed features: set
``model.last_relu=False`` (resnet18, resnet32); the MLP keeps its ReLU
here.

References:
  Hou, Pan, Loy, Wang & Lin, `Learning a unified classifier incrementally
  via rebalancing <https://openaccess.thecvf.com/content_CVPR_2019/html/
  Hou_Learning_a_Unified_Classifier_Incrementally_via_Rebalancing_CVPR_2019_paper.html>`_,
  CVPR 2019.
  Masana et al., `Class-incremental learning: survey and performance
  evaluation on image classification
  <https://arxiv.org/abs/2010.15277>`_, TPAMI 2022 (FACIL).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import buffers, checks
from jaxcl.models.classifier import l2_normalise
from jaxcl.strategies._class_incremental import (
    append_exemplars, exemplar_sizer, herding_update, mark_new_classes,
    predict_seen, require_class_stream, seen_cross_entropy)
from jaxcl.strategies.icarl import (backbone_features, check_memory_fits,
                                    check_per_class, exemplar_hook,
                                    exemplar_means, features, ncm_predict,
                                    normalise, require_images)
from jaxcl.strategy import Strategy, require_single_head
from jaxcl.train import device_experience, init_variables

__all__ = ["LUCIRState", "lucir", "less_forget", "margin_ranking",
           "cosine_scores", "imprinted_kernel", "CLASSIFIERS"]

CLASSIFIERS = ("cnn", "nme")

_BIG = np.iinfo(np.int32).max


class LUCIRState(NamedTuple):
  memory: buffers.Memory  # exemplars (K slots)
  rank: jax.Array         # int32 (K,): herding position within the class
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): classes of the current experience
  teacher: Any            # params of the model after the last experience
  teacher_model_state: Any
  means: jax.Array        # float32 (C, D): exemplar means (classifier='nme')
  has_mean: jax.Array     # bool (C,): the class has exemplars


def cosine_scores(feats: jax.Array, kernel: jax.Array) -> jax.Array:
  """``⟨w̄_c, f̄(x)⟩``: the cosine head's logits before the scale ``σ``."""
  return l2_normalise(feats) @ l2_normalise(kernel, axis=0)


def less_forget(feats: jax.Array, teacher_feats: jax.Array,
                mask: jax.Array) -> jax.Array:
  """Eq. 6: the ``mask``-weighted mean of ``1 - cos(f*(x), f(x))``."""
  cos = jnp.sum(l2_normalise(feats) * l2_normalise(teacher_feats), -1)
  return jnp.sum(mask * (1.0 - cos)) / jnp.maximum(jnp.sum(mask), 1e-12)


def margin_ranking(cos: jax.Array, y: jax.Array, mask: jax.Array,
                   old: jax.Array, new: jax.Array, margin: float,
                   k: int) -> jax.Array:
  """Eq. 8, averaged over old-class rows and their hard negatives.

  Args:
    cos: ``(B, C)`` cosines (before ``σ``); y: labels; mask: row weights.
    old: bool ``(C,)``, the old classes (rows of these are the "hard"
      ones); new: bool ``(C,)``, the current experience's classes, whose
      ``k`` highest cosines per row are the negatives (fewer when the
      experience has fewer than ``k`` classes).
  """
  gt = jnp.take_along_axis(cos, y[:, None], axis=1)              # (B, 1)
  novel = jax.lax.top_k(jnp.where(new[None, :], cos, -jnp.inf), k)[0]
  ok = jnp.isfinite(novel)                                       # (B, k)
  hinge = jnp.maximum(margin - gt + jnp.where(ok, novel, 0.0), 0.0)
  w = (mask * old[y])[:, None] * ok
  return jnp.sum(w * hinge) / jnp.maximum(jnp.sum(w), 1e-12)


def imprinted_kernel(feats: jax.Array, y: jax.Array, valid: jax.Array,
                     kernel: jax.Array, old: jax.Array,
                     new: jax.Array) -> jax.Array:
  """The cosine head's ``kernel`` ``(D, C)`` with the ``new`` classes'
  columns imprinted (the module's equation): each the renormalised mean
  of its ``valid`` rows of ``feats`` (normalised ``(N, D)`` features,
  labels ``y``), scaled to the mean norm of the ``old`` classes' columns.
  Other columns, and new classes without a valid row, are unchanged."""
  c = kernel.shape[-1]
  onehot = jax.nn.one_hot(y, c, dtype=jnp.float32) * valid[:, None]
  counts = jnp.sum(onehot, axis=0)
  direction = normalise(onehot.T @ feats)            # (C, D), unit rows
  norms = jnp.linalg.norm(kernel.astype(jnp.float32), axis=0)
  scale = jnp.sum(jnp.where(old, norms, 0.0)) / jnp.maximum(jnp.sum(old), 1)
  put = (new & (counts > 0))[None, :]
  return jnp.where(put, (direction * scale).T.astype(kernel.dtype), kernel)


def lucir(mem_size: int = 2000, batch_size: int = 0, lamb: float = 5.0,
          lamb_mr: float = 1.0, margin: float = 0.5, k: int = 2,
          adapt_lamb: bool = True, freeze_old: bool = True,
          per_class: int = 0, imprint: bool = False,
          classifier: str = "cnn", mirror_means: bool = False) -> Strategy:
  """LUCIR (class-incremental streams; the model needs ``head='cosine'``).

  Args:
    mem_size: total exemplars ``K`` (fixed, shared by the classes seen),
      or the memory's capacity with ``per_class``.
    batch_size: exemplars appended to each training batch (0: the training
      batch size).
    lamb: ``λ_base``, the less-forget weight (the paper: 5 for CIFAR-100,
      10 for ImageNet; 0 turns the constraint off).
    lamb_mr: weight of the margin-ranking loss (0 turns it off).
    margin: ``m`` (the paper: 0.5).
    k: hard negatives per old-class row (the paper: 2).
    adapt_lamb: ``λ = λ_base √(|C_o| / |C_n|)`` (eq. 7) instead of
      ``λ_base``.
    freeze_old: keep the old classes' head weights fixed (the authors'
      code and FACIL, with the less-forget constraint).
    per_class: > 0: every class keeps this many exemplars, a memory that
      grows with the classes (the authors' CIFAR-100 runs: 20); 0: the
      classes seen share ``mem_size``.
    imprint: start each later experience's new class weights from their
      mean features (the authors' code; FACIL does not).
    classifier: ``'cnn'`` (the network's cosines) or ``'nme'`` (nearest
      mean of exemplars).
    mirror_means: with ``'nme'``, class means over the exemplars and their
      left-right mirror images (images only).

  Raises:
    ValueError: on a bad argument (``mirror_means`` without ``'nme'``
    among them); at ``init``, on a stream that is not class-incremental, a
    model without the cosine head, ``mem_size`` smaller than the number of
    classes (or than ``per_class`` times it), or ``mirror_means`` for
    inputs that are not images; at an experience's start, on classes that
    came in an earlier one.
  """
  replay_size = exemplar_sizer("lucir", mem_size, batch_size)
  checks.nonnegative("lucir: lamb", lamb)
  checks.nonnegative("lucir: lamb_mr", lamb_mr)
  checks.nonnegative("lucir: margin", margin)
  checks.whole("lucir: k", k, minimum=1)
  checks.flag("lucir: adapt_lamb", adapt_lamb)
  checks.flag("lucir: freeze_old", freeze_old)
  check_per_class("lucir", mem_size, per_class)
  checks.flag("lucir: imprint", imprint)
  checks.one_of("lucir: classifier", classifier, CLASSIFIERS)
  checks.flag("lucir: mirror_means", mirror_means)
  if mirror_means and classifier != "nme":
    raise ValueError("lucir: mirror_means is for class means; it needs "
                     f"classifier='nme', got classifier={classifier!r}")

  def init(ctx, key, params):
    info = ctx.info
    require_class_stream("lucir", info, "rebalances old and new classes")
    c = info.num_classes
    head = require_single_head(
        "lucir", params, c, (frozenset({"kernel", "sigma"}),),
        "the cosine-normalised head (model.head='cosine', params['head'] = "
        "{kernel, sigma})")
    check_memory_fits("lucir", mem_size, per_class, c)
    if mirror_means:
      require_images("lucir", info.input_shape)
    replay_size(ctx)
    _, variables = init_variables(ctx, key)
    d = head["kernel"].shape[0]
    return LUCIRState(
        memory=buffers.init(mem_size, info.input_shape),
        rank=jnp.full((mem_size,), _BIG, jnp.int32),
        seen=jnp.zeros((c,), bool), current=jnp.zeros((c,), bool),
        teacher=jax.tree.map(jnp.copy, params),
        teacher_model_state=variables,
        means=jnp.zeros((c, d), jnp.float32), has_mean=jnp.zeros((c,), bool))

  mark = mark_new_classes("lucir")

  @functools.partial(jax.jit, static_argnums=0)
  def imprint_head(ctx, ss, params, model_state, x, y, task, n_valid):
    valid = jnp.arange(x.shape[0]) < n_valid
    feats = features(backbone_features(ctx), params, model_state, x, task)
    kernel = imprinted_kernel(feats, y, valid, params["head"]["kernel"],
                              ss.seen, ss.current)
    return dict(params, head=dict(params["head"], kernel=kernel))

  def before_experience(ctx, state, experience):
    state = mark(ctx, state, experience)
    ss = state.strategy
    # The first experience has no old weights to take a norm from.
    if not imprint or not np.any(np.asarray(ss.seen)):
      return state
    data = device_experience(experience, ctx.info.train_size)
    params = imprint_head(ctx, ss, state.params, state.model_state,
                          data["x"], data["y"], data["task"],
                          jnp.asarray(experience.num_train, jnp.int32))
    return state.replace(params=params)

  def loss(ctx, sstate, params, batch, logits):
    del logits
    x, task, mask = batch["x"], batch["task"], batch["mask"]
    # Training mode, as the step's own forward pass (batch statistics);
    # the model state only gives the structure.
    f, _ = ctx.apply(params, sstate.teacher_model_state, x, task,
                     train=True, features=True, mask=mask)
    ft, _ = ctx.apply(sstate.teacher, sstate.teacher_model_state, x, task,
                      features=True)
    ft = jax.lax.stop_gradient(ft)
    n_old = jnp.sum(sstate.seen)
    lam = jnp.float32(lamb)
    if adapt_lamb:
      lam = lam * jnp.sqrt(n_old / jnp.maximum(jnp.sum(sstate.current), 1))
    total = lam * less_forget(f, ft, mask)
    if lamb_mr > 0:
      cos = cosine_scores(f, params["head"]["kernel"])
      total = total + lamb_mr * margin_ranking(
          cos, batch["y"], mask, sstate.seen, sstate.current, margin, k)
    # The first experience has no previous model: cross-entropy only.
    return jnp.where(n_old > 0, total, 0.0)

  def project_params(ctx, sstate, params):
    if not freeze_old:
      return params
    head = dict(params["head"])
    head["kernel"] = jnp.where(sstate.seen[None, :],
                               sstate.teacher["head"]["kernel"],
                               head["kernel"])
    return dict(params, head=head)

  herd = herding_update(mem_size, per_class)

  @functools.partial(jax.jit, static_argnums=0)
  def update_memory(ctx, ss, params, model_state, x, y, task, n_valid,
                    experience):
    ss = herd(ctx, ss, params, model_state, x, y, task, n_valid, experience)
    if classifier != "nme":
      return ss
    means, has_mean = exemplar_means(backbone_features(ctx), params,
                                     model_state, ss.memory,
                                     ctx.info.num_classes, mirror_means)
    return ss._replace(means=means, has_mean=has_mean)

  def predict(ctx, sstate, params, model_state, x, task):
    if classifier == "cnn":
      return predict_seen(ctx, sstate, params, model_state, x, task)
    f = backbone_features(ctx)(params, model_state, x, task)
    return ncm_predict(ctx, f, sstate.means, sstate.has_mean, params,
                       model_state, x, task)

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=append_exemplars(replay_size),
                  task_loss=seen_cross_entropy, loss=loss,
                  project_params=project_params,
                  after_experience=exemplar_hook(update_memory),
                  predict=predict, name="lucir",
                  writes_params=frozenset({"before_experience"}))
