"""The training-state pytree and the static context around it.

:class:`TrainState` holds everything training changes, and nothing else:
checkpointing, ``vmap`` over seeds and sharding all act on this one pytree.
:class:`Context` holds what does not change during a run (the model, the
optimiser, the stream's shape) and is closed over by compiled functions; it
is hashable so strategies can pass it as a static argument to ``jax.jit``.

CL state never hides in a closure: a strategy's anchors, importances and
buffers live in ``TrainState.strategy`` and go in and out of compiled
functions as arguments (a peer library baked the first task's EWC anchors
into its compiled program by marking ``self`` static).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxcl.models.classifier import takes_mask

__all__ = ["TrainState", "StreamInfo", "Context", "Batch", "StepInfo",
           "batch_stats_mask", "cross_entropy", "cross_entropy_over",
           "masked_logits", "allow_extra_outputs"]

# A mini-batch: {'x': (B, ...), 'y': (B,) int32, 'task': (B,) int32,
# 'mask': (B,) float32 weights (0 for padding or empty replay slots)}.
# Conventions strategies rely on: rows that prepare_batch appends come after
# the first ctx.info.batch_size incoming rows; 'mask' is a per-row weight and
# the task loss divides the weighted sum by max(sum(mask), 1).
Batch = dict[str, jax.Array]

_NEG = -1e9  # logit of a class outside the task (finite: keeps grads finite)


@flax.struct.dataclass
class TrainState:
  """All that training changes.

  Attributes:
    step: int32 scalar, optimiser steps taken over the whole stream.
    params: the model's parameters (a plain pytree).
    opt_state: optax state.
    model_state: non-trained model variables (e.g. ``batch_stats``); ``{}``
      for models without them.
    strategy: the strategy's own state (a pytree; ``()`` for Naive).
    rng: uint32[2] base key; a step's key is ``fold_in(rng, step)``, so keys
      do not depend on how a run was split into calls or resumes.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  strategy: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StreamInfo:
  """What a strategy may know about the stream at ``init`` time.

  Attributes:
    num_classes: outputs of a single head.
    num_tasks: distinct task ids.
    num_experiences: experiences in the stream.
    input_shape: one example's shape.
    kind: ``class``, ``task`` or ``domain``.
    task_classes: per task, a tuple of bools over classes (hashable).
    batch_size: training mini-batch size.
    train_size: the largest experience's number of training examples (the
      padded size of the device-resident experience arrays).
  """
  num_classes: int
  num_tasks: int
  num_experiences: int
  input_shape: tuple[int, ...]
  kind: str
  task_classes: tuple[tuple[bool, ...], ...]
  batch_size: int
  train_size: int

  def require_task_per_experience(self, method: str) -> None:
    """Raises unless every experience can have a task id of its own (for
    methods that give each task its own weights, trained once), at ``init``
    rather than when the second experience reuses a task id."""
    if self.num_tasks < self.num_experiences:
      raise ValueError(
          f"{method} trains each task once and needs a task id per "
          f"experience (a task-incremental stream: scenario.kind='task'); "
          f"this stream has {self.num_experiences} experiences and "
          f"{self.num_tasks} task id(s) (kind={self.kind!r})")

  def require_task_slots(self, method: str, slots: int, what: str,
                         field: str) -> None:
    """Raises unless the model has at least one of its per-task ``what``
    (embeddings, columns, masks) per task id; ``field`` names the config
    field that sets how many."""
    if slots < self.num_tasks:
      raise ValueError(
          f"{method}: the model has {slots} {what} for {self.num_tasks} "
          f"tasks; set model.multi_head=True or {field}")


class SilentBar:
  """A progress bar that shows nothing: :func:`no_progress`'s, and the
  reporters' when progress output is off."""

  def update(self, n: int = 1, loss: float | None = None) -> None:
    del n, loss

  def close(self) -> None:
    pass


def no_progress(total: int, desc: str, unit: str = "step") -> SilentBar:
  """:attr:`Context.progress` outside a reported run (library use, tests,
  compiled code)."""
  del total, desc, unit
  return SilentBar()


def no_freeze(grads: Any) -> Any:
  """:attr:`Context.freeze` when no chain member keeps weights fixed."""
  return grads


def _cast_floating(tree, dtype):
  """``tree`` with its floating arrays cast to ``dtype``; other leaves
  (integer task ids, boolean masks, callables, strings) unchanged."""
  return jax.tree.map(
      lambda a: a.astype(dtype)
      if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
      else a, tree)


