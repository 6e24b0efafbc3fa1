"""SCR: supervised contrastive replay with a nearest-class-mean classifier.

Mai, Li, Kim & Sanner (2021) trace much of online class-incremental
forgetting to the softmax classifier's bias toward the newest classes, and
drop it: the model is trained only to embed, and predicts with the
nearest class mean (NCM) of its memory. Each step draws ``batch_size``
examples ``M_B`` from a reservoir memory, joins them to the incoming batch
``B``, and makes a second view of every example by a random augmentation
``aug``; the backbone features ``h`` go through a projection head ``g``
(an MLP ``d -> d -> 128`` by default) to normalised embeddings ``z =
g(h) / ‖g(h)‖``, and the only loss is the supervised contrastive loss
(Khosla et al. 2020, eq. 2, ``L^{sup}_{out}``) over the ``2N`` views
``I`` (``N = |B ∪ M_B|``), averaged over the anchors:

.. math::
   \\mathcal{L} = \\frac{1}{|I|}\\sum_{i \\in I} \\frac{-1}{|P(i)|}
     \\sum_{p \\in P(i)} \\log
     \\frac{\\exp(z_i \\cdot z_p / \\tau)}
           {\\sum_{a \\in A(i)} \\exp(z_i \\cdot z_a / \\tau)},
   \\qquad A(i) = I \\setminus \\{i\\},\\quad
   P(i) = \\{p \\in A(i) : y_p = y_i\\},

with temperature ``τ`` (0.07). When an experience ends, each class ``y``
in memory gets the mean of its exemplars' L2-normalised backbone features
(not the projections), renormalised, and a test input is classified by the
nearest one:

.. math::
   y^* = \\arg\\min_y \\lVert \\varphi(x) - \\mu_y \\rVert, \\qquad
   \\mu_y = \\frac{\\bar\\varphi_y}{\\lVert \\bar\\varphi_y \\rVert},
   \\quad \\bar\\varphi_y = \\frac{1}{|M_y|}\\sum_{m \\in M_y}\\varphi(m),
   \\quad \\varphi(x) = \\frac{h(x)}{\\lVert h(x) \\rVert};

``predict`` returns ``-‖φ(x) - μ_y‖²`` (``-1e9`` for classes with no
exemplar; the model's own logits before any experience has ended).

Following the authors' code (RaptorMai/online-continual-learning:
``agents/scr.py``, ``agents/base.py``, ``utils/loss.py``,
``models/resnet.py``'s ``SupConResNet``): the two views are the examples
themselves and one augmented copy (not two augmented copies); the memory
batch is drawn uniformly from the whole memory, current experience
included, and the memory is a reservoir fed with every incoming batch
after the step; no loss scaling (their ``SupConLoss`` has no ``τ/τ_b``
factor); the head's layers are initialised as PyTorch's ``nn.Linear``;
``batch_size = 100`` (Avalanche's reproduction, ``batch_size_mem=100``;
the reference's generic ``eps_mem_batch`` default is 10), and the step
uses the run's optimiser (theirs: SGD, learning rate 0.1, stream batch
10). The augmentations are
:mod:`jaxcl.augment`'s pure-JAX versions of their kornia pipeline
(resized crop with scale ``(0.2, 1)``, flip, colour jitter, grayscale),
by default as :func:`jaxcl.augment.default_ops` picks them for the input
shape: all four for RGB images, the crop alone for single-channel ones.
They run on the pixels (the reference's inputs in ``[0, 1]``): with
``dataset.normalize`` the views are un-standardised, augmented and
standardised again (:func:`jaxcl.augment.in_pixels`), so the jitter's
clipping to ``[0, 1]`` acts on pixels, not standardised values.

Deviations, on purpose: incoming rows train from the stream's first step
(the reference skips a step while its memory is empty, i.e. the stream's
first batch); an anchor without a positive is left out of the mean (the
reference divides by zero there; with two views every valid anchor has
one); NCM classes are the classes with exemplars in memory (the
reference also scores seen classes that lost all their exemplars, with a
random mean); the optional "review trick" (a pass over the memory at each
experience's end, gradients divided by 10) is not implemented: it is off
in the reference's defaults, though Avalanche's reproduction notes the
paper's numbers used it.

Mechanics. The engine differentiates only the model's parameters, so the
projection head lives in the strategy state, with its own state of the
run's optimiser (``ctx.tx``): ``loss`` returns the contrastive loss
(differentiated through the backbone), ``task_loss`` returns 0 (the model's
classifier head is never trained, and XLA drops its unused forward pass),
and ``after_step`` takes the head's gradient of the same loss at the
same (pre-update) backbone parameters and applies it with ``ctx.tx``, so
backbone and head take one joint step as the reference's single model
does. That asks for the backbone's forward pass on the ``2N`` views a
second time, at the same inputs; XLA merges the two (the compiled step
of an MLP on a CPU holds one backbone forward), so only the head's small
forward and backward run twice. The head's optimiser state takes
the model's injected hyperparameters (a sweep's per-run learning rate) and
is reset when each experience starts, as the learner resets the model's
by default. ``prepare_batch`` appends the memory rows and stores the
augmented views of every row so far under ``scr_views``; rows a chained
member appends after SCR's are not in the contrastive loss, and since the
task loss is 0 they train nothing (put a replaying member before SCR).
Chained penalties that read the model's logits (EWC's Fisher, LwF's
distillation, SI's task gradient, which is zero here) see a classifier
head that SCR never trains.

State: :class:`SCRState`, fixed shapes (memory, head, class means), so
nothing recompiles between experiences, and it checkpoints and vmaps like
any state.

References:
  Mai, Li, Kim & Sanner, `Supervised contrastive replay: revisiting the
  nearest class mean classifier in online class-incremental continual
  learning <https://arxiv.org/abs/2103.13885>`_, CVPR Workshops 2021.
  Khosla et al., `Supervised contrastive learning
  <https://arxiv.org/abs/2004.11362>`_, NeurIPS 2020.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcl import augment as augment_lib
from jaxcl import buffers, checks
from jaxcl.models import init as inits
from jaxcl.models.classifier import l2_normalise
from jaxcl.strategies._replay_memory import replay_sizer
from jaxcl.strategies.icarl import (backbone_features, features,
                                    ncm_logits, ncm_predict)
from jaxcl.strategies.replay import append_rows, reservoir_step
from jaxcl.strategy import Strategy
from jaxcl.train import init_variables

__all__ = ["scr", "SCRState", "ProjectionHead", "supcon_loss", "ncm_logits",
           "HEADS"]

HEADS = ("mlp", "linear", "none")  # the reference's --head choices
_NEG = -1e9


class SCRState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  head: Any               # projection head params ({} for head='none')
  head_opt_state: Any     # the run's optimiser state for the head
  means: jax.Array        # float32 (C, D): normalised class means μ_y
  has_mean: jax.Array     # bool (C,): class y has exemplars (μ_y defined)
  experience: jax.Array   # int32 scalar: index of the current experience
  model_state: Any        # the model state's structure (features in loss)
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


class ProjectionHead(nn.Module):
  """SupConResNet's head over backbone features, output L2-normalised:
  ``mlp``: Dense(d) -> ReLU -> Dense(dim); ``linear``: Dense(dim);
  ``none``: the features themselves. Layers initialised as PyTorch's."""
  kind: str = "mlp"
  dim: int = 128

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    h = h.reshape(h.shape[0], -1)
    if self.kind == "mlp":
      h = nn.relu(inits.dense(h.shape[-1], h.shape[-1], "torch")(h))
    if self.kind != "none":
      h = inits.dense(self.dim, h.shape[-1], "torch")(h)
    return l2_normalise(h)


