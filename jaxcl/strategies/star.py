"""STAR: stability-inducing weight perturbation, a plug-in for replay methods.

Eskandar et al. (2025) ask the model's predictions on memory examples to
stay the same in a neighbourhood of its parameters, so that the updates
future experiences make there change them less. With ``M`` a draw of
``batch_size`` memory examples, :math:`p(x) = \\mathrm{softmax}(f_\\theta(x))`
held constant and :math:`M_c \\subseteq M` the examples the model
classifies correctly, the forgetting surrogate is

.. math::
   D(\\theta') = \\frac{1}{|M_c|} \\sum_{(x, y) \\in M_c}
     \\mathrm{KL}\\big(p(x) \\,\\Vert\\, \\mathrm{softmax}(f_{\\theta'}(x))\\big),

and STAR minimises its worst case near :math:`\\theta`,
:math:`\\lambda \\max_{\\lVert \\delta_W \\rVert \\le \\gamma \\lVert W \\rVert}
D(\\theta + \\delta)`, approximated SAM-style: :math:`\\delta` is found by
``p_steps`` normalised ascent steps on :math:`D`, then the gradient of
:math:`D` **at** :math:`\\theta + \\delta` is added to the partner
method's gradient at :math:`\\theta`:

.. math::
   \\delta^{(0)}_W = s \\lVert W \\rVert \\frac{z_W}{\\lVert z_W \\rVert},
   \\quad z_W \\in \\{-1, 1\\}^{n_W} \\text{ uniform}, \\qquad
   \\delta^{(k+1)}_W = \\delta^{(k)}_W + \\frac{\\gamma}{K}
     \\lVert W \\rVert \\frac{g_W}{\\lVert g_W \\rVert + \\epsilon},
   \\quad g = \\nabla D(\\theta + \\delta^{(k)}),

.. math::
   \\nabla_\\theta \\mathcal{L} \\;\\mathrel{+}=\\;
     \\lambda\\, \\nabla D\\big|_{\\theta + \\delta^{(K)}},

for every kernel ``W`` (a parameter of two or more dimensions: dense and
convolution weights); the other parameters (biases, norm scales) are not
perturbed. After one step (``K = 1``) a kernel's move from its start has
norm exactly :math:`\\gamma \\lVert W \\rVert`, and :math:`\\lVert \\delta_W
\\rVert` is within :math:`s \\lVert W \\rVert` of it. Symbols and
arguments: :math:`\\lambda` is ``p_lam``, :math:`\\gamma` ``p_gamma``,
:math:`K` ``p_steps``, :math:`s` ``init_scale``, :math:`\\epsilon` = 1e-20
(the code's). The term is skipped (no gradient added) when fewer than two
drawn examples are classified correctly, as in the code.

This follows the authors' code (``models/star_utils/star_perturber.py`` in
Mammoth, from Gnomy17/STAR_CL; ``er_star.py``, ``er_ace_star.py``,
``derpp_star.py``): the KL is PyTorch's ``kl_div`` summed over classes,
averaged over the correct rows; the ascent is SGD of rate ``γ / K`` on
``-D`` with each kernel's gradient rescaled to the norm of the *original*
kernel and the 1-d gradients zeroed; :math:`p` and all forward passes use
the model in training mode; the draw is of ``minibatch_size`` examples
from the whole memory, taken as soon as it holds one.

**Deviation: the random start.** The code starts the ascent at
``W + randn * ||W|| * 1e-20`` (its comment: "delta = 0 is global
minimizer"). In float32 that start vanishes: it is 1e-19 of a weight whose
spacing is ~1e-9 (checked on a small MLP: the proxy's weights equal the
model's bit for bit; ``runs/s31/star/verify_init.py``). :math:`D` has a
zero gradient at :math:`\\delta = 0`, so what the first step sees is float32
rounding residue (~1e-8 here, from ``softmax`` against ``exp(log_softmax)``
of the same logits), and the normalisation by ``||g|| + 1e-20`` scales that
residue up to the full :math:`\\gamma \\lVert W \\rVert`: the perturbation
has its nominal size, but its direction is set by rounding (the residue
backpropagated through the network, so it does lie in the span the
outputs move along: on that MLP, :math:`D(\\theta + \\delta)` = 0.012 for
it, 0.0008 for a random direction of the same size). jaxcl follows the
paper's intent instead, a small random start of relative size ``s``
(``init_scale``, 1e-3): near :math:`\\delta = 0`, :math:`D \\approx
\\frac12 \\delta^\\top F \\delta` (:math:`F` the output Fisher), so the
first step's gradient is :math:`F \\delta^{(0)}`, ~1e4 times the rounding
residue, and the step is one (layer-normalised) power iteration on the
curvature from a random direction (0.016 on that MLP). As :math:`D` is
even in :math:`\\delta` to second order, a step of size
:math:`\\gamma \\gg s` lands about as high whether it ascends or descends
(overshooting through 0); the sign matters only from a start comparable
to the step (the tests check it from such a start).

The start's direction is a vector of random signs (Rademacher), not the
code's Gaussian: both have :math:`E[z z^\\top] = I`, so the first step's
expected direction :math:`F \\delta^{(0)}` is the same, and signs are drawn
32 to a 32-bit random word. On the 2-core CPU the Gaussian start (~89 k
normals for the MLP 100-100) took 0.9 ms, about 60 % of STAR's step;
the signs take 0.1 ms.

Where the memory samples come from: STAR keeps **its own reservoir
memory** (:mod:`jaxcl.buffers`, fed every step with the incoming rows, as
the partner's), as :mod:`jaxcl.strategies.lider` does, because DER and
DER++ do not append their memory rows to the batch; the code draws STAR's
rows independently of the partner's anyway. So ``star+replay``,
``star+er_ace``, ``star+derpp`` behave as the code's ``er_star``,
``er_ace_star``, ``derpp_star`` at the cost of a second memory. Alone,
``star`` is the regulariser without replay (not a method of the paper).
Chain order does not matter for these partners: STAR only adds to the
gradient (a member that projects the gradient, e.g. GEM, sees STAR's term
only if STAR comes first).

Other deviations: the forward passes use the model state (batch norm
statistics) as the experience started (``update_grads`` does not receive
the current one; as :mod:`jaxcl.strategies.rar`); the code's passes in
training mode also update the running statistics, these do not. The
bookkeeping of the code (a proxy network, weights moved in place and
restored) is a pure function here: the partner's gradient is taken at
:math:`\\theta` and STAR's at :math:`\\theta + \\delta` in the same step.

Hyperparameters: the code's defaults are ``p_steps=1, p_lam=0.01,
p_gamma=0.05``. The authors' README gives, for Split CIFAR-10 (memory
100): ER+STAR ``p_gamma=0.01, p_lam=0.1`` (lr 0.1); ER-ACE+STAR 0.01, 0.1
(lr 0.03); DER++ +STAR 0.1, 0.005 (lr 0.1, alpha 0.2, beta 0.1);
X-DER-RPC+STAR 0.001, 0.01; other settings are in the paper's supplement.

State: :class:`STARState`, fixed shapes, so nothing recompiles between
experiences and it checkpoints and vmaps like any state.

References:
  Eskandar, Imtiaz, Hill, Wang & Dy, `STAR: Stability-inducing weight
  perturbation for continual learning
  <https://openreview.net/forum?id=6N5OM5Duuj>`_, ICLR 2025
  (arXiv:2503.01595).
  Wu, Xia & Wang, `Adversarial weight perturbation helps robust
  generalization <https://arxiv.org/abs/2004.05884>`_, NeurIPS 2020 (AWP,
  whose code the perturber adapts).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import buffers, checks
from jaxcl.strategies._replay_memory import init_memory, replay_sizer
from jaxcl.strategies.replay import after_grads, reservoir_step
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["star", "STARState", "is_kernel", "random_signs", "random_start",
           "masked_kl", "perturbation", "star_gradient"]

_EPS = 1e-20  # the code's EPS in the gradient normalisation


class STARState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of examples, labels, task ids
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; reservoir keys fold in memory.seen
  model_state: Any        # model state as the experience started (BN)


def is_kernel(leaf: jax.Array) -> bool:
  """A perturbed parameter: two or more dimensions (the code skips
  ``w.dim() <= 1``: biases, norm scales)."""
  return leaf.ndim >= 2


def random_signs(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform random signs (float32 ``±1``) of ``shape``, 32 from each
  32-bit random word (``jax.random.rademacher`` spends a word on each)."""
  n = int(np.prod(shape))
  bits = jax.random.bits(key, (-(-n // 32),), jnp.uint32)
  b = (bits[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  return (2.0 * b.reshape(-1)[:n].astype(jnp.float32) - 1.0).reshape(shape)


def random_start(key: jax.Array, params: Any, init_scale: float) -> Any:
  """:math:`\\delta^{(0)}`: per kernel ``init_scale * ||W|| * z / ||z||``
  with ``z`` uniform random signs; zeros for the other parameters."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, w in zip(keys, leaves):
    if is_kernel(w):
      z = random_signs(k, w.shape)  # ||z|| = sqrt(w.size)
      out.append((init_scale * jnp.linalg.norm(w) / np.sqrt(w.size)
                  * z).astype(w.dtype))
    else:
      out.append(jnp.zeros_like(w))
  return jax.tree.unflatten(tree, out)


def masked_kl(p: jax.Array, logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over the rows with ``mask`` of ``KL(p || softmax(logits))``
  (summed over classes; PyTorch's ``kl_div`` with target ``p``); 0 without
  a row. A class with ``p = 0`` (a masked logit) adds 0."""
  lq = jax.nn.log_softmax(logits.astype(jnp.float32))
  kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0))
                                     - lq), 0.0), axis=-1)
  return jnp.sum(mask * kl) / jnp.maximum(jnp.sum(mask), 1.0)


