"""ER with tricks: replay with a loss-aware memory, LR decay, bias control.

Buzzega et al. (2020) patch plain experience replay (ER: the incoming batch
plus ``batch_size`` rows drawn uniformly from a memory, one mean
cross-entropy over both, :mod:`jaxcl.strategies.replay`) with tricks. This
module follows Mammoth's ``models/er_tricks.py`` and the sample selection of
its ``utils/buffer.py``, which implement three of them:

**Loss-aware (balanced) reservoir sampling** (``selection``). Every memory
slot carries a score ``s_i = -ℓ_i``, the loss of its example: set when the
example is stored (its loss in the step that offered it) and refreshed with
the loss of every replayed row in each step (both from the step's forward
pass, before the update). Whether an incoming row is stored is decided as
in reservoir sampling; *which* slot it overwrites is drawn with

.. math::
   p_i \\propto q_i - \\min_j q_j, \\qquad
   q_i = \\begin{cases} s_i & \\texttt{'lars'} \\\\
     \\tfrac12 \\dfrac{s_i}{\\overline{|s|}\\,\\overline{n}} + \\tfrac12 n_i
       & \\texttt{'labrs'} \\end{cases}

(``n_i``: entries of slot ``i``'s class; uniform when every ``q_i`` is
equal), so the examples the model finds hardest stay, and LABRS also evens
out the classes (:func:`jaxcl.buffers.lars_probs`,
:func:`jaxcl.buffers.labrs_probs`). ``'reservoir'`` is plain algorithm R.

**Exponential learning-rate decay** (``elrd``): the step's learning rate is
``lr · elrd^n``, ``n`` the examples offered to the memory before the step
(the stream's examples seen so far). Here the gradient is multiplied by
``elrd^n`` in ``update_grads``, which is the same update for plain SGD (the
protocol of the paper and of Mammoth). With momentum it is not: scaling
the gradient scales only the newest term of the velocity, where a smaller
learning rate scales all of it, so the decay acts with a lag of about
``1 / (1 - momentum)`` steps. With Adam (or any optimiser invariant to the
gradient's scale) the slowly changing factor is almost cancelled by the
normalisation and the trick does next to nothing.

**Bias control** (``bic_epochs``): when an experience ends, two scalars act
on the logits of that experience's classes ``C_t``,

.. math::
   q_k = \\begin{cases} \\alpha o_k + \\beta & k \\in C_t \\\\
                        o_k & \\text{otherwise,} \\end{cases}

fitted to the cross-entropy of ``q`` on the memory (the model frozen, in
evaluation mode) for ``bic_epochs`` epochs of plain SGD at ``bic_lr``
(Mammoth: 0.5), in batches of the training batch size; ``q`` replaces the
model's logits in prediction until the next experience ends. Training is
not affected (Mammoth's ``observe`` calls the network, not its corrected
``forward``). The correction is :func:`jaxcl.strategies.bic.bias_correct`
with one experience's pair.

Deviations from Mammoth, all of them small:

* ``(α, β)`` start from the identity ``(1, 0)`` at every experience.
  Mammoth's ``torch.zeros(2)`` starts the first experience from a scale of
  0 and later ones from the previous experience's pair; the loss is convex
  in ``(α, β)`` (the logits are affine in them), so with enough epochs both
  reach the same minimiser, and ``bic_epochs=0`` here leaves the logits
  alone (in Mammoth it would zero the newest classes' logits).
* The correction acts on the classes of the experience it was fitted on.
  Mammoth applies its one pair to the *current* task's class range, so
  during the next task (before its end) it acts on the new classes with
  the old pair; only evaluation at an experience's end is the same.
* The LARS / LABRS probabilities leave out two ``1e-9`` terms (see
  :func:`jaxcl.buffers.lars_probs`), are uniform where Mammoth would
  divide by zero (all scores equal, or all 0), and slots' scores start at
  0 instead of ``-inf`` (they are read only once every slot has been set).
* Replayed rows are drawn uniformly without replacement as in
  :mod:`jaxcl.strategies.replay`; while the memory holds fewer than
  ``batch_size`` entries the missing rows are masked out, which gives the
  same mean as Mammoth's shorter batch.

The paper's other two tricks, independent buffer augmentation and balanced
reservoir sampling alone, are not in Mammoth's ``er_tricks`` and not here.

State: :class:`ERTricksState`, fixed shapes, so nothing recompiles between
experiences, and it checkpoints and vmaps like any state.

References:
  Buzzega, Boschini, Porrello & Calderara, `Rethinking experience replay: a
  bag of tricks for continual learning <https://arxiv.org/abs/2010.05595>`_,
  ICPR 2020.
  Chaudhry et al., `On tiny episodic memories in continual learning
  <https://arxiv.org/abs/1902.10486>`_, 2019.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl import buffers, checks
from jaxcl.strategies._replay_memory import replay_sizer
from jaxcl.strategies.bic import bias_correct, fit_bias
from jaxcl.strategies.icarl import features
from jaxcl.strategies.replay import append_rows, incoming_rows
from jaxcl.strategy import Strategy, experience_classes, mark_experience

__all__ = ["er_tricks", "ERTricksState", "SELECTIONS", "row_losses",
           "fit_bias_control", "elrd_factor"]

SELECTIONS = ("reservoir", "lars", "labrs")

# Batch key of the replayed rows' positions in the batch and their slots.
_ROWS = "er_tricks_rows"
_SLOTS = "er_tricks_slots"


class ERTricksState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  scores: jax.Array       # float32 (K,): -loss of each entry, last seen
  scale: jax.Array        # float32 scalar: bias control's α
  shift: jax.Array        # float32 scalar: bias control's β
  corrected: jax.Array    # bool (C,): the classes α, β act on
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def row_losses(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-row softmax cross-entropy ``(B,)``."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y)


def elrd_factor(elrd: float, seen: jax.Array) -> jax.Array:
  """``elrd ** seen`` in float32 (``seen``: examples offered so far)."""
  return jnp.exp(seen.astype(jnp.float32) * jnp.log(jnp.float32(elrd)))


def fit_bias_control(key: jax.Array, logits: jax.Array, y: jax.Array,
                     valid: jax.Array, classes: jax.Array, *, epochs: int,
                     batch_size: int, learning_rate: float
                     ) -> tuple[jax.Array, jax.Array]:
  """``(α, β)`` acting on ``classes`` (bool ``(C,)``) of frozen ``logits``
  ``(K, C)``, fitted by plain SGD from ``(1, 0)`` to the cross-entropy over
  all classes, ``epochs`` passes over the ``valid`` rows in a fresh random
  order: BiC's stage 2 (:func:`jaxcl.strategies.bic.fit_bias`) with one
  pair, no momentum and no decay on ``β``."""
  alpha, beta = fit_bias(
      key, logits, y, valid, jnp.ones((1,), jnp.float32),
      jnp.zeros((1,), jnp.float32), jnp.where(classes, 0, -1),
      jnp.zeros((), jnp.int32), jnp.ones_like(classes), epochs=epochs,
      batch_size=batch_size, learning_rate=learning_rate, beta_decay=0.0,
      momentum=None)
  return alpha[0], beta[0]


def er_tricks(mem_size: int = 200, batch_size: int = 0,
              selection: str = "labrs", elrd: float = 1.0,
              bic_epochs: int = 50, bic_lr: float = 0.5) -> Strategy:
  """Experience replay with Buzzega et al.'s tricks (Mammoth's
  ``er_tricks``).

  Args:
    mem_size: memory capacity ``K`` in examples.
    batch_size: replayed rows per step; 0 means the training batch size.
    selection: which slot a stored row overwrites: ``'reservoir'``
      (uniform), ``'lars'`` (loss-aware) or ``'labrs'`` (loss-aware and
      class-balanced; Mammoth's default).
    elrd: the learning rate's decay per example seen, in ``(0, 1]``
      (1: none, Mammoth's default).
    bic_epochs: epochs of bias control over the memory when an experience
      ends (0: none; Mammoth: 50).
    bic_lr: bias control's SGD learning rate (Mammoth: 0.5).

  Raises:
    ValueError: a non-positive ``mem_size``, a negative ``batch_size`` or
      one larger than ``mem_size`` (at ``init`` for the default), an
      unknown ``selection``, ``elrd`` outside ``(0, 1]``, a negative
      ``bic_epochs`` or a non-positive ``bic_lr``.
  """
  replay_size = replay_sizer("er_tricks", mem_size, batch_size)
  buffers.replay_size("er_tricks", batch_size, mem_size, 0)
  if selection not in SELECTIONS:
    raise ValueError(f"er_tricks: unknown selection {selection!r}; valid: "
                     f"{list(SELECTIONS)}")
  if not isinstance(elrd, numbers.Real) or isinstance(elrd, bool) or \
      not 0.0 < elrd <= 1.0:
    raise ValueError(f"er_tricks: elrd must be a number in (0, 1] (1: no "
                     f"decay), got {elrd!r}")
  checks.whole("er_tricks: bic_epochs", bic_epochs, note="0: no bias control")
  checks.positive("er_tricks: bic_lr", bic_lr)

  def init(ctx, key, params):
    del params
    replay_size(ctx)
    return ERTricksState(
        memory=buffers.init(mem_size, ctx.info.input_shape),
        scores=jnp.zeros((mem_size,), jnp.float32),
        scale=jnp.ones((), jnp.float32), shift=jnp.zeros((), jnp.float32),
        corrected=jnp.zeros((ctx.info.num_classes,), bool),
        experience=jnp.zeros((), jnp.int32), key=key)

  def prepare_batch(ctx, sstate, batch, key):
    r = replay_size(ctx)
    idx, ok = buffers.sample(sstate.memory, key, r)
    start = batch["y"].shape[0]  # static: where the replayed rows go
    out = append_rows(batch, buffers.gather(sstate.memory, idx, ok))
    out[_ROWS] = jnp.arange(start, start + r, dtype=jnp.int32)
    out[_SLOTS] = jnp.where(ok, idx, mem_size).astype(jnp.int32)
    return out

  def update_grads(ctx, sstate, grads, params, batch, key):
    del ctx, params, batch, key
    if elrd == 1.0:
      return grads
    f = elrd_factor(elrd, sstate.memory.seen)
    return jax.tree.map(lambda g: g * f.astype(g.dtype), grads)

  def after_step(ctx, sstate, info):
    batch = info.batch
    losses = row_losses(info.logits, batch["y"])
    # Replayed rows first (Mammoth's order): refresh their slots' scores
    # (empty draws point at slot K and are dropped).
    scores = sstate.scores.at[batch[_SLOTS]].set(-losses[batch[_ROWS]],
                                                 mode="drop")
    rows = incoming_rows(ctx, batch)
    b = ctx.info.batch_size
    key = jax.random.fold_in(sstate.key, sstate.memory.seen)
    if selection == "reservoir":
      slots, seen = buffers.reservoir_slots(sstate.memory, key, rows["mask"],
                                            after=info.loss)
      mem = buffers.put_rows(sstate.memory, slots, rows["x"], rows["y"],
                             rows["task"],
                             jnp.full((b,), sstate.experience, jnp.int32))
      mem = mem._replace(seen=seen)
      scores = scores.at[slots].set(-losses[:b], mode="drop")
    else:
      mem, scores = buffers.loss_aware_add(
          sstate.memory, scores, key, rows["x"], rows["y"], rows["task"],
          sstate.experience, -losses[:b], rows["mask"],
          balanced=selection == "labrs", num_classes=ctx.info.num_classes,
          after=info.loss)
    return sstate._replace(memory=mem, scores=scores)

  @functools.partial(jax.jit, static_argnums=0)
  def correct_bias(ctx, ss, params, model_state, classes):
    mem = ss.memory
    logits = features(lambda p, ms, x, t: ctx.logits(p, ms, x, t), params,
                      model_state, mem.x, mem.task)
    key = jax.random.fold_in(jax.random.split(ss.key)[1], ss.experience)
    scale, shift = fit_bias_control(
        key, logits, mem.y, mem.valid, classes, epochs=bic_epochs,
        batch_size=ctx.info.batch_size, learning_rate=bic_lr)
    return ss._replace(scale=scale, shift=shift, corrected=classes)

  def after_experience(ctx, state, experience):
    if bic_epochs == 0:
      return state
    ss = correct_bias(ctx, state.strategy, state.params, state.model_state,
                      experience_classes(ctx.info.num_classes, experience))
    return state.replace(strategy=ss)

  def predict(ctx, sstate, params, model_state, x, task):
    return bias_correct(ctx.logits(params, model_state, x, task),
                        sstate.scale[None], sstate.shift[None],
                        jnp.where(sstate.corrected, 0, -1))

  return Strategy(init=init, before_experience=mark_experience,
                  prepare_batch=prepare_batch, update_grads=update_grads,
                  after_step=after_step, after_experience=after_experience,
                  predict=predict, name="er_tricks")
