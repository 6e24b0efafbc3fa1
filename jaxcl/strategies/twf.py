"""TwF: Transfer without Forgetting (Boschini et al. 2022; Mammoth's twf).

A network pretrained on a source data set starts the stream; a frozen
copy of it (the *teacher*) keeps what it knew. TwF is DER++
(:mod:`jaxcl.strategies.derpp`) plus a distillation of the teacher's
feature maps into the student's, layer by layer, through a binary
attention mask that a small task-conditioned module (the *adapter*)
computes from the teacher's map. With :math:`F^t_l, F^s_l` the teacher's
and the student's pre-activation maps at stage :math:`l` (the stem's and
each stage's last block's), :math:`\\rho_l \\in \\{0, 1\\}^{H \\times W
\\times C}` the adapter's mask and :math:`L` the number of stages, each
step minimises

.. math::
   \\mathcal{L} = \\mathrm{CE}_{\\rm cur}(B)
     + \\alpha\\, \\mathbb{E}_{M} \\lVert z' - h_\\theta(x') \\rVert^2
     + \\beta\\, \\mathbb{E}_{M}\\, \\mathrm{CE}_{\\rm seen}(y', h_\\theta(x'))
     + \\lambda_{fp} \\frac{1}{L} \\sum_l \\Big[
       \\frac{1}{N} \\sum_n \\sum_c \\frac{1}{HW} \\sum_{hw}
       \\rho_l \\, m \\, (\\hat F^s_l - \\hat F^t_l)^2
       + \\lambda_{r} \\mathrm{BCE}(\\rho_l^{\\rm logit}, \\rho_l^{M})
       + \\lambda_{d} \\mathcal{L}_{\\rm div}(\\rho_l) \\Big],

over the incoming batch :math:`B` and one memory draw :math:`M` (each
row with its logits :math:`z'`). :math:`\\mathrm{CE}_{\\rm cur}` is the
cross-entropy over the current experience's classes (Mammoth's
``stream_logits[:, n_past:n_seen]``), :math:`\\mathrm{CE}_{\\rm seen}`
over the classes seen so far. The distance is Heo et al.'s (2019,
*overhaul of feature distillation*) as the authors use it: the teacher's
map is raised to a per-channel margin (the mean of its negative values),
both maps are divided by their spatial L2 norm (:math:`\\hat F`), and
:math:`m = 1 - [\\hat F^s \\le \\hat F^t \\le 0]` skips where the student
is already below a non-positive target; the sum runs over the ``N``
rows of the incoming batch and the memory draw together.

The adapter (Mammoth's ``MultiTaskAFDAlternative``, ``attn_mode='chsp'``)
adds a channel attention (``tanh(BN(W_1 p)) * sigmoid(BN(W_2 p)) + W_r
p`` on the spatially pooled map :math:`p`) to a spatial one (three
convolutions, the last two dilated, to one channel), mixes the sum per
task into two logits per position and channel, and draws the binary mask
with a hard Gumbel-softmax (temperature 2/3, straight-through) in
training, the argmax in evaluation. Its linear maps and batch-norm scales
are per task (the row's experience). The memory keeps, for each row of
a past experience, the mask the adapter gave it when that experience
ended (evaluation mode); those rows' masks are trained towards it by the
binary cross-entropy (weight :math:`\\lambda_r`, ``lambda_fp_replay``;
with 0 the stored mask replaces the adapter's for those rows instead).
:math:`\\mathcal{L}_{\\rm div}` keeps the masks of the other rows apart:
with :math:`P` their spatially pooled masks,
:math:`\\mathrm{mean}_n \\log \\sum_{n'} e^{P_n \\cdot P_{n'} / 2} -
1/2 - \\log N'` over those :math:`N'` rows.

Mechanics and differences from the authors' code:

* The teacher is the model ``init`` receives: the pretrained parameters
  (``model.pretrained``; without them TwF distils the random
  initialisation, as Mammoth does with a warning when no checkpoint is
  given). It runs in training mode on batch statistics, as Mammoth's
  teacher does (it is never put in evaluation mode there); jaxcl's
  pretrained files keep parameters only, so running statistics would be
  the initial ones anyway. Mammoth also gives the student a fresh
  classifier; here the head is whatever the model starts with.
* The student's loss pass covers the incoming rows and the memory draw
  together (as Mammoth's ``observe`` does) and keeps the task loss's own
  pass for the current-class cross-entropy; the model's gradient flows
  through ``loss`` like DER's.
* The adapters live in the strategy state and are trained in
  ``update_grads`` with the run's own optimiser (``ctx.tx``; the authors
  train them with the network's optimiser), on the same loss with the
  student's maps held fixed; the Gumbel noise is drawn once per step in
  ``prepare_batch``, so the mask the model's gradient saw is the one the
  adapters' gradient sees.
* The masks Mammoth stores with every incoming row are overwritten at the
  experience's end before any is read (only rows of finished experiences
  are forced), so only the end-of-experience masks are computed here.
* Models: the ResNets (``resnet18``, ``resnet32``), which sow their
  pre-activation stage maps (:data:`jaxcl.models.resnet.PREACT`), as
  Mammoth asserts a ResNet.

References:
  Boschini, Bonicelli, Porrello, Bellitto, Pennisi, Palazzo, Spampinato
  & Calderara, `Transfer without forgetting
  <https://arxiv.org/abs/2206.00388>`_, ECCV 2022 (Mammoth's ``twf.py``
  and ``twf_utils/afd.py``); Heo et al., `A comprehensive overhaul of
  feature distillation <https://arxiv.org/abs/1904.01866>`_, ICCV 2019.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import buffers, checks
from jaxcl.models.batch_norm import BatchNorm
from jaxcl.models.resnet import PREACT
from jaxcl.state import (batch_stats_mask, cross_entropy,
                         cross_entropy_over, masked_logits)
from jaxcl.strategies._replay_memory import init_memory, replay_sizer
from jaxcl.strategies.der import logit_mse, logit_width, store_step
from jaxcl.strategies.icarl import features
from jaxcl.strategies.replay import incoming_rows
from jaxcl.strategy import (Strategy, experience_classes,
                            mark_experience_start)

__all__ = ["twf", "TwFState", "Adapters", "stage_maps", "afd_layer_loss",
           "diverse_loss"]

_NAME = "twf"
_TAU = 2.0 / 3.0   # the authors' Gumbel-softmax temperature
_EPS = 1e-6        # their Normalize's and margin's epsilon


class TwFState(NamedTuple):
  memory: buffers.Memory  # reservoir over the stream
  logits: jax.Array       # (mem_size, outputs): logits when stored
  maps: tuple             # per stage, bool (mem_size, H, W, C): the masks
                          # at the end of the row's experience
  teacher: Any            # the frozen teacher's parameters
  teacher_state: Any      # its model state (structure; batch statistics)
  adapters: Any           # the adapters' parameters
  adapter_state: Any      # their running batch-norm statistics
  adapter_opt: Any        # the run's optimiser's state for the adapters
  seen: jax.Array         # bool (C,): classes so far (current included)
  current: jax.Array      # bool (C,): the current experience's classes
  model_state: Any        # model state as the experience started
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def _kaiming_fan_out(gain: float):
  """PyTorch's ``kaiming_normal_(mode='fan_out')`` of a ``(tasks, fout,
  fin)`` weight: N(0, gain^2 / fout), the authors' ``get_rnd_weight``."""

  def init(key, shape, dtype=jnp.float32):
    return gain / math.sqrt(shape[1]) * jax.random.normal(key, shape, dtype)

  return init


