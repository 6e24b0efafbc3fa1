"""SPR: self-purified replay for a stream with noisy labels.

Kim, Jeong, Moon & Kim (2021) learn from a stream whose labels are partly
wrong by trusting the labels as little as possible. The stream fills a
*delayed buffer* ``D`` of ``delayed_size`` examples; each time it is full:

1. **Self-supervised expert.** A freshly initialised network ``g_e`` (the
   run's model and a projector, with a fresh Adam) learns ``D``'s images
   without their labels, by SimCLR's NT-Xent loss over two augmented views
   of every row: with ``z = g(h(x)) / ‖g(h(x))‖`` and ``2N`` views,

   .. math::
      \\mathcal{L} = \\frac{1}{2N} \\sum_{i=1}^{2N} -\\log
        \\frac{\\exp(z_i \\cdot z_{i'} / \\tau)}
              {\\sum_{j \\ne i} \\exp(z_i \\cdot z_j / \\tau)}

   (``i'`` the other view of ``i``'s image; :func:`nt_xent`), ``expert_epochs``
   full-batch steps.
2. **Self-replay.** The *base* network ``g_b``, trained the same way over the
   whole stream (its weights, Adam moments and cosine schedule persist),
   takes ``base_epochs`` epochs on ``D``: one step on all of ``D`` while the
   purified buffer ``P`` is not full, then two steps per epoch, each on half
   of ``D`` (a fresh permutation) and as many rows of ``P`` drawn uniformly
   with replacement.
3. **Self-centered filter** (:func:`clean_posterior`). For each label ``c``
   in ``D``, the expert's normalised projections of its rows give
   ``S = relu(Z Z^T)``. ``ensembles`` times: a random graph ``B_ij ~
   Bernoulli(S_ij)`` (zeros set to ``1e-5``; networkx's undirected graph
   keeps the lower triangle's draw for each pair), its eigenvector
   centrality (:func:`eigenvector_centrality`), and each row's posterior of
   the high-centrality component of a beta mixture fitted to the class's
   centralities (:func:`jaxcl.beta_mixture.posterior`). A row is *clean*
   with probability ``p̄``, the mean posterior: kept when ``p̄ > u``,
   ``u ~ U(0, 1)``.
4. **Purified buffer.** The kept rows, by label then position, are offered
   to ``P`` (``mem_size``), the authors' class-balanced partitioning
   reservoir with ``q = 0`` (:func:`purified_add`): while ``P`` has room a
   row takes the next slot; then a row of class ``k`` enters with
   probability ``min(1, m_k / n_k)`` (``m_k = |P| / K``, ``K`` the classes in
   ``P``, ``n_k`` the rows of ``k`` offered so far), and evicts, from a class
   drawn with probability ``softmax(|P_j| - |P| / K)``, that class's row with
   the lowest ``p̄``. ``D`` is emptied.

Before each evaluation (here: when an experience ends) a copy of the base
network's feature extractor with a fresh output layer is fitted to ``P``
with the stored (noisy) labels: ``finetune_epochs`` epochs of batches of
``finetune_batch_size`` (the last partial batch dropped), Adam with its rate
multiplied by ``finetune_gamma`` every ``finetune_step_size`` steps, each
gradient entry clipped to ``±clip_value``, no augmentation. That network
predicts. Rows still in ``D`` wait for the next fill, across experiences,
and never reach the classifier if the stream ends first.

As the authors' code (``ecrireme/SPR``: ``models/SPR.py``,
``models/reservoir/{prs,purified_buffer,delay_buffer}.py``, ``utils.py``,
``configs/mnist_spr.yaml``; read for it) and Mammoth's ``models/spr.py``
where they agree. The schedules: the SSL Adam's rate is held for the first
10 epochs of each fill, then follows PyTorch's ``CosineAnnealingLR``
(``T_max`` the epochs, ``eta_min = 0``) stepped once an epoch; the base
network's schedule is never reset, so it continues (periodically) across
fills. Where they differ the authors' code is followed: ``P`` is their
class-balanced buffer (Mammoth: a plain reservoir), the expert's Adam is
fresh for each fill (Mammoth keeps one), its epoch is one permutation of
``D`` (Mammoth: rows drawn with replacement). The augmentation is theirs on
the pixels: a resized crop (area ``(0.08, 1)``, ratio ``(3/4, 4/3)``) and a
horizontal flip, plus colour jitter ``(0.5, 0.5, 0.5, 0.2)`` with
probability 0.5 on RGB images (:mod:`jaxcl.augment`). Eigenvector
centrality is networkx's power iteration on ``I + W`` from ``1/n``, to its
tolerance ``n · 1e-6`` within 6000 iterations (networkx raises after 6000;
the last iterate is used here).

How it fits the engine: SPR learns nothing from the training steps (zero
gradients, as :mod:`jaxcl.strategies.gdumb`); its work is the fills. Each
experience's training rows are fed to ``D`` once, in a random order drawn
from the strategy's key, when the experience ends (``after_experience``,
one compiled program per fill): SPR is an online method, and a fill's
computation depends only on the rows it holds, so this is the paper's
stream, whatever ``train.epochs`` (more epochs train nothing more). Not
reproduced: the authors reseed every random generator after each fill (a
quirk of their code), and they fine-tune at the first batch of each new
task and after the stream rather than at each experience's end (the same
points in a split stream).

References:
  Kim, Jeong, Moon & Kim, `Continual learning on noisy data streams via
  self-purified replay <https://arxiv.org/abs/2110.07735>`_, ICCV 2021.
  Chen, Kornblith, Norouzi & Hinton, `A simple framework for contrastive
  learning of visual representations <https://arxiv.org/abs/2002.05709>`_,
  ICML 2020 (NT-Xent).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import augment as augment_lib
from jaxcl import beta_mixture, buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies._epochs import over_epochs
from jaxcl.strategies.scr import ProjectionHead, supcon_loss
from jaxcl.strategy import Strategy, mark_experience, zero_grads
from jaxcl.train import init_variables

__all__ = ["spr", "SPRState", "nt_xent", "undirected_weights",
           "eigenvector_centrality",
           "clean_posterior", "purified_add", "finetune"]

# The SSL schedules hold their rate for this many epochs of each fill
# (the code steps its scheduler only from epoch 10 on).
_HOLD_EPOCHS = 10
_JITTER = (0.5, 0.5, 0.5, 0.2)


class SPRState(NamedTuple):
  delayed: buffers.Memory  # D: rows waiting for the next fill (< its size)
  memory: buffers.Memory   # P: the purified buffer; seen = rows offered
  clean_p: jax.Array       # float32 (mem_size,): each P row's p̄
  offered: jax.Array       # int32 (C,): rows of each class offered to P
  base: Any                # the base network's model parameters (SSL)
  base_state: Any          # its model state (batch statistics)
  projector: Any           # the base network's projector parameters
  base_opt: Any            # Adam state of (base, projector)
  fills: jax.Array         # int32: fills so far (the base schedule's place)
  experience: jax.Array    # int32: the current experience
  key: jax.Array


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's NT-Xent loss over two views' normalised embeddings ``(N, d)``
  each: each of the ``2N`` views is an anchor whose positive is the other
  view of its image and whose negatives are the ``2N - 2`` others, the
  cross-entropy averaged over anchors (the reference's sum over ``2N``).
  Khosla et al.'s supervised loss with each image its own class
  (:func:`jaxcl.strategies.scr.supcon_loss`)."""
  n = z1.shape[0]
  ids = jnp.arange(n)
  return supcon_loss(jnp.concatenate([z2, z1]), jnp.concatenate([ids, ids]),
                     jnp.ones((2 * n,), bool), temperature)


