"""GDumb: a greedy class-balanced memory, and a model retrained on it alone.

GDumb (Prabhu et al. 2020) never learns from the stream. A greedy sampler
keeps a class-balanced memory of ``mem_size`` examples (add while there is
room; once full, add an example only if its class holds fewer than
``mem_size / |Y|`` slots, evicting a random example of the largest class;
:func:`jaxcl.buffers.class_balanced_add`). At the end of each experience a
model is trained *from scratch* on the memory alone, and that model makes
the predictions, its logits masked to the classes present in memory:

.. math::
   \\theta_i = \\arg\\min_\\theta \\frac{1}{|M|} \\sum_{(x, y) \\in M}
     \\ell(\\mathrm{mask}_{Y_M}(f_\\theta(x)), y)
   \\quad \\text{(SGD + momentum, cosine-annealed learning rate)}.

Here the sampler runs in ``after_step`` on each incoming batch (so it sees
the stream in training order, one pass, as in the paper), ``update_grads``
returns zero gradients so the stream itself trains nothing (with plain SGD
or momentum and no weight decay the parameters do not move; they are
replaced anyway), and ``after_experience`` runs the retraining as one
jitted ``lax.scan`` over ``epochs x ceil(mem_size / batch_size)`` steps,
then installs the new parameters in the training state.

The retraining recipe is configurable to match the authors' code (SGD
with momentum 0.9, weight decay 1e-6, gradient-norm clipping at 10, a
warm-up epoch then SGDR warm restarts, random crops with 4-pixel padding on
MNIST; their MNIST MLP with batch norm is :mod:`jaxcl.models.bn_mlp`); the
defaults are the simpler one-cosine-decay recipe. Not reproduced: cutmix
(used only on CIFAR) and the code's reporting of the best test accuracy
over the retraining epochs (here the final model is evaluated).

References:
  Prabhu, Torr & Dokania, `GDumb: a simple approach that questions our
  progress in continual learning
  <https://doi.org/10.1007/978-3-030-58536-5_31>`_, ECCV 2020.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl import buffers, checks
from jaxcl.augment import in_pixels, random_crop
from jaxcl.state import cross_entropy
from jaxcl.strategies._epochs import over_epochs
from jaxcl.strategies.replay import class_balanced_step
from jaxcl.strategy import Strategy, mark_experience, zero_grads
from jaxcl.train import init_variables

__all__ = ["gdumb", "GDumbState", "retrain"]

_NEG = -1e9
SCHEDULES = ("cosine", "sgdr")


class GDumbState(NamedTuple):
  memory: buffers.Memory  # class-balanced, mem_size input-shaped examples
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key (sampler and retraining)


def _class_mask(mem: buffers.Memory, num_classes: int) -> jax.Array:
  """bool ``(num_classes,)``: classes with an entry in memory."""
  return buffers.counts(mem, num_classes, by="y") > 0


def sgdr_epoch_lr(epoch: jax.Array, max_lr: float,
                  min_lr: float) -> jax.Array:
  """The GDumb code's per-epoch learning rate (SGDR, ``T_0 = 1``,
  ``T_mult = 2``, after one warm-up epoch).

  Epoch 0 runs at ``0.1 * max_lr``, epoch 1 at ``max_lr``; from epoch 2 on,
  PyTorch's ``CosineAnnealingWarmRestarts`` stepped once per epoch gives
  cycles restarting at epochs 2, 4, 8, 16, ...: with ``s = 2^floor(log2 e)``,
  ``lr = min_lr + (max_lr - min_lr) (1 + cos(pi (e - s) / s)) / 2``.
  """
  e = jnp.maximum(jnp.asarray(epoch, jnp.int32), 1)
  s = jnp.left_shift(1, 31 - jax.lax.clz(e))  # largest power of 2 <= e
  t = (e - s).astype(jnp.float32) / s.astype(jnp.float32)
  lr = min_lr + (max_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  return jnp.where(epoch == 0, 0.1 * max_lr, lr)


def retrain(ctx, key: jax.Array, mem: buffers.Memory, *, epochs: int,
            batch_size: int, learning_rate: float, min_learning_rate: float,
            momentum: float, mask_logits: bool, schedule: str = "cosine",
            clip: float = 0.0, weight_decay: float = 0.0,
            crop_padding: int = 0) -> tuple[Any, Any]:
  """Trains a freshly initialised model on the valid entries of ``mem``.

  Returns ``(params, model_state)``. Each epoch visits the valid entries in
  a fresh random order; steps whose batch holds no valid entry are skipped.
  ``schedule='cosine'``: one cosine decay over all steps; ``'sgdr'``:
  :func:`sgdr_epoch_lr`. ``clip > 0`` clips the gradient's global norm,
  ``weight_decay`` is added to the gradient before momentum (PyTorch's
  SGD), ``crop_padding > 0`` augments each batch with :func:`random_crop`
  (on the pixels: a black border under ``dataset.normalize``).
  """
  k_init, k_epochs = jax.random.split(key)
  params, variables = init_variables(ctx, k_init)
  model_state = variables
  cap = mem.valid.shape[0]
  steps = math.ceil(cap / batch_size)
  total = epochs * steps
  cosine = optax.cosine_decay_schedule(
      learning_rate, max(total, 1), alpha=min_learning_rate / learning_rate)

  def lr_at(e, j):
    # From the epoch and step indices rather than the optimiser's update
    # count, which stops at skipped (empty) batches.
    if schedule == "sgdr":
      return sgdr_epoch_lr(e, learning_rate, min_learning_rate)
    return cosine(e * steps + j)

  # Unit-rate SGD, the rate applied after momentum: PyTorch's
  # p -= lr * (m * buf + g), so the per-epoch rate can change freely.
  tx = optax.chain(
      optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
      optax.add_decayed_weights(weight_decay) if weight_decay > 0
      else optax.identity(),
      optax.sgd(1.0, momentum=momentum or None))
  opt_state = tx.init(params)
  allowed = _class_mask(mem, ctx.info.num_classes)
  # On the pixels (a black border) when the inputs are standardised.
  crop = in_pixels(lambda k, x: random_crop(k, x, crop_padding),
                   ctx.normalize, ctx.info.input_shape, "gdumb")

  def step(carry, idx, ok, k, e, j):
    params, model_state, opt_state = carry
    x = mem.x[idx]
    if crop_padding and x.ndim == 4:
      x = crop(k, x)
    x = ctx.augmented(jax.random.fold_in(k, 1), x)

    def loss_fn(p):
      logits, ms = ctx.apply(p, model_state, x, mem.task[idx], train=True,
                             mask=ok)
      if mask_logits:
        logits = jnp.where(allowed, logits, _NEG)
      return cross_entropy(logits, mem.y[idx], ok.astype(jnp.float32)), ms

    (_, ms), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(g, opt_state, params)
    updates = jax.tree.map(lambda u: lr_at(e, j) * u, updates)
    return optax.apply_updates(params, updates), ms, opt

  params, model_state, _ = over_epochs(
      k_epochs, mem.valid, (params, model_state, opt_state), epochs=epochs,
      batch_size=batch_size, step=step)
  return params, model_state


def gdumb(mem_size: int = 500, epochs: int = 30, batch_size: int = 16,
          learning_rate: float = 0.05, min_learning_rate: float = 0.0005,
          momentum: float = 0.9, mask_logits: bool = True,
          schedule: str = "cosine", clip: float = 0.0,
          weight_decay: float = 0.0, crop_padding: int = 0) -> Strategy:
  """GDumb.

  Args:
    mem_size: memory capacity in examples (>= the number of classes).
    epochs: retraining epochs over the memory after each experience.
    batch_size: retraining batch size (the paper: 16).
    learning_rate, min_learning_rate: cosine decay between the two (the
      paper: 0.05 and 0.0005).
    momentum: SGD momentum of the retraining (0: plain SGD).
    mask_logits: restrict training and prediction to the classes present
      in memory (the paper's class masking).
    schedule: ``'cosine'`` (one cosine decay over the retraining) or
      ``'sgdr'`` (the authors' code: one warm-up epoch at a tenth of the
      rate, then warm restarts with ``T_0 = 1``, ``T_mult = 2`` per epoch;
      :func:`sgdr_epoch_lr`).
    clip: clip the gradient's global norm at this value (the code: 10;
      0: no clipping).
    weight_decay: L2 weight decay added to the gradient (the code: 1e-6).
    crop_padding: random-crop augmentation of the memory's images, zero
      padded by this many pixels (the code on MNIST: 4; 0: none). The
      run's ``train.augment``, when set, augments the retraining batches
      instead (GDumb's training steps learn nothing; its retraining is
      where the augmentation acts); the two together are refused.

  Raises:
    ValueError: bad values; at ``init``, ``mem_size`` smaller than the
      number of classes, or ``crop_padding`` on inputs that are not
      images or not smaller than their side.
  """
  buffers.check_capacity(mem_size, "mem_size")
  checks.whole("gdumb: epochs", epochs, 1)
  checks.whole("gdumb: batch_size", batch_size, 1)
  if batch_size > mem_size:
    raise ValueError(f"gdumb: batch_size={batch_size} is larger than the "
                     f"memory (mem_size={mem_size}); use <= {mem_size}")
  checks.positive("gdumb: learning_rate", learning_rate)
  checks.positive("gdumb: min_learning_rate", min_learning_rate)
  checks.flag("gdumb: mask_logits", mask_logits)
  if min_learning_rate > learning_rate:
    raise ValueError(f"gdumb min_learning_rate={min_learning_rate} must not "
                     f"exceed learning_rate={learning_rate}")
  checks.fraction("gdumb: momentum", momentum)
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown gdumb schedule {schedule!r}; valid: "
                     f"{list(SCHEDULES)}")
  checks.nonnegative("gdumb: clip", clip)  # 0: no clipping
  checks.nonnegative("gdumb: weight_decay", weight_decay)
  checks.whole("gdumb: crop_padding", crop_padding, 0, "0: no crops")

  fit = jax.jit(functools.partial(
      retrain, epochs=epochs, batch_size=batch_size,
      learning_rate=float(learning_rate),
      min_learning_rate=float(min_learning_rate), momentum=float(momentum),
      mask_logits=mask_logits, schedule=schedule, clip=float(clip),
      weight_decay=float(weight_decay), crop_padding=crop_padding),
      static_argnums=0)

  def init(ctx, key, params):
    del params
    if mem_size < ctx.info.num_classes:
      raise ValueError(
          f"gdumb mem_size={mem_size} is smaller than the number of classes "
          f"({ctx.info.num_classes}); a class-balanced memory needs at least "
          "one slot per class")
    shape = tuple(ctx.info.input_shape)
    if crop_padding and ctx.augment is not None:
      raise ValueError(
          f"gdumb crop_padding={crop_padding} and train.augment would both "
          "augment the retraining batches; use crop_padding=0 with 'pad_crop' "
          "in train.augment (its padding: train.crop_padding), or leave "
          "train.augment empty")
    if crop_padding and len(shape) != 3:
      # The crop would be skipped: say so instead of training without it.
      raise ValueError(
          f"gdumb crop_padding={crop_padding} crops images shaped (H, W, C); "
          f"this stream's inputs are shaped {shape}; use crop_padding=0")
    if crop_padding and crop_padding >= min(shape[:2]):
      raise ValueError(
          f"gdumb crop_padding={crop_padding} must be smaller than the "
          f"images' side ({shape[0]}x{shape[1]}); a crop could miss the "
          "image entirely")
    return GDumbState(buffers.init(mem_size, ctx.info.input_shape),
                      jnp.zeros((), jnp.int32), key)

  def after_step(ctx, sstate, info):
    return sstate._replace(memory=class_balanced_step(ctx, sstate, info))

  def after_experience(ctx, state, experience):
    ss = state.strategy
    key = jax.random.fold_in(jax.random.fold_in(ss.key, 0x6D), experience.index)
    params, model_state = fit(ctx, key, ss.memory)
    return state.replace(params=params, model_state=model_state,
                         opt_state=ctx.tx.init(params))

  def predict(ctx, sstate, params, model_state, x, task):
    logits = ctx.logits(params, model_state, x, task)
    if not mask_logits:
      return logits
    allowed = _class_mask(sstate.memory, ctx.info.num_classes)
    return jnp.where(jnp.any(allowed) & ~allowed, _NEG, logits)

  return Strategy(init=init, before_experience=mark_experience,
                  update_grads=zero_grads, after_step=after_step,
                  after_experience=after_experience, predict=predict,
                  name="gdumb",
                  writes_params=frozenset({"after_experience"}))
