"""Shared pieces of the quadratic-penalty methods (EWC, online EWC, SI, MAS).

These methods differ only in how they weigh each parameter (the importance
``Ω``) and when they refresh it; all of them add

.. math::  \\mathcal{R}(\\theta) = \\sum_i \\Omega_i (\\theta_i - \\theta^*_i)^2

to the loss. This module holds, as pure functions on parameter pytrees:

* :func:`quadratic`: the penalty for one (importance, anchor) pair (EWC
  merges its per-experience terms into one such pair, see
  :func:`jaxcl.strategies.ewc.add_experience`);
* :func:`fisher_diagonal`: the diagonal Fisher information from per-example
  gradients (``jax.vmap(jax.grad(...))``), with the three label conventions
  of the literature (``exact``, ``sampled``, ``empirical``);
* :func:`mas_importance`: MAS's importance, the mean absolute per-example
  gradient of the squared L2 norm of the outputs;
* :func:`importance_batches`: an experience's examples as fixed-shape
  batches for the two estimators above (host side).

The estimators scan over batches inside one jitted call; the strategies jit
them once per factory with the hashable :class:`~jaxcl.state.Context` static.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.scenarios import Experience
from jaxcl.state import Batch, Context
from jaxcl.train import experience_batches

__all__ = ["FISHER_TYPES", "quadratic", "fisher_diagonal", "mas_importance",
           "importance_batches", "check_estimator_args",
           "check_fisher", "zeros_like_tree"]

FISHER_TYPES = ("exact", "sampled", "predicted", "empirical")


# --------------------------------------------------------------------------
# Validation shared by the factories (raised before any tracing).




def check_fisher(who: str, fisher: str) -> None:
  """A clear error for a Fisher type not in :data:`FISHER_TYPES`."""
  if fisher not in FISHER_TYPES:
    raise ValueError(f"{who}: unknown Fisher type {fisher!r}; valid: "
                     f"{list(FISHER_TYPES)}")


def check_estimator_args(who: str, max_examples: int, batch_size: int,
                         seed: int = 0, batch_arg: str = "batch_size") -> None:
  """The importance estimate's example count, batch and seed (``who``: the
  strategy, ``batch_arg``: its name for the batch, for the messages)."""
  checks.whole(f"{who}: max_examples", max_examples, 0,
                "0: all of the experience's training examples")
  checks.whole(f"{who}: {batch_arg}", batch_size, 1)
  # numpy's generators take the seed after the first experience has
  # trained; refuse a bad one now.
  checks.whole(f"{who}: seed", seed, 0)


# --------------------------------------------------------------------------
# Penalties.


def zeros_like_tree(tree: Any, lead: tuple[int, ...] = ()) -> Any:
  """Zeros shaped like ``tree``'s leaves, with optional leading axes."""
  return jax.tree.map(lambda a: jnp.zeros(lead + a.shape, a.dtype), tree)


def quadratic(importance: Any, anchor: Any, params: Any) -> jax.Array:
  """``Σ_i Ω_i (θ_i − θ*_i)²`` over all leaves (float32 scalar)."""
  terms = jax.tree.map(
      lambda w, a, p: jnp.sum(w * jnp.square(p - a), dtype=jnp.float32),
      importance, anchor, params)
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def _one_example_logits(ctx: Context, model_state: Any):
  """``(params, x, task) -> logits`` of a single example (no batch axis)."""

  def f(params, x, task):
    return ctx.logits(params, model_state, x[None], task[None])[0].astype(
        jnp.float32)

  return f


def _scan_batches(per_batch, batches: Batch, init: Any):
  """Sums ``per_batch(batch, index) -> (tree, count)`` over stacked batches."""

  def skip(batch, i):
    del batch, i
    return init, jnp.zeros((), jnp.float32)

  def body(carry, xs):
    acc, n = carry
    batch, i = xs
    # Padding batches (all mask 0) cost nothing: the per-example gradients
    # are the expensive part.
    tree, count = jax.lax.cond(jnp.any(batch["mask"] > 0), per_batch, skip,
                               batch, i)
    return (jax.tree.map(jnp.add, acc, tree), n + count), None

  nb = batches["y"].shape[0]
  (acc, n), _ = jax.lax.scan(body, (init, jnp.zeros((), jnp.float32)),
                             (batches, jnp.arange(nb)))
  return jax.tree.map(lambda a: a / jnp.maximum(n, 1.0), acc)


