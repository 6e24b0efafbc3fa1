"""FeTrIL: feature translation for exemplar-free class-incremental learning.

Petit et al. (2023) train the feature extractor ``f`` on the first
experience only (the cross-entropy over its classes), freeze it, and from
then on learn only a linear classifier over its features. Past classes
keep no example: each is represented by *pseudo-features*, the features of
a new class translated by the difference of the two classes' means (the
paper's Eq. 1, ``μ`` the mean feature of a class's training rows):

.. math::
   \\hat f(C_o) = f(C_n) + \\mu(C_o) - \\mu(C_n),

where ``C_n`` is the new class whose mean is nearest to ``μ(C_o)``
(Euclidean; the paper's FeTrIL\\ :sup:`1`, its default). At the end of
every experience the classifier is trained again from scratch on the
experience's own features (new classes) and the pseudo-features of every
past class, all L2-normalised: one-vs-rest linear SVMs with the squared
hinge loss (the authors' and Mammoth's ``LinearSVC(penalty='l2',
dual=False, C=1, tol=1e-4)``); per class ``k`` and training row ``x_i``
(``t_{ik} = +1`` for its own rows, ``-1`` for all others),

.. math::
   \\min_{w_k, b_k} \\tfrac12 (\\lVert w_k\\rVert^2 + b_k^2)
   + C \\sum_i \\max(0, 1 - t_{ik}(w_k^\\top \\hat x_i + b_k))^2,
   \\qquad \\hat y = \\arg\\max_k w_k^\\top \\hat x + b_k,

with the bias regularised as liblinear does (``intercept_scaling=1``: the
bias is the weight of a constant feature 1). The first experience's
classifier is trained on its real features alone, as the references do.

Followed: the authors' code (GregoirePetit/FeTrIL: ``compute_distances.py``
translates in the raw feature space and takes the nearest new class by
``pairwise_distances`` of the means; ``train_classifiers.py`` fits one
``LinearSVC`` per class on L2-normalised rows; ``compute_predictions.py``
normalises the test features and takes the highest score) and Mammoth's
``fetril.py`` (the same in one model: the backbone trains on the first
task only and is frozen at its end; ``svc_regularization`` 1,
``svc_tolerance`` 1e-4).

The SVMs are solved in JAX inside one jitted call at each experience's
end, not by a host call to liblinear: Newton's method on the primal (the
objective is convex and once differentiable; its generalised Hessian is
``I + 2C X_Aᵀ X_A`` over the rows ``A`` inside the margin), each Newton
direction by conjugate gradients (Hessian-vector products, no ``D x D``
matrix per class; stopped at a residual of 0.1 times the gradient, as
liblinear's trust-region Newton stops its inner solve) and a backtracking
(Armijo) line search, all classes at once. It stops, as liblinear's
primal solver does, when every class's gradient norm has fallen to
``tol · max(min(n₊, n₋), 1) / n`` of its value at ``w = 0`` (``n₊``,
``n₋`` the class's positive and negative rows), or after ``max_iter``
Newton steps. The problem is strictly convex, so the solution is the one
liblinear converges to (tested against scikit-learn's ``LinearSVC``).

Static shapes: the pseudo-features of the past classes are gathered into
``(past classes, rows, D)``, ``rows`` the experience's largest class
rounded up to a multiple of 128 (the host knows both when the experience
ends, so each distinct pair compiles once), with a mask for the rows
beyond the chosen new class's count.

Deviations: the first experience trains with the engine's optimiser and
the plain cross-entropy over all classes' outputs (the authors' LUCIR
ResNet-18 with a cosine head, then an AugMix fine-tuning; Mammoth's
backbone and schedule); from the second experience on the model's gradient
is zero and its parameters are restored from the copy taken at the freeze
after every update (the steps still run, as FeCAM's; Mammoth runs no
epoch). Classes without a classifier are left out of the prediction
(before the first experience ends, the model's own logits);
task-incremental streams mask the scores to the example's task. Each class
must come in one experience (a ValueError otherwise).

References:
  Petit, Popescu, Schindler, Picard & Delezoide, `FeTrIL: Feature
  Translation for Exemplar-Free Class-Incremental Learning
  <https://arxiv.org/abs/2211.13131>`_, WACV 2023.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.strategies._extractor import extract, predict_fitted
from jaxcl.strategies._freeze import (restore_all, restore_once_frozen,
                                      zero_grads_once_frozen)
from jaxcl.strategies.icarl import features, normalise
from jaxcl.strategy import Strategy, new_classes
from jaxcl.train import device_experience, feature_width, init_variables

__all__ = ["fetril", "FeTrILState", "linear_svc", "pseudo_features",
           "pseudo_rows", "ROW_BLOCK"]

# Pseudo-feature blocks are padded to a multiple of this many rows, so that
# experiences whose largest classes differ a little share one program.
ROW_BLOCK = 128
# Armijo's sufficient-decrease fraction and the line search's halvings.
_ARMIJO = 0.01
_HALVINGS = 30
# The conjugate-gradient residual at which a Newton direction is taken
# (liblinear's trust-region Newton stops its inner solve at 0.1 ‖g‖).
_CG_RESIDUAL = 0.1


class FeTrILState(NamedTuple):
  mean: jax.Array        # float32 (C, D): μ_k, the raw features' class means
  count: jax.Array       # int32 (C,): training rows behind μ_k
  coef: jax.Array        # float32 (C, D): the SVMs' weights w_k
  intercept: jax.Array   # float32 (C,): their biases b_k
  params: Any            # the feature extractor (the model when it froze)
  model_state: Any       # its model state
  frozen: jax.Array      # bool scalar: the first experience has ended


def linear_svc(x: jax.Array, labels: jax.Array, weight: jax.Array,
               fit: jax.Array, c: float = 1.0, tol: float = 1e-4,
               max_iter: int = 100, return_steps: bool = False
               ) -> tuple[jax.Array, ...]:
  """One-vs-rest linear SVMs, L2-regularised squared hinge loss.

  scikit-learn's ``LinearSVC(penalty='l2', loss='squared_hinge',
  dual=False, C=c, tol=tol, fit_intercept=True, intercept_scaling=1)``
  (liblinear's primal ``L2R_L2LOSS_SVC``) for every class at once, by
  Newton's method with conjugate-gradient directions and an Armijo line
  search.

  Args:
    x: ``(M, D)`` rows; labels: int ``(M,)``; weight: ``(M,)`` bool or
      0/1, the rows that count (padding False).
    fit: bool ``(K,)``: the classes to fit; the others get zeros (their
      all-negative problems are skipped).
    c: the loss weight ``C > 0``; tol: the relative gradient tolerance;
      max_iter: the Newton steps at most.
    return_steps: also return the Newton steps taken.

  Returns:
    ``(coef, intercept)``: ``(K, D)`` and ``(K,)`` (and the steps, an
    int32 scalar, with ``return_steps``). A class stops at the tolerance,
    or when a Newton step no longer decreases its objective (float32
    rounding short of the tolerance).
  """
  m, d = x.shape
  k = fit.shape[0]
  # The bias as the weight of a constant feature 1, regularised with the
  # rest (liblinear's bias term with intercept_scaling=1).
  xa = jnp.concatenate([x.astype(jnp.float32), jnp.ones((m, 1), jnp.float32)],
                       axis=1)
  w8 = weight.astype(jnp.float32)
  t = jnp.where(labels[:, None] == jnp.arange(k)[None, :], 1.0, -1.0)

  def slack(z):
    return jnp.maximum(1.0 - t * z, 0.0) * w8[:, None]

  def objective(w, z):
    return 0.5 * jnp.sum(w * w, axis=0) + c * jnp.sum(slack(z) ** 2, axis=0)

  def gradient(w, z):
    return w - 2.0 * c * (xa.T @ (t * slack(z)))

  n = jnp.sum(w8)
  n_pos = jnp.sum(w8[:, None] * (t > 0), axis=0)
  eps = tol * jnp.maximum(jnp.minimum(n_pos, n - n_pos), 1.0) \
      / jnp.maximum(n, 1.0)
  w0 = jnp.zeros((d + 1, k), jnp.float32)
  g0 = jnp.linalg.norm(gradient(w0, jnp.zeros((m, k))), axis=0)

  def cg(active, g, todo):
    # (I + 2C X_Aᵀ X_A) s = -g per class; columns stop at their residual.
    def hvp(v):
      return v + 2.0 * c * (xa.T @ (active * (xa @ v)))

    goal = _CG_RESIDUAL * jnp.linalg.norm(g, axis=0)

    def cond(carry):
      i, _, r, _, _ = carry
      live = todo & (jnp.linalg.norm(r, axis=0) > goal)
      return (i < d + 1) & jnp.any(live)

    def body(carry):
      i, s, r, p, rs = carry
      live = todo & (jnp.linalg.norm(r, axis=0) > goal)
      hp = hvp(p)
      alpha = jnp.where(live, rs / jnp.maximum(jnp.sum(p * hp, axis=0),
                                               1e-30), 0.0)
      s = s + alpha * p
      r = r - alpha * hp
      rs_new = jnp.sum(r * r, axis=0)
      beta = jnp.where(live, rs_new / jnp.maximum(rs, 1e-30), 0.0)
      p = jnp.where(live, r + beta * p, p)
      return i + 1, s, r, p, jnp.where(live, rs_new, rs)

    r = -g * todo
    out = jax.lax.while_loop(
        cond, body, (0, jnp.zeros_like(g), r, r, jnp.sum(r * r, axis=0)))
    return out[1]

  def step(w, z, f, g, s, todo):
    # Backtracking from the full Newton step until Armijo's decrease holds.
    zs = xa @ s
    slope = jnp.sum(g * s, axis=0)

    def cond(carry):
      i, _, ok = carry
      return (i < _HALVINGS) & jnp.any(todo & ~ok)

    def body(carry):
      i, size, ok = carry
      size = jnp.where(ok, size, 0.5 * size)
      trial = objective(w + size * s, z + size * zs)
      ok = ok | (trial <= f + _ARMIJO * size * slope)
      return i + 1, size, ok

    size = jnp.ones((k,), jnp.float32)
    ok = objective(w + s, z + zs) <= f + _ARMIJO * slope
    _, size, ok = jax.lax.while_loop(cond, body, (0, size, ok))
    # A direction no halving improves on (rounding near the optimum) is
    # not taken.
    return jnp.where(todo & ok, size, 0.0)

  def unfinished(w, z):
    g = gradient(w, z)
    return g, fit & (jnp.linalg.norm(g, axis=0) > eps * g0)

  def newton_cond(carry):
    i, _, _, _, todo = carry
    return (i < max_iter) & jnp.any(todo)

  def newton_body(carry):
    i, w, z, g, todo = carry
    active = (slack(z) > 0).astype(jnp.float32)
    s = cg(active, g, todo)
    f = objective(w, z)
    size = step(w, z, f, g, s, todo)
    w = w + size * s
    z = xa @ w
    g, still = unfinished(w, z)
    # A class whose objective did not decrease has stalled (float32
    # rounding short of the tolerance): it stops, rather than repeat the
    # same step until max_iter.
    return i + 1, w, z, g, still & ~(todo & (objective(w, z) >= f))

  z0 = jnp.zeros((m, k), jnp.float32)
  steps, w, _, _, _ = jax.lax.while_loop(
      newton_cond, newton_body, (0, w0, z0) + unfinished(w0, z0))
  w = jnp.where(fit[None, :], w, 0.0)
  return (w[:d].T, w[d]) + ((steps,) if return_steps else ())


def pseudo_rows(labels: np.ndarray, size: int) -> int:
  """Host side: the rows of each past class's pseudo-feature block, the
  experience's largest class (``labels``, its training labels) rounded up
  to a multiple of :data:`ROW_BLOCK`, at most ``size`` (the padded rows)."""
  largest = int(np.bincount(np.asarray(labels)).max()) if len(labels) else 1
  return max(1, min(size, ROW_BLOCK * math.ceil(largest / ROW_BLOCK)))


def pseudo_features(z: jax.Array, y: jax.Array, valid: jax.Array,
                    mean: jax.Array, new: jax.Array, old: jax.Array,
                    rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The past classes' pseudo-features (Eq. 1), before normalisation.

  Args:
    z: ``(N, D)`` raw features of the experience's rows; y: int ``(N,)``;
      valid: bool ``(N,)``.
    mean: ``(C, D)`` class means (the new classes' included).
    new: bool ``(C,)``: the experience's classes.
    old: int ``(P,)``: the past classes.
    rows: the block's rows (:func:`pseudo_rows`).

  Returns:
    ``(features, labels, mask)``: ``(P * rows, D)``, ``(P * rows,)`` and
    bool ``(P * rows,)``; past class ``old[p]``'s block holds, in the
    experience's order, the rows of the new class nearest to it, each
    moved by the difference of the two means.
  """
  n, d = z.shape
  c = mean.shape[0]
  dist = jnp.sum((mean[old][:, None, :] - mean[None, :, :]) ** 2, axis=-1)
  near = jnp.argmin(jnp.where(new[None, :], dist, jnp.inf), axis=1)
  # The experience's rows sorted by class (stable: each class's rows keep
  # their order), and where each class's run starts.
  counts = jnp.zeros((c,), jnp.int32).at[y].add(valid.astype(jnp.int32))
  order = jnp.argsort(jnp.where(valid, y, c), stable=True)
  start = jnp.cumsum(counts) - counts
  j = jnp.arange(rows)
  idx = order[jnp.minimum(start[near][:, None] + j[None, :], n - 1)]
  mask = j[None, :] < counts[near][:, None]
  moved = z[idx] - mean[near][:, None, :] + mean[old][:, None, :]
  labels = jnp.broadcast_to(old[:, None], mask.shape)
  return (moved.reshape(-1, d), labels.reshape(-1).astype(y.dtype),
          mask.reshape(-1))


def fetril(svm_c: float = 1.0, tol: float = 1e-4,
           max_iter: int = 100) -> Strategy:
  """FeTrIL (exemplar-free; pseudo-features of past classes, linear SVMs).

  Args:
    svm_c: the SVMs' ``C > 0`` (1, the authors' ``regul`` and Mammoth's
      ``svc_regularization``).
    tol: ``> 0``, the SVMs' relative gradient tolerance (1e-4, the
      authors' ``toler`` and Mammoth's ``svc_tolerance``).
    max_iter: ``>= 1``, Newton steps at most per experience's fit (100;
      a fit takes 10-20).

  Raises:
    ValueError: on a bad argument; before an experience, on a class that
    came in an earlier one.
  """
  checks.positive("fetril: svm_c", svm_c)
  checks.positive("fetril: tol", tol)
  checks.whole("fetril: max_iter", max_iter, 1)
  svm_c, tol, max_iter = float(svm_c), float(tol), int(max_iter)

  def raw(ctx, params, model_state, x, task):
    return extract(ctx, "backbone", params, model_state, x, task)

  def init(ctx, key, params):
    _, model_state = init_variables(ctx, key)
    dim = feature_width(ctx, params, model_state)
    c = ctx.info.num_classes
    return FeTrILState(mean=jnp.zeros((c, dim), jnp.float32),
                       count=jnp.zeros((c,), jnp.int32),
                       coef=jnp.zeros((c, dim), jnp.float32),
                       intercept=jnp.zeros((c,), jnp.float32),
                       params=jax.tree.map(jnp.copy, params),
                       model_state=model_state,
                       frozen=jnp.zeros((), bool))

  def before_experience(ctx, state, experience):
    del ctx
    # Each class once: its mean is taken when its experience ends.
    new_classes("fetril", np.asarray(state.strategy.count) > 0, experience)
    return state

  @functools.partial(jax.jit, static_argnums=(0, 7))
  def update(ctx, ss, params, model_state, x, y, task, rows, n_valid, old):
    # The first experience's end freezes the extractor (later ones keep it).
    params = restore_all(params, ss.params, ss.frozen)
    model_state = restore_all(model_state, ss.model_state, ss.frozen)
    z = features(lambda p, ms, a, t: raw(ctx, p, ms, a, t), params,
                 model_state, x, task)
    valid = jnp.arange(x.shape[0]) < n_valid
    onehot = jax.nn.one_hot(y, ss.mean.shape[0], dtype=jnp.float32) \
        * valid[:, None].astype(jnp.float32)
    counts = jnp.sum(onehot, axis=0)
    new = counts > 0
    mean = jnp.where(new[:, None],
                     (onehot.T @ z) / jnp.maximum(counts, 1.0)[:, None],
                     ss.mean)
    rows_x, rows_y, rows_ok = z, y, valid
    if old.shape[0]:
      px, py, pok = pseudo_features(z, y, valid, mean, new, old, rows)
      rows_x = jnp.concatenate([z, px])
      rows_y = jnp.concatenate([y, py])
      rows_ok = jnp.concatenate([valid, pok])
    count = ss.count + counts.astype(jnp.int32)
    coef, intercept = linear_svc(normalise(rows_x), rows_y, rows_ok,
                                 count > 0, svm_c, tol, max_iter)
    return ss._replace(mean=mean, count=count, coef=coef,
                       intercept=intercept, params=params,
                       model_state=model_state, frozen=jnp.ones((), bool))

  def after_experience(ctx, state, experience):
    ss = state.strategy
    data = device_experience(experience, ctx.info.train_size)
    # Host side, once per experience: which classes are past ones and how
    # many rows their blocks need fix the fit's shapes.
    old = np.flatnonzero(np.asarray(ss.count) > 0).astype(np.int32)
    rows = pseudo_rows(experience.train_y, len(data["y"]))
    ss = update(ctx, ss, state.params, state.model_state, data["x"],
                data["y"], data["task"], rows,
                jnp.asarray(experience.num_train, jnp.int32),
                jnp.asarray(old))
    return state.replace(strategy=ss)

  def predict(ctx, sstate, params, model_state, x, task):
    def scores():
      u = normalise(raw(ctx, sstate.params, sstate.model_state, x, task))
      return u @ sstate.coef.T + sstate.intercept

    return predict_fitted(scores, sstate.count, ctx, params, model_state, x,
                          task)

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=zero_grads_once_frozen,
                  project_params=restore_once_frozen,
                  after_experience=after_experience, predict=predict,
                  name="fetril")
