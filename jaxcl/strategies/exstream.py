"""ExStream: memory-efficient streaming replay with per-class centroids.

Hayes et al. (2019) keep, for each class ``c``, a buffer of at most ``b``
cluster centroids :math:`w_{c,k}` with counts :math:`n_{c,k}` in the
feature space of an encoder. A new feature vector :math:`z` of class ``c``
is added as a centroid of count 1 while the class buffer has room; when it
is full, the two nearest of the ``b + 1`` points (the ``b`` centroids and
:math:`z`) are merged into their count-weighted mean:

.. math::
   (i, j) = \\arg\\min_{i \\ne j} \\lVert w_i - w_j \\rVert_2,\\qquad
   w_i \\leftarrow \\frac{n_i w_i + n_j w_j}{n_i + n_j},\\quad
   n_i \\leftarrow n_i + n_j,

and :math:`z` takes slot ``j`` (or is merged into its nearest centroid if
it is one of the pair). Merging keeps :math:`\\sum_k n_{c,k} w_{c,k}`
equal to the sum of all features of class ``c`` seen so far. The
upper layers are then trained on the current batch plus ``batch_size``
centroids drawn uniformly from all stored ones:

.. math::
   \\mathcal{L} = \\frac{1}{|B|}\\sum_{B} \\ell(f(x), y)
     + \\frac{1}{|W_B|} \\sum_{(w, c) \\in W_B} \\ell(f_{>l}(w), c).

The encoder is the lower part of the model split at ``layer`` (default:
the backbone, whose output is ``ctx.apply(..., features=True)``); see
:mod:`jaxcl.strategies.latent_replay` for the split. After the first
experience its gradients are multiplied by ``lower_lr_scale`` (0: a fixed
encoder, as in the paper, where it is pretrained; also restored after
every update, as latent replay's lower part is, so that weight decay or
carried-over momentum cannot move it; and its mask declared, as latent
replay's is, for the members of a chain). The centroids are
updated in ``after_experience``: the experience's examples are streamed
once, in a random order, through the encoder as it then is (fixed from then
on when ``lower_lr_scale=0``), one ``lax.scan`` inside jit. Each class
buffer keeps a pairwise distance matrix so an insertion costs
``O(b^2 + b d)``. ``mem_size`` is the total number of centroids
(``mem_size // num_classes`` per class).

References:
  Hayes, Cahill & Kanan, `Memory efficient experience replay for streaming
  learning <https://arxiv.org/abs/1809.05922>`_, ICRA 2019.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl.strategies import latent_replay as lr_mod
from jaxcl.strategy import Strategy
from jaxcl.train import device_experience, init_variables

__all__ = ["exstream", "ExStreamState", "ClassBuffers", "init_buffers",
           "insert", "insert_many"]


class ClassBuffers(NamedTuple):
  """Per-class centroid buffers.

  Attributes:
    w: ``(C, b, *latent_shape)`` centroids.
    n: float32 ``(C, b)`` counts (0: empty slot).
    d: float32 ``(C, b, b)`` squared distances between centroids (``inf``
      on the diagonal and for empty slots).
  """
  w: jax.Array
  n: jax.Array
  d: jax.Array


class ExStreamState(NamedTuple):
  buffers: ClassBuffers
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key
  model_state: Any        # model state at the start of the experience
  lower: Any = None       # the frozen encoder (latent_replay.lower_copy),
                          # None when it trains


def init_buffers(num_classes: int, per_class: int,
                 latent_shape) -> ClassBuffers:
  c, b = num_classes, per_class
  return ClassBuffers(
      w=jnp.zeros((c, b) + tuple(latent_shape), jnp.float32),
      n=jnp.zeros((c, b), jnp.float32),
      d=jnp.full((c, b, b), jnp.inf, jnp.float32))


def _sqdist(w: jax.Array, z: jax.Array) -> jax.Array:
  """Squared distances from ``z`` to each row of ``w`` ``(b, ...)``."""
  diff = (w - z[None]).reshape(w.shape[0], -1)
  return jnp.sum(diff * diff, axis=1)


def _write(w, n, d, s, v, count):
  """Sets centroid ``s`` of one class and refreshes its distances
  (``O(b d)``)."""
  w = w.at[s].set(v)
  n = n.at[s].set(count)
  row = jnp.where(n > 0, _sqdist(w, v), jnp.inf).at[s].set(jnp.inf)
  d = d.at[s, :].set(row).at[:, s].set(row)
  return w, n, d


def insert(buf: ClassBuffers, z: jax.Array, c: jax.Array,
           ok: jax.Array | bool = True) -> ClassBuffers:
  """Adds feature ``z`` of class ``c`` (if ``ok``), merging when full.

  Three cases, written as at most two centroid writes (no branches over
  whole buffers, so a scan over a stream stays cheap): room left (``z``
  into the first empty slot); ``z`` nearer to its nearest centroid ``k``
  than any two centroids are to each other (merge ``z`` into ``k``); else
  merge the nearest pair ``(i, j)`` into ``i`` and put ``z`` in ``j``.
  """
  w, n, d = buf.w[c], buf.n[c], buf.d[c]
  b = n.shape[0]
  z = z.astype(jnp.float32)
  ok = jnp.asarray(ok, bool)
  room = jnp.any(n == 0)
  e = jnp.argmin(n > 0)                       # first empty slot
  dz = jnp.where(n > 0, _sqdist(w, z), jnp.inf)
  k = jnp.argmin(dz)                          # nearest centroid to z
  flat = jnp.argmin(d)
  i, j = flat // b, flat % b                  # nearest pair
  into_k = dz[k] <= d[i, j]
  merged_k = (n[k] * w[k] + z) / (n[k] + 1.0)
  merged_ij = (n[i] * w[i] + n[j] * w[j]) / jnp.maximum(n[i] + n[j], 1.0)
  # First write.
  s1 = jnp.where(room, e, jnp.where(into_k, k, i))
  v1 = jnp.where(room, z, jnp.where(into_k, merged_k, merged_ij))
  n1 = jnp.where(room, 1.0, jnp.where(into_k, n[k] + 1.0, n[i] + n[j]))
  v1 = jnp.where(ok, v1, w[s1])
  n1 = jnp.where(ok, n1, n[s1])
  w, n, d = _write(w, n, d, s1, v1, n1)
  # Second write (pair merge only): z takes slot j; else rewrite s1 as is.
  two = ok & ~room & ~into_k
  s2 = jnp.where(two, j, s1)
  w, n, d = _write(w, n, d, s2, jnp.where(two, z, w[s1]),
                   jnp.where(two, 1.0, n[s1]))
  return ClassBuffers(buf.w.at[c].set(w), buf.n.at[c].set(n),
                      buf.d.at[c].set(d))


def insert_many(buf: ClassBuffers, z: jax.Array, y: jax.Array,
                ok: jax.Array) -> ClassBuffers:
  """Inserts rows ``z`` ``(N, ...)`` of classes ``y`` in order (a scan)."""

  def body(buf, row):
    zi, yi, oki = row
    return insert(buf, zi, yi, oki), None

  buf, _ = jax.lax.scan(body, buf, (z, y, ok))
  return buf


def exstream(mem_size: int = 3920, batch_size: int = 0,
             layer: str = "backbone",
             lower_lr_scale: float = 0.0) -> Strategy:
  """ExStream.

  Args:
    mem_size: total centroids (``mem_size // num_classes`` per class).
    batch_size: replayed centroids per step (0: the training batch size).
    layer: module path of the encoder's output (see
      :func:`jaxcl.strategies.latent_replay.layer_names`).
    lower_lr_scale: gradient factor of the encoder after the first
      experience (0: fixed).

  Raises:
    ValueError: bad sizes or scale; at ``init``, an unknown ``layer`` or
      ``mem_size`` smaller than the number of classes.
  """
  lr_mod.check_split_args("exstream", mem_size, batch_size, lower_lr_scale,
                          layer)
  splits = {}

  def get_split(ctx):
    if ctx not in splits:
      splits[ctx] = lr_mod.split_model(ctx, layer)
    return splits[ctx]

  def replay_size(ctx):
    return batch_size or ctx.info.batch_size

  lower_at_init, before_experience, project_params = lr_mod.freeze_hooks(
      get_split, float(lower_lr_scale))

  def init(ctx, key, params):
    sp = get_split(ctx)
    c = ctx.info.num_classes
    if mem_size < c:
      raise ValueError(f"exstream mem_size={mem_size} is smaller than the "
                       f"number of classes ({c}); each class needs a slot")
    per_class = mem_size // c
    if replay_size(ctx) > per_class * c:
      raise ValueError(f"exstream batch size {replay_size(ctx)} is larger "
                       f"than the {per_class * c} centroid slots")
    k_mem, k_ms = jax.random.split(key)
    _, variables = init_variables(ctx, k_ms)
    return ExStreamState(init_buffers(c, per_class, sp.latent_shape),
                         jnp.zeros((), jnp.int32), k_mem, variables,
                         lower_at_init(ctx, params))

  def prepare_batch(ctx, sstate, batch, key):
    buf = sstate.buffers
    c, b = buf.n.shape
    filled = buf.n.reshape(-1) > 0
    r = replay_size(ctx)
    score = jnp.where(filled, jax.random.uniform(key, (c * b,)), -1.0)
    _, idx = jax.lax.top_k(score, r)
    w = buf.w.reshape((c * b,) + buf.w.shape[2:])
    cls = (idx // b).astype(jnp.int32)
    # A centroid's task: the first task holding its class.
    task_of = jnp.argmax(jnp.asarray(ctx.info.task_classes, bool), axis=0)
    return {**batch, "latent_x": w[idx], "latent_y": cls,
            "latent_task": task_of[cls].astype(jnp.int32),
            "latent_mask": filled[idx].astype(jnp.float32)}

  def loss(ctx, sstate, params, batch, logits):
    del logits
    return lr_mod.replayed_loss(ctx, get_split(ctx), params,
                                sstate.model_state, batch)

  update_grads, freeze_grads = lr_mod.lower_grads(get_split,
                                                  lower_lr_scale)

  @functools.partial(jax.jit, static_argnums=0)
  def stream(ctx, buf, key, params, model_state, x, y, mask):
    z = lr_mod.experience_latents(ctx, get_split(ctx), params, model_state,
                                  x)
    order = jax.random.permutation(key, x.shape[0])
    return insert_many(buf, z[order], y[order], mask[order])

  def after_experience(ctx, state, experience):
    ss = state.strategy
    data = device_experience(experience, ctx.info.train_size)
    mask = jnp.arange(ctx.info.train_size) < experience.num_train
    key = jax.random.fold_in(ss.key, experience.index)
    buf = stream(ctx, ss.buffers, key, state.params, state.model_state,
                 data["x"], data["y"], mask)
    return state.replace(strategy=ss._replace(buffers=buf))

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, loss=loss,
                  update_grads=update_grads, freeze_grads=freeze_grads,
                  project_params=project_params,
                  after_experience=after_experience, name="exstream")
