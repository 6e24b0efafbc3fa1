"""DualPrompt: a shared G-prompt and per-task E-prompts for a frozen ViT.

Wang et al. (2022b) keep a pretrained Vision Transformer frozen and learn
two kinds of prompts, both attached by prefix-tuning (each prompt a pair
``(p_K, p_V)`` of key and value rows prepended to a block's projected
keys and values; :class:`jaxcl.models.vit.PrefixAttention`):

.. math::
   f_{\\text{prefix}}(p, h) = \\mathrm{MSA}\\big(h W_Q,\\,
     [p_K; h W_K],\\, [p_V; h W_V]\\big),

* the **G-prompt** ``g`` (one per block of ``g_layers``, default blocks
  0-1), shared by every task;
* the **E-prompts** ``e_t`` (one per task ``t`` and per block of
  ``e_layers``, default blocks 2-4), each with a key ``k_t ∈ R^D``.

An image's query is the frozen model's own CLS feature ``q(x)`` (a pass
without prompts). In training the task id is known: experience ``t``
uses its own E-prompt ``e_t``, and its key is pulled to the query. The
training objective (``γ`` the cosine similarity):

.. math::
   \\min_{g,\\, e_t,\\, k_t,\\, \\phi}\\;
     \\mathcal{L}\\big(f_\\phi(f_{g, e_t}(x)),\\, y\\big)
     + \\lambda\\,\\big(1 - \\gamma(q(x), k_t)\\big),

averaged over the batch (``λ`` is ``lam``; the references subtract
``λ γ``, the same gradient). At test time no task id is given: the
E-prompt is the one of the nearest key,

.. math::
   t(x) = \\operatorname{argmax}_{i} \\gamma(q(x), k_i),

and the classifier ``f_φ`` reads the prompted pass's CLS output.

The split between model and strategy: the model (``model.name='vit'``
with ``pool_size > 0`` and ``prompt='dualprompt'``,
:class:`jaxcl.models.vit.DualPromptViT`) holds the prompts, keys and head
and runs the forward pass: with ``train=True`` its ``task`` argument is
the E-prompt index, otherwise it selects by key. This strategy writes the
current experience's index into the incoming rows' task ids
(``prepare_batch``; rows a chained replay member appends keep the ids they
were stored with, i.e. their own experience's E-prompt), adds the key
term, freezes the backbone and every E-prompt and key but the current
experience's (zero gradient, and the values restored after every update
as :mod:`jaxcl.strategies._freeze` freezes a part, so momentum and
weight decay cannot move them), masks the training logits and loads the
pretrained backbone. The G-prompt and the head train in every
experience. With ``shared_prompt_pool`` (the references' default), a new
experience's E-prompt starts as a copy of the previous one's (its key
does not: ``shared_prompt_key=False`` in both references).

``train_mask=True`` (the references'): the training cross-entropy is over
the current experience's classes only; beside a member that appends
replayed rows it is refused at the first step, as
:mod:`jaxcl.strategies.l2p` refuses it (docs/notes_prompt.md). Prediction,
with no task id, is over the classes seen so far.

Deviations from the references: the E-prompt is chosen per image at test
time (the paper's rule); both codes' ``batchwise_prompt=True`` (the
batch's majority prompt for every row) is not offered. The references
reset the optimiser at each task (``train.reset_optimizer``, this
library's default) and clip the gradient norm to 1 (``optimizer.
clip_norm``): both are the run's settings, not this strategy's. A prompt
of length ``L`` has ``L`` key rows and ``L`` value rows, as in the JAX
reference and the PyTorch port (``(…, 2, L, heads, D/heads)``; the paper
writes one ``L_p``-row prompt split in halves, and CODA-Prompt's
re-implementation splits it so). As in the references, the test-time
argmax runs over the whole pool, the keys of experiences not yet trained
included. Prompts and keys are drawn ``U(-1, 1)`` (the PyTorch port;
the JAX reference draws ``U(0, 0.01)``).

References:
  Wang et al., `DualPrompt: complementary prompting for rehearsal-free
  continual learning <https://arxiv.org/abs/2204.04799>`_, ECCV 2022
  (code: google-research/l2p ``configs/cifar100_dualprompt.py``,
  ``models/vit.py``, ``models/prompt.py``; PyTorch:
  JH-LEE-KR/dualprompt-pytorch, Mammoth's ``dualprompt``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl import pretrained as pretrained_lib
from jaxcl.models.vit import DualPromptViT
from jaxcl.strategies import _prompt
from jaxcl.strategies.l2p import key_loss
from jaxcl.strategy import Strategy, experience_classes, frozen_update

__all__ = ["dualprompt", "DualPromptState", "PARTS", "PER_TASK"]

BACKBONE = _prompt.BACKBONE
# The per-task params (the E-prompts, axis 1 the pool; the keys, axis 0),
# then the model's.
PER_TASK = ("e_prompt", "key")
PARTS = (BACKBONE, "g_prompt") + PER_TASK + ("head",)


class DualPromptState(NamedTuple):
  backbone: Any        # like params['backbone']: the frozen backbone
  frozen: Any          # {e_prompt, key} as the experience started
  loaded: jax.Array    # bool scalar: the pretrained backbone is in place
  task: jax.Array      # int32 scalar: the current experience (-1: none yet)
  current: jax.Array   # bool (C,): the current experience's classes
  seen: jax.Array      # bool (C,): the classes of finished experiences


def _along_pool(on: jax.Array, name: str, leaf: jax.Array) -> jax.Array:
  """``on`` (M,) shaped to broadcast over ``e_prompt`` ``(n_e, M, 2, L,
  D)`` or ``key`` ``(M, D)``."""
  if name == "key":
    return on[:, None]
  return on.reshape((1, -1) + (1,) * (leaf.ndim - 2))


def dualprompt(lam: float = 1.0, train_mask: bool = True,
               shared_prompt_pool: bool = True,
               pretrained: str = "") -> Strategy:
  """DualPrompt (Wang et al. 2022b).

  Args:
    lam: ``λ``, the weight of the matching term ``1 - γ(q(x), k_t)``
      (``pull_constraint_coeff`` 1.0 in the JAX reference and the PyTorch
      port).
    train_mask: the training cross-entropy over the current experience's
      classes only (the references' ``train_mask``); False: over all.
    shared_prompt_pool: start each experience's E-prompt (not its key) as
      a copy of the previous experience's (the references'
      ``shared_prompt_pool=True``); False: from its initial draw.
    pretrained: ``.npz`` of a plain ``vit`` run's params
      (:mod:`jaxcl.pretrained`), loaded into the backbone when the first
      experience starts; ``''``: keep the backbone the run starts with.

  Raises:
    ValueError: a bad argument or a missing file; at ``init``, a model
    other than the DualPrompt ViT or a pool with fewer E-prompts than the
    stream has experiences; at an experience past the pool.
  """
  checks.nonnegative("dualprompt: lam", lam)
  checks.flag("dualprompt: train_mask", train_mask)
  checks.flag("dualprompt: shared_prompt_pool", shared_prompt_pool)
  if pretrained:
    pretrained_lib.require(pretrained, "dualprompt")

  def init(ctx, key, params):
    del key
    _prompt.require_model(
        "dualprompt", ctx, params, DualPromptViT, PARTS,
        "the DualPrompt ViT (model.name='vit' with model.vit.pool_size > 0 "
        "and model.vit.prompt='dualprompt')")
    m, n = ctx.model.pool_size, ctx.info.num_experiences
    if m < n:
      raise ValueError(f"dualprompt: pool_size={m} E-prompts for a stream "
                       f"of {n} experiences; one E-prompt per experience: "
                       f"use model.vit.pool_size >= {n}")
    c = ctx.info.num_classes
    return DualPromptState(jax.tree.map(jnp.copy, params[BACKBONE]),
                           {k: jnp.copy(params[k]) for k in PER_TASK},
                           jnp.asarray(not pretrained),
                           jnp.asarray(-1, jnp.int32),
                           jnp.zeros((c,), bool), jnp.zeros((c,), bool))

  def before_experience(ctx, state, experience):
    ss, params = _prompt.load_once(state.strategy, state.params, pretrained)
    t, m = int(ss.task) + 1, ctx.model.pool_size
    if t >= m:
      raise ValueError(f"dualprompt: experience {t + 1} of a stream, but "
                       f"the pool has pool_size={m} E-prompts; use "
                       f"model.vit.pool_size >= the number of experiences")
    if shared_prompt_pool and t > 0:
      e = params["e_prompt"]
      params = {**params, "e_prompt": e.at[:, t].set(e[:, t - 1])}
    ss = ss._replace(frozen=_prompt.fresh_copy(
                         {k: params[k] for k in PER_TASK}),
                     task=jnp.asarray(t, jnp.int32),
                     seen=ss.seen | ss.current,
                     current=experience_classes(
                         ctx.info.num_classes, experience))
    return state.replace(params=params, strategy=ss)

  def prepare_batch(ctx, sstate, batch, key):
    del key
    # The incoming rows train the current experience's E-prompt; rows a
    # member before this one appended keep their ids.
    b = ctx.info.batch_size
    return {**batch, "task": batch["task"].at[:b].set(
        sstate.task.astype(batch["task"].dtype))}

  def loss(ctx, sstate, params, batch, logits):
    del sstate, logits
    if lam == 0:
      return jnp.zeros((), jnp.float32)
    # The query again (the task loss's forward pass, which knows its
    # E-prompt, does not run it): one backbone pass without prompts.
    q = ctx.model_apply({"params": params}, batch["x"],
                        method=DualPromptViT.query)
    idx = batch["task"].astype(jnp.int32)[:, None]
    return lam * key_loss(q, params["key"], idx, batch["mask"])

  def active(ctx, sstate) -> jax.Array:
    return jnp.arange(ctx.model.pool_size) == sstate.task

  def freeze_grads(ctx, sstate, grads):
    grads = _prompt.zero_backbone(grads)
    on = active(ctx, sstate)
    return {**grads, **{k: grads[k] * _along_pool(on, k, grads[k])
                        for k in PER_TASK}}

  def project_params(ctx, sstate, params):
    params = _prompt.restore_backbone(params, sstate)
    on = active(ctx, sstate)
    return {**params, **{k: jnp.where(_along_pool(on, k, params[k]),
                                      params[k], sstate.frozen[k])
                         for k in PER_TASK}}

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch,
                  task_loss=_prompt.task_loss("dualprompt", train_mask),
                  loss=loss, update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads,
                  project_params=project_params, predict=_prompt.predict,
                  name="dualprompt",
                  writes_params=frozenset({"before_experience"}))
