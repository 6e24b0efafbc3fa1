"""Function Distance Regularization (FDR), as Buzzega et al. 2020 run it.

Benjamin, Rolnick & Kording (2019) regularise a network in *function*
space: at each experience's end a few of its examples are stored with the
network's outputs on them, and later training keeps the outputs on the
stored examples near the stored ones, measured by the L2 distance between
the softmax distributions. In Mammoth's ``fdr.py`` (the code behind
Buzzega et al. 2020's FDR rows) every step is two SGD steps, one for each
term: with :math:`B` the incoming batch, :math:`M_B` a batch drawn
uniformly from the memory, :math:`z` the stored logits and :math:`\\sigma`
the softmax,

.. math::
   \\theta' = \\theta - \\eta\\,\\nabla_\\theta\\,
     \\mathbb{E}_{(x, y) \\sim B}\\big[\\ell(y, f_\\theta(x))\\big],
   \\qquad
   \\theta'' = \\theta' - \\eta\\,\\alpha\\,\\nabla_{\\theta'}\\,
     \\mathbb{E}_{(x, z) \\sim M_B}
       \\big[\\lVert \\sigma(f_{\\theta'}(x)) - \\sigma(z)
       \\rVert_2\\big].

Here that is one step: the distance term is this library's look-ahead
penalty (``Strategy.lookahead_loss``), evaluated at :math:`\\theta +
\\Delta\\theta`, where :math:`\\Delta\\theta` is the update the optimiser
would make from the cross-entropy alone. Its gradient there is added to
the cross-entropy's, and the optimiser makes one update. For plain SGD
that is exactly the code's :math:`\\theta''` (test_mammoth_replay.py
checks it against the two steps); with momentum or Adam it is the same
idea with one optimiser state. The code parses ``alpha`` and never uses it (the
distance step has weight 1); ``alpha`` here is that weight, default 1, so
the default is the code's objective.

The memory is experience-balanced and filled only at experience ends (the
code's ``end_task``): after experience ``i`` each of the ``i + 1``
experiences seen keeps ``mem_size // (i + 1)`` examples, the new one a
uniform random subset of its training data (the code takes the first ones
of its shuffled loader) with the logits of the network as the experience
ends, the older ones shrunk at random (the code keeps each one's first).
So during experience 0 the memory is empty and FDR is plain fine-tuning.

Deviations: the stored logits come from the network in evaluation mode
(the code's runs in training mode; no difference for the MLPs of the
MNIST rows, and with batch norm evaluation mode gives each example's
output rather than one that depends on the memory batch); the memory rows
are run in training mode with the model state as the experience started,
as DER does. The L2 norm's gradient is taken as 0 where the two
distributions are equal (PyTorch's ``torch.norm`` subgradient), so
padding rows cannot give NaN.

State: :class:`FDRState`, fixed shapes (``mem_size`` examples and logit
vectors), so nothing recompiles between experiences.

References:
  Benjamin, Rolnick & Kording, `Measuring and regularizing networks in
  function space <https://arxiv.org/abs/1805.08289>`_, ICLR 2019.
  Buzzega, Boschini, Porrello, Abati & Calderara, `Dark experience for
  general continual learning: a strong, simple baseline
  <https://arxiv.org/abs/2004.07211>`_, NeurIPS 2020 (the FDR rows;
  Mammoth's ``models/fdr.py``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.strategies._replay_memory import init_memory, replay_sizer
from jaxcl.strategies.der import draw_with_logits, logit_width
from jaxcl.strategies.icarl import exemplar_hook
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["fdr", "FDRState", "softmax_distance"]


class FDRState(NamedTuple):
  memory: buffers.Memory  # mem_size slots, experience-balanced
  logits: jax.Array       # (mem_size, outputs): logits as each one's
                          # experience ended
  model_state: Any        # model state as the experience started (BN stats)
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key for the memory's random subsets


def softmax_distance(out: jax.Array, stored: jax.Array,
                     ok: jax.Array) -> jax.Array:
  """Mean over the valid rows (``ok``, float) of
  ``||softmax(out) - softmax(stored)||_2``, with gradient 0 where a row's
  two distributions are equal."""
  d = jax.nn.softmax(out, -1) - jax.nn.softmax(stored, -1)
  sq = jnp.sum(d * d, -1)
  # sqrt's gradient at 0 is infinite: take the norm of a safe value there.
  pos = sq > 0
  norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
  return jnp.sum(ok * norm) / jnp.maximum(jnp.sum(ok), 1.0)


def fdr(mem_size: int = 200, alpha: float = 1.0,
        batch_size: int = 0) -> Strategy:
  """Function Distance Regularization.

  Args:
    mem_size: memory capacity in examples (each with its logits); at
      least the number of experiences.
    alpha: weight of the function-distance term (the code's is 1).
    batch_size: memory entries replayed per step; 0 means the training
      batch size.

  Raises:
    ValueError: a non-positive ``mem_size``, a negative or non-finite
      ``alpha``, a negative ``batch_size`` or one larger than ``mem_size``;
      at ``init``, the default batch size larger than the memory or fewer
      slots than experiences.
  """
  name = "fdr"
  replay_size = replay_sizer(name, mem_size, batch_size)
  checks.nonnegative(f"{name}: alpha", alpha)

  def init(ctx, key, params):
    memory, model_state, k_mem = init_memory(ctx, key, mem_size, replay_size)
    if mem_size < ctx.info.num_experiences:
      raise ValueError(
          f"{name}: mem_size={mem_size} is smaller than the number of "
          f"experiences ({ctx.info.num_experiences}); the memory keeps "
          f"mem_size // experiences examples of each")
    width = logit_width(ctx, params, model_state)
    return FDRState(memory, jnp.zeros((mem_size, width), jnp.float32),
                    model_state, jnp.zeros((), jnp.int32), k_mem)

  def prepare_batch(ctx, sstate, batch, key):
    out = dict(batch)
    out.update(draw_with_logits(name, sstate.memory, sstate.logits, key,
                                replay_size(ctx)))
    return out

  def lookahead_loss(ctx, sstate, params, batch):
    # ``params`` is θ + Δθ: the distance is the code's second step's loss.
    out = ctx.logits(params, sstate.model_state, batch[f"{name}_x"],
                     batch[f"{name}_task"], train=True,
                     mask=batch[f"{name}_ok"]).astype(jnp.float32)
    return alpha * softmax_distance(out, batch[f"{name}_z"],
                                    batch[f"{name}_ok"])

  @functools.partial(jax.jit, static_argnums=0)
  def store(ctx, ss, params, model_state, x, y, task, num, index):
    mask = jnp.arange(x.shape[0]) < num
    key = jax.random.fold_in(ss.key, index)
    mem = buffers.experience_balanced_add(ss.memory, key, x, y, task, index,
                                          mask)
    new = mem.valid & (mem.experience == index)
    out = ctx.logits(params, model_state, mem.x, mem.task,
                     train=False).astype(jnp.float32)
    logits = jnp.where(new[:, None], out, ss.logits)
    return ss._replace(memory=mem, logits=logits)

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, lookahead_loss=lookahead_loss,
                  after_experience=exemplar_hook(store), name=name)
