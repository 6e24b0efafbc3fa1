"""Continual learning with hypernetworks (von Oswald et al. 2020).

A hypernetwork (the ``hypernet`` model, :mod:`jaxcl.models.hypernet`) maps
a learned task embedding ``e_t`` to all weights of a target network. While
learning task ``T`` only the hypernetwork's parameters ``Θ_h`` and the
current embedding ``e_T`` are trained, and an output regulariser keeps the
weights generated for the earlier embeddings where they were before the
task started:

.. math::

  \\mathcal{L}(\\Theta_h, e_T) = \\mathcal{L}_{\\text{task}}(\\Theta_h, e_T)
    + \\frac{\\beta}{T - 1} \\sum_{t < T}
      \\big\\lVert f_h(e_t, \\Theta_h) - f_h(e_t, \\Theta_h^*) \\big\\rVert_2^2

(their eq. 2). ``β`` is ``beta``. With ``lookahead=True`` the regulariser
is evaluated at ``Θ_h + ΔΘ_h``, where ``ΔΘ_h`` is the update the optimiser
would make from the task loss alone, held constant (the paper's look-ahead,
on by default in the reference code, chrhenning/hypercl
``no_lookahead=False``): the penalty then pushes against the part of the
coming task step that would move the old tasks' weights.
The targets ``f_h(e_t, Θ_h^*)`` are stored, not recomputed: at the end of
each experience the weights generated for every learned embedding are
written into ``HypernetworkState.targets``, a ``(num_embeddings, P)`` array
allocated at ``init`` (``P``: target parameters), with a mask of filled
slots. The embeddings of learned tasks are frozen (their gradients are
zeroed), as in the paper's experiments.

Which embedding an example uses:

* task-incremental streams: its task id;
* class- and domain-incremental streams (no task id): the experience's
  index while training (``prepare_batch`` writes it into the batch's
  ``task``), and at test time the task is *inferred*: the weights of every
  learned embedding are generated and the one whose prediction has the
  lowest entropy is used (the paper's "HNET+ENT"),

  .. math::  \\hat t(x) = \\arg\\min_{t} \\; H\\big(
     \\mathrm{softmax}(f(x; f_h(e_t, \\Theta_h)))\\big).

.. warning::

  The regulariser is the *sum* of squared differences over all ``P``
  generated weights (as in the paper, whose ``β = 0.01`` on Split and
  Permuted MNIST assumes it), not a mean: ``β`` does not transfer across
  target sizes unchanged. With ``reg_samples=0`` each step generates the
  weights of every slot for the regulariser (fixed shapes), so a step costs
  about ``num_embeddings`` hypernetwork passes more than Naive;
  ``reg_samples=k`` costs ``k`` passes (an unbiased estimate of the same
  regulariser, noisier).

References:
  von Oswald, Henning, Sacramento & Grewe, `Continual learning with
  hypernetworks <https://arxiv.org/abs/1906.00695>`_, ICLR 2020.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.models.hypernet import HyperNetwork
from jaxcl.strategy import Strategy

__all__ = ["HypernetworkState", "hypernetwork", "generated_weights"]


class HypernetworkState(NamedTuple):
  targets: jax.Array  # float32 (num_embeddings, P): f_h(e_t, Θ_h*) per slot
  filled: jax.Array   # bool (num_embeddings,): slot t's task was learned
  current: jax.Array  # int32 scalar: embedding of the current experience
  count: jax.Array    # int32 scalar: steps taken (keys for reg_samples)
  key: jax.Array      # uint32[2]: base key of the regulariser's sampling


def _check_model(ctx) -> HyperNetwork:
  model = ctx.model
  if not isinstance(model, HyperNetwork):
    raise ValueError("the hypernetwork strategy needs the 'hypernet' model "
                     f"(config.model.name='hypernet'), got {type(model).__name__}")
  info = ctx.info
  need = info.num_tasks if info.kind == "task" else info.num_experiences
  if model.num_embeddings < need:
    raise ValueError(
        f"hypernet has num_embeddings={model.num_embeddings} but the "
        f"{info.kind}-incremental stream needs {need} (one per "
        f"{'task' if info.kind == 'task' else 'experience'}); set "
        "config.model.hypernet.num_embeddings")
  return model


def generated_weights(ctx, params, ids: jax.Array) -> jax.Array:
  """Flat target weights ``(n, P)`` the hypernetwork gives embeddings
  ``ids``: the weights the target network runs with, i.e. the generated
  values times the model's fixed ``weight_scales`` (``to_weights``). The
  regulariser acts on these, as the paper's ``f_h(e_t, Θ_h)`` are the
  target weights; on the raw values it would be ``fan_in`` times stiffer on
  the kernels (784x on an MNIST first layer) than the paper's ``β``
  assumes."""
  raw = ctx.model_apply({"params": params}, ids,
                        method=HyperNetwork.generate)
  return ctx.model.to_weights(raw)


def hypernetwork(beta: float = 0.01, reg_samples: int = 0,
                 lookahead: bool = False) -> Strategy:
  """Hypernetwork output regulariser, frozen old embeddings, task inference.

  Args:
    beta: regulariser strength ``β`` (>= 0).
    reg_samples: 0 regularises every learned embedding at every step; ``k >
      0`` draws ``k`` learned embeddings per step (with replacement) and
      averages over them, an unbiased estimate of the same mean at ``k``
      hypernetwork passes per step instead of ``num_embeddings`` (the
      paper's stochastic regulariser for long streams).

  Raises:
    ValueError: negative ``beta``; at ``init``, a model that is not the
      hypernetwork or has too few embeddings.
  """
  checks.nonnegative("hypernetwork: beta", beta)
  if not isinstance(lookahead, bool):
    raise ValueError(f"hypernetwork: lookahead must be True or False, got "
                     f"{lookahead!r}")
  if not checks.is_whole(reg_samples) or reg_samples < 0:
    raise ValueError(f"hypernetwork: reg_samples must be an int >= 0 (0: "
                     f"all learned embeddings), got {reg_samples!r}")

  def init(ctx, key, params):
    del params
    model = _check_model(ctx)
    n = model.num_embeddings
    return HypernetworkState(
        jnp.zeros((n, model.num_target_params), jnp.float32),
        jnp.zeros((n,), bool), jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32), key)

  def embedding_of(ctx, experience) -> int:
    return experience.task_id if ctx.info.kind == "task" else experience.index

  def before_experience(ctx, state, experience):
    ss = state.strategy._replace(
        current=jnp.asarray(embedding_of(ctx, experience), jnp.int32))
    return state.replace(strategy=ss)

  def prepare_batch(ctx, sstate, batch, key):
    del key
    if ctx.info.kind == "task":
      return batch
    # No task id in the stream: train the current experience's embedding.
    return {**batch, "task": jnp.full_like(batch["task"], sstate.current)}

  def regulariser(ctx, sstate, params, batch):
    del batch
    n = sstate.filled.shape[0]
    # Old embeddings are frozen (see update_grads); stop_gradient keeps the
    # regulariser from pulling on them even before the gradient mask.
    p = {**params, "task_embeddings": jax.lax.stop_gradient(
        params["task_embeddings"])}
    w = sstate.filled.astype(jnp.float32)
    if reg_samples == 0:
      gen = generated_weights(ctx, p, jnp.arange(n))
      sq = jnp.sum(jnp.square(gen - sstate.targets), axis=-1)  # (n,)
      return beta * jnp.sum(w * sq) / jnp.maximum(jnp.sum(w), 1.0)
    # k learned slots drawn uniformly: E[mean of sampled] = mean over slots.
    key = jax.random.fold_in(sstate.key, sstate.count)
    ids = jax.random.choice(key, n, (reg_samples,),
                            p=w / jnp.maximum(jnp.sum(w), 1.0))
    gen = generated_weights(ctx, p, ids)
    sq = jnp.sum(jnp.square(gen - sstate.targets[ids]), axis=-1)
    return beta * jnp.where(jnp.any(sstate.filled), jnp.mean(sq), 0.0)

  def loss(ctx, sstate, params, batch, logits):
    del logits
    return regulariser(ctx, sstate, params, batch)

  def after_step(ctx, sstate, info):
    del ctx, info
    return sstate._replace(count=sstate.count + 1)

  def update_grads(ctx, sstate, grads, params, batch, key):
    del ctx, params, batch, key
    # Learned tasks' embeddings stay fixed: their generated weights are
    # the regulariser's targets.
    g = grads["task_embeddings"]
    g = jnp.where(sstate.filled[:, None], 0.0, g)
    return {**grads, "task_embeddings": g}

  # Compiled once per factory (ctx static); the state is an argument.
  @functools.partial(jax.jit, static_argnums=0)
  def consolidate(ctx, ss, params, i):
    # Refresh the targets of every slot (Θ_h* = the parameters now); only
    # the filled ones are regularised.
    targets = generated_weights(ctx, params, jnp.arange(ss.filled.shape[0]))
    return ss._replace(targets=targets, filled=ss.filled.at[i].set(True))

  def after_experience(ctx, state, experience):
    ss = consolidate(ctx, state.strategy, state.params,
                     jnp.int32(embedding_of(ctx, experience)))
    return state.replace(strategy=ss)

  def predict(ctx, sstate, params, model_state, x, task):
    if ctx.info.kind == "task":
      return ctx.logits(params, model_state, x, task)
    n = sstate.filled.shape[0]
    # Raw generated values: HyperNetwork.target applies the scales itself.
    flats = ctx.model_apply({"params": params}, jnp.arange(n),
                            method=HyperNetwork.generate)
    run = lambda f: ctx.model_apply({"params": params}, f, x,
                                    method=HyperNetwork.target)
    logits = jax.vmap(run)(flats)  # (n, B, C)
    logp = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # (n, B)
    # Only learned embeddings compete; before any, embedding 0 predicts.
    known = sstate.filled | (jnp.arange(n) == 0) & ~jnp.any(sstate.filled)
    entropy = jnp.where(known[:, None], entropy, jnp.inf)
    best = jnp.argmin(entropy, axis=0)  # (B,)
    return jnp.take_along_axis(logits, best[None, :, None], axis=0)[0]

  # The same regulariser, either in the loss or evaluated at Θ + ΔΘ.
  penalty = (dict(lookahead_loss=regulariser) if lookahead
             else dict(loss=loss))
  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, **penalty,
                  update_grads=update_grads, after_step=after_step,
                  after_experience=after_experience, predict=predict,
                  name="hypernetwork")
