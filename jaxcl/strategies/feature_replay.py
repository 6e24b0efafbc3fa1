"""Feature replay: replay stored backbone features to the classifier only.

Avalanche's ``FeatureReplay`` strategy ("replay is performed following the
PR-ACE protocol defined in Magistri et al."): after each experience, the
backbone features ``f(x)`` of the experience's training rows (evaluation
mode) go into a class-balanced memory of ``mem_size`` features (each class
a uniformly random ``mem_size // classes`` of its rows:
:func:`jaxcl.buffers.class_balanced_experience_add`). Features, not
inputs, are stored, so replay trains the output layer ``h`` alone; the
stored features are those of the model that saw their experience, and are
never recomputed. With ``w = 1 / (i + 1)`` in experience ``i`` (0-based),
``B`` the incoming batch and ``M_B`` ``batch_size`` features drawn from
memory,

.. math::
   \\mathcal{L} = \\tfrac12\\,\\mathcal{L}^{C_m}_{ce}(h(f(x)), y)_B
   + \\tfrac12\\Big((1 - w)\\,\\mathcal{L}_{ce}(h(m), y_m)_{M_B}
                  + w\\,\\mathcal{L}_{ce}(h(\\bar f(x)), y)_B\\Big),

where ``\\mathcal{L}^{C_m}_{ce}`` is the cross-entropy over the classes
``C_m`` only (Avalanche's ``MaskedCrossEntropy``), ``\\bar f`` the features
with their gradient stopped, and the last two terms run over every output.
``C_m`` (``mask``): ``'new'``, this experience's classes (the default: the
asymmetric, ACE-style loss of the PR-ACE protocol, and what Avalanche's
docstring says, "masked cross entropy for current task classes"), or
``'seen'``, every class seen so far (the default of the
``MaskedCrossEntropy()`` Avalanche's code passes). With ``'seen'`` the
incoming batch pushes the old classes' logits down through the backbone,
the stored features go stale, and on Split Digits the old classes are lost
as under Naive (docs/notes_replay.md).
During the first experience the memory is empty and the loss is
``\\mathcal{L}^{C_m}_{ce}`` alone, as there.

Mechanics: ``prepare_batch`` draws the replayed features (uniformly,
without replacement; none while the memory is empty) into the batch;
``task_loss`` is the masked term, ``loss`` the classifier terms. The
output layer is the model's part above its ``backbone`` module, run on
the features through :func:`jaxcl.strategies.latent_replay.split_model`
(the split latent replay uses). The current batch's features for the
detached term come from a second pass of the model in training mode (the
``loss`` hook does not see the step's activations; Avalanche reads them
off its forward pass). State: :class:`FeatureReplayState`, fixed shapes.

References:
  Magistri, Trinci, Soutif-Cormerais, van de Weijer & Bagdanov, `Elastic
  feature consolidation for cold start exemplar-free incremental learning
  <https://openreview.net/forum?id=7D9X2cFnt1>`_, ICLR 2024 (the protocol
  Avalanche's docstring names); Avalanche's
  ``avalanche/training/supervised/feature_replay.py``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.state import allow_extra_outputs, cross_entropy
from jaxcl.strategies._extractor import extract
from jaxcl.strategies._replay_memory import replay_sizer
from jaxcl.strategies.icarl import features
from jaxcl.strategies.latent_replay import Split, split_model
from jaxcl.strategy import Strategy, experience_classes
from jaxcl.train import device_experience, init_variables

__all__ = ["feature_replay", "FeatureReplayState", "MASKS", "LAYER"]

MASKS = ("new", "seen")
# The module whose output is the feature (the output layer is above it).
LAYER = "backbone"
_NEG = -1e9  # logit of a masked class (finite: keeps gradients finite)


class FeatureReplayState(NamedTuple):
  memory: buffers.Memory  # mem_size features
  priority: jax.Array     # float32 (mem_size,): the entries' random keys
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): the current experience's classes
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key
  model_state: Any        # model state at the experience's start


def feature_replay(mem_size: int = 200, batch_size: int = 10,
                   mask: str = "new") -> Strategy:
  """Feature replay (Avalanche's ``FeatureReplay``).

  Args:
    mem_size: memory capacity in features (200, Avalanche's default); at
      least the number of classes.
    batch_size: replayed features per step (10, Avalanche's
      ``batch_size_mem``; 0: the training batch size).
    mask: the incoming batch's cross-entropy over this experience's
      classes (``'new'``, the protocol's) or over the classes ``'seen'`` so
      far (Avalanche's code's default criterion).

  Raises:
    ValueError: bad sizes or ``mask``; at ``init``, ``mem_size`` below the
    number of classes, a replay batch above ``mem_size``, or a model
    without a ``backbone`` module.
  """
  replay_size = replay_sizer("feature_replay", mem_size, batch_size)
  checks.one_of("feature_replay: mask", mask, MASKS)
  splits: dict[Any, Split] = {}

  def get_split(ctx) -> Split:
    if ctx not in splits:
      splits[ctx] = split_model(ctx, LAYER)
    return splits[ctx]

  def init(ctx, key, params):
    del params
    sp = get_split(ctx)
    c = ctx.info.num_classes
    if mem_size < c:
      raise ValueError(
          f"feature_replay: mem_size={mem_size} is below the number of "
          f"classes ({c}): a class-balanced memory keeps mem_size // classes "
          f"features per class; use mem_size >= {c}")
    replay_size(ctx)   # the default (training) batch must fit the memory
    k_mem, k_ms = jax.random.split(key)
    _, model_state = init_variables(ctx, k_ms)
    return FeatureReplayState(
        buffers.init(mem_size, sp.latent_shape),
        jnp.zeros((mem_size,), jnp.float32), jnp.zeros((c,), bool),
        jnp.zeros((c,), bool), jnp.zeros((), jnp.int32), k_mem, model_state)

  def before_experience(ctx, state, experience):
    ss = state.strategy._replace(
        current=experience_classes(ctx.info.num_classes, experience),
        experience=jnp.asarray(experience.index, jnp.int32),
        model_state=jax.tree.map(jnp.copy, state.model_state))
    return state.replace(strategy=ss)

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    m = sstate.memory
    return {**batch, "feature_x": m.x[idx], "feature_y": m.y[idx],
            "feature_task": m.task[idx],
            "feature_mask": ok.astype(jnp.float32)}

  def replaying(sstate) -> jax.Array:
    return jnp.any(sstate.memory.valid)

  def task_loss(ctx, sstate, logits, batch):
    classes = sstate.current if mask == "new" else \
        sstate.seen | sstate.current
    masked = jnp.where(allow_extra_outputs(classes, logits.shape[-1]),
                       logits.astype(jnp.float32), _NEG)
    ce = cross_entropy(masked, batch["y"], batch["mask"])
    return jnp.where(replaying(sstate), 0.5, 1.0) * ce

  def loss(ctx, sstate, params, batch, logits):
    del logits
    sp = get_split(ctx)

    def classifier_terms():
      f, _ = ctx.apply(params, sstate.model_state, batch["x"],
                       batch["task"], train=True, features=True,
                       mask=batch["mask"])
      f = jax.lax.stop_gradient(f).reshape(
          (f.shape[0],) + tuple(sp.latent_shape))
      n = batch["feature_x"].shape[0]
      both = jnp.concatenate([batch["feature_x"].astype(jnp.float32),
                              f.astype(jnp.float32)])
      task = jnp.concatenate([batch["feature_task"], batch["task"]])
      rows = jnp.concatenate([batch["feature_mask"], batch["mask"]])
      out, _ = sp.upper(ctx, params, sstate.model_state, both, task,
                        train=True, mask=rows)
      w = 1.0 / (sstate.experience.astype(jnp.float32) + 1.0)
      replayed = cross_entropy(out[:n], batch["feature_y"],
                               batch["feature_mask"])
      current = cross_entropy(out[n:], batch["y"], batch["mask"])
      return 0.5 * ((1.0 - w) * replayed + w * current)

    # Nothing to replay in the first experience: no second pass either.
    return jax.lax.cond(replaying(sstate), classifier_terms,
                        lambda: jnp.zeros((), jnp.float32))

  @functools.partial(jax.jit, static_argnums=0)
  def store(ctx, ss, params, model_state, x, y, task, n_valid):
    sp = get_split(ctx)
    f = _features(ctx, sp, params, model_state, x, task)
    ok = jnp.arange(x.shape[0]) < n_valid
    key = jax.random.fold_in(ss.key, ss.experience)
    mem, priority = buffers.class_balanced_experience_add(
        ss.memory, ss.priority, key, f, y, task, ss.experience, ok,
        num_classes=ss.seen.shape[0])
    return ss._replace(memory=mem, priority=priority,
                       seen=ss.seen | ss.current)

  def after_experience(ctx, state, experience):
    data = device_experience(experience, ctx.info.train_size)
    ss = store(ctx, state.strategy, state.params, state.model_state,
               data["x"], data["y"], data["task"],
               jnp.asarray(experience.num_train, jnp.int32))
    return state.replace(strategy=ss)

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, task_loss=task_loss,
                  loss=loss, after_experience=after_experience,
                  name="feature_replay")


def _features(ctx, split: Split, params, model_state, x, task,
              chunk: int = 500) -> jax.Array:
  """The backbone features of ``x`` in evaluation mode, in chunks, in the
  split's latent shape."""
  z = features(lambda p, ms, a, t: extract(ctx, "backbone", p, ms, a, t),
               params, model_state, x, task, chunk)
  return z.reshape((x.shape[0],) + tuple(split.latent_shape))
