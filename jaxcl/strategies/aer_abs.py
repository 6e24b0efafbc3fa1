"""AER + ABS: ER-ACE with alternate replay and asymmetric sample selection.

Millunzi et al. (2024) study replay under noisy labels. A mislabelled
example that sits in the memory is replayed again and again, so the model
memorises it; but an example the model is *not* trained on is forgotten
faster when its label is wrong than when it is right. Three changes to
ER-ACE (:mod:`jaxcl.strategies.er_ace`, whose loss this is) use that, as in
Mammoth's ``models/er_ace_aer_abs.py`` and ``utils/buffer.py`` (read for
this module):

**Sample insertion.** Of each incoming batch of ``n`` rows, only the
``round((1 - α) n)`` rows with the lowest loss (``α`` =
``alpha_sample_insertion``; the loss of the step's forward pass, before
the update, over the ACE-masked logits) are offered to the memory, lowest
first: likely-clean rows.

**ABS** (asymmetric balanced sampling, ``selection='abs'``). Each slot
carries the loss ``ℓ_i`` of its example: set when it is stored, refreshed
with its loss (full softmax) whenever it is replayed. Whether an offered
row is stored follows reservoir sampling (Mammoth's ``randint(0, n) < K``);
the slot it overwrites is drawn with :func:`jaxcl.buffers.abs_probs`,

.. math::
   p_i = \\begin{cases}
     \\frac{|P|}{K} \\frac{\\max_P \\ell - \\ell_i}
                         {\\sum_{j \\in P} (\\max_P \\ell - \\ell_j)}
       & i \\in P\\ \\text{(past experiences)} \\\\
     \\frac{|C|}{K} \\frac{\\ell_i - \\min_C \\ell}
                         {\\sum_{j \\in C} (\\ell_j - \\min_C \\ell)}
       & i \\in C\\ \\text{(the current one)} \\end{cases}

so a current entry with a high loss (likely noisy) goes first, and among
past entries a well-remembered one goes first (the hard ones are kept).
``'lars'`` (the paper's LASS) draws every slot as the current group does
(:func:`jaxcl.buffers.lars_probs` of the losses); ``'reservoir'`` is
plain algorithm R.

**AER** (alternate experience replay, ``aer=True``). Within an
experience, epochs alternate. In even epochs (0, 2, ...: "forgetting"
epochs) the replay term is 0 and the memory is fed, so the noisy rows,
forgotten, have a high loss and are not inserted. In odd epochs and the
last ("replay" epochs) the replay term is on and nothing is inserted; at
the start of each replay epoch the parameters are restored to their
values at the end of the previous replay epoch (in an experience's first
replay epoch: the weights the experience started from, which are the
previous experience's last replay epoch's unless a chained member's
hook changed them between experiences), so the model that is kept never
trained on the incoming data without replay; the optimiser state is not
restored.
Memory rows are drawn in every step, so their losses are refreshed in
forgetting epochs too.

The loss is ER-ACE's: the incoming rows' cross-entropy over the classes
they contain and the unseen ones (:func:`jaxcl.strategies.er_ace.
ace_logits`) plus the mean cross-entropy of ``batch_size`` memory rows,
switched off in forgetting epochs.

Differences from the reference, on purpose:

* The last epoch replays. Mammoth's ``is_aer_fitting_epoch`` treats the
  last epoch as a replay epoch (restore, no insertion, save), but its
  replay switch tests ``epoch % 2 == 0`` alone, so with an odd number of
  epochs the last one trains without replay (a comment there says "replay
  if ... epoch is odd (or last)"). With an even number, as in the paper,
  the two agree.
* One epoch is refused with ``aer=True``: epoch 0 would be both a
  forgetting and the last (replay) epoch; in Mammoth it inserts nothing,
  so the memory stays empty and the method is ACE without replay. Use
  ``aer=False`` for one pass (insertion and replay in every step).
* Past entries are those stored during an earlier experience (their
  experience tag), where Mammoth takes the labels below the current
  task's first class; the two agree on class-incremental streams whose
  classes arrive in increasing order, and Mammoth's treats every entry as
  current on a domain-incremental stream.
* ACE's unseen classes are those not yet in an incoming batch (as in
  :mod:`jaxcl.strategies.er_ace`), not Mammoth's ``>= max(seen)``.
* Only the parameters are restored, not the model state (BatchNorm
  statistics; ``project_params`` sees only the parameters): Mammoth's
  ``load_state_dict`` restores both. The MLPs here have none.
* The per-row losses come from the step's training-mode forward pass;
  Mammoth runs a second forward pass on the unaugmented inputs. jaxcl
  does not augment in the training loop, so they are the same inputs.
* Probabilities leave out Mammoth's ``1e-9`` terms, ties in the insertion
  are broken by row order, and scores start at 0 rather than ``-inf``
  (read only once every slot has been set).
* The buffer-fitting stage (``buffer_fitting_epochs``, MixMatch on the
  memory at an experience's end; 0 by default in Mammoth) is not here.

As in Mammoth's ``er_ace_aer_abs`` (unlike its ``er_ace``), the ACE mask
and the replay term apply from the first experience on.

Chained with members that append rows of their own (``replay``, ``gss``,
...): the replay term counts every appended row, as ER-ACE's does, so a
forgetting epoch switches the partners' replay off too; only aer_abs's
own rows (the last ``batch_size`` of those up to its own) refresh its
slots' losses.

Mechanics: the strategy counts its steps within the experience
(``before_experience`` resets the count and reads the epoch length,
``ceil(num_train / batch_size)``), so the epoch ``count // epoch_steps``
is known inside ``jit``; the number of epochs is ``train_epochs``, which
:func:`jaxcl.experiment.build_strategy` sets to the run's ``train.epochs``
when a config does not give it (a script that builds the strategy itself
passes it; a mismatch is refused when the first experience ends). ``project_params``
swaps in the saved parameters after the last step of a forgetting epoch;
``after_step`` saves them after the last step of a replay epoch.

State: :class:`AERABSState`, fixed shapes (the saved parameters are a copy
of the parameters' tree), so nothing recompiles between experiences.

References:
  Millunzi, Bonicelli, Porrello, Credi, Kolm & Calderara, `May the
  forgetting be with you: alternate replay for learning with noisy labels
  <https://arxiv.org/abs/2408.14284>`_, BMVC 2024.
  Caccia et al., `New insights on reducing abrupt representation change in
  online continual learning <https://arxiv.org/abs/2104.05025>`_, ICLR
  2022.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies._replay_memory import replay_sizer
from jaxcl.strategies.er_ace import ace_logits, present_classes
from jaxcl.strategies.er_tricks import row_losses
from jaxcl.strategies.replay import append_rows, incoming_rows
from jaxcl.strategy import Strategy

__all__ = ["aer_abs", "AERABSState", "SELECTIONS", "insertion_counts",
           "clean_order", "epoch_of", "is_replay_epoch"]

SELECTIONS = ("abs", "lars", "reservoir")

# Batch keys: the replayed rows' slots (K for an empty draw).
_SLOTS = "aer_abs_slots"


class AERABSState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  losses: jax.Array       # float32 (K,): each entry's loss, last seen
  seen: jax.Array         # bool (C,): classes in some incoming batch so far
  experience: jax.Array   # int32 scalar: index of the current experience
  count: jax.Array        # int32 scalar: steps taken in this experience
  epoch_steps: jax.Array  # int32 scalar: steps per epoch of this experience
  saved: Any              # params' tree: weights at the last replay epoch's end
  has_saved: jax.Array    # bool scalar: ``saved`` holds weights
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def insertion_counts(alpha: float, batch_size: int) -> np.ndarray:
  """``k[n] = round((1 - alpha) n)`` for ``n = 0..batch_size``: rows of a
  batch of ``n`` offered to the memory (Python's round, half to even, in
  float64 as Mammoth computes it; a table so that float32 rounding inside
  ``jit`` cannot move a ``.5``)."""
  return np.array([round((1 - alpha) * n) for n in range(batch_size + 1)],
                  np.int32)


def clean_order(losses: jax.Array, mask: jax.Array, counts: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """``(order, offered)``: the rows by increasing loss (padding last, ties
  by position), and which positions of that order are offered: the first
  ``counts[n]`` of the ``n`` rows with ``mask > 0``."""
  ok = mask > 0
  order = jnp.argsort(jnp.where(ok, losses, jnp.inf), stable=True)
  n = jnp.sum(ok, dtype=jnp.int32)
  offered = jnp.arange(losses.shape[0]) < counts[n]
  return order, offered & ok[order]


def epoch_of(sstate: AERABSState) -> jax.Array:
  """The current epoch within the experience (int32)."""
  return sstate.count // jnp.maximum(sstate.epoch_steps, 1)


def is_replay_epoch(epoch: jax.Array, epochs: int) -> jax.Array:
  """AER's replay epochs: the odd ones and the last."""
  return (epoch % 2 == 1) | (epoch == epochs - 1)


