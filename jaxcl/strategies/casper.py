"""CaSpeR: latent spectral regularisation, a plug-in for replay methods.

Frascaroli et al. (2024) observe that, under rehearsal, memory examples of
different classes mix in the latent space, and ask the graph of their
features to split into one connected component per class. For ``r``
memory rows with backbone features :math:`f_i` (a draw balanced over
``p`` classes, below), with :math:`d_{ij} = \\lVert f_i - f_j \\rVert^2`,
the symmetric k-NN adjacency :math:`A_{ij} = 1` if ``j`` is among the
``k`` nearest of ``i`` or ``i`` among those of ``j`` (``i != j``),
:math:`D = \\mathrm{diag}(A \\mathbf 1)` and the normalised Laplacian
:math:`L = I - D^{-1/2} A D^{-1/2}` with eigenvalues
:math:`0 = \\lambda_0 \\le \\lambda_1 \\le \\dots` (0-based), the method
adds

.. math::
   \\mathcal{L}_{CaSpeR} = \\rho \\Big( \\sum_{i=0}^{p} \\lambda_i
     - \\lambda_{p+1} \\Big).

The multiplicity of the eigenvalue 0 is the number of connected
components of the graph: pushing the smallest eigenvalues to 0 and the
next one up (the *eigengap*) asks for a graph of a few well separated
clusters, i.e. features of the drawn classes that do not mix. Symbols and
arguments: :math:`\\rho` is ``rho``, ``k`` ``knn_laplace``, ``r``
``casper_batch``, ``p`` ``p``.

**Indices.** The paper writes :math:`\\ell = -\\lambda_{g+1} +
\\sum_{j=1}^{g} \\lambda_j` (1-based) for ``g`` classes; the code
(``CasperModel.get_casper_loss``: ``evals[:n + 1].sum() - evals[n + 1]``
with ``n = p``) sums ``p + 1`` eigenvalues and subtracts the
``(p + 2)``-th, i.e. the paper's formula with ``g = p + 1``. jaxcl follows
the code (the authors' own, in Mammoth).

The adjacency is binary in the forward pass; its gradient comes from a
straight-through soft k-NN (the code's ``calc_ADL_knn`` with Plötz &
Roth's neural nearest neighbours at temperature 1): with logits
:math:`z = -d` (the diagonal excluded), ``k`` rounds of
:math:`w^{(t)} = \\mathrm{softmax}(z)`,
:math:`z \\leftarrow z + \\log(1 - w^{(t)})` give
:math:`W = \\sum_t w^{(t)}`, symmetrised :math:`W + W^\\top`, and
:math:`A = A_{hard} + W - \\mathrm{sg}(W)`. ``log(1 - e^x)`` follows the
code's ``log1mexp`` (for ``x >= log 1/2`` its gradient is that of
``log(1e-7 - expm1(x))``). The eigenvalues are exact (the code's
``find_eigs`` calls xitorch's ``symeig`` on a dense operator, which picks
``exacteig``: a full ``eigh``, the lowest ``2p`` kept). Their gradient
(``jnp.linalg.eigvalsh`` inside jit) is :math:`\\partial \\lambda_i /
\\partial L = v_i v_i^\\top`: JAX's reverse-mode rule for ``eigvalsh``
drops the eigenvectors' part (the one dividing by eigenvalue gaps), so a
repeated eigenvalue (a disconnected graph repeats 0) gives a finite
gradient, an arbitrary split of the eigenspace's among its eigenvalues
but the right one for their sum (checked in the tests). The NaN risk
is elsewhere and guarded: both branches of ``log1mexp`` get inputs they
can differentiate (a neighbour that takes all the softmax's mass gives
``log(1 - 1)``, whose gradient in the untaken branch was NaN). A row's
own logit in the soft k-NN is a large finite negative number rather than
the code's ``-inf`` (the same values; ``-inf`` also gave finite gradients
in the tests).

The draw (the code's ``Buffer.get_balanced_data``): with ``r`` rows and
``n`` classes, each class gets ``r // n`` rows and the first ``r % n``
one more; ``n`` is the largest number ``<= p`` such that at least ``n``
classes hold ``ceil(r / n)`` entries; ``n`` classes are chosen uniformly
among those, and their rows uniformly without replacement
(:func:`balanced_draw`). The code falls back to a uniform draw when no
class holds ``r`` entries; jaxcl skips the term then.

When it acts: from the second experience on (the code: ``current_task >
0``), with a draw of at least one class from a memory of at least two
classes (jaxcl: a one-class memory has nothing to separate; the code
never meets one after the first experience of a class-incremental
stream).

Where the memory comes from: CaSpeR keeps **its own class-balanced
memory** (as :mod:`jaxcl.strategies.lider` and :mod:`jaxcl.strategies.star`
keep their own reservoir), fed every step with the incoming rows, because
DER and DER++ do not append their memory rows to the batch. The code
replaces the partner's reservoir by Mammoth's *balancoir*: when full, a row
is stored if reservoir sampling admits it **or** its class holds fewer
entries than the median class, always evicting an entry of the largest
class. jaxcl uses GDumb's greedy class-balanced memory
(:func:`jaxcl.buffers.class_balanced_add`): a row is stored while the
memory has room or its class holds fewer than ``K / |Y|`` entries,
evicting a random entry of the largest class. Both keep the classes near
balance (what the balanced draw needs); they differ in which rows of an
over-represented class survive (balancoir keeps admitting them with
reservoir probability). The partner keeps its own reservoir, where the
code's partner shares the balancoir memory. Alone, ``casper`` is the
regulariser without replay (not a method of the paper).

Other deviations: the features are computed in training mode with the
model state as the experience started (batch norm statistics are not
updated by this pass; as :mod:`jaxcl.strategies.star`). ``knn_laplace``
must be below ``casper_batch`` (the code's ``topk`` would select a row as
its own neighbour at ``k = r`` and fail beyond).

Hyperparameters: the code's defaults are ``rho=0.01, knn_laplace=10``,
``casper_batch`` the training batch, ``p`` the classes per experience.
With a training batch of 10 (the Split MNIST protocols) that default is
refused: give ``knn_laplace < casper_batch``. The paper's per-setting
values (its supplement) were not read offline.

State: :class:`CaSpeRState`, fixed shapes, so nothing recompiles between
experiences and it checkpoints and vmaps like any state.

References:
  Frascaroli, Benaglia, Boschini, Moschella, Fiorini, Rodolà & Calderara,
  `CaSpeR: Latent spectral regularization for continual learning
  <https://arxiv.org/abs/2301.03345>`_, Pattern Recognition Letters 2024.
  Plötz & Roth, `Neural nearest neighbors networks
  <https://arxiv.org/abs/1810.12575>`_, NeurIPS 2018.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.strategies._replay_memory import init_memory
from jaxcl.strategies.replay import class_balanced_step
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["casper", "CaSpeRState", "balanced_draw", "sq_distances",
           "knn_adjacency", "normalised_laplacian", "eigengap_loss",
           "casper_term"]

_NEG = -1e30       # a row's own logit in the soft k-NN (excluded)
_GUARD = 1e-7      # the code's expm1_guard in log1mexp's gradient


class CaSpeRState(NamedTuple):
  memory: buffers.Memory  # mem_size slots, class-balanced (GDumb's greedy)
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; insertion keys fold in memory.seen
  model_state: Any        # model state as the experience started (BN)


def balanced_draw(mem: buffers.Memory, key: jax.Array, r: int, p: int,
                  num_classes: int) -> tuple[jax.Array, jax.Array,
                                             jax.Array]:
  """``r`` slots balanced over up to ``p`` classes (the code's
  ``get_balanced_data``): ``(idx, ok, n)``, ``n`` the classes drawn (int32,
  0 when no class holds ``r`` entries; ``ok`` is then all False)."""
  counts = buffers.counts(mem, num_classes)
  ns = jnp.arange(1, p + 1)
  quotas = -(-r // ns)                                   # ceil(r / n)
  fits = jnp.sum(counts[None, :] >= quotas[:, None], axis=1) >= ns
  n = jnp.max(jnp.where(fits, ns, 0)).astype(jnp.int32)
  nn = jnp.maximum(n, 1)
  k_cls, k_row = jax.random.split(key)
  eligible = counts >= -(-r // nn)
  cscore = jnp.where(eligible, jax.random.uniform(k_cls, (num_classes,)),
                     -1.0)
  crank = jnp.zeros((num_classes,), jnp.int32).at[
      jnp.argsort(-cscore)].set(jnp.arange(num_classes, dtype=jnp.int32))
  # Class of rank i gets r // n rows, the first r % n one more.
  share = jnp.where(crank < n, r // nn + (crank < r % nn), 0)
  group = jnp.where(mem.valid, mem.y, jnp.iinfo(jnp.int32).max)
  rrank = buffers.rank_within_groups(
      group, jax.random.uniform(k_row, mem.valid.shape))
  chosen = mem.valid & (rrank < share[mem.y])
  _, idx = jax.lax.top_k(chosen.astype(jnp.float32), r)
  return idx, chosen[idx] & (n > 0), n


def sq_distances(f: jax.Array) -> jax.Array:
  """``(r, r)`` squared Euclidean distances (the code's
  ``calc_euclid_dist``: differences, not the Gram expansion)."""
  return jnp.sum(jnp.square(f[None, :, :] - f[:, None, :]), axis=-1)


def _log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - exp(x))`` for ``x <= 0`` as the code's ``log1mexp``: for
  ``x >= log 1/2`` the forward value is ``log(-expm1(x))`` and the
  gradient that of ``log(1e-7 - expm1(x))`` (bounded at ``x = 0``)."""
  small = x < math.log(0.5)
  xs = jnp.where(small, x, -1.0)      # safe inputs for each branch
  xb = jnp.where(small, -0.5, x)
  fw = jnp.log(-jnp.expm1(xb))
  bw = jnp.log(-jnp.expm1(xb) + _GUARD)
  return jnp.where(small, jnp.log1p(-jnp.exp(xs)),
                   jax.lax.stop_gradient(fw) + bw - jax.lax.stop_gradient(bw))


