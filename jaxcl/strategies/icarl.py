"""iCaRL: herding exemplars, nearest-mean-of-exemplars, sigmoid distillation.

Rebuffi et al. (2017) keep a fixed total memory of ``K`` exemplars, and

* **classify** by the nearest mean of exemplars (Algorithm 1): with
  ``φ(x)`` the L2-normalised features,

  .. math::  y^* = \\arg\\min_y \\lVert \\varphi(x) - \\mu_y \\rVert,
     \\qquad \\mu_y = \\frac{\\bar\\varphi_y}{\\lVert\\bar\\varphi_y\\rVert},
     \\quad \\bar\\varphi_y = \\frac{1}{|P_y|}\\sum_{p \\in P_y} \\varphi(p)

  (the mean is renormalised, as in the authors' code); ``predict`` returns
  ``-‖φ(x) - μ_y‖²``, and ``-1e9`` for classes without exemplars. With
  ``mirror_means`` the mean also counts each exemplar's left-right
  mirror image, as the authors' CIFAR-100 code does ("flipped version
  also") and Avalanche's does for images,

  .. math::  \\mu_y \\propto \\frac{1}{|P_y|}\\sum_{p \\in P_y}
     \\tfrac12\\big(\\varphi(p) + \\varphi(\\overleftarrow{p})\\big)

  (test images are not mirrored; Mammoth's iCaRL does not mirror).
* **train** (Algorithm 3) on the new data plus exemplars with a sigmoid
  binary cross-entropy whose targets are one-hot for the new classes and
  the previous model's sigmoid outputs for the old ones (distillation):

  .. math::
     \\ell(x, y) = \\frac{1}{|A|}\\sum_{c \\in A}
       \\mathrm{BCE}\\big(\\sigma(z_c(x)),\\ t_c\\big), \\qquad
     t_c = \\begin{cases} \\sigma(z^{old}_c(x)) & c \\text{ old} \\\\
                         [y = c] & c \\text{ new} \\end{cases}

  over the classes ``A`` seen so far (old and current), averaged over the
  batch (the classes of later experiences are left out, as in Mammoth's
  implementation). With ``bce_classes='all'``, ``A`` is every class, the
  later experiences' with target 0, as in the authors' code, whose
  Lasagne ``binary_crossentropy(...).mean()`` runs over all 100 outputs
  from the first group on: its gradient is then ``|A_seen| / C`` times
  the default's, which their learning rate of 2.0 assumes.
* **select exemplars by herding** (Algorithm 4) after each experience:
  every class present gets ``m = K // |classes seen|`` exemplars chosen
  greedily without repetition,

  .. math::  p_k = \\arg\\min_{x \\notin \\{p_1..p_{k-1}\\}} \\Big\\lVert
     \\mu - \\frac1k\\Big(\\varphi(x) + \\sum_{j<k}\\varphi(p_j)\\Big)
     \\Big\\rVert, \\qquad \\mu = \\frac1n \\sum_i \\varphi(x_i),

  and older classes keep their first ``m`` (herding order is stored with
  each exemplar as ``rank``, so reducing a set is a comparison). With
  ``per_class`` the memory grows instead: ``m`` is fixed and every class
  keeps that many (LUCIR's and FACIL's "grow" memories). The authors'
  code (and LUCIR's, which copies it) writes the same choice as
  ``w ← w + μ - φ(p_k)``, ``p_{k+1} = argmax_x ⟨w, φ(x)⟩``: with unit
  features the argmax is this argmin, but it may pick an exemplar again,
  which then adds no exemplar while ``w`` still moves; here each pick is
  a new one (the paper's "without repetition", FACIL's choice).

Training batches are the stream's batch plus ``batch_size`` exemplars
drawn uniformly from memory (the exemplars are mixed into every step
instead of concatenated into one shuffled training set). The BCE *replaces*
the softmax cross-entropy through the ``task_loss`` hook, so a chained
strategy that needs the task gradient (SI) sees iCaRL's BCE, and chaining
iCaRL with another strategy that replaces the task loss is an error.

``layer`` picks the feature layer ``φ``: ``'backbone'`` (the default) is the
model's ``features=True`` output; any other module path (e.g.
``'backbone/Dense_0'``) is cut out with
:func:`jaxcl.strategies.latent_replay.split_model`.

References:
  Rebuffi, Kolesnikov, Sperl & Lampert, `iCaRL: Incremental Classifier and
  Representation Learning <https://arxiv.org/abs/1611.07725>`_, CVPR 2017.
  Buzzega et al., `Dark experience for general continual learning
  <https://arxiv.org/abs/2004.07211>`_, 2020 (Mammoth's implementation and
  the Split MNIST protocol).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import buffers, checks
from jaxcl.state import masked_logits
from jaxcl.strategies.latent_replay import split_model
from jaxcl.strategies.replay import append_rows
from jaxcl.strategy import Strategy, experience_classes
from jaxcl.train import device_experience, init_variables

__all__ = ["ICaRLState", "icarl", "herding", "normalise", "icarl_loss",
           "features", "select_exemplars", "exemplar_hook",
           "backbone_features", "ncm_logits", "ncm_predict", "BCE_CLASSES",
           "bce_active", "exemplar_means", "require_images"]

_NEG = -1e9
_BIG = np.iinfo(np.int32).max
# The classes iCaRL's (and LwF.MC's) BCE averages over: those seen so far
# (Mammoth's), or every output (the authors' code).
BCE_CLASSES = ("seen", "all")


class ICaRLState(NamedTuple):
  memory: buffers.Memory  # K exemplars
  rank: jax.Array         # int32 (K,): herding position within its class
  means: jax.Array        # float32 (C, D): normalised exemplar means μ_y
  has_mean: jax.Array     # bool (C,): μ_y is defined (class has exemplars)
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): classes of the current experience
  teacher: Any            # params of the model after the last experience
  teacher_model_state: Any
  key: jax.Array          # PRNG key (exemplar sampling)


def normalise(f: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  f = f.reshape(f.shape[0], -1).astype(jnp.float32)
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def backbone_features(ctx) -> Callable[..., jax.Array]:
  """``(params, model_state, x, task) ->`` the model's backbone features,
  normalised: iCaRL's ``φ``, and the feature space the other exemplar
  methods herd in."""
  return lambda p, ms, x, t: normalise(ctx.apply(p, ms, x, t,
                                                 features=True)[0])


def herding(feats: jax.Array, member: jax.Array, m: jax.Array) -> jax.Array:
  """iCaRL's herding (Algorithm 4) over the rows with ``member``.

  Args:
    feats: ``(N, D)`` normalised features.
    member: bool ``(N,)``: the rows of the class.
    m: exemplars wanted (may be traced; at most the number of members are
      chosen).

  Returns:
    int32 ``(N,)``: each chosen row's position ``0..m-1`` in herding order,
    ``int32 max`` for rows not chosen. Ties pick the lowest row index.
  """
  n_rows = feats.shape[0]
  w = member.astype(jnp.float32)
  count = jnp.sum(w)
  mu = (w @ feats) / jnp.maximum(count, 1.0)
  steps = jnp.minimum(m, count.astype(jnp.int32))

  def body(k, carry):
    total, rank = carry
    cand = (total[None, :] + feats) / (k + 1).astype(jnp.float32)
    dist = jnp.sum(jnp.square(mu[None, :] - cand), axis=-1)
    dist = jnp.where(member & (rank == _BIG), dist, jnp.inf)
    i = jnp.argmin(dist)
    return total + feats[i], rank.at[i].set(k)

  init = (jnp.zeros_like(mu), jnp.full((n_rows,), _BIG, jnp.int32))
  _, rank = jax.lax.fori_loop(0, steps, body, init)
  return rank


def exemplars_per_class(mem_size: int, per_class: int,
                        seen: jax.Array) -> jax.Array:
  """``m``, the exemplars each seen class keeps: ``per_class`` (a memory
  that grows with the classes: LUCIR's and PODNet's 20 per class, FACIL's
  ``--num-exemplars-per-class``), or ``mem_size // |seen|`` (a fixed
  total shared by the classes seen, iCaRL's ``K``) when it is 0."""
  if per_class:
    return jnp.int32(per_class)
  return mem_size // jnp.maximum(jnp.sum(seen), 1)