def undirected_weights(b: jax.Array) -> jax.Array:
  """The weights of networkx's undirected graph built from a square matrix
  ``b`` without zeros (``from_numpy_array``): edge ``(i, j)`` is added,
  then ``(j, i)`` later in row-major order overwrites it, so each pair
  keeps the lower triangle's entry (the diagonal: self-loops)."""
  return jnp.tril(b) + jnp.tril(b, -1).T


def eigenvector_centrality(w: jax.Array, valid: jax.Array,
                           max_iter: int = 6000,
                           tol: float = 1e-6) -> jax.Array:
  """networkx's ``eigenvector_centrality`` of the graph on the ``valid``
  nodes with symmetric weights ``w`` (self-loops on the diagonal): from
  ``x = 1/n``, ``x ← (I + W) x / ‖(I + W) x‖₂`` until ``‖Δx‖₁ < n · tol``
  or ``max_iter`` iterations; 0 off the valid nodes."""
  valid = valid.astype(bool)
  n = jnp.sum(valid)
  w = jnp.where(valid[:, None] & valid[None, :], w, 0.0)
  x0 = jnp.where(valid, 1.0 / jnp.maximum(n, 1), 0.0)

  def body(carry):
    x, _, i = carry
    new = x + w.T @ x
    norm = jnp.linalg.norm(new)
    new = new / jnp.where(norm > 0, norm, 1.0)
    return new, jnp.sum(jnp.abs(new - x)), i + 1

  def going(carry):
    _, err, i = carry
    return (n > 0) & (i < max_iter) & ((i == 0) | (err >= n * tol))

  return jax.lax.while_loop(going, body, (x0, jnp.inf, 0))[0]


