"""The Strategy record: a few pure hooks with identity defaults, and chain().

A strategy is to continual learning what an ``optax.GradientTransformation``
is to optimisation: a record of pure functions whose state lives in one
pytree (``TrainState.strategy``). Every hook has an identity default, so a
method fills in only the hooks it needs, and :func:`chain` composes several
methods into one (``chain(ewc(...), replay(...))``).

Hooks (``ctx`` is the static :class:`jaxcl.state.Context`):

* ``init(ctx, key, params) -> sstate``: the strategy's state, with fixed
  shapes sized from ``ctx.info`` (so checkpoints, ``jit``, ``vmap`` and
  sharding stay stable across experiences).
* ``before_experience(ctx, state, experience) -> state``: host side, may
  call jitted code; ``state`` is a :class:`TrainState`.
* ``prepare_batch(ctx, sstate, batch, key) -> batch``: inside jit (replay
  appends fixed-shape samples with a validity mask). Appended rows come
  after the first ``ctx.info.batch_size`` incoming rows; ``mask`` is a
  per-row weight, and the task loss is ``sum(mask * ce) / max(sum(mask),
  1)``. The stream's batch holds ``x``, ``y``, ``task``, ``mask`` and
  ``index`` (int32: each incoming row's position in the experience's
  training data, -1 for padding; appended rows have none).
* ``loss(ctx, sstate, params, batch, logits) -> scalar``: added to the task
  loss (penalties, distillation). ``logits`` are the model's on ``batch``.
* ``update_grads(ctx, sstate, grads, params, batch, key) -> grads``:
  gradient surgery (GEM projection, masks). With ``grads_state`` set it
  returns ``(grads, sstate)`` instead, and that state is the one
  ``after_step`` receives: for a method whose gradient and state come out
  of one computation (La-MAML's look-ahead gives the update and the
  learned rates), so it runs once.
* ``freeze_grads(ctx, sstate, grads) -> grads`` or None: for a member
  whose ``update_grads`` only zeroes the gradient of weights it keeps
  fixed (LFL, Freezing, PackNet, progressive networks, Progress &
  Compress's knowledge base while it progresses, the prompt methods,
  latent replay's and ExStream's frozen lower part, SLCA's old head
  columns), that mask alone. In a chain, every member's ``update_grads``
  gets a ``ctx`` whose ``freeze`` applies all members' masks: a projector
  (A-GEM, GEM) projects in the subspace of the weights that move, and a
  member that adds another batch's gradient (MIR, RAR) adds it only
  there, whatever their places in the chain.
* ``scale_updates(ctx, sstate, updates) -> updates`` or None: scales the
  optimiser's update (optax's ``updates``, the step the optimiser would
  add) before it is applied, inside jit: a parameter group's learning
  rate for every optimiser, whose moment estimates still see the whole
  gradient (SLCA's slow backbone). A gradient scale is one only for plain
  SGD: Adam is invariant to it. A chain applies its members' scales left
  to right; look-ahead losses see the scaled step.
* ``project_params(ctx, sstate, params) -> params``: applied to the
  parameters right after the optimiser update, inside jit (constraints on
  the weights themselves: HAT's embedding clamp, PackNet restoring frozen
  weights that weight decay or momentum moved). ``sstate`` is the step's
  incoming strategy state.
* ``task_loss(ctx, sstate, logits, batch) -> scalar`` or None for the
  masked cross-entropy: replaces the task loss (iCaRL's sigmoid binary
  cross-entropy). At most one chain member may define it.
* ``after_step(ctx, sstate, info: StepInfo) -> sstate``: online statistics
  (SI's path integral, reservoir updates); ``info.key`` is this hook's key.
* ``after_experience(ctx, state, experience) -> state``: host side
  (Fisher, consolidation, pruning, exemplar selection). A host hook that
  loops over long compiled calls shows them with
  ``bar = ctx.progress(total, desc, unit)``, ``bar.update(1)``,
  ``bar.close()`` (SPR's fills, PackNet's retraining epochs): the run's
  reporter draws it; outside a run it is silent.
* ``predict(ctx, sstate, params, model_state, x, task) -> logits`` or None
  for the model's own logits (multi-head masking, NME, ensembles).
* ``lookahead_loss(ctx, sstate, params, batch) -> scalar`` or None: a
  penalty evaluated at the *look-ahead* parameters ``params + ΔΘ``, where
  ``ΔΘ`` is the update the optimiser would make from the gradient of the
  rest of the loss (task loss plus ``loss``), held constant (von Oswald et
  al. 2020, eq. 2: the hypernetwork's output regulariser anticipates the
  task step). Costs one extra optimiser update per step, not applied.
* ``needs_task_grads``: ask the step for the unregularised gradient too
  (costs a second backward pass; SI uses it).
* ``scenario(stream) -> stream`` or None: the training stream the method
  needs, built from the given one (Joint's single experience, Cumulative's
  growing data); the engine applies it. At most one chain member may
  define it.
* ``writes_params``: the host hooks, ``'before_experience'`` and / or
  ``'after_experience'``, that write the parameters (a reset, a new head,
  pruning, a fitted or aligned classifier). A member that keeps a copy of
  the model in its after_experience must come after an
  ``'after_experience'`` writer, so ``chain()`` refuses the other order;
  declare it for a strategy of your own that writes the weights there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Strategy", "identity", "chain", "update_grads_and_state",
           "default_predict", "predict_once_ready", "zero_grads",
           "frozen_update",
           "mark_experience", "mark_experience_start", "check_task_seen",
           "new_classes", "experience_classes", "HOOK_WRITES", "methods"]


# The host hooks a strategy may declare in ``writes_params``.
HOOK_WRITES = frozenset({"before_experience", "after_experience"})


def _init_empty(ctx, key, params):
  del ctx, key, params
  return ()


def _same_state(ctx, state, experience):
  del ctx, experience
  return state


def _same_batch(ctx, sstate, batch, key):
  del ctx, sstate, key
  return batch


def _zero_loss(ctx, sstate, params, batch, logits):
  del ctx, sstate, params, batch, logits
  return jnp.zeros((), jnp.float32)


def _same_grads(ctx, sstate, grads, params, batch, key):
  del ctx, sstate, params, batch, key
  return grads


def zero_grads(ctx, sstate, grads, params, batch, key):
  """An ``update_grads`` for methods that train nothing from the stream
  (GDumb, SLDA): zero gradients, so a plain optimiser leaves the
  parameters where they are."""
  del ctx, sstate, params, batch, key
  return jax.tree.map(jnp.zeros_like, grads)


def _same_params(ctx, sstate, params):
  del ctx, sstate
  return params


def _same_sstate(ctx, sstate, info):
  del ctx, info
  return sstate


def mark_experience(ctx, state, experience):
  """A ``before_experience`` for strategy states with an ``experience``
  field (the current experience's index; memories tag their entries with
  it)."""
  del ctx
  ss = state.strategy._replace(
      experience=jnp.asarray(experience.index, jnp.int32))
  return state.replace(strategy=ss)


def mark_experience_start(ctx, state, experience):
  """A ``before_experience`` for strategy states with the fields
  ``experience`` (the current experience's index) and ``model_state`` (the
  model state as the experience starts: memories filled at its end, and
  losses on them, use these statistics rather than ones drifting during
  training). A copy, because the compiled loop donates the state and XLA
  refuses to donate one buffer twice."""
  del ctx
  ss = state.strategy._replace(
      experience=jnp.asarray(experience.index, jnp.int32),
      model_state=jax.tree.map(jnp.copy, state.model_state))
  return state.replace(strategy=ss)


def check_task_seen(seen: Any, task: int) -> None:
  """Host side: raises unless task ``task`` was trained (``seen`` is a bool
  per task id), for strategies that keep per-task weights and are asked
  for a task's."""
  ids = np.flatnonzero(np.asarray(seen)).tolist()
  if int(task) not in ids:
    raise ValueError(f"task id {task} is outside the tasks seen so far {ids}")


