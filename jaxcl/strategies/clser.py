"""CLS-ER: experience replay with a plastic and a stable semantic memory.

Arani, Sarfraz & Zonooz (2022) pair a *working model* ``θ_W``, trained by
experience replay, with two exponential moving averages of its weights,
the *plastic* (``θ_P``, updated often: short-term memory) and the
*stable* (``θ_S``, updated rarely: long-term memory) semantic memories,
after the complementary learning systems of the brain. Each step trains
``θ_W`` on the incoming batch ``B`` joined with ``M_B``, ``batch_size``
examples drawn uniformly without replacement from a reservoir memory
``M``, and pulls its logits on ``M_B`` towards those of the memory that
is more confident in the example's true class:

.. math::
   \\mathcal{L}(\\theta_W) =
     \\mathbb{E}_{(x, y) \\sim B \\cup M_B}\\big[\\ell(y, f(x; \\theta_W))\\big]
   + \\lambda\\, \\mathbb{E}_{(x, y) \\sim M_B}\\big[
       \\lVert Z(x, y) - f(x; \\theta_W) \\rVert^2\\big],

.. math::
   Z(x, y) = \\begin{cases}
     f(x; \\theta_S) & \\text{if } \\mathrm{softmax}(f(x; \\theta_S))_y >
                       \\mathrm{softmax}(f(x; \\theta_P))_y, \\\\
     f(x; \\theta_P) & \\text{otherwise (ties too)},
   \\end{cases}

with ``Z`` held constant (no gradient reaches the memories). After the
optimiser step ``t`` (counted from 1 over the whole stream), each memory
``m ∈ {P, S}`` is moved towards the updated working weights with
probability ``r_m`` (one Bernoulli draw per memory and step):

.. math::
   \\theta_m \\leftarrow \\alpha_t\\, \\theta_m + (1 - \\alpha_t)\\, \\theta_W,
   \\qquad \\alpha_t = \\min\\Big(1 - \\frac{1}{t + 1},\\ \\alpha_m\\Big),

the ramp ``1 - 1/(t+1)`` letting the memories follow the working model
closely while it is young. The memory is a reservoir fed every step with
the incoming rows (:func:`jaxcl.strategies.replay.reservoir_step`), so
CLS-ER needs no experience boundaries. Symbols and arguments: ``λ`` is
``lam``, ``r_P`` / ``r_S`` are ``plastic_rate`` / ``stable_rate``,
``α_P`` / ``α_S`` are ``plastic_alpha`` / ``stable_alpha``.

This follows the authors' code (NeurAI-Lab/CLS-ER, ``models/clser.py``,
on Mammoth) exactly where the paper leaves a choice: the cross-entropy is
the mean over the ``|B| + |M_B|`` joined rows; the consistency term is
PyTorch's ``MSELoss`` averaged over the replayed rows *and* the logits
(:func:`jaxcl.strategies.der.logit_mse`); the memory with the strictly
higher true-class probability wins; the ramp uses the step count after
the step; both terms are 0 while the memory is empty (the code skips
them); both memories start as copies of the initial working model.

``predict`` uses the **stable model's parameters**, as the code's
reported numbers do (it evaluates the working, plastic and stable models
and the paper reports the stable one); ``predict_with='plastic'`` or
``'working'`` gives the others.

Deviations: the working model's logits on ``M_B`` are the rows of the
step's own forward pass on ``B ∪ M_B`` (the code runs the network a
second time on ``M_B`` alone; the same numbers for a model without batch
norm). The memories run in training mode (as in the code) with the model
state as the experience started; prediction uses the stable parameters
with the working model's model state (running batch-norm statistics),
where the code's stable model keeps statistics of its own (only
parameters are averaged there, its buffers follow its own forward passes
on the memory batches). Same for an MLP.

State: :class:`CLSERState`, fixed shapes (the memory, two parameter-shaped
pytrees, counters), so nothing recompiles between experiences and it
checkpoints and vmaps like any state. The Bernoulli draws and the ramp
are traced: the whole update runs inside the compiled step.

Defaults are the code's best settings for Split MNIST (``seq-mnist`` in
``utils/best_args.py``, memory 200 and 500 alike): ``λ = 2``, ``r_P =
1``, ``α_P = 0.99``, ``r_S = 0.9``, ``α_S = 0.99``. The code pairs them
with a stream batch of 10 and 128 replayed examples at learning rate
0.03 (memory 200) or 32 at 0.1 (memory 500); ``batch_size = 0`` here
replays as many as the stream batch (see docs/notes_replay.md).

References:
  Arani, Sarfraz & Zonooz, `Learning fast, learning slow: a general
  continual learning method based on complementary learning system
  <https://arxiv.org/abs/2201.12604>`_, ICLR 2022.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.strategies._replay_memory import init_memory, replay_sizer
from jaxcl.strategies.der import logit_mse
from jaxcl.strategies.replay import append_rows, reservoir_step
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["clser", "CLSERState", "PREDICT_WITH", "ema_update",
           "consistency_target"]

PREDICT_WITH = ("stable", "plastic", "working")


class CLSERState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of examples, labels, task ids
  plastic: Any            # like params: θ_P, the plastic semantic memory
  stable: Any             # like params: θ_S, the stable semantic memory
  step: jax.Array         # int32 scalar: optimiser steps so far (code's
                          # global_step), over the whole stream
  model_state: Any        # model state as the experience started (BN)
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; reservoir keys fold in memory.seen


def ema_update(ema: Any, params: Any, alpha: float, step: jax.Array,
               draw: jax.Array) -> Any:
  """``α_t ema + (1 - α_t) params`` where ``draw`` (a traced bool) is
  True, else ``ema``; ``α_t = min(1 - 1/(step + 1), alpha)``."""
  a = jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), alpha)
  return jax.tree.map(
      lambda e, w: jnp.where(draw, a * e + (1.0 - a) * w, e).astype(e.dtype),
      ema, params)


def consistency_target(plastic: jax.Array, stable: jax.Array,
                       y: jax.Array) -> jax.Array:
  """Per row, the stable logits where the stable model's softmax gives the
  true class ``y`` a strictly higher probability than the plastic one's,
  else the plastic logits (``(N, C)`` logits, ``(N,)`` labels)."""
  p_s = jnp.take_along_axis(jax.nn.softmax(stable, axis=-1), y[:, None], 1)
  p_p = jnp.take_along_axis(jax.nn.softmax(plastic, axis=-1), y[:, None], 1)
  return jnp.where(p_s > p_p, stable, plastic)


def _rate(name: str, value: Any) -> None:
  """A probability or decay in [0, 1]."""
  # NaN fails both comparisons; a bool is not a rate.
  if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and 0.0 <= value <= 1.0):
    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def clser(mem_size: int = 200, lam: float = 2.0, plastic_rate: float = 1.0,
          plastic_alpha: float = 0.99, stable_rate: float = 0.9,
          stable_alpha: float = 0.99, batch_size: int = 0,
          predict_with: str = "stable") -> Strategy:
  """CLS-ER (complementary learning system experience replay).

  Args:
    mem_size: reservoir memory capacity in examples.
    lam: ``λ``, the weight of the consistency (logit squared error) term.
    plastic_rate: ``r_P`` in [0, 1], the probability that the plastic
      memory is updated after a step.
    plastic_alpha: ``α_P`` in [0, 1], its decay.
    stable_rate: ``r_S`` in [0, 1], the same for the stable memory (the
      paper wants ``r_S < r_P``; not enforced).
    stable_alpha: ``α_S`` in [0, 1], its decay.
    batch_size: memory examples replayed per step (both terms use the
      same draw); 0 means the training batch size.
    predict_with: the parameters ``predict`` uses: ``'stable'`` (the
      paper's), ``'plastic'`` or ``'working'``.

  Raises:
    ValueError: a non-positive ``mem_size``, a negative or non-finite
      ``lam``, a rate or decay outside [0, 1], a negative ``batch_size``
      or one larger than ``mem_size`` (at ``init`` for the default), an
      unknown ``predict_with``.
  """
  replay_size = replay_sizer("clser", mem_size, batch_size)
  buffers.replay_size("clser", batch_size, mem_size, 0)
  checks.nonnegative("clser: lam", lam)
  _rate("clser: plastic_rate", plastic_rate)
  _rate("clser: plastic_alpha", plastic_alpha)
  _rate("clser: stable_rate", stable_rate)
  _rate("clser: stable_alpha", stable_alpha)
  if predict_with not in PREDICT_WITH:
    raise ValueError(f"clser: unknown predict_with {predict_with!r}; valid: "
                     f"{list(PREDICT_WITH)}")

  def init(ctx, key, params):
    memory, model_state, k_mem = init_memory(ctx, key, mem_size, replay_size)
    # Copies: the loop donates the state, and the memories must not alias
    # the parameters (nor each other).
    copy = lambda t: jax.tree.map(jnp.copy, t)
    return CLSERState(memory, copy(params), copy(params),
                      jnp.zeros((), jnp.int32), model_state,
                      jnp.zeros((), jnp.int32), k_mem)

  def prepare_batch(ctx, sstate, batch, key):
    r = replay_size(ctx)
    idx, ok = buffers.sample(sstate.memory, key, r)
    start = batch["x"].shape[0]  # static: where the replayed rows go
    out = append_rows(batch, buffers.gather(sstate.memory, idx, ok))
    # The consistency term reads the working model's logits of these rows
    # from the step's forward pass (members chained after this one append
    # after them, so the positions hold).
    out["clser_rows"] = jnp.arange(start, start + r, dtype=jnp.int32)
    return out

  def loss(ctx, sstate, params, batch, logits):
    del params
    rows = batch["clser_rows"]
    x, y, task = batch["x"][rows], batch["y"][rows], batch["task"][rows]
    ok = batch["mask"][rows]
    memory_logits = lambda p: jax.lax.stop_gradient(ctx.logits(
        p, sstate.model_state, x, task, train=True,
        mask=ok).astype(jnp.float32))
    target = consistency_target(memory_logits(sstate.plastic),
                                memory_logits(sstate.stable), y)
    return lam * logit_mse(logits[rows].astype(jnp.float32), target, ok)

  def after_step(ctx, sstate, info):
    step = sstate.step + 1
    k_p, k_s = jax.random.split(info.key)
    # One traced Bernoulli draw per memory: no Python branch on values.
    draw_p = jax.random.uniform(k_p) < plastic_rate
    draw_s = jax.random.uniform(k_s) < stable_rate
    return sstate._replace(
        memory=reservoir_step(ctx, sstate, info),
        plastic=ema_update(sstate.plastic, info.params_after, plastic_alpha,
                           step, draw_p),
        stable=ema_update(sstate.stable, info.params_after, stable_alpha,
                          step, draw_s),
        step=step)

  def predict(ctx, sstate, params, model_state, x, task):
    chosen = {"stable": sstate.stable, "plastic": sstate.plastic,
              "working": params}[predict_with]
    return ctx.logits(chosen, model_state, x, task, train=False)

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, loss=loss,
                  after_step=after_step, predict=predict, name="clser")
