"""Progress & Compress (P&C): an active column distilled into a knowledge base.

Schwarz et al. (2018) use two networks of the same shape: a *knowledge
base* (KB) and an *active column* (AC) that reads every KB layer through
lateral connections (as in progressive networks). Each experience has two
phases:

* **progress** (the experience's training steps): only the AC learns the
  new data; the KB is fixed and feeds the AC through the laterals;
* **compress** (after the experience, host side): the KB learns to imitate
  the AC on the experience's data while online EWC protects what it knew
  (eqs. 3-5):

  .. math::
     \\mathcal{L}_{KB}(\\theta^{KB}) = \\mathbb{E}_x\\Big[
       \\mathrm{KL}\\big(\\pi^{AC}_T(\\cdot\\mid x)\\,\\|\\,
                        \\pi^{KB}_T(\\cdot\\mid x)\\big)\\Big]
       + \\frac{\\lambda}{2} \\sum_i \\gamma F^*_i
         (\\theta^{KB}_i - \\theta^{KB*}_i)^2,

  ``π_T`` the softmax at temperature ``T``; afterwards the running Fisher
  of the KB becomes ``F* ← γ F* + F`` (``F`` at the new KB parameters, on
  the experience's data) and the anchor ``θ^{KB*}`` the new KB parameters
  (the online EWC of :mod:`jaxcl.strategies.online_ewc`; the Fisher comes
  from :func:`jaxcl.strategies._penalty.fisher_diagonal`).

The two columns are the ``progressive`` model's (:mod:`jaxcl.models.
progressive`, ``model.progressive.num_columns = 2``): column 0 is the KB,
column 1 the AC with laterals ``U^{(1:0)}`` from the KB. Every parameter
leaf is stacked along a column axis 0, so "only the AC learns" is a
gradient mask on row 1 (:func:`jaxcl.models.masked.task_row_grads`) and
the KB's loss masks row 0. The step trains the AC by routing the batch to
column 1 (``prepare_batch`` sets the column id in ``task``); ``predict``
uses the KB, which holds everything compressed so far.

``reset_active=True`` re-initialises the AC (not the laterals' source)
after each compress phase; the paper allows either.

.. warning::
  The model's task input selects the column, so P&C runs on class- and
  domain-incremental streams (task ids unused); ``init`` raises on
  task-incremental ones. The compress phase has its own Adam optimiser
  (``compress_lr``), fresh for each experience.

References:
  Schwarz et al., `Progress & Compress: A scalable framework for continual
  learning <https://arxiv.org/abs/1805.06370>`_, ICML 2018.
  Rusu et al., `Progressive Neural Networks
  <https://arxiv.org/abs/1606.04671>`_, 2016 (the lateral connections).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import checks
from jaxcl.models.masked import check_zero_grad_is_zero_update, task_row_grads
from jaxcl.strategies import _penalty
from jaxcl.strategy import Strategy, frozen_update
from jaxcl.train import experience_batches

__all__ = ["PCState", "progress_compress", "KB", "AC"]

KB, AC = 0, 1  # column ids


class PCState(NamedTuple):
  fisher: Any        # like params: running Fisher F* of the KB (0 on the AC)
  anchor: Any        # like params: parameters after the last compress
  count: jax.Array   # int32 scalar: compress phases done


def _columns(params) -> int:
  return int(jax.tree.leaves(params)[0].shape[0])


def progress_compress(lam: float = 100.0, gamma: float = 1.0,
                      temperature: float = 1.0, compress_epochs: int = 1,
                      compress_lr: float = 1e-3,
                      compress_batch_size: int = 32,
                      fisher: str = "exact", max_examples: int = 1000,
                      reset_active: bool = False, seed: int = 0) -> Strategy:
  """Progress & Compress.

  Args:
    lam: online-EWC strength ``λ`` (>= 0) in the compress phase.
    gamma: Fisher decay ``γ`` in ``(0, 1]``.
    temperature: distillation temperature ``T > 0``.
    compress_epochs: epochs over the experience's data per compress phase
      (``train.augment`` augments its batches, as the steps').
    compress_lr: Adam learning rate of the compress phase.
    compress_batch_size: batch size of the compress phase.
    fisher: Fisher convention (``exact``, ``sampled``, ``predicted``,
      ``empirical``).
    max_examples: examples for the Fisher estimate (0: all).
    reset_active: re-initialise the active column after each compress.
    seed: compress-phase shuffling and Fisher sampling.

  Raises:
    ValueError: bad values (named); at ``init``, a model other than the
      2-column ``progressive`` one, a task-incremental stream, or an
      optimiser that moves parameters with zero gradient.
  """
  checks.nonnegative("progress_compress: lam", lam)
  if not (checks.is_real(gamma) and 0 < gamma <= 1):
    raise ValueError(f"progress_compress: gamma must be in (0, 1], got "
                     f"{gamma!r}")
  checks.positive("progress_compress: temperature", temperature)
  checks.whole("progress_compress: compress_epochs", compress_epochs, 1)
  checks.positive("progress_compress: compress_lr", compress_lr)
  _penalty.check_fisher("progress_compress", fisher)
  _penalty.check_estimator_args("progress_compress", max_examples,
                                compress_batch_size, seed,
                                batch_arg="compress_batch_size")
  checks.flag("progress_compress: reset_active", reset_active)
  tx = optax.adam(compress_lr)
  every = lambda path, g: True  # every leaf is stacked by column

  def column_logits(ctx, params, model_state, x, column):
    # The model's task input is the column (class/domain streams only).
    t = jnp.full((x.shape[0],), column, jnp.int32)
    return ctx.logits(params, model_state, x, t)

  def init(ctx, key, params):
    del key
    names = set(params) if isinstance(params, dict) else set()
    if "head_W" not in names or "layer_0_W" not in names or \
        _columns(params) != 2:
      raise ValueError(
          "progress_compress needs the 2-column 'progressive' model "
          "(model.name='progressive', model.progressive.num_columns=2)")
    if ctx.info.kind == "task":
      raise ValueError("progress_compress routes columns through the task "
                       "input; use a class- or domain-incremental stream")
    check_zero_grad_is_zero_update(ctx.tx, params, "progress_compress")
    return PCState(_penalty.zeros_like_tree(params),
                   jax.tree.map(jnp.copy, params), jnp.zeros((), jnp.int32))

  def prepare_batch(ctx, sstate, batch, key):
    del ctx, sstate, key
    return {**batch, "task": jnp.full_like(batch["task"], AC)}

  def freeze_grads(ctx, sstate, grads):
    # Progress: the AC only. Declared, so a chained member that projects
    # (A-GEM, GEM) or adds gradient (MIR, RAR, La-MAML, MER) keeps off
    # the knowledge base too.
    del ctx, sstate
    return task_row_grads(grads, AC, every)

  def kb_loss(ctx, params, model_state, ss, x, mask):
    t = temperature
    teacher = jax.lax.stop_gradient(
        column_logits(ctx, params, model_state, x, AC)) / t
    student = column_logits(ctx, params, model_state, x, KB) / t
    p = jax.nn.softmax(teacher, -1)
    kl = jnp.sum(p * (jax.nn.log_softmax(teacher, -1) -
                      jax.nn.log_softmax(student, -1)), -1)
    kl = jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    ewc = 0.5 * lam * gamma * _penalty.quadratic(ss.fisher, ss.anchor, params)
    return kl + ewc

  @functools.partial(jax.jit, static_argnums=0)
  def compress(ctx, params, model_state, ss, batches, fisher_batches, key,
               fresh):
    def one(carry, batch_key):
      p, opt = carry
      batch, k = batch_key
      # (train.augment, as the training steps'; teacher and student see
      # the same augmented rows.)
      x = ctx.augmented(k, batch["x"])
      g = jax.grad(kb_loss, argnums=1)(ctx, p, model_state, ss, x,
                                       batch["mask"])
      g = task_row_grads(g, KB, every)  # compress: the KB only
      upd, opt = tx.update(g, opt, p)
      # The AC's rows stay exactly as they are.
      upd = task_row_grads(upd, KB, every)
      return optax.apply_updates(p, upd), opt

    def step(carry, batch_key):
      # All-padding batches (fixed shapes across experiences) are skipped.
      return jax.lax.cond(jnp.any(batch_key[0]["mask"] > 0), one,
                          lambda c, b: c, carry, batch_key), None

    keys = jax.random.split(jax.random.fold_in(key, 2),
                            batches["mask"].shape[0])
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)),
                                  (batches, keys))
    fb = {**fisher_batches, "task": jnp.full_like(fisher_batches["task"], KB)}
    f = _penalty.fisher_diagonal(ctx, params, model_state, fb, key,
                                 kind=fisher)
    new = PCState(jax.tree.map(lambda old, n: gamma * old + n, ss.fisher, f),
                  params, ss.count + 1)
    if reset_active:
      keep = lambda a, b: jnp.where(
          (jnp.arange(a.shape[0]) == AC).reshape((-1,) + (1,) * (a.ndim - 1)),
          b, a)
      params = jax.tree.map(keep, params, fresh)
    return params, new

  def after_experience(ctx, state, experience):
    i = experience.index
    bs = compress_batch_size
    # Every experience gets the same number of batches (the largest
    # experience's), padded with mask 0, so compress compiles once.
    nb = math.ceil(ctx.info.train_size / bs)
    b = experience_batches(experience, bs)
    rows = {k: v.reshape((-1,) + v.shape[2:]) for k, v in b.items()}
    pad = nb * bs - len(rows["y"])
    rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
            for k, v in rows.items()}
    rng = np.random.default_rng(seed + 7919 * i)
    epochs = []
    for _ in range(compress_epochs):  # a fresh shuffle per epoch
      perm = rng.permutation(nb * bs)
      epochs.append({k: v[perm].reshape((nb, bs) + v.shape[1:])
                     for k, v in rows.items()})
    batches = {k: np.concatenate([e[k] for e in epochs]) for k in rows}
    fisher_batches = _penalty.importance_batches(
        experience, compress_batch_size, max_examples, seed + i,
        ctx.info.train_size)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    x0 = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
    fresh = ctx.model.init(jax.random.fold_in(key, 1), x0,
                           jnp.zeros((1,), jnp.int32))["params"]
    params, ss = compress(ctx, state.params, state.model_state,
                          state.strategy, jax.device_put(batches),
                          fisher_batches, key, fresh)
    return state.replace(params=params, strategy=ss)

  def predict(ctx, sstate, params, model_state, x, task):
    del sstate, task
    return column_logits(ctx, params, model_state, x, KB)

  return Strategy(init=init, prepare_batch=prepare_batch,
                  update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads,
                  after_experience=after_experience, predict=predict,
                  name="progress_compress",
                  writes_params=frozenset({"after_experience"}))
