"""The compiled experience loop and evaluation.

One experience is one compiled program: its training arrays sit on the
device, padded to the stream's largest experience so every experience has
the same shapes (nothing recompiles between experiences); an epoch is a
loop over rows of a ``(steps, batch)`` index array drawn on the device; the
host loop runs over experiences, epochs and (optionally) chunks of an epoch
for checkpoints. Index ``-1`` marks padding: it gets mask 0, and steps whose
batch would be all padding are not run (no optimiser step, no step count),
so padding never changes the result.

Evaluation of all test sets after an experience is one jitted call over the
stacked, padded test sets and returns one row of the accuracy matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.runs import RUNS_AXIS
from jaxcl.scenarios import Experience, Scenario
from jaxcl.state import (Batch, Context, StepInfo, StreamInfo, TrainState,
                         cross_entropy)
from jaxcl.strategy import Strategy, default_predict, update_grads_and_state

__all__ = [
    "OPTIMIZERS", "make_optimizer", "stream_info", "make_context",
    "init_state", "init_variables", "feature_width", "Learner", "make_learner",
    "device_experience", "stacked_experiences", "test_arrays",
    "stacked_test_arrays", "experience_batches", "train_chunk", "evaluate",
    "steps_per_epoch", "NonFiniteLossError", "ConfigError", "unalias",
    "reset_opt_state",
]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear", "multistep", "plateau")


class ConfigError(ValueError):
  """A run was configured with a bad value (the message names it)."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss (the message says where)."""


# --------------------------------------------------------------------------
# Optimiser.


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, schedule: str = "constant",
                   schedule_steps: int = 0, clip_norm: float = 0.0,
                   milestones: Sequence[int] = (), gamma: float = 0.1,
                   epochs: int = 1) -> optax.GradientTransformation:
  """An optax optimiser by name with its learning rate kept in the state.

  The learning rate is an injected hyperparameter
  (``opt_state.hyperparams['learning_rate']``) so that a ``vmap`` sweep can
  give each run its own value; a schedule multiplies it.

  Args:
    name: ``sgd``, ``momentum`` (SGD with heavy-ball momentum), ``adam`` or
      ``adamw``.
    learning_rate: base learning rate (> 0).
    momentum: for ``momentum``.
    weight_decay: for ``adamw`` (decoupled) and ``sgd``/``momentum``
      (coupled L2, added to the gradient).
    schedule: ``constant``, ``cosine`` or ``linear`` decay to 0 over
      ``schedule_steps`` optimiser steps (counted per optimiser state, which
      is reset per experience by default), or ``multistep``: the rate
      times ``gamma`` at each of ``milestones`` (PyTorch's
      ``MultiStepLR``, Mammoth's CIFAR schedule ``[35, 45]`` of 50
      epochs). ``plateau``: a constant rate that the experience loop
      lowers on the host when a held-out loss stops improving
      (:mod:`jaxcl.plateau`, FACIL's scheme).
    milestones: for ``multistep``, the epochs (of ``epochs``, over
      ``schedule_steps`` steps) from which the rate is multiplied by
      ``gamma`` once more; whole numbers, increasing, in ``[1, epochs)``.
    gamma: ``multistep``'s factor, in ``(0, 1]``.
    epochs: the epochs the ``schedule_steps`` span.
    clip_norm: when > 0, the gradient is first rescaled so that its global
      L2 norm is at most ``clip_norm`` (PyTorch's ``clip_grad_norm_`` before
      ``optimizer.step()``: before weight decay, momentum or Adam). It sees
      the gradient after the strategy's ``update_grads`` (a projection,
      frozen weights' zeros), so only what will be applied is measured.
      0 (the default) turns it off.
  """
  if name not in OPTIMIZERS:
    raise ConfigError(f"unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}")
  if not 0 < learning_rate < math.inf:
    raise ConfigError(f"learning_rate must be > 0 and finite, got "
                      f"{learning_rate}")
  # Checked whatever the name: a config keeps its value when the
  # optimiser is switched to 'momentum' later. `not` also refuses NaN.
  if not 0 <= momentum < 1:
    raise ConfigError(f"momentum must be in [0, 1) (the heavy-ball "
                      f"coefficient of optimizer 'momentum'), got {momentum}")
  if not 0 <= weight_decay < math.inf:
    raise ConfigError(f"weight_decay must be >= 0 and finite, got "
                      f"{weight_decay}")
  if not 0 <= clip_norm < math.inf:
    raise ConfigError(f"clip_norm must be >= 0 and finite (0: no clipping; "
                      f"> 0: the gradient's largest global L2 norm), got "
                      f"{clip_norm}")
  if schedule not in SCHEDULES:
    raise ConfigError(f"unknown schedule {schedule!r}; valid: {list(SCHEDULES)}")
  if schedule != "constant" and schedule_steps <= 0:
    raise ConfigError(f"schedule {schedule!r} needs schedule_steps > 0")
  milestones = tuple(milestones)
  if schedule == "multistep":
    if not milestones or not all(
        isinstance(m, int) and not isinstance(m, bool) for m in milestones) \
        or list(milestones) != sorted(set(milestones)) \
        or not 1 <= milestones[0] <= milestones[-1] < epochs:
      raise ConfigError(
          f"schedule 'multistep' needs milestones: increasing whole epochs "
          f"in [1, {epochs}) ({epochs} epoch(s) per experience), got "
          f"{milestones}")
    if not 0 < gamma <= 1:
      raise ConfigError(f"gamma must be in (0, 1] (multistep's factor at "
                        f"each milestone), got {gamma}")
  elif milestones:
    raise ConfigError(f"milestones {milestones} are read by schedule "
                      f"'multistep' only, not {schedule!r}")

  if schedule == "cosine":
    mult = optax.cosine_decay_schedule(1.0, schedule_steps)
  elif schedule == "linear":
    mult = optax.linear_schedule(1.0, 0.0, schedule_steps)
  elif schedule == "multistep":
    # optax scales the update counted s (from 0) by every boundary
    # b <= s: from epoch m's first update, s = m * steps_per_epoch, on.
    scales: dict[int, float] = {}
    for m in milestones:
      b = round(m * schedule_steps / epochs)
      scales[b] = scales.get(b, 1.0) * gamma
    mult = optax.piecewise_constant_schedule(1.0, scales)
  else:
    mult = None

  def build(learning_rate):
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    if name in ("sgd", "momentum") and weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay))
    if name == "momentum":
      parts.append(optax.trace(decay=momentum))
    elif name in ("adam", "adamw"):
      parts.append(optax.scale_by_adam())
      if name == "adamw" and weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if mult is not None:
      parts.append(optax.scale_by_schedule(mult))
    parts.append(optax.scale(-1.0 * learning_rate))
    return optax.chain(*parts)

  return optax.inject_hyperparams(build)(learning_rate=learning_rate)