def new_classes(name: str, seen: Any, experience: Any) -> np.ndarray:
  """Host side: the classes of ``experience``'s training data (sorted),
  for strategies that need each class in one experience (``seen``: a bool
  per class, the classes of finished experiences).

  Raises:
    ValueError: naming strategy ``name``, when a class comes again.
  """
  new = np.unique(np.asarray(experience.train_y))
  again = sorted(set(new[np.asarray(seen)[new]].tolist()))
  if again:
    raise ValueError(f"{name}: experience {experience.index} brings classes "
                     f"{again} again; {name} needs each class in one "
                     "experience (a split stream; blurry and "
                     "domain-incremental streams bring classes back)")
  return new


def require_single_head(name: str, params: Any, num_classes: int,
                        layers: tuple[frozenset[str], ...],
                        want: str) -> dict:
  """Host side (at ``init``), for strategies that act on the output layer's
  weights (CWR*, LUCIR, WA): ``params['head']``, once checked to hold one
  of the variable sets ``layers`` and one output per class.

  Raises:
    ValueError: naming strategy ``name`` and what it needs (``want``), when
      the model has no ``head``, another kind of head, or one head per
      task.
  """
  head = params.get("head") if isinstance(params, dict) else None
  if not isinstance(head, dict) or frozenset(head) not in layers:
    got = sorted(head) if isinstance(head, dict) else "no 'head' layer"
    raise ValueError(f"{name} needs {want}; the model's head has {got}")
  kernel = head["kernel"]
  if kernel.ndim != 2 or kernel.shape[-1] != num_classes:
    raise ValueError(
        f"{name} needs a single head over the {num_classes} classes; the "
        f"head's kernel has shape {tuple(kernel.shape)} (set "
        "model.multi_head=False)")
  return head


def experience_classes(num_classes: int, experience: Any) -> jax.Array:
  """Host side: bool ``(C,)``, the classes of ``experience``'s training
  rows (a class may have come before; :func:`new_classes` refuses that)."""
  cur = np.zeros((num_classes,), bool)
  cur[np.unique(np.asarray(experience.train_y))] = True
  return jnp.asarray(cur)


def default_predict(ctx, sstate, params, model_state, x, task):
  """The model's own logits (masked to the task in task-incremental mode)."""
  del sstate
  return ctx.logits(params, model_state, x, task, train=False)


def predict_once_ready(ready: jax.Array, scores: Callable[[], jax.Array],
                       ctx, params, model_state, x, task) -> jax.Array:
  """``scores()`` once ``ready`` (a scalar bool), else the model's own
  logits (:func:`default_predict`): for a classifier that has nothing to
  score with before its first statistics or consolidation (CWR*, FeCAM,
  RanPAC, an ensemble with no member yet).

  ``lax.cond``, not ``jnp.where``: a run computes one branch per batch, so
  the model's own forward pass, needed only before the first experience
  ends, is not paid at every evaluation batch after it. Under a seed
  ``vmap`` the condition is batched and both run, as with ``jnp.where``.
  """
  dtype = jax.eval_shape(scores).dtype
  return jax.lax.cond(
      ready, scores,
      lambda: default_predict(ctx, None, params, model_state, x,
                              task).astype(dtype))


class Strategy(NamedTuple):
  """A continual-learning strategy as a record of pure hooks.

  See the module docstring for each hook's contract. Build one with a
  factory (``jaxcl.strategies.ewc.ewc(lam=...)``) and fill only the hooks
  the method needs; the rest keep their identity defaults.
  """
  init: Callable[..., Any] = _init_empty
  before_experience: Callable[..., Any] = _same_state
  prepare_batch: Callable[..., Any] = _same_batch
  loss: Callable[..., Any] = _zero_loss
  update_grads: Callable[..., Any] = _same_grads
  project_params: Callable[..., Any] = _same_params
  task_loss: Optional[Callable[..., Any]] = None
  after_step: Callable[..., Any] = _same_sstate
  after_experience: Callable[..., Any] = _same_state
  predict: Optional[Callable[..., Any]] = None
  needs_task_grads: bool = False
  name: str = "naive"
  lookahead_loss: Optional[Callable[..., Any]] = None
  grads_state: bool = False
  freeze_grads: Optional[Callable[..., Any]] = None
  scale_updates: Optional[Callable[..., Any]] = None
  # The host hooks that write ``state.params`` (a subset of
  # HOOK_WRITES): chain() orders members around those writes (see
  # _check_composable). tests/test_hook_writes.py runs every registered
  # strategy and checks its declaration against what its hooks do.
  writes_params: frozenset = frozenset()
  # The stream the method trains on, from the one it is given (joint: one
  # experience of everything; cumulative: the data so far), or None. The
  # record carries it, so a strategy passed to jaxcl.run (alone or in a
  # chain) trains on the same data as one named in a config.
  scenario: Optional[Callable[..., Any]] = None
  # A chain's records as given to chain() (empty for a single method), so
  # an enclosing chain checks the composition over the methods themselves:
  # chain(chain(lwf, ewc), wa) is refused as chain(lwf, ewc, wa) is.
  members: tuple["Strategy", ...] = ()


