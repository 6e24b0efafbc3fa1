"""ER-AML: experience replay with an asymmetric metric-learning loss.

Caccia, Aljundi, Asadi, Tuytelaars, Pineau & Belilovsky (2022) observe
that when new classes arrive, the cross-entropy on the incoming rows pushes
the old classes' representations around, so the features drift abruptly.
ER-AML trains the incoming rows *without* the old classes' logits: each
incoming row ``x`` (label ``y``) is pulled toward a positive ``x⁺`` (same
class, not ``x`` itself) and away from a negative ``x⁻`` (another class of
the same task), both drawn from the memory plus the incoming batch, with
the supervised-contrastive loss (Khosla et al. 2020) on normalised
features ``h̄``; the replayed rows keep the cross-entropy (eq. 6 of the
paper):

.. math::
   L = -\\frac{\\tau}{\\tau_b}\\,\\frac{1}{|A|}\\sum_{a \\in A}
       \\frac{1}{|P(a)|}\\sum_{p \\in P(a)}
       \\log\\frac{\\exp(\\bar h_a \\cdot \\bar h_p / \\tau)}
                 {\\sum_{c \\in C}\\exp(\\bar h_a \\cdot \\bar h_c / \\tau)}
       \\;+\\; L_{CE}(\\text{replayed rows}),

where the anchors ``A`` are the incoming rows (each counted twice, as in
the authors' code), the contrasts ``C`` are the drawn positives and
negatives, and ``P(a)`` the contrasts with the anchor's label.

Implementation notes, following the authors' code (``pclucas14/AML``:
``methods/er_aml.py``, ``buffer.sample_pos_neg``, ``methods/er.py``): the
candidates are the memory plus the incoming batch; "same task" is the
same experience (their task-aware setting, where the task index counts
experiences; jaxcl's class-incremental task ids are all 0); a row without a valid positive
or negative is left out (its contrasts too); ``τ = 0.2`` (their
``supcon_temperature`` default) and ``τ_b = 0.07``; the first experience
trains the incoming rows with the plain cross-entropy and replays nothing;
the memory is a reservoir filled after each step. The features are the
model's backbone output (their ``return_hidden``).

References:
  Caccia et al., `New insights on reducing abrupt representation change in
  online continual learning <https://openreview.net/forum?id=N8MaByOzUfb>`_,
  ICLR 2022.
  Khosla et al., `Supervised contrastive learning
  <https://arxiv.org/abs/2004.11362>`_, NeurIPS 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.models.classifier import l2_normalise
from jaxcl.state import cross_entropy
from jaxcl.strategies._replay_memory import replay_sizer
from jaxcl.strategies.replay import append_rows, reservoir_step
from jaxcl.strategy import Strategy, mark_experience
from jaxcl.train import init_variables

__all__ = ["er_aml", "ERAMLState", "sample_pos_neg", "sup_con_loss"]

_NEG = -1e9


class ERAMLState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  experience: jax.Array   # int32 scalar: index of the current experience
  model_state: Any        # the model state's structure (features)
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def sample_pos_neg(key: jax.Array, y: jax.Array, task: jax.Array,
                   ok: jax.Array, cand_y: jax.Array, cand_task: jax.Array,
                   cand_ok: jax.Array, offset: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One positive and one negative candidate per anchor, uniformly.

  Args:
    key: PRNG key.
    y, task, ok: the ``B`` anchors' labels, task (here: experience) ids
      and validity.
    cand_y, cand_task, cand_ok: the ``N`` candidates'; anchor ``i`` is
      candidate ``offset + i`` (never its own positive).

  Returns:
    ``(pos, neg, valid)``: candidate indices ``(B,)`` and whether the
    anchor is valid and had both a positive and a negative.
  """
  b, n = y.shape[0], cand_y.shape[0]
  itself = jnp.arange(n)[None, :] == (offset + jnp.arange(b))[:, None]
  same = y[:, None] == cand_y[None, :]
  pos_ok = same & ~itself & cand_ok[None, :]
  neg_ok = ~same & (task[:, None] == cand_task[None, :]) & cand_ok[None, :]
  kp, kn = jax.random.split(key)
  pos = jnp.argmax(jnp.where(pos_ok, jax.random.uniform(kp, (b, n)), -1.0),
                   axis=1)
  neg = jnp.argmax(jnp.where(neg_ok, jax.random.uniform(kn, (b, n)), -1.0),
                   axis=1)
  valid = ok & jnp.any(pos_ok, axis=1) & jnp.any(neg_ok, axis=1)
  return pos, neg, valid


def _take_candidates(mem_x: jax.Array, x_in: jax.Array,
                     idx: jax.Array) -> jax.Array:
  """Rows ``idx`` of the candidates (the memory's rows, then ``x_in``'s),
  gathered from each without concatenating them: a concatenation would
  copy the whole memory every step."""
  k = mem_x.shape[0]
  from_mem = mem_x[jnp.clip(idx, 0, k - 1)].astype(x_in.dtype)
  from_in = x_in[jnp.clip(idx - k, 0, x_in.shape[0] - 1)]
  pick = (idx < k).reshape((-1,) + (1,) * (x_in.ndim - 1))
  return jnp.where(pick, from_mem, from_in)


