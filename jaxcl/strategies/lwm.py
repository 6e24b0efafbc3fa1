"""LwM: learning without memorizing, by attention distillation.

Dhar et al. (2019) add to LwF's distillation a term that keeps *where* the
network looks. For an input ``I``, Grad-CAM (Selvaraju et al. 2017) gives
an attention map over the last convolutional layer's ``K`` feature maps
``A_k``, for a class ``c``:

.. math::
   \\alpha_k = \\frac{1}{HW} \\sum_{h,w}
     \\frac{\\partial y_c}{\\partial A_{k,hw}}, \\qquad
   Q = \\mathrm{ReLU}\\Big(\\sum_k \\alpha_k A_k\\Big).

The attention distillation loss compares the previous model's map with the
current model's, both vectorised and L2-normalised (eq. 2):

.. math::
   L_{AD} = \\Big\\lVert \\frac{Q_{t-1}}{\\lVert Q_{t-1} \\rVert_2}
                      - \\frac{Q_t}{\\lVert Q_t \\rVert_2} \\Big\\rVert_1,

with ``c`` the old class the previous model scores highest. The objective
(eq. 3) is ``L_C + β L_D + γ L_AD``: ``L_D`` is LwF's distillation of the
old classes' outputs (:func:`jaxcl.strategies.lwf.distillation`, at
temperature ``T``), and ``L_C`` the engine's task loss. Like LwF it keeps
no exemplar. ``L_AD`` is differentiated through the current model's
Grad-CAM map: its gradient is second order (a gradient of a gradient),
which JAX takes directly.

Implementation notes, against FACIL's ``lwm.py`` (Masana et al. 2022),
which we read but do not follow in two places:

* FACIL computes both maps with hooks that ``detach`` the activations and
  gradients and combines them under ``no_grad``, so its ``L_AD`` has no
  gradient: the attention term does not train. Here it does (the paper's
  loss; a test checks its gradient against finite differences).
* FACIL takes each model's own top class, scored as
  ``logits[:, class_indices].mean()``, which mixes every row's class into
  every row's map. Here each row's map is for its own class, the
  previous model's top old class, in both models.
* ``L_D`` is the cross-entropy of the softmaxes at ``T = 2`` (FACIL's
  ``exp=1/2`` is the same; its ``1e-5`` smoothing is left out). The maps
  run in evaluation mode, as FACIL's; the current model's uses the
  previous model's batch-norm statistics (the loss hook does not see the
  current ones; models without batch norm are unaffected).

``layer`` names the convolutional layer (a module path, as in latent
replay: ``backbone/Conv_1`` is the small CNN's last; ResNet-18's last
block is ``backbone/...``, see :func:`jaxcl.strategies.latent_replay.
layer_names`). Class- and domain-incremental streams; with task ids, use
LwF's per-task distillation.

References:
  Dhar, Singh, Peng, Wu & Chellappa, `Learning without memorizing
  <https://arxiv.org/abs/1811.08051>`_, CVPR 2019.
  Selvaraju et al., `Grad-CAM: visual explanations from deep networks via
  gradient-based localization <https://arxiv.org/abs/1610.02391>`_,
  ICCV 2017.
  Masana et al., `Class-incremental learning: survey and performance
  evaluation on image classification
  <https://arxiv.org/abs/2010.15277>`_, TPAMI 2022 (FACIL).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.strategies.latent_replay import split_model
from jaxcl.strategies.lwf import distillation
from jaxcl.strategy import Strategy
from jaxcl.train import init_variables

__all__ = ["LwMState", "lwm", "gradcam", "attention_distillation"]

_NEG = -1e9


class LwMState(NamedTuple):
  teacher: Any             # params of the model after the last experience
  teacher_state: Any       # its model state
  old_classes: jax.Array   # bool (C,): classes of earlier experiences


def gradcam(ctx, layer: str, params, model_state, x: jax.Array,
            task: jax.Array, cls: jax.Array) -> jax.Array:
  """Grad-CAM maps ``(B, H, W)`` at ``layer`` for each row's class ``cls``.

  The layer's output ``A`` gets an added zero ``δ``; the gradient of the
  rows' class scores with respect to ``δ`` is ``∂y_c/∂A`` (rows do not
  interact in evaluation mode). Differentiable in ``params``.
  """
  target = tuple(layer.split("/"))

  def scores(delta):
    box = []

    def add(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and \
          tuple(context.module.path) == target and not box:
        box.append(out)
        return out + delta.astype(out.dtype)
      return out

    with nn.intercept_methods(add):
      logits = ctx.logits(params, model_state, x, task)
    y = jnp.take_along_axis(logits.astype(jnp.float32), cls[:, None], 1)
    return jnp.sum(y), box[0]

  shape = jax.eval_shape(lambda: scores(jnp.zeros(()))[1]).shape
  g, a = jax.grad(scores, has_aux=True)(jnp.zeros(shape, jnp.float32))
  alpha = jnp.mean(g, axis=(1, 2))                       # (B, K)
  return jax.nn.relu(jnp.einsum("bhwk,bk->bhw",
                                a.astype(jnp.float32), alpha))


def attention_distillation(q: jax.Array, q_old: jax.Array,
                           mask: jax.Array, eps: float = 1e-12
                           ) -> jax.Array:
  """Mask-weighted mean over rows of ``‖q̂_old − q̂‖₁``, ``q̂ = q /
  max(‖q‖₂, eps)`` over each row's vectorised map (PyTorch's
  ``normalize``; a map of zeros stays zero, with a finite gradient)."""
  def unit(m):
    m = m.reshape(m.shape[0], -1)
    n2 = jnp.sum(m * m, axis=-1, keepdims=True)
    return m / jnp.sqrt(jnp.maximum(n2, eps * eps))

  per = jnp.sum(jnp.abs(unit(q_old) - unit(q)), axis=-1)
  return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lwm(layer: str = "backbone/Conv_1", beta: float = 1.0,
        gamma: float = 1.0, temperature: float = 2.0) -> Strategy:
  """Learning without Memorizing.

  Args:
    layer: the convolutional layer of the Grad-CAM maps (a module path;
      the default is the ``cnn`` model's last convolution).
    beta: weight ``β`` of the distillation ``L_D`` (FACIL: 1).
    gamma: weight ``γ`` of the attention distillation ``L_AD`` (FACIL: 1;
      0 leaves LwF's loss).
    temperature: ``T`` of ``L_D``.

  Raises:
    ValueError: on a bad argument; at ``init``, on an unknown layer (the
    valid names are listed), a layer whose output is not a feature map
    ``(H, W, C)``, or a task-incremental stream.
  """
  if not isinstance(layer, str) or not layer:
    raise ValueError(f"lwm: layer must be a module path such as "
                     f"'backbone/Conv_1', got {layer!r}")
  checks.nonnegative("lwm: beta", beta)
  checks.nonnegative("lwm: gamma", gamma)
  checks.positive("lwm: temperature", temperature)

  def init(ctx, key, params):
    info = ctx.info
    if info.kind == "task":
      raise ValueError(
          "lwm distils the old classes' outputs and attention over one "
          "head: use a class- or domain-incremental stream (with task "
          "ids, LwF distils each task's head)")
    split = split_model(ctx, layer)   # raises on unknown names
    if len(split.latent_shape) != 3:
      raise ValueError(
          f"lwm: layer {layer!r} gives activations of shape "
          f"{split.latent_shape}; Grad-CAM needs a convolutional layer's "
          "feature maps (H, W, C), e.g. the cnn model's 'backbone/Conv_1'")
    _, variables = init_variables(ctx, key)
    return LwMState(jax.tree.map(jnp.copy, params), variables,
                    jnp.zeros((info.num_classes,), bool))

  def loss(ctx, sstate, params, batch, logits):
    x, task, mask = batch["x"], batch["task"], batch["mask"]
    old = sstate.old_classes
    t_logits = jax.lax.stop_gradient(ctx.logits(
        sstate.teacher, sstate.teacher_state, x, task))
    kd = distillation(logits, t_logits, old, mask, temperature)
    if gamma == 0:
      return beta * kd

    def attention(params):
      # The previous model's top old class, for both maps.
      cls = jnp.argmax(jnp.where(old, t_logits, _NEG), axis=-1)
      q_old = jax.lax.stop_gradient(gradcam(
          ctx, layer, sstate.teacher, sstate.teacher_state, x, task, cls))
      q = gradcam(ctx, layer, params, sstate.teacher_state, x, task, cls)
      return attention_distillation(q, q_old, mask)

    # No old class (the first experience): no maps to compute.
    ad = jax.lax.cond(jnp.any(old), attention,
                      lambda p: jnp.zeros((), jnp.float32), params)
    return beta * kd + gamma * ad

  @jax.jit
  def freeze(ss, params, model_state, classes):
    return LwMState(params, model_state, ss.old_classes | classes)

  def after_experience(ctx, state, experience):
    classes = np.zeros((ctx.info.num_classes,), bool)
    classes[list(experience.classes)] = True
    return state.replace(strategy=freeze(state.strategy, state.params,
                                         state.model_state, classes))

  return Strategy(init=init, loss=loss, after_experience=after_experience,
                  name="lwm")
