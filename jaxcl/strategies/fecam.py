"""FeCAM: per-class Mahalanobis prototypes over a backbone frozen after the
first experience, no exemplars.

Goswami et al. (2023) train the feature extractor ``f`` with the
cross-entropy on the first experience only, freeze it, and classify every
class by its own feature distribution. Features are first moved toward a
Gaussian by Tukey's ladder of powers (``λ`` = ``tukey``; the features are
post-ReLU, non-negative):

.. math::
   \\tilde z = z^{\\lambda} \\quad (\\lambda = 0.5 \\text{ in the paper}).

When a class's experience ends, its mean ``μ_k`` and unbiased covariance
``Σ_k`` of ``\\tilde z`` (the training rows, through the frozen extractor in
evaluation mode) are stored. The covariance is shrunk (the paper's
shrinkage; ``V_1`` the mean of the diagonal, ``V_2`` the mean of the
off-diagonal entries that are not 0, ``γ_1`` = ``gamma1``, ``γ_2`` =
``gamma2``):

.. math::
   \\Sigma_s = \\Sigma + \\gamma_1 V_1 I + \\gamma_2 V_2 (1 - I),

applied twice, as both reference codes do ("we apply covariance shrinkage 2
times to obtain better estimates of matrices"), then normalised to a
correlation-like matrix (the codes' ``normalize_cov``,
``Σ_ij / (σ_i σ_j)``). Prediction is the class nearest in squared
Mahalanobis distance, the features and the mean each L2-normalised (the
codes' ``_mahalanobis``) and ``Σ^{-1}`` the pseudo-inverse:

.. math::
   d_k(x) = (\\hat u - \\hat\\mu_k)^\\top \\Sigma_k^{-1}
            (\\hat u - \\hat\\mu_k), \\qquad
   \\hat u = \\frac{\\tilde z(x)}{\\lVert \\tilde z(x)\\rVert},\\;
   \\hat\\mu_k = \\frac{\\mu_k}{\\lVert \\mu_k\\rVert},\\qquad
   \\hat y = \\arg\\min_k d_k(x).

``predict`` returns ``-d_k``. Followed: Avalanche's ``FeCAMClassifier`` and
``CurrentDataFeCAMUpdate`` (``avalanche/models/fecam.py``,
``avalanche/training/plugins/update_fecam.py``): the mean is taken of the
transformed features (the authors' ``models/base.py`` transforms the mean
of the raw features instead); the authors' code (dipamgoswami/FeCAM,
``models/fecam.py``, ``models/base.py``, ``utils/maha_utils.py``) agrees on
everything else. L2-normalising before the transform (the authors'
``_eval_maha``) changes nothing: ``x^λ`` is homogeneous, and the
transformed vector is normalised again.

Here the statistics of the experience's classes are computed in one jitted
call at the experience's end (the padded training rows, features in chunks,
one class at a time with ``lax.map`` and a ``lax.cond`` that skips classes
not in the experience), and ``Σ_k^{-1}`` is stored, so ``predict`` costs
the features and one batched ``D x D`` product per class. At the end of
the first experience the model's parameters and model state are copied into
the strategy's state: features come from that copy from then on, and from
the second experience on the model's gradient is zero and its parameters
are restored from the copy after every update (so momentum and weight
decay move nothing; the steps still run).

Deviations: the first experience trains with the engine's optimiser and the
plain cross-entropy over all classes' outputs (the authors' ResNet-18 with
a cosine head, 200 epochs of SGD with cosine annealing and strong
augmentation on a first task of 50 CIFAR-100 classes; set
``model.head='cosine'`` for the head); the first experience is classified
by the Mahalanobis rule like the others (the authors use their cosine head's
weights as prototypes with the Euclidean distance for it); features are
clipped at 0 before the power (a no-op on post-ReLU features, which the
method assumes; a negative feature would give NaN); a dimension whose
shrunk variance is 0 (possible only when a class's covariance is all 0,
e.g. a class of one example) gets 1 on the diagonal and 0 elsewhere in the
normalised matrix instead of a division by 0; the covariance divides by
``max(n - 1, 1)`` (the divisor cannot change a prediction: the shrunk
matrix scales with ``Σ`` and the normalisation removes the scale). Classes
without statistics are left out of the prediction (before the first
experience ends, the model's own logits); task-incremental streams mask
the scores to the example's task. Each class
must come in one experience (a ValueError otherwise; Avalanche blends a
returning class's statistics with momentum 0.5, which needs the raw
covariance kept as well). A batch-norm model keeps updating its running
statistics in the engine's training steps after the freeze, but the
features come from the copy taken at the freeze.

References:
  Goswami, Liu, Twardowski & van de Weijer, `FeCAM: Exploiting the
  Heterogeneity of Class Distributions in Exemplar-Free Continual Learning
  <https://arxiv.org/abs/2309.14062>`_, NeurIPS 2023.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.strategies._extractor import predict_fitted
from jaxcl.strategies.icarl import exemplar_hook, features, normalise
from jaxcl.strategy import Strategy, new_classes
from jaxcl.strategies._freeze import (restore_all, restore_once_frozen,
                                      zero_grads_once_frozen)
from jaxcl.train import feature_width, init_variables

__all__ = ["fecam", "FeCAMState", "tukey_transform", "shrink_cov",
           "normalize_cov", "class_statistics", "mahalanobis",
           "MAX_FLOATS", "check_class_matrices"]

# The per-class inverse covariances are C x D x D floats (and the update
# holds a few D x D matrices more): 250M floats take 1 GB.
MAX_FLOATS = 250_000_000


def check_class_matrices(name: str, classes: int, dim: int,
                         what: str) -> None:
  """Refuses ``classes`` ``dim x dim`` matrices in a strategy's state
  above :data:`MAX_FLOATS` floats, naming the size and the remedy."""
  if classes * dim * dim > MAX_FLOATS:
    raise ValueError(
        f"{name}: {classes} classes of {dim}-dimensional features need "
        f"{classes} x {dim} x {dim} {what} "
        f"({4 * classes * dim * dim / 1e9:.1f} GB); use at most "
        f"{MAX_FLOATS} floats (a narrower backbone)")


class FeCAMState(NamedTuple):
  mean: jax.Array        # float32 (C, D): μ_k of the transformed features
  precision: jax.Array   # float32 (C, D, D): Σ_k^{-1} (shrunk, normalised)
  count: jax.Array       # int32 (C,): training rows behind μ_k, Σ_k
  params: Any            # the feature extractor (the model when it froze)
  model_state: Any       # its model state
  frozen: jax.Array      # bool scalar: the first experience has ended


def tukey_transform(z: jax.Array, lam: float) -> jax.Array:
  """Tukey's ladder of powers ``z^λ`` (``λ > 0``), negatives clipped to 0."""
  return jnp.maximum(z, 0.0) ** lam


