"""DMC: deep model consolidation on unlabelled auxiliary data.

Zhang et al. (2020) keep no exemplar. Each new experience is learned by a
*new* model, trained from scratch on the new classes alone (a specialist
that cannot forget, having nothing to remember). Then the previous
(consolidated) model, expert on the old classes, and the new specialist
are distilled into a fresh *student* over all classes, on unlabelled
auxiliary data that stands in for both tasks' data. The student regresses
the two teachers' logits, each normalised by its own mean over its classes
(eq. 3-4, the "double distillation loss"):

.. math::
   \\hat y_j = \\begin{cases}
       y^{old}_j - \\frac{1}{s}\\sum_{k \\le s} y^{old}_k & j \\le s \\\\
       y^{new}_j - \\frac{1}{t}\\sum_{k > s} y^{new}_k & s < j \\le s + t
     \\end{cases}, \\qquad
   L_{dd} = \\frac{1}{s + t} \\sum_{j=1}^{s+t} (y_j - \\hat y_j)^2,

with ``s`` old and ``t`` new classes and ``y`` the student's logits. The
student becomes the model that predicts, and the next experience's old
model. The first experience is plain training.

In jaxcl the stream trains the new specialist: ``before_experience``
(from the second experience on) puts freshly initialised parameters and
optimiser state in the training state, and the task loss is the
cross-entropy over the experience's classes; ``after_experience`` runs the
consolidation as one jitted program (:func:`consolidate`, SGD with
momentum over epochs of the auxiliary rows) and installs the student.

The auxiliary data: ``aux_dataset`` (a :func:`jaxcl.datasets.load` name,
read once from ``aux_data_dir`` or ``$JAXCL_DATA_DIR``; its training
images, labels unused), e.g. Fashion-MNIST for MNIST streams, as the
paper uses ImageNet32 for CIFAR-100. Its images must have the stream's
shape; they are loaded as pixels in [0, 1] and standardised as the
stream's inputs are when ``dataset.normalize`` is set.

Implementation notes, against FACIL's ``dmc.py`` (Masana et al. 2022):
FACIL centres the concatenated targets over the *batch* (``targets -=
targets.mean(0)``); here each teacher's logits are centred over its own
classes, as eq. 4. FACIL's student starts from the same re-initialised
weights as the new model; here from its own random initialisation (the
paper: a fresh model). The consolidation's schedule is
``consolidate_epochs`` at a constant ``consolidate_lr`` (FACIL: its main
schedule, 160 epochs with plateau decay). With ``train.augment`` the
auxiliary batches are augmented and the teachers' targets computed per
batch on the augmented images (FACIL's auxiliary loader applies the
training transform, its targets come from each batch); without it the
targets are computed once.

References:
  Zhang, Zhang, Ghosh, Li, Tasci, Heck, Zhang & Kuo, `Class-incremental
  learning via deep model consolidation
  <https://arxiv.org/abs/1903.07864>`_, WACV 2020.
  Masana et al., `Class-incremental learning: survey and performance
  evaluation on image classification
  <https://arxiv.org/abs/2010.15277>`_, TPAMI 2022 (FACIL).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl import checks, datasets
from jaxcl.augment import pixel_maps
from jaxcl.state import cross_entropy_over
from jaxcl.strategies._class_incremental import (
    mark_new_classes, predict_seen, require_class_stream)
from jaxcl.strategies._epochs import over_epochs
from jaxcl.strategies.icarl import features
from jaxcl.strategy import Strategy
from jaxcl.train import init_variables

__all__ = ["DMCState", "dmc", "consolidation_targets", "consolidate"]


class DMCState(NamedTuple):
  old: Any                # the consolidated model (params)
  old_model_state: Any
  seen: jax.Array         # bool (C,): classes of finished experiences
  current: jax.Array      # bool (C,): classes of the current experience
  key: jax.Array          # PRNG key (new models, students, aux order)


def consolidation_targets(old_logits: jax.Array, new_logits: jax.Array,
                          old: jax.Array, new: jax.Array) -> jax.Array:
  """Eq. 4: ``(N, C)`` targets, the old model's logits centred over the
  ``old`` classes and the new model's over the ``new`` ones (0 elsewhere).
  """
  def centred(z, group):
    z = z.astype(jnp.float32)
    mean = jnp.sum(jnp.where(group, z, 0.0), -1, keepdims=True) / \
        jnp.maximum(jnp.sum(group), 1)
    return jnp.where(group, z - mean, 0.0)

  return centred(old_logits, old) + centred(new_logits, new)


def consolidate(ctx, key: jax.Array, targets: jax.Array | Callable,
                active: jax.Array, aux_x: jax.Array, *, epochs: int,
                batch_size: int, learning_rate: float,
                momentum: float) -> tuple[Any, Any]:
  """A fresh student trained on ``aux_x`` to regress ``targets`` (eq. 3:
  the mean squared error over the ``active`` classes): ``(params,
  model_state)``. ``targets``: ``(N, C)``, one row per auxiliary image,
  or a function of a batch of images giving theirs; with
  ``train.augment`` the batches are augmented (as FACIL's auxiliary
  loader transforms them) and ``targets`` must be the function, so that
  the targets are those of the images the student sees."""
  k_init, k_fit = jax.random.split(key)
  params, model_state = init_variables(ctx, k_init)
  task = jnp.zeros((aux_x.shape[0],), jnp.int32)
  tx = optax.sgd(learning_rate, momentum=momentum or None)
  width = jnp.maximum(jnp.sum(active), 1)

  if ctx.augment is not None and not callable(targets):
    raise ValueError("dmc consolidate: with train.augment the targets must "
                     "be a function of the augmented batch, not rows "
                     "computed on the images as they are")

  def step(carry, idx, ok, k, *_):
    p, ms, opt = carry
    x = ctx.augmented(k, aux_x[idx])
    tgt = targets(x) if callable(targets) else targets[idx]

    def loss_fn(p):
      out, ms2 = ctx.apply(p, ms, x, task[idx], train=True, mask=ok)
      sq = jnp.where(active, out.astype(jnp.float32) - tgt, 0.0)
      per = jnp.sum(sq * sq, -1) / width
      w = ok.astype(jnp.float32)
      return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0), ms2

    (_, ms2), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), ms2, opt

  valid = jnp.ones((aux_x.shape[0],), bool)
  params, model_state, _ = over_epochs(
      k_fit, valid, (params, model_state, tx.init(params)), epochs=epochs,
      batch_size=batch_size, step=step)
  return params, model_state


def dmc(aux_dataset: str = "fashion_mnist", aux_data_dir: str = "",
        aux_size: int = 10000, consolidate_epochs: int = 10,
        consolidate_lr: float = 0.01, consolidate_batch_size: int = 128,
        momentum: float = 0.9) -> Strategy:
  """Deep model consolidation (class-incremental streams).

  Args:
    aux_dataset: the auxiliary data set (a :func:`jaxcl.datasets.load`
      name; its training images, unlabelled).
    aux_data_dir: where to read it ("" for ``$JAXCL_DATA_DIR``, then
      tensorflow_datasets; a run built from a config passes its
      ``dataset.data_dir``).
    aux_size: auxiliary images used (the first ones of a fixed random
      order; 0: all).
    consolidate_epochs, consolidate_lr, consolidate_batch_size, momentum:
      the student's training (SGD with momentum).

  Raises:
    ValueError: on a bad argument; at ``init``, on a stream that is not
    class-incremental or auxiliary images of another shape; at an
    experience's start, on classes that came in an earlier one.
    jaxcl.datasets.DataError: an unknown or unreadable ``aux_dataset``.
  """
  try:
    datasets.check_name(aux_dataset)
  except datasets.DataError as e:
    raise ValueError(f"dmc: aux_dataset: {e}") from None
  checks.whole("dmc: aux_size", aux_size, note="0: all")
  checks.whole("dmc: consolidate_epochs", consolidate_epochs, minimum=1)
  checks.positive("dmc: consolidate_lr", consolidate_lr)
  checks.whole("dmc: consolidate_batch_size", consolidate_batch_size,
               minimum=1)
  checks.fraction("dmc: momentum", momentum)
  aux = {}

  def aux_images(ctx) -> jax.Array:
    # Read once per strategy; a device array passed to the jitted
    # consolidation (never a constant of the program, never in the state).
    if "x" not in aux:
      data = datasets.load(aux_dataset, data_dir=aux_data_dir or None)
      x = np.asarray(data.train_x, np.float32)
      order = np.random.default_rng(0).permutation(x.shape[0])
      aux["x"] = jnp.asarray(x[order[:aux_size or None]])
    if aux["x"].shape[1:] != tuple(ctx.info.input_shape):
      raise ValueError(
          f"dmc: the auxiliary images of {aux_dataset!r} have shape "
          f"{aux['x'].shape[1:]}, the stream's {tuple(ctx.info.input_shape)};"
          " pick an aux_dataset of the stream's image size")
    # Standardised as the stream's inputs are (dataset.normalize), once
    # per standardisation.
    if ctx.normalize not in aux:
      _, to_inputs = pixel_maps(ctx.normalize, ctx.info.input_shape, "dmc")
      aux[ctx.normalize] = to_inputs(aux["x"])
    return aux[ctx.normalize]

  def init(ctx, key, params):
    info = ctx.info
    require_class_stream("dmc", info, "consolidates the old and new classes")
    aux_images(ctx)
    _, variables = init_variables(ctx, jax.random.fold_in(key, 1))
    c = info.num_classes
    return DMCState(jax.tree.map(jnp.copy, params), variables,
                    jnp.zeros((c,), bool), jnp.zeros((c,), bool), key)

  def before_experience(ctx, state, experience):
    state = mark_new_classes("dmc")(ctx, state, experience)
    ss = state.strategy
    if experience.index == 0:
      return state
    # The new specialist: a fresh model and optimiser state.
    params, model_state = init_variables(
        ctx, jax.random.fold_in(ss.key, 2 * experience.index))
    return state.replace(params=params, model_state=model_state,
                         opt_state=ctx.tx.init(params), strategy=ss)

  def task_loss(ctx, sstate, logits, batch):
    del ctx
    return cross_entropy_over(logits, batch["y"], batch["mask"],
                              sstate.current)

  @functools.partial(jax.jit, static_argnums=0)
  def student(ctx, ss, params, model_state, aux_x, key):
    logit_fn = lambda p, ms, x, t: ctx.logits(p, ms, x, t)

    def targets_of(run, x):
      # ``run``: logit_fn for a batch, or over all rows in batches.
      t = jnp.zeros((x.shape[0],), jnp.int32)
      return consolidation_targets(run(ss.old, ss.old_model_state, x, t),
                                   run(params, model_state, x, t),
                                   ss.seen, ss.current)

    # The teachers' targets once, or per batch on the augmented images.
    targets = (targets_of(lambda p, ms, x, t: features(logit_fn, p, ms, x, t),
                          aux_x) if ctx.augment is None
               else functools.partial(targets_of, logit_fn))
    return consolidate(ctx, key, targets, ss.seen | ss.current, aux_x,
                       epochs=consolidate_epochs,
                       batch_size=consolidate_batch_size,
                       learning_rate=consolidate_lr, momentum=momentum)

  def after_experience(ctx, state, experience):
    ss = state.strategy
    params, model_state = state.params, state.model_state
    if experience.index > 0:
      params, model_state = student(
          ctx, ss, params, model_state, aux_images(ctx),
          jax.random.fold_in(ss.key, 2 * experience.index + 1))
      state = state.replace(params=params, model_state=model_state,
                            opt_state=ctx.tx.init(params))
    copy = lambda t: jax.tree.map(jnp.copy, t)  # no aliased (donated) buffers
    ss = ss._replace(old=copy(params), old_model_state=copy(model_state),
                     seen=ss.seen | ss.current,
                     current=jnp.zeros_like(ss.current))
    return state.replace(strategy=ss)

  return Strategy(init=init, before_experience=before_experience,
                  task_loss=task_loss, after_experience=after_experience,
                  predict=predict_seen, name="dmc",
                  writes_params=frozenset({"before_experience",
                                           "after_experience"}))