def check_per_class(name: str, mem_size: int, per_class: int) -> None:
  """``per_class`` a whole number >= 0 that ``mem_size`` slots can hold
  for at least one class (the classes' count is checked at ``init`` by
  :func:`check_memory_fits`)."""
  checks.whole(f"{name}: per_class", per_class, 0,
               "0: mem_size shared by the classes seen")
  if per_class > mem_size:
    raise ValueError(f"{name}: per_class={per_class} is more than "
                     f"mem_size={mem_size} slots")


def require_per_class(name: str, mem_size: int, num_classes: int,
                      unit: str = "exemplars") -> None:
  """Raises unless a memory of ``mem_size`` holds one entry per class."""
  if mem_size < num_classes:
    raise ValueError(f"{name}: mem_size={mem_size} gives 0 {unit} per "
                     f"class for {num_classes} classes; use mem_size >= "
                     f"{num_classes}")


def check_memory_fits(name: str, mem_size: int, per_class: int,
                      num_classes: int) -> None:
  """At ``init``: the memory has at least one exemplar per class, and room
  for ``per_class`` of every class when it grows."""
  if per_class and per_class * num_classes > mem_size:
    raise ValueError(
        f"{name}: per_class={per_class} exemplars of {num_classes} classes "
        f"need mem_size >= {per_class * num_classes}, got {mem_size}")
  require_per_class(name, mem_size, num_classes)


