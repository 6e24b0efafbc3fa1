"""RanPAC: a random projection of frozen features, a ridge head in closed form.

No exemplars, no gradient step (unless phase 1 is asked for).

McDonnell et al. (2023) put a fixed random projection ``W`` (``D x M``,
entries ``N(0, 1)``, drawn once) and a nonlinearity after the features ``z``
of a frozen extractor, and accumulate the second-moment statistics of the
projected features ``h`` and the one-hot targets ``y`` over the stream:

.. math::
   h = \\phi(z^\\top W), \\qquad
   G \\leftarrow G + \\textstyle\\sum_i h_i h_i^\\top, \\qquad
   C \\leftarrow C + \\textstyle\\sum_i h_i y_i^\\top,

(``G`` is ``M x M``, ``C`` is ``M x K``; the reference calls ``C`` ``Q``).
After each experience the head is the ridge solution on everything seen,

.. math::
   W_o = (G + \\lambda I)^{-1} C, \\qquad s(x) = h(x)^\\top W_o,

and the class with the highest score among the classes seen wins (the
paper's phase 2; ``φ`` = ``activation``: ReLU, the paper's, or none). ``G``
and ``C`` never forget: the head is the one joint ridge regression on all
the training rows so far would give, whatever their order.

``λ`` (``ridge=None``) is chosen per experience as the reference's
``optimise_ridge_parameter`` does: the experience's rows are split 80/20,
the ridge fit on the 80 % part is scored by its mean squared error on the
20 % part, for each ``λ`` of a grid (``10^-8 .. 10^8``, the reference's
``10.0 ** np.arange(-8, 9)``), and the best ``λ`` is used for the head on
the *accumulated* statistics. The reference holds the experience's
features; here the validation error comes exactly from second moments of
the two parts (``A`` the 80 %, ``B`` the 20 %):

.. math::
   W_\\lambda = (G_A + \\lambda I)^{-1} C_A, \\qquad
   \\lVert H_B W_\\lambda - Y_B \\rVert_F^2
   = \\operatorname{tr}(W_\\lambda^\\top G_B W_\\lambda)
     - 2 \\operatorname{tr}(W_\\lambda^\\top C_B) + n_B,

(``‖Y_B‖² = n_B`` for one-hot rows), so nothing ``N x M`` is stored. All
``λ`` share one eigendecomposition ``G_A = V S Vᵀ``: ``W_λ = V (S +
λI)^{-1} Vᵀ C_A``, exact for every ``λ`` of the grid even where ``G_A`` is
singular (the reference's float32 ``torch.linalg.solve`` of ``G_A + 10^-8
I`` is not), and cheaper than 17 factorisations. A loss that is not finite
counts as infinite. Which rows are in ``B`` is a draw per experience from
the strategy's key (exactly ``n - floor(0.8 n)`` of the ``n`` rows, as the
reference's ``int(0.8 n)`` split of a shuffled loader), so a run is
reproducible. ``ridge=<float>`` fixes ``λ`` instead.

Here the statistics are folded in at each experience's end, over the
experience's training rows in one jitted call (features in chunks, as
FeCAM's statistics), not per training step: each row counts once whatever
the number of epochs, the 80/20 statistics ``G_A``, ``G_B`` live only in
that call (per-step folding would carry two more ``M x M`` matrices in the
state), and a ``B``-row rank update of a 400 MB ``G`` at every step of 10
rows would be bound by memory traffic (6000 passes over ``G`` per MNIST
experience, against 24 chunks here).

Features (``features``): ``'backbone'``, the model's backbone (``features
=True``) as the stream starts, copied into the state at the first
experience and used in evaluation mode, as Deep SLDA's; or ``'input'``,
the flattened inputs. With ``adapt_first=True`` (``'backbone'`` only) the
model trains by the engine's optimiser on the first experience and is
frozen at its end, as FeCAM's (its parameters are copied into the state
then, later gradients are zero and the parameters are restored after every
update): the paper's phase 1, "first-session adaptation". The default is
``False``: the paper adapts a ViT-B/16 by parameter-efficient tuning
(adapters, SSF, VPT) of a few parameters, and offers phase 2 alone as its
"no phase 1" variant; whole-model training on the first experience's few
classes is a different, stronger intervention, so it is opt-in. Without
phase 1 the model trains nothing (zero gradients).

Deviations: the exact eigendecomposition for the ``λ`` search (above);
classes with no row yet are left out of the prediction (the reference's
head has rows only for the classes seen); task-incremental streams mask the
scores to the example's task; before any statistics exist, the model's own
logits. ``proj_dim=0`` is the reference's ``M = 0`` ("no RP, only
decorrelation": ``h = z``, ``G`` is ``D x D``, ``activation`` must be
``'none'``). The reference's ``sigma`` scale of the cosine head (1, not
trained after phase 1) is left out: it cannot change a prediction.

References:
  McDonnell, Gong, Parvaneh, Abbasnejad & van den Hengel, `RanPAC: Random
  Projections and Pre-trained Models for Continual Learning
  <https://arxiv.org/abs/2307.02251>`_, NeurIPS 2023. Code:
  github.com/RanPAC/RanPAC (``RanPAC.py``: ``setup_RP``, ``replace_fc``,
  ``optimise_ridge_parameter``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.strategies import _extractor
from jaxcl.strategies.icarl import exemplar_hook, features as chunked
from jaxcl.strategy import Strategy, zero_grads
from jaxcl.strategies._freeze import (restore_all, restore_once_frozen,
                                      zero_grads_once_frozen)

__all__ = ["ranpac", "RanPACState", "project", "split_rows",
           "accumulate", "ridge_losses", "ridge_solve", "FEATURES",
           "ACTIVATIONS", "RIDGE_GRID", "MAX_DIM"]

FEATURES = _extractor.FEATURES
ACTIVATIONS = ("relu", "none")
# The reference's grid: 10.0 ** np.arange(-8, 9).
RIDGE_GRID = tuple(10.0 ** k for k in range(-8, 9))
# G is M x M floats (0.9 GB at 15000), and an experience's end holds about
# five such matrices (G, G_A, G_B, the eigenvectors, eigh's workspace).
MAX_DIM = 15000
VAL_FRACTION = 0.2   # the reference's int(0.8 n) rows fit, the rest score
CHUNK = 500          # rows per product when the statistics are folded in


class RanPACState(NamedTuple):
  proj: jax.Array      # float32 (D, M): W, fixed ((1, 1) zeros, unused,
  #                       when proj_dim=0: a checkpoint holds no empty array)
  gram: jax.Array      # float32 (M, M): G = Σ h hᵀ
  corr: jax.Array      # float32 (M, K): C = Σ h yᵀ
  weight: jax.Array    # float32 (M, K): W_o, set at each experience's end
  count: jax.Array     # float32 (K,): training rows per class so far
  ridge: jax.Array     # float32 scalar: the λ of the last head
  losses: jax.Array    # float32 (len(grid),): the last search's errors
  key: jax.Array       # the key the 80/20 splits are drawn from
  params: Any          # the frozen feature extractor (() for 'input')
  model_state: Any     # its model state (() for 'input')
  frozen: jax.Array    # bool scalar: the first experience has ended


def project(z: jax.Array, proj: jax.Array | None, activation: str
            ) -> jax.Array:
  """``φ(z W)`` for ``(N, D)`` features (``z`` itself when ``proj`` is
  ``None``: ``proj_dim=0``)."""
  if proj is None:
    return z
  h = z @ proj
  return jnp.maximum(h, 0.0) if activation == "relu" else h


def split_rows(key: jax.Array, n_valid: jax.Array, size: int
               ) -> tuple[jax.Array, jax.Array]:
  """``(fit, val)`` bool ``(size,)``: a random ``floor(0.8 n)`` of the first
  ``n_valid`` rows fit the ridge, the other valid rows score it."""
  valid = jnp.arange(size) < n_valid
  u = jnp.where(valid, jax.random.uniform(key, (size,)), 2.0)
  rank = jnp.argsort(jnp.argsort(u))
  n_fit = jnp.floor((1.0 - VAL_FRACTION) * n_valid.astype(jnp.float32))
  fit = valid & (rank < n_fit.astype(jnp.int32))
  return fit, valid & ~fit


def accumulate(h_of: Any, z: jax.Array, y: jax.Array, masks: jax.Array,
               num_classes: int, chunk: int = CHUNK
               ) -> tuple[jax.Array, jax.Array]:
  """``Σ h hᵀ`` and ``Σ h yᵀ`` over the rows of each mask.

  Args:
    h_of: ``(n, D) -> (n, M)``, the projected features of a chunk.
    z: ``(N, D)`` features; y: int ``(N,)``; masks: bool ``(S, N)``.

  Returns:
    ``(gram, corr)``: ``(S, M, M)`` and ``(S, M, K)``, one per mask. The
    rows go through in chunks, so no ``N x M`` matrix is formed.
  """
  n = z.shape[0]
  nb = math.ceil(n / chunk)
  pad = nb * chunk - n
  zp = jnp.concatenate([z, jnp.zeros((pad, z.shape[1]), z.dtype)])
  yp = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
  mp = jnp.concatenate([masks, jnp.zeros((masks.shape[0], pad), bool)], 1)
  m = h_of(zp[:1]).shape[1]
  s = masks.shape[0]

  def step(carry, c):
    gram, corr = carry
    zc, yc, mc = c
    h = h_of(zc)
    onehot = jax.nn.one_hot(yc, num_classes, dtype=jnp.float32)
    hm = h[None] * mc.astype(jnp.float32)[:, :, None]     # (S, chunk, M)
    gram = gram + jnp.einsum("sni,nj->sij", hm, h)
    corr = corr + jnp.einsum("sni,nk->sik", hm, onehot)
    return (gram, corr), None

  init = (jnp.zeros((s, m, m), jnp.float32),
          jnp.zeros((s, m, num_classes), jnp.float32))
  (gram, corr), _ = jax.lax.scan(
      step, init, (zp.reshape(nb, chunk, -1), yp.reshape(nb, chunk),
                   jnp.moveaxis(mp.reshape(s, nb, chunk), 1, 0)))
  return gram, corr


def ridge_losses(g_fit: jax.Array, c_fit: jax.Array, g_val: jax.Array,
                 c_val: jax.Array, n_val: jax.Array, grid: jax.Array
                 ) -> jax.Array:
  """The validation mean squared error of the ridge fit for each ``λ``.

  ``W_λ = (G_A + λI)^{-1} C_A`` (one eigendecomposition of ``G_A`` for all
  ``λ``) scored on the held-out rows from their statistics alone:
  ``(tr(W_λᵀ G_B W_λ) - 2 tr(W_λᵀ C_B) + n_B) / (n_B K)``, the reference's
  ``F.mse_loss`` over the ``n_B x K`` one-hot targets. Not finite: ``inf``.
  """
  s, v = jnp.linalg.eigh(g_fit)
  s = jnp.maximum(s, 0.0)       # G_A is PSD; rounding may dip below 0
  p = v.T @ c_fit

  def one(lam):
    w = v @ (p / (s + lam)[:, None])
    sq = jnp.sum(w * (g_val @ w)) - 2.0 * jnp.sum(w * c_val) + n_val
    return sq / jnp.maximum(n_val * c_fit.shape[1], 1.0)

  losses = jax.lax.map(one, grid)
  return jnp.where(jnp.isfinite(losses), losses, jnp.inf)


def ridge_solve(gram: jax.Array, corr: jax.Array, lam: jax.Array
                ) -> jax.Array:
  """``(G + λI)^{-1} C`` by a Cholesky solve (``G + λI`` is positive
  definite for ``λ > 0``)."""
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
  return jax.scipy.linalg.solve(gram + lam * eye, corr, assume_a="pos")


def ranpac(proj_dim: int = 10000, activation: str = "relu",
           ridge: float | None = None,
           ridge_grid: Sequence[float] = RIDGE_GRID,
           features: str = "backbone", adapt_first: bool = False
           ) -> Strategy:
  """RanPAC (exemplar-free, random projection + closed-form ridge head).

  Args:
    proj_dim: ``M``, the random projection's width (10000, the paper's);
      at most :data:`MAX_DIM`. 0: no projection (``h = z``, the
      reference's ``M = 0``; needs ``activation='none'``).
    activation: ``'relu'`` (the paper's) or ``'none'``.
    ridge: ``λ > 0`` fixed; ``None`` (default): chosen per experience from
      ``ridge_grid`` by the 80/20 split (module docstring).
    ridge_grid: the ``λ`` values searched (each finite and > 0).
    features: ``'backbone'`` (the model's backbone as the stream starts, or
      after the first experience with ``adapt_first``) or ``'input'`` (the
      flattened inputs).
    adapt_first: train the model on the first experience, then freeze it
      (the paper's phase 1; ``features='backbone'`` only).

  Raises:
    ValueError: on a bad argument; at ``init``, on ``proj_dim=0`` with
    features wider than :data:`MAX_DIM`.
  """
  checks.whole("ranpac: proj_dim", proj_dim,
               note=f"0: no projection; at most {MAX_DIM}")
  if proj_dim > MAX_DIM:
    raise ValueError(
        f"ranpac: proj_dim={proj_dim} would make G {proj_dim} x {proj_dim} "
        f"({4 * proj_dim ** 2 / 1e9:.1f} GB, and an experience's end holds "
        f"about five such matrices); use at most {MAX_DIM}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"ranpac: unknown activation {activation!r}; valid: "
                     f"{list(ACTIVATIONS)}")
  if proj_dim == 0 and activation != "none":
    raise ValueError(f"ranpac: proj_dim=0 (no projection) takes "
                     f"activation='none', got {activation!r}")
  if ridge is not None:
    checks.positive("ranpac: ridge", ridge)
  if isinstance(ridge_grid, (str, bytes)) or not isinstance(
      ridge_grid, Sequence) or len(ridge_grid) == 0:
    raise ValueError(f"ranpac: ridge_grid must be a non-empty sequence of "
                     f"numbers > 0, got {ridge_grid!r}")
  for i, lam in enumerate(ridge_grid):
    checks.positive(f"ranpac: ridge_grid[{i}]", lam)
  if features not in FEATURES:
    raise ValueError(f"ranpac: unknown features {features!r}; valid: "
                     f"{list(FEATURES)}")
  checks.flag("ranpac: adapt_first", adapt_first)
  if adapt_first and features != "backbone":
    raise ValueError(f"ranpac: adapt_first=True trains the backbone on the "
                     f"first experience; it needs features='backbone', got "
                     f"features={features!r}")
  grid = np.asarray(ridge_grid, np.float32)

  def extract(ctx, params, model_state, x, task):
    return _extractor.extract(ctx, features, params, model_state, x, task)

  def proj_of(ss):
    return ss.proj if proj_dim else None

  def init(ctx, key, params):
    info = ctx.info
    frozen, model_state, dim = _extractor.init_extractor(ctx, key, params,
                                                         features)
    m = proj_dim or dim
    if m > MAX_DIM:
      raise ValueError(
          f"ranpac: proj_dim=0 uses the {dim} features themselves, and G "
          f"would be {dim} x {dim} ({4 * dim * dim / 1e9:.1f} GB); use at "
          f"most {MAX_DIM} (or a projection, proj_dim > 0)")
    k_proj, k_split = jax.random.split(jax.random.fold_in(key, 0x5A17))
    c = info.num_classes
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    return RanPACState(
        proj=(jax.random.normal(k_proj, (dim, proj_dim), jnp.float32)
              if proj_dim else jnp.zeros((1, 1), jnp.float32)),
        gram=zeros((m, m)), corr=zeros((m, c)), weight=zeros((m, c)),
        count=zeros((c,)), ridge=zeros(()), losses=zeros((len(grid),)),
        key=k_split, params=frozen, model_state=model_state,
        frozen=jnp.zeros((), bool))

  def before_experience(ctx, state, experience):
    del ctx
    if features == "backbone" and not adapt_first and experience.index == 0:
      # The extractor is the model as the stream starts.
      frozen, model_state = _extractor.copy_model(state)
      ss = state.strategy._replace(params=frozen, model_state=model_state)
      return state.replace(strategy=ss)
    return state

  @functools.partial(jax.jit, static_argnums=0)
  def update(ctx, ss, params, model_state, x, y, task, n_valid, experience):
    if adapt_first:
      # The first experience's end freezes the extractor (later ones keep
      # it).
      ss = ss._replace(
          params=restore_all(params, ss.params, ss.frozen),
          model_state=restore_all(model_state, ss.model_state, ss.frozen))
    z = chunked(lambda p, ms, a, t: extract(ctx, p, ms, a, t), ss.params,
                ss.model_state, x, task)
    fit, val = split_rows(jax.random.fold_in(ss.key, experience), n_valid,
                          x.shape[0])
    masks = jnp.stack([fit | val] if ridge is not None else [fit, val])
    k = ss.corr.shape[1]
    gram, corr = accumulate(lambda a: project(a, proj_of(ss), activation),
                            z, y, masks, k)
    if ridge is None:
      losses = ridge_losses(gram[0], corr[0], gram[1], corr[1],
                            jnp.sum(val).astype(jnp.float32),
                            jnp.asarray(grid))
      lam = jnp.asarray(grid)[jnp.argmin(losses)]
    else:
      losses, lam = ss.losses, jnp.float32(ridge)
    g = ss.gram + jnp.sum(gram, axis=0)
    c = ss.corr + jnp.sum(corr, axis=0)
    onehot = jax.nn.one_hot(y, k, dtype=jnp.float32)
    count = ss.count + jnp.sum(onehot * (fit | val)[:, None], axis=0)
    return ss._replace(gram=g, corr=c, weight=ridge_solve(g, c, lam),
                       count=count, ridge=lam, losses=losses,
                       frozen=jnp.ones((), bool) if adapt_first
                       else ss.frozen)

  def predict(ctx, sstate, params, model_state, x, task):
    def scores():
      z = extract(ctx, sstate.params, sstate.model_state, x, task)
      return project(z, proj_of(sstate), activation) @ sstate.weight

    return _extractor.predict_fitted(scores, sstate.count, ctx, params,
                                     model_state, x, task)

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=(zero_grads_once_frozen if adapt_first
                                else zero_grads),
                  project_params=(restore_once_frozen if adapt_first
                                  else Strategy().project_params),
                  after_experience=exemplar_hook(update), predict=predict,
                  name="ranpac")