class _CondLinear(nn.Module):
  """``W[t] x`` with one bias-free ``(fout, fin)`` weight per task."""
  features: int
  n_tasks: int
  gain: float

  @nn.compact
  def __call__(self, x: jax.Array, task: jax.Array) -> jax.Array:
    w = self.param("weight", _kaiming_fan_out(self.gain),
                   (self.n_tasks, self.features, x.shape[-1]))
    return jnp.einsum("boi,bi->bo", w[task], x)


class _CondBatchNorm(nn.Module):
  """Batch norm without its own affine map, then a per-task scale and
  bias (the authors' ``ConditionalBatchNorm``); PyTorch's momentum 0.1."""
  n_tasks: int

  @nn.compact
  def __call__(self, x: jax.Array, task: jax.Array, train: bool,
               mask: jax.Array | None) -> jax.Array:
    c = x.shape[-1]
    m = None if mask is None else mask.reshape(
        mask.shape + (1,) * (x.ndim - 1))
    y = BatchNorm(use_running_average=not train, momentum=0.9,
                  use_affine=False)(x, mask=m)
    gamma = self.param("scale", nn.initializers.ones, (self.n_tasks, c))
    beta = self.param("bias", nn.initializers.zeros, (self.n_tasks, c))
    shape = (-1,) + (1,) * (x.ndim - 2) + (c,)
    return y * gamma[task].reshape(shape) + beta[task].reshape(shape)


