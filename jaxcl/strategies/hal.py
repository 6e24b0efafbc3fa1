"""Hindsight Anchor Learning (HAL): experience replay plus anchor points.

Chaudhry, Gordo, Dokania, Torr & Lopez-Paz (2021) add to experience
replay one *anchor* per class: an input, learned at the end of the
experience that brought the class, on which the network forgets most.
Later training keeps the network's outputs on the anchors from moving.
Each step (the paper's Algorithm 1, as Mammoth's ``hal.py`` runs it) with
:math:`B` the incoming batch, :math:`M_B` a batch drawn from the memory,
:math:`\\ell` the mean cross-entropy over :math:`B \\cup M_B` and
:math:`\\mathcal{E}` the anchors:

.. math::
   \\tilde\\theta = \\theta - \\eta\\,\\nabla_\\theta \\ell(\\theta),
   \\qquad
   \\theta \\leftarrow \\theta - \\eta\\,\\nabla_\\theta\\Big[\\ell(\\theta)
     + \\lambda\\, \\operatorname{mean}_{e \\in \\mathcal{E}}
       \\big\\lVert f_\\theta(e) - f_{\\tilde\\theta}(e)
       \\big\\rVert_2^2\\Big],

the mean taken over the anchors and the outputs, :math:`f_{\\tilde\\theta}`
held constant. :math:`\\tilde\\theta` is a look-ahead: the anchors'
outputs after a plain replay step.

An anchor for class :math:`c` of the experience just finished is learned
by ``anchor_steps`` SGD steps (rate ``anchor_lr``) from a uniform random
input (random pixels, standardised with ``dataset.normalize``), minimising (eq. 4 with the mean-embedding term)

.. math::
   -\\,\\ell(f_{\\theta_M}(e), c) + \\ell(f_{\\theta_t}(e), c)
   + \\gamma \\lVert \\phi_{\\theta_t}(e) - \\phi_t \\rVert_2^2,

where :math:`\\theta_t` is the network as the experience ends,
:math:`\\theta_M` the same after ``finetune_steps`` SGD steps on memory
batches (a stand-in for the future, which will train on replay),
:math:`\\phi_\\theta(e)` the backbone's features and :math:`\\phi_t` their
running mean over the experience's batches, :math:`\\phi_t \\leftarrow
\\beta \\phi_t + (1 - \\beta) \\operatorname{mean}_B \\phi_\\theta(x)` after
every step (reset to 0 as an experience starts). So the anchor is an
input the network classifies as ``c`` now, that fine-tuning forgets,
kept near the experience's typical features.

Choices and deviations:

* The look-ahead :math:`\\tilde\\theta` is the optimiser's first update
  from a fresh state on the cross-entropy's gradient, or ``θ - lookahead_lr
  * g`` when ``lookahead_lr > 0``. For plain SGD both are the code's step
  (test_mammoth_replay.py checks the whole update against it); no
  learning rate has to be given twice.
* The memory is a reservoir over the stream, as the code's buffer is (it
  is built with ``mode='ring'`` but its ``add_data`` always uses the
  reservoir); the paper's code keeps a ring buffer per class.
* Anchors have one slot per class in class- and task-incremental
  streams, and one per class and experience in domain-incremental ones
  (Permuted MNIST brings every class each time; the code keeps them
  all). A class that comes again in a class-incremental stream (a
  cumulative one) gets a new anchor in place of its old one; the code
  would add one.
* Anchors are learned, and their outputs compared, with the network in
  evaluation mode for the learning (the code feeds one anchor at a time,
  which batch norm cannot normalise) and in training mode with the model
  state as the experience started in the step (as DER's memory rows).

State: :class:`HALState`, fixed shapes, so nothing recompiles between
experiences and it checkpoints and vmaps like any state.

References:
  Chaudhry, Gordo, Dokania, Torr & Lopez-Paz, `Using hindsight to anchor
  past knowledge in continual learning
  <https://arxiv.org/abs/2002.08165>`_, AAAI 2021.
  Buzzega et al. 2020 (Mammoth's ``models/hal.py``, the HAL rows of their
  Table 2).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import buffers, checks
from jaxcl.augment import pixel_maps
from jaxcl.state import cross_entropy
from jaxcl.strategies._class_incremental import append_exemplars
from jaxcl.strategies._replay_memory import init_memory, replay_sizer
from jaxcl.strategies.replay import reservoir_step
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["hal", "HALState", "learn_anchors", "anchor_capacity",
           "anchor_slots"]


class HALState(NamedTuple):
  memory: buffers.Memory  # reservoir over the stream
  anchors: jax.Array      # (capacity, *input_shape)
  anchor_y: jax.Array     # (capacity,) int32: the class each stands for
  anchor_task: jax.Array  # (capacity,) int32: its experience's task id
  anchor_ok: jax.Array    # (capacity,) bool: learned anchors
  phi: jax.Array          # (features,) running mean of this experience's
                          # backbone features
  model_state: Any        # model state as the experience started
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def anchor_capacity(info) -> int:
  """Anchor slots: one per class in class- and task-incremental streams,
  one per class and experience in domain-incremental ones."""
  if info.kind in ("class", "task"):
    return info.num_classes
  return info.num_classes * info.num_experiences


def anchor_slots(info, experience: int, classes: np.ndarray) -> np.ndarray:
  """Where experience ``experience``'s anchors for ``classes`` go: the
  class's slot (a class that comes again, as in a cumulative stream, gets
  a new anchor in place of its old one), or in domain-incremental streams
  the slot of the class in this experience."""
  if info.kind in ("class", "task"):
    return classes
  return experience * info.num_classes + classes


def learn_anchors(ctx, params_t, params_m, model_state, phi: jax.Array,
                  y: jax.Array, task: jax.Array, e0: jax.Array, lr: float,
                  gamma: float, steps: int) -> jax.Array:
  """``steps`` SGD steps (rate ``lr``) on each anchor of ``e0`` (one per
  row, for class ``y``), minimising ``-CE(θ_M) + CE(θ_t) + gamma *
  ||features_t - phi||^2``; the anchors are independent, so one summed
  loss gives each its own gradient."""

  def loss(e):
    out_m = ctx.logits(params_m, model_state, e, task).astype(jnp.float32)
    out_t = ctx.logits(params_t, model_state, e, task).astype(jnp.float32)
    feat = ctx.apply(params_t, model_state, e, task,
                     features=True)[0].astype(jnp.float32)
    nll = lambda out: -jnp.take_along_axis(
        jax.nn.log_softmax(out), y[:, None], 1)[:, 0]
    return jnp.sum(-nll(out_m) + nll(out_t)) + gamma * jnp.sum(
        (feat - phi) ** 2)

  def step(e, _):
    return e - lr * jax.grad(loss)(e), None

  return jax.lax.scan(step, e0, None, length=steps)[0]


def hal(mem_size: int = 200, batch_size: int = 0, lam: float = 0.1,
        beta: float = 0.5, gamma: float = 0.1, anchor_lr: float = 0.1,
        anchor_steps: int = 100, finetune_steps: int = 1,
        lookahead_lr: float = 0.0) -> Strategy:
  """Hindsight Anchor Learning.

  Args:
    mem_size: reservoir capacity in examples.
    batch_size: memory entries replayed per step; 0 means the training
      batch size.
    lam: weight of the anchor term (the code's ``hal_lambda``).
    beta: decay of the running mean of features.
    gamma: weight of the mean-feature term in the anchors' objective.
    anchor_lr: SGD rate of the anchors' optimisation (the code uses the
      training learning rate).
    anchor_steps: SGD steps per anchor (the code's 100).
    finetune_steps: SGD steps (rate ``anchor_lr``) on memory batches of the
      training batch size that make ``θ_M`` (the code's 1).
    lookahead_lr: 0 takes the look-ahead as the optimiser's first update
      from a fresh state; > 0, a plain SGD step at this rate.

  The defaults are the code's; ``experiments/split_mnist_replay.py`` uses
  Mammoth's Split MNIST settings.

  Raises:
    ValueError: a non-positive ``mem_size``, ``anchor_lr`` or
      ``anchor_steps``; a negative ``batch_size``, ``lam``, ``gamma``,
      ``finetune_steps`` or ``lookahead_lr``; ``beta`` outside [0, 1]; at
      ``init``, a replay batch larger than the memory; at an experience's
      end, anchors that diverged (``anchor_lr`` too high for the model).
  """
  name = "hal"
  replay_size = replay_sizer(name, mem_size, batch_size)
  checks.nonnegative(f"{name}: lam", lam)
  checks.nonnegative(f"{name}: gamma", gamma)
  checks.nonnegative(f"{name}: lookahead_lr", lookahead_lr)
  checks.positive(f"{name}: anchor_lr", anchor_lr)
  checks.whole(f"{name}: anchor_steps", anchor_steps, 1)
  checks.whole(f"{name}: finetune_steps", finetune_steps, 0)
  checks.nonnegative(f"{name}: beta", beta)
  if beta > 1:
    raise ValueError(f"{name}: beta must be in [0, 1], got {beta!r}")

  def init(ctx, key, params):
    memory, model_state, k_mem = init_memory(ctx, key, mem_size, replay_size)
    x = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
    width = jax.eval_shape(
        lambda p, ms: ctx.apply(p, ms, x, jnp.zeros((1,), jnp.int32),
                                features=True)[0],
        params, model_state).shape[-1]
    n = anchor_capacity(ctx.info)
    return HALState(
        memory,
        jnp.zeros((n,) + tuple(ctx.info.input_shape), jnp.float32),
        jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32),
        jnp.zeros((n,), bool), jnp.zeros((width,), jnp.float32),
        model_state, jnp.zeros((), jnp.int32), k_mem)

  def before_experience(ctx, state, experience):
    state = mark_experience_start(ctx, state, experience)
    ss = state.strategy
    return state.replace(strategy=ss._replace(phi=jnp.zeros_like(ss.phi)))

  def replay_ce(ctx, params, model_state, rows):
    """The mean cross-entropy on ``rows`` (x, y, task, mask), in training
    mode: the look-ahead's loss and θ_M's fine-tuning loss."""
    out = ctx.logits(params, model_state, rows["x"], rows["task"], train=True,
                     mask=rows["mask"])
    return cross_entropy(out, rows["y"], rows["mask"])

  def lookahead(ctx, sstate, params, batch):
    """θ̃: one update from the replay cross-entropy's gradient, constant."""
    params = jax.lax.stop_gradient(params)
    g = jax.grad(replay_ce, argnums=1)(ctx, params, sstate.model_state, batch)
    if lookahead_lr > 0:
      return jax.tree.map(lambda p, d: p - lookahead_lr * d, params, g)
    delta, _ = ctx.tx.update(g, ctx.tx.init(params), params)
    return optax.apply_updates(params, delta)

  def loss(ctx, sstate, params, batch, logits):
    del logits
    ok = sstate.anchor_ok.astype(jnp.float32)

    def anchor_term(params):
      ahead = lookahead(ctx, sstate, params, batch)
      out = lambda p: ctx.logits(p, sstate.model_state, sstate.anchors,
                                 sstate.anchor_task, train=True,
                                 mask=ok).astype(jnp.float32)
      target = jax.lax.stop_gradient(out(ahead))
      now = out(params)
      sq = jnp.sum(ok[:, None] * (now - target) ** 2)
      return lam * sq / jnp.maximum(jnp.sum(ok) * now.shape[-1], 1.0)

    # No anchors during the first experience: skip the look-ahead's
    # extra forward and backward pass.
    return jax.lax.cond(jnp.any(sstate.anchor_ok), anchor_term,
                        lambda p: jnp.zeros((), jnp.float32), params)

  def after_step(ctx, sstate, info):
    b = ctx.info.batch_size
    x, task = info.batch["x"][:b], info.batch["task"][:b]
    # Validity, not the loss weights a chained member may have made of the
    # mask (the generative replays scale it by 1 / (B + R)).
    m = (info.batch["mask"][:b] > 0).astype(jnp.float32)
    feat = ctx.apply(info.params_after, sstate.model_state, x, task,
                     train=True, features=True,
                     mask=m)[0].astype(jnp.float32)
    mean = jnp.sum(m[:, None] * feat, 0) / jnp.maximum(jnp.sum(m), 1.0)
    # A step with no incoming row (padding) leaves the running mean alone.
    phi = jnp.where(jnp.sum(m) > 0, beta * sstate.phi + (1 - beta) * mean,
                    sstate.phi)
    memory = reservoir_step(ctx, sstate, info)
    return sstate._replace(memory=memory, phi=phi)

  @functools.partial(jax.jit, static_argnums=0)
  def anchors_for(ctx, ss, params, model_state, y, task, key):
    k_ft, k_e = jax.random.split(key)
    bs = min(ctx.info.batch_size, mem_size)

    def finetune(p, k):
      idx, ok = buffers.sample(ss.memory, k, bs)
      rows = buffers.gather(ss.memory, idx, ok)
      g = jax.grad(replay_ce, argnums=1)(ctx, p, model_state, rows)
      return jax.tree.map(lambda a, d: a - anchor_lr * d, p, g), None

    params_m = jax.lax.scan(finetune, params,
                            jax.random.split(k_ft, finetune_steps))[0]
    # Uniform random pixels, standardised as the inputs are (dataset.
    # normalize).
    _, to_inputs = pixel_maps(ctx.normalize, ctx.info.input_shape, "hal")
    e0 = to_inputs(jax.random.uniform(
        k_e, (y.shape[0],) + tuple(ctx.info.input_shape)))
    return learn_anchors(ctx, params, params_m, model_state, ss.phi, y, task,
                         e0, anchor_lr, gamma, anchor_steps)

  def after_experience(ctx, state, experience):
    ss = state.strategy
    classes = np.unique(np.asarray(experience.train_y)).astype(np.int32)
    task = np.full(classes.shape, int(np.asarray(experience.train_task)[0]),
                   np.int32)
    key = jax.random.fold_in(jax.random.fold_in(ss.key, 0x4A1),
                             experience.index)
    new = anchors_for(ctx, ss, state.params, state.model_state,
                      jnp.asarray(classes), jnp.asarray(task), key)
    # -CE(θ_M) is unbounded below: at too high a rate the anchors run off
    # to infinity, and every later step's loss would be NaN. Say so here
    # (one host read per experience).
    if not bool(jnp.all(jnp.isfinite(new))):
      raise ValueError(
          f"{name}: the anchors learned at the end of experience "
          f"{experience.index} diverged (non-finite values) at "
          f"anchor_lr={anchor_lr} over anchor_steps={anchor_steps}; lower "
          f"anchor_lr (the code uses the training learning rate)")
    slots = jnp.asarray(anchor_slots(ctx.info, experience.index, classes))
    ss = ss._replace(anchors=ss.anchors.at[slots].set(new),
                     anchor_y=ss.anchor_y.at[slots].set(classes),
                     anchor_task=ss.anchor_task.at[slots].set(task),
                     anchor_ok=ss.anchor_ok.at[slots].set(True))
    return state.replace(strategy=ss)

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=append_exemplars(replay_size), loss=loss,
                  after_step=after_step, after_experience=after_experience,
                  name=name)