def knn_adjacency(dist: jax.Array, k: int) -> jax.Array:
  """The code's ``calc_ADL_knn(dist, k, symmetric=True)`` adjacency: 0/1
  values (``j`` among ``i``'s ``k`` nearest or the reverse, self
  excluded) with the gradient of the symmetrised soft k-NN weights."""
  r = dist.shape[0]
  eye = jnp.eye(r, dtype=bool)
  _, nearest = jax.lax.top_k(-jnp.where(eye, jnp.inf, dist), k)
  hard = jnp.zeros((r, r), jnp.float32).at[
      jnp.arange(r)[:, None], nearest].set(1.0)
  hard = ((hard + hard.T) > 0).astype(jnp.float32)
  z = jnp.where(eye, _NEG, -dist)

  def one(z, _):
    lw = jax.nn.log_softmax(z, axis=1)
    return z + _log1mexp(lw), jnp.exp(lw)

  _, ws = jax.lax.scan(one, z, None, length=k)
  w = jnp.sum(ws, axis=0)
  w = w + w.T
  return jax.lax.stop_gradient(hard) + w - jax.lax.stop_gradient(w)


def normalised_laplacian(a: jax.Array) -> jax.Array:
  """``I - D^{-1/2} A D^{-1/2}`` with ``D = diag(A 1)`` (the code's
  ``normalize_A``; every degree is >= 1 for a k-NN graph, k >= 1)."""
  inv = jax.lax.rsqrt(jnp.sum(a, axis=1))
  return jnp.eye(a.shape[0], dtype=a.dtype) - inv[:, None] * a * inv[None, :]