class _Adapter(nn.Module):
  """One stage's attention (the authors' ``DoubleAttn``): the binary mask
  ``rho`` (B, H, W, C) and the logit of its "keep" choice."""
  n_tasks: int
  reduction: int = 4

  @nn.compact
  def __call__(self, fm_t: jax.Array, task: jax.Array, train: bool,
               gumbel: jax.Array | None, mask: jax.Array | None
               ) -> tuple[jax.Array, jax.Array]:
    b, h, w, c = fm_t.shape
    bn = lambda v: _CondBatchNorm(self.n_tasks)(v, task, train, mask)
    # Channel attention on the pooled map.
    p = jnp.mean(fm_t, axis=(1, 2))
    lin = lambda gain: _CondLinear(c, self.n_tasks, gain)(p, task)
    rho_a = jnp.tanh(bn(lin(5.0 / 3.0)))
    rho_b = jax.nn.sigmoid(bn(lin(1.0)))
    channel = rho_a * rho_b + _CondLinear(c, self.n_tasks,
                                          math.sqrt(2.0))(p, task)
    # Spatial attention: 1x1, two dilated 3x3, 1x1 to one channel.
    mid = max(c // self.reduction, 1)
    s = nn.relu(bn(nn.Conv(mid, (1, 1))(fm_t)))
    for _ in range(2):
      s = nn.relu(bn(nn.Conv(mid, (3, 3), padding=2,
                             kernel_dilation=2)(s)))
    s = bn(nn.Conv(1, (1, 1))(s))
    x = channel[:, None, None, :] + s
    # nn.Embedding's N(0, 1) (the authors' init_parameters is never called).
    mix = self.param("mix", nn.initializers.normal(1.0),
                     (self.n_tasks, 2 * c, c))
    logits = jnp.einsum("bji,bhwi->bhwj", mix[task], x).reshape(
        b, h, w, c, 2)
    if train:  # hard Gumbel-softmax, straight-through
      soft = jax.nn.softmax((logits + gumbel) / _TAU, axis=-1)
      hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
      rho = (hard - jax.lax.stop_gradient(soft) + soft)[..., 0]
    else:
      rho = (logits[..., 0] >= logits[..., 1]).astype(logits.dtype)
    return rho, logits[..., 0]


class Adapters(nn.Module):
  """One :class:`_Adapter` per distilled stage."""
  n_stages: int
  n_tasks: int

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], task: jax.Array,
               train: bool, gumbels: Sequence[jax.Array] | None = None,
               mask: jax.Array | None = None):
    gumbels = gumbels or [None] * len(maps)
    out = [_Adapter(self.n_tasks)(m, task, train, g, mask)
           for m, g in zip(maps, gumbels)]
    return [o[0] for o in out], [o[1] for o in out]