# --------------------------------------------------------------------------
# Context and state.


def steps_per_epoch(train_size: int, batch_size: int, chunk: int = 0) -> int:
  """Steps per padded epoch, rounded up to a multiple of ``chunk``."""
  steps = math.ceil(train_size / batch_size)
  if chunk:
    steps = math.ceil(steps / chunk) * chunk
  return steps


def stream_info(scenario: Scenario, batch_size: int) -> StreamInfo:
  """The stream's shape, as strategies see it at ``init``."""
  return StreamInfo(
      num_classes=scenario.num_classes,
      num_tasks=scenario.num_tasks,
      num_experiences=len(scenario.experiences),
      input_shape=scenario.input_shape,
      kind=scenario.kind,
      task_classes=tuple(tuple(bool(b) for b in row)
                         for row in scenario.task_classes),
      batch_size=batch_size,
      train_size=max(e.num_train for e in scenario.experiences),
  )


def make_context(model, tx, info: StreamInfo,
                 augment: Callable[[jax.Array, jax.Array], jax.Array]
                 | None = None, compute_dtype: Any = None,
                 normalize: Any = ()) -> Context:
  """Masks logits to the task's classes in task-incremental streams (for a
  multi-head model on split streams, too: each head covers all classes);
  ``augment`` augments every training step's prepared batch;
  ``compute_dtype`` runs the model in mixed precision
  (:attr:`Context.compute_dtype`); ``normalize`` is the inputs'
  ``(mean, std)`` (:attr:`Context.normalize`)."""
  return Context(model=model, tx=tx, info=info,
                 mask_task_logits=info.kind == "task", augment=augment,
                 compute_dtype=compute_dtype,
                 normalize=frozen_normalize(normalize))


def frozen_normalize(normalize: Any) -> tuple:
  """``(mean, std)`` as nested tuples of floats (a config's lists), so the
  context that holds it can key a jit cache."""
  return tuple(tuple(float(v) for v in np.ravel(part)) if np.ndim(part)
               else float(part) for part in normalize)


def init_variables(ctx: Context, key: jax.Array) -> tuple[Any, Any]:
  """A freshly initialised model: ``(params, model_state)``.

  ``model_state`` holds the non-trained collections (e.g. ``batch_stats``;
  ``{}`` for models without them). Strategies use it for fresh models
  (Ensemble, GDumb) and for the model state's structure at ``init``.
  """
  shape = tuple(ctx.info.input_shape)
  try:
    hash(ctx.model)
  except TypeError:  # e.g. widths=[400, 400]: cannot key a jit cache
    variables = dict(_init(ctx.model, shape, key))
  else:
    # Inside another jit (GDumb's retraining draws a fresh model) only
    # the outer program's compiler options apply: the plain jit there.
    top = not isinstance(key, jax.core.Tracer)
    init = (_init_jit_cpu if top and jax.default_backend() == "cpu" else
            _init_jit)
    variables = dict(init(ctx.model, shape, key))
  return variables.pop("params"), variables