def perturbation(kl_fn: Callable[[Any], jax.Array], params: Any,
                 delta0: Any, p_gamma: float, p_steps: int) -> Any:
  """:math:`\\delta^{(K)}`: ``p_steps`` ascent steps on ``kl_fn`` from
  ``params + delta0``, each kernel's step of norm ``p_gamma / p_steps *
  ||W||`` (``W``: the kernel of ``params``); other parameters stay at
  ``delta0`` (zero from :func:`random_start`). Held constant: no gradient
  flows through it."""
  norms = jax.tree.map(jnp.linalg.norm, params)

  def body(_, delta):
    g = jax.grad(kl_fn)(jax.tree.map(jnp.add, params, delta))

    def move(d, g, n):
      if not is_kernel(g):
        return d
      return d + (p_gamma / p_steps) * n * g / (jnp.linalg.norm(g) + _EPS)

    return jax.tree.map(move, delta, g, norms)

  delta = jax.lax.fori_loop(0, p_steps, body, delta0)
  return jax.lax.stop_gradient(delta)


def star_gradient(kl_fn: Callable[[Any], jax.Array], params: Any,
                  delta: Any, p_lam: float) -> Any:
  """``p_lam`` times the gradient of ``kl_fn`` at ``params + delta``."""
  g = jax.grad(kl_fn)(jax.tree.map(jnp.add, params, delta))
  return jax.tree.map(lambda x: p_lam * x, g)