def update_grads_and_state(strategy: Strategy, ctx, sstate, grads, params,
                           batch, key) -> tuple[Any, Any]:
  """``strategy.update_grads`` as ``(grads, sstate)`` whichever form it
  returns (see ``grads_state``): the state is ``sstate`` itself unless the
  hook hands back a new one."""
  out = strategy.update_grads(ctx, sstate, grads, params, batch, key)
  return out if strategy.grads_state else (out, sstate)


def frozen_update(freeze_grads: Callable[..., Any]) -> Callable[..., Any]:
  """An ``update_grads`` that applies ``freeze_grads(ctx, sstate, grads)``
  and nothing else: for a strategy whose gradient surgery is a mask
  (pass the same function as its ``freeze_grads``)."""

  def update_grads(ctx, sstate, grads, params, batch, key):
    del params, batch, key
    return freeze_grads(ctx, sstate, grads)

  return update_grads


def identity() -> Strategy:
  """Naive fine-tuning: the strategy that changes nothing."""
  return Strategy()


# Compositions that train but silently undo or drop a member's effect,
# found by running every pair of the registered strategies on Split Digits
# (session 18, and each new method since; BUILD_NOTES.md). chain() refuses
# them, saying why.
_HAT_LEAK = ("hat masks only its own gradient, softly, and leaves other "
             "tasks' embeddings unmasked, so the gradient {other} adds moves "
             "earlier tasks' units (their accuracy moved by up to 0.31)")
_GEN_ROWS = ("{first} takes the batch's last rows for its generated samples "
             "and weights every row before them as current data, so "
             "{other}'s replayed rows are mistaken for them")
_CWR_BIAS = ("{first} writes a -1e9 bias for the classes an experience lacks "
             "into the trained head, and {other} replays (or anchors) those "
             "classes against it (DER stores the -1e9 logits and matches "
             "them): nothing after the first experience is learned")
_LATENTS = ("both write the batch's replayed latents: {first}'s are "
            "replaced by {other}'s, which count twice")
_HEAD_OWNER = ("{first} freezes part of the model (LFL: the output layer; "
               "Freezing: the backbone) and restores it after every update, "
               "and {other} writes those weights outside the training step "
               "(CWR*'s consolidated weights, PackNet's retraining at each "
               "experience's end, SLCA's fresh head columns at each "
               "experience's start and its alignment at the end): each "
               "undoes the other's")
_ANCHOR = ("{other} anchors each new ensemble member to the previous "
           "member's weights, so the ensemble becomes copies of its first "
           "model")
_RESET = ("{first} restores the initial parameters and model state before "
          "every experience after the first, which overwrites what {other} "
          "keeps for earlier tasks (reserved units, owned or frozen weights, "
          "task embeddings, the backbone under per-task heads, SLCA's old "
          "head columns, or its copy of the weights, which it writes "
          "back)")
_SCR_LATENTS = ("{first} trains only through its contrastive loss on the "
                "backbone's features and sets the task loss to 0, while "
                "{other}'s latents train only the layers above its split and "
                "its freeze of the layers below stops {first}'s training")
_TASK_GRAD = ("{other} measures importance from the task loss's gradient, "
              "which {first} sets to 0 (its loss is a penalty term), so "
              "{other}'s penalty stays 0")
_ROUTED = ("{first} keeps one whole single-head model per experience and "
           "picks it by its gate, without task ids, while {other} needs a "
           "task id per experience and a model of per-task units or "
           "columns (the model check asks for model.multi_head=True, which "
           "{first} cannot use): the pair cannot be built")
_KB_MEMORY = ("{other}'s memory rows keep their stored task, which routes "
              "them through {first}'s knowledge base column (task 0 in a "
              "class-incremental stream), and {first} masks the knowledge "
              "base's gradient while it progresses: the memory's gradient "
              "(replayed, or the reference a projection needs) is 0, so "
              "{other} does nothing (session 36); chain a member that "
              "appends replayed rows before {first}, whose prepare_batch "
              "then routes them to the active column")
# Members whose update_grads replays memory rows through the model with
# their stored task (refused beside progress_compress in both orders).
_KB_REPLAYERS = ("mir", "aser", "agem", "agem_r", "gem")
_NO_TASK_GRAD = ("{other} measures importance from the task loss's "
                 "gradient, and {first}'s task loss reports the incoming "
                 "rows without one (its update_grads makes their step), so "
                 "{other}'s penalty stays 0 ({first}+{other} trained "
                 "exactly as {first}+naive)")
_INNER_FREEZE = ("{other} slows the layers below its split from the "
                 "second experience (lower_lr_scale > 0) by scaling their "
                 "gradient in update_grads, but {first}'s step is an inner "
                 "loop of SGD steps on every weight, added as one "
                 "displacement: its look-ahead moves those layers at the "
                 "full rate, and the scale, a learning rate, is not a mask "
                 "{first} can apply (frozen, lower_lr_scale=0, the mask is "
                 "declared and {first} keeps those layers fixed in every "
                 "step: allowed; before that, frozen layers moved in the "
                 "look-ahead and the new classes were not learned, "
                 "lamaml+latent_replay 0.00 on each new experience)")
_LAMAML_WEIGHTS = ("{other} weights its generated rows against the "
                   "incoming rows' share of one cross-entropy, but {first} "
                   "replaces the incoming rows' gradient by its own clipped "
                   "look-ahead step, so that balance is lost (lamaml+"
                   "generative_replay learned no new class: 0.01-0.38 on "
                   "each new experience against 0.91-0.99 alone)")
_LOOKAHEAD = ("{other}'s penalty is evaluated after the update the "
              "optimiser would make from the loss's gradient, which "
              "{first}'s task loss leaves without the incoming rows (it "
              "makes their step in update_grads): the penalty is taken at "
              "the current weights instead (lamaml+fdr 0.36-0.44 against "
              "0.90-0.94 for fdr alone)")
_SOFTMAX_FISHER = ("{other}'s importance is the Fisher of a softmax over "
                   "the model's outputs (RWalk's path scores also use the "
                   "task loss's gradient), but {first} trains those outputs "
                   "as unnormalised embeddings for its prototype loss: the "
                   "importance measures a distribution nothing predicts "
                   "with, 3-70x larger than under cross-entropy, and the "
                   "penalty diverges (cope+rwalk: NaN at rwalk's defaults; "
                   "cope+ewc lost up to 0.42)")