def sup_con_loss(anchors: jax.Array, anchor_y: jax.Array,
                 anchor_ok: jax.Array, contrasts: jax.Array,
                 contrast_y: jax.Array, contrast_ok: jax.Array,
                 temperature: float, base_temperature: float) -> jax.Array:
  """The supervised-contrastive loss of normalised ``anchors`` against
  normalised ``contrasts`` (rows with ``*_ok`` False take no part; 0 when
  no anchor is valid)."""
  sim = anchors @ contrasts.T / temperature
  sim = jnp.where(contrast_ok[None, :], sim, _NEG)
  sim = sim - jax.lax.stop_gradient(jnp.max(sim, axis=1, keepdims=True))
  log_prob = sim - jax.scipy.special.logsumexp(sim, axis=1, keepdims=True)
  positive = (anchor_y[:, None] == contrast_y[None, :]) & contrast_ok[None, :]
  mean_pos = (jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1)
              / jnp.maximum(jnp.sum(positive, axis=1), 1))
  w = anchor_ok.astype(jnp.float32)
  return (-(temperature / base_temperature) * jnp.sum(w * mean_pos)
          / jnp.maximum(jnp.sum(w), 1.0))


def er_aml(mem_size: int = 200, batch_size: int = 0,
           temperature: float = 0.2,
           base_temperature: float = 0.07) -> Strategy:
  """ER-AML.

  Args:
    mem_size: memory capacity in examples (a reservoir).
    batch_size: replayed examples per step; 0 means the training batch size
      (the authors' default: as many as incoming).
    temperature: ``τ`` of the contrastive loss (the authors' code: 0.2).
    base_temperature: ``τ_b`` (0.07).

  Raises:
    ValueError: a non-positive ``mem_size`` or temperature, a negative
      ``batch_size`` or one larger than ``mem_size`` (at ``init`` for the
      default).
  """
  replay_size = replay_sizer("er_aml", mem_size, batch_size)
  checks.positive("er_aml: temperature", temperature)
  checks.positive("er_aml: base_temperature", base_temperature)

  def init(ctx, key, params):
    del params
    replay_size(ctx)
    k_ms, k_run = jax.random.split(key)
    _, variables = init_variables(ctx, k_ms)
    return ERAMLState(buffers.init(mem_size, ctx.info.input_shape),
                      jnp.zeros((), jnp.int32), variables, k_run)

  def prepare_batch(ctx, sstate, batch, key):
    b = ctx.info.batch_size
    mem = sstate.memory
    k_re, k_pn = jax.random.split(key)
    # Positives and negatives from the memory plus the incoming batch.
    x_in = batch["x"][:b]
    # "Same task" is the same experience (the authors' task index), so
    # negatives come from the incoming classes, never the old ones.
    exp_in = jnp.full((b,), sstate.experience, jnp.int32)
    pos, neg, valid = sample_pos_neg(
        k_pn, batch["y"][:b], exp_in,
        (batch["mask"][:b] > 0) & (sstate.experience > 0),
        jnp.concatenate([mem.y, batch["y"][:b]]),
        jnp.concatenate([mem.experience, exp_in]),
        jnp.concatenate([mem.valid, batch["mask"][:b] > 0]),
        offset=mem.y.shape[0])
    cand_y = jnp.concatenate([mem.y, batch["y"][:b]])
    drawn = jnp.concatenate([pos, neg])
    batch = dict(batch, aml_x=_take_candidates(mem.x, x_in, drawn),
                 aml_y=cand_y[drawn], aml_valid=valid)
    idx, ok = buffers.sample(mem, k_re, replay_size(ctx))
    # No replay during the first experience (the memory holds only it).
    ok = ok & (sstate.experience > 0)
    return append_rows(batch, buffers.gather(mem, idx, ok))

  def task_loss(ctx, sstate, logits, batch):
    b = ctx.info.batch_size
    y, mask = batch["y"], batch["mask"]
    first = (sstate.experience == 0).astype(jnp.float32)
    return (first * cross_entropy(logits[:b], y[:b], mask[:b])
            + cross_entropy(logits[b:], y[b:], mask[b:]))

  def loss(ctx, sstate, params, batch, logits):
    del logits
    b = ctx.info.batch_size
    x = jnp.concatenate([batch["x"][:b], batch["aml_x"]])
    task = jnp.tile(batch["task"][:b], 3)
    valid = batch["aml_valid"]
    twice = jnp.concatenate([valid, valid])
    # Training mode, as the step's own forward pass.
    f, _ = ctx.apply(params, sstate.model_state, x, task, train=True,
                     features=True,
                     mask=jnp.concatenate([batch["mask"][:b], twice]))
    h = l2_normalise(f.reshape(f.shape[0], -1))
    y_in = batch["y"][:b]
    return sup_con_loss(jnp.concatenate([h[:b], h[:b]]),
                        jnp.concatenate([y_in, y_in]), twice, h[b:],
                        batch["aml_y"], twice, temperature, base_temperature)

  def after_step(ctx, sstate, info):
    return sstate._replace(memory=reservoir_step(ctx, sstate, info))

  return Strategy(init=init, before_experience=mark_experience,
                  prepare_batch=prepare_batch, task_loss=task_loss, loss=loss,
                  after_step=after_step, name="er_aml")
