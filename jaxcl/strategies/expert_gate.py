"""Expert Gate: a network of experts behind a gate of autoencoders.

Aljundi, Chakravarty & Tuytelaars (2017) keep one *expert* model per task
and, beside it, one undercomplete *gating autoencoder* per task, trained on
that task's inputs. No task id is needed at test time: an input goes to
the expert whose autoencoder reconstructs it best.

**Autoencoders.** One hidden layer, ReLU encoder and sigmoid decoder (the
authors' ``cnn_autoencoder_layer_relusig``; Avalanche's
``ExpertAutoencoder``), on input features ``z``,

.. math::  \\hat z = \\sigma(W_2\\,\\mathrm{relu}(W_1 z + b_1) + b_2),
   \\quad z = \\mathrm{vec}(x) \\text{ or } \\sigma(\\mathrm{vec}(x)),
   \\quad er(x) = \\lVert \\hat z - z \\rVert_2^2 ,

trained by SGD with momentum and weight decay on the task's training data.
The paper (and Avalanche) feed it the conv5 features of a fixed pretrained
AlexNet, standardised and squashed by a sigmoid into the decoder's (0, 1)
range; here ``z`` is the raw flattened input, with no backbone.
``preprocess='none'`` (default) takes the pixels, already in [0, 1] (with
``dataset.normalize``, the inputs turned back into pixels, which the
sigmoid decoder can reach); a sigmoid would squeeze them into
[0.5, 0.73] and slow the autoencoder's SGD (on Split Digits, 10
autoencoder epochs, it cut routing accuracy from ~0.95 to ~0.78).
``'sigmoid'`` applies the paper's squashing to the inputs as given.

**Gate** (eq. 1): with :math:`er_i` the error of autoencoder ``i`` on a test
input,

.. math::  p_i = \\frac{\\exp(-er_i / t)}{\\sum_j \\exp(-er_j / t)},

and the input goes to expert :math:`\\arg\\max_i p_i` (hard gate; ``t`` is
``temperature``; the argmax does not depend on it, the probabilities do).

**Task relatedness** (eq. 2): when task ``k`` arrives its autoencoder is
trained first; with :math:`Er_k` its mean reconstruction error on task
``k``'s data and :math:`Er_a` that of a previous task ``a``'s autoencoder
on the same data,

.. math::  \\mathrm{Rel}(T_k, T_a) = 1 - \\frac{Er_a - Er_k}{Er_k}.

The new expert starts from the most related previous expert's parameters
(the whole model, output layer included) and is trained on task ``k`` by
fine-tuning, or, when :math:`\\mathrm{Rel} >` ``rel_threshold`` (0.85 in
Avalanche), by Learning without Forgetting from that expert: the loss adds

.. math::  \\alpha \\, \\mathrm{CE}\\big(\\mathrm{softmax}_g(z^{a}/T_d),
   \\mathrm{softmax}_g(z/T_d)\\big)

on the current data, ``z^a`` the related expert's logits, ``g`` the classes
that expert was trained on (:func:`jaxcl.strategies.lwf.distillation`;
``α = lwf_alpha``, ``T_d = lwf_temperature``). The first expert trains from
the run's initial parameters. When an experience ends, the trained model is
stored as its expert.

Mechanics: experts and autoencoders live in fixed-size stacks of
``num_experiences`` slots with ``filled`` masks (as
:mod:`jaxcl.strategies.ensemble`), so no shape changes, nothing recompiles,
checkpoints and ``jaxcl.sweep`` work. ``before_experience`` runs one jitted
program on the experience's (padded) training data: train the new
autoencoder (epochs of :func:`jaxcl.strategies._epochs.over_epochs`),
measure every stored autoencoder's error, compute the relatedness row, pick
the source expert and the LwF switch, and load the source's parameters (the
optimiser restarts). ``predict`` evaluates all autoencoders and experts with
``vmap`` and keeps, per input, the gated expert's logits; during an
experience the model being trained stands in for its own (not yet stored)
slot.

.. warning::

  Differences from the paper and Avalanche: autoencoders on raw inputs, not
  AlexNet features (no pretrained backbone here), without the sigmoid by
  default; routing per input, as the
  paper (Avalanche's ``ExpertGate.forward`` sums the error over the whole
  evaluation batch and routes the batch to one expert); relatedness on the
  new task's training data (the paper uses its validation data; Avalanche,
  as here, the experience's training data); the new expert copies the
  related expert's whole model (Avalanche shares its feature module and
  takes a fresh classifier; a single head over all classes is kept here so
  LwF can distil the old classes' outputs). Avalanche adds a *new*
  ``LwFPlugin`` whose previous model is still unset during the experience
  it is added for, so its distillation does nothing; here LwF distils from
  the related expert, as the paper describes.

References:
  Aljundi, Chakravarty & Tuytelaars, `Expert Gate: Lifelong Learning with a
  Network of Experts <https://arxiv.org/abs/1611.06194>`_, CVPR 2017.
  Avalanche's ``ExpertGateStrategy``
  (``avalanche/training/supervised/expert_gate.py``,
  ``avalanche/models/expert_gate.py``): the defaults (latent 100, SGD
  lr 1e-3, momentum 0.9, weight decay 5e-4, 2 epochs, batch 1; gate
  temperature 2; relatedness threshold 0.85; LwF α 0.01, T 2).
  Li & Hoiem, `Learning without Forgetting
  <https://arxiv.org/abs/1606.09282>`_, 2017.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import checks
from jaxcl.augment import pixel_maps
from jaxcl.strategies._epochs import over_epochs
from jaxcl.strategies.lwf import distillation
from jaxcl.strategy import Strategy, experience_classes
from jaxcl.train import device_experience, init_variables, reset_opt_state

__all__ = ["expert_gate", "ExpertGateState", "GateAutoencoder",
           "reconstruction_errors", "gate", "relatedness", "PREPROCESS"]

PREPROCESS = ("sigmoid", "none")


class GateAutoencoder(nn.Module):
  """The undercomplete gating autoencoder: ``D -> latent (ReLU) -> D
  (sigmoid)`` on flattened inputs ``(B, D)``."""
  latent: int
  features: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    h = nn.relu(nn.Dense(self.latent, name="encoder")(z))
    return nn.sigmoid(nn.Dense(self.features, name="decoder")(h))


class ExpertGateState(NamedTuple):
  experts: Any               # (E, ...) stacked expert parameters
  expert_states: Any         # (E, ...) their model states
  expert_filled: jax.Array   # bool (E,): slot holds a trained expert
  ae: Any                    # (E, ...) stacked autoencoder parameters
  ae_filled: jax.Array       # bool (E,): slot holds a trained autoencoder
  classes: jax.Array         # bool (E, C): classes each expert trained on
  relatedness: jax.Array     # float32 (E, E): Rel(T_k, T_a) at row k (0 unset)
  source: jax.Array          # int32 (E,): expert each started from (-1: none)
  used_lwf: jax.Array        # bool (E,): trained with LwF from its source
  lwf_on: jax.Array          # bool scalar: the current experience uses LwF
  teacher: jax.Array         # int32 scalar: the current LwF teacher's slot


def _inputs(x: jax.Array, preprocess: str) -> jax.Array:
  """The autoencoders' input ``z``: flattened, through a sigmoid (paper)."""
  z = x.reshape(x.shape[0], -1).astype(jnp.float32)
  return jax.nn.sigmoid(z) if preprocess == "sigmoid" else z