_SEPARATED = ("{first} scores the rows after the incoming ones over the "
              "old classes only, and a row of a current class among them "
              "over all classes; {other}'s memory is filled every step "
              "and so holds the current classes' rows ({first}'s own is "
              "filled at an experience's end): these train new against "
              "old classes, the competition its separated softmax avoids "
              "(ss_il+replay: the second experience fell to 0.00-0.33 by "
              "the end, against 0.51-0.88 for ss_il alone)")
_ADVERSARIAL_OLD = ("{other} adds a cross-entropy over all classes on "
                    "memory rows of old classes moved towards the incoming "
                    "rows' features, while {first} trains the incoming rows "
                    "over the current classes only: no new class was "
                    "predicted at the end of its experience (ss_il+rar: "
                    "0.00 on each new experience, both orders, 3 seeds, "
                    "against 0.10-0.96 for ss_il alone and with "
                    "beta_coef=0)")
_GROUP_SOFTMAX_LATENTS = (
    "{first} scores every row by a softmax within one group of classes "
    "(the incoming rows over the current classes, its exemplars over the "
    "old ones, its distillation within each old task), so only a change "
    "of the features lifts the new classes as a group above the old ones; "
    "{other} fixes the layers below its split from the second experience, "
    "and its latents' cross-entropy over all classes pushes the new "
    "classes down: no new class was predicted at the end of its experience "
    "(ss_il+latent_replay: 0.00 on each new experience, both orders, 3 "
    "seeds; +exstream the same, 2 seeds; against 0.10-0.96 for ss_il alone "
    "and 0.68-0.96 for latent_replay or exstream alone)")
_FULL_SOFTMAX_ADDED = ("{other} adds the gradient of a cross-entropy over "
                       "all classes on rows of its memory, which is filled "
                       "every step and so holds the current classes' rows, "
                       "while {first} trains the incoming rows over the "
                       "current classes only: no new class was predicted "
                       "at the end of its experience (ss_il with aser or "
                       "mir, both orders: 0.00 on each new experience, "
                       "against 0.10-0.73 for ss_il alone; session 36)")
_UNSEEN_ADDED = ("{first} scores its rows over the classes seen so far, "
                 "while {other} adds the gradient of its memory rows' "
                 "cross-entropy over all classes outside {first}'s loss: "
                 "no new class was predicted at the end of its experience "
                 "(lucir with aser, both orders: 0.00-0.01 on each new "
                 "experience, ACC 0.30-0.36 over 3 seeds against 0.45-0.53 "
                 "for lucir alone; with mir the same; session 36). Chain "
                 "replay instead, whose rows go through {first}'s loss")
_FULL_SOFTMAX_MEMORY = ("{other} keeps the memory's cross-entropy over all "
                        "classes from rising, while {first} trains the "
                        "incoming rows over the current classes only: no "
                        "new class was predicted at the end of its "
                        "experience (ss_il+gem: 0.00 on each new "
                        "experience, 3 seeds, against 0.11-0.96 for "
                        "ss_il alone)")

_HAT_GATE_SCALE = ("{other} runs the model in training mode on a model "
                   "state it stored (not the current one), so hat_mlp's "
                   "gates take that state's step counter, a gate scale "
                   "s = 1/s_max instead of {first}'s annealed s; {first}'s "
                   "embedding-gradient compensation then makes that "
                   "gradient ~1e16, and its global-norm clip scales every "
                   "other gradient to ~0: the new tasks were not learned "
                   "(hat+cscct: 0.49-0.57 on tasks 1-3 and 0.64-0.70 over "
                   "3 seeds, against 0.96-0.98 for hat alone; casper+hat "
                   "0.65-0.66)")
_REPEATED_CLASSES = ("{first} works on each experience's new classes "
                     "(CSCCT distils their features; SLCA gives them a "
                     "fresh head and statistics) and refuses classes it "
                     "has seen before at an experience's start, and "
                     "{other} brings every earlier experience's classes "
                     "again: the run would stop at the second experience, "
                     "after the first has trained")

_PROTOTYPE_REFIT = ("{first} trains the model's outputs as an embedding "
                    "and predicts by the nearest of its class prototypes, "
                    "and {other}'s buffer fitting retrains those outputs as "
                    "class logits by cross-entropy at each experience's "
                    "end, so the prototypes no longer match the embedding "
                    "(cope+puridiver, 3 seeds: 0.06-0.37 against 0.60-0.70 "
                    "for cope alone and 0.50-0.70 for puridiver alone; "
                    "0.56-0.58 with the fitting off)")
_FIT_MOVES_FROZEN = ("{first} keeps part of the model fixed or slow (LFL: "
                     "the output layer; Freezing: the backbone; latent "
                     "replay / ExStream: the layers below the latent layer, "
                     "whose stored latents depend on them; SLCA: the old "
                     "classes' head columns and the backbone it slows), and "
                     "{other}'s buffer "
                     "fitting at each experience's end trains every weight "
                     "outside the training step, that part included (moved "
                     "by 0.29-1.31 per experience in session 33's probe)")

_FRESH_MEMBER_ACE = ("{first} trains a freshly initialised model per "
                     "experience and averages the models' softmax outputs, "
                     "while {other} scores the incoming rows over the "
                     "current and unseen classes only, replays the old "
                     "ones, and undoes the first (forgetting) epoch: no new "
                     "class was predicted at the end of its experience "
                     "(ensemble+aer_abs at Adam 1e-2: 0.00-0.11 on each new "
                     "experience, accuracy 0.27-0.30, 3 seeds, against "
                     "0.57-0.68 for ensemble alone and 0.66-0.71 for "
                     "aer_abs alone)")


