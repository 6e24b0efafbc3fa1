"""PackNet: iterative magnitude pruning packs tasks into one network.

Mallya & Lazebnik (2018). Every prunable weight (a kernel of the backbone:
a leaf with two or more dimensions outside the ``head``) has an owner: the
task it was kept for, or *free*. While task ``t`` trains, only free weights
move (weights of earlier tasks are used but frozen):

.. math::  g_i \\leftarrow g_i \\cdot \\mathbb{1}[\\mathrm{owner}_i = \\mathrm{free}]

After the experience, in every layer, the fraction ``prune`` of the free
weights with the smallest magnitude is set to zero and stays free; the rest
become task ``t``'s (``owner = t``); then the kept weights retrain briefly
(``retrain_epochs``) with the pruned ones held at zero. Backbone biases (and
other non-kernel backbone leaves) are trained with the first task and
frozen after it, as in the paper. Inference for task ``t`` uses the weights
of tasks ``<= t`` only:

.. math::  \\theta^{(t)} = \\theta \\odot \\mathbb{1}[\\mathrm{owner} \\le t]

Heads (``params['head']``) are not pruned: the head entries an experience
moved (its task's head, or its classes' columns in a task-incremental split
with masked logits) become its task's after it and are frozen from then on,
so other chained strategies (e.g. LwF distilling through old heads) cannot
move them either.

``prune='equal'`` gives every task the same share: task ``t`` of ``N``
prunes ``1 - 1 / (N - t)`` of the free weights (the last keeps all).

Warning:
  Freezing relies on a zero gradient giving a zero update: weight decay
  (``adamw`` or coupled L2) would move frozen weights, so ``init`` raises if
  the optimiser moves zero-gradient parameters. The retraining step uses the
  task loss only (other chained strategies' losses are not added).

References:
  Mallya & Lazebnik, `PackNet: Adding Multiple Tasks to a Single Network by
  Iterative Pruning <https://arxiv.org/abs/1711.05769>`_, 2018.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.models.masked import check_zero_grad_is_zero_update, per_task
from jaxcl.state import cross_entropy
from jaxcl.strategy import Strategy, check_task_seen, frozen_update

FREE = np.int32(2 ** 30)  # owner of a weight no task has kept


class PackNetState(NamedTuple):
  owner: Any         # int32 pytree like params: owning task or FREE
  task: jax.Array    # int32 scalar: the task being trained
  seen: jax.Array    # bool (num_tasks,): tasks that own weights
  head_ref: Any      # params['head'] at the start of the experience (or ())


def _head_of(params):
  return params["head"] if isinstance(params, dict) and "head" in params \
      else ()


def _is_head(path) -> bool:
  return any(getattr(k, "key", None) == "head" for k in path)


def _prunable(path, leaf) -> bool:
  return leaf.ndim >= 2 and not _is_head(path)


def _frozen_kind(path, leaf) -> bool:
  """Leaves whose inference use is restricted to tasks <= t (the backbone;
  heads are selected by task already)."""
  del leaf
  return not _is_head(path)


def task_params(params: Any, owner: Any, task: jax.Array | int) -> Any:
  """The weights task ``task`` uses: owner <= task (others zeroed)."""

  def one(path, p, o):
    if not _frozen_kind(path, p):
      return p
    return jnp.where(o <= task, p, jnp.zeros_like(p))

  return jax.tree_util.tree_map_with_path(one, params, owner)


def checked_task_params(state, task: int) -> Any:
  """Host-side :func:`task_params` that checks ``task`` was trained.

  Raises:
    ValueError: ``task`` is outside the tasks seen so far.
  """
  check_task_seen(state.strategy.seen, task)
  return task_params(state.params, state.strategy.owner, task)


def _prune(params, owner, task, fraction):
  """Prunes ``fraction`` of each layer's free weights by magnitude; the rest
  (and free non-kernel backbone leaves) become ``task``'s."""

  def one(path, p, o):
    if not _frozen_kind(path, p):
      return p, o
    free = o == FREE
    if not _prunable(path, p):
      return p, jnp.where(free, task, o)
    n_free = jnp.sum(free)
    n_prune = jnp.floor(fraction * n_free).astype(jnp.int32)
    key = jnp.where(free, jnp.abs(p), jnp.inf).reshape(-1)
    rank = jnp.argsort(jnp.argsort(key)).reshape(p.shape)
    pruned = free & (rank < n_prune)
    kept = free & ~pruned
    return (jnp.where(pruned, jnp.zeros_like(p), p),
            jnp.where(kept, task, o))

  both = jax.tree_util.tree_map_with_path(one, params, owner)
  outer = jax.tree.structure(params)
  pairs = outer.flatten_up_to(both)
  return (outer.unflatten([a for a, _ in pairs]),
          outer.unflatten([b for _, b in pairs]))


