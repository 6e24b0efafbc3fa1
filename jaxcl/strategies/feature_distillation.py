"""Feature distillation: keep the previous model's features on new data.

A penalty that holds the backbone's features ``f`` (the input of the output
layer) near those of the model the last experience ended with, ``f*``, on
every training row of the batch (the new data, and the replayed rows when
a replay member is chained before it):

.. math::
   \\mathcal{L}_{fd} = \\alpha \\cdot \\frac{1}{B}\\sum_{b=1}^{B}
       \\big(1 - \\cos(f(x_b), f^*(x_b))\\big)
   \\quad (\\text{mode } \\texttt{'cosine'}),

   \\mathcal{L}_{fd} = \\alpha \\cdot \\frac{1}{B\\,D}\\sum_{b=1}^{B}
       \\lVert f(x_b) - f^*(x_b) \\rVert_2^2
   \\quad (\\text{mode } \\texttt{'mse'}).

The cosine form is LUCIR's less-forget constraint (Hou et al. 2019, Eq. 6)
without its cosine classifier, its adaptive weight or its frozen old
weights; the squared form is LFL's feature penalty (Jung et al. 2016)
without LFL's frozen output layer. Followed: Avalanche's
``FeatureDistillationPlugin`` (``alpha`` 1, ``mode`` ``'cosine'`` or
``'mse'``; the previous model is copied after each experience and nothing
is added during the first). Its ``'mse'`` branch calls
``F.mse_loss(..., dim=1)``, which PyTorch rejects; the mean over rows and
features here is what ``F.mse_loss`` computes without that argument.

Deviations: the previous model's features are taken in evaluation mode
(Avalanche runs its copy in the mode it was copied in, training mode,
so a batch-norm model would distil batch statistics); the current model's
in training mode, as the step's own forward pass (the ``loss`` hook does
not see the current model state, as for :mod:`jaxcl.strategies.lwf`).
Rows are weighted by the batch's mask (padding rows count for nothing).
Chain it with a replay member (``replay+feature_distillation``) as
Avalanche users add the plugin to a replay strategy.

References:
  Hou, Pan, Loy, Wang & Lin, `Learning a Unified Classifier Incrementally
  via Rebalancing <https://openaccess.thecvf.com/content_CVPR_2019/html/
  Hou_Learning_a_Unified_Classifier_Incrementally_via_Rebalancing_CVPR_2019_paper.html>`_,
  CVPR 2019 (Eq. 6).
  Jung, Ju, Jung & Kim, `Less-forgetting learning in deep neural networks
  <https://arxiv.org/abs/1607.00122>`_, arXiv 2016.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.strategies.lucir import less_forget
from jaxcl.strategy import Strategy
from jaxcl.train import init_variables

__all__ = ["feature_distillation", "FeatureDistillationState", "MODES",
           "feature_distance"]

MODES = ("cosine", "mse")


class FeatureDistillationState(NamedTuple):
  prev: Any            # like params: f*, the model as the last experience ended
  prev_state: Any      # like model_state: its non-trained variables
  ready: jax.Array     # bool scalar: an experience has ended


def feature_distance(f: jax.Array, f_old: jax.Array,
                     mask: jax.Array) -> jax.Array:
  """The mean over features of ``(f - f_old)²``, averaged over the rows
  with ``mask`` (a per-row weight): ``torch.nn.functional.mse_loss`` on
  the valid rows (the ``'mse'`` mode, and LFL's penalty)."""
  per_row = jnp.mean(jnp.square(f - f_old).reshape(f.shape[0], -1), axis=1)
  return jnp.sum(mask * per_row) / jnp.maximum(jnp.sum(mask), 1.0)


def feature_distillation(alpha: float = 1.0,
                         mode: str = "cosine") -> Strategy:
  """Feature distillation from the previous model.

  Args:
    alpha: ``α >= 0``, the penalty's weight (1, Avalanche's default).
    mode: ``'cosine'`` (``1 - cos``, Avalanche's default) or ``'mse'``
      (the mean squared difference over rows and features).

  Raises:
    ValueError: a bad ``alpha`` or ``mode``.
  """
  checks.nonnegative("feature_distillation: alpha", alpha)
  checks.one_of("feature_distillation: mode", mode, MODES)
  alpha = float(alpha)

  def init(ctx, key, params):
    del key
    _, model_state = init_variables(ctx, jax.random.PRNGKey(0))
    # A copy: the loop donates the state (prev and params must not alias).
    return FeatureDistillationState(jax.tree.map(jnp.copy, params),
                                    model_state, jnp.zeros((), bool))

  def features(ctx, params, model_state, batch, train):
    f, _ = ctx.apply(params, model_state, batch["x"], batch["task"],
                     train=train, features=True, mask=batch["mask"])
    return f.reshape(f.shape[0], -1).astype(jnp.float32)

  def loss(ctx, sstate, params, batch, logits):
    del logits

    def penalty():
      old = jax.lax.stop_gradient(
          features(ctx, sstate.prev, sstate.prev_state, batch, False))
      new = features(ctx, params, sstate.prev_state, batch, True)
      if mode == "cosine":
        return alpha * less_forget(new, old, batch["mask"])
      return alpha * feature_distance(new, old, batch["mask"])

    # No penalty (and no second forward pass) in the first experience.
    return jax.lax.cond(sstate.ready, penalty,
                        lambda: jnp.zeros((), jnp.float32))

  # Compiled once per factory; jit outputs are fresh buffers, so f* never
  # aliases the (donated) parameters.
  @jax.jit
  def freeze(params, model_state):
    return FeatureDistillationState(params, model_state, jnp.ones((), bool))

  def after_experience(ctx, state, experience):
    del ctx, experience
    return state.replace(strategy=freeze(state.params, state.model_state))

  return Strategy(init=init, loss=loss, after_experience=after_experience,
                  name="feature_distillation")