def require_images(name: str, input_shape: tuple) -> None:
  """At ``init``: ``mirror_means`` mirrors images shaped ``(H, W, C)``."""
  if len(input_shape) != 3:
    raise ValueError(f"{name}: mirror_means needs images shaped (H, W, C); "
                     f"the inputs are shaped {tuple(input_shape)}")


def exemplar_means(fn: Callable[..., jax.Array], params, model_state,
                   memory: buffers.Memory, num_classes: int,
                   mirror: bool) -> tuple[jax.Array, jax.Array]:
  """``(means, has_mean)``: each class's renormalised mean ``μ_y`` of the
  normalised features ``fn(params, model_state, x, task)`` of its
  exemplars (and of their mirror images, the mean of both views' means,
  with ``mirror``), and whether the class has exemplars."""
  ef = fn(params, model_state, memory.x, memory.task)
  if mirror:
    ef = ef + fn(params, model_state, memory.x[:, :, ::-1, :], memory.task)
  onehot = (jax.nn.one_hot(memory.y, num_classes, dtype=jnp.float32)
            * memory.valid[:, None])
  counts = jnp.sum(onehot, axis=0)
  means = normalise((onehot.T @ ef) / jnp.maximum(counts, 1.0)[:, None])
  return means, counts > 0


def select_exemplars(feats: jax.Array, memory: buffers.Memory,
                     rank: jax.Array, x: jax.Array, y: jax.Array,
                     task: jax.Array, valid: jax.Array, experience: jax.Array,
                     m: jax.Array, num_classes: int
                     ) -> tuple[buffers.Memory, jax.Array]:
  """Herding selection (Algorithm 4) into a memory of fixed total size.

  Every class with a ``valid`` row gets (up to) ``m`` exemplars chosen by
  :func:`herding` over its valid rows; the memory's other classes keep
  their first ``m`` (by ``rank``, each entry's herding position).

  Args:
    feats: ``(N, D)`` normalised features of the rows ``x``.
    memory, rank: the exemplar memory and its entries' herding positions.
    x, y, task: the experience's rows; valid: bool ``(N,)``, the rows that
      may be chosen.
    experience: the experience id stored with new entries.
    m: exemplars per class (may be traced).
    num_classes: number of classes.

  Returns:
    ``(memory, rank)`` after the selection.
  """
  size = x.shape[0]
  k = memory.valid.shape[0]
  present = jnp.zeros((num_classes,), bool).at[y].max(valid)

  def per_class(cls):
    return jax.lax.cond(
        present[cls], lambda: herding(feats, valid & (y == cls), m),
        lambda: jnp.full((size,), _BIG, jnp.int32))

  rank_new = jnp.min(jax.lax.map(per_class, jnp.arange(num_classes)), axis=0)
  # Old classes shrink to their first m exemplars; classes present now
  # are re-selected from this experience's data.
  keep = memory.valid & (rank < m) & ~present[memory.y]
  score = jnp.where(valid & (rank_new < m), rank_new, _BIG)
  n_take = min(k, size)
  rows = jnp.argsort(score, stable=True)[:n_take]
  chosen = score[rows] < _BIG
  free = jnp.argsort(keep, stable=True)  # free slots first
  slots = jnp.where(chosen, free[jnp.arange(n_take)], k)
  put = lambda a, new: a.at[slots].set(new.astype(a.dtype), mode="drop")
  memory = buffers.Memory(
      x=put(memory.x, x[rows]), y=put(memory.y, y[rows]),
      task=put(memory.task, task[rows]),
      experience=put(memory.experience, jnp.full((n_take,), experience)),
      valid=keep.at[slots].set(True, mode="drop"),
      seen=memory.seen + jnp.sum(valid, dtype=jnp.int32))
  rank = jnp.where(keep, rank, _BIG)
  rank = rank.at[slots].set(rank_new[rows], mode="drop")
  return memory, rank


