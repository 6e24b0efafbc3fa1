"""CSCCT: cross-space clustering and controlled transfer, a plug-in for replay.

Ashok, Joseph & Balasubramanian (2022) add two feature-space losses to a
class-incremental method with an exemplar memory, both against the frozen
model ``f_old`` of the end of the previous experience. On the ``N`` rows of
a training batch (the incoming rows and the memory rows a partner method
appends), with :math:`c(u, v)` the cosine similarity, ``f`` the current
model's backbone features and ``s_ij = +1`` when rows ``i`` and ``j`` have
the same label, ``-1`` otherwise:

**Cross-space clustering** (CSC) pulls each row's current features towards
the *previous* model's features of every row of its class and pushes them
away from those of the other classes:

.. math::
   \\mathcal{L}_{CSC} = \\frac{1}{N^2} \\sum_{i=1}^{N} \\sum_{j=1}^{N}
     s_{ij} \\big(1 - c(f(x_i), f_{old}(x_j))\\big).

**Controlled transfer** (CT): for each row ``i`` of a class of the current
experience (the set :math:`\\mathcal{C}`), the distribution of its
similarities to the rows of earlier classes (:math:`\\mathcal{P}`) should
stay what the previous model gave:

.. math::
   q^{old}_{ij} = \\mathrm{softmax}_{j \\in \\mathcal{P}}
     \\big(c(f_{old}(x_i), f_{old}(x_j)) / T\\big), \\qquad
   q_{ij} = \\mathrm{softmax}_{j \\in \\mathcal{P}}
     \\big(c(f(x_i), f(x_j)) / T\\big),

.. math::
   \\mathcal{L}_{CT} = \\frac{T^2}{|\\mathcal{C}|\\,|\\mathcal{P}|}
     \\sum_{i \\in \\mathcal{C}} \\sum_{j \\in \\mathcal{P}}
     q^{old}_{ij} \\big(\\log q^{old}_{ij} - \\log q_{ij}\\big).

The loss added is :math:`\\lambda_{CSC} \\mathcal{L}_{CSC} + \\lambda_{CT}
\\mathcal{L}_{CT}`, from the second experience on (before, there is no
previous model). Symbols and arguments: :math:`\\lambda_{CSC}` is
``csc_weight``, :math:`\\lambda_{CT}` ``ct_weight``, ``T``
``ct_temperature``.

This follows the authors' code as Mammoth holds it
(``models/cscct_utils/cscct_model.py``, used by ``er_ace_cscct`` and
``derpp_cscct``): the defaults (``--csc_weight 3``, ``--ct_weight 1.5``,
``--ct_temperature 2``); cosines with the norms clamped at 1e-8 (its
``sim_matrix``); the CSC mean over all ``N^2`` pairs, labels compared with
each other (``+1`` on the diagonal); the previous model in evaluation mode
and the current one in training mode; the batch is the incoming rows and
the partner's replayed rows (``torch.cat([inputs, buf_inputs])``).

.. warning::
   **The CT scale.** The code takes ``torch.nn.KLDivLoss()`` with its
   default reduction ``'mean'``: the sum of the ``|C| x |P|`` pointwise
   terms divided by their number, not by the rows ``|C|``
   (``'batchmean'``, the true mean KL per row). So
   :math:`\\mathcal{L}_{CT}` is the mean per-row KL divided by
   :math:`|\\mathcal{P}|`, the number of earlier-class rows in the batch
   (1/10 of it with ER's 10 replayed rows), times ``T²``. jaxcl follows the
   code, so ``ct_weight`` means what it means there.

**Which rows are current, which earlier.** The code takes a row's task as
``label // classes_per_task`` and compares it with the current task's
index. jaxcl uses the classes of the current experience (its training
labels, recorded at its start) against the classes of finished
experiences, which needs each class in exactly one experience: a class
that comes again is refused at its experience's start, and a
domain-incremental stream at ``init`` (every class is in every
experience, so no row is "earlier": in the code, every row's task is 0 and
the CT term is the ``'mean'`` of an empty tensor, NaN). Memory rows of the
current experience's classes (a reservoir fills during the experience)
count as current, as in the code.

**Deviations.** Rows with ``mask = 0`` (padding, the empty slots a
partner appends while its memory is empty) take no part: the CSC mean is
over valid pairs, :math:`\\mathcal{P}` and :math:`\\mathcal{C}` hold valid
rows only (row weights other than 0/1 are not used; the code has none).
Without a row of :math:`\\mathcal{C}` or of :math:`\\mathcal{P}` the CT term
is 0 (the code's would be NaN; its partners draw memory rows only from the
second task on, where both exist). The code adds the whole term only when
*both* weights are > 0; here a weight of 0 turns off its own term alone.
The current model's features use the previous model's batch-norm
statistics as the structure in training mode (batch statistics; this pass
updates no running statistics), as :mod:`jaxcl.strategies.lucir`.

**Partners.** CSCCT reads the rows in the batch, so the partner must append
its memory rows to it: ``cscct+replay`` (ER) and ``cscct+er_ace`` (the
code's ``er_ace_cscct``) do; jaxcl's ``der`` / ``derpp`` keep their memory
rows out of the batch, so beside them CSCCT sees the incoming rows only.
Order does not matter: every ``prepare_batch`` runs before any loss.
**Alone** (allowed, not a method of the paper), CSCCT sees only the
incoming rows, all of the current experience's classes: CSC still pulls
them to the previous model's features of their class and away from the
other current class's, and CT is 0 (no earlier-class rows).

State: :class:`CSCCTState`, fixed shapes, so nothing recompiles between
experiences and it checkpoints and vmaps like any state.

References:
  Ashok, Joseph & Balasubramanian, `Class-incremental learning with
  cross-space clustering and controlled transfer
  <https://arxiv.org/abs/2208.03767>`_, ECCV 2022.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.models.classifier import l2_normalise
from jaxcl.strategy import Strategy, new_classes
from jaxcl.train import init_variables

__all__ = ["cscct", "CSCCTState", "cosine_matrix", "csc_loss", "ct_loss"]

_EPS = 1e-8    # the code's sim_matrix clamp on the norms
_NEG = -1e9    # the logit of a column outside P (finite: no NaN gradient)


class CSCCTState(NamedTuple):
  teacher: Any              # params of the model after the last experience
  teacher_model_state: Any  # its model state (batch norm statistics)
  seen: jax.Array           # bool (C,): classes of finished experiences
  current: jax.Array        # bool (C,): classes of the current experience


def cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
  """``(N, M)`` cosines of the rows of ``a`` and ``b`` (features are
  flattened), norms clamped at 1e-8 (the code's ``sim_matrix``)."""
  a = a.reshape(a.shape[0], -1).astype(jnp.float32)
  b = b.reshape(b.shape[0], -1).astype(jnp.float32)
  return l2_normalise(a, eps=_EPS) @ l2_normalise(b, eps=_EPS).T


def csc_loss(f: jax.Array, f_old: jax.Array, y: jax.Array,
             valid: jax.Array) -> jax.Array:
  """:math:`\\mathcal{L}_{CSC}`: the mean over valid pairs ``(i, j)`` of
  ``s_ij (1 - cos(f_i, f_old_j))``, ``s_ij`` +1 for equal labels, -1
  otherwise; 0 without a valid row."""
  sign = jnp.where(y[:, None] == y[None, :], 1.0, -1.0)
  pair = (valid[:, None] & valid[None, :]).astype(jnp.float32)
  terms = sign * (1.0 - cosine_matrix(f, f_old))
  return jnp.sum(pair * terms) / jnp.maximum(jnp.sum(pair), 1.0)


def ct_loss(f: jax.Array, f_old: jax.Array, cur: jax.Array, prev: jax.Array,
            temperature: float) -> jax.Array:
  """:math:`\\mathcal{L}_{CT}`: ``T²`` times ``KLDivLoss()`` (reduction
  ``'mean'``: over all ``|C| x |P|`` terms) of the current model's
  similarity distribution of each row of ``cur`` over the rows of
  ``prev`` against the previous model's (the target); 0 when either set
  is empty."""
  t = jnp.float32(temperature)

  def log_q(feats):
    s = jnp.where(prev[None, :], cosine_matrix(feats, feats) / t, _NEG)
    return jax.nn.log_softmax(s, axis=1)

  lq, lq_old = log_q(f), log_q(f_old)
  pair = cur[:, None] & prev[None, :]
  terms = jnp.where(pair, jnp.exp(lq_old) * (lq_old - lq), 0.0)
  n = jnp.sum(pair.astype(jnp.float32))
  return t * t * jnp.sum(terms) / jnp.maximum(n, 1.0)


def cscct(csc_weight: float = 3.0, ct_weight: float = 1.5,
          ct_temperature: float = 2.0) -> Strategy:
  """CSCCT (compose with a replay method that appends its memory rows:
  ``cscct+replay``, ``cscct+er_ace``).

  Args:
    csc_weight: weight :math:`\\lambda_{CSC}` of cross-space clustering
      (the code's ``--csc_weight``; 0 turns it off).
    ct_weight: weight :math:`\\lambda_{CT}` of controlled transfer
      (``--ct_weight``; 0 turns it off). Its term is the code's
      ``KLDivLoss`` with reduction ``'mean'`` (see the module's warning).
    ct_temperature: temperature ``T`` of the similarity softmaxes
      (``--ct_temperature``).

  The defaults are the code's (3, 1.5, 2).

  Raises:
    ValueError: a negative or non-finite weight, both weights 0 (CSCCT
      would change nothing), a ``ct_temperature`` that is not a finite
      number > 0; at ``init``, a domain-incremental stream; at an
      experience's start, classes that came in an earlier one.
  """
  checks.nonnegative("cscct: csc_weight", csc_weight)
  checks.nonnegative("cscct: ct_weight", ct_weight)
  if csc_weight == 0 and ct_weight == 0:
    raise ValueError("cscct: csc_weight and ct_weight are both 0, so cscct "
                     "would change nothing; give at least one > 0 (the "
                     "code's defaults: 3 and 1.5)")
  checks.positive("cscct: ct_temperature", ct_temperature)
  csc_weight, ct_weight = float(csc_weight), float(ct_weight)
  ct_temperature = float(ct_temperature)

  def init(ctx, key, params):
    info = ctx.info
    if info.kind == "domain":
      raise ValueError(
          "cscct contrasts the current experience's classes with earlier "
          "ones, which a domain-incremental stream (every class in every "
          "experience) does not have: use a class- or task-incremental "
          f"stream, each class in one experience (got kind={info.kind!r})")
    _, variables = init_variables(ctx, key)
    c = info.num_classes
    # Copies: the loop donates the state (teacher and params must not
    # alias).
    return CSCCTState(jax.tree.map(jnp.copy, params), variables,
                      jnp.zeros((c,), bool), jnp.zeros((c,), bool))

  def before_experience(ctx, state, experience):
    ss = state.strategy
    cur = np.zeros((ctx.info.num_classes,), bool)
    cur[new_classes("cscct", np.asarray(ss.seen), experience)] = True
    return state.replace(strategy=ss._replace(current=jnp.asarray(cur)))

  def loss(ctx, sstate, params, batch, logits):
    del logits
    x, y, task = batch["x"], batch["y"], batch["task"]
    valid = batch["mask"] > 0
    f, _ = ctx.apply(params, sstate.teacher_model_state, x, task,
                     train=True, features=True, mask=valid)
    f_old, _ = ctx.apply(sstate.teacher, sstate.teacher_model_state, x,
                         task, features=True)
    f_old = jax.lax.stop_gradient(f_old)
    total = jnp.zeros((), jnp.float32)
    if csc_weight > 0:
      total = total + csc_weight * csc_loss(f, f_old, y, valid)
    if ct_weight > 0:
      cur = valid & sstate.current[y]
      prev = valid & sstate.seen[y]
      total = total + ct_weight * ct_loss(f, f_old, cur, prev,
                                          ct_temperature)
    # The first experience has no previous model (the teacher is the
    # initialisation): no term. where, not a product: no 0 * NaN.
    return jnp.where(jnp.any(sstate.seen), total, 0.0)

  # Compiled once per factory; jit outputs are fresh buffers, so the
  # teacher never aliases the (donated) parameters.
  @jax.jit
  def freeze(ss, params, model_state):
    return CSCCTState(params, model_state, ss.seen | ss.current,
                      jnp.zeros_like(ss.current))

  def after_experience(ctx, state, experience):
    del ctx, experience
    return state.replace(strategy=freeze(state.strategy, state.params,
                                         state.model_state))

  return Strategy(init=init, before_experience=before_experience, loss=loss,
                  after_experience=after_experience, name="cscct")
