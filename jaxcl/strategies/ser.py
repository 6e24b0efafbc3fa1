"""SER: Strong Experience Replay, DER++ with a forward-consistency term.

Zhuo et al. (2023) keep DER++'s memory (a reservoir of examples with
their labels and the logits the network gave them when stored,
:mod:`jaxcl.strategies.der`) and its two memory terms, the *backward*
consistency with the past, and add a *forward* consistency: on the
current data, the network's outputs stay near those of the model the last
experience ended with, :math:`h_{\\theta_{t-1}}` (frozen), which stands
for what the old model would have answered. With :math:`\\ell` the
cross-entropy and :math:`h_\\theta` the network's pre-softmax outputs,
each step minimises

.. math::
   \\mathcal{L}(\\theta) =
     \\mathbb{E}_{(x, y) \\sim B}\\big[\\ell(y, h_\\theta(x))\\big]
   + \\mathbb{E}_{(x', y') \\sim M}\\big[\\ell(y', h_\\theta(x'))\\big]
   + \\alpha\\, \\mathbb{E}_{(x', z') \\sim M}
       \\big[\\lVert z' - h_\\theta(x') \\rVert_2^2\\big]
   + \\beta\\, \\mathbb{E}_{x \\sim B}
       \\big[\\lVert h_{\\theta_{t-1}}(x) - h_\\theta(x) \\rVert_2^2\\big],

the last two terms the backward (:math:`\\alpha`) and forward
(:math:`\\beta`) consistency losses.

Followed: the authors' code (``visiontao/cl``, ``model/ser.py``; its
``run.sh`` gives the settings), where the paper leaves a choice:

* one memory batch, of the training batch's size, serves both memory
  terms (DER++ draws two);
* the three terms after the current batch's cross-entropy are added only
  once an experience has ended (the code's ``net_old is not None``), so
  the first experience trains on the cross-entropy alone while the
  memory fills;
* the memory is a reservoir fed every step with the incoming examples
  and the logits of that step's forward pass (before the update), as
  DER's;
* both squared errors are averaged over rows *and* logits (PyTorch's
  ``F.mse_loss``), over every output (not only the classes seen), the
  two cross-entropies are separate means (one over the batch, one over
  the memory rows);
* the old model runs in evaluation mode (``net_old.eval()``), the
  current one in training mode.

Avalanche's ``SER`` differs: a class-balanced memory filled at each
experience's end, one cross-entropy over the batch and the memory rows
together. Not followed: the code is the paper's.

Mechanics: ``prepare_batch`` draws the memory rows into extra batch keys
(``ser_x``, ``ser_y``, ``ser_z``, ...); ``loss`` runs the network on them
in a forward pass of its own, with the model state as the experience
started (batch norm uses the batch's own statistics), and the frozen old
model on the training rows, in evaluation mode with that same state (the
model state the last experience ended with); before the first
experience's end neither pass runs (``lax.cond``). ``after_step`` stores
the incoming rows with their logits as DER does; ``after_experience``
keeps a copy of the parameters as the old model. The training rows are
left alone, so SER composes as DER does; beside a member that appends
rows (``replay+ser``) the forward term covers those rows too.

State: :class:`SERState`, fixed shapes (``mem_size`` examples and logit
vectors, one copy of the parameters), so nothing recompiles between
experiences and it checkpoints and vmaps like any state.

References:
  Zhuo, Cheng, Gao, Fan & Kankanhalli, `Continual learning with strong
  experience replay <https://arxiv.org/abs/2305.13622>`_, arXiv 2023.
  Buzzega, Boschini, Porrello, Abati & Calderara, `Dark experience for
  general continual learning: a strong, simple baseline
  <https://arxiv.org/abs/2004.07211>`_, NeurIPS 2020 (DER++).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies._replay_memory import init_memory, replay_sizer
from jaxcl.strategies.der import (draw_with_logits, logit_mse, logit_width,
                                  store_step)
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["ser", "SERState", "ser_terms"]


class SERState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of examples, labels, task ids
  logits: jax.Array       # (mem_size, outputs): logits when each was stored
  model_state: Any        # model state as the experience started (BN stats;
                          # also the old model's: the state it ended with)
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen
  old: Any                # like params: θ_{t-1}, as the last experience ended
  ready: jax.Array        # bool scalar: an experience has ended


def ser_terms(out_mem: jax.Array, y_mem: jax.Array, z_mem: jax.Array,
              ok_mem: jax.Array, out: jax.Array, out_old: jax.Array,
              mask: jax.Array, alpha: float, beta: float) -> jax.Array:
  """SER's terms after the batch's cross-entropy: the memory rows'
  cross-entropy, ``alpha`` times their squared error to the stored logits
  and ``beta`` times the training rows' squared error to the old model's
  outputs (each averaged over its valid rows, ``ok_mem`` / ``mask``, and
  the squared errors over the logits too)."""
  return (cross_entropy(out_mem, y_mem, ok_mem)
          + alpha * logit_mse(out_mem, z_mem, ok_mem)
          + beta * logit_mse(out, out_old, mask))


def ser(mem_size: int = 200, alpha: float = 0.2, beta: float = 0.2,
        batch_size: int = 0) -> Strategy:
  """Strong Experience Replay.

  Args:
    mem_size: memory capacity in examples (each with its label and
      logits).
    alpha: weight (>= 0) of the backward consistency, the memory rows'
      squared error to their stored logits.
    beta: weight (>= 0) of the forward consistency, the training rows'
      squared error to the old model's outputs.
    batch_size: memory entries replayed per step; 0 means the training
      batch size (the code's).

  The defaults are the code's ``run.sh`` for Permuted and Rotated MNIST
  (memory 200, alpha = beta = 0.2); its CIFAR-10 run uses 0.2 / 0.2,
  CIFAR-100 0.5 / 0.5, Tiny ImageNet 0.2 / 1.0.

  Raises:
    ValueError: a non-positive ``mem_size``, a negative or non-finite
      ``alpha`` / ``beta``, a negative ``batch_size`` or one larger than
      ``mem_size`` (at ``init`` for the default).
  """
  name = "ser"
  replay_size = replay_sizer(name, mem_size, batch_size)
  checks.nonnegative(f"{name}: alpha", alpha)
  checks.nonnegative(f"{name}: beta", beta)
  alpha, beta = float(alpha), float(beta)

  def init(ctx, key, params):
    memory, model_state, k_mem = init_memory(ctx, key, mem_size, replay_size)
    width = logit_width(ctx, params, model_state)
    # A copy: the loop donates the state (old and params must not alias).
    return SERState(memory, jnp.zeros((mem_size, width), jnp.float32),
                    model_state, jnp.zeros((), jnp.int32), k_mem,
                    jax.tree.map(jnp.copy, params), jnp.zeros((), bool))

  def prepare_batch(ctx, sstate, batch, key):
    out = dict(batch)
    out.update(draw_with_logits(name, sstate.memory, sstate.logits, key,
                                replay_size(ctx), labels=True))
    return out

  def loss(ctx, sstate, params, batch, logits):
    def terms():
      out_mem = ctx.logits(params, sstate.model_state, batch["ser_x"],
                           batch["ser_task"], train=True,
                           mask=batch["ser_ok"]).astype(jnp.float32)
      out_old = jax.lax.stop_gradient(ctx.logits(
          sstate.old, sstate.model_state, batch["x"], batch["task"],
          train=False)).astype(jnp.float32)
      return ser_terms(out_mem, batch["ser_y"], batch["ser_z"],
                       batch["ser_ok"], logits.astype(jnp.float32), out_old,
                       batch["mask"], alpha, beta)

    # Nothing (and no extra forward pass) before an experience has ended.
    return jax.lax.cond(sstate.ready, terms,
                        lambda: jnp.zeros((), jnp.float32))

  # Compiled once per factory; jit outputs are fresh buffers, so the old
  # model never aliases the (donated) parameters.
  @jax.jit
  def keep_old(ss, params):
    return ss._replace(old=params, ready=jnp.ones((), bool))

  def after_experience(ctx, state, experience):
    del ctx, experience
    return state.replace(strategy=keep_old(state.strategy, state.params))

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, loss=loss,
                  after_step=store_step, after_experience=after_experience,
                  name=name)
