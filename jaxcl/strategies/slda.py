"""Deep Streaming LDA (SLDA): class means and a shared covariance, no backprop.

Hayes & Kanan (2020) put a streaming linear discriminant on top of a
feature extractor that is never trained. For each example ``(z, y)`` in
stream order (``z`` its features, ``n`` the updates so far, ``μ_y`` and
``c_y`` its class's mean and count):

.. math::
   \\Delta = z - \\mu_y,\\qquad
   \\Sigma \\leftarrow \\frac{n\\,\\Sigma + \\frac{n}{n+1}\\,\\Delta\\Delta^\\top}
                           {n + 1},\\qquad
   \\mu_y \\leftarrow \\mu_y + \\frac{\\Delta}{c_y + 1},\\quad
   c_y \\leftarrow c_y + 1,\\quad n \\leftarrow n + 1,

and predicts with the LDA rule on the shrunk covariance
(:math:`\\varepsilon` = ``shrinkage``):

.. math::
   \\Lambda = \\big((1 - \\varepsilon)\\Sigma + \\varepsilon I\\big)^{+},
   \\qquad
   s_k(z) = z^\\top \\Lambda \\mu_k - \\tfrac12\\, \\mu_k^\\top\\Lambda\\mu_k .

As in the authors' ``SLDA_Model.py`` (which Avalanche's ``StreamingLDA``
copies), the covariance's weight ``n / (n + 1)`` counts all updates, not
the class's, and ``μ_y`` of a class's first example is 0: ``Σ`` estimates
the pooled within-class covariance, and the early examples of each class,
measured against a poor mean, inflate it a little.

Here a training batch's examples are folded in with one matrix product,
not a loop: each row's ``Δ`` is taken against its class's mean *before*
the row (the batch's earlier rows of that class included, through a
lower-triangular same-class matrix), and ``n Σ`` grows by ``Σ_i w_i Δ_i
Δ_iᵀ`` with ``w_i = n_i / (n_i + 1)``, which is the per-example recursion
unrolled. Padding rows count for nothing. ``Λ``, the weights ``Λ μ`` and
the biases are computed once at each experience's end (the reference
recomputes them when prediction follows an update), so ``predict`` costs
one ``D x C`` product.

The features are ``features='backbone'``: the model's backbone (``features
=True``) *as the stream starts* (a pretrained network with
``model.pretrained``; the paper's is an ImageNet ResNet-18), copied into the
strategy's state at the first experience with its model state (batch
statistics included), in evaluation mode; or ``features='input'``: the raw
inputs, flattened. The model is not trained: ``update_grads`` returns zero
gradients, and the copy makes the features independent of whatever the
optimiser then does (weight decay, batch statistics). The method is one pass
over the stream: each experience's examples are folded in once (a bit per
training row, by the batch's ``index``), so further epochs change nothing.

Deviations: classes with no example yet are left out of the prediction (the
reference gives them the score 0, above every seen class whose score is
negative); task-incremental streams mask the scores to the example's task.
The reference's ``fit_base`` (an offline start on base data) and its
``streaming_update_sigma=False`` (a covariance fixed after ``fit_base``) are
not offered: there is no base initialisation here.

References:
  Hayes & Kanan, `Lifelong machine learning with deep streaming linear
  discriminant analysis <https://arxiv.org/abs/1909.01520>`_, CVPR
  Workshops 2020.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.state import masked_logits
from jaxcl.strategies import _extractor
from jaxcl.strategies._class_incremental import mask_inactive
from jaxcl.strategies.replay import incoming_rows
from jaxcl.strategy import Strategy, zero_grads

__all__ = ["slda", "SLDAState", "streaming_update", "classifier",
           "FEATURES"]

FEATURES = _extractor.FEATURES
# Σ is D x D floats: 20000 features already take 1.6 GB.
MAX_DIM = 20000


class SLDAState(NamedTuple):
  mean: jax.Array      # float32 (C, D): μ_k
  count: jax.Array     # float32 (C,): c_k
  cov: jax.Array       # float32 (D, D): Σ
  updates: jax.Array   # float32 scalar: n, the examples folded in
  weight: jax.Array    # float32 (D, C): Λ μ, set at each experience's end
  bias: jax.Array      # float32 (C,): ½ μ_kᵀ Λ μ_k
  params: Any          # the frozen feature extractor (() for 'input')
  model_state: Any     # its model state (() for 'input')
  folded: jax.Array    # bool (train_size,): the experience's rows folded in


def streaming_update(mean: jax.Array, count: jax.Array, cov: jax.Array,
                     updates: jax.Array, z: jax.Array, y: jax.Array,
                     valid: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Folds a batch into the statistics, as the per-example recursion would
  in row order (module docstring).

  Args:
    mean, count, cov, updates: the statistics (see :class:`SLDAState`).
    z: ``(B, D)`` features; y: int labels ``(B,)``; valid: bool ``(B,)``
      (rows that are padding count for nothing).

  Returns:
    ``(mean, count, cov, updates)`` after the batch.
  """
  v = valid.astype(jnp.float32)
  onehot = jax.nn.one_hot(y, mean.shape[0], dtype=jnp.float32) * v[:, None]
  # earlier[i, j]: row j < i is a valid row of row i's class.
  earlier = jnp.tril(onehot @ onehot.T, k=-1)
  c = count[y] + jnp.sum(earlier, axis=1)
  before = jnp.where((c > 0)[:, None],
                     (count[y][:, None] * mean[y] + earlier @ z)
                     / jnp.maximum(c, 1.0)[:, None],
                     mean[y])
  delta = (z - before) * v[:, None]
  n_i = updates + jnp.cumsum(v) - v     # updates before row i
  w = n_i / (n_i + 1.0)
  n_new = updates + jnp.sum(v)
  scatter = updates * cov + (delta * w[:, None]).T @ delta
  cov = jnp.where(n_new > 0, scatter / jnp.maximum(n_new, 1.0), cov)
  new_count = count + jnp.sum(onehot, axis=0)
  sums = count[:, None] * mean + onehot.T @ z
  mean = jnp.where((new_count > 0)[:, None],
                   sums / jnp.maximum(new_count, 1.0)[:, None], mean)
  return mean, new_count, cov, n_new