def _grad_mask(grads, owner, trainable_owner):
  def one(path, g, o):
    del path
    return jnp.where(o == trainable_owner, g, jnp.zeros_like(g))

  return jax.tree_util.tree_map_with_path(one, grads, owner)


def packnet(prune: float | str = 0.5, retrain_epochs: int = 1,
            retrain_batch_size: int = 0) -> Strategy:
  """PackNet (see the module docstring).

  Args:
    prune: fraction of the free weights pruned after each experience, in
      (0, 1), or ``'equal'`` for an equal share per task.
    retrain_epochs: epochs of retraining the kept weights after pruning
      (0: none); ``train.augment`` augments its batches, as the steps'.
    retrain_batch_size: retraining batch size (0: the training one).

  Raises:
    ValueError: ``prune`` outside (0, 1) (and not 'equal'), negative
      ``retrain_epochs``.
  """
  if isinstance(prune, str):
    if prune != "equal":
      raise ValueError(f"prune={prune!r}: give a fraction in (0, 1) or "
                       "'equal'")
  elif not 0.0 < float(prune) < 1.0:
    raise ValueError(f"prune={prune} is outside (0, 1): the fraction of "
                     "free weights pruned after each experience")
  checks.whole("packnet: retrain_epochs", retrain_epochs, 0,
                "0: no retraining")
  checks.whole("packnet: retrain_batch_size", retrain_batch_size, 0,
                "0: the training batch size")

  def init(ctx, key, params):
    del key
    ctx.info.require_task_per_experience("packnet")
    check_zero_grad_is_zero_update(ctx.tx, params, "packnet")
    if not any(_prunable(p, a) for p, a in
               jax.tree_util.tree_flatten_with_path(params)[0]):
      raise ValueError("packnet found no prunable kernel (a leaf with >= 2 "
                       "dims outside 'head') in the model's params")
    owner = jax.tree.map(lambda a: jnp.full(a.shape, FREE, jnp.int32), params)
    return PackNetState(owner, jnp.zeros((), jnp.int32),
                        jnp.zeros((ctx.info.num_tasks,), bool),
                        jax.tree.map(jnp.array, _head_of(params)))

  def before_experience(ctx, state, experience):
    t = int(experience.task_id)
    if not 0 <= t < ctx.info.num_tasks:
      raise ValueError(f"task id {t} outside [0, {ctx.info.num_tasks})")
    seen = np.asarray(state.strategy.seen)
    if seen[t]:
      raise ValueError(f"packnet: task {t} already owns weights; PackNet "
                       "trains each task once (task-incremental streams)")
    return state.replace(strategy=state.strategy._replace(
        task=jnp.asarray(t, jnp.int32),
        head_ref=jax.tree.map(jnp.array, _head_of(state.params))))

  def freeze_grads(ctx, sstate, grads):
    del ctx
    return _grad_mask(grads, sstate.owner, FREE)

  @functools.partial(jax.jit, static_argnums=(0,))
  def _prune_jit(ctx, params, owner, task, fraction):
    del ctx
    return _prune(params, owner, task, fraction)

  @functools.partial(jax.jit, static_argnums=(0,))
  def _retrain(ctx, params, model_state, owner, task, batches, key):
    opt_state = ctx.tx.init(params)

    def step(carry, batch_key):
      params, model_state, opt_state = carry
      batch, k = batch_key
      x = ctx.augmented(k, batch["x"])  # (train.augment, as the steps)

      def loss_fn(p):
        logits, ms = ctx.apply(p, model_state, x, batch["task"],
                               train=True, mask=batch["mask"])
        return cross_entropy(logits, batch["y"], batch["mask"]), ms

      def run(carry):
        params, model_state, opt_state = carry
        (_, ms), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        g = _grad_mask(g, owner, task)
        updates, opt_state = ctx.tx.update(g, opt_state, params)
        params = jax.tree.map(jnp.add, params, updates)
        return params, ms, opt_state

      carry = jax.lax.cond(jnp.any(batch["mask"] > 0), run, lambda c: c,
                           carry)
      return carry, None

    keys = jax.random.split(key, batches["y"].shape[0])
    (params, model_state, _), _ = jax.lax.scan(
        step, (params, model_state, opt_state), (batches, keys))
    return params, model_state

  def _batches(ctx, experience, epoch, bs):
    # Fixed shape for every experience (padded to the largest), so the
    # retraining program compiles once.
    n = experience.num_train
    nb = -(-ctx.info.train_size // bs)
    rng = np.random.default_rng([experience.index, epoch, 0xBACC])
    idx = rng.permutation(n)
    pad = nb * bs - n
    take = np.concatenate([idx, np.zeros(pad, idx.dtype)])
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    shape = lambda a: a.reshape((nb, bs) + a.shape[1:])
    return {"x": shape(experience.train_x[take].astype(np.float32)),
            "y": shape(experience.train_y[take].astype(np.int32)),
            "task": shape(experience.train_task[take].astype(np.int32)),
            "mask": shape(mask)}

  def after_experience(ctx, state, experience):
    ss = state.strategy
    t = int(experience.task_id)
    if prune == "equal":
      fraction = 1.0 - 1.0 / max(ctx.info.num_tasks - t, 1)
    else:
      fraction = float(prune)
    params, owner = _prune_jit(ctx, state.params, ss.owner,
                               jnp.asarray(t, jnp.int32),
                               jnp.asarray(fraction, jnp.float32))
    if isinstance(owner, dict) and "head" in owner:
      # The head entries this experience moved are its task's from now on.
      owner = dict(owner)
      owner["head"] = jax.tree.map(
          lambda o, p, r: jnp.where((o == FREE) & (p != r), t, o),
          owner["head"], params["head"], ss.head_ref)
    model_state = state.model_state
    bs = retrain_batch_size or ctx.info.batch_size
    bar = ctx.progress(retrain_epochs, "retraining after pruning", "epoch")
    running = None  # the epoch dispatched before the last
    for epoch in range(retrain_epochs):
      batches = jax.device_put(_batches(ctx, experience, epoch, bs))
      key = jax.random.fold_in(jax.random.fold_in(
          jax.random.fold_in(state.rng, 0xBACC), experience.index), epoch)
      params, model_state = _retrain(ctx, params, model_state, owner,
                                     jnp.asarray(t, jnp.int32), batches, key)
      # The bar counts finished epochs: wait for the one before, so the
      # host still builds the next epoch's batches while this one runs.
      if running is not None:
        jax.block_until_ready(running)
        bar.update(1)
      running = params
    if running is not None:
      jax.block_until_ready(running)
      bar.update(1)
    bar.close()
    ss = PackNetState(owner, ss.task, ss.seen.at[t].set(True), ss.head_ref)
    return state.replace(params=params, model_state=model_state,
                         strategy=ss)

  def predict(ctx, sstate, params, model_state, x, task):
    t_max = max(ctx.info.num_tasks, 1)
    return per_task(
        lambda t: ctx.logits(task_params(params, sstate.owner, t),
                             model_state, x, task),
        task, t_max)

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads,
                  after_experience=after_experience, predict=predict,
                  name="packnet",
                  writes_params=frozenset({"after_experience"}))