def star(p_lam: float = 0.01, p_gamma: float = 0.05, p_steps: int = 1,
         init_scale: float = 1e-3, mem_size: int = 200,
         batch_size: int = 0) -> Strategy:
  """STAR (compose with a replay method: ``star+replay``, ``star+er_ace``,
  ``star+derpp``).

  Args:
    p_lam: weight :math:`\\lambda` of the KL at the perturbed parameters
      (the code's ``--p-lam``).
    p_gamma: size :math:`\\gamma` of the perturbation relative to each
      kernel's norm (``--p-gamma``).
    p_steps: ascent steps :math:`K` (``--p-steps``).
    init_scale: size :math:`s` of the random start relative to each
      kernel's norm, in (0, p_gamma) (the code's 1e-20 vanishes in float32;
      see the module's docstring).
    mem_size: capacity of STAR's own reservoir memory (give the
      partner's).
    batch_size: memory examples drawn per step; 0 means the training batch
      size (the code's ``minibatch_size``).

  The defaults are the code's (``p_steps=1, p_lam=0.01, p_gamma=0.05``);
  the authors' Split CIFAR-10 settings are in the module's docstring.

  Raises:
    ValueError: a ``p_lam`` or ``p_gamma`` that is not a finite number > 0
      (0 would make STAR change nothing), ``p_steps`` not an int >= 1, an
      ``init_scale`` not in (0, p_gamma), a non-positive ``mem_size``, a
      negative ``batch_size`` or one larger than ``mem_size`` (also at
      ``init``, when 0 resolves to a training batch larger than the
      memory).
  """
  checks.positive("star: p_lam", p_lam)
  checks.positive("star: p_gamma", p_gamma)
  checks.whole("star: p_steps", p_steps, 1)
  checks.positive("star: init_scale", init_scale)
  if not init_scale < p_gamma:
    raise ValueError(f"star: init_scale must be smaller than p_gamma="
                     f"{p_gamma!r} (it is the random start, the ascent "
                     f"step is the perturbation), got {init_scale!r}")
  replay_size = replay_sizer("star", mem_size, batch_size)
  buffers.replay_size("star", batch_size, mem_size, 0)
  p_lam, p_gamma, init_scale = float(p_lam), float(p_gamma), float(init_scale)

  def init(ctx, key, params):
    del params
    memory, model_state, k_mem = init_memory(ctx, key, mem_size, replay_size)
    return STARState(memory, jnp.zeros((), jnp.int32), k_mem, model_state)

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    out = dict(batch)
    out["star_x"] = sstate.memory.x[idx]
    out["star_y"] = sstate.memory.y[idx]
    out["star_task"] = sstate.memory.task[idx]
    out["star_ok"] = ok.astype(jnp.float32)
    return out

  def update_grads(ctx, sstate, grads, params, batch, key):
    x, task = batch["star_x"], batch["star_task"]

    def logits_at(p):
      return ctx.apply(p, sstate.model_state, x, task, train=True,
                       mask=batch["star_ok"])[0]

    out = logits_at(params)
    p = jax.lax.stop_gradient(jax.nn.softmax(out.astype(jnp.float32)))
    # The code's mask: the drawn rows the model classifies correctly.
    mask = batch["star_ok"] * (jnp.argmax(out, -1) == batch["star_y"])
    mask = jax.lax.stop_gradient(mask)

    def kl_fn(q):
      return masked_kl(p, logits_at(q), mask)

    delta = perturbation(kl_fn, params, random_start(key, params, init_scale),
                         p_gamma, p_steps)
    extra = star_gradient(kl_fn, params, delta, p_lam)
    on = jnp.sum(mask) >= 2  # the code: skip with fewer than 2 rows
    return jax.tree.map(lambda g, e: g + jnp.where(on, e, 0.0), grads,
                        extra)

  def after_step(ctx, sstate, info):
    # after: the gradient read the drawn rows (update_grads).
    return sstate._replace(memory=reservoir_step(ctx, sstate, info,
                                                 after=after_grads(info)))

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, update_grads=update_grads,
                  after_step=after_step, name="star")