def aer_abs(mem_size: int = 200, batch_size: int = 0,
            selection: str = "abs", aer: bool = True,
            alpha_sample_insertion: float = 0.75,
            train_epochs: int = 2) -> Strategy:
  """ER-ACE with alternate replay (AER) and asymmetric balanced sampling
  (ABS), Mammoth's ``er_ace_aer_abs``.

  Args:
    mem_size: memory capacity ``K`` in examples.
    batch_size: replayed rows per step; 0 means the training batch size.
    selection: which slot a stored row overwrites: ``'abs'`` (Mammoth's
      default), ``'lars'`` (the paper's LASS) or ``'reservoir'``.
    aer: alternate forgetting and replay epochs (Mammoth's ``use_aer``);
      False inserts and replays in every step.
    alpha_sample_insertion: the fraction of each incoming batch, those with
      the highest loss, kept out of the memory, in ``[0, 1)`` (Mammoth:
      0.75).
    train_epochs: the run's epochs per experience (``train.epochs``; from a
      config, filled in from it when not given); with ``aer`` at least 2.

  Raises:
    ValueError: a non-positive ``mem_size``, a negative ``batch_size`` or
      one larger than ``mem_size`` (at ``init`` for the default), an
      unknown ``selection``, ``alpha_sample_insertion`` outside ``[0, 1)``,
      ``train_epochs`` below 1 (below 2 with ``aer``); when an experience
      ends, a number of epochs other than ``train_epochs``.
  """
  replay_size = replay_sizer("aer_abs", mem_size, batch_size)
  buffers.replay_size("aer_abs", batch_size, mem_size, 0)
  if selection not in SELECTIONS:
    raise ValueError(f"aer_abs: unknown selection {selection!r}; valid: "
                     f"{list(SELECTIONS)}")
  checks.flag("aer_abs: aer", aer)
  a = alpha_sample_insertion
  if not isinstance(a, numbers.Real) or isinstance(a, bool) or \
      not math.isfinite(a) or not 0.0 <= a < 1.0:
    raise ValueError(f"aer_abs: alpha_sample_insertion must be a number in "
                     f"[0, 1) (the fraction of each batch kept out of the "
                     f"memory; Mammoth's percentages are not accepted), got "
                     f"{a!r}")
  checks.whole("aer_abs: train_epochs", train_epochs, 1,
               "the run's train.epochs")
  if aer and train_epochs < 2:
    raise ValueError(
        f"aer_abs: aer=True needs train_epochs >= 2 (forgetting and replay "
        f"epochs alternate; with one epoch the memory is never filled), got "
        f"{train_epochs}; use aer=False for a single pass")
  epochs = int(train_epochs)

  def init(ctx, key, params):
    replay_size(ctx)
    return AERABSState(
        memory=buffers.init(mem_size, ctx.info.input_shape),
        losses=jnp.zeros((mem_size,), jnp.float32),
        seen=jnp.zeros((ctx.info.num_classes,), bool),
        experience=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
        epoch_steps=jnp.ones((), jnp.int32),
        saved=jax.tree.map(jnp.zeros_like, params),
        has_saved=jnp.zeros((), bool), key=key)

  def before_experience(ctx, state, experience):
    steps = -(-experience.num_train // ctx.info.batch_size)
    ss = state.strategy._replace(
        experience=jnp.asarray(experience.index, jnp.int32),
        count=jnp.zeros((), jnp.int32),
        epoch_steps=jnp.asarray(steps, jnp.int32))
    if aer and experience.index > 0:
      # The weights the experience starts from: those of the previous
      # experience's last (replay) epoch, as the reference restores, unless
      # a hook changed them since (a chained member's after_experience or
      # before_experience: PackNet's pruning, CWR*'s head), which a restore
      # must not undo. A copy: the compiled loop donates the state.
      ss = ss._replace(saved=jax.tree.map(jnp.copy, state.params),
                       has_saved=jnp.ones((), bool))
    return state.replace(strategy=ss)

  def after_experience(ctx, state, experience):
    del ctx
    ss = state.strategy
    count, steps = int(ss.count), int(ss.epoch_steps)
    if count != epochs * steps:
      raise ValueError(
          f"aer_abs: experience {experience.index} ran {count} steps, "
          f"{count / steps:g} epochs of {steps}, but train_epochs={epochs}; "
          f"give aer_abs train_epochs equal to the run's train.epochs")
    return state

  def replay_on(sstate):
    if not aer:
      return jnp.ones((), bool)
    return is_replay_epoch(epoch_of(sstate), epochs)

  def prepare_batch(ctx, sstate, batch, key):
    # Drawn in every step, forgetting epochs included: the replayed rows'
    # losses refresh their slots' scores (Mammoth: "always sample from
    # buffer").
    r = replay_size(ctx)
    idx, ok = buffers.sample(sstate.memory, key, r)
    # Each row up to ours, with its memory slot (K: none, dropped when
    # written): an earlier chain member may have appended rows before ours
    # and a later one after, so ours are the last r of this array.
    start = batch["y"].shape[0]
    out = append_rows(batch, buffers.gather(sstate.memory, idx, ok))
    out[_SLOTS] = jnp.concatenate([
        jnp.full((start,), mem_size, jnp.int32),
        jnp.where(ok, idx, mem_size).astype(jnp.int32)])
    return out

  def incoming_logits(ctx, sstate, logits, batch):
    b = ctx.info.batch_size
    return ace_logits(logits[:b], batch["y"][:b], batch["mask"][:b],
                      sstate.seen)

  def task_loss(ctx, sstate, logits, batch):
    b = ctx.info.batch_size
    y, mask = batch["y"], batch["mask"]
    inc = cross_entropy(incoming_logits(ctx, sstate, logits, batch), y[:b],
                        mask[:b])
    rep = cross_entropy(logits[b:], y[b:], mask[b:])
    return inc + jnp.where(replay_on(sstate), rep, 0.0)

  def project_params(ctx, sstate, params):
    if not aer:
      return params
    e = epoch_of(sstate)
    last_step = (sstate.count + 1) % jnp.maximum(sstate.epoch_steps, 1) == 0
    # After a forgetting epoch's last step, the next (replay) epoch starts
    # from the weights saved at the end of the previous replay epoch.
    restore = (last_step & (e + 1 < epochs) & is_replay_epoch(e + 1, epochs)
               & ~is_replay_epoch(e, epochs) & sstate.has_saved)
    return jax.tree.map(lambda s, p: jnp.where(restore, s, p),
                        sstate.saved, params)

  def after_step(ctx, sstate, info):
    b = ctx.info.batch_size
    counts = insertion_counts(alpha_sample_insertion, b)
    batch = info.batch
    # Our replayed rows: refresh their slots' losses (full softmax).
    n = batch[_SLOTS].shape[0]
    ce = row_losses(info.logits[:n], batch["y"][:n])
    losses = sstate.losses.at[batch[_SLOTS]].set(ce, mode="drop")
    rows = incoming_rows(ctx, batch)
    inc = row_losses(incoming_logits(ctx, sstate, info.logits, batch),
                     rows["y"])
    order, offered = clean_order(inc, rows["mask"], jnp.asarray(counts))
    insert = ~replay_on(sstate) if aer else jnp.ones((), bool)
    offered = offered & insert
    x, y, t = rows["x"][order], rows["y"][order], rows["task"][order]
    key = jax.random.fold_in(sstate.key, sstate.memory.seen)
    if selection == "reservoir":
      slots, n_seen = buffers.reservoir_slots(sstate.memory, key, offered,
                                              after=info.loss)
      mem = buffers.put_rows(sstate.memory, slots, x, y, t,
                             jnp.full((b,), sstate.experience, jnp.int32))
      mem = mem._replace(seen=n_seen)
      losses = losses.at[slots].set(inc[order], mode="drop")
    else:
      past = None
      if selection == "abs":
        past = sstate.memory.valid & (sstate.memory.experience
                                      < sstate.experience)
      mem, losses = buffers.loss_aware_add(
          sstate.memory, losses, key, x, y, t, sstate.experience,
          inc[order], offered, balanced=False,
          num_classes=ctx.info.num_classes, after=info.loss, past=past)
    seen = sstate.seen | present_classes(rows["y"], rows["mask"],
                                         sstate.seen.shape[0])
    out = sstate._replace(memory=mem, losses=losses, seen=seen,
                          count=sstate.count + 1)
    if not aer:
      return out
    last_step = (sstate.count + 1) % jnp.maximum(sstate.epoch_steps, 1) == 0
    save = last_step & is_replay_epoch(epoch_of(sstate), epochs)
    saved = jax.tree.map(lambda p, s: jnp.where(save, p, s),
                         info.params_after, sstate.saved)
    return out._replace(saved=saved, has_saved=sstate.has_saved | save)

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, task_loss=task_loss,
                  project_params=project_params, after_step=after_step,
                  after_experience=after_experience, name="aer_abs")