def icarl_loss(logits, teacher_logits, y, mask, old, active) -> jax.Array:
  """Mean (over unmasked rows) of iCaRL's per-example sigmoid BCE.

  Args:
    logits, teacher_logits: ``(B, C)``.
    y: int labels ``(B,)``; mask: ``(B,)`` row weights.
    old: bool ``(C,)``: classes whose targets are the teacher's sigmoid.
    active: bool ``(C,)``: classes in the loss (old and current).
  """
  c = logits.shape[-1]
  onehot = jax.nn.one_hot(y, c, dtype=jnp.float32)
  soft = jax.nn.sigmoid(jax.lax.stop_gradient(
      teacher_logits.astype(jnp.float32)))
  targets = jnp.where(old[None, :], soft, onehot)
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                           targets)
  per = jnp.sum(jnp.where(active[None, :], bce, 0.0), -1) / jnp.maximum(
      jnp.sum(active), 1)
  return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bce_active(bce_classes: str, seen: jax.Array, current: jax.Array
               ) -> jax.Array:
  """The ``active`` classes of :func:`icarl_loss`: ``seen | current``
  (``bce_classes='seen'``), or every class (``'all'``)."""
  if bce_classes == "all":
    return jnp.ones_like(seen)
  return seen | current


def ncm_logits(f: jax.Array, means: jax.Array, has_mean: jax.Array
               ) -> jax.Array:
  """Nearest-mean scores ``-‖f - μ_y‖²`` for the classes with a mean,
  ``-1e9`` for the others (``f`` and ``means`` normalised rows)."""
  d = (jnp.sum(f * f, -1, keepdims=True) - 2.0 * f @ means.T
       + jnp.sum(means * means, -1)[None, :])
  return jnp.where(has_mean[None, :], -d, _NEG)


def ncm_predict(ctx, f: jax.Array, means: jax.Array, has_mean: jax.Array,
                params, model_state, x, task) -> jax.Array:
  """A ``predict`` by nearest class mean over features ``f`` of ``x``
  (:func:`ncm_logits`, masked to the task's classes in task-incremental
  streams); before any class has a mean, the model's own logits (e.g. for
  the random-model row)."""
  logits = ncm_logits(f, means, has_mean)
  if ctx.mask_task_logits:
    logits = masked_logits(logits, task, ctx.info.task_classes)
  own = ctx.logits(params, model_state, x, task)
  return jnp.where(jnp.any(has_mean), logits, own)


