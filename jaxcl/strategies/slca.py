"""SLCA: a slow learner for the pretrained backbone, and the classifier
aligned on sampled features after each experience.

Zhang, Wang, Kang, Chen & Wei (2023) fine-tune a pretrained model on each
experience's classes with two learning rates, and re-align the classifier
when the experience ends.

**Slow learner.** The backbone ``θ`` learns with a learning rate ``s``
times the head's (``s`` = ``backbone_lr_scale``; the paper's 1e-4 against
1e-2: ``s = 0.01``). Here the backbone's *update* is scaled, not its
gradient (the engine's ``scale_updates`` hook): with ``u`` the optimiser's
update from ``θ``,

.. math::
   \\theta \\leftarrow \\theta + s\\,u,

which is a per-parameter-group learning rate (PyTorch's) for every
optimiser of the engine: SGD, momentum, Adam and AdamW all end in
``-lr · u``, with the momentum or moment estimates built from the
unscaled gradient, as in a parameter group. (A gradient scale would be one
for SGD and momentum without weight decay only: Adam is invariant to it,
and coupled weight decay would act at the full rate.) ``s = 0`` freezes
the backbone (the reference's ``fix_bcb``). No copy of the model is kept
for it.

**Training loss.** Each experience's classes get a new head (the
reference's per-task ``nn.Linear``: kernel ``0.02 · N(0, 1)``, bias 0);
the cross-entropy is over the current experience's classes only
(``train_mask``; the reference's ``logits[:, known:]``), and the other
classes' head columns are fixed (zero gradient, and a zero update, so
weight decay and momentum cannot move them; the reference leaves old heads
out of the optimiser).

**Class statistics.** When experience ``t`` ends, for each of its classes
``c``, the features ``f(x)`` of its training rows (the updated backbone,
evaluation mode) give

.. math::
   \\mu_c = \\frac{1}{n_c}\\sum_i f(x_i),\\qquad
   \\Sigma_c = \\frac{1}{n_c - 1}\\sum_i (f(x_i) - \\mu_c)(f(x_i) - \\mu_c)^\\top
               + \\epsilon I

(``torch.cov``, ``ε`` = ``cov_eps`` = 1e-4). Earlier classes keep their
statistics, taken with the backbone of their own experience (the reference
does not recompute them).

**Classifier alignment** (from the second experience on; the reference's
``_stage2_compact_classifier``). For ``ca_epochs`` epochs, draw
``samples_per_class`` features per seen class,
``z ~ N(γ_c μ_c, Σ_c)``, shuffle them and train the head alone with
batches of ``ca_batch_size`` on the logit-normalised cross-entropy over the
seen classes. With ``l`` a row's logits, ``T_j`` the classes of experience
``j`` and ``τ`` = ``logit_norm`` = 0.1:

.. math::
   \\bar n = \\frac{1}{t+1}\\sum_{j=0}^{t}
             \\Big(\\big\\lVert l_{T_j} \\big\\rVert_2 + 10^{-7}\\Big),\\qquad
   \\mathcal{L} = \\operatorname{CE}\\Big(\\frac{l}{\\tau\\,\\bar n},\\,
                  y\\Big),

i.e. the logits divided by the mean over experiences of each experience's
logit norm, times ``1/τ`` (both codes; ``logit_norm=0``: the plain
cross-entropy). ``γ_c = 0.9 + 0.1 (t_c + 1)/(t + 1)`` for a class of
experience ``t_c`` (both codes' mean ``decay``: older classes' means are
shrunk a little; ``shrink_old_means=False``: ``γ_c = 1``). The optimiser is
SGD with momentum ``ca_momentum`` = 0.9 and coupled weight decay
``ca_weight_decay`` = 5e-4, learning rate ``ca_lr`` = 0.01 annealed per
epoch by a cosine (``CosineAnnealingLR(T_max=ca_epochs)``: epoch ``e`` uses
``ca_lr (1 + cos(π e / E)) / 2``), fresh for each alignment. Features are
redrawn each epoch. All of it runs in one jitted call with static shapes
(every class's samples drawn, the unseen ones masked out; a batch of no
seen class is skipped).

**Head kept for the next experience.** The aligned head is the one
evaluated after experience ``t``; when the next experience starts, the
head before alignment is put back (both codes' ``fc.backup()`` before the
alignment and ``fc.recall()`` after the evaluation), so each alignment
starts from the heads as their own experiences trained them.

Prediction: the model's logits over the classes seen so far (no task id).

Deviations: the reference trains 20 epochs with a step schedule (the
engine's ``train.epochs`` and ``optimizer.*`` here; the protocol in
``experiments/split_mnist_prompt.py`` keeps its 1 epoch); its head columns
are separate ``nn.Linear`` layers created per task, here columns of one
``Dense`` (``C`` outputs; the classes not seen yet are left out of the
loss, the alignment and the prediction); a class of a single training row
divides its covariance by 1, not 0; the head's fresh columns are drawn
from ``0.02 · N(0, 1)`` truncated at ``±2/0.02`` standard deviations
(timm's ``trunc_normal_(std=.02)`` truncates at ±2 in value). Each class
must come in one experience of a class-incremental stream (refused
otherwise). With ``train_mask=True`` a member appending replayed rows is
refused at the first step (as for L2P: the replayed rows' loss over all
classes pushes the current classes down).

References:
  Zhang, Wang, Kang, Chen & Wei, `SLCA: Slow Learner with Classifier
  Alignment for Continual Learning on a Pre-trained Model
  <https://arxiv.org/abs/2303.05118>`_, ICCV 2023 (code: GengDavid/SLCA,
  ``models/slca.py``, ``models/base.py``; Mammoth's ``slca``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.state import cross_entropy
from jaxcl.strategies import _prompt
from jaxcl.strategies._class_incremental import (mask_inactive,
                                                 require_class_stream)
from jaxcl.strategies._epochs import shuffled_batches
from jaxcl.strategies._extractor import extract
from jaxcl.strategies.fecam import check_class_matrices
from jaxcl.strategies.icarl import features
from jaxcl.strategy import Strategy, frozen_update, new_classes
from jaxcl.train import device_experience, feature_width, init_variables

__all__ = ["slca", "SLCAState", "slow_updates", "class_statistics",
           "normalised_logits", "alignment_loss", "align_head",
           "HEAD_STD"]

HEAD_STD = 0.02   # the reference's trunc_normal_(std=.02) for a new head
_NORM_EPS = 1e-7  # both codes' "+ 1e-7" on each experience's logit norm


class SLCAState(NamedTuple):
  mean: jax.Array       # float32 (C, D): μ_c
  cov: jax.Array        # float32 (C, D, D): Σ_c (+ ε I)
  class_exp: jax.Array  # int32 (C,): each class's experience, -1 unseen
  current: jax.Array    # bool (C,): the current experience's classes
  seen: jax.Array       # bool (C,): the classes of finished experiences
  backup: Any           # the head before the last alignment
  aligned: jax.Array    # bool scalar: the head is an aligned one
  key: jax.Array        # PRNG key of new heads and sampled features


def slow_updates(updates: dict, current: jax.Array, scale: float) -> dict:
  """The optimiser's ``updates`` as SLCA applies them: the backbone's
  (every part but ``head``) times ``scale``, the head's columns of
  ``current`` (bool ``(C,)``) whole and its other columns zero (``where``,
  not a product, so they stay bit for bit)."""
  out = {}
  for name, u in updates.items():
    if name == "head":
      out[name] = {"kernel": jnp.where(current[None, :], u["kernel"], 0.0),
                   "bias": jnp.where(current, u["bias"], 0.0)}
    elif scale == 0:
      out[name] = jax.tree.map(jnp.zeros_like, u)
    elif scale == 1:
      out[name] = u
    else:
      out[name] = jax.tree.map(lambda a: scale * a, u)
  return out


def class_statistics(z: jax.Array, y: jax.Array, valid: jax.Array,
                     classes: jax.Array, mean: jax.Array, cov: jax.Array,
                     eps: float) -> tuple[jax.Array, jax.Array]:
  """``(mean, cov)`` with the rows of ``classes`` (bool ``(C,)``) replaced
  by the mean and the unbiased covariance (plus ``eps · I``) of their
  features ``z`` ``(N, D)``; ``valid`` (bool ``(N,)``) leaves padding
  rows out, the other classes keep theirs."""
  onehot = jax.nn.one_hot(y, mean.shape[0], dtype=jnp.float32) \
      * valid[:, None].astype(jnp.float32)
  counts = jnp.sum(onehot, axis=0)
  eye = jnp.eye(mean.shape[1], dtype=jnp.float32)

  def compute(k):
    w = onehot[:, k]
    mu = (w @ z) / jnp.maximum(counts[k], 1.0)
    c = (z - mu) * w[:, None]
    return mu, c.T @ c / jnp.maximum(counts[k] - 1.0, 1.0) + eps * eye

  def one(k):
    return jax.lax.cond(classes[k], compute, lambda k: (mean[k], cov[k]), k)

  return jax.lax.map(one, jnp.arange(mean.shape[0]))


def normalised_logits(logits: jax.Array, class_exp: jax.Array,
                      seen: jax.Array, num_experiences: int,
                      tau: float) -> jax.Array:
  """``l / (τ n̄)``: ``n̄`` the mean over the experiences with a seen
  class of ``‖l_{T_j}‖ + 1e-7`` (see the module docstring); classes
  outside ``seen`` count in no norm."""
  member = ((class_exp[:, None] == jnp.arange(num_experiences)[None, :])
            & seen[:, None]).astype(logits.dtype)           # C, E
  sq = (logits ** 2) @ member                                 # B, E
  # A norm of 0 (an experience with no seen class, or all-zero logits)
  # gets the gradient 0, as torch.norm's; a bare sqrt's would be inf
  # (times 0: NaN).
  pos = sq > 0
  norms = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0) + _NORM_EPS
  present = jnp.any(member > 0, axis=0).astype(logits.dtype)
  mean_norm = (norms @ present) / jnp.maximum(jnp.sum(present), 1.0)
  return logits / (tau * mean_norm[:, None])


def alignment_loss(head: dict, z: jax.Array, y: jax.Array, ok: jax.Array,
                   class_exp: jax.Array, seen: jax.Array,
                   num_experiences: int, tau: float) -> jax.Array:
  """The cross-entropy of the head's logits on features ``z`` over the
  ``seen`` classes, logit-normalised with ``τ`` (0: not normalised),
  averaged over the rows ``ok``."""
  logits = z @ head["kernel"] + head["bias"]
  if tau:
    logits = normalised_logits(logits, class_exp, seen, num_experiences,
                               tau)
  return cross_entropy(mask_inactive(logits, seen), y,
                       ok.astype(jnp.float32))


def align_head(head: dict, mean: jax.Array, cov: jax.Array,
               class_exp: jax.Array, seen: jax.Array, experience: jax.Array,
               key: jax.Array, *, num_experiences: int, epochs: int,
               samples: int, batch_size: int, lr: float, momentum: float,
               weight_decay: float, tau: float, shrink: bool) -> dict:
  """The head after classifier alignment on features sampled from
  ``N(γ_c μ_c, Σ_c)`` for the ``seen`` classes (module docstring); the
  columns of the other classes are left as they are."""
  c, d = mean.shape
  eye = jnp.eye(d, dtype=jnp.float32)
  chol = jnp.linalg.cholesky(jnp.where(seen[:, None, None], cov, eye))
  gamma = (0.9 + 0.1 * (class_exp + 1) / (experience + 1)) if shrink \
      else jnp.ones((c,), jnp.float32)
  centre = mean * gamma[:, None].astype(jnp.float32)
  labels = jnp.repeat(jnp.arange(c), samples)
  valid = seen[labels]
  cols = {"kernel": seen[None, :], "bias": seen}

  def sgd(carry, z, y, ok, rate):
    h, v = carry
    g = jax.grad(alignment_loss)(h, z, y, ok, class_exp, seen,
                                 num_experiences, tau)
    # SGD with momentum and coupled weight decay (torch.optim.SGD), on the
    # seen classes' columns only.
    g = jax.tree.map(lambda g, p: g + weight_decay * p, g, h)
    v = jax.tree.map(lambda v, g: momentum * v + g, v, g)
    h = jax.tree.map(lambda p, v, m: jnp.where(m, p - rate * v, p), h, v,
                     cols)
    return h, v

  def epoch(carry, ek):
    e, k = ek
    k_draw, k_order = jax.random.split(k)
    noise = jax.random.normal(k_draw, (c, samples, d), jnp.float32)
    z = (centre[:, None, :] + jnp.einsum("csd,ced->cse", noise, chol)
         ).reshape(c * samples, d)
    idx, ok = shuffled_batches(k_order, valid, batch_size)
    rate = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * e / epochs))

    def step(carry, rows):
      i, o = rows
      return jax.lax.cond(jnp.any(o),
                          lambda cv: sgd(cv, z[i], labels[i], o, rate),
                          lambda cv: cv, carry), None

    return jax.lax.scan(step, carry, (idx, ok))[0], None

  start = (head, jax.tree.map(jnp.zeros_like, head))
  out, _ = jax.lax.scan(epoch, start, (jnp.arange(epochs),
                                       jax.random.split(key, epochs)))
  return out[0]


def slca(backbone_lr_scale: float = 0.01, ca_epochs: int = 5,
         samples_per_class: int = 256, ca_batch_size: int = 256,
         ca_lr: float = 0.01, ca_momentum: float = 0.9,
         ca_weight_decay: float = 5e-4, logit_norm: float = 0.1,
         cov_eps: float = 1e-4, shrink_old_means: bool = True,
         train_mask: bool = True) -> Strategy:
  """SLCA (slow learner with classifier alignment; module docstring).

  Args:
    backbone_lr_scale: ``s`` in [0, 1], the backbone's learning rate over
      the head's (0.01: the paper's 1e-4 / 1e-2; 0 freezes it).
    ca_epochs: epochs of classifier alignment (5; 0: none).
    samples_per_class: features drawn per seen class and epoch (256).
    ca_batch_size: rows per alignment step (256).
    ca_lr: the alignment's SGD learning rate before the cosine (0.01).
    ca_momentum: its momentum, in [0, 1) (0.9).
    ca_weight_decay: its coupled weight decay (5e-4).
    logit_norm: ``τ`` of the logit normalisation (0.1; 0: the plain
      cross-entropy).
    cov_eps: ``ε`` added to each covariance's diagonal (1e-4).
    shrink_old_means: sample older classes around ``γ_c μ_c`` (both
      codes); False: around ``μ_c``.
    train_mask: the training cross-entropy over the current experience's
      classes only (the reference's); False: over all classes.

  Raises:
    ValueError: on a bad argument; at ``init``, on a model without a
    linear ``head``, a stream that is not class-incremental, or ``C x D x
    D`` covariances above ``fecam.MAX_FLOATS``; before an experience, on
    a class that came in an earlier one.
  """
  if isinstance(backbone_lr_scale, bool) or not isinstance(
      backbone_lr_scale, (int, float)) or not (
          math.isfinite(backbone_lr_scale)
          and 0.0 <= backbone_lr_scale <= 1.0):
    raise ValueError(f"slca: backbone_lr_scale={backbone_lr_scale!r} is "
                     "outside [0, 1] (the backbone's learning rate over the "
                     "head's; 0 freezes the backbone)")
  checks.whole("slca: ca_epochs", ca_epochs, 0, "0: no alignment")
  checks.whole("slca: samples_per_class", samples_per_class, 1)
  checks.whole("slca: ca_batch_size", ca_batch_size, 1)
  checks.positive("slca: ca_lr", ca_lr)
  checks.fraction("slca: ca_momentum", ca_momentum)
  checks.nonnegative("slca: ca_weight_decay", ca_weight_decay)
  checks.nonnegative("slca: logit_norm", logit_norm)
  checks.nonnegative("slca: cov_eps", cov_eps)
  checks.flag("slca: shrink_old_means", shrink_old_means)
  checks.flag("slca: train_mask", train_mask)
  scale = float(backbone_lr_scale)
  align_kw = dict(epochs=ca_epochs, samples=samples_per_class,
                  batch_size=ca_batch_size, lr=float(ca_lr),
                  momentum=float(ca_momentum),
                  weight_decay=float(ca_weight_decay),
                  tau=float(logit_norm), shrink=shrink_old_means)

  def init(ctx, key, params):
    info = ctx.info
    require_class_stream("slca", info, "aligns the classifier over the "
                         "classes")
    if not isinstance(params, dict) or "head" not in params or set(
        params["head"]) != {"kernel", "bias"}:
      got = sorted(params["head"]) if isinstance(params, dict) and \
          "head" in params else sorted(params) if isinstance(params, dict) \
          else type(params).__name__
      raise ValueError("slca needs a model with a linear 'head' layer "
                       f"(kernel, bias), got {got} (model.head='linear')")
    k_model, k_own = jax.random.split(key)
    _, model_state = init_variables(ctx, k_model)
    dim = feature_width(ctx, params, model_state)
    c = info.num_classes
    check_class_matrices("slca", c, dim, "covariances")
    return SLCAState(mean=jnp.zeros((c, dim), jnp.float32),
                     cov=jnp.zeros((c, dim, dim), jnp.float32),
                     class_exp=jnp.full((c,), -1, jnp.int32),
                     current=jnp.zeros((c,), bool),
                     seen=jnp.zeros((c,), bool),
                     backup=jax.tree.map(jnp.copy, params["head"]),
                     aligned=jnp.zeros((), bool), key=k_own)

  @jax.jit
  def start(ss, params, current, index):
    # The pre-alignment head back (the codes' fc.recall()), then a fresh
    # head for the experience's classes.
    head = jax.tree.map(lambda b, h: jnp.where(ss.aligned, b, h),
                        ss.backup, params["head"])
    k = jax.random.fold_in(jax.random.fold_in(ss.key, 0), index)
    shape = head["kernel"].shape
    fresh = HEAD_STD * jax.random.truncated_normal(
        k, -2.0 / HEAD_STD, 2.0 / HEAD_STD, shape, head["kernel"].dtype)
    head = {"kernel": jnp.where(current[None, :], fresh, head["kernel"]),
            "bias": jnp.where(current, 0.0, head["bias"])}
    params = {**params, "head": head}
    ss = ss._replace(current=current,
                     class_exp=jnp.where(current, index, ss.class_exp),
                     aligned=jnp.zeros((), bool))
    return ss, params

  def before_experience(ctx, state, experience):
    ss = state.strategy
    cur = np.zeros((ctx.info.num_classes,), bool)
    cur[new_classes("slca", np.asarray(ss.class_exp) >= 0, experience)] = True
    ss, params = start(ss, state.params, jnp.asarray(cur),
                       jnp.asarray(experience.index, jnp.int32))
    return state.replace(params=params, strategy=ss)

  def freeze_grads(ctx, sstate, grads):
    del ctx
    out = {**grads, "head": {
        "kernel": jnp.where(sstate.current[None, :], grads["head"]["kernel"],
                            0.0),
        "bias": jnp.where(sstate.current, grads["head"]["bias"], 0.0)}}
    if scale == 0:
      out = {k: (v if k == "head" else jax.tree.map(jnp.zeros_like, v))
             for k, v in out.items()}
    return out

  def scale_updates(ctx, sstate, updates):
    del ctx
    return slow_updates(updates, sstate.current, scale)

  @functools.partial(jax.jit, static_argnums=0)
  def finish(ctx, ss, params, model_state, x, y, task, n_valid, index):
    z = features(lambda p, ms, a, t: extract(ctx, "backbone", p, ms, a, t),
                 params, model_state, x, task)
    valid = jnp.arange(x.shape[0]) < n_valid
    mean, cov = class_statistics(z, y, valid, ss.current, ss.mean, ss.cov,
                                 float(cov_eps))
    seen = ss.seen | ss.current
    head = params["head"]
    # Both codes align from the second experience on.
    do = (index > 0) & (ca_epochs > 0)
    head = jax.lax.cond(do, lambda h: align_head(
        h, mean, cov, ss.class_exp, seen, index,
        jax.random.fold_in(jax.random.fold_in(ss.key, 1), index),
        num_experiences=ctx.info.num_experiences, **align_kw),
                        lambda h: h, head)
    ss = ss._replace(mean=mean, cov=cov, seen=seen,
                     current=jnp.zeros_like(ss.current),
                     backup=params["head"], aligned=do)
    return ss, {**params, "head": head}

  def after_experience(ctx, state, experience):
    data = device_experience(experience, ctx.info.train_size)
    ss, params = finish(ctx, state.strategy, state.params, state.model_state,
                        data["x"], data["y"], data["task"],
                        jnp.asarray(experience.num_train, jnp.int32),
                        jnp.asarray(experience.index, jnp.int32))
    return state.replace(params=params, strategy=ss)

  def predict(ctx, sstate, params, model_state, x, task):
    logits = ctx.logits(params, model_state, x, task, train=False)
    return mask_inactive(logits, sstate.seen | sstate.current)

  return Strategy(init=init, before_experience=before_experience,
                  task_loss=_prompt.task_loss("slca", train_mask),
                  update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads, scale_updates=scale_updates,
                  after_experience=after_experience,
                  predict=predict, name="slca",
                  writes_params=frozenset({"before_experience",
                                           "after_experience"}))