def reconstruction_errors(ae: GateAutoencoder, ae_params: Any, x: jax.Array,
                          preprocess: str) -> jax.Array:
  """Per-example squared reconstruction error ``(B,)`` of one autoencoder
  (summed over features, as Avalanche's ``AE_loss``)."""
  z = _inputs(x, preprocess)
  return jnp.sum((ae.apply({"params": ae_params}, z) - z) ** 2, axis=-1)


def gate(errors: jax.Array, filled: jax.Array, temperature: float
         ) -> tuple[jax.Array, jax.Array]:
  """Eq. 1: ``(probabilities (B, E), chosen slot (B,))`` from errors
  ``(E, B)``; empty slots get probability 0."""
  logits = jnp.where(filled[:, None], -errors / temperature, -jnp.inf)
  logits = jnp.where(jnp.any(filled), logits, 0.0)  # none yet: uniform
  probs = jax.nn.softmax(logits, axis=0).T
  return probs, jnp.argmax(probs, axis=-1).astype(jnp.int32)


def relatedness(err_new: jax.Array, err_old: jax.Array) -> jax.Array:
  """Eq. 2: ``Rel(T_k, T_a) = 1 - (Er_a - Er_k) / Er_k`` for ``Er_k =
  err_new`` (the new task's own autoencoder) and ``Er_a = err_old``."""
  return 1.0 - (err_old - err_new) / err_new