def icarl(mem_size: int = 2000, batch_size: int = 0,
          layer: str = "backbone", mirror_means: bool = False,
          per_class: int = 0, bce_classes: str = "seen") -> Strategy:
  """iCaRL.

  Args:
    mem_size: total exemplars ``K`` (fixed, shared by all classes seen).
    batch_size: exemplars appended to each training batch (0: the training
      batch size).
    layer: feature layer ``φ`` (``'backbone'``: the model's features).
    mirror_means: class means over the exemplars and their left-right
      mirror images (the authors' CIFAR-100 code); for images whose
      mirror is the same class (not digits).
    per_class: > 0: every class keeps this many exemplars, a memory that
      grows with the classes (``mem_size`` its capacity); 0: the paper's
      fixed ``K = mem_size`` shared by the classes seen.
    bce_classes: the classes the BCE averages over: ``'seen'`` (the old
      and current ones, Mammoth's) or ``'all'`` (every output, later
      classes with target 0: the authors' code).

  Raises:
    ValueError: a non-positive ``mem_size``, negative ``batch_size`` or one
      above ``mem_size``, an empty ``layer``, a ``mirror_means`` that is
      not a bool, a negative ``per_class`` or one above ``mem_size``, a
      ``bce_classes`` other than ``'seen'`` or ``'all'``; at
      ``init``, an unknown feature layer (listing the valid ones),
      ``mem_size`` smaller than the number of classes (0 exemplars per
      class) or than ``per_class`` times it, or ``mirror_means`` for
      inputs that are not images.
  """
  buffers.check_capacity(mem_size, "icarl: mem_size")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or \
      batch_size < 0:
    raise ValueError(f"icarl: batch_size must be an int >= 0 (0: the "
                     f"training batch size), got {batch_size!r}")
  if batch_size > mem_size:
    raise ValueError(f"icarl: batch_size={batch_size} is larger than "
                     f"mem_size={mem_size}; use at most {mem_size}")
  if not isinstance(layer, str) or not layer:
    raise ValueError(f"icarl: layer must be a module path such as "
                     f"'backbone', got {layer!r}")
  checks.flag("icarl: mirror_means", mirror_means)
  check_per_class("icarl", mem_size, per_class)
  checks.one_of("icarl: bce_classes", bce_classes, BCE_CLASSES)
  splits = {}

  def feature_fn(ctx) -> Callable[..., jax.Array]:
    """``(params, model_state, x, task) -> normalised features``."""
    if layer == "backbone":
      return backbone_features(ctx)
    if ctx not in splits:
      splits[ctx] = split_model(ctx, layer)  # raises on unknown names
    sp = splits[ctx]
    return lambda p, ms, x, t: normalise(sp.lower(ctx, p, ms, x, t))

  def replay_size(ctx):
    return batch_size or ctx.info.batch_size

  def init(ctx, key, params):
    c = ctx.info.num_classes
    check_memory_fits("icarl", mem_size, per_class, c)
    if replay_size(ctx) > mem_size:
      raise ValueError(f"icarl: exemplars per batch {replay_size(ctx)} > "
                       f"mem_size={mem_size}")
    if mirror_means:
      require_images("icarl", ctx.info.input_shape)
    x0 = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
    t0 = jnp.zeros((1,), jnp.int32)
    k_ms, k_run = jax.random.split(key)
    _, variables = init_variables(ctx, k_ms)
    fn = feature_fn(ctx)
    d = jax.eval_shape(lambda p: fn(p, variables, x0, t0), params).shape[-1]
    return ICaRLState(
        memory=buffers.init(mem_size, ctx.info.input_shape),
        rank=jnp.full((mem_size,), _BIG, jnp.int32),
        means=jnp.zeros((c, d), jnp.float32),
        has_mean=jnp.zeros((c,), bool), seen=jnp.zeros((c,), bool),
        current=jnp.zeros((c,), bool),
        teacher=jax.tree.map(jnp.copy, params),
        teacher_model_state=variables, key=k_run)

  def before_experience(ctx, state, experience):
    ss = state.strategy._replace(
        current=experience_classes(ctx.info.num_classes, experience))
    return state.replace(strategy=ss)

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    return append_rows(batch, buffers.gather(sstate.memory, idx, ok))

  def task_loss(ctx, sstate, logits, batch):
    # The teacher is a constant of the step (its params live in the
    # strategy state, not in the differentiated ``params``).
    teacher = ctx.logits(sstate.teacher, sstate.teacher_model_state,
                         batch["x"], batch["task"])
    return icarl_loss(logits, teacher, batch["y"], batch["mask"],
                      sstate.seen, bce_active(bce_classes, sstate.seen,
                                              sstate.current))

  @functools.partial(jax.jit, static_argnums=0)
  def update_memory(ctx, ss, params, model_state, x, y, task, n_valid,
                    experience):
    fn = feature_fn(ctx)
    c = ctx.info.num_classes
    valid = jnp.arange(x.shape[0]) < n_valid
    feats = features(fn, params, model_state, x, task)
    present = jnp.zeros((c,), bool).at[y].max(valid)
    seen = ss.seen | present
    m = exemplars_per_class(mem_size, per_class, seen)
    mem, rank = select_exemplars(feats, ss.memory, ss.rank, x, y, task,
                                 valid, experience, m, c)
    # Class means of the exemplars under the current model.
    means, has_mean = exemplar_means(fn, params, model_state, mem, c,
                                     mirror_means)
    return ss._replace(memory=mem, rank=rank, means=means,
                       has_mean=has_mean, seen=seen,
                       teacher=params, teacher_model_state=model_state)

  after_experience = exemplar_hook(update_memory)

  def predict(ctx, sstate, params, model_state, x, task):
    f = feature_fn(ctx)(params, model_state, x, task)
    return ncm_predict(ctx, f, sstate.means, sstate.has_mean, params,
                       model_state, x, task)

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, task_loss=task_loss,
                  after_experience=after_experience, predict=predict,
                  name="icarl")