def stage_maps(ctx, params, model_state, x: jax.Array, task: jax.Array,
               train: bool, mask: jax.Array | None = None
               ) -> tuple[jax.Array, list[jax.Array]]:
  """``(logits, maps)``: the model's raw outputs and its sown
  pre-activation stage maps (stem first, then the stages in order)."""
  variables = {"params": params, **model_state}
  mutable = [PREACT] + (list(model_state) if train else [])
  extra = batch_stats_mask(ctx.model, model_state, mask) if train else {}
  out, cols = ctx.model_apply(variables, x, task, train=train,
                              mutable=mutable, **extra)
  return out, _ordered_maps(cols.get(PREACT, {}))


def _ordered_maps(tree: Any) -> list[jax.Array]:
  """The sown maps in call order: each module's name ends in its creation
  index (``BasicBlock_3``), the stem's entry is ``stem``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]

  def order(item):
    names = [str(getattr(k, "key", k)) for k in item[0]]
    mods = [n for n in names if "_" in n and n.rsplit("_", 1)[1].isdigit()]
    return (len(mods), int(mods[-1].rsplit("_", 1)[1]) if mods else -1)

  return [leaf for _, leaf in sorted(flat, key=order)]


def _spatial_normalize(a: jax.Array) -> jax.Array:
  """``a`` over its spatial L2 norm, per row and channel (the authors'
  ``Normalize``)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(a), axis=(1, 2), keepdims=True))
  return a / (norm + _EPS)


def diverse_loss(rho: jax.Array, rows: jax.Array) -> jax.Array:
  """The authors' ``DiverseLoss`` (temperature 2) over the rows ``rows``
  (float ``(B,)``): their pooled masks' mean log-sum-exp of dot products,
  less ``1/2 + log N``; 0 without rows."""
  p = jnp.mean(rho, axis=(1, 2))
  dots = p @ p.T / 2.0
  dots = jnp.where(rows[None, :] > 0, dots, -jnp.inf)
  lse = jax.nn.logsumexp(dots, axis=1)
  n = jnp.sum(rows)
  mean = jnp.sum(jnp.where(rows > 0, lse, 0.0)) / jnp.maximum(n, 1.0)
  return jnp.where(n > 0, mean - 0.5 - jnp.log(jnp.maximum(n, 1.0)), 0.0)


def afd_layer_loss(fm_s: jax.Array, fm_t: jax.Array, rho: jax.Array,
                   logit0: jax.Array, ok: jax.Array, forced: jax.Array,
                   stored: jax.Array, lambda_replay: float,
                   lambda_diverse: float) -> jax.Array:
  """One stage's term of the bracket in the module docstring.

  ``fm_s``, ``fm_t``, ``rho``, ``logit0``, ``stored``: ``(B, H, W, C)``;
  ``ok`` (float ``(B,)``): the real rows; ``forced`` (bool ``(B,)``): rows
  of finished experiences, whose stored mask ``stored`` is the target
  (``lambda_replay > 0``) or replaces ``rho`` (``lambda_replay == 0``).
  """
  fm_t = jax.lax.stop_gradient(fm_t)
  forced_ok = ok * forced
  loss = 0.0
  if lambda_replay > 0:
    bce = jax.nn.softplus(logit0) - logit0 * stored  # BCE with logits
    n = jnp.sum(forced_ok) * math.prod(bce.shape[1:])
    loss = lambda_replay * jnp.sum(forced_ok[:, None, None, None] * bce) \
        / jnp.maximum(n, 1.0)
  else:
    rho = jnp.where(forced[:, None, None, None], stored, rho)
  # Overhaul: the teacher's map raised to the per-channel mean of its
  # negative values over the batch (real rows only).
  neg = (fm_t < 0) * ok[:, None, None, None]
  margin = jnp.sum(fm_t * neg, axis=(0, 1, 2)) / (
      jnp.sum(neg, axis=(0, 1, 2)) + _EPS)
  t = _spatial_normalize(jnp.maximum(fm_t, margin))
  s = _spatial_normalize(fm_s)
  dist = jnp.square(s - t) * (1.0 - ((s <= t) & (t <= 0)))
  per_row = jnp.sum(jnp.mean(rho * dist, axis=(1, 2)), axis=-1)
  loss = loss + jnp.sum(ok * per_row) / jnp.maximum(jnp.sum(ok), 1.0)
  if lambda_diverse:
    loss = loss + lambda_diverse * diverse_loss(rho, ok * (1.0 - forced))
  return loss