def supcon_loss(z: jax.Array, y: jax.Array, ok: jax.Array,
                temperature: float) -> jax.Array:
  """Khosla et al.'s ``L^{sup}_{out}`` over normalised embeddings ``z``
  ``(M, D)`` with labels ``y``: every valid row is an anchor and contrasts
  with every other valid row (itself excluded), its positives being those
  of its label; the mean over anchors with at least one positive (0 when
  there are none). Rows with ``ok`` False take no part.

  Not :func:`jaxcl.strategies.er_aml.sup_con_loss`: that one contrasts a
  set of anchors with a separate set of drawn candidates (no self to
  exclude) and scales by ``τ / τ_b``; the reference's ``SupConLoss`` here
  has neither.
  """
  m = z.shape[0]
  sim = (z @ z.T) / temperature
  contrast = ok[None, :] & ~jnp.eye(m, dtype=bool)  # A(i)
  sim = jnp.where(contrast, sim, _NEG)
  # The shift cancels in log_prob; it keeps exp() in range.
  sim = sim - jax.lax.stop_gradient(jnp.max(sim, axis=1, keepdims=True))
  log_prob = sim - jax.scipy.special.logsumexp(sim, axis=1, keepdims=True)
  pos = (y[:, None] == y[None, :]) & contrast  # P(i)
  n_pos = jnp.sum(pos, axis=1)
  mean_pos = (jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1)
              / jnp.maximum(n_pos, 1))
  anchor = ok & (n_pos > 0)
  return (-jnp.sum(jnp.where(anchor, mean_pos, 0.0))
          / jnp.maximum(jnp.sum(anchor), 1))


