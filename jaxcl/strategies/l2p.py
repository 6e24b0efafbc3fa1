"""L2P: learn a pool of prompts for a frozen pretrained ViT, picked by key.

Wang et al. (2022) keep a pretrained Vision Transformer ``f`` fixed and
learn only a pool of ``M`` prompts ``P_i`` (each ``L x D`` tokens), one
key ``k_i ∈ R^D`` per prompt, and the classifier ``g_φ``. An image's query
is the frozen model's own CLS feature ``q(x) = f(x)[0]``; the ``N`` keys
nearest it by cosine ``γ`` choose the prompts inserted into its token
sequence, and the classifier reads the mean of the prompt positions'
outputs (the paper's and its code's ``classifier='prompt'``). The
objective (the paper's eq. 5):

.. math::
   K_x = \\operatorname{top-N}_{i \\in [1, M]} \\gamma(q(x), k_i),\\qquad
   x_p = [z_{\\text{cls}};\\, P_{s_1}; \\dots; P_{s_N};\\, E x_p],

.. math::
   \\min_{P, k, \\phi}\\; \\mathcal{L}\\big(g_\\phi(f^{\\text{avg}}_r(x_p)),
     y\\big) + \\lambda \\sum_{s_i \\in K_x}
     \\big(1 - \\gamma(q(x), k_{s_i})\\big),

averaged over the batch (``λ`` is ``lam``; the sum over ``K_x`` is the
reference's ``reduce_sim``, and ``1 - γ`` differs from its ``-γ`` by a
constant). The key term reaches the keys only: the query carries no
gradient, and the top-N choice none.

The split between model and strategy: the model (``model.name='vit'``
with ``pool_size > 0``, :class:`jaxcl.models.vit.L2PViT`) holds the pool,
the keys and the head and runs the prompted forward pass, so prediction
(``predict``) needs nothing from this strategy but the class mask; the
strategy freezes the backbone, adds the key term, masks the training
logits and loads the pretrained backbone. The backbone is frozen as
:mod:`jaxcl.strategies._freeze` freezes a part (zero gradient, and the
copy restored after every update, so momentum and weight decay cannot
move it); the copy is taken once: at ``init``, or, with ``pretrained`` (a
plain ``vit`` run's params, :mod:`jaxcl.pretrained`), when the first
experience starts and the file is loaded into ``params['backbone']``. The
head is the JAX reference's (zero-initialised), trained on the mean prompt
output.

``train_mask=True`` is the reference's ``train_mask`` (Mammoth's "mask out
classes of non-current tasks"): the training cross-entropy is over the
current experience's classes only, so the head columns of other classes
get no gradient. Beside a member that appends replayed rows it is refused
(at the first step): the replayed rows' loss over all classes pushes the
current classes' logits down and nothing lifts them, so each experience's
classes scored 0.00 until replayed (docs/notes_prompt.md); chain
``l2p(train_mask=False)`` with replay instead. Prediction, with no task
id, is over the classes seen so far (Mammoth's ``forward`` slices the
logits to them).

Deviations from the references: prompts are chosen per image at training
and test time (the paper's rule); the PyTorch ports' and the JAX
reference's ``batchwise_prompt`` (one majority set of ``N`` prompts for a
whole batch, at test time too, so a test image's prediction depends on its
batch) and the paper's optional frequency penalty for diverse selection
are not offered. Prompts get no position embedding (the JAX reference's
choice; the PyTorch ports give them the CLS token's). Gradient clipping
(the references' norm 1) is the optimiser's business, not this strategy's:
``optimizer.clip_norm=1.0``.

What to expect: a frozen backbone that is much weaker than ImageNet ViT-B/16
(this library's ViTs are tiny and trained on MNIST-sized data) leaves the
prompts little to select from; no published number applies to such runs
(docs/notes_prompt.md).

References:
  Wang et al., `Learning to prompt for continual learning
  <https://arxiv.org/abs/2112.08654>`_, CVPR 2022 (code:
  google-research/l2p; PyTorch: JH-LEE-KR/l2p-pytorch, Mammoth's ``l2p``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl import pretrained as pretrained_lib
from jaxcl.models.classifier import l2_normalise
from jaxcl.models.vit import L2PViT, select_prompts
from jaxcl.strategies import _prompt
from jaxcl.strategy import Strategy, experience_classes, frozen_update

__all__ = ["l2p", "L2PState", "key_loss", "PARTS"]

BACKBONE = _prompt.BACKBONE
# The prompted model's params (jaxcl.models.vit.L2PViT).
PARTS = (BACKBONE, "prompt", "key", "head")


class L2PState(NamedTuple):
  backbone: Any        # like params['backbone']: the frozen backbone
  loaded: jax.Array    # bool scalar: the pretrained backbone is in place
  current: jax.Array   # bool (C,): the current experience's classes
  seen: jax.Array      # bool (C,): the classes of finished experiences


def key_loss(query: jax.Array, keys: jax.Array, idx: jax.Array,
             mask: jax.Array) -> jax.Array:
  """``mean_b Σ_{i ∈ idx_b} (1 - γ(q_b, k_i))``, mask-weighted.

  Args:
    query: ``(B, D)`` queries (no gradient is taken through them here).
    keys: ``(M, D)`` prompt keys.
    idx: int ``(B, N)`` the chosen keys per row.
    mask: ``(B,)`` row weights (0 for padding).
  """
  q = l2_normalise(jax.lax.stop_gradient(query))
  k = l2_normalise(keys)[idx]                       # B, N, D
  per_row = jnp.sum(1.0 - jnp.einsum("bd,bnd->bn", q, k), axis=1)
  return jnp.sum(per_row * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def l2p(lam: float = 0.1, train_mask: bool = True,
        pretrained: str = "") -> Strategy:
  """Learning to Prompt (Wang et al. 2022).

  Args:
    lam: ``λ``, the weight of the key term ``Σ (1 - γ(q(x), k_{s_i}))``
      (Mammoth's and l2p-pytorch's ``pull_constraint_coeff`` 0.1; the JAX
      reference's CIFAR-100 config uses 1.0).
    train_mask: the training cross-entropy over the current experience's
      classes only (the references' ``train_mask``); False: over all.
    pretrained: ``.npz`` of a plain ``vit`` run's params
      (:mod:`jaxcl.pretrained`); its ``backbone/...`` entries are loaded
      into the model's backbone when the first experience starts. ``''``:
      keep the backbone the run starts with (random, or
      ``model.pretrained`` for a whole saved L2P model).

  Raises:
    ValueError: a bad argument or a missing file; at ``init``, a model
    other than the prompted ViT.
  """
  checks.nonnegative("l2p: lam", lam)
  checks.flag("l2p: train_mask", train_mask)
  if pretrained:
    pretrained_lib.require(pretrained, "l2p")

  def init(ctx, key, params):
    del key
    _prompt.require_model(
        "l2p", ctx, params, L2PViT, PARTS,
        "the prompted ViT (model.name='vit' with model.vit.pool_size > 0, "
        "e.g. 10)")
    c = ctx.info.num_classes
    return L2PState(jax.tree.map(jnp.copy, params[BACKBONE]),
                    jnp.asarray(not pretrained), jnp.zeros((c,), bool),
                    jnp.zeros((c,), bool))

  def before_experience(ctx, state, experience):
    ss, params = _prompt.load_once(state.strategy, state.params, pretrained)
    ss = ss._replace(seen=ss.seen | ss.current,
                     current=experience_classes(
                         ctx.info.num_classes, experience))
    return state.replace(params=params, strategy=ss)

  def loss(ctx, sstate, params, batch, logits):
    del sstate, logits
    if lam == 0:
      return jnp.zeros((), jnp.float32)
    # The query again (the task loss's forward pass does not return it).
    # Same operations on the same operands as the model's own query pass
    # in this step, so XLA's CSE merges the two: the compiled step costs
    # 0.2 % of a query pass more than with lam = 0, not a whole pass
    # (benchmarks/prompt_query.py).
    q = ctx.model_apply({"params": params}, batch["x"],
                        method=L2PViT.query)
    idx, _ = select_prompts(q, params["key"], ctx.model.top_k)
    return lam * key_loss(q, params["key"], idx, batch["mask"])

  def freeze_grads(ctx, sstate, grads):
    del ctx, sstate
    return _prompt.zero_backbone(grads)

  def project_params(ctx, sstate, params):
    del ctx
    return _prompt.restore_backbone(params, sstate)

  return Strategy(init=init, before_experience=before_experience,
                  task_loss=_prompt.task_loss("l2p", train_mask), loss=loss,
                  update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads, project_params=project_params,
                  predict=_prompt.predict, name="l2p")