def shrink_cov(cov: jax.Array, gamma1: float, gamma2: float) -> jax.Array:
  """``Σ + γ1 V1 I + γ2 V2 (1 - I)`` for one ``(D, D)`` matrix: ``V1`` the
  diagonal's mean, ``V2`` the mean of the off-diagonal entries that are not
  0 (as the references' ``shrink_cov`` count them; 0 if all are)."""
  eye = jnp.eye(cov.shape[0], dtype=cov.dtype)
  v1 = jnp.mean(jnp.diagonal(cov))
  off = cov * (1.0 - eye)
  nonzero = jnp.sum(off != 0.0)
  v2 = jnp.sum(off) / jnp.maximum(nonzero, 1)
  return cov + gamma1 * v1 * eye + gamma2 * v2 * (1.0 - eye)


def normalize_cov(cov: jax.Array) -> jax.Array:
  """``Σ_ij / (σ_i σ_j)`` (``σ_i² = Σ_ii``); rows and columns of a 0
  variance are those of the identity."""
  sd = jnp.sqrt(jnp.maximum(jnp.diagonal(cov), 0.0))
  ok = (sd[:, None] > 0) & (sd[None, :] > 0)
  outer = jnp.where(ok, sd[:, None] * sd[None, :], 1.0)
  return jnp.where(ok, cov / outer, jnp.eye(cov.shape[0], dtype=cov.dtype))