def scr(mem_size: int = 200, batch_size: int = 100,
        temperature: float = 0.07, head: str = "mlp", head_dim: int = 128,
        augment: str | Sequence[str] = "auto",
        crop_scale: Sequence[float] = (0.2, 1.0)) -> Strategy:
  """Supervised contrastive replay.

  Args:
    mem_size: memory capacity in examples (a reservoir).
    batch_size: memory examples drawn per step (the reference's
      ``eps_mem_batch``; 100 as in Avalanche's reproduction); 0 means the
      training batch size.
    temperature: ``τ`` of the contrastive loss (0.07).
    head: projection head: ``'mlp'`` (d -> d -> head_dim, the reference's
      default), ``'linear'`` (d -> head_dim) or ``'none'``.
    head_dim: the projection's output size (128).
    augment: the second view's augmentations: ``'auto'`` (by input
      shape, :func:`jaxcl.augment.default_ops`: crop, flip, jitter, gray
      for RGB images; crop for single-channel ones; none otherwise),
      ``'none'``, or a sequence of names from :data:`jaxcl.augment.OPS`.
    crop_scale: the resized crop's area range (the reference's (0.2, 1)).

  Raises:
    ValueError: a non-positive ``mem_size``, ``temperature`` or
      ``head_dim``; a negative ``batch_size`` or one above ``mem_size``; an
      unknown head or augmentation, or a bad ``crop_scale``; at ``init``,
      an augmentation that does not fit the input shape.
  """
  replay_size = replay_sizer("scr", mem_size, batch_size)
  # Now rather than at init when the size is given (0: the stream's).
  buffers.replay_size("scr", batch_size, mem_size, 0)
  checks.positive("scr: temperature", temperature)
  if head not in HEADS:
    raise ValueError(f"scr: unknown head {head!r}; valid: {list(HEADS)}")
  checks.whole("scr: head_dim", head_dim, 1)
  augmenter = augment_lib.view_augmenter("scr", augment, crop_scale)
  projection = ProjectionHead(head, head_dim)

  def init(ctx, key, params):
    replay_size(ctx)
    augmenter(ctx)  # raises here on an augmentation that does not fit
    k_head, k_ms, k_run = jax.random.split(key, 3)
    _, variables = init_variables(ctx, k_ms)
    x0 = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
    t0 = jnp.zeros((1,), jnp.int32)
    f0 = jax.eval_shape(lambda p: ctx.apply(p, variables, x0, t0,
                                            features=True)[0], params)
    d = 1
    for s in f0.shape[1:]:
      d *= s
    head_params = projection.init(k_head, jnp.zeros((1, d), jnp.float32))
    head_params = head_params.get("params", {})
    c = ctx.info.num_classes
    return SCRState(buffers.init(mem_size, ctx.info.input_shape),
                    head_params, ctx.tx.init(head_params),
                    jnp.zeros((c, d), jnp.float32), jnp.zeros((c,), bool),
                    jnp.zeros((), jnp.int32), variables, k_run)

  def before_experience(ctx, state, experience):
    ss = state.strategy
    opt = ctx.tx.init(ss.head)
    # The model's injected hyperparameters (a sweep's per-run learning
    # rate): the head steps with the backbone's rate.
    if hasattr(opt, "hyperparams") and hasattr(state.opt_state,
                                               "hyperparams"):
      # Copies: the compiled loop donates the state, and XLA refuses to
      # donate one buffer twice.
      opt = opt._replace(hyperparams=jax.tree.map(
          jnp.copy, dict(state.opt_state.hyperparams)))
    ss = ss._replace(head_opt_state=opt,
                     experience=jnp.asarray(experience.index, jnp.int32))
    return state.replace(strategy=ss)

  def prepare_batch(ctx, sstate, batch, key):
    k_mem, k_aug = jax.random.split(key)
    idx, ok = buffers.sample(sstate.memory, k_mem, replay_size(ctx))
    batch = append_rows(batch, buffers.gather(sstate.memory, idx, ok))
    return dict(batch, scr_views=augmenter(ctx)(k_aug, batch["x"]))

  def views(batch):
    """The 2N views (the rows, then their augmented copies), labels,
    validity and task ids."""
    n = batch["scr_views"].shape[0]
    x = jnp.concatenate([batch["x"][:n],
                         batch["scr_views"].astype(batch["x"].dtype)])
    tile = lambda a: jnp.concatenate([a[:n], a[:n]])
    return x, tile(batch["y"]), tile(batch["mask"] > 0), tile(batch["task"])

  def embed_loss(head_params, f, y, ok):
    z = projection.apply({"params": head_params}, f)
    return supcon_loss(z, y, ok, temperature)

  def task_loss(ctx, sstate, logits, batch):
    del ctx, sstate, logits, batch
    return jnp.zeros((), jnp.float32)  # SCR trains no classifier

  def loss(ctx, sstate, params, batch, logits):
    del logits
    x, y, ok, task = views(batch)
    # Training mode, as the step's own forward pass.
    f, _ = ctx.apply(params, sstate.model_state, x, task, train=True,
                     features=True, mask=ok)
    return embed_loss(sstate.head, f, y, ok)

  def after_step(ctx, sstate, info):
    x, y, ok, task = views(info.batch)
    # The backbone's features at the parameters the step differentiated,
    # held constant: the head's part of the joint gradient.
    f, _ = ctx.apply(info.params_before, sstate.model_state, x, task,
                     train=True, features=True, mask=ok)
    f = jax.lax.stop_gradient(f)
    g = jax.grad(embed_loss)(sstate.head, f, y, ok)
    updates, opt = ctx.tx.update(g, sstate.head_opt_state, sstate.head)
    return sstate._replace(head=optax.apply_updates(sstate.head, updates),
                           head_opt_state=opt,
                           memory=reservoir_step(ctx, sstate, info))

  @functools.partial(jax.jit, static_argnums=0)
  def class_means(ctx, params, model_state, memory):
    c = ctx.info.num_classes
    f = features(backbone_features(ctx), params, model_state, memory.x,
                 memory.task)
    onehot = jax.nn.one_hot(memory.y, c, dtype=jnp.float32)
    onehot = onehot * memory.valid[:, None]
    counts = jnp.sum(onehot, axis=0)
    mean = (onehot.T @ f) / jnp.maximum(counts, 1.0)[:, None]
    return l2_normalise(mean), counts > 0

  def after_experience(ctx, state, experience):
    del experience
    ss = state.strategy
    means, has = class_means(ctx, state.params, state.model_state, ss.memory)
    return state.replace(strategy=ss._replace(means=means, has_mean=has))

  def predict(ctx, sstate, params, model_state, x, task):
    # Before any experience has ended there are no means: the model's own
    # (untrained-head) logits, as iCaRL's.
    f = backbone_features(ctx)(params, model_state, x, task)
    return ncm_predict(ctx, f, sstate.means, sstate.has_mean, params,
                       model_state, x, task)

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, task_loss=task_loss, loss=loss,
                  after_step=after_step, after_experience=after_experience,
                  predict=predict, name="scr")