# Folded into an estimator's key for the augmentation's keys, so that
# ``sampled`` labels draw what they drew before augmentation existed.
_AUGMENT_STREAM = 0x6175


def augmented_x(ctx: Context, key: jax.Array | None, batch: Batch,
                i: jax.Array) -> jax.Array:
  """Batch ``i``'s inputs through the training augmentation, or as they are
  without one. Mammoth's and FACIL's EWC (and Avalanche's MAS) estimate
  importance over the training loader, whose transform augments; their
  exemplar selection (herding, class means) reads the images unaugmented,
  and so does jaxcl's."""
  if ctx.augment is None:
    return batch["x"]
  if key is None:
    raise ValueError("an importance estimate over augmented examples needs "
                     "a key (the run has train.augment)")
  k = jax.random.fold_in(jax.random.fold_in(key, _AUGMENT_STREAM), i)
  return ctx.augmented(k, batch["x"])


def fisher_diagonal(ctx: Context, params: Any, model_state: Any,
                    batches: Batch, key: jax.Array,
                    kind: str = "exact") -> Any:
  """The diagonal Fisher information from per-example gradients.

  .. math::

    F_i = \\frac{1}{N} \\sum_{n=1}^{N} \\mathbb{E}_{y}\\Big[
          \\Big(\\frac{\\partial \\log p_\\theta(y \\mid x_n)}
                     {\\partial \\theta_i}\\Big)^2\\Big]

  where the expectation over ``y`` is, by ``kind``:

  * ``exact``: over all classes, weighted by the model's predicted
    probabilities (the true Fisher; ``C`` backward passes per example);
  * ``sampled``: one label drawn from the model's predictive distribution
    (an unbiased one-sample estimate of the true Fisher);
  * ``predicted``: the model's most probable label (argmax; the choice of
    van de Ven & Tolias's reference code for their 2019 results, with the
    whole training set). Not an estimate of the true Fisher: for a confident
    example the gradient at its own prediction is nearly 0, so this Fisher
    weighs the uncertain examples, and it is much smaller in scale;
  * ``empirical``: the true label (the "empirical Fisher"; not the Fisher of
    the model, see Kunstner et al. 2019).

  Gradients are per example (``jax.vmap(jax.grad(...))``) and squared before
  averaging; squaring a mini-batch gradient instead gives a different
  quantity whose scale depends on the batch size. With a training
  augmentation (``train.augment``) the examples are augmented as the
  training steps augment theirs (:func:`augmented_x`).

  Args:
    ctx: the run's context (model, stream info; logits are masked to the
      example's task in task-incremental streams, so the expectation runs
      over that task's classes).
    params: the parameters at which the Fisher is taken.
    model_state: non-trained variables (evaluated with ``train=False``).
    batches: stacked batches ``(nb, B, ...)`` with a ``mask`` (padding rows
      have mask 0 and do not count).
    key: PRNG key (``sampled`` labels; the training augmentation).
    kind: one of :data:`FISHER_TYPES`.

  Returns:
    A pytree like ``params``: the mean over the unmasked examples.
  """
  if kind not in FISHER_TYPES:
    raise ValueError(f"unknown Fisher type {kind!r}; valid: "
                     f"{list(FISHER_TYPES)}")
  logits_fn = _one_example_logits(ctx, model_state)

  def log_prob(p, x, task, label):
    return jax.nn.log_softmax(logits_fn(p, x, task))[label]

  grad_one = jax.grad(log_prob)
  per_example = jax.vmap(grad_one, in_axes=(None, 0, 0, 0))

  def weighted_sq_sum(x, task, labels, weights):
    # Σ_b w_b g_b² over the batch: the per-example gradients never leave
    # this function, so peak memory is one (B, P) gradient batch.
    g = per_example(params, x, task, labels)
    return jax.tree.map(
        lambda a: jnp.einsum("b,b...->...", weights, jnp.square(a)), g)

  def per_batch(batch, i):
    x, task, mask = augmented_x(ctx, key, batch, i), batch["task"], \
        batch["mask"]
    if kind == "empirical":
      tree = weighted_sq_sum(x, task, batch["y"], mask)
    else:
      logits = jax.vmap(logits_fn, in_axes=(None, 0, 0))(params, x, task)
      if kind == "sampled":
        k = jax.random.fold_in(key, i)
        labels = jax.random.categorical(k, logits, axis=-1)
        tree = weighted_sq_sum(x, task, labels, mask)
      elif kind == "predicted":  # masked logits: argmax within the task
        labels = jnp.argmax(logits, axis=-1)
        tree = weighted_sq_sum(x, task, labels, mask)
      else:  # exact: Σ_c p_c g_c², one class at a time (bounded memory)
        probs = jax.nn.softmax(logits, axis=-1) * mask[:, None]

        def over_classes(acc, c):
          labels = jnp.full(task.shape, c, jnp.int32)
          # Classes outside every example's task (masked logits) have
          # probability exactly 0: skipping them changes nothing and saves
          # most of the cost in task-incremental streams.
          t = jax.lax.cond(
              jnp.any(probs[:, c] > 0),
              lambda: weighted_sq_sum(x, task, labels, probs[:, c]),
              lambda: zeros_like_tree(params))
          return jax.tree.map(jnp.add, acc, t), None

        tree, _ = jax.lax.scan(over_classes, zeros_like_tree(params),
                               jnp.arange(logits.shape[-1]))
    return tree, jnp.sum(mask)

  return _scan_batches(per_batch, batches, zeros_like_tree(params))