def class_statistics(z: jax.Array, y: jax.Array, valid: jax.Array,
                     classes: jax.Array, mean: jax.Array,
                     precision: jax.Array, gamma1: float, gamma2: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The statistics of ``classes`` from transformed features.

  Args:
    z: ``(N, D)`` transformed features; y: int ``(N,)``; valid: bool
      ``(N,)`` (padding rows count for nothing).
    classes: bool ``(C,)``: the classes to compute; the others keep
      ``mean`` and ``precision``.
    mean, precision: ``(C, D)`` and ``(C, D, D)``: the stored ones.
    gamma1, gamma2: the shrinkage weights.

  Returns:
    ``(count, mean, precision)``: rows per class ``(C,)`` int32 (over all
    classes), and the means and ``Σ^{-1}`` with ``classes`` replaced.
  """
  onehot = jax.nn.one_hot(y, mean.shape[0], dtype=jnp.float32) \
      * valid[:, None].astype(jnp.float32)
  counts = jnp.sum(onehot, axis=0)

  def compute(k):
    w = onehot[:, k]
    n = counts[k]
    mu = (w @ z) / jnp.maximum(n, 1.0)
    c = (z - mu) * w[:, None]
    cov = c.T @ c / jnp.maximum(n - 1.0, 1.0)
    cov = shrink_cov(shrink_cov(cov, gamma1, gamma2), gamma1, gamma2)
    prec = jnp.linalg.pinv(normalize_cov(cov), hermitian=True)
    return mu, prec

  def one(k):
    # Only the experience's classes pay for a covariance and an inverse.
    return jax.lax.cond(classes[k], compute,
                        lambda k: (mean[k], precision[k]), k)

  new_mean, new_prec = jax.lax.map(one, jnp.arange(mean.shape[0]))
  return counts.astype(jnp.int32), new_mean, new_prec


def mahalanobis(u: jax.Array, mean: jax.Array,
                precision: jax.Array) -> jax.Array:
  """``(B, C)`` squared distances ``(û - μ̂_k)ᵀ P_k (û - μ̂_k)``, ``u``
  ``(B, D)`` and ``mean`` ``(C, D)`` L2-normalised here."""
  diff = normalise(u)[:, None, :] - normalise(mean)[None, :, :]
  return jnp.einsum("bcd,cde,bce->bc", diff, precision, diff)


def fecam(tukey: float = 0.5, gamma1: float = 1.0,
          gamma2: float = 1.0) -> Strategy:
  """FeCAM (exemplar-free, per-class Mahalanobis prototypes).

  Args:
    tukey: ``λ > 0``, the power of Tukey's transform (0.5, the paper's;
      1: no transform). The references' ``λ = 0`` (log) is not offered:
      post-ReLU features are often exactly 0.
    gamma1: ``γ1 >= 0``, the weight of the mean variance added to the
      diagonal (1, the references'; Avalanche's ``shrink1``).
    gamma2: ``γ2 >= 0``, the weight of the mean covariance added off the
      diagonal (1; Avalanche's ``shrink2``).

  Raises:
    ValueError: on a bad argument; at ``init``, on ``C x D x D`` inverse
    covariances above :data:`MAX_FLOATS` floats; before an experience, on a
    class that came in an earlier one.
  """
  checks.positive("fecam: tukey", tukey)
  checks.nonnegative("fecam: gamma1", gamma1)
  checks.nonnegative("fecam: gamma2", gamma2)
  lam, g1, g2 = float(tukey), float(gamma1), float(gamma2)

  def transformed(ctx, params, model_state, x, task):
    z, _ = ctx.apply(params, model_state, x, task, train=False,
                     features=True)
    return tukey_transform(z.reshape(z.shape[0], -1).astype(jnp.float32),
                           lam)

  def init(ctx, key, params):
    info = ctx.info
    _, model_state = init_variables(ctx, key)
    dim = feature_width(ctx, params, model_state)
    c = info.num_classes
    check_class_matrices("fecam", c, dim, "inverse covariances")
    return FeCAMState(mean=jnp.zeros((c, dim), jnp.float32),
                      precision=jnp.zeros((c, dim, dim), jnp.float32),
                      count=jnp.zeros((c,), jnp.int32),
                      params=jax.tree.map(jnp.copy, params),
                      model_state=model_state,
                      frozen=jnp.zeros((), bool))

  def before_experience(ctx, state, experience):
    del ctx
    # Each class once: its statistics are computed when its experience ends.
    new_classes("fecam", np.asarray(state.strategy.count) > 0, experience)
    return state

  @functools.partial(jax.jit, static_argnums=0)
  def update(ctx, ss, params, model_state, x, y, task, n_valid, experience):
    del experience
    # The first experience's end freezes the extractor (later ones keep it).
    params = restore_all(params, ss.params, ss.frozen)
    model_state = restore_all(model_state, ss.model_state, ss.frozen)
    z = features(lambda p, ms, a, t: transformed(ctx, p, ms, a, t), params,
                 model_state, x, task)
    valid = jnp.arange(x.shape[0]) < n_valid
    count, mean, prec = class_statistics(
        z, y, valid, jnp.zeros_like(ss.count, bool).at[y].max(valid),
        ss.mean, ss.precision, g1, g2)
    return ss._replace(mean=mean, precision=prec, count=ss.count + count,
                       params=params, model_state=model_state,
                       frozen=jnp.ones((), bool))

  def predict(ctx, sstate, params, model_state, x, task):
    def scores():
      u = transformed(ctx, sstate.params, sstate.model_state, x, task)
      return -mahalanobis(u, sstate.mean, sstate.precision)

    return predict_fitted(scores, sstate.count, ctx, params, model_state, x,
                          task)

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=zero_grads_once_frozen,
                  project_params=restore_once_frozen,
                  after_experience=exemplar_hook(update), predict=predict,
                  name="fecam")