def _conflicts() -> dict[frozenset[str], tuple[str, str]]:
  """{unordered pair: (the member the reason is about, reason)}."""
  table: dict[frozenset[str], tuple[str, str]] = {}

  def add(first: str, others: Sequence[str], reason: str) -> None:
    for other in others:
      table.setdefault(frozenset((first, other)), (first, reason))

  add("hat", ("replay", "mir", "agem", "gem", "lwf", "ewc",
              "generative_replay", "cumulative", "der", "derpp", "er_ace",
              "gss", "er_aml", "fdr", "hal", "mer", "scr", "agem_r",
              "lamaml", "clser", "rar", "aer_abs", "aser", "ser", "er_acl",
              "gsa", "twf"),
      _HAT_LEAK)
  for first in ("generative_replay", "generative_negative_replay"):
    add(first, ("replay", "mir", "icarl", "generative_replay",
                "generative_negative_replay", "er_ace", "gss", "bic", "lucir",
                "il2m", "er_aml", "eeil", "cope", "scr", "clser", "rpc",
                "ss_il", "rar", "aer_abs", "er_acl", "gsa"),
        _GEN_ROWS)
  for first in ("cwr_star", "ar1"):
    add(first, ("replay", "mir", "gem", "mas", "generative_replay", "der",
                "derpp", "er_ace", "gss", "er_aml", "xder", "hal", "mer",
                "lamaml", "rar", "aer_abs", "aser", "ser", "er_acl", "gsa",
                "dualnet", "twf"),
        _CWR_BIAS)
  add("latent_replay", ("exstream", "ar1"), _LATENTS)
  add("exstream", ("ar1",), _LATENTS)
  add("ensemble", ("ewc", "mas", "online_ewc", "rwalk"), _ANCHOR)
  add("from_scratch", ("hat", "packnet", "progressive", "hypernetwork",
                       "multihead", "expert_gate", "slca"), _RESET)
  add("scr", ("latent_replay", "exstream"), _SCR_LATENTS)
  add("scr", ("si",), _TASK_GRAD)
  add("expert_gate", ("hat", "progressive"), _ROUTED)
  add("progress_compress", _KB_REPLAYERS, _KB_MEMORY)
  add("lamaml", ("si",), _NO_TASK_GRAD)
  # Session 30: MER has La-MAML's pattern (zero task gradient for the
  # incoming rows, its whole step added in update_grads).
  add("mer", ("si",), _NO_TASK_GRAD)
  add("mer", ("latent_replay", "exstream"), _INNER_FREEZE)
  # Session 56: DualNet has MER's pattern too.
  add("dualnet", ("si",), _NO_TASK_GRAD)
  add("dualnet", ("latent_replay", "exstream"), _INNER_FREEZE)
  add("lamaml", ("latent_replay", "exstream"), _INNER_FREEZE)
  add("lamaml", ("generative_replay", "generative_negative_replay"),
      _LAMAML_WEIGHTS)
  add("lamaml", ("fdr",), _LOOKAHEAD)
  # online_ewc by the same Fisher code as ewc (not run in the fuzz).
  add("cope", ("rwalk", "ewc", "online_ewc"), _SOFTMAX_FISHER)
  # Session 29's fuzz of clser / rpc / ss_il (docs/composition_fuzz.md).
  add("ss_il", ("replay", "gss", "hal"), _SEPARATED)
  add("ss_il", ("gem",), _FULL_SOFTMAX_MEMORY)
  # Session 30's fuzz of rar (docs/composition_fuzz.md).
  add("ss_il", ("rar",), _ADVERSARIAL_OLD)
  # Session 32: latent_replay / exstream beside ss_il (docs/
  # composition_fuzz.md).
  add("ss_il", ("latent_replay", "exstream"), _GROUP_SOFTMAX_LATENTS)
  # Session 32's fuzz of aer_abs (docs/composition_fuzz.md).
  add("ensemble", ("aer_abs",), _FRESH_MEMBER_ACE)
  # Session 33's fuzz of cscct (docs/composition_fuzz.md).
  add("hat", ("cscct", "casper"), _HAT_GATE_SCALE)
  add("cscct", ("cumulative",), _REPEATED_CLASSES)
  # Session 33: puridiver's step is replay's (memory rows appended, one
  # cross-entropy over all classes, its memory filled every step), so it
  # takes replay's refusals. Its pass ran each with the check bypassed:
  # harm confirmed beside cwr_star / ar1 (nothing learned after the first
  # experience) and ss_il (0.00 on new experiences); the generative
  # members' row-weight mechanism confirmed without accuracy harm; hat not
  # runnable (puridiver's init refuses hat_mlp).
  add("hat", ("puridiver",), _HAT_LEAK)
  for first in ("generative_replay", "generative_negative_replay"):
    add(first, ("puridiver",), _GEN_ROWS)
  for first in ("cwr_star", "ar1"):
    add(first, ("puridiver",), _CWR_BIAS)
  add("ss_il", ("puridiver",), _SEPARATED)
  # Session 33's fuzz of puridiver (docs/composition_fuzz.md).
  add("cope", ("puridiver",), _PROTOTYPE_REFIT)
  for first in ("lfl", "freezing", "latent_replay", "exstream"):
    add(first, ("puridiver",), _FIT_MOVES_FROZEN)
  add("lfl", ("cwr_star", "ar1", "packnet"), _HEAD_OWNER)
  add("freezing", ("packnet",), _HEAD_OWNER)
  # Session 36's fuzz of aser and slca (docs/composition_fuzz.md; mir by
  # the same code path as aser, measured at seed 0).
  add("ss_il", ("mir", "aser"), _FULL_SOFTMAX_ADDED)
  add("lucir", ("mir", "aser"), _UNSEEN_ADDED)
  add("lfl", ("slca",), _HEAD_OWNER)
  add("slca", ("puridiver",), _FIT_MOVES_FROZEN)
  add("slca", ("cumulative",), _REPEATED_CLASSES)
  return table


_CONFLICTS = _conflicts()
# Members that compose with nothing: what any other member does is lost.
_ALONE = {
    "gdumb": "retrains the model from scratch on its memory at the end of "
             "every experience",
    "slda": "trains no parameter (zero gradients) and predicts from class "
            "statistics of the features the model had as the stream began",
    "fecam": "freezes the whole model after the first experience (zero "
             "gradients, parameters restored after every step) and predicts "
             "from class statistics of its features",
    "fetril": "freezes the whole model after the first experience (zero "
              "gradients, parameters restored after every step) and predicts "
              "with linear SVMs fitted on its features and on translated "
              "features of past classes",
    "ranpac": "trains no parameter (zero gradients; with adapt_first none "
              "after the first experience, parameters restored after every "
              "step) and predicts from ridge statistics of randomly "
              "projected features frozen at the stream's start (or at the "
              "first experience's end)",
    "spr": "trains no parameter from the stream (zero gradients) and "
           "replaces the model at every experience's end by a classifier "
           "fitted to its purified buffer over its self-supervised network",
    "dmc": "trains a fresh model for each experience and replaces it at the "
           "experience's end by a student distilled from the old and new "
           "models alone on auxiliary data",
}
# Ordered: members that append replayed rows after SCR's prepare_batch,
# or after progress_compress's (which routes the rows it sees to the
# active column: rows appended later keep their task, 0 in a
# class-incremental stream, and go through the knowledge base, whose
# progress gradient is masked; session 36).
# Not mir: it appends no rows (its replayed gradient is added in
# update_grads, which scr's zero task loss does not stop; session 36,
# seed 0: scr+mir 0.808, mir+scr 0.824, scr alone 0.813).
# generative_replay and generative_negative_replay since session 54
# (tests/test_hook_writes.py): their generated rows carry task 0, so after
# progress_compress they went through the knowledge base and trained
# nothing.
_APPENDERS = ("replay", "gss", "der", "derpp", "er_ace", "er_aml",
              "xder", "fdr", "hal", "mer", "lamaml", "cope", "rar",
              "aer_abs", "puridiver", "ser", "generative_replay",
              "generative_negative_replay", "er_acl", "gsa", "twf")