def feature_width(ctx: Context, params: Any, model_state: Any) -> int:
  """The flattened width of the model's features (``features=True``),
  found from shapes alone (``jax.eval_shape``: nothing runs)."""
  x = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
  out = jax.eval_shape(
      lambda p, ms: ctx.apply(p, ms, x, jnp.zeros((1,), jnp.int32),
                              features=True)[0], params, model_state)
  return math.prod(out.shape[1:])


def _init(model: Any, input_shape: tuple[int, ...], key: jax.Array) -> Any:
  x = jnp.zeros((1,) + input_shape, jnp.float32)
  return model.init(key, x, jnp.zeros((1,), jnp.int32))


# One compiled program, cached per (model, input shape), which is all an
# init depends on (a rebuilt equal module hits the cache). Run op by op,
# flax's initialisers compiled each random op on its own: ~30 programs,
# 2.3 s of a 9 s `jaxcl run` on Split MNIST. Values are bit-identical
# (tested).
_init_jit = jax.jit(_init, static_argnums=(0, 1))
# On the CPU the program is compiled at LLVM's -O1: it runs once, and at
# the default -O2 its compilation (threefry's loops, one per random
# weight) was the largest compile of a short run (0.66 s for an MLP
# 784-100-100-10, against 0.57 s for the training loop; -O1: ~0.2 s).
# The weights are the same to the bit (tested; -O0 changed some by an
# ulp).
_init_jit_cpu = jax.jit(_init, static_argnums=(0, 1),
                        compiler_options={"xla_backend_optimization_level": 1})


def init_state(ctx: Context, strategy: Strategy, seed: int | jax.Array,
               params: Any = None) -> TrainState:
  """A fresh state from a seed (or pretrained ``params``)."""
  key = jax.random.PRNGKey(seed) if np.ndim(seed) == 0 else seed
  k_model, k_strategy, k_run = jax.random.split(key, 3)
  init_params, model_state = init_variables(ctx, k_model)
  params = init_params if params is None else params
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=ctx.tx.init(params),
      model_state=model_state,
      strategy=strategy.init(ctx, k_strategy, params),
      rng=k_run,
  )


def unalias(state: TrainState) -> TrainState:
  """Copies leaves that share a buffer with an earlier leaf.

  The compiled loop donates the state, and XLA refuses to donate one buffer
  twice; host-side hooks often store the very arrays they were given (an
  anchor equal to ``params``). Only the duplicates are copied.
  """
  seen: set[int] = set()

  def fix(x):
    if not isinstance(x, jax.Array):
      return x
    key = id(x)
    if key in seen:
      return jnp.copy(x)
    seen.add(key)
    return x

  return jax.tree.map(fix, state)


# --------------------------------------------------------------------------
# Data on the device.


def device_experience(exp: Experience, size: int) -> dict[str, np.ndarray]:
  """An experience's training arrays padded to ``size`` rows (host arrays).

  Padding rows are never indexed (index -1 maps to mask 0), so their content
  does not matter; zeros keep them cheap. An experience that fills ``size``
  (every one of a permuted or rotated stream) is returned as it is: a
  padded copy of full MNIST took ~0.2 s per experience.
  """
  if exp.num_train == size:
    return {"x": np.asarray(exp.train_x, np.float32),
            "y": np.asarray(exp.train_y, np.int32),
            "task": np.asarray(exp.train_task, np.int32)}
  return {k: v[0] for k, v in stacked_experiences([exp], size).items()}


def stacked_experiences(exps: Sequence[Experience],
                        size: int) -> dict[str, np.ndarray]:
  """:func:`device_experience` of several experiences (a sweep whose runs
  each have their own draw), stacked on a leading axis. Each is written
  straight into the stacked arrays: padding and then stacking k copies of
  a full MNIST experience cost more than drawing them."""
  for e in exps:
    if e.num_train > size:
      raise ConfigError(f"experience {e.index} has {e.num_train} examples "
                        f"> {size}")
  k, shape = len(exps), exps[0].train_x.shape[1:]
  out = {"x": np.zeros((k, size) + shape, np.float32),
         "y": np.zeros((k, size), np.int32),
         "task": np.zeros((k, size), np.int32)}
  for m, e in enumerate(exps):
    n = e.num_train
    out["x"][m, :n], out["y"][m, :n], out["task"][m, :n] = (
        e.train_x, e.train_y, e.train_task)
  return out


def test_arrays(experiences: Sequence[Experience],
                eval_batch_size: int) -> dict[str, np.ndarray]:
  """All test sets stacked to ``(E, M, ...)``, ``M`` a multiple of the eval
  batch, with per-experience counts; padding is excluded by the counts."""
  return {k: v[0] for k, v in
          stacked_test_arrays([experiences], eval_batch_size).items()}