def mas_importance(ctx: Context, params: Any, model_state: Any,
                   batches: Batch, key: jax.Array | None = None) -> Any:
  """MAS importance: mean absolute per-example gradient of ``‖f(x)‖²₂``.

  .. math::

    \\Omega_i = \\frac{1}{N} \\sum_{n=1}^{N} \\Big|
                \\frac{\\partial\\, \\lVert f_\\theta(x_n) \\rVert_2^2}
                      {\\partial \\theta_i} \\Big|

  ``f`` is the model's output (logits). In task-incremental streams only the
  example's task's logits count (the others are masked constants). With a
  training augmentation the examples are augmented (``key`` needed), as in
  :func:`fisher_diagonal`.
  """
  logits_fn = _one_example_logits(ctx, model_state)
  table = jnp.asarray(ctx.info.task_classes, bool)
  masked = ctx.mask_task_logits

  def sq_norm(p, x, task):
    out = logits_fn(p, x, task)
    if masked:
      out = jnp.where(table[jnp.clip(task, 0, table.shape[0] - 1)], out, 0.)
    return jnp.sum(jnp.square(out))

  per_example = jax.vmap(jax.grad(sq_norm), in_axes=(None, 0, 0))

  def per_batch(batch, i):
    g = per_example(params, augmented_x(ctx, key, batch, i), batch["task"])
    tree = jax.tree.map(
        lambda a: jnp.einsum("b,b...->...", batch["mask"], jnp.abs(a)), g)
    return tree, jnp.sum(batch["mask"])

  return _scan_batches(per_batch, batches, zeros_like_tree(params))


def importance_batches(exp: Experience, batch_size: int, max_examples: int,
                       seed: int, train_size: int) -> Batch:
  """An experience's examples for an importance estimate, on the device.

  With ``max_examples > 0`` the number of batches is fixed at
  ``ceil(min(max_examples, train_size) / batch_size)`` (``train_size``: the
  stream's largest experience; padded with mask-0 batches, which the
  estimators skip), so the jitted estimator compiles once for the stream.
  """
  b = experience_batches(exp, batch_size, max_examples=max_examples,
                         seed=seed)
  if max_examples > 0:
    want = math.ceil(min(max_examples, train_size) / batch_size)
    have = b["y"].shape[0]
    if have < want:
      b = {k: np.concatenate(
          [v, np.zeros((want - have,) + v.shape[1:], v.dtype)])
           for k, v in b.items()}
  return jax.device_put(b)


def consolidation_hook(consolidate: Callable, batch_size: int,
                       max_examples: int, seed: int) -> Callable:
  """The ``after_experience`` of an importance-weighted penalty (EWC, online
  EWC, MAS): draws the experience's estimation batches and folds them into
  the strategy state with ``consolidate(ctx, sstate, params, model_state,
  batches, key)``. Batches and key depend on ``seed`` and the experience's
  index only, so a resumed run re-estimates the same importance."""

  def after_experience(ctx, state, experience):
    i = experience.index
    batches = importance_batches(experience, batch_size, max_examples,
                                 seed + i, ctx.info.train_size)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    ss = consolidate(ctx, state.strategy, state.params, state.model_state,
                     batches, key)
    return state.replace(strategy=ss)

  return after_experience