def _check_args(latent, ae_epochs, ae_batch_size, ae_lr, ae_momentum,
                ae_weight_decay, temperature, rel_threshold, lwf_alpha,
                lwf_temperature, preprocess) -> None:
  checks.whole("expert_gate: ae_latent", latent, 1)
  checks.whole("expert_gate: ae_epochs", ae_epochs, 1)
  checks.whole("expert_gate: ae_batch_size", ae_batch_size, 1)
  checks.positive("expert_gate: ae_lr", ae_lr)
  checks.fraction("expert_gate: ae_momentum", ae_momentum)
  checks.nonnegative("expert_gate: ae_weight_decay", ae_weight_decay)
  checks.positive("expert_gate: temperature", temperature)
  if not (isinstance(rel_threshold, (int, float))
          and not isinstance(rel_threshold, bool)
          and not math.isnan(rel_threshold)):
    raise ValueError(f"expert_gate: rel_threshold must be a number "
                     f"(relatedness is at most 2; inf: never LwF), got "
                     f"{rel_threshold!r}")
  checks.nonnegative("expert_gate: lwf_alpha", lwf_alpha)
  checks.positive("expert_gate: lwf_temperature", lwf_temperature)
  checks.one_of("expert_gate: preprocess", preprocess, PREPROCESS)


