"""SIW: standardisation of initial weights, for memoryless class-IL.

Belouadah, Popescu & Kanellos (2020) fine-tune the whole model on each
experience's data alone (no memory, no distillation) and correct the
output layer at prediction time:

* **initial weights replay**: each class's output weights and bias are
  those it had at the end of the experience it was new in (learned with
  all its data); fine-tuning on later experiences, which only pushes
  them down as negatives, is undone for the output layer;
* **standardisation**: each class's weight vector :math:`w_c \\in
  \\mathbb{R}^D` is standardised, :math:`\\hat w_c = (w_c -
  \\mu(w_c)) / \\sigma(w_c)` (mean and population standard deviation over
  its :math:`D` entries), because vectors learned in different states
  have different magnitudes;
* **state-level calibration**: with :math:`\\mu(M_s)` the model's
  confidence in state :math:`s`, the mean over the training images of the
  classes new in :math:`s` of their top raw score (the model as :math:`s`
  ended, the classes seen so far), the score of a past class :math:`c`
  (new in state :math:`s_c`) is multiplied by
  :math:`\\mu(M_{now}) / \\mu(M_{s_c})`:

.. math::
   p(c \\mid x) = \\big(f(x)^\\top \\hat w_c^{init} + b_c^{init}\\big)
                 \\cdot \\frac{\\mu(M_{now})}{\\mu(M_{s_c})}.

Followed: the authors' code (``EdenBelouadah/class-incremental-learning``,
``siw/FT/codes/inFT_siw_mc.py``, their best variant
:math:`inFT^{mc}_{siw}`, read through the search tool): the initial bias
replayed with the weights and not standardised, ``np.std`` (population),
every class's vector standardised (the newest included), the ratio on the
raw (possibly negative) scores, the correction applied once past classes
exist (the first state's predictions are the network's own).
Deviations: their fine-tuning replaces the output layer by a freshly
initialised one at every state (``model_ft.fc = nn.Linear(...)``); here
one head covers all classes, the classes not seen yet are masked out of
the cross-entropy (their weights stay at their initialisation until
their experience, as fresh ones would be) and the past classes' weights
train on (they are replaced at prediction anyway). Their learning rate is
divided by the state number (``lr / b``); use an optimiser schedule for
that. Avalanche's ``SIWPlugin`` differs: it zeroes the past classes'
gradients instead of replaying stored weights, standardises with the
unbiased standard deviation and writes the standardised weights into the
model before each evaluation, so training goes on from them.

SIW is a memoryless method: beside a replay member (``replay+siw``,
``gem+siw``) it still predicts with each old class's initial weights, so
what the replayed rows teach the output layer about the old classes is
dropped at prediction (session 53's composition sweep: Replay 0.24
alone, 0.15-0.16 with SIW, on the audit's tiny Split Digits set-up).

State: :class:`SIWState`, fixed shapes (a ``D x C`` copy of the output
weights, ``C`` biases, one confidence per experience), so nothing
recompiles between experiences and it checkpoints and vmaps like any
state. The model needs a linear ``head`` (kernel, with or without a
bias) over all classes, reading the backbone's features.

References:
  Belouadah, Popescu & Kanellos, `Initial classifier weights replay for
  memoryless class incremental learning
  <https://arxiv.org/abs/2008.13710>`_, BMVC 2020.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.strategies._class_incremental import (
    mark_new_classes, mask_unseen, require_class_stream, seen_cross_entropy)
from jaxcl.strategies.icarl import exemplar_hook, features
from jaxcl.strategies.il2m import class_statistics
from jaxcl.strategy import Strategy, require_single_head

__all__ = ["SIWState", "siw", "standardise", "siw_scores"]


class SIWState(NamedTuple):
  init_kernel: jax.Array  # float32 (D, C): each class's weights when new
  init_bias: jax.Array    # float32 (C,): its bias then (0: no bias)
  confidence: jax.Array   # float32 (E,): μ(M_s), each state's confidence
  class_exp: jax.Array    # int32 (C,): the experience each class came in, -1
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): classes of the current experience


def standardise(kernel: jax.Array) -> jax.Array:
  """Each column (a class's weight vector) of ``kernel`` ``(D, C)`` minus
  its mean, over its population standard deviation (an all-zero column,
  a zero-initialised class, stays 0 rather than NaN)."""
  mu = jnp.mean(kernel, axis=0, keepdims=True)
  sd = jnp.std(kernel, axis=0, keepdims=True)
  return (kernel - mu) / jnp.where(sd > 0, sd, 1.0)


def siw_scores(feats: jax.Array, kernel: jax.Array, bias: jax.Array,
               ss: SIWState, calibrate: bool = True) -> jax.Array:
  """SIW's scores ``(N, C)`` from backbone features ``(N, D)`` and the
  head's current ``kernel`` / ``bias``: the finished experiences' classes
  with their initial weights and biases, every class standardised, the
  past classes' scores times ``confidence[now] / confidence[s_c]``
  (``now`` the last finished experience; a zero confidence leaves the
  score alone); classes not seen yet masked out."""
  w = jnp.where(ss.seen[None, :], ss.init_kernel, kernel)
  b = jnp.where(ss.seen, ss.init_bias, bias)
  scores = feats @ standardise(w) + b[None, :]
  if calibrate:
    now = jnp.maximum(jnp.max(ss.class_exp), 0)
    then = ss.confidence[jnp.maximum(ss.class_exp, 0)]
    factor = ss.confidence[now] / jnp.where(then != 0, then, 1.0)
    past = ss.seen & (ss.class_exp < now) & (then != 0)
    scores = scores * jnp.where(past, factor, 1.0)[None, :]
  return mask_unseen(scores, ss)


def siw(calibrate: bool = True) -> Strategy:
  """SIW (class-incremental streams, no memory).

  Args:
    calibrate: the state-level calibration of past classes' scores
      (False: initial weights and standardisation alone, the paper's
      :math:`inFT_{siw}`).

  Raises:
    ValueError: a non-boolean ``calibrate``; at ``init``, a stream that is
      not class-incremental or a model without a linear ``head`` over all
      classes; at an experience's start, classes that came in an earlier
      one.
  """
  checks.flag("siw: calibrate", calibrate)

  def init(ctx, key, params):
    del key
    info = ctx.info
    require_class_stream("siw", info, "replays the initial output weights "
                         "of the old classes")
    head = require_single_head(
        "siw", params, info.num_classes,
        (frozenset({"kernel", "bias"}), frozenset({"kernel"})),
        "a linear 'head' layer (a kernel, with or without a bias; "
        "model.head='linear') reading the backbone's features")
    c = info.num_classes
    no = jnp.zeros((c,), bool)
    return SIWState(
        init_kernel=jnp.zeros(head["kernel"].shape, jnp.float32),
        init_bias=jnp.zeros((c,), jnp.float32),
        confidence=jnp.zeros((info.num_experiences,), jnp.float32),
        class_exp=jnp.full((c,), -1, jnp.int32), seen=no, current=no)

  def head_of(params):
    head = params["head"]
    kernel = head["kernel"].astype(jnp.float32)
    bias = head.get("bias", jnp.zeros(kernel.shape[-1:], jnp.float32))
    return kernel, bias.astype(jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def keep_initial(ctx, ss, params, model_state, x, y, task, n_valid,
                   experience):
    # The state's confidence: the top raw score over the classes seen so
    # far, on the experience's training rows (the new classes' images),
    # the model in evaluation mode.
    valid = jnp.arange(x.shape[0]) < n_valid
    seen = ss.seen | ss.current
    logits = features(lambda p, ms, xs, t: ctx.logits(p, ms, xs, t),
                      params, model_state, x, task)
    _, conf = class_statistics(logits, y, valid, seen)
    kernel, bias = head_of(params)
    return ss._replace(
        init_kernel=jnp.where(ss.current[None, :], kernel, ss.init_kernel),
        init_bias=jnp.where(ss.current, bias, ss.init_bias),
        confidence=ss.confidence.at[experience].set(conf),
        class_exp=jnp.where(ss.current, experience, ss.class_exp),
        seen=seen, current=jnp.zeros_like(ss.current))

  def predict(ctx, sstate, params, model_state, x, task):
    feats, _ = ctx.apply(params, model_state, x, task, features=True)
    feats = feats.reshape(feats.shape[0], -1).astype(jnp.float32)
    kernel, bias = head_of(params)
    corrected = siw_scores(feats, kernel, bias, sstate, calibrate)
    # The first state's predictions are the network's own (the code
    # corrects from the second state on): its linear head on the same
    # features (no second forward pass).
    plain = mask_unseen(feats @ kernel + bias[None, :], sstate)
    past = jnp.any(sstate.seen & (sstate.class_exp
                                  < jnp.max(sstate.class_exp)))
    return jnp.where(past, corrected, plain)

  return Strategy(init=init, before_experience=mark_new_classes("siw"),
                  task_loss=seen_cross_entropy,
                  after_experience=exemplar_hook(keep_initial),
                  predict=predict, name="siw")
