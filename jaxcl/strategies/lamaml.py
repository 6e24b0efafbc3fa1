"""La-MAML: look-ahead meta-learning with learned per-parameter learning rates.

Gupta, Yadav & Paull (2020) meta-learn, online, both the weights and one
learning rate per weight. For each incoming batch ``b`` they take a few
fast SGD steps on ``b`` alone (the *look-ahead*), score the resulting
weights on ``b`` together with rows replayed from a reservoir memory, and
differentiate that score through the fast steps, with respect to the
weights and to the learning rates. A rate whose weight's steps raised the
loss on the memory (interference) shrinks, and can reach zero, which
freezes the weight; rates of weights whose steps helped old and new data
alike grow. Their Algorithm 1 for one batch, as their code runs it
(``k`` = ``n_inner`` pieces ``b_1..b_k`` of the incoming rows, ``M_B`` =
``batch_size`` memory rows):

.. math::
   \\begin{aligned}
   &b_m \\leftarrow M_B \\cup b, \\qquad \\theta_0 \\leftarrow \\theta\\\\
   &\\theta_i \\leftarrow \\theta_{i-1} - \\alpha \\circ
     \\mathrm{clip}_c\\big(\\nabla_{\\theta} \\ell(\\theta_{i-1}; b_i)\\big),
     \\quad i = 1..k \\quad \\text{(inner, look-ahead steps)}\\\\
   &L(\\theta, \\alpha) = \\tfrac{1}{k} \\textstyle\\sum_{i=1}^{k}
     \\ell(\\theta_i; b_m)
     \\quad \\text{(meta-loss; the paper's, } \\texttt{meta\\_loss='final'}
     \\text{: } \\ell(\\theta_k; b_m)\\text{)}\\\\
   &\\alpha \\leftarrow \\alpha - \\eta\\,
     \\mathrm{clipnorm}_c\\big(\\nabla_{\\alpha} L(\\theta, \\alpha)\\big)\\\\
   &\\theta \\leftarrow \\theta - \\max(\\alpha, 0) \\circ
     \\mathrm{clipnorm}_c\\big(\\nabla_{\\theta} L(\\theta, \\alpha)\\big)
   \\end{aligned}

with :math:`\\ell` the mean cross-entropy, :math:`\\circ` the elementwise
product, :math:`\\eta` = ``alpha_lr``, :math:`c` = ``grad_clip_norm``
(:math:`\\mathrm{clip}_c` clamps each entry to :math:`[-c, c]`,
:math:`\\mathrm{clipnorm}_c` rescales a whole gradient to global norm at
most :math:`c`, as ``torch.nn.utils.clip_grad_norm_`` does), and
:math:`\\alpha` initialised to ``alpha_init``. :math:`\\theta` moves with
the *updated* rates, clipped at 0 (the paper's asynchronous update: a
negative rate would ascend the meta-loss; it stops the weight instead,
and stays learnable since the inner steps use :math:`\\alpha` unclipped).
:math:`\\nabla_\\theta L` flows through the inner steps (second order);
``first_order=True`` treats each inner gradient :math:`g_j` as a
constant, so :math:`\\partial \\theta_i / \\partial \\theta = I` and
:math:`\\partial \\theta_i / \\partial \\alpha = -\\sum_{j \\le i}
\\mathrm{clip}_c(g_j)` (no second derivatives). The whole
procedure runs ``glances`` times per incoming batch (each with a fresh
permutation of the incoming rows and fresh memory rows), as the authors'
single-pass experiments do; then the incoming rows are offered to the
reservoir.

Mechanics (as :mod:`jaxcl.strategies.mer`): ``prepare_batch`` draws, per
glance, the memory rows and a permutation of the incoming rows into extra
batch keys (``lamaml_x``, ``lamaml_y``, ``lamaml_task``, ``lamaml_ok``,
``lamaml_perm``; the incoming rows stay as they are). ``update_grads``
runs the procedure inside ``jit`` (a ``lax.scan`` over the glances, and
within each over the ``k`` pieces) and returns the displacement as a
gradient, :math:`(\\theta - \\theta_{\\rm new}) / u`, plus the gradient
of any other chained member's loss, where :math:`u` is the optimiser's
SGD rate: so the optimiser lands exactly on :math:`\\theta_{\\rm new}`.
That needs plain SGD (another optimiser rescales or mixes the
displacement), which ``init`` checks by probing two updates; :math:`u`
is read from the optimiser's injected learning rate at each experience's
start, so a sweep over ``optimizer.learning_rate`` (which changes
nothing here but a chained member's step) stays exact. The same
procedure gives the new :math:`\\alpha`, so ``update_grads`` returns it
in the strategy state (the record's ``grads_state``) and ``after_step``
only feeds the reservoir. The
incoming rows' part of the task loss is reported but gives no gradient
(the procedure is their gradient); rows a chained member appends keep
theirs. Padding rows (mask 0) take part in nothing.

Settings from the authors' code where the paper is silent, and
deviations (reference: ``montrealrobotics/La-MAML``, ``model/lamaml.py``
for MNIST, ``model/lamaml_cifar.py``; Avalanche's ``lamaml_v2.py``):

* Inner steps see the incoming rows only, memory rows only the meta-loss
  (paper, both codes, Avalanche). The pieces are ``np.array_split``'s
  (sizes differ by at most one); the code cuts ``ceil(B / k)``-row
  pieces, which is the same when ``k`` divides ``B`` (the MNIST code:
  ``k = B``, one row per step, this module's default with batch 10) and
  otherwise can leave the last piece empty.
* Inner steps use :math:`\\alpha` unclipped (paper, CIFAR code,
  Avalanche); the MNIST code uses :math:`\\max(\\alpha, 0)` there too.
* Inner gradients are clamped entrywise at ``grad_clip_norm`` (CIFAR
  code, Avalanche; the MNIST code's clamp discards its result, so it
  clamps nothing); the meta-gradients of :math:`\\theta` and of
  :math:`\\alpha` are each clipped to global norm ``grad_clip_norm``
  (both codes; the paper does not say).
* The meta-loss is averaged over the fast weights after every inner
  step (``meta_loss='mean'``, the default), as both codes and Avalanche
  do; the paper's Algorithm 1 scores the last fast weights only
  (``'final'``). On Permuted MNIST (20 x 1000 examples, MLP 100-100,
  one pass at batch 10, 3 seeds) the paper's form lost 11 points of
  accuracy (57.5 % against 68.0 %), mostly in learning each new
  experience (70 % against 84 % right after it; why was not traced).
* Second order by default (the paper's derivation; Avalanche's default;
  the CIFAR scripts); the MNIST scripts of the code ran first order
  (``first_order=True`` here: as accurate on that protocol, 69.3 %, and
  about 2.5 times faster).
* Memory: a reservoir over every incoming row, replayed from the first
  step on, current experience included (the code's
  ``use_old_task_memory`` aliases the old-task memory to the reservoir,
  so it replays the same way; Avalanche fills its reservoir at
  experience ends and replays from the second experience). Memory rows
  are drawn without replacement (the code draws with replacement;
  Avalanche without), anew for each glance. The code offers rows during
  the first epoch and glance only; here at every step (the same in the
  single-pass protocols).
* Not implemented: the code's ``sync_update`` (C-MAML / Sync-La-MAML:
  :math:`\\theta` moved by a fixed-rate optimiser instead of by
  :math:`\\max(\\alpha, 0)`). ``alpha_lr=0`` keeps :math:`\\alpha` at
  ``alpha_init`` (the code without ``--learn_lr``).

Defaults: the authors' La-MAML runs on Permuted and Rotated MNIST
(``run_experiments.sh``: memory 200, batch 10 plus 10 replayed, 5
glances, ``alpha_init`` 0.15, ``opt_lr`` 0.3, the parser's
``grad_clip_norm`` 2, one inner step per incoming row, the averaged
meta-loss), but second order (those scripts ran first order).

State: :class:`LaMAMLState` (the rates :math:`\\alpha`, a pytree shaped
like the parameters; ``alpha_lr`` as a leaf, so a sweep can vary it; the
optimiser's rate; the reservoir; the model state as the experience
started, which the inner steps run with, as MER's do; the current
experience; a key), fixed shapes: nothing recompiles between
experiences, and it vmaps and checkpoints like any state.

References:
  Gupta, Yadav & Paull, `La-MAML: look-ahead meta learning for continual
  learning <https://arxiv.org/abs/2007.13904>`_, NeurIPS 2020
  (Algorithm 1; code ``montrealrobotics/La-MAML``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies.mer import reported_task_loss
from jaxcl.strategies.replay import incoming_rows, reservoir_step
from jaxcl.strategy import Strategy, mark_experience_start
from jaxcl.train import init_variables

__all__ = ["lamaml", "LaMAMLState", "META_LOSSES", "pieces"]

META_LOSSES = ("final", "mean")
_NAME = "lamaml"


class LaMAMLState(NamedTuple):
  alpha: Any              # per-parameter learning rates, shaped like params
  alpha_lr: jax.Array     # float32 scalar: eta, the rates' own SGD rate
  unit: jax.Array         # float32 scalar: the optimiser's SGD rate u
  memory: buffers.Memory  # reservoir over the stream
  model_state: Any        # model state as the experience started
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def pieces(batch_size: int, n_inner: int) -> tuple[np.ndarray, np.ndarray]:
  """The inner steps' rows: ``(rows, valid)``, both ``(n_inner, m)``.

  Row ``rows[i, j]`` of the (permuted) incoming batch is the ``j``-th of
  piece ``i`` where ``valid[i, j]``; pieces are ``np.array_split``'s, so
  their sizes differ by at most one and none is empty (host side, static).
  """
  split = np.array_split(np.arange(batch_size), n_inner)
  m = max(len(s) for s in split)
  rows = np.zeros((n_inner, m), np.int32)
  valid = np.zeros((n_inner, m), bool)
  for i, s in enumerate(split):
    rows[i, :len(s)] = s
    valid[i, :len(s)] = True
  return rows, valid


def _clip_global_norm(tree: Any, max_norm: float) -> Any:
  """``torch.nn.utils.clip_grad_norm_``: scaled by ``max_norm / (norm +
  1e-6)`` when that is below 1 (``inf``: unchanged)."""
  if max_norm == float("inf"):
    return tree
  leaves = jax.tree.leaves(tree)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))
  scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
  return jax.tree.map(lambda g: g * scale, tree)


def _injected_rate(opt_state: Any) -> Any:
  """The ``learning_rate`` an ``optax.inject_hyperparams`` state holds
  (what :func:`jaxcl.train.make_optimizer` builds), or None."""
  found = []

  def visit(node):
    hp = getattr(node, "hyperparams", None)
    if isinstance(hp, dict) and "learning_rate" in hp:
      found.append(hp["learning_rate"])
      return True
    return False

  jax.tree.leaves(opt_state, is_leaf=visit)
  return found[0] if found else None


def sgd_rate(ctx, params) -> tuple[float, Any]:
  """The optimiser's plain-SGD rate ``u`` and the injected learning rate
  it was probed at (or None): host side, at ``init``.

  Probes two updates, gradient 2 at parameters 2, then gradient 3 at
  parameters 5: plain SGD gives ``-2u`` then ``-3u`` in every entry;
  momentum, Adam, weight decay or a decaying schedule do not.

  Raises:
    ValueError: the optimiser is not plain SGD.
  """
  full = lambda v: jax.tree.map(
      lambda p: np.full(np.shape(p), v, np.float32), params)
  with jax.ensure_compile_time_eval():
    st = ctx.tx.init(full(2.0))
    lr0 = _injected_rate(st)
    u1, st = ctx.tx.update(full(2.0), st, full(2.0))
    u2, _ = ctx.tx.update(full(3.0), st, full(5.0))
    flat = lambda t: np.concatenate(
        [np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(t)])
    r1, r2 = -flat(u1) / 2.0, -flat(u2) / 3.0
  u = float(np.median(r1)) if r1.size else 0.0
  if not (u > 0 and np.all(np.isfinite(r1)) and np.all(np.isfinite(r2))
          and np.allclose(r1, u, rtol=1e-5, atol=0)
          and np.allclose(r2, u, rtol=1e-5, atol=0)):
    second = float(np.median(r2)) if r2.size else 0.0
    raise ValueError(
        f"{_NAME}: the optimiser is not plain SGD: for a gradient of 2, "
        f"then 3, its updates are {-2 * u:.4g} and {-3 * second:.4g} "
        f"(as -2u and -3u, u = {u:.4g} then {second:.4g}), not -2u and -3u "
        f"for one rate u > 0. La-MAML moves each weight by max(alpha, 0) "
        f"times its meta-gradient and hands the optimiser that displacement "
        f"divided by u, which only plain SGD applies exactly (momentum, "
        f"Adam, weight decay, a decaying schedule or gradient clipping "
        f"would change it). Set optimizer.name='sgd', weight_decay=0, "
        f"schedule='constant' and clip_norm=0 "
        f"(the learning rate is free: alpha sets La-MAML's steps)")
  return u, (None if lr0 is None else float(np.asarray(lr0)))


def lamaml(mem_size: int = 200, batch_size: int = 10, n_inner: int = 10,
           glances: int = 5, alpha_init: float = 0.15, alpha_lr: float = 0.3,
           grad_clip_norm: float = 2.0, first_order: bool = False,
           meta_loss: str = "mean") -> Strategy:
  """La-MAML.

  Args:
    mem_size: reservoir capacity in examples.
    batch_size: memory rows in each meta-batch (``|M_B|``).
    n_inner: inner (look-ahead) steps per glance: the incoming batch is
      cut into this many pieces, one step each (with the protocol's batch
      of 10, one row per step, as the authors' MNIST code).
    glances: passes of the whole procedure over each incoming batch.
    alpha_init: initial per-parameter learning rate.
    alpha_lr: SGD rate of the learning rates (``eta``); 0 keeps them at
      ``alpha_init``.
    grad_clip_norm: entrywise clamp of the inner gradients and global-norm
      clip of the two meta-gradients (``inf``: none).
    first_order: treat the inner gradients as constants in the
      meta-gradient (no second derivatives).
    meta_loss: ``'mean'`` (the authors' code and Avalanche: averaged over
      the fast weights after each inner step) or ``'final'`` (the paper's
      Algorithm 1: at the last fast weights only).

  Raises:
    ValueError: a non-positive ``mem_size``, ``batch_size``, ``n_inner``,
      ``glances``, ``alpha_init`` or ``grad_clip_norm``; a negative
      ``alpha_lr``; ``batch_size`` larger than ``mem_size``; an unknown
      ``meta_loss``; a non-bool ``first_order``; at ``init``, ``n_inner``
      larger than the stream's batch size or an optimiser other than
      plain SGD.
  """
  buffers.check_capacity(mem_size, f"{_NAME}: mem_size")
  checks.whole(f"{_NAME}: batch_size", batch_size, 1)
  buffers.replay_size(_NAME, batch_size, mem_size, 1)
  checks.whole(f"{_NAME}: n_inner", n_inner, 1)
  checks.whole(f"{_NAME}: glances", glances, 1)
  checks.positive(f"{_NAME}: alpha_init", alpha_init)
  checks.nonnegative(f"{_NAME}: alpha_lr", alpha_lr)
  checks.positive_or_inf(f"{_NAME}: grad_clip_norm", grad_clip_norm)
  checks.flag(f"{_NAME}: first_order", first_order)
  checks.one_of(f"{_NAME}: meta_loss", meta_loss, META_LOSSES)
  clip = float(grad_clip_norm)

  def check_pieces(ctx) -> None:
    b = ctx.info.batch_size
    if n_inner > b:
      raise ValueError(
          f"{_NAME}: n_inner={n_inner} is larger than the stream's batch "
          f"size {b}: some inner step would have no row; use n_inner <= {b}"
          f" ({b}: one incoming row per step)")

  def init(ctx, key, params):
    check_pieces(ctx)
    u, _ = sgd_rate(ctx, params)
    k_mem, k_ms = jax.random.split(key)
    alpha = jax.tree.map(
        lambda p: jnp.full(jnp.shape(p), alpha_init, jnp.float32), params)
    return LaMAMLState(alpha, jnp.asarray(alpha_lr, jnp.float32),
                       jnp.asarray(u, jnp.float32),
                       buffers.init(mem_size, ctx.info.input_shape),
                       init_variables(ctx, k_ms)[1],
                       jnp.zeros((), jnp.int32), k_mem)

  def before_experience(ctx, state, experience):
    state = mark_experience_start(ctx, state, experience)
    # The optimiser's rate as this run has it: a sweep writes its own
    # learning rate into the optimiser state after init.
    now = _injected_rate(state.opt_state)
    u, lr0 = sgd_rate(ctx, state.params)
    if now is not None and lr0:
      u = jnp.asarray(u * jnp.asarray(now, jnp.float32) / lr0, jnp.float32)
    ss = state.strategy._replace(unit=jnp.asarray(u, jnp.float32))
    return state.replace(strategy=ss)

  def prepare_batch(ctx, sstate, batch, key):
    b = ctx.info.batch_size
    k_mem, k_perm = jax.random.split(key)
    idx, ok = jax.vmap(lambda k: buffers.sample(sstate.memory, k,
                                                batch_size))(
        jax.random.split(k_mem, glances))
    mem = sstate.memory
    out = dict(batch)
    out[f"{_NAME}_x"] = mem.x[idx]              # (glances, R, ...)
    out[f"{_NAME}_y"] = mem.y[idx]
    out[f"{_NAME}_task"] = mem.task[idx]
    out[f"{_NAME}_ok"] = ok.astype(jnp.float32)
    out[f"{_NAME}_perm"] = jax.vmap(
        lambda k: jax.random.permutation(k, b))(
            jax.random.split(k_perm, glances)).astype(jnp.int32)
    return out

  def procedure(ctx, sstate, params, batch):
    """``(theta_new, alpha_new)`` after the glances (pure; all its
    randomness is in ``batch``)."""
    rows = incoming_rows(ctx, batch)
    # A member chained before may have turned the mask into loss weights
    # (the generative replays); here a row counts or not.
    rows["mask"] = (rows["mask"] > 0).astype(jnp.float32)
    table, valid = pieces(ctx.info.batch_size, n_inner)
    valid = jnp.asarray(valid, jnp.float32)
    ms = sstate.model_state

    def ce(p, x, y, task, w):
      return cross_entropy(ctx.logits(p, ms, x, task, train=True, mask=w),
                           y, w)

    def one_glance(carry, inputs):
      theta, alpha = carry
      perm, mx, my, mt, mok = inputs
      # The meta-batch: memory rows and every incoming row.
      meta = (jnp.concatenate([mx, rows["x"].astype(mx.dtype)]),
              jnp.concatenate([my, rows["y"]]),
              jnp.concatenate([mt, rows["task"]]),
              jnp.concatenate([mok, rows["mask"]]))
      sel = perm[table]                         # (k, m) incoming rows
      inner = (rows["x"][sel], rows["y"][sel], rows["task"][sel],
               rows["mask"][sel] * valid)

      def meta_objective(theta0, alpha):
        def step(p, piece):
          x, y, task, w = piece
          # A chained member's fixed weights (ctx.freeze: e.g. PackNet's,
          # progressive networks', a frozen latent split) stay fixed in
          # the look-ahead too, so the meta-loss is scored where the
          # update can go.
          g = ctx.freeze(jax.grad(ce)(p, x, y, task, w))
          if first_order:
            g = jax.lax.stop_gradient(g)
          p = jax.tree.map(lambda a, r, d: a - r * jnp.clip(d, -clip, clip),
                           p, alpha, g)
          # A piece of padding rows leaves p alone; in 'mean' it is not
          # counted either.
          live = jnp.any(w > 0).astype(jnp.float32)
          lm = ce(p, *meta) if meta_loss == "mean" else 0.0
          return p, (lm * live, live)

        last, (lms, live) = jax.lax.scan(step, theta0, inner)
        if meta_loss == "mean":
          return jnp.sum(lms) / jnp.maximum(jnp.sum(live), 1.0)
        return ce(last, *meta)

      g_theta, g_alpha = jax.grad(meta_objective, argnums=(0, 1))(theta,
                                                                  alpha)
      g_theta = _clip_global_norm(ctx.freeze(g_theta), clip)
      g_alpha = _clip_global_norm(g_alpha, clip)
      alpha = jax.tree.map(lambda a, g: a - sstate.alpha_lr * g, alpha,
                           g_alpha)
      theta = jax.tree.map(lambda p, a, g: p - jnp.maximum(a, 0.0) * g,
                           theta, alpha, g_theta)
      return (theta, alpha), None

    xs = (batch[f"{_NAME}_perm"], batch[f"{_NAME}_x"], batch[f"{_NAME}_y"],
          batch[f"{_NAME}_task"], batch[f"{_NAME}_ok"])
    theta0 = jax.lax.stop_gradient(params)
    out, _ = jax.lax.scan(one_glance, (theta0, sstate.alpha), xs)
    return out

  # One procedure gives both theta (the gradient) and alpha (state), so
  # update_grads hands the new rates to after_step (grads_state): traced
  # twice, the copies were not merged by XLA inside the training loop
  # (twice the step's time).
  def update_grads(ctx, sstate, grads, params, batch, key):
    del key  # the draws are in the batch
    theta, alpha = procedure(ctx, sstate, params, batch)
    theta0 = jax.lax.stop_gradient(params)
    grads = jax.tree.map(lambda g, p, t: g + (p - t) / sstate.unit, grads,
                         theta0, theta)
    return grads, sstate._replace(alpha=alpha)

  def after_step(ctx, sstate, info):
    return sstate._replace(memory=reservoir_step(ctx, sstate, info))

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, task_loss=reported_task_loss,
                  update_grads=update_grads, after_step=after_step,
                  grads_state=True, name=_NAME)
