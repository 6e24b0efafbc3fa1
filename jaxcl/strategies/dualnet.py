"""DualNet: a slow learner trained by self-supervision, a fast one by labels
(Pham, Liu & Hoi 2021; Avalanche's ``DualNet``).

The model (:mod:`jaxcl.models.dualnet`, ``model.name='dualnet'``) has a
slow learner with stage features :math:`h_l` and a fast learner that
gates them, :math:`m_l = g_l(m_{l-1}) \\odot h_l`, under a linear head.
Each incoming batch makes two kinds of update.

*Slow* (``n_outer`` times): ``inner_steps`` SGD steps at ``ssl_lr`` on
the Barlow Twins loss of two augmented views of ``ssl_batch_size`` memory
rows (the incoming rows while the first experience trains), through the
slow learner and a projector :math:`p`,

.. math::
   \\mathcal{L}_{BT} = \\sum_i (1 - \\mathcal{C}_{ii})^2
     + \\lambda \\sum_{i \\neq j} \\mathcal{C}_{ij}^2, \\qquad
   \\mathcal{C} = \\tfrac{1}{N} \\tilde z_1^\\top \\tilde z_2, \\qquad
   \\tilde z_v = \\frac{z_v - \\bar z_v}{\\sigma(z_v)},\\;
   z_v = p(\\mathrm{slow}(\\mathrm{aug}_v(x))),

(:math:`\\lambda` = ``off_diagonal``, 2e-3 in the authors' code; the
standard deviation is the unbiased one), then a Reptile interpolation
of everything the steps moved, :math:`\\theta \\leftarrow \\theta_0 +
\\beta (\\theta_{\\rm after} - \\theta_0)`.

*Fast* (``inner_steps`` SGD steps at ``lr`` on every weight, the slow
learner's included, as the authors' optimiser covers the whole net): the
cross-entropy of the incoming rows, plus, from the second experience on,
that of ``batch_size`` memory rows and the distillation of their stored
logits :math:`z` at temperature :math:`T`,

.. math::
   \\mathcal{L} = \\mathrm{CE}(B) + \\mathrm{CE}(M)
     + \\frac{\\rho}{C} \\sum_{(x, z) \\in M}
       \\mathrm{KL}\\big(\\mathrm{softmax}(z / T) \\,\\|\\,
                        \\mathrm{softmax}(f(x) / T)\\big),

:math:`\\rho` = ``reg`` (the authors' ``memory_strength``), :math:`C` the
number of outputs: their ``F.kl_div(..., reduce=True) * batch`` averages
over rows and classes and multiplies by the rows, a sum over rows
divided by :math:`C`. The memory is a reservoir of the incoming rows;
at an experience's end the rows it added get their logits from the
model then (evaluation mode), as the authors' ``save_logit`` does when
the next task starts.

Where the references differ: the authors' code (``model/dualnet_tf.py``,
the task-free setting, which Avalanche follows) draws memory rows of the
current task too, whose logits are not saved yet (zeros, or the
overwritten entry's), and distils towards those; here only rows with
saved logits are distilled (every drawn row keeps its cross-entropy).
Avalanche fills the memory only at an experience's end (so its memory
rows are never the current experience's), and uses the memory for the
SSL views once it is not empty. Views here come from
:func:`jaxcl.augment.pipeline` (``augment='auto'``: SCR's crop, flip,
jitter and grayscale for RGB images, a resized crop for one-channel
ones); the authors' two pipelines also blur (``p = 1`` and ``0.1``). The
authors' Reptile mix also averages the batch-norm running statistics;
here those come from the step's own forward pass only (the inner passes
run in training mode on batch statistics and their running averages are
dropped).

Mechanics: as MER's, ``update_grads`` runs the whole procedure inside
``jit`` and returns the displacement as a gradient, :math:`(\\theta -
\\theta_{\\rm final}) / \\mathrm{lr}`, plus any other chained member's
gradient, so SGD at ``lr`` lands on :math:`\\theta_{\\rm final}`;
``init`` refuses another optimiser unless ``check_optimizer=False``. The
task loss reports the incoming rows without a gradient. The projector
lives in the strategy state (``grads_state``).

References:
  Pham, Liu & Hoi, `DualNet: Continual Learning, Fast and Slow
  <https://arxiv.org/abs/2110.00175>`_, NeurIPS 2021 (code
  ``phquang/DualNet``, ``model/dualnet_tf.py``); Zbontar et al., `Barlow
  Twins <https://arxiv.org/abs/2103.03230>`_, ICML 2021 (eq. 1);
  Avalanche's ``training/supervised/dual_net.py``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import augment as augment_lib
from jaxcl import buffers, checks
from jaxcl.models.batch_norm import BatchNorm
from jaxcl.state import cross_entropy
from jaxcl.strategies._replay_memory import init_memory
from jaxcl.strategies.der import logit_width
from jaxcl.strategies.mer import check_sgd_optimizer, reported_task_loss
from jaxcl.strategies.replay import incoming_rows, reservoir_step
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["dualnet", "DualNetState", "barlow_twins", "Projector"]


class DualNetState(NamedTuple):
  memory: buffers.Memory  # reservoir over the stream
  logits: jax.Array       # (mem_size, outputs): saved at experience ends
  projector: Any          # the SSL projector's parameters
  projector_state: Any    # its batch statistics (structure only)
  model_state: Any        # model state as the experience started
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


class Projector(nn.Module):
  """The authors' projector: ``Linear(no bias) -> BatchNorm -> ReLU ->
  Linear(no bias)`` back to the feature size (training mode only)."""
  hidden: int = 256

  @nn.compact
  def __call__(self, f: jax.Array, mask: jax.Array | None = None
               ) -> jax.Array:
    h = nn.Dense(self.hidden, use_bias=False)(f)
    m = None if mask is None else mask[:, None]
    h = nn.relu(BatchNorm(momentum=0.9)(h, mask=m))
    return nn.Dense(f.shape[-1], use_bias=False)(h)


def barlow_twins(z1: jax.Array, z2: jax.Array, ok: jax.Array,
                 off_diagonal: float) -> jax.Array:
  """Barlow Twins' loss over the rows ``ok`` (bool ``(N,)``): each view
  standardised per dimension (unbiased standard deviation), ``C`` their
  cross-correlation, ``sum (1 - C_ii)^2 + off_diagonal * sum_{i != j}
  C_ij^2``."""
  w = ok.astype(jnp.float32)[:, None]
  n = jnp.sum(w)

  def standardise(z):
    mean = jnp.sum(w * z, 0) / jnp.maximum(n, 1.0)
    var = jnp.sum(w * (z - mean) ** 2, 0) / jnp.maximum(n - 1.0, 1.0)
    # A floor under the variance, not an epsilon added: a constant
    # dimension gives 0 there instead of NaN, any other is divided by its
    # own deviation, and the square root's gradient stays finite (at a
    # variance of 0 it is infinite, and times the floor's 0 it is NaN).
    return w * (z - mean) / jnp.sqrt(jnp.maximum(var, 1e-12))

  c = standardise(z1).T @ standardise(z2) / jnp.maximum(n, 1.0)
  diag = jnp.diagonal(c)
  on = jnp.sum((1.0 - diag) ** 2)
  off = jnp.sum(c ** 2) - jnp.sum(diag ** 2)
  return on + off_diagonal * off


def _check_model(params: Any) -> None:
  if not (isinstance(params, dict) and {"slow", "fast"} <= set(params)):
    got = sorted(params) if isinstance(params, dict) else type(params)
    raise ValueError(
        "dualnet needs the dualnet model (model.name='dualnet': a slow "
        "learner gated by a fast one, params 'slow', 'fast' and 'head'); "
        f"the model's params are {got}")


def dualnet(mem_size: int = 200, batch_size: int = 10,
            ssl_batch_size: int = 32, inner_steps: int = 2,
            n_outer: int = 3, beta: float = 0.05, reg: float = 10.0,
            temperature: float = 2.0, lr: float = 0.03,
            ssl_lr: float = 3e-4, off_diagonal: float = 2e-3,
            projector_hidden: int = 256,
            augment: str | Sequence[str] = "auto",
            crop_scale: Sequence[float] = (0.2, 1.0),
            check_optimizer: bool = True) -> Strategy:
  """DualNet.

  Args:
    mem_size: reservoir capacity in examples (each with its logits).
    batch_size: memory rows in each fast step (the authors' replay batch).
    ssl_batch_size: memory rows in each slow step (32 in their code).
    inner_steps: SGD steps of each slow round and of the fast update.
    n_outer: slow rounds per incoming batch, each mixed in at ``beta``.
    beta: the slow rounds' Reptile rate, in (0, 1].
    reg: weight of the memory's logit distillation (``memory_strength``).
    temperature: the distillation's temperature.
    lr: the fast steps' SGD rate; give the optimiser's (plain SGD at this
      rate applies the procedure exactly).
    ssl_lr: the slow steps' SGD rate (the authors' ``bt_opt``).
    off_diagonal: Barlow Twins' weight of the off-diagonal terms.
    projector_hidden: the projector's hidden width.
    augment: the views' augmentations: ``'auto'`` (by input shape,
      :func:`jaxcl.augment.default_ops`), ``'none'``, or names from
      :data:`jaxcl.augment.OPS`.
    crop_scale: the resized crop's area range.
    check_optimizer: refuse (at ``init``) an optimiser whose first update
      is not ``-lr * g``.

  Raises:
    ValueError: a non-positive ``mem_size``, ``batch_size``,
      ``ssl_batch_size``, ``inner_steps``, ``n_outer``, ``lr``,
      ``ssl_lr``, ``temperature`` or ``projector_hidden``; a draw larger
      than ``mem_size``; ``beta`` outside (0, 1]; a negative ``reg`` or
      ``off_diagonal``; an unknown augmentation or a bad ``crop_scale``;
      at ``init``, a model other than ``dualnet``, an augmentation that
      does not fit the inputs, or an optimiser whose first update is not
      ``-lr * g`` (unless ``check_optimizer=False``).
  """
  name = "dualnet"
  buffers.check_capacity(mem_size, f"{name}: mem_size")
  for arg, value in (("batch_size", batch_size),
                     ("ssl_batch_size", ssl_batch_size),
                     ("inner_steps", inner_steps), ("n_outer", n_outer),
                     ("projector_hidden", projector_hidden)):
    checks.whole(f"{name}: {arg}", value, 1)
  buffers.replay_size(name, batch_size, mem_size, 1)
  buffers.replay_size(f"{name} (ssl)", ssl_batch_size, mem_size, 1)
  for arg, value in (("lr", lr), ("ssl_lr", ssl_lr),
                     ("temperature", temperature), ("beta", beta)):
    checks.positive(f"{name}: {arg}", value)
  if beta > 1:
    raise ValueError(f"{name}: beta must be in (0, 1], got {beta!r}")
  checks.nonnegative(f"{name}: reg", reg)
  checks.nonnegative(f"{name}: off_diagonal", off_diagonal)
  checks.flag(f"{name}: check_optimizer", check_optimizer)
  augmenter = augment_lib.view_augmenter(name, augment, crop_scale)
  projector = Projector(int(projector_hidden))

  def slow_features(ctx, params, model_state, x, ok):
    """The slow learner's pooled features, training mode (batch
    statistics of the rows ``ok``; their running averages dropped)."""
    return ctx.forward(params, model_state, x, None, train=True, mask=ok,
                       slow=True)[0]

  def project(proj, proj_state, f, ok):
    z, _ = projector.apply({"params": proj, **proj_state}, f, mask=ok,
                           mutable=list(proj_state))
    return z

  def init(ctx, key, params):
    _check_model(params)
    augmenter(ctx)  # raises here on an augmentation that does not fit
    if check_optimizer:
      check_sgd_optimizer(name, ctx, params, lr)
    memory, model_state, k_mem = init_memory(ctx, key, mem_size)
    k_mem, k_proj = jax.random.split(k_mem)
    x0 = jnp.zeros((2,) + tuple(ctx.info.input_shape), jnp.float32)
    f0 = jax.eval_shape(lambda p: slow_features(ctx, p, model_state, x0,
                                                None), params)
    variables = projector.init(k_proj, jnp.zeros(f0.shape, jnp.float32))
    proj_state = {k: v for k, v in variables.items() if k != "params"}
    width = logit_width(ctx, params, model_state)
    return DualNetState(memory, jnp.zeros((mem_size, width), jnp.float32),
                        variables["params"], proj_state, model_state,
                        jnp.zeros((), jnp.int32), k_mem)

  def prepare_batch(ctx, sstate, batch, key):
    k_ssl, k_mem = jax.random.split(key)
    mem = sstate.memory

    def draws(key, count, n):
      idx, ok = jax.vmap(lambda k: buffers.sample(mem, k, n))(
          jax.random.split(key, count))
      return idx, ok

    out = dict(batch)
    idx, ok = draws(k_ssl, n_outer * inner_steps, ssl_batch_size)
    out[f"{name}_ssl_x"] = mem.x[idx]
    out[f"{name}_ssl_ok"] = ok
    idx, ok = draws(k_mem, inner_steps, batch_size)
    out[f"{name}_x"] = mem.x[idx]
    out[f"{name}_y"] = mem.y[idx]
    out[f"{name}_task"] = mem.task[idx]
    out[f"{name}_z"] = sstate.logits[idx]
    out[f"{name}_ok"] = ok.astype(jnp.float32)
    # Logits are saved when the experience that stored the row ends.
    out[f"{name}_saved"] = (ok & (mem.experience[idx] < sstate.experience)
                            ).astype(jnp.float32)
    return out

  def update_grads(ctx, sstate, grads, params, batch, key):
    rows = incoming_rows(ctx, batch)
    w_in = (rows["mask"] > 0).astype(jnp.float32)
    ms = sstate.model_state
    later = sstate.experience > 0
    sgd = lambda p, g, rate: jax.tree.map(lambda a, d: a - rate * d, p, g)
    mix = lambda a, b: jax.tree.map(lambda u, v: u + beta * (v - u), a, b)
    view = augmenter(ctx)

    def ssl_loss(both, x, ok, k):
      theta, proj = both
      k1, k2 = jax.random.split(k)
      x1, x2 = view(k1, x), view(k2, x)
      z1 = project(proj, sstate.projector_state,
                   slow_features(ctx, theta, ms, x1, ok), ok)
      z2 = project(proj, sstate.projector_state,
                   slow_features(ctx, theta, ms, x2, ok), ok)
      return barlow_twins(z1, z2, ok, off_diagonal)

    def ssl_step(both, inputs):
      x, ok, k = inputs
      # The first experience's rounds see the incoming rows (the memory
      # holds only its rows then, as the authors' t == 0 branch).
      x = jnp.where(later, x, _fit_rows(rows["x"], x.shape[0]))
      ok = jnp.where(later, ok, _fit_rows(w_in > 0, x.shape[0]))
      g_theta, g_proj = jax.grad(ssl_loss)(both, x, ok, k)
      return (sgd(both[0], ctx.freeze(g_theta), ssl_lr),
              sgd(both[1], g_proj, ssl_lr)), None

    def ssl_round(both, inputs):
      after = jax.lax.scan(ssl_step, both, inputs)[0]
      return mix(both, after), None

    def fast_loss(theta, i):
      out = ctx.logits(theta, ms, rows["x"], rows["task"], train=True,
                       mask=w_in)
      total = cross_entropy(out, rows["y"], w_in)
      ok = batch[f"{name}_ok"][i] * later
      mem = ctx.logits(theta, ms, batch[f"{name}_x"][i],
                       batch[f"{name}_task"][i], train=True, mask=ok)
      total += cross_entropy(mem, batch[f"{name}_y"][i], ok)
      saved = batch[f"{name}_saved"][i] * later
      kl = _kl_rows(mem, batch[f"{name}_z"][i], temperature)
      return total + reg * jnp.sum(saved * kl) / mem.shape[-1]

    def fast_step(theta, i):
      return sgd(theta, ctx.freeze(jax.grad(fast_loss)(theta, i)), lr), None

    theta0 = jax.lax.stop_gradient(params)
    keys = jax.random.split(key, n_outer * inner_steps)
    shape = lambda a: a.reshape((n_outer, inner_steps) + a.shape[1:])
    ssl_in = (shape(batch[f"{name}_ssl_x"]), shape(batch[f"{name}_ssl_ok"]),
              shape(keys))
    theta, proj = jax.lax.scan(ssl_round, (theta0, sstate.projector),
                               ssl_in)[0]
    theta = jax.lax.scan(fast_step, theta, jnp.arange(inner_steps))[0]
    # A batch of padding only (no incoming row) moves nothing.
    any_row = jnp.any(w_in > 0)
    theta = jax.tree.map(lambda a, b: jnp.where(any_row, b, a), theta0, theta)
    proj = jax.tree.map(lambda a, b: jnp.where(any_row, b, a),
                        sstate.projector, proj)
    grads = jax.tree.map(lambda g, p, f: g + (p - f) / lr, grads, theta0,
                         theta)
    return grads, sstate._replace(projector=proj)

  def after_step(ctx, sstate, info):
    return sstate._replace(memory=reservoir_step(ctx, sstate, info))

  def after_experience(ctx, state, experience):
    del experience
    ss = state.strategy
    logits = _save_logits(ctx, state.params, state.model_state, ss)
    return state.replace(strategy=ss._replace(logits=logits))

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, task_loss=reported_task_loss,
                  update_grads=update_grads, grads_state=True,
                  after_step=after_step, after_experience=after_experience,
                  name=name)


def _fit_rows(a: jax.Array, n: int) -> jax.Array:
  """``a``'s rows cycled (or cut) to ``n`` rows."""
  return a[jnp.arange(n) % a.shape[0]]


def _kl_rows(out: jax.Array, stored: jax.Array, t: float) -> jax.Array:
  """Per row, ``KL(softmax(stored / t) || softmax(out / t))``."""
  target = jax.nn.log_softmax(stored / t)
  return jnp.sum(jnp.exp(target) * (target - jax.nn.log_softmax(out / t)),
                 axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _save_logits(ctx, params, model_state, sstate: DualNetState) -> jax.Array:
  """The memory's logits with the rows of the experience just ended
  scored by the model now (evaluation mode); the others' kept."""
  mem = sstate.memory
  out = ctx.logits(params, model_state, mem.x, mem.task, train=False)
  fresh = mem.valid & (mem.experience == sstate.experience)
  return jnp.where(fresh[:, None], out.astype(jnp.float32), sstate.logits)
