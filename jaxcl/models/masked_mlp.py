"""An MLP of masked layers: frozen weights, a learned binary mask per task.

The model behind Piggyback (``mask='threshold'``, frozen weights loaded
from a pretrained jaxcl run, one trainable head per task) and SupSup
(``mask='edge_popup'``, ``weights='signed_constant'``, ``masked_head=True``:
the output layer is masked too, so a task is nothing but its masks).

Variable layout (names match :class:`jaxcl.models.MLP` inside a
:class:`jaxcl.models.Classifier`, so a plain ``mlp`` run's params load as the
frozen weights):

* ``frozen/backbone/Dense_i/{kernel,bias}``: fixed weights (model state,
  never trained);
* ``params/backbone/Dense_i/scores``: ``(num_tasks, in, out)`` mask scores;
* ``params/head/{kernel,bias}``: ``num_tasks * num_classes`` outputs, the
  example's task picks its ``num_classes`` (``masked_head=False``); or
  ``frozen/head/kernel`` + ``params/head/scores`` (``masked_head=True``).

``__call__(x, task, train, features, masks=None, alphas=None)``: ``masks``
maps a layer name (``'backbone/Dense_0'``, ..., ``'head'``) to stored
binary masks ``(num_tasks, in, out)`` used instead of the scores;
``alphas`` (num_tasks,) superposes every task's mask (SupSup's task
inference).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.models.masked import MaskedDense


class MaskedBackbone(nn.Module):
  """Flatten, then ``MaskedDense -> ReLU`` per width."""
  widths: Sequence[int]
  num_tasks: int
  mask: str
  weights: str
  use_bias: bool
  threshold: float
  score_init: float
  density: float
  mixed_batches: bool

  @nn.compact
  def __call__(self, x, task, masks=None, alphas=None):
    h = x.reshape(x.shape[0], -1)
    for i, w in enumerate(self.widths):
      name = f"Dense_{i}"
      layer = MaskedDense(
          features=w, num_tasks=self.num_tasks, mask=self.mask,
          weights=self.weights, use_bias=self.use_bias,
          threshold=self.threshold, score_init=self.score_init,
          density=self.density, mixed_batches=self.mixed_batches,
          name=name)
      m = None if masks is None else masks[f"backbone/{name}"]
      h = nn.relu(layer(h, task, m, alphas))
    return h


class MaskedMLP(nn.Module):
  """See the module docstring."""
  num_classes: int
  num_tasks: int
  widths: Sequence[int] = (100, 100)
  mask: str = "threshold"
  weights: str = "kaiming"
  use_bias: bool = True
  threshold: float = 5e-3
  score_init: float = 1e-2
  density: float = 0.5
  masked_head: bool = False
  mixed_batches: bool = True
  superfluous: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, task: jax.Array | None = None,
               train: bool = False, features: bool = False,
               masks: Mapping[str, jax.Array] | None = None,
               alphas: jax.Array | None = None,
               all_outputs: bool = False) -> jax.Array:
    if task is None:
      task = jnp.zeros((x.shape[0],), jnp.int32)
    task = jnp.clip(task.astype(jnp.int32), 0, self.num_tasks - 1)
    kw = dict(num_tasks=self.num_tasks, mask=self.mask, weights=self.weights,
              use_bias=self.use_bias, threshold=self.threshold,
              score_init=self.score_init, density=self.density,
              mixed_batches=self.mixed_batches)
    h = MaskedBackbone(widths=tuple(self.widths), name="backbone",
                       **kw)(x, task, masks, alphas)
    if features:
      return h
    if self.masked_head:
      head = MaskedDense(features=self.num_classes + self.superfluous,
                         name="head", **kw)
      out = head(h, task, None if masks is None else masks["head"], alphas)
      # Superfluous outputs join the training softmax (no label points at
      # them, so training pushes them down) and SupSup's G objective;
      # predictions use the real classes only.
      return out if train or all_outputs else out[:, :self.num_classes]
    logits = nn.Dense(self.num_tasks * self.num_classes, name="head")(h)
    if self.num_tasks == 1:
      return logits
    logits = logits.reshape(x.shape[0], self.num_tasks, self.num_classes)
    return jnp.take_along_axis(logits, task[:, None, None], axis=1)[:, 0]


def build(num_classes: int, num_heads: int = 1, *,
          widths: Sequence[int] = (100, 100), num_tasks: int = 0,
          mask: str = "threshold", weights: str = "kaiming",
          use_bias: bool = True, threshold: float = 5e-3,
          score_init: float = 1e-2, density: float = 0.5,
          masked_head: bool = False,
          mixed_batches: bool = True, superfluous: int = 0) -> MaskedMLP:
  """Builds a :class:`MaskedMLP`.

  Args:
    num_classes: outputs per task.
    num_heads: used as ``num_tasks`` when that is 0 (so
      ``model.multi_head=True`` sizes the model from the stream).
    widths: hidden widths.
    num_tasks: mask slots (and heads); 0 means ``num_heads``.
    mask: ``threshold`` (Piggyback) or ``edge_popup`` (SupSup).
    weights: init of the frozen weights: ``kaiming`` (uniform, fan-in) or
      ``signed_constant`` (+-sqrt(2 / (density fan_in)), random sign).
    use_bias: frozen biases in the masked layers.
    threshold: Piggyback's mask threshold.
    score_init: Piggyback's initial score (> threshold: all weights on).
    density: edge-popup's kept fraction k.
    masked_head: mask the output layer too (SupSup) instead of a trainable
      head per task.
    mixed_batches: True (default) routes each example to its own task's
      mask, choosing at run time between one masked pass (one-task batch)
      and all ``num_tasks`` (in a sweep: the one pass when every run's
      batch holds one task; under another ``vmap`` batching the task ids
      both run, ~``num_tasks`` times the cost, e.g. SupSup GG on Permuted
      MNIST, 3 seeds: ~15x). False promises one task per batch (task-
      incremental training and evaluation); a row of another task gets NaN
      logits (see :func:`jaxcl.models.masked.per_task`).
    superfluous: extra outputs of a masked head that no label points at
      (SupSup's "s-neurons", Wortsman et al. 2020 Sec. 3.5): returned in
      training mode (or with ``all_outputs=True``) after the
      ``num_classes`` real logits, left out of predictions.
  """
  tasks = num_tasks or num_heads
  if tasks < 1:
    raise ValueError(f"num_tasks must be >= 1, got {tasks}")
  if not widths:
    raise ValueError("widths must name at least one hidden layer")
  if not checks.is_whole(superfluous) or superfluous < 0:
    raise ValueError(f"superfluous must be an int >= 0, got {superfluous!r}")
  if superfluous and not masked_head:
    raise ValueError("superfluous outputs need masked_head=True (SupSup's "
                     f"masked output layer); got superfluous={superfluous}")
  return MaskedMLP(num_classes=num_classes, num_tasks=tasks,
                   widths=tuple(int(w) for w in widths), mask=mask,
                   weights=weights, use_bias=use_bias, threshold=threshold,
                   score_init=score_init, density=density,
                   masked_head=masked_head, mixed_batches=mixed_batches,
                   superfluous=superfluous)