def twf(mem_size: int = 500, alpha: float = 0.3, beta: float = 1.2,
        lambda_fp: float = 0.03, lambda_fp_replay: float = 1.5,
        lambda_diverse: float = 0.3, batch_size: int = 0) -> Strategy:
  """Transfer without Forgetting.

  Args:
    mem_size: memory capacity (each row with its logits and masks).
    alpha: weight of the logit-matching (squared error) term.
    beta: weight of the memory's cross-entropy.
    lambda_fp: weight of the feature-propagation (distillation) term.
    lambda_fp_replay: weight of the stored masks' binary cross-entropy
      (0: the stored masks replace the adapter's for those rows).
    lambda_diverse: weight of the masks' diversity term.
    batch_size: memory rows replayed per step; 0 means the training
      batch size.

  The defaults are Mammoth's ``twf.yaml`` for Split CIFAR-10 with memory
  500 (its lr there is 0.1).

  Raises:
    ValueError: a non-positive ``mem_size``, a negative or non-finite
      weight, a ``batch_size`` larger than ``mem_size``; at ``init``, a
      model that sows no stage map (TwF distils a ResNet's).
  """
  replay_size = replay_sizer(_NAME, mem_size, batch_size)
  for what, value in (("alpha", alpha), ("beta", beta),
                      ("lambda_fp", lambda_fp),
                      ("lambda_fp_replay", lambda_fp_replay),
                      ("lambda_diverse", lambda_diverse)):
    checks.nonnegative(f"{_NAME}: {what}", value)
  adapters_of = lambda ctx, n: Adapters(n, ctx.info.num_experiences)

  def init(ctx, key, params):
    memory, model_state, k_mem = init_memory(ctx, key, mem_size, replay_size)
    x = jnp.zeros((2,) + tuple(ctx.info.input_shape), jnp.float32)
    t = jnp.zeros((2,), jnp.int32)
    shapes = jax.eval_shape(
        lambda p: stage_maps(ctx, p, model_state, x, t, train=False)[1],
        params)
    if not shapes:
      raise ValueError(
          f"{_NAME} distils the stage feature maps of a ResNet "
          f"(model.name resnet18 or resnet32, which sow them); model "
          f"{type(ctx.model).__name__} with backbone "
          f"{type(getattr(ctx.model, 'backbone', ctx.model)).__name__} "
          "sows none")
    k_ad, k_mem = jax.random.split(k_mem)
    adapters = adapters_of(ctx, len(shapes))
    maps0 = [jnp.zeros(s.shape, jnp.float32) for s in shapes]
    variables = adapters.init(k_ad, maps0, t, train=False)
    ad_params = variables["params"]
    width = logit_width(ctx, params, model_state)
    c = ctx.info.num_classes
    return TwFState(
        memory=memory, logits=jnp.zeros((mem_size, width), jnp.float32),
        maps=tuple(jnp.zeros((mem_size,) + s.shape[1:], bool)
                   for s in shapes),
        teacher=jax.tree.map(jnp.copy, params), teacher_state=model_state,
        adapters=ad_params,
        adapter_state={"batch_stats": variables["batch_stats"]},
        adapter_opt=ctx.tx.init(ad_params),
        seen=jnp.zeros((c,), bool), current=jnp.zeros((c,), bool),
        model_state=model_state, experience=jnp.zeros((), jnp.int32),
        key=k_mem)

  def before_experience(ctx, state, experience):
    state = mark_experience_start(ctx, state, experience)
    ss = state.strategy
    cur = experience_classes(ctx.info.num_classes, experience)
    return state.replace(strategy=ss._replace(current=cur,
                                              seen=ss.seen | cur))

  def prepare_batch(ctx, sstate, batch, key):
    r = replay_size(ctx)
    k_draw, k_noise = jax.random.split(key)
    mem = sstate.memory
    idx, ok = buffers.sample(mem, k_draw, r)
    out = dict(batch)
    out.update({f"{_NAME}_x": mem.x[idx], f"{_NAME}_y": mem.y[idx],
                f"{_NAME}_task": mem.task[idx],
                f"{_NAME}_exp": mem.experience[idx],
                f"{_NAME}_z": sstate.logits[idx],
                f"{_NAME}_ok": ok.astype(jnp.float32)})
    for i, m in enumerate(sstate.maps):
      out[f"{_NAME}_map{i}"] = m[idx]
    # One Gumbel draw per stage for the step's rows (incoming, then the
    # memory's): the model's gradient and the adapters' see the same mask.
    n = ctx.info.batch_size + r
    for i, m in enumerate(sstate.maps):
      out[f"{_NAME}_gumbel{i}"] = jax.random.gumbel(
          jax.random.fold_in(k_noise, i), (n,) + m.shape[1:] + (2,))
    return out

  def rows_of(ctx, sstate, batch):
    """The step's rows for TwF: incoming then the memory draw."""
    own = incoming_rows(ctx, batch)
    x = jnp.concatenate([own["x"], batch[f"{_NAME}_x"]])
    task = jnp.concatenate([own["task"], batch[f"{_NAME}_task"]])
    ok = jnp.concatenate([own["mask"], batch[f"{_NAME}_ok"]])
    ok = (ok > 0).astype(jnp.float32)
    b = own["x"].shape[0]
    mem_exp = batch[f"{_NAME}_exp"]
    exps = jnp.concatenate([jnp.full((b,), sstate.experience, jnp.int32),
                            jnp.minimum(mem_exp, sstate.experience)])
    forced = jnp.concatenate([jnp.zeros((b,), bool),
                              mem_exp < sstate.experience]) & (ok > 0)
    stored = [jnp.concatenate([jnp.zeros((b,) + m.shape[1:], m.dtype),
                               m]).astype(jnp.float32)
              for m in _stage_entries(batch, "map")]
    return x, task, ok, exps, forced, stored, b

  def teacher_maps(ctx, sstate, x, task, ok):
    _, maps = stage_maps(ctx, sstate.teacher, sstate.teacher_state, x, task,
                         train=True, mask=ok)
    return [jax.lax.stop_gradient(m) for m in maps]

  def afd(ctx, ad_params, ad_state, fm_s, fm_t, exps, ok, forced, stored,
          gumbels):
    """The distillation term (averaged over stages) and the adapters'
    new running statistics."""
    (rho, logit0), new_state = adapters_of(ctx, len(fm_t)).apply(
        {"params": ad_params, **ad_state}, fm_t, exps, True, gumbels, ok,
        mutable=["batch_stats"])
    terms = [afd_layer_loss(s, t, r, l0, ok, forced, st, lambda_fp_replay,
                            lambda_diverse)
             for s, t, r, l0, st in zip(fm_s, fm_t, rho, logit0, stored)]
    return sum(terms) / len(terms), new_state

  def loss(ctx, sstate, params, batch, logits):
    del logits
    x, task, ok, exps, forced, stored, b = rows_of(ctx, sstate, batch)
    out, fm_s = stage_maps(ctx, params, sstate.model_state, x, task,
                           train=True, mask=ok)
    fm_t = teacher_maps(ctx, sstate, x, task, ok)
    ad = jax.lax.stop_gradient(sstate.adapters)
    term, _ = afd(ctx, ad, sstate.adapter_state, fm_s, fm_t, exps, ok,
                  forced, stored, _stage_entries(batch, "gumbel"))
    mem = out[b:].astype(jnp.float32)
    if ctx.mask_task_logits:
      mem = masked_logits(mem, task[b:], ctx.info.task_classes)
    mem_ok = batch[f"{_NAME}_ok"]
    total = lambda_fp * term
    if alpha:
      total = total + alpha * logit_mse(mem, batch[f"{_NAME}_z"], mem_ok)
    if beta:
      total = total + beta * cross_entropy_over(
          mem, batch[f"{_NAME}_y"], mem_ok, sstate.seen)
    return total

  def task_loss(ctx, sstate, logits, batch):
    """The cross-entropy over the current experience's classes for the
    incoming rows (rows a chained member appends keep every class)."""
    own = jnp.arange(logits.shape[0]) < ctx.info.batch_size
    keep = jnp.where(own[:, None], sstate.current[None, :], True)
    return cross_entropy(jnp.where(keep, logits, -1e9), batch["y"],
                         batch["mask"])

  def update_grads(ctx, sstate, grads, params, batch, key):
    del key
    x, task, ok, exps, forced, stored, _ = rows_of(ctx, sstate, batch)
    _, fm_s = stage_maps(ctx, jax.lax.stop_gradient(params),
                         sstate.model_state, x, task, train=True, mask=ok)
    fm_s = [jax.lax.stop_gradient(m) for m in fm_s]
    fm_t = teacher_maps(ctx, sstate, x, task, ok)

    def adapter_loss(ad):
      term, new_state = afd(ctx, ad, sstate.adapter_state, fm_s, fm_t, exps,
                            ok, forced, stored,
                            _stage_entries(batch, "gumbel"))
      return lambda_fp * term, new_state

    g, new_state = jax.grad(adapter_loss, has_aux=True)(sstate.adapters)
    upd, opt = ctx.tx.update(g, sstate.adapter_opt, sstate.adapters)
    ad = jax.tree.map(jnp.add, sstate.adapters, upd)
    return grads, sstate._replace(adapters=ad, adapter_opt=opt,
                                  adapter_state=dict(new_state))

  def after_experience(ctx, state, experience):
    del experience
    ss = state.strategy
    return state.replace(strategy=ss._replace(
        maps=_end_masks(ctx, ss)))

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, loss=loss,
                  task_loss=task_loss, update_grads=update_grads,
                  grads_state=True, after_step=store_step,
                  after_experience=after_experience, name=_NAME)