@dataclasses.dataclass(frozen=True)
class Context:
  """The static part of a run, closed over by compiled code.

  Attributes:
    model: the flax module (``apply(variables, x, task, train, features)``).
    tx: the optax optimiser.
    info: the stream's shape.
    mask_task_logits: in task-incremental streams with a single head, mask
      logits to the example's task classes (train and test).
    freeze: zeroes, in a gradient pytree, the weights that the members of
      a chain keep fixed at this step (their ``freeze_grads``; identity,
      :func:`no_freeze`, otherwise). ``chain()`` sets it for its members'
      ``update_grads``, so that a projector (A-GEM, GEM) projects against
      memory gradients over the weights that will move: projected over
      every weight, its constraint did not hold after the frozen part was
      dropped (session 35).
    augment: ``(key, x) -> x``, the training augmentation of every step's
      prepared batch (incoming and replayed rows; ``train.augment``,
      :func:`jaxcl.augment.pipeline`), or None.
    compute_dtype: mixed precision (``model.compute_dtype``): :meth:`apply`
      (and :meth:`model_apply`, for strategies' own passes) runs the
      model on its inputs and parameters cast to this dtype (``jnp.bfloat16``
      on TPUs and recent GPUs), the parameters, the optimiser and the
      running statistics staying float32 (the gradient flows back through
      the cast), and returns float32 outputs; None: the parameters' own
      dtype.
    normalize: the inputs' standardisation ``(mean, std)``
      (``dataset.normalize``; ``()``: none), for strategies that augment
      inputs with their own operations (SCR's views, PuriDivER's strong
      crop), so that those run on the pixels as ``train.augment`` does
      (:func:`jaxcl.augment.in_pixels`).
    progress: ``(total, desc, unit) -> bar`` with ``bar.update(n)`` and
      ``bar.close()``: a progress bar for a host-side hook's long loop of
      compiled calls (SPR's fills, PackNet's retraining epochs), which the
      experience's own bar does not cover. The engine sets the run's
      reporter's bar for its hooks (prefixed with the experience);
      :func:`no_progress` otherwise. It takes no part in the context's
      equality or hash, so compiled code keyed on the context is not
      traced again for it; compiled code must not call it.
  """
  model: Any
  tx: optax.GradientTransformation
  info: StreamInfo
  mask_task_logits: bool = False
  freeze: Callable[[Any], Any] = no_freeze
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  compute_dtype: Any = None
  normalize: tuple = ()
  progress: Callable[..., Any] = dataclasses.field(
      default=no_progress, compare=False)

  def apply(self, params, model_state, x, task, train: bool = False,
            features: bool = False, mask: jax.Array | None = None):
    """Runs the model; returns ``(output, new_model_state)``.

    ``output`` is logits (masked to the task's classes where the setting
    asks for it) or, with ``features=True``, the backbone's features.

    ``mask`` (``(batch,)``, > 0 for a real row): in training mode, the
    rows a batch-norm model's statistics count (:func:`batch_stats_mask`).
    """
    out, new_ms = self.forward(params, model_state, x, task, train=train,
                               mask=mask, features=features)
    if self.mask_task_logits and not features:
      out = masked_logits(out, task, self.info.task_classes)
    return out, new_ms

  def forward(self, params, model_state, x, task, train: bool = False,
              mask: jax.Array | None = None, **model_kwargs):
    """:meth:`apply` without the task-incremental mask, with the model's
    other keywords (``model_kwargs``: ``features=True``, or a model's own,
    such as DualNet's ``slow=True``): ``(output, new_model_state)``, the
    batch statistics of the rows ``mask`` in training mode. For hooks that
    need the model's unmasked outputs (LwF's teacher over every head) or a
    call :meth:`apply` does not make."""
    variables = {"params": params, **model_state}
    if train and model_state:
      return self.model_apply(
          variables, x, task, train=True, mutable=list(model_state),
          **model_kwargs, **batch_stats_mask(self.model, model_state, mask))
    return self.model_apply(variables, x, task, train=train,
                            **model_kwargs), model_state

  def augmented(self, key: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` through the training augmentation (``train.augment``), or
    ``x`` itself without one. For the strategies' own fitting loops
    (GDumb's retraining, EEIL's balanced fine-tuning, PackNet's
    retraining, P&C's compress phase), which train the model on examples
    as the step does, and for importance estimates over the training
    data (EWC's Fisher, MAS), as a PyTorch data loader's transform would
    augment them."""
    return x if self.augment is None else self.augment(key, x)

  def model_apply(self, variables, *args, **kwargs):
    """``self.model.apply(variables, *args, **kwargs)`` in
    ``compute_dtype``: the floating parameters and floating array arguments
    cast to it, every floating output (and mutated collection) back to
    float32. Strategies that call the model themselves (a method
    other than ``__call__``, ``capture_intermediates``, explicit masks)
    call this, not ``ctx.model.apply``, so that ``model.compute_dtype``
    reaches every pass of the model. Without ``compute_dtype`` it is
    ``self.model.apply``."""
    if self.compute_dtype is None:
      return self.model.apply(variables, *args, **kwargs)
    # The parameters; not the batch statistics (nor the masked layers'
    # fixed ``frozen`` kernels: those layers compute in their input's
    # dtype, and a cast here would come back rounded in the model state).
    variables = {**variables, "params": _cast_floating(variables["params"],
                                                       self.compute_dtype)}
    out = self.model.apply(variables,
                           *_cast_floating(args, self.compute_dtype),
                           **_cast_floating(kwargs, self.compute_dtype))
    # float32 back: losses, teachers' targets and batch-norm statistics
    # stay in full precision (flax's batch norm keeps its statistics in
    # float32 anyway).
    return _cast_floating(out, jnp.float32)

  def logits(self, params, model_state, x, task, train: bool = False,
             mask: jax.Array | None = None):
    """Logits only (model state unchanged): for evaluation and teachers."""
    return self.apply(params, model_state, x, task, train=train,
                      mask=mask)[0]


class StepInfo(NamedTuple):
  """What ``after_step`` hooks see of one optimiser step.

  Attributes:
    params_before: parameters before the update.
    params_after: parameters after it.
    grads: gradient of the total loss (task loss plus strategy losses) after
      ``update_grads``.
    task_grads: gradient of the task loss alone (the unregularised loss),
      computed only when a strategy sets ``needs_task_grads``; else None.
    batch: the (prepared) batch, before ``train.augment``'s augmentation
      (``Context.augment``): a memory stores the examples as they came,
      as Mammoth stores ``not_aug_inputs``.
    loss: the total loss.
    key: a PRNG key for this hook, distinct from the keys of
      ``prepare_batch`` and ``update_grads`` in the same step.
    logits: the model's training-mode logits on ``batch`` (on its
      augmented inputs, with ``train.augment``), from the step's forward
      pass (before the update): what DER stores with its examples.
  """
  params_before: Any
  params_after: Any
  grads: Any
  task_grads: Any
  batch: Batch
  loss: jax.Array
  key: jax.Array | None = None
  logits: jax.Array | None = None


def batch_stats_mask(model: Any, model_state: Any,
                     mask: jax.Array | None) -> dict[str, jax.Array]:
  """The ``mask=`` keyword of a training-mode call of ``model`` (``{}``
  when there is nothing to pass).

  A model with batch statistics (a ``batch_stats`` collection) whose call
  takes a ``mask`` keyword (jaxcl's ``bn_mlp`` and ResNets do, through
  :class:`jaxcl.models.batch_norm.BatchNorm`, as flax's ``nn.BatchNorm``
  does) then normalises by, and updates its
  running statistics from, the real rows (``mask > 0``) only, as a
  PyTorch batch without the padding would. Without it, padding rows (an
  epoch's last batch, a memory's empty slots, which are rows of zeros or
  repeats) count in the statistics, shifting the real rows' outputs and
  the running averages. A model without the keyword counts every row.
  A mask with no real row counts every row: the rows' loss is zero then,
  and an empty mean would be NaN.
  """
  if mask is None or "batch_stats" not in model_state \
      or not takes_mask(model):
    return {}
  real = mask > 0
  return {"mask": jnp.where(jnp.any(real), real, True)}


def allow_extra_outputs(allowed: jax.Array, outputs: int) -> jax.Array:
  """``allowed`` (bool, classes on the last axis) widened to ``outputs``
  with True: outputs beyond the stream's classes (SupSup's superfluous
  neurons) are never masked."""
  extra = outputs - allowed.shape[-1]
  if extra <= 0:
    return allowed
  pad = [(0, 0)] * (allowed.ndim - 1) + [(0, extra)]
  return jnp.pad(allowed, pad, constant_values=True)


def masked_logits(logits: jax.Array, task: jax.Array,
                  task_classes: tuple[tuple[bool, ...], ...]) -> jax.Array:
  """Sets logits of classes outside each example's task to a large negative.

  Outputs beyond the stream's classes (SupSup's superfluous neurons, present
  only in training-mode logits) are never masked: they stay in the softmax.
  """
  table = allow_extra_outputs(jnp.asarray(task_classes, dtype=bool),
                              logits.shape[-1])
  allowed = table[jnp.clip(task, 0, table.shape[0] - 1)]
  return jnp.where(allowed, logits, _NEG)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  mask: jax.Array) -> jax.Array:
  """Mask-weighted mean softmax cross-entropy (0 for an all-masked batch)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy_over(logits: jax.Array, labels: jax.Array,
                       mask: jax.Array, classes: jax.Array) -> jax.Array:
  """:func:`cross_entropy` over the classes in ``classes`` (bool ``(C,)``)
  for the rows whose label is one of them, over every class for the other
  rows (e.g. a chained member's replayed rows), so no row's own label is
  masked out of its loss."""
  inside = classes[labels][:, None]
  keep = jnp.where(inside, classes[None, :], True)
  return cross_entropy(jnp.where(keep, logits, -1e9), labels, mask)
