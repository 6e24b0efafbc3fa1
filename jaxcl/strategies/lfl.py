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

The penalty and the copy of ``θ_o`` are :mod:`feature_distillation`'s
(its ``'mse'`` mode with ``α = λ_e``); LFL adds the frozen output layer.

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

import jax

from jaxcl import checks
from jaxcl.strategies._freeze import require_part, restore_part, zero_part
from jaxcl.strategies.feature_distillation import (
    FeatureDistillationState, feature_distance, feature_distillation)
from jaxcl.strategy import Strategy, frozen_update

__all__ = ["lfl", "LFLState", "feature_distance"]

HEAD = "head"

# LFL's state is feature distillation's: θ_o (``prev``, ``prev_state``) and
# whether an experience has ended (``ready``: the head is frozen from then).
LFLState = FeatureDistillationState


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
  # The penalty and θ_o's bookkeeping are feature distillation's, MSE form.
  distil = feature_distillation(alpha=float(lambda_e), mode="mse")

  def init(ctx, key, params):
    require_part("lfl", params, HEAD, "output layer")
    c = ctx.info.num_classes
    if any(leaf.ndim and leaf.shape[-1] > c
           for leaf in jax.tree.leaves(params[HEAD])):
      raise ValueError(
          "lfl freezes the whole output layer after the first experience; "
          "this model has one head per task, so every later task's head "
          "would keep its initial weights. Use a single head "
          "(model.multi_head=False)")
    return distil.init(ctx, key, params)

  def freeze_grads(ctx, sstate, grads):
    del ctx
    return zero_part(grads, HEAD, sstate.ready)

  def project_params(ctx, sstate, params):
    del ctx
    return restore_part(params, sstate.prev, HEAD, sstate.ready)

  return Strategy(init=init, loss=distil.loss,
                  update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads, project_params=project_params,
                  after_experience=distil.after_experience, name="lfl")