def stacked_test_arrays(streams: Sequence[Sequence[Experience]],
                        eval_batch_size: int) -> dict[str, np.ndarray]:
  """:func:`test_arrays` of several streams of the same length (a sweep
  whose runs each have their own draw), stacked on a leading axis and
  written in place, as :func:`stacked_experiences` does."""
  m = max(len(e.test_y) for exps in streams for e in exps)
  m = math.ceil(m / eval_batch_size) * eval_batch_size
  k, e_n = len(streams), len(streams[0])
  shape = streams[0][0].test_x.shape[1:]
  x = np.zeros((k, e_n, m) + shape, np.float32)
  y = np.zeros((k, e_n, m), np.int32)
  t = np.zeros((k, e_n, m), np.int32)
  count = np.zeros((k, e_n), np.int32)
  for r, exps in enumerate(streams):
    for i, e in enumerate(exps):
      n = len(e.test_y)
      x[r, i, :n], y[r, i, :n], t[r, i, :n], count[r, i] = (
          e.test_x, e.test_y, e.test_task, n)
      # Padding rows carry the set's own task id (not 0), so a chunk of one
      # test set is a single-task batch for models that route by task.
      t[r, i, n:] = e.test_task[0] if n else 0
  return {"x": x, "y": y, "task": t, "count": count}


def experience_batches(exp: Experience, batch_size: int,
                       max_examples: int = 0, seed: int = 0,
                       split: str = "train") -> Batch:
  """An experience's examples as stacked batches ``(nb, batch_size, ...)``.

  For host-side hooks that scan over an experience inside jit (Fisher
  estimation, exemplar selection, feature extraction). ``max_examples > 0``
  takes a seeded random subset first. The last batch is padded with mask 0.
  """
  x, y, t = ((exp.train_x, exp.train_y, exp.train_task) if split == "train"
             else (exp.test_x, exp.test_y, exp.test_task))
  n = len(y)
  idx = np.arange(n)
  if 0 < max_examples < n:
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:max_examples])
    n = len(idx)
  nb = math.ceil(n / batch_size)
  pad = nb * batch_size - n
  take = np.concatenate([idx, np.zeros(pad, idx.dtype)])
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  shape = lambda a: a.reshape((nb, batch_size) + a.shape[1:])
  return {"x": shape(x[take].astype(np.float32)),
          "y": shape(y[take].astype(np.int32)),
          "task": shape(t[take].astype(np.int32)), "mask": shape(mask)}


# --------------------------------------------------------------------------
# One step, a chunk of steps, evaluation.


def _data_key(rng: jax.Array) -> jax.Array:
  # Shuffling keys live apart from per-step keys (fold_in(rng, step)).
  return jax.random.fold_in(rng, 0x5EED)


def epoch_indices(rng: jax.Array, experience: jax.Array, epoch: jax.Array,
                  n_valid: jax.Array, size: int, steps: int,
                  batch_size: int) -> jax.Array:
  """A ``(steps, batch)`` permutation of ``range(n_valid)``, -1 padded.

  Drawn on the device from the run's key, the experience and the epoch, so a
  resumed run draws the same order.
  """
  key = jax.random.fold_in(jax.random.fold_in(_data_key(rng), experience),
                           epoch)
  perm = jax.random.permutation(key, size)
  # Stable sort puts the valid indices (< n_valid) first, in random order.
  perm = perm[jnp.argsort(perm >= n_valid, stable=True)]
  perm = jnp.where(jnp.arange(size) < n_valid, perm, -1)
  total = steps * batch_size
  perm = jnp.concatenate(
      [perm, -jnp.ones((max(total - size, 0),), perm.dtype)])[:total]
  return perm.reshape(steps, batch_size)


