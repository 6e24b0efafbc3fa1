"""Less-Forgetful Learning (LFL): keep the features, freeze the classifier.

Jung et al. (2016) learn a new domain while keeping two things of the
network trained before (``θ_o``): its decision boundaries, by freezing the
output layer after the first experience, and its feature space, by a
Euclidean penalty between the new and the old network's features (the
backbone's output, the input of the output layer) on the current data:

.. math::
   \\mathcal{L}(\\theta) = \\mathcal{L}_{\\text{task}}(\\theta)
     + \\lambda_e \\, \\frac{1}{B\\,D} \\sum_{b=1}^{B}
       \\lVert f_\\theta(x_b) - f_{\\theta_o}(x_b) \\rVert_2^2 ,
   \\qquad W_{\\text{head}} = W_{\\text{head}}^{o} .

The penalty is normalised as Avalanche's ``LFLPlugin`` (a mean squared
error over rows and features; the paper's ``½ ||·||²`` summed over
features is ``λ_e`` scaled by ``2 / D``), and ``θ_o`` is the model at the
end of the previous experience, as there. The output layer (the model's
``head`` parameters) is frozen by zeroing its gradient and, after each
update, restoring it from ``θ_o``, so momentum or weight decay cannot move
it either (``θ_o``'s head is the first experience's, since it is frozen
from then on). The old network's features are taken in evaluation mode;
the current network's in training mode (the ``loss`` hook does not see
the current model state, as for :mod:`jaxcl.strategies.lwf`; for models
without batch statistics the two modes agree).

LFL is a method for domain-incremental streams (the paper's domain
expansion; Avalanche's reference run is Permuted MNIST): with the output
layer frozen after the first experience, a class first seen later keeps
its initial output weights.

References:
  Jung, Ju, Jung & Kim, `Less-forgetting learning in deep neural networks
  <https://arxiv.org/abs/1607.00122>`_, arXiv 2016 (AAAI 2018: *Less-
  forgetful learning for domain expansion in deep neural networks*).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.strategies._freeze import require_part, restore_part, zero_part
from jaxcl.strategy import Strategy, frozen_update
from jaxcl.train import init_variables

__all__ = ["lfl", "LFLState", "feature_distance"]

HEAD = "head"


class LFLState(NamedTuple):
  prev: Any            # like params: θ_o, the model as the last experience ended
  prev_state: Any      # like model_state: its non-trained variables
  frozen: jax.Array    # bool scalar: an experience has ended


def feature_distance(f: jax.Array, f_old: jax.Array,
                     mask: jax.Array) -> jax.Array:
  """The mean over features of ``(f - f_old)²``, averaged over the rows
  with ``mask`` (a per-row weight): ``torch.nn.functional.mse_loss`` on
  the valid rows."""
  per_row = jnp.mean(jnp.square(f - f_old).reshape(f.shape[0], -1), axis=1)
  return jnp.sum(mask * per_row) / jnp.maximum(jnp.sum(mask), 1.0)


def lfl(lambda_e: float = 1e-4) -> Strategy:
  """Less-Forgetful Learning.

  Args:
    lambda_e: ``λ_e`` (>= 0), the weight of the feature penalty (1e-4, the
      value of Avalanche's reference run on Permuted MNIST).

  Raises:
    ValueError: a bad ``lambda_e``; at ``init``, a model without a ``head``
    (the output layer it freezes) or with one head per task.
  """
  checks.nonnegative("lfl: lambda_e", lambda_e)
  lam = float(lambda_e)

  def init(ctx, key, params):
    del key
    require_part("lfl", params, HEAD, "output layer")
    c = ctx.info.num_classes
    if any(leaf.ndim and leaf.shape[-1] > c
           for leaf in jax.tree.leaves(params[HEAD])):
      raise ValueError(
          "lfl freezes the whole output layer after the first experience; "
          "this model has one head per task, so every later task's head "
          "would keep its initial weights. Use a single head "
          "(model.multi_head=False)")
    _, model_state = init_variables(ctx, jax.random.PRNGKey(0))
    # A copy: the loop donates the state (prev and params must not alias).
    return LFLState(jax.tree.map(jnp.copy, params), model_state,
                    jnp.zeros((), bool))

  def features(ctx, params, model_state, batch, train):
    return ctx.apply(params, model_state, batch["x"], batch["task"],
                     train=train, features=True)[0]

  def loss(ctx, sstate, params, batch, logits):
    del logits

    def penalty():
      old = jax.lax.stop_gradient(
          features(ctx, sstate.prev, sstate.prev_state, batch, False))
      new = features(ctx, params, sstate.prev_state, batch, True)
      return lam * feature_distance(new, old, batch["mask"])

    # No penalty (and no second forward pass) in the first experience.
    return jax.lax.cond(sstate.frozen, penalty,
                        lambda: jnp.zeros((), jnp.float32))

  def freeze_grads(ctx, sstate, grads):
    del ctx
    return zero_part(grads, HEAD, sstate.frozen)

  def project_params(ctx, sstate, params):
    del ctx
    return restore_part(params, sstate.prev, HEAD, sstate.frozen)

  # Compiled once per factory; jit outputs are fresh buffers, so θ_o never
  # aliases the (donated) parameters.
  @jax.jit
  def freeze(params, model_state):
    return LFLState(params, model_state, jnp.ones((), bool))

  def after_experience(ctx, state, experience):
    del ctx, experience
    return state.replace(strategy=freeze(state.params, state.model_state))

  return Strategy(init=init, loss=loss,
                  update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads, project_params=project_params,
                  after_experience=after_experience, name="lfl")
