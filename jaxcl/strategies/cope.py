"""CoPE: continual prototype evolution with the pseudo-prototypical proxy loss.

De Lange & Tuytelaars (2021) learn online, from a stream of small batches
and without task ids, an embedding ``z = f(x) / ‖f(x)‖`` on the unit
sphere together with one prototype ``p_c`` per class seen, and classify by
the nearest prototype. Three pieces:

* **Prototypes evolve** after every batch, by momentum ``α`` towards the
  mean embedding of the class's rows in the batch (replayed rows
  included), and are re-normalised:

  .. math::
     \\bar p_c = \\frac{1}{|B_c|} \\sum_{i \\in B_c} z_i, \\qquad
     p_c \\leftarrow \\frac{\\alpha p_c + (1 - \\alpha) \\bar p_c}
                          {\\lVert \\alpha p_c + (1 - \\alpha) \\bar p_c
                           \\rVert},

  with ``z_i`` from the step's forward pass (before its parameter update),
  for the classes with rows in the batch only.
* **The PPP loss** (pseudo-prototypical proxy) pulls each row towards its
  class's prototype and towards the other rows of its class in the batch
  (pseudo-prototypes), and pushes rows of other classes away from both.
  With ``P(c | z; q)`` the probability of class ``c`` for ``z`` when class
  ``c`` is represented by ``q`` (its prototype, or a pseudo-prototype
  ``z_j`` of the batch) and every other seen class ``k`` by ``p_k``,

  .. math::
     P(c \\mid z; q) = \\frac{e^{q^\\top z / T}}
       {e^{q^\\top z / T} + \\sum_{k \\ne c,\\, k\\ \\text{seen}}
        e^{p_k^\\top z / T}},

  the attractor and repellor terms over the batch ``B`` (its classes ``c``,
  their rows ``B_c``) are

  .. math::
     \\mathcal{L}_{att} = -\\sum_c \\sum_{i \\in B_c} \\log \\frac{1}{|B_c|}
       \\Big[ P(c \\mid z_i; p_c)
              + \\sum_{j \\in B_c, j \\ne i} P(c \\mid z_i; z_j) \\Big],

     \\mathcal{L}_{rep} = -\\sum_c \\sum_{j \\in B_c} \\sum_{i \\notin B_c}
       \\log \\Big( 1 - \\tfrac12 \\big[ P(c \\mid z_i; p_c)
              + P(c \\mid z_i; z_j) \\big] \\Big),

     \\mathcal{L}_{PPP} = (\\mathcal{L}_{att} + \\mathcal{L}_{rep}) / |B|,

  the temperature ``T`` setting the concentration: the paper's attractor
  and repellor, written as its reference code's ``PPPloss`` computes them
  (only the paper's abstract was read here; the equations were read off
  that code and Avalanche's ``PPPloss``, which agree on the value). It
  replaces the cross-entropy (``task_loss``), so the model's outputs are
  never read as class scores.
* **Memory and replay.** A class-balanced memory of ``K`` (``mem_size``)
  examples: after ``|Y|`` classes are seen each keeps at most
  ``⌊K / |Y|⌋`` entries, a uniformly random subset of the class's examples
  so far (random replacement; the remainder of the division stays empty,
  as in the reference code). Every batch is the incoming rows plus
  ``batch_size`` rows drawn from the memory, class-balanced.

**Prediction** is the nearest prototype by cosine: ``predict`` returns
``z^⊤ p_c`` for the classes seen so far and ``-1e9`` for the others, so an
unseen class is never predicted once some class is seen.

**The embedding is the model's output layer** (as the reference code,
whose network ends in a linear layer of ``n_outputs`` units, and Avalanche's
``CoPEPlugin`` do): the ``task_loss`` hook receives it from the step's own
forward pass, so CoPE costs no second pass, and a linear output can point
anywhere on the sphere, while the backbone's ReLU features lie in the
non-negative orthant, where the repellor can push two classes no further
apart than orthogonal. Its dimension is the model's output size: a
config's ``model.outputs`` (``experiments/split_mnist_replay.py`` sets the
paper's 100 for Split MNIST; 0 gives one per class), or any width for a
model built through the API.

State (:class:`CoPEState`): the memory
(:func:`jaxcl.buffers.random_class_balanced_add`, drawn from by
:func:`jaxcl.buffers.class_balanced_sample`), a random priority per entry, the
``(C, D)`` prototypes with a ``seen`` mask, ``T`` and ``α`` (its fields
``temperature`` and ``momentum``: a sweep can vary them in one program),
all of fixed shape: nothing recompiles between experiences and every step
stays inside ``jit``. The memory is written in place (its writes follow
the step's loss, as :func:`jaxcl.buffers.reservoir_add`'s).

Where the paper is vague this follows the reference code
(``Mattdl/ContinualPrototypeEvolution``: ``model/prototypical/``), and
deviates as follows:

* Every class's initial prototype is drawn at ``init`` (uniform on
  ``[0, 1]^D``, normalised, as the reference draws it); a class enters the
  loss, the updates and prediction only once it appears in a batch (the
  reference creates the prototype then, before the loss of that batch).
  Avalanche draws on ``[-1, 1]^D`` and puts every class in the loss from
  the start.
* ``\\bar p_c`` is the plain mean of the unit embeddings (the reference's
  ``batch_momentum_incr``); Avalanche normalises it before the momentum
  step.
* Gradients as in the reference: the attractor's pseudo-prototypes and all
  prototypes are constants; the repellor's pseudo-prototypes carry
  gradient (Avalanche detaches those too).
* The memory keeps per class the entries with the largest random
  priorities (one uniform draw per example): a uniform random subset of the
  class's examples, the distribution of the reference's per-class
  reservoir, without its counters, and a shrinking quota keeps a uniform
  subset as the reference's random cut does.
* Replay draws without replacement with weights ``1 / n_c`` (``n_c`` the
  entries of the row's class): each draw takes a class uniformly, then an
  entry of it, as the reference's ``sample_random``, except that after the
  first draw a class's chance shrinks with the entries already taken from
  it (the reference keeps it uniform over classes with entries left).
* Until two classes are seen the loss is 0 (the reference skips the
  optimiser step; with plain SGD, as in the paper, that is the same).
* Rows count whole whatever their ``mask`` weight above 0; rows a chained
  member appends count as batch rows.
* One update per batch (the reference's ``n_iter=1``, its balanced
  benchmarks); its repeated iterations on one batch are not offered.
* Task ids are not used; a task-incremental stream (``kind='task'``)
  masks the model's outputs to the task's classes and is refused.
* Before any class is seen ``predict`` scores every class ``-1e9`` (class 0
  wins the argmax); the reference outputs a uniform distribution.

References:
  De Lange & Tuytelaars, `Continual prototype evolution: learning online
  from non-stationary data streams <https://arxiv.org/abs/2009.00919>`_,
  ICCV 2021 (reference code: github.com/Mattdl/ContinualPrototypeEvolution;
  Avalanche's ``CoPEPlugin`` and ``PPPloss``).
  Efraimidis & Spirakis, `Weighted random sampling with a reservoir
  <https://doi.org/10.1016/j.ipl.2005.11.003>`_, 2006 (random priorities).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.models.classifier import l2_normalise
from jaxcl.strategies._replay_memory import replay_sizer
from jaxcl.strategies.replay import append_rows, incoming_rows
from jaxcl.strategy import Strategy, mark_experience
from jaxcl.train import init_variables

__all__ = ["cope", "CoPEState", "ppp_loss", "update_prototypes",
           "present_classes"]

_NEG = -1e9  # score of an excluded term or class (finite: keeps grads finite)


class CoPEState(NamedTuple):
  memory: buffers.Memory  # K slots of input-shaped examples
  priority: jax.Array     # float32 (K,): each entry's uniform draw
  prototypes: jax.Array   # float32 (C, D): unit-norm p_c
  seen: jax.Array         # bool (C,): classes in some batch so far
  temperature: jax.Array  # float32 scalar: the PPP loss's T
  momentum: jax.Array     # float32 scalar: prototype momentum α
  experience: jax.Array   # int32 scalar: current experience (memory tags)
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def present_classes(y: jax.Array, valid: jax.Array, num_classes: int
                    ) -> jax.Array:
  """``(num_classes,)`` bool: the classes of the ``valid`` rows."""
  return jnp.zeros((num_classes,), bool).at[y].max(valid)


def ppp_loss(emb: jax.Array, y: jax.Array, valid: jax.Array,
             prototypes: jax.Array, active: jax.Array,
             temperature: jax.Array | float) -> jax.Array:
  """The PPP loss (module docstring) of one batch.

  Args:
    emb: ``(B, D)`` unit-norm embeddings.
    y: int ``(B,)`` labels; valid: bool ``(B,)``, the rows in the batch.
    prototypes: ``(C, D)`` unit-norm prototypes (constants).
    active: bool ``(C,)``: the classes with a prototype (seen so far, and
      those of this batch); the others are left out.
    temperature: ``T > 0``.

  Returns:
    The scalar loss, 0 when fewer than two classes are active.
  """
  emb = emb.astype(jnp.float32)
  b, c = emb.shape[0], prototypes.shape[0]
  p = jax.lax.stop_gradient(prototypes.astype(jnp.float32))
  sp = emb @ p.T / temperature                        # z_i·p_k / T: (B, C)
  # lse[i, c] = log Σ_{k active, k ≠ c} exp(z_i·p_k / T): the other
  # classes' prototypes, the denominator's shared part. Formed over a
  # (B, C, C) array rather than by subtracting class c's term from the
  # full sum, which cancels badly when that term dominates.
  others = active[None, :] & ~jnp.eye(c, dtype=bool)
  lse = jax.nn.logsumexp(jnp.where(others[None], sp[:, None, :], _NEG),
                         axis=-1)
  own = lambda a: jnp.take_along_axis(a, y[:, None], axis=1)[:, 0]
  lse_own, sp_own = own(lse), own(sp)
  # Everything in log space: P = σ(s - lse) and 1 - P = σ(lse - s), so a
  # near-certain probability does not round to log(0).
  # Attractor: row i against its prototype and its class's other rows,
  # the pseudo-prototypes (constants here, as in the reference code).
  att = emb @ jax.lax.stop_gradient(emb).T / temperature    # z_i·z_j / T
  same = (valid[:, None] & valid[None, :] & (y[:, None] == y[None, :])
          & ~jnp.eye(b, dtype=bool))
  terms = jnp.where(same, jax.nn.log_sigmoid(att - lse_own[:, None]), _NEG)
  proto = jax.nn.log_sigmoid(sp_own - lse_own)
  n_c = jnp.sum(same, axis=1) + 1                  # |B_c|: i's class rows
  log_e = jax.nn.logsumexp(jnp.concatenate([terms, proto[:, None]], 1),
                           axis=1) - jnp.log(n_c.astype(jnp.float32))
  attract = jnp.sum(jnp.where(valid, log_e, 0.0))
  # Repellor: row i (class ≠ c) against each pseudo-prototype z_j of class
  # c = y_j, paired with p_c; here the pseudo-prototypes carry gradient.
  rep = emb @ emb.T / temperature                  # [i, j] = z_i·z_j / T
  lse_ic, sp_ic = lse[:, y], sp[:, y]              # [i, j]: class c = y_j
  other = valid[:, None] & valid[None, :] & (y[:, None] != y[None, :])
  log_1m = jnp.logaddexp(jax.nn.log_sigmoid(lse_ic - rep),
                         jax.nn.log_sigmoid(lse_ic - sp_ic)) - jnp.log(2.0)
  repel = jnp.sum(jnp.where(other, log_1m, 0.0))
  n = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  loss = -(attract + repel) / n
  return jnp.where(jnp.sum(active) > 1, loss, 0.0)


def update_prototypes(prototypes: jax.Array, emb: jax.Array, y: jax.Array,
                      valid: jax.Array, momentum: jax.Array | float
                      ) -> jax.Array:
  """The momentum step of every class with ``valid`` rows (the others are
  unchanged): ``p_c ← normalise(α p_c + (1 - α) mean_{i ∈ B_c} z_i)``."""
  c = prototypes.shape[0]
  onehot = jax.nn.one_hot(y, c, dtype=jnp.float32) * valid[:, None]
  counts = jnp.sum(onehot, axis=0)
  mean = (onehot.T @ emb.astype(jnp.float32)) / jnp.maximum(counts, 1.0)[
      :, None]
  moved = l2_normalise(momentum * prototypes + (1.0 - momentum) * mean)
  return jnp.where(counts[:, None] > 0, moved, prototypes)


def cope(mem_size: int = 2000, temperature: float = 0.1,
         momentum: float = 0.99, batch_size: int = 0) -> Strategy:
  """CoPE.

  Defaults are the paper's Split MNIST setting (the reference code's
  ``main_MNIST.sh``: 200 entries per class for 10 classes, shared
  dynamically; ``loss_T`` 0.1, ``p_momentum`` 0.99, as many replayed as
  incoming rows), which are also Avalanche's ``T`` and ``alpha``.

  Args:
    mem_size: memory capacity ``K`` in examples, shared equally by the
      classes seen (at least one per class).
    temperature: the PPP loss's temperature ``T`` (> 0).
    momentum: the prototypes' momentum ``α`` in [0, 1] (1: prototypes stay
      at their random initial values; 0: each is its class's last batch
      mean).
    batch_size: rows replayed per step; 0 means the training batch size.

  Raises:
    ValueError: naming the value and the range allowed: a non-positive or
      non-finite ``temperature``, ``momentum`` outside [0, 1], a
      ``mem_size`` that is not a positive int, a negative ``batch_size`` or
      one above ``mem_size``; at ``init``, ``mem_size`` below the number of
      classes, a replayed batch above ``mem_size``, a task-incremental
      stream, or a model with fewer than 2 outputs.
  """
  replay_size = replay_sizer("cope", mem_size, batch_size)
  # Now rather than at init when the size is given (0: the stream's).
  buffers.replay_size("cope", batch_size, mem_size, 0)
  checks.positive("cope: temperature", temperature)
  if not (isinstance(momentum, numbers.Real) and
          not isinstance(momentum, bool) and math.isfinite(momentum) and
          0.0 <= momentum <= 1.0):
    raise ValueError(f"cope: momentum must be a number in [0, 1], got "
                     f"{momentum!r}")

  def init(ctx, key, params):
    c = ctx.info.num_classes
    if mem_size < c:
      raise ValueError(f"cope: mem_size={mem_size} leaves no memory slot "
                       f"for some of the {c} classes; use mem_size >= {c}")
    replay_size(ctx)
    if ctx.mask_task_logits:
      raise ValueError(
          "cope: the model's outputs are CoPE's embedding, and a "
          "task-incremental stream (scenario.kind='task') masks them to "
          "the task's classes; CoPE uses no task ids: use kind='class' or "
          "'domain'")
    x0 = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
    t0 = jnp.zeros((1,), jnp.int32)
    k_init, k_run, k_ms = jax.random.split(key, 3)
    # A model state of the right structure (e.g. batch norm statistics),
    # to trace the output's shape.
    fresh, model_state = init_variables(ctx, k_ms)
    params = fresh if params is None else params
    d = jax.eval_shape(lambda p: ctx.apply(p, model_state, x0, t0)[0],
                       params).shape[-1]
    if d < 2:
      raise ValueError(f"cope: the model has {d} output(s); the embedding "
                       "needs at least 2 dimensions")
    # The reference code's initial prototypes: uniform on [0, 1]^D, unit.
    protos = l2_normalise(jax.random.uniform(k_init, (c, d)))
    return CoPEState(
        memory=buffers.init(mem_size, ctx.info.input_shape),
        priority=jnp.zeros((mem_size,), jnp.float32),
        prototypes=protos, seen=jnp.zeros((c,), bool),
        temperature=jnp.asarray(temperature, jnp.float32),
        momentum=jnp.asarray(momentum, jnp.float32),
        experience=jnp.zeros((), jnp.int32), key=k_run)

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.class_balanced_sample(sstate.memory, key,
                                            replay_size(ctx),
                                            ctx.info.num_classes)
    return append_rows(batch, buffers.gather(sstate.memory, idx, ok))

  def task_loss(ctx, sstate, logits, batch):
    valid = batch["mask"] > 0
    active = sstate.seen | present_classes(batch["y"], valid,
                                           ctx.info.num_classes)
    return ppp_loss(l2_normalise(logits.astype(jnp.float32)), batch["y"],
                    valid, sstate.prototypes, active,
                    sstate.temperature)

  def after_step(ctx, sstate, info):
    batch = info.batch
    valid = batch["mask"] > 0
    c = ctx.info.num_classes
    seen = sstate.seen | present_classes(batch["y"], valid, c)
    # The step's own (pre-update) embeddings, as the reference code.
    emb = l2_normalise(info.logits.astype(jnp.float32))
    protos = update_prototypes(sstate.prototypes, emb, batch["y"], valid,
                               sstate.momentum)
    rows = incoming_rows(ctx, batch)
    quota = mem_size // jnp.maximum(jnp.sum(seen, dtype=jnp.int32), 1)
    key = jax.random.fold_in(sstate.key, sstate.memory.seen)
    mem, priority = buffers.random_class_balanced_add(
        sstate.memory, sstate.priority, key, rows["x"], rows["y"],
        rows["task"], sstate.experience, rows["mask"] > 0, quota,
        num_classes=c, after=info.loss)
    return sstate._replace(memory=mem, priority=priority, prototypes=protos,
                           seen=seen)

  def predict(ctx, sstate, params, model_state, x, task):
    out, _ = ctx.apply(params, model_state, x, task)
    cos = l2_normalise(out.astype(jnp.float32)) @ sstate.prototypes.T
    return jnp.where(sstate.seen[None, :], cos, _NEG)

  return Strategy(init=init, before_experience=mark_experience,
                  prepare_batch=prepare_batch, task_loss=task_loss,
                  after_step=after_step, predict=predict, name="cope")
