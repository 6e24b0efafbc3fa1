"""Latent replay: store and replay activations of an intermediate layer.

Pellegrini et al. (2020) split the network at a chosen layer ``l``: the
lower part :math:`h = g_{\\le l}(x)` is frozen (or trained slowly) after the
first experience, and the memory stores latent activations :math:`h`
instead of inputs, so replayed examples only run through the upper part
:math:`f_{> l}`. Each step adds a loss on ``batch_size`` latents drawn from
memory:

.. math::
   \\mathcal{L} = \\frac{1}{|B|}\\sum_{(x,y)\\in B} \\ell(f_{>l}(g_{\\le l}(x)), y)
     + \\frac{1}{|M_B|} \\sum_{(h, y) \\in M_B} \\ell(f_{>l}(h), y),

and after the first experience the lower part's gradients are multiplied
by ``lower_lr_scale`` (0: frozen, as in the paper's plain latent replay;
> 0: slowed). Frozen means frozen: the lower part is also restored after
every update from its copy at the experience's start (as
:mod:`jaxcl.strategies._freeze` does), because weight decay, and momentum
carried over with ``train.reset_optimizer=False``, move a parameter whose
gradient is zero, and the stored latents would go stale (session 32: SGD
with weight decay 0.01 moved the first experience's latents by 9 % of
their norm over four experiences; Adam's carried-over moments by 18 %).
The frozen part's mask is the strategy's ``freeze_grads``, so in a chain
A-GEM and GEM project in the upper part's subspace and MIR and RAR add no
gradient to the lower part, on either side of it.
Slowed (``0 < lower_lr_scale < 1``) scales the gradient only: weight decay
and carried-over momentum act on the lower part at the full rate. At the end of each experience the memory becomes
experience-balanced (:func:`jaxcl.buffers.experience_balanced_add`):
the experience's examples go through the (now fixed) lower part, and a
uniform random ``mem_size // i`` of their latents is kept. A latent of
``d`` floats costs ``d / prod(input_shape)`` of a stored input, so the same
bytes hold more latents (784 / 100 = 7.8x for MNIST at an MLP's 100-unit
layer).

``layer`` names a flax submodule by its path, ``/``-joined (for
``mlp`` with widths (100, 100): ``backbone`` (the features, i.e.
``ctx.apply(..., features=True)``), ``backbone/Dense_0``,
``backbone/Dense_1``); its output is the latent (for ``Dense_*`` the
pre-activation). The split works for any model by intercepting that
module's call with :func:`flax.linen.intercept_methods`:
:func:`split_model` returns the lower function (the module's output) and
the upper function (the model's logits with the module's output replaced
by a given latent). The parameters of the modules that finish before the
split (in call order) are the lower part. The loss on replayed latents is
computed in the ``loss`` hook (the latents travel in the batch dict as
``latent_x`` / ``latent_y`` / ``latent_task`` / ``latent_mask``); it runs
the model with the model state (e.g. batch-norm statistics) as of the start
of the experience.

References:
  Pellegrini et al., `Latent replay for real-time continual learning
  <https://arxiv.org/abs/1912.01100>`_, IROS 2020.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies._freeze import restore_masked
from jaxcl.strategy import Strategy, frozen_update, mark_experience_start
from jaxcl.train import device_experience, init_variables

__all__ = ["latent_replay", "LatentReplayState", "Split", "split_model",
           "layer_names", "experience_latents", "lower_copy",
           "restore_lower"]


def _trace_calls(ctx) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  """Module ``__call__`` completions in order: (path, output shape)."""
  calls = []

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and hasattr(out, "shape"):
      calls.append((tuple(context.module.path), tuple(out.shape[1:])))
    return out

  x = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)

  def run(x, t):
    variables = ctx.model.init(jax.random.PRNGKey(0), x, t)
    with nn.intercept_methods(spy):
      ctx.model.apply(variables, x, t)
    return 0

  jax.eval_shape(run, x, t)
  return calls


def layer_names(ctx) -> list[str]:
  """Valid split points of ``ctx.model``: its submodules' paths."""
  return ["/".join(p) for p, _ in _trace_calls(ctx) if p]