# Not refused since session 35: packnet or progressive before a member
# whose update_grads adds gradient (agem, agem_r, gem by projection; mir,
# rar another batch's), which had put gradient back on the weights the
# freezer masked (packnet+mir moved earlier tasks' accuracy by 0.50).
# packnet and progressive declare their masks (freeze_grads), and those
# members apply the chain's (ctx.freeze) to what they add.
# Ordered, for a slowed lower part only (lower_lr_scale > 0): rar and mir
# add another batch's gradient in update_grads, after the slowing scale,
# so the lower part learns their rows at the full rate (session 30:
# latent_replay+rar moved the then-frozen backbone by 0.09-0.15; rar
# first: 0.0). Frozen (the default, 0), the lower part is restored after
# every update and its mask is declared (freeze_grads), which rar and mir
# apply to what they add, so that order is allowed since session 36.
_LOWER_FREEZERS, _ADDERS = ("latent_replay", "exstream"), ("rar", "mir",
                                                            "aser")
# Ordered: lamaml's and mer's task losses give the incoming rows no
# gradient and their update_grads adds their whole step to the gradient it
# receives, so a member before them that projects the gradient acts on the
# rest only (session 29's fuzz: agem, agem_r, gem before lamaml trained
# exactly as naive+lamaml; session 30's probe, the same for mer; session
# 56's for dualnet, whose inner steps mask with ctx.freeze too).
# Not refused since session 36: packnet or progressive before them, whose
# frozen weights moved by 0.69 / 0.37 (lamaml) and 0.61-0.93 (mer): lamaml
# and mer mask every inner step and the step they add with the chain's
# masks (ctx.freeze), which covers a frozen latent_replay or exstream too
# (a slowed one is refused beside either in both orders, _INNER_FREEZE).
_BEFORE_STEPPERS, _STEPPERS = ("agem", "agem_r", "gem"), ("lamaml", "mer",
                                                           "dualnet")
# Ordered: aer_abs copies the weights in its before_experience and restores
# the copy after each forgetting epoch; a later member's before_experience
# write (writes_params) is lost (session 32's probe: from_scratch's reset,
# ensemble's new member, expert_gate's loaded expert, multihead's new head
# all undone in aer_abs+X, kept in X+aer_abs). The other members that
# write there are refused beside aer_abs in both orders for other reasons:
# cwr_star / ar1 (_CWR_BIAS); coda_prompt, dualprompt, lucir and slca
# replace the task loss, as aer_abs does (session 35's probe, the task
# loss bypassed: coda_prompt's new component slice was undone); dmc
# composes with nothing.
_RESTORERS = ("aer_abs",)
# Ordered: a member that keeps a copy of the model, or something computed
# from it, in its after_experience (a teacher, an anchor, the previous
# solver, stored logits / latents / anchors, class statistics, a bias
# correction) misses what a later member's after_experience writes into
# the weights. Session 33: cscct's teacher differed from the final weights
# by 0.31 beside eeil's balanced fine-tuning, 0.009 beside packnet's
# pruning and progress_compress's compression; the probe of every other
# saver beside these and puridiver's buffer fitting (62 pairs) found the
# same gap, the size of the writer's write (0.20-0.70 beside puridiver),
# and 0 with the writer first. ss_il, cwr_star, ar1, scr and dmc are
# listed for completeness (refused beside each writer for other reasons).
_TEACHER_SAVERS = (
    "cscct", "lwf", "lwf_mc", "lwm", "lfl", "icarl", "lucir", "ss_il", "bic",
    "eeil", "generative_replay", "generative_negative_replay", "freezing",
    "ewc", "online_ewc", "mas", "rwalk", "fdr", "xder", "hal",
    "latent_replay", "exstream", "er_tricks", "il2m", "ensemble",
    "expert_gate", "multihead", "cwr_star", "ar1", "scr", "dmc", "slca",
    "ser", "siw",
    # Session 54's audit (tests/test_hook_writes.py: the state an
    # after_experience returns depends on the parameters it is given):
    # stored features (feature_replay), a frozen copy
    # (feature_distillation), a teacher and exemplars (wa), masks or
    # targets computed from the weights (hat, hypernetwork, packnet,
    # piggyback, supsup), the knowledge base's consolidation
    # (progress_compress), class statistics (fecam, fetril; alone anyway).
    # Of these, feature_replay, feature_distillation, hat, wa, packnet,
    # hypernetwork and supsup were accepted before some writer.
    "feature_replay", "feature_distillation", "wa", "hat", "hypernetwork",
    "packnet", "piggyback", "supsup", "progress_compress", "fecam",
    "fetril",
    # Session 56: the memory's logits, saved at an experience's end.
    "dualnet")
# Not a saver though its after_experience reads the weights: si. Its
# importance divides the path integral, summed over the training steps,
# by the displacement over those steps (the weights before a later
# writer's write are the path's end), and its anchor is taken in
# before_experience, after any write.
_READS_BUT_IMMUNE = ("si",)
# The writers are the members declaring 'after_experience' in
# writes_params (until session 54 a hand-kept list, which missed wa until
# session 53's sweep and slca until session 54's audit of every
# strategy's hooks: lwf+slca's teacher differed from the final weights by
# 2.3-5.4, SLCA's aligned classifier).
# Not refused since session 35: a projector beside a member that zeroes
# part of the gradient and restores those weights (lfl, freezing, l2p,
# coda_prompt, dualprompt). Projected over every weight, the projector's
# constraint failed in both orders (projector after: lfl+agem_r conflicted
# on 93 % of steps, l2p+agem trained as l2p alone; projector first: an
# over-projection, 3-12 % of steps conflicting for lfl, 10-23 % for the
# prompt methods). Those members now declare the mask (freeze_grads) and
# chain() hands it to every member as ctx.freeze, so agem, agem_r and gem
# project in the subspace of the weights that move (0 % in the probes).