def _stage_entries(batch: dict, kind: str) -> list[jax.Array]:
  """The batch's per-stage entries ``twf_{kind}0, twf_{kind}1, ...``."""
  out, i = [], 0
  while f"{_NAME}_{kind}{i}" in batch:
    out.append(batch[f"{_NAME}_{kind}{i}"])
    i += 1
  return out


@functools.partial(jax.jit, static_argnums=0)
def _end_masks(ctx, sstate: TwFState) -> tuple:
  """The memory's masks with the rows of the experience just ended given
  the adapters' evaluation-mode masks of their teacher maps (the others
  kept); the teacher's batch statistics count those rows, in batches of
  the training batch size, as the authors' ``end_task`` loop does."""
  mem = sstate.memory
  adapters = Adapters(len(sstate.maps), ctx.info.num_experiences)
  fresh = mem.valid & (mem.experience == sstate.experience)

  def masks(teacher, teacher_state, x, task, ok):
    """The chunk's masks, every stage's flattened into one row."""
    _, fm_t = stage_maps(ctx, teacher, teacher_state, x, task, train=True,
                         mask=ok.astype(jnp.float32))
    exps = jnp.full(task.shape, sstate.experience, jnp.int32)
    rho, _ = adapters.apply({"params": sstate.adapters,
                             **sstate.adapter_state}, fm_t, exps, False)
    return jnp.concatenate([r.reshape(r.shape[0], -1) > 0.5 for r in rho],
                           axis=1)

  k = mem.x.shape[0]
  flat = features(masks, sstate.teacher, sstate.teacher_state, mem.x,
                  mem.task, chunk=min(ctx.info.batch_size, k), valid=fresh)
  sizes = np.cumsum([math.prod(m.shape[1:]) for m in sstate.maps])[:-1]
  return tuple(
      jnp.where(fresh.reshape((k,) + (1,) * (old.ndim - 1)),
                new.reshape(old.shape), old)
      for new, old in zip(jnp.split(flat, sizes, axis=1), sstate.maps))