@dataclasses.dataclass(frozen=True)
class Split:
  """A model cut at one layer.

  Attributes:
    layer: the ``/``-joined module path.
    latent_shape: shape of one example's latent.
    lower_modules: paths of the modules of the lower part.
  """
  layer: str
  latent_shape: tuple[int, ...]
  lower_modules: tuple[tuple[str, ...], ...]

  def lower(self, ctx, params, model_state, x, task, train: bool = False):
    """The latent activations ``g_{<=l}(x)``."""
    target = tuple(self.layer.split("/"))
    box = []

    def grab(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and \
          tuple(context.module.path) == target:
        box.append(out)
      return out

    with nn.intercept_methods(grab):
      ctx.apply(params, model_state, x, task, train=train)
    return box[0]

  def upper(self, ctx, params, model_state, latent, task,
            train: bool = False, mask: jax.Array | None = None):
    """Logits ``f_{>l}(latent)`` (``(output, new_model_state)``)."""
    target = tuple(self.layer.split("/"))

    def swap(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and \
          tuple(context.module.path) == target:
        return latent.astype(jnp.float32)
      return next_fun(*args, **kwargs)

    # Modules before the split see a dummy input; their outputs are unused.
    dummy = jnp.zeros((latent.shape[0],) + tuple(ctx.info.input_shape),
                      jnp.float32)
    with nn.intercept_methods(swap):
      return ctx.apply(params, model_state, dummy, task, train=train,
                       mask=mask)

  def lower_mask(self, params) -> Any:
    """A pytree of bools like ``params``: True for lower-part leaves."""
    lower = set(self.lower_modules)

    def is_lower(path, leaf):
      del leaf
      names = tuple(getattr(k, "key", str(k)) for k in path)
      return any(names[:len(m)] == m for m in lower)

    return jax.tree_util.tree_map_with_path(is_lower, params)


def split_model(ctx, layer: str) -> Split:
  """Cuts ``ctx.model`` at ``layer``.

  Raises:
    ValueError: an unknown layer name (listing the valid ones).
  """
  calls = _trace_calls(ctx)
  names = ["/".join(p) for p, _ in calls if p]
  if not names:
    raise ValueError(
        f"the model ({type(ctx.model).__name__}) has no named layers to "
        f"split at {layer!r}: latent replay needs a model whose layers run "
        "one after another, such as mlp, cnn or resnet18")
  if layer not in names:
    raise ValueError(f"unknown layer {layer!r} to split the model at; valid "
                     f"layer names: {names}")
  target = tuple(layer.split("/"))
  pos = max(i for i, (p, _) in enumerate(calls) if p == target)
  lower = tuple(p for p, _ in calls[:pos + 1] if p and not
                (len(p) < len(target) and target[:len(p)] == p))
  # The target's submodules finish before it (all lower); its ancestors
  # (e.g. the whole model) wrap the split and are not.
  return Split(layer, tuple(calls[pos][1]), lower)


def experience_latents(ctx, split: Split, params, model_state, x,
                       batch: int = 500) -> jax.Array:
  """Latents of ``x`` ``(N, ...)`` in batches (``lax.map``; N padded)."""
  n = x.shape[0]
  nb = math.ceil(n / batch)
  pad = nb * batch - n
  xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  xb = xp.reshape((nb, batch) + x.shape[1:])
  t = jnp.zeros((batch,), jnp.int32)
  h = jax.lax.map(lambda xi: split.lower(ctx, params, model_state, xi, t),
                  xb)
  return h.reshape((nb * batch,) + h.shape[2:])[:n]


class LatentReplayState(NamedTuple):
  memory: buffers.Memory  # mem_size latents (latent-shaped x)
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key
  model_state: Any        # model state at the start of the experience
  lower: Any = None       # lower_copy at the experience's start (frozen
                          # lower part only; None when it trains)


def check_split_args(name, mem_size, batch_size, lower_lr_scale, layer,
                     batch_arg="batch_size"):
  """``batch_arg``: the caller's name of the replay batch (AR1*'s
  ``replay_batch_size``), for the messages."""
  buffers.check_capacity(mem_size, "mem_size")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or \
      batch_size < 0:
    raise ValueError(f"{name} {batch_arg} must be an int >= 0 (0: the "
                     f"training batch size), got {batch_size!r}")
  if batch_size > mem_size:
    raise ValueError(f"{name} replay {batch_arg}={batch_size} is larger "
                     f"than the memory capacity mem_size={mem_size}; use "
                     f"{batch_arg} <= {mem_size}")
  if not (checks.is_real(lower_lr_scale) and 0 <= lower_lr_scale <= 1):
    raise ValueError(f"{name} lower_lr_scale must be in [0, 1] (0: frozen), "
                     f"got {lower_lr_scale!r}")
  if not isinstance(layer, str) or not layer:
    raise ValueError(f"{name} layer must be a module path such as "
                     f"'backbone', got {layer!r}")


def scale_lower(split: Split, grads, params, experience, scale: float):
  """Multiplies the lower part's gradients by ``scale`` from experience 1."""
  if scale == 1.0:
    return grads
  mask = split.lower_mask(params)
  factor = jnp.where(experience > 0, scale, 1.0)
  return jax.tree.map(lambda g, m: g * factor if m else g, grads, mask)


def lower_copy(split: Split, params) -> Any:
  """A copy of the lower part's parameters, like ``params`` with a scalar
  standing in for each upper-part leaf (for :func:`restore_lower`)."""
  return jax.tree.map(
      lambda p, m: jnp.copy(p) if m else jnp.zeros((), p.dtype), params,
      split.lower_mask(params))


def restore_lower(split: Split, params, saved, experience) -> Any:
  """``params`` with the lower part set to ``saved`` (a
  :func:`lower_copy`) from experience 1 on: the frozen part stays where
  it froze whatever the optimiser adds (weight decay, momentum)."""
  return restore_masked(params, saved, split.lower_mask(params),
                        experience > 0)


def lower_grads(get_split, lower_lr_scale: float):
  """``(update_grads, freeze_grads)`` of a latent memory's split: the
  lower part's gradient times ``lower_lr_scale`` from experience 1 on.

  Frozen (0), that is a 0/1 mask, declared as ``freeze_grads``: in a
  chain, a projector (A-GEM, GEM) then projects in the upper part's
  subspace and a member that adds another batch's gradient (MIR, RAR)
  adds none to the lower part, in either order. Slowed (above 0), it is
  a scale, not a mask, and nothing is declared: what a later member adds
  would not be slowed (chain() refuses that order), and a projector's
  constraint on the applied update holds, in either order, only when the
  mask's square is the mask.
  """
  scale = float(lower_lr_scale)

  def scaled(ctx, sstate, grads):
    # ``grads`` stands in for the params: lower_mask reads paths only.
    return scale_lower(get_split(ctx), grads, grads, sstate.experience,
                       scale)

  return frozen_update(scaled), (scaled if scale == 0 else None)


def freeze_hooks(get_split, lower_lr_scale: float):
  """``(lower_at_init, before_experience, project_params)`` of a latent
  memory whose lower part is frozen (``lower_lr_scale == 0``), for a state
  with ``experience``, ``model_state`` and ``lower`` fields; with a
  scale above 0 the lower part trains and nothing is kept or restored."""
  if lower_lr_scale != 0:
    return ((lambda ctx, params: None), mark_experience_start,
            (lambda ctx, sstate, params: params))

  def lower_at_init(ctx, params):
    return lower_copy(get_split(ctx), params)

  def before_experience(ctx, state, experience):
    state = mark_experience_start(ctx, state, experience)
    ss = state.strategy._replace(
        lower=lower_copy(get_split(ctx), state.params))
    return state.replace(strategy=ss)

  def project_params(ctx, sstate, params):
    return restore_lower(get_split(ctx), params, sstate.lower,
                         sstate.experience)

  return lower_at_init, before_experience, project_params


def replayed_loss(ctx, split: Split, params, model_state, batch) -> jax.Array:
  """Mean loss of the latents a ``prepare_batch`` put in the batch."""
  logits, _ = split.upper(ctx, params, model_state, batch["latent_x"],
                          batch["latent_task"], train=True,
                          mask=batch["latent_mask"])
  return cross_entropy(logits, batch["latent_y"], batch["latent_mask"])


def latent_replay(mem_size: int = 3920, batch_size: int = 0,
                  layer: str = "backbone",
                  lower_lr_scale: float = 0.0) -> Strategy:
  """Latent replay.

  Args:
    mem_size: memory capacity in latents.
    batch_size: replayed latents per step (0: the training batch size).
    layer: module path to split at (see :func:`layer_names`).
    lower_lr_scale: gradient factor of the lower part after the first
      experience (0: frozen).

  Raises:
    ValueError: bad sizes or scale; at ``init``, an unknown ``layer``
      (listing the valid ones) or a default batch size above ``mem_size``.
  """
  check_split_args("latent_replay", mem_size, batch_size, lower_lr_scale,
                   layer)
  splits = {}

  def get_split(ctx) -> Split:
    if ctx not in splits:
      splits[ctx] = split_model(ctx, layer)
    return splits[ctx]

  def replay_size(ctx):
    return batch_size or ctx.info.batch_size

  lower_at_init, before_experience, project_params = freeze_hooks(
      get_split, float(lower_lr_scale))

  def init(ctx, key, params):
    sp = get_split(ctx)
    if replay_size(ctx) > mem_size:
      # AR1* builds this member from its replay_batch_size: name both.
      raise ValueError(
          f"latent_replay: the replay batch ({replay_size(ctx)}: batch_size, "
          f"ar1's replay_batch_size; 0 means the training batch) is larger "
          f"than mem_size={mem_size}; use a replay batch <= {mem_size} or "
          f"mem_size >= {replay_size(ctx)}")
    if mem_size < ctx.info.num_experiences:
      raise ValueError(f"latent_replay needs mem_size >= the number of "
                       f"experiences ({ctx.info.num_experiences}); got "
                       f"{mem_size}")
    k_mem, k_ms = jax.random.split(key)
    _, variables = init_variables(ctx, k_ms)
    return LatentReplayState(buffers.init(mem_size, sp.latent_shape),
                             jnp.zeros((), jnp.int32), k_mem, variables,
                             lower_at_init(ctx, params))

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    m = sstate.memory
    return {**batch, "latent_x": m.x[idx], "latent_y": m.y[idx],
            "latent_task": m.task[idx],
            "latent_mask": ok.astype(jnp.float32)}

  def loss(ctx, sstate, params, batch, logits):
    del logits
    return replayed_loss(ctx, get_split(ctx), params, sstate.model_state,
                         batch)

  update_grads, freeze_grads = lower_grads(get_split, lower_lr_scale)

  @functools.partial(jax.jit, static_argnums=0)
  def store(ctx, mem, key, params, model_state, x, y, task, experience,
            mask):
    h = experience_latents(ctx, get_split(ctx), params, model_state, x)
    return buffers.experience_balanced_add(mem, key, h, y, task, experience,
                                           mask)

  def after_experience(ctx, state, experience):
    ss = state.strategy
    data = device_experience(experience, ctx.info.train_size)
    mask = jnp.arange(ctx.info.train_size) < experience.num_train
    key = jax.random.fold_in(ss.key, experience.index)
    mem = store(ctx, ss.memory, key, state.params, state.model_state,
                data["x"], data["y"], data["task"],
                jnp.asarray(experience.index, jnp.int32), mask)
    return state.replace(strategy=ss._replace(memory=mem))

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, loss=loss,
                  update_grads=update_grads, freeze_grads=freeze_grads,
                  project_params=project_params,
                  after_experience=after_experience, name="latent_replay")