def _check_composable(names: Sequence[str],
                      masks: Collection[str] = (),
                      start_writers: Collection[str] = (),
                      end_writers: Collection[str] = ()) -> None:
  """Refuses the compositions known to be silently wrong (see above).

  ``masks``: the names of members that declare ``freeze_grads``;
  ``start_writers`` / ``end_writers``: of those whose ``before_experience``
  / ``after_experience`` write the parameters (``writes_params``)."""
  from jaxcl import strategies  # late: it imports this module
  registered = set(strategies.available()) - {"naive"}  # a default name
  # First: what a member that composes with nothing would discard is the
  # reason, not an ordering rule between two members it discards.
  for alone, reason in _ALONE.items():
    others = [n for n in names if n not in (alone, "naive")]
    if alone in names and others:
      raise ValueError(f"chain(): {alone} {reason}, which discards what "
                       f"{others} did")
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      if a == b and a in registered:
        raise ValueError(
            f"chain(): {a!r} appears twice; its hooks would act twice on "
            "one model (hat+hat broke HAT's masks). Give one member the "
            "arguments you want")
      if a == "scr" and b in _APPENDERS:
        raise ValueError(
            f"chain(): scr and {b} cannot be composed in this order: scr's "
            f"contrastive loss takes only the rows present when its "
            f"prepare_batch runs and the task loss is 0, so the rows {b} "
            f"appends after it train nothing; put {b} before scr")
      if b == "gsa" and a in _APPENDERS:
        raise ValueError(
            f"chain(): {a} and gsa cannot be composed in this order: gsa's "
            f"task loss reads its own rows (the current experience's draw, "
            f"the earlier experiences' draw and their mirrored copies) "
            f"right after the incoming ones, where {a}'s rows would be; "
            f"put gsa first (rows appended after it count in its mixed "
            f"term)")
      if a == "progress_compress" and b in _APPENDERS:
        raise ValueError(
            f"chain(): progress_compress and {b} cannot be composed in "
            f"this order: progress_compress's prepare_batch routes the "
            f"rows present to the active column (their task input), and "
            f"the rows {b} appends after it keep their stored task, "
            f"which routes them through the knowledge base, whose "
            f"gradient progress_compress masks while it progresses, so "
            f"they train nothing (session 36); put {b} before "
            f"progress_compress")
      if a in _LOWER_FREEZERS and a not in masks and b in _ADDERS:
        raise ValueError(
            f"chain(): {a} and {b} cannot be composed in this order: {a} "
            f"slows the layers below its split (lower_lr_scale > 0) by "
            f"scaling the gradient, and {b}, after it, adds its own rows' "
            f"gradient at the full rate; put {b} before {a}, whose scale "
            f"then applies last, or freeze the lower part "
            f"(lower_lr_scale=0), whose mask {b} applies to what it adds")
      if a in _BEFORE_STEPPERS and b in _STEPPERS:
        raise ValueError(
            f"chain(): {a} and {b} cannot be composed in this order: "
            f"{b}'s task loss gives the incoming rows no gradient and "
            f"its update_grads adds its whole step afterwards, so {a}'s "
            f"update_grads never sees that step ({a}+{b} trained exactly "
            f"as naive+{b}, or moved frozen weights); put {b} before {a}")
      first, reason = _CONFLICTS.get(frozenset((a, b)), (None, None))
      # A frozen split declares its mask, which lamaml and mer apply.
      if reason is _INNER_FREEZE and {a, b} - {first} <= set(masks):
        reason = None
      if reason is not None:
        other = b if first == a else a
        if reason is _LATENTS:  # the later member's latents win
          first, other = a, b
        raise ValueError(f"chain(): {a} and {b} cannot be composed: "
                         + reason.format(first=first, other=other))
      # After the pairwise reasons: a pair refused for one of those (lfl
      # before packnet) is refused for that, the more harmful, reason.
      if a in _RESTORERS and b in start_writers and a != b:
        raise ValueError(
            f"chain(): {a} and {b} cannot be composed in this order: {a} "
            f"copies the weights in its before_experience and restores "
            f"that copy at the end of each forgetting epoch, so what {b}'s "
            f"before_experience, running after it, writes into the weights "
            f"(a reset, a loaded expert, a new model or head) is undone "
            f"after one epoch (session 32: the restored weights differed "
            f"from {b}'s by up to 0.01-0.58 and equalled the previous "
            f"experience's); put {b} before {a}, whose copy then holds "
            f"{b}'s weights")
      if a in _TEACHER_SAVERS and b in end_writers and a != b:
        raise ValueError(
            f"chain(): {a} and {b} cannot be composed in this order: {a} "
            f"keeps a copy of the model, or what it computes from it (a "
            f"teacher, an anchor, stored logits, latents or statistics), "
            f"in its after_experience, and {b}'s after_experience, running "
            f"after it, then writes the weights (session 33: the copy "
            f"differed from the final weights by 0.009-0.70), so {a} works "
            f"from a model the experience did not end with; put {b} before "
            f"{a}")


def methods(*strategies: Strategy) -> list[Strategy]:
  """The single methods the records hold, in order: a chain's members,
  nested chains opened; any other record itself."""
  return [m for s in strategies
          for m in (methods(*s.members) if s.members else [s])]