def clean_posterior(z: jax.Array, y: jax.Array, key: jax.Array,
                    num_classes: int, ensembles: int) -> jax.Array:
  """The self-centered filter's ``p̄`` ``(N,)`` for rows with normalised
  projections ``z`` ``(N, d)`` and labels ``y``: per label, the mean over
  ``ensembles`` random graphs of the beta-mixture posterior of each row's
  eigenvector centrality (module docstring, step 3); NaN where a class's
  fit is degenerate (too few rows), which keeps no row."""
  s = jax.nn.relu(z @ z.T)

  def one_graph(k, member):
    b = (s > jax.random.uniform(k, s.shape)).astype(jnp.float32)
    b = jnp.where(b == 0, 1e-5, b)
    return beta_mixture.posterior(
        eigenvector_centrality(undirected_weights(b), member), member)

  def one_class(args):
    c, k = args
    member = y == c
    p = jax.vmap(one_graph, (0, None))(jax.random.split(k, ensembles), member)
    return jnp.mean(p, axis=0)

  per_class = jax.lax.map(one_class, (jnp.arange(num_classes),
                                      jax.random.split(key, num_classes)))
  return jnp.take_along_axis(per_class, y[None, :], axis=0)[0]


def purified_add(mem: buffers.Memory, clean_p: jax.Array, offered: jax.Array,
                 key: jax.Array, x: jax.Array, y: jax.Array, task: jax.Array,
                 experience: jax.Array, p: jax.Array, take: jax.Array
                 ) -> tuple[buffers.Memory, jax.Array, jax.Array]:
  """Offers the rows with ``take``, in order, to the class-balanced
  purified buffer (module docstring, step 4): ``(mem, clean_p, offered)``.
  ``mem.seen`` counts the rows offered; ``offered`` per class."""
  cap = buffers.capacity_of(mem)
  num = offered.shape[0]

  def offer(carry, row):
    mem, cp, off = carry
    xi, yi, ti, ei, pi, go, k = row
    k_in, k_out = jax.random.split(k)
    have = buffers.counts(mem, num)
    present = have > 0
    share = present / jnp.maximum(jnp.sum(present), 1)  # q = 0: 1 / K
    stored = jnp.sum(mem.valid)
    m_k = cap * share[yi]
    n_k = off[yi].astype(jnp.float32)
    p_in = jnp.where(n_k > m_k, m_k / jnp.maximum(n_k, 1.0), 1.0)
    excess = jnp.where(present, have - share * stored, -jnp.inf)
    evict_class = jax.random.categorical(k_out, excess)
    mine = mem.valid & (mem.y == evict_class)
    victim = jnp.argmin(jnp.where(mine, cp, jnp.inf))
    filling = mem.seen < cap
    admit = jax.random.uniform(k_in) < p_in
    slot = jnp.where(filling, mem.seen, jnp.where(admit, victim, cap))
    slot = jnp.where(go, slot, cap)  # cap: writes nothing
    new = buffers.put_rows(mem, slot[None], xi[None], yi[None], ti[None],
                           ei[None])
    cp = cp.at[slot].set(pi, mode="drop")
    new = new._replace(seen=mem.seen + go.astype(jnp.int32))
    off = off.at[yi].add(go.astype(jnp.int32))
    return (new, cp, off), None

  keys = jax.random.split(key, y.shape[0])
  (mem, clean_p, offered), _ = jax.lax.scan(
      offer, (mem, clean_p, offered),
      (x, y, task, experience, p, take, keys))
  return mem, clean_p, offered


