"""RAR: replay memory samples pushed towards the current task by an attack.

Retrospective Adversarial Replay (Kumari, Wang, Zhou, Bilmes 2022). Replay
(ER) from a reservoir, plus a second draw of memory samples perturbed by a
few steps of a targeted L∞ attack towards their nearest neighbour in the
current batch, so the replayed points sit near the boundary between old and
new classes ("retrospective adversarial samples"). With ``B`` the incoming
batch, ``M_B`` and ``M_A`` two independent draws of ``batch_size_mem``
entries from past experiences, each step minimises

.. math::
   \\mathcal{L}(\\theta) = \\frac{1}{|B| + |M_B|}
     \\sum_{(x, y) \\in B \\cup M_B} \\ell(f_\\theta(x), y)
   + \\beta \\frac{1}{|M_A|} \\sum_{(x, y) \\in M_A} \\ell(f_\\theta(\\tilde x), y),

where ``β`` is ``beta_coef`` and the adversarial input ``x̃`` of each
``(x, y) ∈ M_A`` is built at the virtually updated parameters
:math:`\\theta^v = \\theta - \\eta_v \\nabla_\\theta \\mathcal{L}_{B \\cup M_B}`
(``η_v`` = ``opt_lr``; the gradient of the step's own loss, so it costs no
extra backward pass):

1. target: the incoming row ``(x_n, y_n)`` nearest to ``x`` in Euclidean
   distance between the backbone's features :math:`h_{\\theta^v}` (the
   model's ``features=True`` output, its penultimate layer), among the
   valid rows with ``y_n ≠ y`` (no such row: the adversarial row is masked);
2. MI-FGSM for ``T`` = ``iter_fgsm`` steps of size ``α = ε / T``
   (``ε`` = ``epsilon_fgsm``, ``μ`` = ``decay_factor_fgsm``), descending the
   attack loss ``A`` (so ``x̃`` moves towards the target), from
   :math:`\\tilde x_0 = x`, :math:`g_0 = 0`:

.. math::
   d_s = \\nabla_{\\tilde x} A(\\tilde x_s), \\quad
   g_{s+1} = \\mu g_s + d_s / \\lVert d_s \\rVert_1, \\quad
   \\tilde x_{s+1} = \\mathrm{clip}_{[lo, hi]}\\big(
     \\Pi_{\\lVert \\tilde x - x \\rVert_\\infty \\le \\varepsilon}
     (\\tilde x_s - \\alpha\\, \\mathrm{sign}(g_{s+1}))\\big)

(per-sample L1 norm, floored at 1e-12; ``[lo, hi]`` = ``clip``, the pixel
range). ``attack='features'`` (default, the authors' code):
:math:`A = \\mathrm{mean}_j (h_{\\theta^v}(\\tilde x) - h_{\\theta^v}(x_n))_j^2`,
feature matching to the neighbour; ``attack='label'`` (Avalanche's plugin):
:math:`A = \\ell(f_{\\theta^v}(\\tilde x), y_n)`, the cross-entropy towards
the neighbour's label. Everything runs inside the compiled step with fixed
shapes: ``prepare_batch`` appends the clean rows ``M_B`` with a validity mask
(as :func:`jaxcl.strategies.replay.replay`); ``update_grads`` (which alone
receives the parameters and the gradient the virtual step needs) draws
``M_A``, attacks it with a ``lax.fori_loop`` and adds ``β`` times its
gradient. The memory is a reservoir offered every incoming batch in
``after_step``; both draws take only entries of past experiences, so the
first experience trains as plain SGD and, while nothing eligible is stored,
the rows have mask 0.

Paper / code choices (the paper's Algorithm 1 is ER / MIR plus the attack;
the authors' code is ``mir_dadv.py``, ``retrieve_er_rar``, in
lillykumari8/RAR-CL; Avalanche's is ``avalanche/training/plugins/rar.py``):

* Loss weighting and the clean rows follow Avalanche (clean rows in the
  mixed mini-batch mean, ``+ β`` adversarial mean; default ``β = 0.4``, its
  comment: 0.5 / 0.1 / 0.075 for Split CIFAR-10 at memory 200 / 500 / 1000).
  The authors' code adds ``(1 - β)`` times the clean replay mean and ``β``
  times the adversarial one to the incoming mean, with one shared draw and
  ``β = 1`` by default (adversarial replay only).
* The attack follows the authors' code: the gradient is recomputed at every
  step, normalised per sample, the perturbation projected on the ε ball,
  the step descends the attack loss. Avalanche's ``mifgsm_attack`` takes
  one input gradient for all steps, normalises by the whole batch's L1
  norm, *adds* ``α sign(g)`` (ascending the cross-entropy to the target
  label, i.e. away from the target class, against the paper's "perturbs a
  buffered sample towards its nearest neighbor") and runs ``T - 1`` steps.
  Step size ``α = ε / T`` is Avalanche's; the authors set ``α`` apart
  (``--d_alpha 0.007``, ``--d_eps 0.07``, ``--d_steps 10``, no momentum).
* Target: the nearest incoming row of another class. Avalanche's loop over
  the sorted distances has no ``break`` and so keeps the *farthest* row of
  another class, and it searches the mixed batch (replayed rows
  included); the authors take the nearest row of the incoming batch and
  sample the memory excluding the batch's labels.
* Memory: the authors' per-step reservoir (``buffer.add_reservoir``), with
  draws restricted to past experiences (the authors exclude the batch's
  labels and rehearse from task 1 on; Avalanche's buffer is a reservoir
  updated at the end of each experience, so it too holds past data only).
* Not reproduced: the MIR retrieval variants (``mir_rar``; see
  :mod:`jaxcl.strategies.mir`), the MixUp augmentation of replayed samples,
  the random start (``--d_rand_start``, off by default). The attack and
  the features use the model in eval mode with the model state as of the
  start of the experience (as MIR's scoring: ``update_grads`` does not
  receive the current model state); Avalanche's copy is in train mode.

References:
  Kumari et al., `Retrospective adversarial replay for continual learning
  <https://openreview.net/forum?id=XEoih0EwCwL>`_, NeurIPS 2022.
  Dong et al., `Boosting adversarial attacks with momentum
  <https://arxiv.org/abs/1710.06081>`_, CVPR 2018 (MI-FGSM).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl import buffers, checks
from jaxcl.augment import pixel_maps
from jaxcl.state import cross_entropy
from jaxcl.strategies._replay_memory import init_memory
from jaxcl.strategies.replay import (after_grads, append_rows, incoming_rows,
                                    reservoir_step)
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["rar", "RARState", "ATTACKS", "mi_fgsm", "nearest_targets",
           "adversarial_rows"]

ATTACKS = ("features", "label")


class RARState(NamedTuple):
  memory: buffers.Memory  # reservoir of input-shaped examples
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key for the reservoir
  model_state: Any        # model state at the start of the experience


def mi_fgsm(loss_fn: Callable[[jax.Array], jax.Array], x: jax.Array, *,
            epsilon: float, steps: int, decay: float,
            clip: tuple[float, float] | None) -> jax.Array:
  """``steps`` MI-FGSM steps *descending* ``loss_fn`` from ``x``.

  ``loss_fn(z)`` returns one loss per row ``(n,)``; each row's gradient is
  its own loss's. Step size ``epsilon / steps``; the result stays within
  ``epsilon`` of ``x`` (L∞, per element) and inside ``clip`` (if given).
  ``steps`` is static (a ``lax.fori_loop``); 0 returns ``x``.
  """
  if steps == 0:
    return x
  alpha = epsilon / steps
  grad_fn = jax.grad(lambda z: jnp.sum(loss_fn(z)))
  per_row = (-1,) + (1,) * (x.ndim - 1)

  def body(_, carry):
    x_adv, g = carry
    d = grad_fn(x_adv)
    l1 = jnp.sum(jnp.abs(d.reshape(d.shape[0], -1)), axis=1)
    g = decay * g + d / jnp.maximum(l1, 1e-12).reshape(per_row)
    x_adv = jnp.clip(x_adv - alpha * jnp.sign(g), x - epsilon, x + epsilon)
    if clip is not None:
      x_adv = jnp.clip(x_adv, clip[0], clip[1])
    return x_adv, g

  return jax.lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x)))[0]


def nearest_targets(h_mem: jax.Array, y_mem: jax.Array, h_in: jax.Array,
                    y_in: jax.Array, valid_in: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """For each memory row, the nearest valid incoming row of another class.

  Euclidean distance between flattened features ``h_mem`` ``(n, ...)`` and
  ``h_in`` ``(b, ...)``. Returns ``(j, found)``: incoming row indices
  ``(n,)`` and whether such a row exists (``j`` is then arbitrary).
  """
  a = h_mem.reshape(h_mem.shape[0], -1)
  b = h_in.reshape(h_in.shape[0], -1)
  dist = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
  eligible = valid_in[None, :] & (y_in[None, :] != y_mem[:, None])
  j = jnp.argmin(jnp.where(eligible, dist, jnp.inf), axis=1)
  return j, jnp.any(eligible, axis=1)


def adversarial_rows(ctx, params, model_state, grads, mem: buffers.Memory,
                     key: jax.Array, incoming: dict, *, n: int, opt_lr: float,
                     epsilon: float, steps: int, decay: float,
                     clip: tuple[float, float] | None, attack: str,
                     where: jax.Array | None = None) -> dict[str, jax.Array]:
  """RAR's adversarial replay rows (x̃, y, task, mask) for one step.

  Draws ``n`` eligible memory entries (``where``, as
  :func:`jaxcl.buffers.sample`), picks each one's target among the
  ``incoming`` rows (:func:`nearest_targets` at the virtual parameters
  ``params - opt_lr * grads``) and attacks it (:func:`mi_fgsm`). ``mask``
  is 0 for rows without an entry or a target.
  """
  idx, ok = buffers.sample(mem, key, n, where)
  x, y, t = mem.x[idx], mem.y[idx], mem.task[idx]
  virtual = jax.tree.map(lambda p, g: p - opt_lr * g, params, grads)

  def feats(z, task):
    return ctx.apply(virtual, model_state, z, task, features=True)[0]

  h_in = feats(incoming["x"], incoming["task"])
  j, found = nearest_targets(feats(x, t), y, h_in, incoming["y"],
                             incoming["mask"] > 0)
  if attack == "features":
    target = jax.lax.stop_gradient(h_in[j].reshape(n, -1))

    def loss_fn(z):
      return jnp.mean((feats(z, t).reshape(n, -1) - target) ** 2, axis=1)
  else:
    y_target = incoming["y"][j]

    def loss_fn(z):
      logits = ctx.logits(virtual, model_state, z, t)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), y_target)

  # The budget and the clip are in pixels (dataset.normalize standardises
  # the stored rows): the attack runs on them, the model on its inputs.
  to_pixels, to_inputs = pixel_maps(ctx.normalize, ctx.info.input_shape,
                                    "rar")
  x_adv = to_inputs(mi_fgsm(lambda z: loss_fn(to_inputs(z)), to_pixels(x),
                            epsilon=epsilon, steps=steps, decay=decay,
                            clip=clip))
  return {"x": jax.lax.stop_gradient(x_adv), "y": y, "task": t,
          "mask": (ok & found).astype(jnp.float32)}


def _check_clip(clip: Any) -> tuple[float, float] | None:
  if clip is None:
    return None
  try:
    lo, hi = (float(v) for v in clip)
  except (TypeError, ValueError):
    lo = hi = math.nan
  if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
    raise ValueError(f"rar: clip must be None or (lo, hi) with finite lo < "
                     f"hi (the input range), got {clip!r}")
  return lo, hi


def rar(mem_size: int = 200, batch_size_mem: int = 0, opt_lr: float = 0.1,
        beta_coef: float = 0.4, decay_factor_fgsm: float = 1.0,
        epsilon_fgsm: float = 0.0314, iter_fgsm: int = 2,
        attack: str = "features",
        clip: tuple[float, float] | None = (0.0, 1.0)) -> Strategy:
  """Retrospective Adversarial Replay (ER-RAR).

  Args:
    mem_size: reservoir capacity in examples.
    batch_size_mem: rows per memory draw (clean and adversarial each); 0
      means the training batch size.
    opt_lr: learning rate of the virtual SGD step at which the targets and
      the attack are computed.
    beta_coef: weight ``β`` in [0, 1] of the adversarial replay loss; 0
      turns the attack off (plain ER from past experiences).
    decay_factor_fgsm: MI-FGSM momentum ``μ`` (>= 0; 0: iterative FGSM).
    epsilon_fgsm: L∞ budget ``ε`` of the perturbation (>= 0).
    iter_fgsm: attack steps ``T`` (>= 0; each of size ``ε / T``).
    attack: ``'features'`` (match the target's features; authors' code) or
      ``'label'`` (cross-entropy towards the target's label; Avalanche).
    clip: the input range ``(lo, hi)`` the attacked inputs are clipped to
      (``(0, 1)``: jaxcl's pixels), or None. The budget and the clip are
      in pixels: with ``dataset.normalize`` the attack runs on the rows
      turned back into pixels, and its result is standardised again.

  Raises:
    ValueError: a non-positive ``mem_size`` or ``opt_lr``; a negative or
      too large ``batch_size_mem`` (also at ``init``, when 0 resolves to a
      training batch larger than the memory); ``beta_coef`` outside [0, 1];
      a negative ``decay_factor_fgsm``, ``epsilon_fgsm`` or ``iter_fgsm``;
      an unknown ``attack``; a bad ``clip``.
  """
  buffers.check_capacity(mem_size, "rar: mem_size")
  checks.whole("rar: batch_size_mem", batch_size_mem, 0,
               "0: the training batch size")
  if batch_size_mem:
    buffers.replay_size("rar", batch_size_mem, mem_size, batch_size_mem)
  checks.positive("rar: opt_lr", opt_lr)
  if not (isinstance(beta_coef, numbers.Real) and not isinstance(
      beta_coef, bool) and 0 <= beta_coef <= 1):
    raise ValueError(f"rar: beta_coef must be a number in [0, 1], got "
                     f"{beta_coef!r}")
  checks.nonnegative("rar: decay_factor_fgsm", decay_factor_fgsm)
  checks.nonnegative("rar: epsilon_fgsm", epsilon_fgsm)
  checks.whole("rar: iter_fgsm", iter_fgsm, 0, "0: replay unperturbed")
  if attack not in ATTACKS:
    raise ValueError(f"rar: unknown attack {attack!r}; valid: "
                     f"{list(ATTACKS)}")
  clip = _check_clip(clip)
  opt_lr, beta = float(opt_lr), float(beta_coef)

  def replay_size(ctx) -> int:
    return buffers.replay_size("rar", batch_size_mem, mem_size,
                               ctx.info.batch_size)

  def past(sstate) -> jax.Array:
    return sstate.memory.experience < sstate.experience

  def init(ctx, key, params):
    del params
    memory, variables, k_mem = init_memory(ctx, key, mem_size, replay_size)
    return RARState(memory, jnp.zeros((), jnp.int32), k_mem, variables)

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx),
                             past(sstate))
    return append_rows(batch, buffers.gather(sstate.memory, idx, ok))

  def update_grads(ctx, sstate, grads, params, batch, key):
    if beta == 0:
      return grads
    # The virtual step (nearest targets) moves only the weights the update
    # will move: a chained member's fixed weights (ctx.freeze) are masked
    # out of the applied update whichever side of rar it stands.
    rows = adversarial_rows(
        ctx, params, sstate.model_state, ctx.freeze(grads), sstate.memory,
        key, incoming_rows(ctx, batch), n=replay_size(ctx), opt_lr=opt_lr,
        epsilon=float(epsilon_fgsm), steps=iter_fgsm,
        decay=float(decay_factor_fgsm), clip=clip, attack=attack,
        where=past(sstate))

    def adv_loss(p):
      logits, _ = ctx.apply(p, sstate.model_state, rows["x"], rows["task"],
                            train=True, mask=rows["mask"])
      return beta * cross_entropy(logits, rows["y"], rows["mask"])

    # None of it on a chained member's fixed weights (ctx.freeze).
    return jax.tree.map(jnp.add, grads,
                        ctx.freeze(jax.grad(adv_loss)(params)))

  def after_step(ctx, sstate, info):
    # after: the gradient read the attacked rows (update_grads).
    return sstate._replace(memory=reservoir_step(ctx, sstate, info,
                                                 after=after_grads(info)))

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, update_grads=update_grads,
                  after_step=after_step, name="rar")