def train_step(ctx: Context, strategy: Strategy, state: TrainState,
               batch: Batch, batch_spec: Callable[[Batch], Batch] | None = None
               ) -> tuple[TrainState, jax.Array]:
  """One optimiser step; returns the new state and the total loss.

  ``batch_spec`` constrains the prepared batch (replayed examples included)
  to its sharding in data-parallel runs.
  """
  key = jax.random.fold_in(state.rng, state.step)
  k_prep, k_grad, k_after = jax.random.split(key, 3)
  batch = strategy.prepare_batch(ctx, state.strategy, batch, k_prep)
  if batch_spec is not None:
    batch = batch_spec(batch)
  # The hooks after the step see the rows as they came (a memory stores
  # those); the losses and gradients, the augmented rows. (A key of its
  # own, so that a run without augmentation draws what it always drew.)
  came = batch
  batch = {**batch, "x": ctx.augmented(jax.random.fold_in(key, 3),
                                        batch["x"])}

  def task_loss_of(logits):
    if strategy.task_loss is not None:
      return strategy.task_loss(ctx, state.strategy, logits, batch)
    return cross_entropy(logits, batch["y"], batch["mask"])

  def loss_fn(params):
    logits, new_ms = ctx.apply(params, state.model_state, batch["x"],
                               batch["task"], train=True,
                               mask=batch["mask"])
    task_loss = task_loss_of(logits)
    reg = strategy.loss(ctx, state.strategy, params, batch, logits)
    return task_loss + reg, (new_ms, logits)

  (loss, (new_ms, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  if strategy.lookahead_loss is not None:
    # ΔΘ: the update the optimiser would make from the rest of the loss
    # (its state is not advanced), held constant; the penalty's gradient
    # is taken at Θ + ΔΘ and added (von Oswald et al. 2020, eq. 2).
    delta, _ = ctx.tx.update(grads, state.opt_state, state.params)
    if strategy.scale_updates is not None:
      delta = strategy.scale_updates(ctx, state.strategy, delta)
    delta = jax.lax.stop_gradient(delta)
    ahead, ahead_grads = jax.value_and_grad(
        lambda p: strategy.lookahead_loss(
            ctx, state.strategy, optax.apply_updates(p, delta), batch))(
                state.params)
    loss = loss + ahead
    grads = jax.tree.map(jnp.add, grads, ahead_grads)
  task_grads = None
  if strategy.needs_task_grads:

    def task_loss_fn(params):
      logits, _ = ctx.apply(params, state.model_state, batch["x"],
                            batch["task"], train=True, mask=batch["mask"])
      return task_loss_of(logits)

    task_grads = jax.grad(task_loss_fn)(state.params)
  grads, stepped = update_grads_and_state(strategy, ctx, state.strategy,
                                         grads, state.params, batch, k_grad)
  updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
  if strategy.scale_updates is not None:
    updates = strategy.scale_updates(ctx, state.strategy, updates)
  params = optax.apply_updates(state.params, updates)
  params = strategy.project_params(ctx, state.strategy, params)
  sstate = strategy.after_step(
      ctx, stepped,
      StepInfo(state.params, params, grads, task_grads, came, loss,
               k_after, logits))
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state, model_state=new_ms,
                       strategy=sstate), loss


def chunk_order(ctx: Context, rng: jax.Array, experience: jax.Array,
                epoch: jax.Array, n_valid: jax.Array, size: int, *,
                epoch_steps: int, chunk_steps: int) -> jax.Array:
  """The epoch's batch table as :func:`train_chunk` slices it: the
  :func:`epoch_indices` of ``epoch_steps`` steps and one chunk of padding
  past them. A run resumed with another chunk size (checkpoint.every_steps
  does not change the computation) starts its chunks at a step that need
  not divide by this one, and ``dynamic_slice`` would move a slice running
  past the end back inside it, onto earlier steps' batches. The order
  depends on ``size``, not on the steps, so the padding changes no
  batch."""
  return epoch_indices(rng, experience, epoch, n_valid, size,
                       epoch_steps + chunk_steps, ctx.info.batch_size)


def train_chunk(ctx: Context, strategy: Strategy, state: TrainState,
                data: dict[str, jax.Array], n_valid: jax.Array,
                experience: jax.Array, epoch: jax.Array, start: jax.Array,
                *, chunk_steps: int, epoch_steps: int,
                batch_spec: Callable[[Batch], Batch] | None = None):
  """Runs steps ``[start, start + chunk_steps)`` of one epoch in a loop.

  ``data['order']``, when given, is the epoch's batch table
  (:func:`chunk_order`, computed once per epoch); without it each call
  draws it again (a permutation of the experience: 6-8 ms on a 2-core
  CPU for MNIST, paid by every chunk when an epoch runs in many).

  Returns the new state, the per-step losses and which steps ran (steps
  whose batch is all padding are skipped and report loss 0).
  """
  bs = ctx.info.batch_size
  size = data["y"].shape[0]
  idx = data["order"] if "order" in data else chunk_order(
      ctx, state.rng, experience, epoch, n_valid, size,
      epoch_steps=epoch_steps, chunk_steps=chunk_steps)
  idx = jax.lax.dynamic_slice_in_dim(idx, start, chunk_steps, axis=0)

  # The valid rows are the epoch's first n_valid positions (epoch_indices),
  # so the steps with any are a prefix of the epoch, known from n_valid
  # alone: the loop runs exactly those (steps past them would be all
  # padding). In a sweep whose runs share n_valid the trip count stays
  # unbatched, so this stays a plain loop. It was a scan over every step
  # with a lax.cond skipping the padding ones, and XLA copied every
  # buffer the step updates in place (a replay memory: twice per step, a
  # third of a batch-10 Replay step on a CPU) into and out of the cond.
  n_steps = (n_valid + bs - 1) // bs
  end = jnp.clip(n_steps, start, start + chunk_steps)

  def body(i, carry):
    state, losses = carry
    row = idx[i - start]
    valid = row >= 0
    safe = jnp.maximum(row, 0)
    # ``index``: each row's position in the experience's training data
    # (-1 for padding), so a strategy can tell examples apart across
    # epochs (BiC holds some out for validation).
    batch = {"x": data["x"][safe], "y": data["y"][safe],
             "task": data["task"][safe], "mask": valid.astype(jnp.float32),
             "index": row}
    state, loss = train_step(ctx, strategy, state, batch, batch_spec)
    return state, losses.at[i - start].set(loss)

  state, losses = jax.lax.fori_loop(
      start, end, body, (state, jnp.zeros((chunk_steps,), jnp.float32)))
  ran = start + jnp.arange(chunk_steps) < n_steps
  return state, losses, ran


def monitor_loss(ctx: Context, state: TrainState, held: dict[str, jax.Array],
                 *, eval_batch_size: int) -> jax.Array:
  """The model's mean cross-entropy (evaluation mode, all its outputs,
  masked to the task's classes where the setting asks for it) over the
  ``count`` real rows of one stacked set ``held`` (:func:`test_arrays` of
  one experience): the plateau schedule's held-out loss."""
  x, y, t = held["x"][0], held["y"][0], held["task"][0]
  m = x.shape[0]
  valid = jnp.arange(m) < held["count"][0]

  def chunks(a):
    return a.reshape((m // eval_batch_size, eval_batch_size) + a.shape[1:])

  def one(args):
    xb, yb, tb, vb = args
    logits = ctx.logits(state.params, state.model_state, xb, tb)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), yb)
    return jnp.sum(jnp.where(vb, ce, 0.0))

  total = jnp.sum(jax.lax.map(one, (chunks(x), chunks(y), chunks(t),
                                    chunks(valid))))
  return total / jnp.maximum(held["count"][0], 1)


def evaluate(ctx: Context, strategy: Strategy, state: TrainState,
             test: dict[str, jax.Array], *, eval_batch_size: int,
             batch_spec: Callable[[Batch], Batch] | None = None,
             confusion: bool = False, task_aware: bool = False,
             per_class: bool = False):
  """Accuracy of ``state`` on every stacked test set: one accuracy row.

  With ``confusion``, ``task_aware`` or ``per_class``, a dict instead:
  ``accuracy``, the row, and

  * ``confusion`` (with ``confusion``): the confusion matrix over all the
    test sets, ``[y, p]`` the int32 number of test examples of class ``y``
    predicted as ``p`` (``ctx.info.num_classes`` square; a prediction
    outside it is not counted, so the rows then sum to less than the test
    sets' sizes);
  * ``task_accuracy`` (with ``task_aware``): the row when each test set's
    predictions are restricted to the classes among its labels, as if its
    task were given (Mammoth's Task-IL accuracy of a class-incremental
    run, its ``mask_classes``);
  * ``class_correct`` (with ``per_class``): the int32 number of test
    examples of each class predicted right, over all the test sets
    (``ctx.info.num_classes``): the confusion matrix's diagonal without
    the matrix, for the accuracy over any set of classes (the classes
    exposed so far, :func:`jaxcl.metrics.exposed_anytime_accuracy`).
  """
  predict = strategy.predict or default_predict
  e_n, m = test["y"].shape
  if m % eval_batch_size:
    raise ValueError(
        f"test arrays padded to {m} rows do not split into evaluation "
        f"batches of {eval_batch_size}; build them with test_arrays(..., "
        "learner.eval_batch_size)")
  nb = m // eval_batch_size
  c = ctx.info.num_classes
  # Padding rows sit after each test set's `count` valid rows.
  valid = jnp.arange(m)[None] < test["count"][:, None]

  def chunks(a):
    return a.reshape((e_n * nb, eval_batch_size) + a.shape[2:])

  xs = (chunks(test["x"]), chunks(test["task"]))
  if task_aware:
    # The classes among each test set's labels; each evaluation batch lies
    # inside one test set (m splits into nb batches), so they are a
    # per-batch input.
    present = jnp.zeros((e_n, c), jnp.int32).at[
        jnp.arange(e_n)[:, None], test["y"]].add(valid, mode="drop") > 0
    xs += (jnp.repeat(present, nb, axis=0),)

  def one(args):
    x, t = args[:2]
    if batch_spec is not None:
      x, t = batch_spec((x, t))
    logits = predict(ctx, state.strategy, state.params, state.model_state, x,
                     t)
    pred = jnp.argmax(logits, -1).astype(jnp.int32)
    if not task_aware:
      return pred
    classes, w = args[2], logits.shape[-1]  # scores may be wider than C
    classes = classes[:w] if w <= c else jnp.pad(classes, (0, w - c))
    masked = jnp.where(classes, logits, -jnp.inf)
    return pred, jnp.argmax(masked, -1).astype(jnp.int32)

  # One predicted label per test row (E x m int32s: small next to the
  # inputs), and with task_aware one among its test set's classes.
  preds = jax.lax.map(one, xs)
  pred, task_pred = preds if task_aware else (preds, None)
  pred = pred.reshape(e_n, m)

  def row_of(p):
    correct = jnp.sum((p == test["y"]) & valid, axis=1, dtype=jnp.int32)
    return correct / jnp.maximum(test["count"], 1)

  row = row_of(pred)
  if not (confusion or task_aware or per_class):
    return row
  out = {"accuracy": row}
  if confusion:
    out["confusion"] = jnp.zeros((c, c), jnp.int32).at[test["y"], pred].add(
        valid.astype(jnp.int32), mode="drop")
  if task_aware:
    out["task_accuracy"] = row_of(task_pred.reshape(e_n, m))
  if per_class:
    # The confusion matrix's diagonal when it is counted anyway.
    out["class_correct"] = (
        jnp.diagonal(out["confusion"]) if confusion else
        jnp.zeros((c,), jnp.int32).at[test["y"]].add(
            (valid & (pred == test["y"])).astype(jnp.int32), mode="drop"))
  return out


# --------------------------------------------------------------------------
# A learner: the compiled functions of one run configuration.


@dataclasses.dataclass(frozen=True)
class Learner:
  """The static pieces of a run and their compiled functions.

  Attributes:
    ctx: the static context.
    strategy: the strategy record.
    chunk_steps: steps per compiled call: an epoch, or the greatest common
      divisor of ``checkpoint_every_steps`` and ``eval_every_steps`` (those
      below an epoch).
    epoch_steps: steps per padded epoch (a multiple of ``chunk_steps``).
    epochs: epochs per experience.
    eval_batch_size: evaluation batch size.
    reset_optimizer: re-initialise the optimiser state before each
      experience (keeping its injected hyperparameters).
    members: 0 for one run; k for k runs stacked on a leading axis of the
      state and trained as one ``vmap``-ed program (a sweep).
    member_data: in a sweep, each run has its own data (a leading run axis
      on the training and test arrays: each seed's own draw of a permuted
      or rotated stream); otherwise the runs share the data.
    mesh: a ``jax.sharding.Mesh`` with a ``data`` axis for data-parallel
      training, or None.
    state_shardings: the state's shardings on ``mesh`` (see
      :func:`jaxcl.parallel.state_sharding`).
    checkpoint_every_steps: save a checkpoint every so many steps of an
      epoch, and at its end (0: at the experiences' ends only).
    eval_every_steps: evaluate every test set every so many steps of an
      epoch, and at its end (0: at the experiences' ends only).
    confusion: the loop keeps the confusion matrix of each experience's
      end (:attr:`end_eval_fn`).
    task_aware: the loop also keeps, at each experience's end, the
      accuracies with each test set's predictions restricted to its own
      classes (a class-incremental stream's Task-IL accuracy).
    per_class: every evaluation (:attr:`eval_fn` and :attr:`end_eval_fn`)
      also counts each class's correct test examples (``class_correct``),
      for the accuracy over the classes exposed so far.
  """
  ctx: Context
  strategy: Strategy
  chunk_steps: int
  epoch_steps: int
  epochs: int
  eval_batch_size: int
  reset_optimizer: bool = True
  members: int = 0
  member_data: bool = False
  mesh: Any = None
  state_shardings: Any = None
  checkpoint_every_steps: int = 0
  eval_every_steps: int = 0
  confusion: bool = False
  task_aware: bool = False
  per_class: bool = False

  def _batch_spec(self):
    if self.mesh is None:
      return None
    from jaxcl import parallel
    sharding = parallel.batch_sharding(self.mesh)
    return lambda tree: jax.lax.with_sharding_constraint(
        tree, jax.tree.map(lambda _: sharding, tree))

  def _jit(self, f, n_args: int, donate: bool, out_state: bool):
    if self.members:
      # The state, and with member_data the data (the second argument of
      # both chunk_fn and eval_fn), carry the run axis.
      data = 0 if self.member_data else None
      f = jax.vmap(f, in_axes=(0, data) + (None,) * (n_args - 2),
                   axis_name=RUNS_AXIS)
    kwargs = {"donate_argnums": 0} if donate else {}
    if self.mesh is not None:
      from jaxcl import parallel
      rep = parallel.replicated(self.mesh)
      kwargs["in_shardings"] = (self.state_shardings,) + (rep,) * (n_args - 1)
      kwargs["out_shardings"] = ((self.state_shardings, rep, rep) if out_state
                                 else rep)
    return jax.jit(f, **kwargs)

  @functools.cached_property
  def chunk_fn(self):
    """``(state, data, n_valid, experience, epoch, start) -> (state, losses,
    ran)``, jitted with the state donated (vmapped over runs in a sweep)."""
    f = functools.partial(train_chunk, self.ctx, self.strategy,
                          chunk_steps=self.chunk_steps,
                          epoch_steps=self.epoch_steps,
                          batch_spec=self._batch_spec())
    return self._jit(f, 6, donate=True, out_state=True)

  @functools.cached_property
  def order_fn(self):
    """``(rng, experience, epoch, n_valid) -> batch table``, jitted
    (vmapped over the runs' keys in a sweep): :func:`chunk_order`, for the
    loop to compute once per epoch and pass as ``data['order']``."""
    f = functools.partial(chunk_order, self.ctx,
                          size=self.ctx.info.train_size,
                          epoch_steps=self.epoch_steps,
                          chunk_steps=self.chunk_steps)
    if self.members:
      f = jax.vmap(f, in_axes=(0, None, None, None))
    return jax.jit(f)

  @functools.cached_property
  def eval_fn(self):
    """``(state, test) -> accuracy row``, jitted; with ``per_class`` a
    dict of the row (``accuracy``) and ``class_correct``."""
    f = functools.partial(evaluate, self.ctx, self.strategy,
                          eval_batch_size=self.eval_batch_size,
                          batch_spec=self._batch_spec(),
                          per_class=self.per_class)
    return self._jit(f, 2, donate=False, out_state=False)

  @functools.cached_property
  def monitor_fn(self):
    """``(state, held) -> loss``, jitted: :func:`monitor_loss` on one
    held-out set (``test_arrays`` of one experience; the plateau
    schedule's)."""
    f = functools.partial(monitor_loss, self.ctx,
                          eval_batch_size=self.eval_batch_size)
    return jax.jit(f)

  @functools.cached_property
  def end_eval_fn(self):
    """``(state, test) -> dict``, jitted: the evaluation at the
    experiences' ends, :func:`evaluate` with this learner's
    ``confusion``, ``task_aware`` and ``per_class`` (at least one set)."""
    f = functools.partial(evaluate, self.ctx, self.strategy,
                          eval_batch_size=self.eval_batch_size,
                          batch_spec=self._batch_spec(),
                          confusion=self.confusion,
                          task_aware=self.task_aware,
                          per_class=self.per_class)
    return self._jit(f, 2, donate=False, out_state=False)


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
  """``state`` with the optimiser's injected ``learning_rate`` set to
  ``lr`` (the plateau schedule's host-side change)."""
  hp = dict(state.opt_state.hyperparams)
  hp["learning_rate"] = jnp.asarray(lr, jnp.asarray(
      hp["learning_rate"]).dtype)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hp))


