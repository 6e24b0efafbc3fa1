"""Meta-Experience Replay (MER): experience replay with Reptile updates.

Riemer et al. (2019) train on each incoming example together with
examples drawn from a reservoir memory, and shape the steps so that the
gradients of different examples come to agree (less interference, more
transfer). Their Algorithm 1, for each incoming example :math:`(x, y)`:

.. math::
   \\begin{aligned}
   &\\theta^A_0 \\leftarrow \\theta\\\\
   &\\text{for } i = 1..s:\\quad
     B_i \\leftarrow \\{(x, y)\\} \\cup \\{k - 1 \\text{ examples of } M\\},
     \\quad \\theta^W_{i,0} \\leftarrow \\theta\\\\
   &\\qquad \\text{for } j = 1..k:\\quad
     \\theta^W_{i,j} \\leftarrow \\theta^W_{i,j-1}
     - \\alpha \\nabla \\ell(B_i[j], \\theta^W_{i,j-1})\\\\
   &\\qquad \\theta \\leftarrow \\theta^W_{i,0}
     + \\beta (\\theta^W_{i,k} - \\theta^W_{i,0})
     \\quad \\text{(within-batch Reptile)}\\\\
   &\\theta \\leftarrow \\theta^A_0 + \\gamma (\\theta - \\theta^A_0)
     \\quad \\text{(across-batch Reptile)}
   \\end{aligned}

followed by a reservoir update of the memory with :math:`(x, y)`. The
sequential single-example steps are what make the update align the
examples' gradients (its expectation carries the cross terms
:math:`-\\alpha\\,\\partial_\\theta (g_i \\cdot g_j)`).

``per_example=False`` is Mammoth's ``mer.py`` (behind Buzzega et al.
2020's MER rows): one SGD step on each batch's mean loss instead of the
``k`` single-example steps. With Mammoth's MNIST settings (``beta = gamma
= 1``, one batch) that is one step of experience replay with a stream
batch of 1 and 128 replayed examples.

Mechanics: ``prepare_batch`` draws the ``s`` batches' memory rows into
extra batch keys (``mer_x`` ...; the incoming rows stay as they are),
``update_grads`` runs the procedure above inside ``jit`` (a ``lax.scan``
over the incoming rows, the ``s`` batches and the ``k`` examples) and
returns the displacement as a gradient, :math:`(\\theta - \\theta_{\\rm
MER}) / \\alpha`, plus the gradient of any other chained member's loss.
So an SGD optimiser at rate :math:`\\alpha` (``lr``, which the rows set to
the optimiser's) lands exactly on :math:`\\theta_{\\rm MER}`. Another
optimiser rescales the displacement (Adam at 1e-3 stalled Split Digits),
so ``init`` refuses an optimiser whose first update is not ``-lr * g``;
``check_optimizer=False`` lets it act as Reptile's outer optimiser. The
incoming rows' part of the task loss is reported but gives no gradient
(MER's steps are their gradient); rows a chained member appends to the
batch (replayed or generated ones) keep theirs. A stream batch of ``b >
1`` rows runs the procedure for each in turn; the memory takes the batch
after the step (Riemer's code offers each example right after its own
update; identical for ``b = 1``, the papers' setting).

Deviations: the ``k - 1`` memory rows of a batch are drawn without
replacement (Mammoth's draw; Riemer's code draws with replacement); the
incoming example is the batch's first, as in Riemer's code (Mammoth's
puts it last, which its one mean step does not see); memory rows that do
not exist yet (memory smaller than ``k - 1``) are skipped.

State: :class:`MERState` (the reservoir, the model state as the
experience started, which the inner steps run with, as DER's memory rows
do; the current experience; a key), fixed shapes.

References:
  Riemer, Cases, Ajemian, Liu, Rish, Tu & Tesauro, `Learning to learn
  without forgetting by maximizing transfer and minimizing interference
  <https://arxiv.org/abs/1810.11910>`_, ICLR 2019 (Algorithm 1; code
  ``mattriemer/MER``, ``model/meralg1.py``).
  Buzzega et al. 2020 (Mammoth's ``models/mer.py``, the MER rows of
  their Table 2).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies._replay_memory import init_memory
from jaxcl.strategies.replay import incoming_rows, reservoir_step
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["mer", "MERState", "reported_task_loss", "check_sgd_optimizer"]

# What another optimiser did to MER (check_sgd_optimizer's evidence).
_ADAM_STALLED = (" (on Split Digits, Adam at 1e-3 stalled at 0.49, against "
                 "0.92 with SGD at 0.1)")


class MERState(NamedTuple):
  memory: buffers.Memory  # reservoir over the stream
  model_state: Any        # model state as the experience started
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def check_sgd_optimizer(name: str, ctx, params, lr: float,
                        evidence: str = "") -> None:
  """Raises unless the optimiser's first update for a gradient ``g`` is
  ``-lr * g`` (plain or momentum SGD at ``lr``): probed once, at ``init``,
  on a constant gradient of 2 (Adam's first update is about ``-its_lr``
  whatever ``g``). For strategies whose ``update_grads`` runs an inner
  loop of SGD steps and hands the optimiser the displacement divided by
  ``lr`` (MER, DualNet); ``evidence`` says what another optimiser did."""
  with jax.ensure_compile_time_eval():
    probe = jax.tree.map(lambda p: np.full(np.shape(p), 2.0, np.float32),
                         params)
    upd, _ = ctx.tx.update(probe, ctx.tx.init(probe), probe)
    got = [np.asarray(u, np.float64).ravel() for u in jax.tree.leaves(upd)]
  flat = np.concatenate(got) if got else np.zeros(0)
  if not np.allclose(flat, -2.0 * lr, rtol=1e-3):
    seen = float(np.median(flat)) if flat.size else 0.0
    raise ValueError(
        f"{name}: the optimiser's first update for a gradient of 2 is "
        f"{seen:.3g}, not -2 * lr = {-2.0 * lr:g}. {name} hands the "
        f"optimiser its displacement divided by lr={lr}, which SGD at that "
        f"learning rate applies exactly; another optimiser (or "
        f"optimizer.clip_norm) rescales it{evidence}. Set "
        f"optimizer.name='sgd' and learning_rate={lr}, or "
        f"check_optimizer=False to use it as Reptile's outer optimiser")


def reported_task_loss(ctx, sstate, logits, batch) -> jax.Array:
  """A ``task_loss`` for strategies whose ``update_grads`` makes the
  incoming rows' gradient (MER, La-MAML): the mean cross-entropy over the
  batch, as usual, with the incoming rows' part reported without a
  gradient. Rows a chained member appends (replay, generated samples) keep
  theirs, so that member still trains."""
  del sstate
  own = (jnp.arange(logits.shape[0]) < ctx.info.batch_size)[:, None]
  logits = jnp.where(own, jax.lax.stop_gradient(logits), logits)
  return cross_entropy(logits, batch["y"], batch["mask"])

def mer(mem_size: int = 200, batch_size: int = 10, batches: int = 1,
        beta: float = 1.0, gamma: float = 1.0, lr: float = 0.1,
        per_example: bool = True, check_optimizer: bool = True) -> Strategy:
  """Meta-Experience Replay.

  Args:
    mem_size: reservoir capacity in examples.
    batch_size: memory examples in each batch (``k - 1``).
    batches: batches per incoming example (``s``).
    beta: within-batch Reptile rate.
    gamma: across-batch Reptile rate.
    lr: the inner SGD rate ``alpha``; give the optimiser's (plain SGD at
      this rate applies the procedure's update exactly).
    per_example: True for the paper's single-example steps within a
      batch; False for one step on the batch's mean loss (Mammoth's).
    check_optimizer: refuse (at ``init``) an optimiser whose first update
      is not ``-lr * g``; False lets another optimiser take MER's
      displacement as Reptile's outer optimisers do.

  Raises:
    ValueError: a non-positive ``mem_size``, ``batches`` or ``lr``; a
      negative ``batch_size`` or one larger than ``mem_size``; ``beta`` or
      ``gamma`` outside (0, 1]; a non-bool ``per_example`` or
      ``check_optimizer``; at ``init``, an optimiser whose first update
      is not ``-lr * g`` (unless ``check_optimizer=False``).
  """
  name = "mer"
  buffers.check_capacity(mem_size, f"{name}: mem_size")
  checks.whole(f"{name}: batch_size", batch_size, 0)
  buffers.replay_size(name, batch_size, mem_size, 1)
  checks.whole(f"{name}: batches", batches, 1)
  checks.positive(f"{name}: lr", lr)
  for arg, value in (("beta", beta), ("gamma", gamma)):
    checks.positive(f"{name}: {arg}", value)
    if value > 1:
      raise ValueError(f"{name}: {arg} must be in (0, 1], got {value!r}")
  checks.flag(f"{name}: per_example", per_example)
  checks.flag(f"{name}: check_optimizer", check_optimizer)

  def init(ctx, key, params):
    if check_optimizer:
      check_sgd_optimizer(name, ctx, params, lr, _ADAM_STALLED)
    memory, model_state, k_mem = init_memory(ctx, key, mem_size)
    return MERState(memory, model_state, jnp.zeros((), jnp.int32), k_mem)

  def prepare_batch(ctx, sstate, batch, key):
    n = ctx.info.batch_size * batches
    out = dict(batch)
    if batch_size == 0:
      return out
    keys = jax.random.split(key, n)
    idx, ok = jax.vmap(lambda k: buffers.sample(sstate.memory, k,
                                                batch_size))(keys)
    shape = (ctx.info.batch_size, batches, batch_size)
    mem = sstate.memory
    out[f"{name}_x"] = mem.x[idx].reshape(shape + mem.x.shape[1:])
    out[f"{name}_y"] = mem.y[idx].reshape(shape)
    out[f"{name}_task"] = mem.task[idx].reshape(shape)
    out[f"{name}_ok"] = ok.astype(jnp.float32).reshape(shape)
    return out

  def update_grads(ctx, sstate, grads, params, batch, key):
    del key
    # Only the incoming rows: a member chained before MER may append rows,
    # which are its own to train on through its loss.
    rows = incoming_rows(ctx, batch)
    # Each valid incoming row is one example of weight 1 in MER's SGD
    # steps. A member chained before MER may have turned the mask into loss
    # weights (the generative replays scale it by 1 / (B + R)); read as
    # weights here they would shrink the incoming rows' steps B + R times.
    rows["mask"] = (rows["mask"] > 0).astype(jnp.float32)
    b = ctx.info.batch_size

    def ce(p, x, y, task, w):
      out = ctx.logits(p, sstate.model_state, x, task, train=True, mask=w)
      return cross_entropy(out, y, w)

    # A chained member's fixed weights (ctx.freeze: e.g. PackNet's, progressive
    # networks', a frozen latent split) take no step, inner or outer: the
    # Reptile mixes then leave them where they are.
    grad = lambda *a: ctx.freeze(jax.grad(ce)(*a))
    sgd = lambda p, g: jax.tree.map(lambda a, d: a - lr * d, p, g)
    mix = lambda a, b_, rate: jax.tree.map(
        lambda u, v: u + rate * (v - u), a, b_)

    def one_batch(theta, inputs):
      x, y, task, w = inputs   # (k, ...): the incoming row, then memory
      if per_example:
        def one_example(p, row):
          xi, yi, ti, wi = row
          g = grad(p, xi[None], yi[None], ti[None], wi[None])
          return sgd(p, g), None
        after = jax.lax.scan(one_example, theta, (x, y, task, w))[0]
      else:
        after = sgd(theta, grad(theta, x, y, task, w))
      return mix(theta, after, beta), None

    def one_incoming(theta, i):
      # Each of the s batches: the incoming row first, then its memory rows
      # (the incoming rows' mask is the memory rows' ok).
      cols = []
      for f, m in (("x", "x"), ("y", "y"), ("task", "task"), ("mask", "ok")):
        v = rows[f][i]
        col = jnp.broadcast_to(v, (batches, 1) + v.shape)
        if batch_size:
          col = jnp.concatenate([col, batch[f"{name}_{m}"][i]], 1)
        cols.append(col)
      after = jax.lax.scan(one_batch, theta, tuple(cols))[0]
      new = mix(theta, after, gamma)
      # A padding row (mask 0) leaves the parameters alone.
      return jax.tree.map(lambda a, n: jnp.where(rows["mask"][i] > 0, n, a),
                          theta, new), None

    theta = jax.lax.stop_gradient(params)
    final = jax.lax.scan(one_incoming, theta, jnp.arange(b))[0]
    return jax.tree.map(lambda g, p, f: g + (p - f) / lr, grads, theta,
                        final)

  def after_step(ctx, sstate, info):
    return sstate._replace(memory=reservoir_step(ctx, sstate, info))

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, task_loss=reported_task_loss,
                  update_grads=update_grads, after_step=after_step,
                  name=name)