def exemplar_hook(update_memory: Callable[..., Any],
                  train: Callable[..., Any] | None = None
                  ) -> Callable[..., Any]:
  """An ``after_experience`` that runs ``update_memory(ctx, sstate,
  params, model_state, x, y, task, n_valid, experience)`` (a jitted
  exemplar selection) on the experience's padded training rows.

  ``train(ctx, state, experience, x, y, task, n_valid) -> state``, if
  given, runs first on the same rows (EEIL's balanced fine-tuning), so
  they are padded once.
  """

  def after_experience(ctx, state, experience):
    data = device_experience(experience, ctx.info.train_size)
    n_valid = jnp.asarray(experience.num_train, jnp.int32)
    if train is not None:
      state = train(ctx, state, experience, data["x"], data["y"],
                    data["task"], n_valid)
    ss = update_memory(ctx, state.strategy, state.params, state.model_state,
                       data["x"], data["y"], data["task"], n_valid,
                       jnp.asarray(experience.index, jnp.int32))
    return state.replace(strategy=ss)

  return after_experience


def features(fn, params, model_state, x, task, chunk: int = 500,
             valid: jax.Array | None = None):
  """``fn`` over ``x`` in fixed chunks (``lax.map``; padded, then cut).

  ``valid`` (bool ``(n,)``): the real rows; ``fn`` then takes each
  chunk's mask as a fifth argument (padding False), for a training-mode
  pass whose batch statistics must count the real rows only.
  """
  n = x.shape[0]
  nb = math.ceil(n / chunk)
  pad = nb * chunk - n
  xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  tp = jnp.concatenate([task, jnp.zeros((pad,), task.dtype)])
  chunks = (xp.reshape((nb, chunk) + x.shape[1:]), tp.reshape(nb, chunk))
  if valid is None:
    f = jax.lax.map(lambda a: fn(params, model_state, a[0], a[1]), chunks)
  else:
    vp = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
    f = jax.lax.map(lambda a: fn(params, model_state, *a),
                    chunks + (vp.reshape(nb, chunk),))
  return f.reshape(nb * chunk, -1)[:n]