def reset_opt_state(ctx: Context, state: TrainState) -> TrainState:
  """A fresh optimiser state that keeps the injected hyperparameters (a
  sweep's per-run learning rate)."""
  fresh = ctx.tx.init(state.params)
  if hasattr(fresh, "hyperparams") and hasattr(state.opt_state,
                                               "hyperparams"):
    fresh = fresh._replace(hyperparams=state.opt_state.hyperparams)
  return state.replace(opt_state=fresh)


def make_learner(ctx: Context, strategy: Strategy, *, epochs: int,
                 eval_batch_size: int = 1000, checkpoint_every_steps: int = 0,
                 eval_every_steps: int = 0, confusion: bool = False,
                 task_aware: bool = False, per_class: bool = False,
                 reset_optimizer: bool = True) -> Learner:
  """Validates the loop settings and builds a :class:`Learner`.

  A compiled call runs a chunk of steps between the points where the host
  must act: checkpoints and evaluations inside the epochs. Every multiple
  of ``checkpoint_every_steps`` and of ``eval_every_steps`` must end a
  chunk, so the chunk is their greatest common divisor (values of an epoch
  or more act at the epochs' ends only, which end chunks anyway)."""
  info = ctx.info
  if epochs < 1:
    raise ConfigError(f"epochs must be >= 1, got {epochs}")
  if info.batch_size < 1:
    raise ConfigError(f"batch_size must be >= 1, got {info.batch_size}")
  if eval_batch_size < 1:
    raise ConfigError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
  if checkpoint_every_steps < 0:
    raise ConfigError("checkpoint.every_steps must be >= 0 (0: at the end of "
                      f"each experience only), got {checkpoint_every_steps}")
  if eval_every_steps < 0:
    raise ConfigError("train.eval_every_steps must be >= 0 (0: evaluate at "
                      f"the end of each experience only), got "
                      f"{eval_every_steps}")
  steps = steps_per_epoch(info.train_size, info.batch_size)
  inside = [n for n in (checkpoint_every_steps, eval_every_steps)
            if 0 < n < steps]
  chunk = math.gcd(*inside) if inside else steps
  return Learner(ctx, strategy, chunk_steps=chunk,
                 epoch_steps=steps_per_epoch(info.train_size, info.batch_size,
                                             chunk),
                 epochs=epochs, eval_batch_size=eval_batch_size,
                 reset_optimizer=reset_optimizer,
                 checkpoint_every_steps=checkpoint_every_steps,
                 eval_every_steps=eval_every_steps, confusion=confusion,
                 task_aware=task_aware, per_class=per_class)