def _cosine(lr: float, step: jax.Array, period: int) -> jax.Array:
  """PyTorch's ``CosineAnnealingLR`` (``eta_min = 0``) after ``step``
  scheduler steps, past ``period`` too (its closed form is periodic)."""
  return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * step / period))


def finetune(ctx, key: jax.Array, base: Any, base_state: Any,
             mem: buffers.Memory, *, epochs: int, batch_size: int,
             learning_rate: float, step_size: int, gamma: float,
             clip_value: float) -> tuple[Any, Any]:
  """The classifier fitted to ``P``: the base network's parameters with a
  fresh ``head``, trained whole with Adam on the valid rows of ``mem``
  (module docstring). Returns ``(params, model_state)``."""
  k_init, k_epochs = jax.random.split(key)
  fresh, _ = init_variables(ctx, k_init)
  params = dict(base, head=fresh["head"])
  tx = optax.chain(optax.clip(clip_value) if clip_value > 0
                   else optax.identity(), optax.scale_by_adam())

  def step(carry, idx, ok, k, e, j):
    del k, e, j

    def train(carry):
      params, ms, opt, it = carry

      def loss_fn(p):
        logits, new_ms = ctx.apply(p, ms, mem.x[idx], mem.task[idx],
                                   train=True, mask=ok)
        return cross_entropy(logits, mem.y[idx], ok.astype(jnp.float32)), \
            new_ms

      (_, new_ms), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt = tx.update(g, opt, params)
      lr = learning_rate * gamma ** (it // step_size).astype(jnp.float32)
      updates = jax.tree.map(lambda u: -lr * u, updates)
      return optax.apply_updates(params, updates), new_ms, opt, it + 1

    # drop_last: a partial batch (the epoch's last) is not a step.
    return jax.lax.cond(jnp.sum(ok) == batch_size, train, lambda c: c,
                        carry)

  carry = (params, base_state, tx.init(params), jnp.zeros((), jnp.int32))
  params, ms, _, _ = over_epochs(k_epochs, mem.valid, carry, epochs=epochs,
                                 batch_size=batch_size, step=step)
  return params, ms


def spr(mem_size: int = 300, delayed_size: int = 300,
        expert_epochs: int = 4000, base_epochs: int = 3000,
        ssl_learning_rate: float = 3e-4, temperature: float = 0.5,
        projection_dim: int = 256, ensembles: int = 5,
        finetune_epochs: int = 50, finetune_batch_size: int = 16,
        finetune_learning_rate: float = 2e-3, finetune_step_size: int = 300,
        finetune_gamma: float = 0.1, clip_value: float = 0.5,
        augment: str | Sequence[str] = "auto") -> Strategy:
  """SPR (defaults: the authors' MNIST configuration).

  Args:
    mem_size: the purified buffer ``P``'s capacity.
    delayed_size: the delayed buffer ``D``'s capacity (>= 2): a fill of
      this many stream rows starts the self-supervised training and the
      filter; also the self-supervised batch size.
    expert_epochs: full-batch NT-Xent epochs of each fill's fresh expert.
    base_epochs: NT-Xent epochs of the base network per fill.
    ssl_learning_rate: Adam's rate for both (cosine-annealed).
    temperature: NT-Xent's ``τ``.
    projection_dim: the projector's output width (an MLP ``d -> d ->
      projection_dim`` over the model's features).
    ensembles: random graphs per class in the filter (``E_max``).
    finetune_epochs, finetune_batch_size, finetune_learning_rate: the
      classifier's fitting to ``P`` before evaluation (Adam).
    finetune_step_size, finetune_gamma: its rate is multiplied by
      ``finetune_gamma`` every ``finetune_step_size`` steps.
    clip_value: each gradient entry of the fitting clipped to
      ``±clip_value`` (0: no clipping).
    augment: the self-supervised views' augmentation: ``'auto'`` (a
      resized crop and a flip, plus colour jitter on RGB images),
      ``'none'``, or a sequence of names from :data:`jaxcl.augment.OPS`.

  Raises:
    ValueError: bad values; at ``init``, a model without a ``head`` layer,
      or a fine-tuning batch larger than ``P``.
  """
  buffers.check_capacity(mem_size, "mem_size")
  checks.whole("spr: delayed_size", delayed_size, 2)
  checks.whole("spr: expert_epochs", expert_epochs, 1)
  checks.whole("spr: base_epochs", base_epochs, 1)
  checks.positive("spr: ssl_learning_rate", ssl_learning_rate)
  checks.positive("spr: temperature", temperature)
  checks.whole("spr: projection_dim", projection_dim, 1)
  checks.whole("spr: ensembles", ensembles, 1)
  checks.whole("spr: finetune_epochs", finetune_epochs, 1)
  checks.whole("spr: finetune_batch_size", finetune_batch_size, 1)
  if finetune_batch_size > mem_size:
    raise ValueError(f"spr: finetune_batch_size={finetune_batch_size} is "
                     f"larger than the purified buffer (mem_size="
                     f"{mem_size}); use <= {mem_size}")
  checks.positive("spr: finetune_learning_rate", finetune_learning_rate)
  checks.whole("spr: finetune_step_size", finetune_step_size, 1)
  if not (checks.is_real(finetune_gamma) and 0 < finetune_gamma <= 1):
    raise ValueError(f"spr: finetune_gamma={finetune_gamma!r}: expected a "
                     "number in (0, 1]")
  checks.nonnegative("spr: clip_value", clip_value)
  if isinstance(augment, str):
    checks.one_of("spr: augment", augment, ("auto", "none"))
  else:
    augment = augment_lib.check_ops(augment, "spr: augment")
  projector = ProjectionHead(kind="mlp", dim=projection_dim)
  adam = optax.scale_by_adam()
  half = delayed_size // 2

  def views(ctx):
    shape = tuple(ctx.info.input_shape)
    rgb = len(shape) == 3 and shape[-1] == 3
    ops = (("crop", "flip") + (("jitter",) if rgb else ())
           if augment == "auto" else () if augment == "none" else augment)
    return augment_lib.pipeline(ops, shape, crop_scale=(0.08, 1.0),
                                jitter=_JITTER, jitter_p=0.5,
                                normalize=ctx.normalize, who="spr: augment")

  def embed(ctx, params, ms, pp, x, task, train):
    h, ms = ctx.apply(params, ms, x, task, train=train, features=True)
    return projector.apply({"params": pp}, h), ms

  def ssl_step(ctx, carry, x, task, key, lr):
    """One Adam step of NT-Xent on rows ``x``: ``carry`` is (params,
    model_state, projector, opt_state)."""
    params, ms, pp, opt = carry
    aug = views(ctx)
    k1, k2 = jax.random.split(key)
    x1, x2 = aug(k1, x), aug(k2, x)

    def loss_fn(both):
      p, q = both
      # Two passes, as the reference (batch statistics per view).
      z1, ms1 = embed(ctx, p, ms, q, x1, task, True)
      z2, ms2 = embed(ctx, p, ms1, q, x2, task, True)
      return nt_xent(z1, z2, temperature), ms2

    (_, ms), g = jax.value_and_grad(loss_fn, has_aux=True)((params, pp))
    updates, opt = adam.update(g, opt)
    params, pp = optax.apply_updates(
        (params, pp), jax.tree.map(lambda u: -lr * u, updates))
    return params, ms, pp, opt

  def init_projector(ctx, key, params, ms):
    x = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
    h, _ = ctx.apply(params, ms, x, jnp.zeros((1,), jnp.int32),
                     features=True)
    return projector.init(key, h)["params"]

  def fit_expert(ctx, key, x, task):
    k_init, k_proj, k_steps = jax.random.split(key, 3)
    params, ms = init_variables(ctx, k_init)
    pp = init_projector(ctx, k_proj, params, ms)
    carry = (params, ms, pp, adam.init((params, pp)))

    def epoch(c, e):
      lr = _cosine(ssl_learning_rate, jnp.maximum(e - _HOLD_EPOCHS, 0),
                   expert_epochs)
      return ssl_step(ctx, c, x, task, jax.random.fold_in(k_steps, e), lr), \
          None

    params, ms, pp, _ = jax.lax.scan(epoch, carry,
                                     jnp.arange(expert_epochs))[0]
    return params, ms, pp

  def fit_base(ctx, key, ss, x, task):
    mem = ss.memory
    full = mem.seen >= buffers.capacity_of(mem)
    take = min(delayed_size - half, buffers.capacity_of(mem))
    carry = (ss.base, ss.base_state, ss.projector, ss.base_opt)
    # Scheduler steps per fill (none in the held epochs).
    per_fill = max(base_epochs - _HOLD_EPOCHS, 0)

    def epoch(c, e):
      k = jax.random.fold_in(key, e)
      lr = _cosine(ssl_learning_rate,
                   per_fill * ss.fills + jnp.maximum(e - _HOLD_EPOCHS, 0),
                   base_epochs)

      def whole(c):
        return ssl_step(ctx, c, x, task, k, lr)

      def halves(c):
        order = jax.random.permutation(jax.random.fold_in(k, 1),
                                       delayed_size)
        for i in range(2):
          kk = jax.random.fold_in(k, 2 + i)
          part = order[i * half:(i + 1) * half]
          drawn = jax.random.randint(jax.random.fold_in(kk, 0), (take,), 0,
                                     buffers.capacity_of(mem))
          rows = jnp.concatenate([mem.x[drawn], x[part]])
          tasks = jnp.concatenate([mem.task[drawn], task[part]])
          c = ssl_step(ctx, c, rows, tasks, kk, lr)
        return c

      return jax.lax.cond(full, halves, whole, c), None

    return jax.lax.scan(epoch, carry, jnp.arange(base_epochs))[0]

  def process(ctx, ss, x, y, task, exp):
    """One fill of ``D`` (rows ``x``, ``y``, ...): the expert, the base
    network's self-replay, the filter and the purified buffer."""
    key = jax.random.fold_in(jax.random.fold_in(ss.key, 0x5E1F), ss.fills)
    k_exp, k_base, k_filter, k_keep, k_add = jax.random.split(key, 5)
    e_params, e_ms, e_pp = fit_expert(ctx, k_exp, x, task)
    base, base_state, proj, opt = fit_base(ctx, k_base, ss, x, task)
    z, _ = embed(ctx, e_params, e_ms, e_pp, x, task, False)
    p = clean_posterior(z, y, k_filter, ctx.info.num_classes, ensembles)
    keep = p > jax.random.uniform(k_keep, p.shape)  # NaN: never kept
    # Offered by label, then position (the reference's clean_idx order).
    order = jnp.argsort(y, stable=True)
    mem, clean_p, offered = purified_add(
        ss.memory, ss.clean_p, ss.offered, k_add, x[order], y[order],
        task[order], exp[order], p[order], keep[order])
    return ss._replace(memory=mem, clean_p=clean_p, offered=offered,
                       base=base, base_state=base_state, projector=proj,
                       base_opt=opt, fills=ss.fills + 1)

  process_jit = jax.jit(process, static_argnums=0)
  finetune_jit = jax.jit(functools.partial(
      finetune, epochs=finetune_epochs, batch_size=finetune_batch_size,
      learning_rate=float(finetune_learning_rate),
      step_size=finetune_step_size, gamma=float(finetune_gamma),
      clip_value=float(clip_value)), static_argnums=0)

  def init(ctx, key, params):
    if not (isinstance(params, dict) and "head" in params):
      got = sorted(params) if isinstance(params, dict) else type(params)
      raise ValueError(f"spr fits a fresh output layer named 'head' over the "
                       f"model's features; this model's parameters are "
                       f"{got}")
    views(ctx)  # an augmentation that does not fit the inputs fails now
    k_base, k_proj, k_state = jax.random.split(key, 3)
    base, base_state = init_variables(ctx, k_base)
    pp = init_projector(ctx, k_proj, base, base_state)
    shape = ctx.info.input_shape
    return SPRState(
        delayed=buffers.init(delayed_size, shape),
        memory=buffers.init(mem_size, shape),
        clean_p=jnp.zeros((mem_size,), jnp.float32),
        offered=jnp.zeros((ctx.info.num_classes,), jnp.int32),
        base=base, base_state=base_state, projector=pp,
        base_opt=adam.init((base, pp)), fills=jnp.zeros((), jnp.int32),
        experience=jnp.zeros((), jnp.int32), key=k_state)

  def after_experience(ctx, state, experience):
    ss = state.strategy
    key = jax.random.fold_in(jax.random.fold_in(ss.key, 0x5B2),
                             experience.index)
    k_order, k_fit = jax.random.split(key)
    order = np.asarray(jax.random.permutation(k_order, experience.num_train))
    d = jax.device_get(ss.delayed)
    held = int(np.sum(d.valid))  # D fills its slots in order
    n = experience.num_train
    rows = {
        "x": np.concatenate([d.x[:held], np.asarray(
            experience.train_x, np.float32)[order]]),
        "y": np.concatenate([d.y[:held], experience.train_y[order]]),
        "task": np.concatenate([d.task[:held], experience.train_task[order]]),
        "exp": np.concatenate([d.experience[:held], np.full(
            (n,), experience.index, np.int32)])}
    rows = {k: (v if k == "x" else v.astype(np.int32))
            for k, v in rows.items()}
    fills = (held + n) // delayed_size
    # A fill takes minutes at the paper's epochs: the run's bar counts
    # them (waiting for each, which costs nothing: the next needs it).
    bar = ctx.progress(fills, "fills of the delayed buffer", "fill")
    for i in range(fills):
      part = {k: jnp.asarray(v[i * delayed_size:(i + 1) * delayed_size])
              for k, v in rows.items()}
      ss = process_jit(ctx, ss, part["x"], part["y"], part["task"],
                       part["exp"])
      jax.block_until_ready(ss.fills)
      bar.update(1)
    bar.close()
    rest = {k: v[fills * delayed_size:] for k, v in rows.items()}
    left = len(rest["y"])
    delayed = buffers.put_rows(
        buffers.init(delayed_size, ctx.info.input_shape),
        jnp.arange(left), jnp.asarray(rest["x"]), jnp.asarray(rest["y"]),
        jnp.asarray(rest["task"]), jnp.asarray(rest["exp"]))
    ss = ss._replace(delayed=delayed._replace(
        seen=jnp.asarray(left, jnp.int32)))
    params, model_state = finetune_jit(ctx, k_fit, ss.base, ss.base_state,
                                       ss.memory)
    return state.replace(params=params, model_state=model_state,
                         opt_state=ctx.tx.init(params), strategy=ss)

  return Strategy(init=init, before_experience=mark_experience,
                  update_grads=zero_grads, after_experience=after_experience,
                  name="spr", writes_params=frozenset({"after_experience"}))