def eigengap_loss(evals: jax.Array, p: int) -> jax.Array:
  """``sum(evals[:p + 1]) - evals[p + 1]`` (the code's indices)."""
  return jnp.sum(evals[:p + 1]) - evals[p + 1]


def casper_term(feats: jax.Array, k: int, p: int) -> jax.Array:
  """The unweighted CaSpeR loss of ``(r, D)`` features."""
  f = feats.reshape(feats.shape[0], -1).astype(jnp.float32)
  lap = normalised_laplacian(knn_adjacency(sq_distances(f), k))
  return eigengap_loss(jnp.linalg.eigvalsh(lap), p)


def casper(rho: float = 0.01, knn_laplace: int = 10, casper_batch: int = 0,
           p: int = 0, mem_size: int = 200) -> Strategy:
  """CaSpeR (compose with a replay method: ``casper+er_ace``,
  ``casper+derpp``, ``casper+replay``).

  Args:
    rho: weight :math:`\\rho` of the spectral term (``--rho``).
    knn_laplace: neighbours ``k`` of the k-NN graph (``--knn_laplace``);
      below ``casper_batch``.
    casper_batch: memory rows ``r`` per step (``--casper_batch``); 0 means
      the training batch size (the code's default).
    p: classes per draw (``--p``); 0 means the classes per experience
      (``num_classes // num_experiences``, the code's default
      ``N_CLASSES_PER_TASK``). Needs ``p + 2 <= casper_batch``.
    mem_size: capacity of CaSpeR's own class-balanced memory (give the
      partner's).

  Raises:
    ValueError: a ``rho`` that is not a finite number > 0, a
      ``knn_laplace`` not an int >= 1, a negative ``casper_batch`` or
      ``p``, a ``casper_batch`` larger than ``mem_size``, a non-positive
      ``mem_size``; at ``init`` (when 0s resolve), ``knn_laplace >=
      casper_batch``, ``p + 2 > casper_batch``, or a memory smaller than
      the number of classes.
  """
  checks.positive("casper: rho", rho)
  checks.whole("casper: knn_laplace", knn_laplace, 1)
  checks.whole("casper: casper_batch", casper_batch, 0,
               "0: the training batch size")
  checks.whole("casper: p", p, 0, "0: the classes per experience")
  buffers.check_capacity(mem_size, "casper: mem_size")
  rho = float(rho)

  def rows(stream_batch: int) -> int:
    r = casper_batch or stream_batch
    if r > mem_size:
      raise ValueError(
          f"casper: casper_batch={r} is larger than the memory capacity "
          f"mem_size={mem_size}; use casper_batch <= {mem_size}")
    return r

  rows(0)

  def sizes(ctx) -> tuple[int, int]:
    """(r, p) resolved against the stream, checked."""
    info = ctx.info
    r = rows(info.batch_size)
    pp = p or max(1, info.num_classes // info.num_experiences)
    if knn_laplace >= r:
      fewer = f"knn_laplace <= {r - 1} or " if r > 1 else ""
      raise ValueError(
          f"casper: knn_laplace={knn_laplace} must be smaller than "
          f"casper_batch={r} (the rows of the graph); use {fewer}"
          f"casper_batch >= {knn_laplace + 1}")
    if pp + 2 > r:
      raise ValueError(
          f"casper: p={pp} needs casper_batch >= p + 2 = {pp + 2} "
          f"eigenvalues; got casper_batch={r}")
    if mem_size < info.num_classes:
      raise ValueError(
          f"casper: mem_size={mem_size} is smaller than the number of "
          f"classes ({info.num_classes}); use mem_size >= "
          f"{info.num_classes}")
    return r, pp

  def init(ctx, key, params):
    del params
    sizes(ctx)
    memory, model_state, k_mem = init_memory(ctx, key, mem_size)
    return CaSpeRState(memory, jnp.zeros((), jnp.int32), k_mem, model_state)

  def prepare_batch(ctx, sstate, batch, key):
    r, pp = sizes(ctx)
    mem = sstate.memory
    idx, ok, n = balanced_draw(mem, key, r, pp, ctx.info.num_classes)
    classes = jnp.sum(buffers.counts(mem, ctx.info.num_classes) > 0)
    on = (sstate.experience > 0) & (n > 0) & (classes >= 2)
    out = dict(batch)
    out["casper_x"] = mem.x[idx]
    out["casper_task"] = mem.task[idx]
    out["casper_on"] = (on & jnp.all(ok)).astype(jnp.float32)
    return out

  def loss(ctx, sstate, params, batch, logits):
    del logits
    _, pp = sizes(ctx)
    on = batch["casper_on"]
    feats = ctx.apply(params, sstate.model_state, batch["casper_x"],
                      batch["casper_task"], train=True, features=True)[0]
    term = casper_term(feats, knn_laplace, pp)
    # where, not a product: an off step's term (e.g. zero rows, a graph of
    # identical features) must not reach the gradient even as 0 * NaN.
    return rho * jnp.where(on > 0, term, 0.0)

  def after_step(ctx, sstate, info):
    return sstate._replace(memory=class_balanced_step(ctx, sstate, info))

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, loss=loss,
                  after_step=after_step, name="casper")
