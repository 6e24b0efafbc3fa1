"""CODA-Prompt: attention-weighted prompt components for a frozen ViT.

Smith et al. (2023) keep a pretrained Vision Transformer frozen and learn,
for each prompted block ``l``, ``M`` prompt components ``P_{l,m}`` (each
``L x D``) with a key ``K_{l,m}`` and an attention vector ``A_{l,m}``
(both ``D``), and a classifier on the CLS output. An image's prompt in
block ``l`` is the components' sum weighted by the cosine of the attended
frozen query with each key (the paper's eqs. 3-4):

.. math::
   \\alpha_{l,m} = \\gamma(q(x) \\odot A_{l,m},\\, K_{l,m}),\\qquad
   p_l = \\sum_m \\alpha_{l,m} P_{l,m},

and ``p_l``'s two halves are prefix keys and values of block ``l``'s
self-attention (:class:`jaxcl.models.vit.CodaViT`). Everything is
differentiable: no top-k, no key loss.

**Components per experience** (the reference's ``CodaPrompt.forward`` and
``process_task_count``): the ``M`` components are split into
``n_tasks`` slices of ``pt = M // n_tasks``; experience ``t`` uses the
first ``f = (t + 1) pt`` and trains only its own slice ``[t pt, f)``:
earlier slices are detached (here: their gradient zeroed and their value
restored after every update, as :mod:`jaxcl.strategies._freeze` freezes
a part), later ones are left out of the sum (here: their ``P`` is kept at
0, so they add nothing to ``p_l`` and their ``K``, ``A`` get no gradient).
When experience ``t`` starts, its slice of ``P``, ``K`` and ``A`` (each
flattened to rows) is re-initialised by the reference's Gram-Schmidt
(:func:`gram_schmidt`): fresh normal draws made orthogonal to the rows
before them, then unit-normalised. That is the reference's current way to
keep components orthogonal ("with updated code, [the ortho penalty] now
can be 0"); the penalty of the paper's eq. 5,

.. math::
   \\mathcal{L}_{\\text{ortho}} = \\mu \\sum_l \\big(\\|B B^\\top - I\\|^2
   \\text{ over } B \\in \\{P_{l,<f}, K_{l,<f}, A_{l,<f}\\}\\big),

(each term the *mean* square over the ``f x f`` entries, the reference's
``ortho_penalty``) is offered as ``ortho_mu`` (default 0, the reference's
current scripts and Mammoth's default).

**Training loss**: cross-entropy over the current experience's classes
(the reference's ``logits[:, :last_valid_out_dim] = -inf`` on the logits
up to the current classes; ``train_mask=False``: over all classes).
Beside a member that appends replayed rows the mask is refused (at the
first step), as :mod:`jaxcl.strategies.l2p` refuses it: the replayed rows'
loss over all classes pushes the current classes' logits down and nothing
lifts them (measured with l2p+replay: 0.00 on each new experience; the
loss here is the same); chain ``coda_prompt(train_mask=False)`` with
replay instead. Prediction, with no task id, is over the classes seen so
far.

The backbone is frozen (zero gradient and the copy restored) and, with
``pretrained``, loaded from a plain ``vit`` run's ``.npz`` when the first
experience starts, as :mod:`jaxcl.strategies.l2p` does.

Deviations: the reference's Gram-Schmidt redraws forever when a
denominator is below 1e-8 (a zero row); here that is an error, and so is
a pool of more components than the key width ``D`` (no ``M`` vectors in
``R^D`` are orthogonal when ``M > D``, which is where the reference would
loop). The head's bias starts at 0 (PyTorch's ``nn.Linear`` draws it).
The cosine learning-rate schedule and the reference's Adam betas are the
optimiser's business.

References:
  Smith et al., `CODA-Prompt: COntinual Decomposed Attention-based
  prompting for rehearsal-free continual learning
  <https://arxiv.org/abs/2211.13218>`_, CVPR 2023 (code: GT-RIPL/CODA-Prompt
  ``models/zoo.py``; Mammoth's ``coda_prompt``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl import pretrained as pretrained_lib
from jaxcl.models.vit import CodaViT
from jaxcl.strategies import _prompt
from jaxcl.strategy import Strategy, experience_classes, frozen_update

__all__ = ["coda_prompt", "CodaState", "gram_schmidt", "ortho_penalty",
           "PARTS", "COMPONENTS"]

BACKBONE = _prompt.BACKBONE
# The per-component params (axis 1 is the component m), then the model's.
COMPONENTS = ("prompt", "key", "attn")
PARTS = (BACKBONE,) + COMPONENTS + ("head",)
_SALT = 0xC0DA   # folded into the run's key for the Gram-Schmidt draws


class CodaState(NamedTuple):
  backbone: Any        # like params['backbone']: the frozen backbone
  frozen: Any          # {prompt, key, attn} as the experience started
  loaded: jax.Array    # bool scalar: the pretrained backbone is in place
  task: jax.Array      # int32 scalar: experiences started
  active: jax.Array    # bool (M,): the current experience's components
  used: jax.Array      # bool (M,): components of this and earlier ones
  current: jax.Array   # bool (C,): the current experience's classes
  seen: jax.Array      # bool (C,): the classes of finished experiences


def gram_schmidt(rows: np.ndarray, start: int, stop: int,
                 draws: np.ndarray) -> np.ndarray:
  """``rows`` with rows ``[start, stop)`` re-drawn orthogonal to the ones
  before them (the reference's ``gram_schmidt``).

  Row ``k`` becomes ``u_k = v_k - Σ_{j<k} (<v_k, u_j> / <u_j, u_j>) u_j``
  with ``v_k`` its draw (classical Gram-Schmidt: every projection of the
  draw itself, so ``u_k`` is orthogonal to the ``u_j`` when those are
  orthogonal to each other; trained old rows need not be), then the new
  rows are scaled to unit norm. Rows outside ``[start, stop)`` are kept.

  Args:
    rows: ``(M, n)``.
    start, stop: the slice to re-draw.
    draws: ``(stop - start, n)`` standard normal draws.

  Raises:
    ValueError: a row before ``k`` with squared norm below 1e-8 (the
      reference redraws, which loops when the row is an old one or the
      slice does not fit in ``n`` dimensions).
  """
  u = np.array(rows, np.float64)
  for k in range(start, stop):
    v = np.asarray(draws[k - start], np.float64)
    proj = np.zeros_like(v)
    for j in range(k):
      den = u[j] @ u[j]
      if den < 1e-8:
        raise ValueError(f"gram_schmidt: row {j} is (nearly) zero; cannot "
                         f"orthogonalise row {k} against it ({stop} rows "
                         f"in {u.shape[1]} dimensions)")
      proj += (v @ u[j]) / den * u[j]
    u[k] = v - proj
  u[start:stop] /= np.linalg.norm(u[start:stop], axis=1, keepdims=True)
  return u.astype(np.asarray(rows).dtype)


def ortho_penalty(t: jax.Array, used: jax.Array) -> jax.Array:
  """``mean((B B^T - I)^2)`` over the used rows ``B`` of ``t`` ``(M, n)``
  (the reference's ``ortho_penalty(t[:f])``); ``used`` bool ``(M,)``."""
  g = t @ t.T - jnp.eye(t.shape[0], dtype=t.dtype)
  pair = used[:, None] & used[None, :]
  n = jnp.maximum(jnp.sum(used), 1).astype(t.dtype)
  return jnp.sum(jnp.where(pair, g * g, 0.0)) / (n * n)


def _along_components(mask: jax.Array, leaf: jax.Array) -> jax.Array:
  """``mask`` (M,) shaped to broadcast over a ``(n_layers, M, ...)`` leaf."""
  return mask.reshape((1, -1) + (1,) * (leaf.ndim - 2))


def coda_prompt(ortho_mu: float = 0.0, n_tasks: int = 0,
                train_mask: bool = True, pretrained: str = "") -> Strategy:
  """CODA-Prompt (Smith et al. 2023).

  Args:
    ortho_mu: ``μ``, the weight of the orthogonality penalty on the used
      components, keys and attention vectors (0: none, the reference's
      current scripts; its older CIFAR-100 script used 0.1).
    n_tasks: the slices the ``M`` components are split into (``M //
      n_tasks`` per experience); 0: the stream's number of experiences.
    train_mask: the training cross-entropy over the current experience's
      classes only (the reference's); False: over all.
    pretrained: ``.npz`` of a plain ``vit`` run's params
      (:mod:`jaxcl.pretrained`), loaded into the backbone when the first
      experience starts; ``''``: keep the backbone the run starts with.

  Raises:
    ValueError: a bad argument or a missing file; at ``init``, a model
    other than the CODA ViT, fewer components than slices, or more
    components than the key width; at an experience past ``n_tasks``.
  """
  checks.nonnegative("coda_prompt: ortho_mu", ortho_mu)
  checks.whole("coda_prompt: n_tasks", n_tasks,
               note="0: the stream's number of experiences")
  checks.flag("coda_prompt: train_mask", train_mask)
  if pretrained:
    pretrained_lib.require(pretrained, "coda_prompt")

  def slices(ctx) -> tuple[int, int]:
    n = n_tasks or ctx.info.num_experiences
    return n, ctx.model.pool_size // n

  def init(ctx, key, params):
    del key
    _prompt.require_model(
        "coda_prompt", ctx, params, CodaViT, PARTS,
        "the CODA-Prompt ViT (model.name='vit' with model.vit.pool_size > 0 "
        "and model.vit.prompt='coda')")
    n, pt = slices(ctx)
    m, d = ctx.model.pool_size, ctx.model.backbone.dim
    if pt < 1:
      raise ValueError(f"coda_prompt: pool_size={m} components for "
                       f"n_tasks={n} experiences; use pool_size >= {n}")
    if n * pt > d:
      raise ValueError(f"coda_prompt: {n * pt} components (pool_size={m}) "
                       f"cannot be orthogonal in the keys' {d} dimensions; "
                       f"use pool_size <= {d} (model.vit.dim)")
    c = ctx.info.num_classes
    none = jnp.zeros((m,), bool)
    return CodaState(jax.tree.map(jnp.copy, params[BACKBONE]),
                     {k: jnp.copy(params[k]) for k in COMPONENTS},
                     jnp.asarray(not pretrained), jnp.zeros((), jnp.int32),
                     none, none, jnp.zeros((c,), bool), jnp.zeros((c,), bool))

  def new_slice(rng, t, params, start, stop):
    """The components with slice ``[start, stop)`` Gram-Schmidt'ed per
    layer and part, and the later components' ``P`` at zero."""
    key = jax.random.fold_in(jax.random.fold_in(rng, _SALT), t)
    out = {}
    for i, name in enumerate(COMPONENTS):
      leaf = np.asarray(params[name])
      flat = leaf.reshape(leaf.shape[0], leaf.shape[1], -1)   # n_l, M, n
      new = np.empty_like(flat)
      for layer in range(flat.shape[0]):
        draws = np.asarray(jax.random.normal(
            jax.random.fold_in(key, 16 * layer + i),
            (stop - start, flat.shape[2])))
        new[layer] = gram_schmidt(flat[layer], start, stop, draws)
      if name == "prompt":
        new[:, stop:] = 0.0     # later components add nothing
      out[name] = jnp.asarray(new.reshape(leaf.shape))
    return out

  def before_experience(ctx, state, experience):
    ss, params = _prompt.load_once(state.strategy, state.params, pretrained)
    n, pt = slices(ctx)
    t = int(ss.task)
    if t >= n:
      raise ValueError(f"coda_prompt: experience {t + 1} of a stream, but "
                       f"the components were split for n_tasks={n}; set "
                       "n_tasks to the number of experiences (or 0)")
    start, stop = t * pt, (t + 1) * pt
    params = {**params, **new_slice(state.rng, t, params, start, stop)}
    m = np.arange(ctx.model.pool_size)
    ss = ss._replace(frozen=_prompt.fresh_copy(
                         {k: params[k] for k in COMPONENTS}),
                     task=jnp.asarray(t + 1, jnp.int32),
                     active=jnp.asarray((m >= start) & (m < stop)),
                     used=jnp.asarray(m < stop),
                     seen=ss.seen | ss.current,
                     current=experience_classes(
                         ctx.info.num_classes, experience))
    return state.replace(params=params, strategy=ss)

  def loss(ctx, sstate, params, batch, logits):
    del ctx, batch, logits
    if ortho_mu == 0:
      return jnp.zeros((), jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for name in COMPONENTS:
      leaf = params[name]
      flat = leaf.reshape(leaf.shape[0], leaf.shape[1], -1)
      total += jnp.sum(jax.vmap(ortho_penalty, (0, None))(flat,
                                                          sstate.used))
    return ortho_mu * total

  def freeze_grads(ctx, sstate, grads):
    del ctx
    grads = _prompt.zero_backbone(grads)
    return {**grads, **{k: grads[k] * _along_components(sstate.active,
                                                        grads[k])
                        for k in COMPONENTS}}

  def project_params(ctx, sstate, params):
    del ctx
    params = _prompt.restore_backbone(params, sstate)
    return {**params, **{k: jnp.where(_along_components(sstate.active,
                                                        params[k]),
                                      params[k], sstate.frozen[k])
                         for k in COMPONENTS}}

  return Strategy(init=init, before_experience=before_experience,
                  task_loss=_prompt.task_loss("coda_prompt", train_mask),
                  loss=loss, update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads,
                  project_params=project_params, predict=_prompt.predict,
                  name="coda_prompt",
                  writes_params=frozenset({"before_experience"}))