def expert_gate(ae_latent: int = 100, ae_epochs: int = 2,
                ae_batch_size: int = 1, ae_lr: float = 1e-3,
                ae_momentum: float = 0.9, ae_weight_decay: float = 5e-4,
                temperature: float = 2.0, rel_threshold: float = 0.85,
                lwf_alpha: float = 0.01, lwf_temperature: float = 2.0,
                preprocess: str = "none") -> Strategy:
  """Expert Gate (defaults: Avalanche's ``ExpertGateStrategy``).

  Args:
    ae_latent: the autoencoders' hidden width (undercomplete: below the
      input size).
    ae_epochs, ae_batch_size: the autoencoder's training passes over the
      experience and its mini-batch size.
    ae_lr, ae_momentum, ae_weight_decay: its SGD (PyTorch convention: the
      decay is added to the gradient before the momentum).
    temperature: the gate's softmax temperature ``t`` (eq. 1).
    rel_threshold: train by LwF from the most related expert when its
      relatedness (eq. 2, at most 2) exceeds this; else fine-tune
      (``inf``: always fine-tune).
    lwf_alpha, lwf_temperature: LwF's distillation weight and temperature.
    preprocess: ``'none'`` (the pixels, in [0, 1]) or
      ``'sigmoid'`` (the paper's squashing of the features before the
      sigmoid decoder: for standardised inputs).

  Raises:
    ValueError: naming a bad hyperparameter and what is allowed.
  """
  _check_args(ae_latent, ae_epochs, ae_batch_size, ae_lr, ae_momentum,
              ae_weight_decay, temperature, rel_threshold, lwf_alpha,
              lwf_temperature, preprocess)
  ae_tx = optax.chain(optax.add_decayed_weights(ae_weight_decay),
                      optax.sgd(ae_lr, momentum=ae_momentum or None))
  cache: dict[Any, Any] = {}

  def get_ae(ctx) -> GateAutoencoder:
    d = int(np.prod(ctx.info.input_shape))
    if ae_latent >= d:
      raise ValueError(f"expert_gate: ae_latent must be below the input "
                       f"size {d} (an undercomplete autoencoder), got "
                       f"{ae_latent}")
    return GateAutoencoder(ae_latent, d)

  def init(ctx, key, params):
    n, d = ctx.info.num_experiences, int(np.prod(ctx.info.input_shape))
    ae = get_ae(ctx)
    stack = lambda t: jax.tree.map(
        lambda a: jnp.zeros((n,) + a.shape, a.dtype), t)
    _, model_state = init_variables(ctx, key)  # only its structure is used
    ae_params = ae.init(key, jnp.zeros((1, d), jnp.float32))["params"]
    return ExpertGateState(
        stack(params), stack(model_state), jnp.zeros((n,), bool),
        stack(ae_params), jnp.zeros((n,), bool),
        jnp.zeros((n, ctx.info.num_classes), bool),
        jnp.zeros((n, n), jnp.float32), jnp.full((n,), -1, jnp.int32),
        jnp.zeros((n,), bool), jnp.zeros((), bool), jnp.zeros((), jnp.int32))

  def ae_view(ctx) -> Callable[[jax.Array], jax.Array]:
    """The autoencoders' view of a batch: its pixels for ``'none'`` (the
    standardisation undone), the inputs as given for ``'sigmoid'``."""
    if preprocess != "none":
      return lambda x: x
    return pixel_maps(ctx.normalize, ctx.info.input_shape, "expert_gate")[0]

  def train_ae(ae: GateAutoencoder, key: jax.Array, x: jax.Array,
               valid: jax.Array) -> Any:
    """A fresh autoencoder trained on the valid rows of ``x``."""
    k_init, k_run = jax.random.split(key)
    p = ae.init(k_init, jnp.zeros((1, ae.features), jnp.float32))["params"]

    def step(carry, idx, ok, k, e, j):
      del k, e, j
      p, opt = carry

      def loss(p):
        per = reconstruction_errors(ae, p, x[idx], preprocess)
        return jnp.sum(per * ok) / jnp.maximum(jnp.sum(ok), 1)

      g = jax.grad(loss)(p)
      upd, opt = ae_tx.update(g, opt, p)
      return optax.apply_updates(p, upd), opt

    p, _ = over_epochs(k_run, valid, (p, ae_tx.init(p)), epochs=ae_epochs,
                       batch_size=ae_batch_size, step=step)
    return p

  def mean_errors(ae, stacked_ae, x, valid):
    """Each slot's mean reconstruction error on the valid rows ``(E,)``;
    one slot at a time (lax.map) to keep a single (N, D) output live."""
    w = valid.astype(jnp.float32)
    return jax.lax.map(
        lambda p: jnp.sum(reconstruction_errors(ae, p, x, preprocess) * w)
        / jnp.maximum(jnp.sum(w), 1.0), stacked_ae)

  def get_start(ctx):
    if ctx in cache:
      return cache[ctx]
    ae, view = get_ae(ctx), ae_view(ctx)

    @jax.jit
    def start(ss, params, model_state, x, valid, classes, i, key):
      new_ae = train_ae(ae, key, view(x), valid)
      ae_stack = jax.tree.map(lambda s, a: s.at[i].set(a), ss.ae, new_ae)
      # (E,): Er_a; errs[i] = Er_k
      errs = mean_errors(ae, ae_stack, view(x), valid)
      prev = ss.expert_filled  # the previous experts (slot i is not yet one)
      rel = jnp.where(prev, relatedness(errs[i], errs), 0.0)
      src = jnp.argmax(jnp.where(prev, rel, -jnp.inf)).astype(jnp.int32)
      have = jnp.any(prev)
      take = lambda stack, own: jax.tree.map(
          lambda s, a: jnp.where(have, s[src], a), stack, own)
      lwf_on = have & (rel[src] > rel_threshold) & (lwf_alpha > 0)
      ss = ss._replace(
          ae=ae_stack, ae_filled=ss.ae_filled.at[i].set(True),
          classes=ss.classes.at[i].set(classes),
          relatedness=ss.relatedness.at[i].set(rel),
          source=ss.source.at[i].set(jnp.where(have, src, -1)),
          used_lwf=ss.used_lwf.at[i].set(lwf_on), lwf_on=lwf_on, teacher=src)
      return ss, take(ss.experts, params), take(ss.expert_states, model_state)

    cache[ctx] = start
    return start

  def before_experience(ctx, state, experience):
    size = ctx.info.train_size
    data = device_experience(experience, size)
    valid = np.arange(size) < experience.num_train
    classes = experience_classes(ctx.info.num_classes, experience)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, 0xAE6A7E),
                             experience.index)
    ss, params, model_state = get_start(ctx)(
        state.strategy, state.params, state.model_state, data["x"], valid,
        classes, np.int32(experience.index), key)
    # A fresh optimiser for the new expert (Avalanche's make_optimizer).
    return reset_opt_state(ctx, state.replace(
        strategy=ss, params=params, model_state=model_state))

  def loss(ctx, sstate, params, batch, logits):
    del params
    if lwf_alpha == 0:
      return jnp.zeros((), jnp.float32)
    t = sstate.teacher
    pick = lambda stack: jax.tree.map(lambda a: a[t], stack)
    teacher = jax.lax.stop_gradient(ctx.logits(
        pick(sstate.experts), pick(sstate.expert_states), batch["x"],
        batch["task"]))
    d = distillation(logits, teacher, sstate.classes[t], batch["mask"],
                     lwf_temperature)
    return jnp.where(sstate.lwf_on, lwf_alpha * d, 0.0)

  def after_experience(ctx, state, experience):
    del ctx
    ss = state.strategy
    i = experience.index
    put = lambda stack, new: jax.tree.map(lambda s, a: s.at[i].set(a), stack,
                                          new)
    ss = ss._replace(experts=put(ss.experts, state.params),
                     expert_states=put(ss.expert_states, state.model_state),
                     expert_filled=ss.expert_filled.at[i].set(True),
                     lwf_on=jnp.zeros((), bool))
    return state.replace(strategy=ss)

  def predict(ctx, sstate, params, model_state, x, task):
    ae = get_ae(ctx)
    own = ctx.logits(params, model_state, x, task)
    xa = ae_view(ctx)(x)
    errs = jax.vmap(lambda p: reconstruction_errors(ae, p, xa, preprocess))(
        sstate.ae)  # (E, B)
    _, choice = gate(errs, sstate.ae_filled, temperature)
    stacked = jax.vmap(lambda p, m: ctx.logits(p, m, x, task))(
        sstate.experts, sstate.expert_states)  # (E, B, C)
    routed = jnp.take_along_axis(stacked, choice[None, :, None], axis=0)[0]
    # The slot being trained has its autoencoder but not yet its expert:
    # the current model answers for it (and for everything before any
    # autoencoder exists).
    stored = sstate.expert_filled[choice] & jnp.any(sstate.ae_filled)
    return jnp.where(stored[:, None], routed, own)

  return Strategy(init=init, before_experience=before_experience, loss=loss,
                  after_experience=after_experience, predict=predict,
                  name="expert_gate",
                  writes_params=frozenset({"before_experience"}))
