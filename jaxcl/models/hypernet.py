"""A chunked hypernetwork that generates all weights of a target MLP.

von Oswald et al. (2020): a task embedding ``e_t`` and a hypernetwork
``f_h`` produce the full weight vector of a target network,
``θ_t = f_h(e_t, Θ_h)``. To keep ``f_h`` small, the weights are produced in
chunks: a second set of learned *chunk embeddings* ``c_j`` is fed alongside
the task embedding, and each call produces one chunk of ``chunk_size``
weights,

.. math::

  \\theta_t = \\big[\\, f_h(e_t, c_1),\\; f_h(e_t, c_2),\\; \\dots,\\;
    f_h(e_t, c_{N_C}) \\,\\big]_{1:P},
  \\qquad N_C = \\lceil P / \\text{chunk\\_size} \\rceil

where ``P`` is the number of target parameters. The target network is an MLP
``input_dim -> target_widths -> num_classes`` with ReLU; its kernels are
the generated values times ``1/sqrt(fan_in)`` (a fixed scale so that a
hypernetwork whose outputs have unit variance generates a LeCun-initialised
target; cf. Chang et al. 2020 on hypernetwork initialisation) and its biases
the generated values times 0.1.

The module follows the :class:`~jaxcl.models.Classifier` call signature,
``__call__(x, task, train=False, features=False)``: ``task`` picks the
embedding of each example. The usual batch holds one task, and then one
weight vector is generated; a mixed batch generates the weights of every
embedding and routes each example (chosen with ``lax.cond`` at run time).
:meth:`HyperNetwork.generate` and :meth:`HyperNetwork.target` are exposed for
the strategy's output regulariser and task inference
(:mod:`jaxcl.strategies.hypernetwork`).

References:
  von Oswald, Henning, Sacramento & Grewe, `Continual learning with
  hypernetworks <https://arxiv.org/abs/1906.00695>`_, ICLR 2020.

  Chang, Flokas & Lipson, `Principled weight initialization for
  hypernetworks <https://openreview.net/forum?id=H1lma24tPB>`_, ICLR 2020.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.models.masked import per_task

__all__ = ["HyperNetwork", "build"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _unflatten(flat: jax.Array, shapes: tuple[tuple[int, ...], ...]
               ) -> list[jax.Array]:
  """The arrays of ``shapes`` laid out one after another in ``flat``.

  The gradient is written into one zero buffer with in-place dynamic
  update slices; the slices' own gradient would be one pad to all ``P``
  weights per array, summed (a quarter of a Permuted MNIST step).
  """
  out, offset = [], 0
  for shape in shapes:
    size = math.prod(shape)
    out.append(flat[offset:offset + size].reshape(shape))
    offset += size
  return out


def _unflatten_fwd(flat, shapes):
  return _unflatten(flat, shapes), flat.shape


def _unflatten_bwd(shapes, flat_shape, grads):
  g, offset = jnp.zeros(flat_shape, grads[0].dtype), 0
  for piece, shape in zip(grads, shapes):
    g = jax.lax.dynamic_update_slice(g, piece.reshape(-1), (offset,))
    offset += math.prod(shape)
  return (g,)


_unflatten.defvjp(_unflatten_fwd, _unflatten_bwd)


class HyperNetwork(nn.Module):
  """Task embedding -> chunked hypernetwork -> weights of a target MLP.

  Attributes:
    num_classes: target outputs.
    input_dim: flattened input size of the target MLP (784 for MNIST).
    target_widths: hidden widths of the target MLP.
    num_embeddings: task embeddings (one per task, or per experience when
      the stream gives no task id).
    embedding_dim: size of a task embedding.
    chunk_size: target weights produced per hypernetwork call.
    chunk_embedding_dim: size of a chunk embedding.
    hidden: hidden widths of the hypernetwork.
    activation: the hypernetwork's hidden activation, ``relu`` or ``elu``
      (the reference code uses ELU on Permuted MNIST).
    mixed_batches: True (default) routes each example to its own task's
      weights, choosing at run time (``lax.cond``) between one generation
      for a single-task batch and all ``num_embeddings`` for a mixed one.
      In a sweep it takes the shortcut when every run's batch holds one
      task; under another ``vmap`` that batches the task ids it becomes a
      ``select`` and *both* branches run, ~``num_embeddings`` times the
      cost. False generates the first row's task only: for streams whose
      batches hold one task (task-incremental training, evaluation of one
      test set, class-incremental training by this strategy); a row of
      another task gets NaN logits, so a mixed batch (e.g. chained replay)
      fails loudly instead of silently using the wrong weights.
    output_scale: ``fan_in`` (default) runs the target on the generated
      values times ``1/sqrt(fan_in)`` (kernels) and 0.1 (biases), from a
      unit-variance (LeCun) output layer. ``none`` uses the generated
      values as the weights themselves, as the reference code (hypercl)
      does, from a Glorot-initialised output layer: with a wide output
      layer, Glorot's ``2 / (fan_in + fan_out)`` already makes the outputs
      small. Under ``fan_in`` an optimiser step moves the target's weights
      ``sqrt(fan_in)`` times less (28x on an MNIST first layer): slow
      learning at Adam 1e-4.
    hidden_init: the hidden layers' initialiser: ``he`` (default,
      truncated normal with variance ``2 / fan_in``) or ``glorot``
      (Glorot-uniform, what the reference code uses for every layer).
    target_heads: 1 (default): one ``num_classes``-way output layer,
      generated per task like every other weight. ``h > 1``: the target
      has ``h`` heads of ``num_classes`` outputs and task ``t`` reads head
      ``t`` (the reference code's task-incremental target); every head is
      still generated for every task, so the output regulariser pins
      them all.
  """
  num_classes: int
  input_dim: int = 784
  target_widths: Sequence[int] = (400, 400)
  num_embeddings: int = 5
  embedding_dim: int = 32
  chunk_size: int = 4000
  chunk_embedding_dim: int = 32
  hidden: Sequence[int] = (100, 100)
  activation: str = "relu"
  mixed_batches: bool = True
  output_scale: str = "fan_in"
  hidden_init: str = "he"
  target_heads: int = 1

  # ------------------------------------------------------------------ shapes

  @property
  def target_shapes(self) -> tuple[tuple[int, ...], ...]:
    """Kernel and bias shapes of the target MLP, in order."""
    dims = [self.input_dim, *self.target_widths,
            self.num_classes * self.target_heads]
    shapes = []
    for a, b in zip(dims[:-1], dims[1:]):
      shapes += [(a, b), (b,)]
    return tuple(shapes)

  @property
  def num_target_params(self) -> int:
    return sum(math.prod(s) for s in self.target_shapes)

  def to_weights(self, raw: jax.Array) -> jax.Array:
    """Flat generated values ``(..., P)`` to the target's flat weights
    (times :attr:`weight_scales`; unchanged, with no multiply, under
    ``output_scale='none'``)."""
    if self.output_scale == "none":
      return raw
    return raw * jnp.asarray(self.weight_scales)

  @property
  def weight_scales(self) -> "np.ndarray":
    """``(P,)`` fixed scales from generated values to target weights
    (:meth:`_scaled` of ones)."""
    return np.concatenate([
        self._scaled(np.ones(math.prod(s), np.float32), s)
        for s in self.target_shapes])

  def _scaled(self, w, shape: tuple[int, ...]):
    """Generated values of one target array to its weights: with
    ``output_scale='fan_in'``, LeCun-like ``1/sqrt(fan_in)`` on kernels and
    0.1 on biases (see the module doc); with ``'none'``, unchanged."""
    if self.output_scale == "none":
      return w
    return w / math.sqrt(shape[0]) if len(shape) == 2 else 0.1 * w

  @property
  def num_chunks(self) -> int:
    return -(-self.num_target_params // self.chunk_size)

  # ------------------------------------------------------------------ params

  def setup(self):
    normal = nn.initializers.normal(1.0)
    self.task_embeddings = self.param(
        "task_embeddings", normal, (self.num_embeddings, self.embedding_dim))
    self.chunk_embeddings = self.param(
        "chunk_embeddings", normal,
        (self.num_chunks, self.chunk_embedding_dim))
    # Plain parameters, no submodules: the forward pass is then a pure
    # function of arrays and can sit inside lax.cond / vmap.
    inner = (nn.initializers.glorot_uniform() if self.hidden_init == "glorot"
             else nn.initializers.variance_scaling(2.0, "fan_in",
                                                   "truncated_normal"))
    # The output layer: unit-variance generated values for the fixed scale,
    # or (output_scale='none') small ones that are the weights themselves.
    out_init = (nn.initializers.glorot_uniform()
                if self.output_scale == "none" else
                nn.initializers.lecun_normal())
    dims = [self.embedding_dim + self.chunk_embedding_dim, *self.hidden,
            self.chunk_size]
    weights = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
      last = i == len(dims) - 2
      weights.append((self.param(f"kernel_{i}", out_init if last else inner,
                                 (a, b)),
                      self.param(f"bias_{i}", nn.initializers.zeros, (b,))))
    self.hnet_weights = weights

  # -------------------------------------------------------------- functions

  def generate(self, task_ids: jax.Array) -> jax.Array:
    """Flat target weights ``(n, P)`` for embeddings ``task_ids`` ``(n,)``.

    All ``n x num_chunks`` hypernetwork calls are one batched MLP.
    """
    ids = jnp.clip(task_ids, 0, self.num_embeddings - 1)
    embs = self.task_embeddings[ids]
    k, n = embs.shape[0], self.num_chunks
    h = jnp.concatenate(
        [jnp.broadcast_to(embs[:, None], (k, n, self.embedding_dim)),
         jnp.broadcast_to(self.chunk_embeddings[None],
                          (k, n, self.chunk_embedding_dim))], axis=-1)
    for i, (w, b) in enumerate(self.hnet_weights):
      # The bias enters as a rank-1 dot (ones x b), not a broadcast add: the
      # add's gradient is a reduction over the k x n rows, which XLA:CPU
      # runs as a slow strided reduce on the wide last layer (78000-wide
      # chunks: 23 of 73 ms per Permuted MNIST step); the dot's transpose
      # is a fast gemv. Same values and gradients.
      h = h @ w + jnp.ones(h.shape[:-1] + (1,), h.dtype) @ b[None]
      if i < len(self.hnet_weights) - 1:
        h = nn.elu(h) if self.activation == "elu" else nn.relu(h)
    return h.reshape(k, -1)[:, :self.num_target_params]

  def target(self, flat: jax.Array, x: jax.Array,
             features: bool = False) -> jax.Array:
    """Runs the target MLP with flat weights ``(P,)`` on ``x`` ``(B, ...)``.

    With ``features=True``, returns the last hidden layer.
    """
    h = x.reshape(x.shape[0], -1)
    if h.shape[-1] != self.input_dim:
      raise ValueError(f"hypernet: input of size {h.shape[-1]} but "
                       f"input_dim={self.input_dim}; set "
                       "config.model.hypernet.input_dim")
    params = [self._scaled(w, shape) for w, shape in
              zip(_unflatten(flat, self.target_shapes), self.target_shapes)]
    n_layers = len(params) // 2
    for i in range(n_layers):
      if features and i == n_layers - 1:
        return h
      h = h @ params[2 * i] + params[2 * i + 1]
      if i < n_layers - 1:
        h = nn.relu(h)
    return h

  def __call__(self, x: jax.Array, task: jax.Array | None = None,
               train: bool = False, features: bool = False) -> jax.Array:
    del train  # no dropout or batch norm
    task = (jnp.zeros((x.shape[0],), jnp.int32) if task is None
            else jnp.asarray(task, jnp.int32))
    # One generated weight vector for a one-task batch (the usual case),
    # every embedding's for a mixed one; see masked.per_task for the
    # routing and for mixed_batches=False.
    def one_task(t):
      out = self.target(self.generate(t[None])[0], x, features)
      if features or self.target_heads == 1:
        return out
      return jax.lax.dynamic_slice_in_dim(out, t * self.num_classes,
                                          self.num_classes, axis=-1)

    return per_task(one_task, task, self.num_embeddings, self.mixed_batches)


def build(num_classes: int, num_heads: int = 1, **kwargs) -> HyperNetwork:
  """The model factory used by ``models.build('hypernet', ...)``.

  ``num_heads`` must be 1: task-specific weights come from the embedding,
  not from extra heads. ``kwargs`` are :class:`HyperNetwork`'s fields.
  """
  if num_heads != 1:
    raise ValueError("hypernet generates task-specific weights itself; use "
                     f"model.multi_head=False (got num_heads={num_heads})")
  for k in ("target_widths", "hidden"):
    if k in kwargs:
      kwargs[k] = tuple(kwargs[k])
  if kwargs.get("activation", "relu") not in ("relu", "elu"):
    raise ValueError(f"hypernet: unknown activation "
                     f"{kwargs['activation']!r}; valid: relu, elu")
  if kwargs.get("output_scale", "fan_in") not in ("fan_in", "none"):
    raise ValueError(f"hypernet: unknown output_scale "
                     f"{kwargs['output_scale']!r}; valid: fan_in, none")
  if kwargs.get("hidden_init", "he") not in ("he", "glorot"):
    raise ValueError(f"hypernet: unknown hidden_init "
                     f"{kwargs['hidden_init']!r}; valid: he, glorot")
  bad = [k for k in ("input_dim", "num_embeddings", "embedding_dim",
                     "chunk_size", "chunk_embedding_dim", "target_heads")
         if k in kwargs and int(kwargs[k]) < 1]
  if bad:
    raise ValueError(f"hypernet: {bad} must be >= 1, got "
                     f"{[kwargs[k] for k in bad]}")
  heads = int(kwargs.get("target_heads", 1))
  tasks = int(kwargs.get("num_embeddings", HyperNetwork.num_embeddings))
  if 1 < heads < tasks:  # a slice past the last head would be clamped to it
    raise ValueError(f"hypernet: target_heads={heads} is fewer than the "
                     f"{tasks} task embeddings; use 1 (one generated head) "
                     f"or >= {tasks} (a head per task)")
  return HyperNetwork(num_classes=num_classes, **kwargs)