def chain(*strategies: Strategy) -> Strategy:
  """Composes strategies into one.

  The state is a tuple of the members' states, in order. Losses add up;
  ``prepare_batch`` and ``update_grads`` apply left to right;
  ``prepare_batch`` runs before any gradient, so ``chain(gem(...),
  replay(...))`` projects the replayed batch's gradient as
  ``chain(replay(...), gem(...))`` does. Each ``after_step`` and
  experience hook updates its own slot; ``project_params`` applies left to
  right, as do ``scale_updates``; look-ahead losses add up (all at the
  same ``ΔΘ``). At most one
  member may define ``predict``, and at most one ``task_loss``.

  Compositions known to train while silently undoing or dropping a
  member's effect are refused (e.g. ``hat`` with a replaying member,
  a slowed ``latent_replay`` before ``rar``, ``gdumb`` or ``slda`` with
  anything), as is a strategy named twice. A member may itself be a
  chain: the checks look through it to the methods it holds.

  Raises:
    ValueError: if two members define ``predict`` (or ``task_loss``), an
      argument is not a Strategy, or the composition is one of those.
  """
  for s in strategies:
    if not isinstance(s, Strategy):
      raise ValueError(f"chain() takes Strategy records; got {type(s)}")
  # First: a registered strategy named twice is a clearer message than the
  # two-predictors one it would also trigger (supsup+supsup). Over the
  # methods inside any nested chain: before session 54 the check saw
  # chain(lwf, ewc) as one member named 'lwf+ewc', so a nested chain
  # passed every refusal (chain(chain(replay, ewc), replay) trained).
  held = methods(*strategies)
  for s in held:
    if not (isinstance(s.writes_params, frozenset)
            and s.writes_params <= HOOK_WRITES):
      raise ValueError(
          f"chain(): {s.name}'s writes_params must be a frozenset of "
          f"{sorted(HOOK_WRITES)}, got {s.writes_params!r}")
  _check_composable(
      [s.name for s in held],
      {s.name for s in held if s.freeze_grads is not None},
      {s.name for s in held if "before_experience" in s.writes_params},
      {s.name for s in held if "after_experience" in s.writes_params})
  predictors = [s for s in strategies if s.predict is not None]
  if len(predictors) > 1:
    raise ValueError(
        "chain(): more than one strategy defines predict: "
        f"{[s.name for s in predictors]}; compose their predictions yourself")
  task_losses = [s for s in strategies if s.task_loss is not None]
  if len(task_losses) > 1:
    raise ValueError(
        "chain(): more than one strategy replaces the task loss: "
        f"{[s.name for s in task_losses]}")
  recutters = [s for s in strategies if s.scenario is not None]
  if len(recutters) > 1:
    raise ValueError(
        "chain(): at most one member may change the training data (joint, "
        f"cumulative), got {[s.name for s in recutters]}")
  n = len(strategies)

  def check(sstate):
    if not isinstance(sstate, tuple) or len(sstate) != n:
      raise ValueError(
          f"chain of {n} strategies got a state of the wrong structure; "
          "call init first")

  def init(ctx, key, params):
    keys = jax.random.split(key, max(n, 1))
    return tuple(s.init(ctx, k, params) for s, k in zip(strategies, keys))

  def on_experience(hook_name):

    def hook(ctx, state, experience):
      check(state.strategy)
      subs = list(state.strategy)
      for i, s in enumerate(strategies):
        sub = state.replace(strategy=subs[i])
        sub = getattr(s, hook_name)(ctx, sub, experience)
        subs[i] = sub.strategy
        state = sub.replace(strategy=tuple(subs))
      return state

    return hook

  def prepare_batch(ctx, sstate, batch, key):
    check(sstate)
    keys = jax.random.split(key, max(n, 1))
    for s, ss, k in zip(strategies, sstate, keys):
      batch = s.prepare_batch(ctx, ss, batch, k)
    return batch

  def loss(ctx, sstate, params, batch, logits):
    check(sstate)
    total = jnp.zeros((), jnp.float32)
    for s, ss in zip(strategies, sstate):
      total = total + s.loss(ctx, ss, params, batch, logits)
    return total

  grads_state = any(s.grads_state for s in strategies)
  freezers = [(i, s) for i, s in enumerate(strategies)
              if s.freeze_grads is not None]
  freeze_grads = None
  if freezers:

    def freeze_grads(ctx, sstate, grads):
      for i, s in freezers:
        grads = s.freeze_grads(ctx, sstate[i], grads)
      return grads

  def update_grads(ctx, sstate, grads, params, batch, key):
    check(sstate)
    if freezers:
      # Every member sees the whole chain's mask (an enclosing chain's
      # too): a projector then projects over the weights that move.
      base = ctx
      ctx = dataclasses.replace(
          base, freeze=lambda g: freeze_grads(base, sstate,
                                              base.freeze(g)))
    keys = jax.random.split(key, max(n, 1))
    subs = []
    for s, ss, k in zip(strategies, sstate, keys):
      grads, ss = update_grads_and_state(s, ctx, ss, grads, params, batch,
                                         k)
      subs.append(ss)
    return (grads, tuple(subs)) if grads_state else grads

  scalers = [(i, s) for i, s in enumerate(strategies)
             if s.scale_updates is not None]
  scale_updates = None
  if scalers:

    def scale_updates(ctx, sstate, updates):
      check(sstate)
      for i, s in scalers:
        updates = s.scale_updates(ctx, sstate[i], updates)
      return updates

  def project_params(ctx, sstate, params):
    check(sstate)
    for s, ss in zip(strategies, sstate):
      params = s.project_params(ctx, ss, params)
    return params

  task_loss = None
  if task_losses:
    t_idx = strategies.index(task_losses[0])

    def task_loss(ctx, sstate, logits, batch):
      check(sstate)
      return task_losses[0].task_loss(ctx, sstate[t_idx], logits, batch)

  def after_step(ctx, sstate, info):
    check(sstate)
    # Each member its own key, as in prepare_batch and update_grads: two
    # stochastic members would otherwise draw correlated numbers.
    keys = (jax.random.split(info.key, max(n, 1)) if info.key is not None
            else [None] * n)
    return tuple(s.after_step(ctx, ss, info._replace(key=k))
                 for s, ss, k in zip(strategies, sstate, keys))

  lookers = [(i, s) for i, s in enumerate(strategies)
             if s.lookahead_loss is not None]
  lookahead_loss = None
  if lookers:

    def lookahead_loss(ctx, sstate, params, batch):
      check(sstate)
      return sum(s.lookahead_loss(ctx, sstate[i], params, batch)
                 for i, s in lookers)

  predict = None
  if predictors:
    idx = strategies.index(predictors[0])

    def predict(ctx, sstate, params, model_state, x, task):
      check(sstate)
      return predictors[0].predict(ctx, sstate[idx], params, model_state, x,
                                   task)

  return Strategy(
      init=init,
      before_experience=on_experience("before_experience"),
      prepare_batch=prepare_batch,
      loss=loss,
      update_grads=update_grads,
      project_params=project_params,
      task_loss=task_loss,
      after_step=after_step,
      after_experience=on_experience("after_experience"),
      predict=predict,
      needs_task_grads=any(s.needs_task_grads for s in strategies),
      name="+".join(s.name for s in strategies) or "naive",
      lookahead_loss=lookahead_loss,
      grads_state=grads_state,
      freeze_grads=freeze_grads,
      scale_updates=scale_updates,
      writes_params=frozenset().union(
          *(s.writes_params for s in strategies)),
      scenario=recutters[0].scenario if recutters else None,
      members=tuple(strategies),
  )