@jax.jit
def classifier(mean: jax.Array, cov: jax.Array, shrinkage: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """The LDA rule's ``(weight, bias)``: ``Λ μ`` ``(D, C)`` and ``½ μᵀ Λ μ``
  ``(C,)``, with ``Λ`` the pseudo-inverse of the shrunk covariance."""
  d = cov.shape[0]
  shrunk = (1.0 - shrinkage) * cov + shrinkage * jnp.eye(d, dtype=cov.dtype)
  lam = jnp.linalg.pinv(shrunk, hermitian=True)
  weight = lam @ mean.T
  return weight, 0.5 * jnp.sum(mean.T * weight, axis=0)


def slda(shrinkage: float = 1e-4, features: str = "backbone") -> Strategy:
  """Deep Streaming LDA.

  Args:
    shrinkage: ``ε`` in ``[0, 1]``: the covariance is shrunk toward the
      identity (1e-4, the authors' and Avalanche's default).
    features: ``'backbone'`` (the model's backbone as the stream starts,
      frozen) or ``'input'`` (the flattened inputs).

  Raises:
    ValueError: on a bad argument; at ``init``, on features too wide for a
    ``D x D`` covariance.
  """
  checks.nonnegative("slda: shrinkage", shrinkage)
  if shrinkage > 1:
    raise ValueError(f"slda: shrinkage must be in [0, 1] (the weight of the "
                     f"identity in the shrunk covariance), got {shrinkage!r}")
  if features not in FEATURES:
    raise ValueError(f"slda: unknown features {features!r}; valid: "
                     f"{list(FEATURES)}")
  eps = float(shrinkage)

  def extract(ctx, sstate, x, task):
    return _extractor.extract(ctx, features, sstate.params,
                              sstate.model_state, x, task)

  def init(ctx, key, params):
    info = ctx.info
    frozen, model_state, dim = _extractor.init_extractor(ctx, key, params,
                                                         features)
    if dim > MAX_DIM:
      raise ValueError(
          f"slda: the features have {dim} dimensions, and the covariance "
          f"would be {dim} x {dim} ({4 * dim * dim / 1e9:.1f} GB); use at "
          f"most {MAX_DIM} (features='backbone' with a narrower backbone)")
    c = info.num_classes
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    return SLDAState(mean=zeros((c, dim)), count=zeros((c,)),
                     cov=zeros((dim, dim)), updates=zeros(()),
                     weight=zeros((dim, c)), bias=zeros((c,)),
                     params=frozen, model_state=model_state,
                     folded=jnp.zeros((info.train_size,), bool))

  def before_experience(ctx, state, experience):
    del ctx
    ss = state.strategy._replace(folded=jnp.zeros_like(state.strategy.folded))
    if features == "backbone" and experience.index == 0:
      # The extractor is the model as the stream starts.
      frozen, model_state = _extractor.copy_model(state)
      ss = ss._replace(params=frozen, model_state=model_state)
    return state.replace(strategy=ss)

  def after_step(ctx, sstate, info):
    rows = incoming_rows(ctx, info.batch)
    # Each training row once, whatever the number of epochs.
    index = info.batch["index"][:ctx.info.batch_size]
    size = sstate.folded.shape[0]
    fresh = ((rows["mask"] > 0) & (index >= 0)
             & ~sstate.folded[jnp.clip(index, 0, size - 1)])
    z = extract(ctx, sstate, rows["x"], rows["task"])
    mean, count, cov, n = streaming_update(
        sstate.mean, sstate.count, sstate.cov, sstate.updates, z, rows["y"],
        fresh)
    folded = sstate.folded.at[jnp.where(fresh, index, size)].set(
        True, mode="drop")
    return sstate._replace(mean=mean, count=count, cov=cov, updates=n,
                           folded=folded)

  def after_experience(ctx, state, experience):
    del ctx, experience
    ss = state.strategy
    weight, bias = classifier(ss.mean, ss.cov, jnp.float32(eps))
    return state.replace(strategy=ss._replace(weight=weight, bias=bias))

  def predict(ctx, sstate, params, model_state, x, task):
    del params, model_state
    scores = extract(ctx, sstate, x, task) @ sstate.weight - sstate.bias
    scores = mask_inactive(scores, sstate.count > 0)
    if ctx.mask_task_logits:
      scores = masked_logits(scores, task, ctx.info.task_classes)
    return scores

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=zero_grads, after_step=after_step,
                  after_experience=after_experience, predict=predict,
                  name="slda")
