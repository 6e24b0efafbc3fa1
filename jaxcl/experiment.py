"""Build a run from an ml_collections config and stream it.

``run(config, workdir)`` is what ``jaxcl run`` calls: it loads the data,
builds the scenario, model, optimiser and strategy by name, and trains the
stream experience by experience, evaluating all test sets after each one.
Side effects (files, progress bars) go through :mod:`jaxcl.report` and
:mod:`jaxcl.checkpoint`; the training math is in :mod:`jaxcl.train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcl import (augment, checks, datasets, metrics, models, plateau,
                   scenarios, strategies)
from jaxcl.metrics import Curve
from jaxcl.scenarios import Experience, Scenario, ScenarioError
from jaxcl.state import TrainState
from jaxcl.strategy import methods
from jaxcl.train import (ConfigError, Learner, NonFiniteLossError,
                         device_experience, init_state, make_context,
                         make_learner, make_optimizer, reset_opt_state,
                         set_learning_rate, stacked_experiences,
                         stacked_test_arrays,
                         steps_per_epoch, stream_info, test_arrays, unalias)

__all__ = ["default_config", "load_data", "build_scenario", "Setup", "setup",
           "run", "execute", "initial_state", "check_same_stream", "Result",
           "SCENARIO_TYPES", "check_workdir", "build_strategy",
           "build_optimizer", "strategy_kwargs", "describe", "run_mesh",
           "map_runs"]

SCENARIO_TYPES = ("split", "blurry", "permuted", "rotated")


def default_config() -> ml_collections.ConfigDict:
  """The default experiment: Split Digits (scikit-learn, no download),
  class-incremental, 5 x 2 classes, MLP 2x400, Naive."""
  c = ml_collections.ConfigDict()
  c.name = "split_digits_naive"
  c.seed = 0
  c.dataset = ml_collections.ConfigDict(dict(
      name="digits",
      data_dir="",        # IDX directory (mnist, fashion_mnist) or tfds dir
      train_subset=0,     # >0: random subset of the training set (quick runs)
      test_subset=0,
      validation=0.0,     # >0: hold out this fraction of the training set
                          # (stratified, the same examples for every seed)
                          # and evaluate on it instead of the test set
      normalize=(),       # (mean, std): inputs as (x - mean) / std, e.g.
                          # MNIST's (0.1307, 0.3081), or per channel
                          # ((m_r, m_g, m_b), (s_r, s_g, s_b));
                          # (): pixels in [0, 1]
      label_noise=0.0,    # in [0, 1): this fraction of each class's
                          # training labels made wrong (test and validation
                          # labels stay clean; datasets.noisy_labels)
      label_noise_type="symmetric",  # symmetric (a uniform other class) |
                                     # asymmetric (mnist, digits, cifar10:
                                     # datasets.ASYMMETRIC_FLIPS)
      label_noise_seed=0,  # the noise's own seed, not the run's: every seed
                           # of a sweep trains on the same noisy labels
  ))
  c.scenario = ml_collections.ConfigDict(dict(
      type="split",       # split | blurry | permuted | rotated
      kind="class",       # class | task | domain
      n_experiences=5,
      class_order=(),     # () for 0..C-1 (or order_seed's permutation)
      order_seed=-1,      # >=0: a seeded random class order
      first_classes=0,    # split: >0 classes in the first experience,
                          # the rest shared equally by the others ("B50
                          # Inc10": 50 and n_experiences=6 on CIFAR-100)
      disjoint=0.5,       # blurry: the fraction of classes seen in one
                          # experience only (i-Blurry's N)
      blurred=0.1,        # blurry: the fraction of the other classes'
                          # training examples dealt out over all
                          # experiences (i-Blurry's M)
      online=False,       # one pass (set train.epochs=1, small batch)
      angles=(),          # rotated: explicit angles in degrees (ccw)
      interpolation="bilinear",  # rotated: bilinear | nearest (torchvision)
      seed=0,             # permutations / angles / blurry's dealt examples
      first_identity=False,  # permuted: first experience unpermuted
      pad=0,              # permuted: zero pixels per side before permuting
  ))
  c.model = ml_collections.ConfigDict(dict(
      name="mlp",
      widths=(400, 400),  # mlp
      channels=(32, 64),  # cnn
      hidden=128,         # cnn
      width=20,           # resnet18
      shortcut="conv",    # resnet32: conv (1x1 conv + BN: FACIL) | pad
                          # (zero channels: He et al.'s option A, PyCIL)
      last_relu=True,     # resnet18 / resnet32: False drops the last
                          # block's ReLU (LUCIR's and iCaRL's code)
      multi_head=False,   # one head per task (task-incremental)
      init="lecun_normal",  # lecun_normal (flax) | torch (PyTorch Linear:
                            # U(+-1/sqrt(fan_in)) weights and biases) | ...
      head="linear",      # mlp / cnn / resnet18 / resnet32: linear |
                          # cosine (LUCIR)
      outputs=0,          # the head's width; 0: the stream's classes. Other
                          # widths are an embedding, for a strategy that
                          # replaces task loss and prediction (cope, scr)
      pretrained="",      # .npz of params (jaxcl.pretrained.save): start
                          # from them instead of a random initialisation
      # float32 | bfloat16: the dtype the model computes in
      # (mixed precision: parameters, optimiser and losses stay float32)
      compute_dtype="float32",
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.0,
      schedule="constant",  # constant | cosine | linear | multistep |
                            # plateau (FACIL's: jaxcl.plateau)
      milestones=(),      # multistep: epochs where the rate is x gamma
      gamma=0.1,          # multistep's factor (Mammoth's CIFAR: 35, 45)
      patience=5,         # plateau: epochs without a better held-out loss
                          # before the rate is divided by lr_factor
      lr_factor=3.0,      # plateau: the rate's divisor
      lr_min=1e-4,        # plateau: stop the experience below this rate
      holdout=0.1,        # plateau: the fraction of each experience's
                          # training examples held out (not trained on)
      clip_norm=0.0))  # > 0: clip the gradient's global L2 norm to it
  c.train = ml_collections.ConfigDict(dict(
      epochs=2, batch_size=32, eval_batch_size=500, reset_optimizer=True,
      # >0: continual evaluation (De Lange et al. 2023): also evaluate every
      # test set every N steps of each epoch and at each epoch's end, for
      # the accuracy curve and its metrics (min_acc, wc_acc, anytime_acc;
      # a_auc on class-incremental streams)
      eval_every_steps=0,
      # the confusion matrix over the test sets at each experience's end
      # (confusion.npz / .png, metric recency_bias; kept in checkpoints:
      # num_classes^2 int32s per experience)
      confusion=True,
      # training augmentation of every step's batch (incoming and replayed
      # rows; memories keep the rows as they came): names from
      # jaxcl.augment.OPS, e.g. ('pad_crop', 'flip'), the CIFAR protocols'
      # RandomCrop(32, padding=4) + RandomHorizontalFlip; () for none
      augment=(),
      crop_padding=4))  # pad_crop's zero padding in pixels
  # strategy.name: a name or names joined by '+'; strategy.<name>: kwargs.
  c.strategy = ml_collections.ConfigDict(dict(name="naive"))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=0,      # >0: also save every N steps inside experiences
      keep=3,             # checkpoints kept
  ))
  c.report = ml_collections.ConfigDict(dict(tensorboard=True, plots=True,
                                            progress=True))
  c.parallel = ml_collections.ConfigDict(dict(
      devices=1,          # data-parallel devices; 0 = all local devices
      # State leaves at least this big whose leading axis divides by the
      # device count (buffers, stacked slots) are sharded, not replicated.
      shard_min_bytes=1 << 20,
  ))
  return c


# --------------------------------------------------------------------------
# Building blocks from the config.


def load_data(config: ml_collections.ConfigDict) -> datasets.Dataset:
  """The configured data set: its seeded subset, if one is asked for,
  with ``dataset.validation > 0`` a held-out part of the training set in the
  test set's place (:meth:`jaxcl.datasets.Dataset.validation`), with
  ``dataset.label_noise > 0`` noisy training labels
  (:meth:`jaxcl.datasets.Dataset.with_label_noise`), and with
  ``dataset.normalize`` its inputs standardised.

  Label noise follows Mammoth's ``store_masked_loaders``: it is added after
  the validation split (validation labels, like test labels, stay clean,
  so they measure what was meant to be learnt) and before the stream is
  split by labels, so a class-split stream places an example in the
  experience of its *noisy* label, and every experience's labels stay
  within its own classes. It is seeded by ``dataset.label_noise_seed``, not
  the run's seed: a sweep's runs share one data set (and one program), and
  methods and seeds are compared on the same corrupted labels; vary
  ``label_noise_seed`` to sample the noise itself. The true labels are the
  returned data set's ``train_y_true``."""
  # numpy's generators (subsets, permutations, angles) refuse negative
  # seeds, and only once data is being built.
  checks.whole("seed", config.seed, 0)
  dc = config.dataset
  validation = dc.get("validation", 0.0)
  if validation and dc.test_subset:
    raise ConfigError(
        f"dataset.test_subset={dc.test_subset} with dataset.validation="
        f"{validation}: the test set is not read when evaluating on a "
        "validation split; subsample the training set (train_subset) "
        "instead")
  data = datasets.load(dc.name, data_dir=dc.data_dir or None)
  if dc.train_subset or dc.test_subset:
    data = data.subset(dc.train_subset or None, dc.test_subset or None,
                       seed=config.seed)
  if validation:
    data = data.validation(validation)
  # Checked (and refused with a clear error) even at rate 0.
  data = data.with_label_noise(dc.get("label_noise", 0.0),
                               dc.get("label_noise_type", "symmetric"),
                               dc.get("label_noise_seed", 0))
  norm = tuple(dc.get("normalize", ()))
  if norm:
    if len(norm) != 2:
      raise ConfigError(f"dataset.normalize must be () or (mean, std), got "
                        f"{norm!r}")
    data = data.normalized(*norm)
  return data


# The scenario fields only one stream type reads. Set away from their
# defaults on another type, they would be silently ignored (angles given to
# a permuted stream rotate nothing), so that is an error.
_TYPE_FIELDS = {
    "split": ("class_order", "order_seed", "first_classes"),
    "blurry": ("class_order", "order_seed", "disjoint", "blurred"),
    "permuted": ("first_identity", "pad"),
    "rotated": ("angles", "interpolation"),
}


def check_workdir(workdir: str) -> None:
  """Refuses a run directory that is, or lies under, a file."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise ConfigError(f"workdir {workdir!r}: {path!r} is a file; give a "
                      "directory for the run's checkpoints and logs")


def _check_scenario_fields(sc: ml_collections.ConfigDict) -> None:
  if sc.type not in SCENARIO_TYPES:
    raise ConfigError(f"unknown scenario type {sc.type!r}; valid: "
                      f"{list(SCENARIO_TYPES)}")
  defaults = default_config().scenario
  owners = {}
  for owner, fields in _TYPE_FIELDS.items():
    for f in fields:
      owners.setdefault(f, []).append(owner)
  for f, readers in owners.items():
    value = sc.get(f, defaults[f])
    value = tuple(value) if isinstance(value, (list, tuple)) else value
    if sc.type not in readers and value != defaults[f]:
      raise ConfigError(
          f"scenario.{f}={value!r} is read by {' and '.join(readers)} "
          f"streams only; scenario.type={sc.type!r} would ignore it")
  checks.whole("scenario.seed", sc.get("seed", 0), 0)
  if sc.get("order_seed", -1) < -1:
    raise ConfigError(f"scenario.order_seed must be >= 0 (a seeded class "
                      f"order) or -1 (none), got {sc.order_seed}")


def build_scenario(config: ml_collections.ConfigDict,
                   data: datasets.Dataset | None = None) -> Scenario:
  """Builds the (untransformed) scenario, from ``data`` if given, else from
  :func:`load_data`."""
  sc = config.scenario
  _check_scenario_fields(sc)
  data = load_data(config) if data is None else data
  if sc.type == "split":
    s = scenarios.split(
        data, sc.n_experiences, kind=sc.kind,
        class_order=tuple(sc.class_order) or None,
        seed=sc.order_seed if sc.order_seed >= 0 else None,
        first_classes=sc.get("first_classes", 0))
  elif sc.type == "blurry":
    if sc.kind != "class":
      raise ConfigError(f"scenario.type='blurry' is class-incremental; set "
                        f"scenario.kind='class', got {sc.kind!r}")
    s = scenarios.blurry(
        data, sc.n_experiences, disjoint=sc.disjoint, blurred=sc.blurred,
        class_order=tuple(sc.class_order) or None,
        seed=sc.order_seed if sc.order_seed >= 0 else None,
        sample_seed=sc.seed)
  elif sc.type == "permuted":
    s = scenarios.permuted(data, sc.n_experiences, kind=sc.kind, seed=sc.seed,
                           first_identity=sc.first_identity, pad=sc.pad)
  else:  # rotated (_check_scenario_fields refused other types)
    s = scenarios.rotated(data, sc.n_experiences, kind=sc.kind,
                          angles=tuple(sc.angles) or None, seed=sc.seed,
                          interpolation=sc.interpolation)
  return scenarios.online(s) if sc.online else s


# The model fields each built-in backbone reads; a model module reads
# none of them (its arguments are model.<name>.<arg>).
BACKBONE_FIELDS = {"mlp": ("widths", "init", "head"),
                   "cnn": ("channels", "hidden", "init", "head"),
                   "resnet18": ("width", "last_relu", "init", "head"),
                   "resnet32": ("shortcut", "last_relu", "init", "head")}


def _shown(value: Any) -> str:
  """A config value as the errors show it (lists as tuples)."""
  return repr(tuple(value) if isinstance(value, (list, tuple)) else value)


def _ignored(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Why the run would ignore the config's field ``path`` (dotted), or
  None when it reads it (or it is not one of the fields checked here)."""
  parts = path.split(".")
  mc, oc, tc = config.model, config.optimizer, config.train
  sizes = {f for fields in BACKBONE_FIELDS.values() for f in fields}
  if parts[0] == "model" and len(parts) == 2 and parts[1] in sizes:
    f, reads = parts[1], BACKBONE_FIELDS.get(mc.name)
    if reads is not None and f in reads:
      return None
    owners = [n for n, fields in BACKBONE_FIELDS.items() if f in fields]
    who = (f"{', '.join(owners[:-1])} and {owners[-1]} backbones"
           if len(owners) > 1 else f"{owners[0]} backbone")
    what = (f"model.{f}={_shown(mc[f])} is read by the {who} only; "
            f"model.name={mc.name!r} would ignore it")
    if reads is None:
      return (f"{what} (a model module takes its arguments as "
              f"model.{mc.name}.<arg>)")
    return f"{what} (it reads {', '.join('model.' + r for r in reads)})"
  if parts[0] == "model" and len(parts) == 3 and parts[1] != mc.name:
    return (f"{path}={_shown(mc[parts[1]][parts[2]])} is an argument of "
            f"model module {parts[1]!r}; model.name={mc.name!r} would "
            f"ignore it (set --config.model.name={parts[1]})")
  if path == "optimizer.momentum" and oc.name != "momentum":
    why = (f"optimizer.name={oc.name!r} would ignore it (it is the "
           "heavy-ball coefficient of optimizer 'momentum'; set "
           "--config.optimizer.name=momentum)")
  elif path == "optimizer.gamma" and oc.get("schedule") != "multistep":
    why = (f"optimizer.schedule={oc.get('schedule')!r} would ignore it (it "
           "is the 'multistep' schedule's factor)")
  elif path in _PLATEAU_FIELDS and oc.get("schedule") != "plateau":
    why = (f"optimizer.schedule={oc.get('schedule')!r} would ignore it (it "
           "is a setting of the 'plateau' schedule)")
  elif path == "train.epochs" and config.scenario.get("online", False) \
      and tc.epochs != 1:
    why = "scenario.online=True trains one pass over each experience"
  elif path == "train.crop_padding" and "pad_crop" not in _augment_ops(tc):
    why = (f"train.augment={_augment_ops(tc)!r} would ignore it (it is the "
           "'pad_crop' augmentation's padding)")
  else:
    return None
  return f"{path}={_shown(config[parts[0]][parts[1]])}: {why}"


_PLATEAU_FIELDS = ("optimizer.patience", "optimizer.lr_factor",
                   "optimizer.lr_min", "optimizer.holdout")
# The fields _ignored() checks, bar model modules' arguments.
_CHECKED = tuple(f"model.{f}" for f in dict.fromkeys(
    f for fields in BACKBONE_FIELDS.values() for f in fields)) + (
        "optimizer.momentum", "optimizer.gamma", "train.epochs",
        "train.crop_padding") + _PLATEAU_FIELDS


def check_overrides(config: ml_collections.ConfigDict,
                    given: Iterable[str]) -> None:
  """Refuses explicitly set fields (``given``: dotted paths, the command
  line's overrides) that the rest of the config makes the run ignore: a
  backbone's size for another model, ``optimizer.momentum`` without
  optimizer ``momentum`` (plain ``sgd`` has none), ``optimizer.gamma``
  without the ``multistep`` schedule, ``train.crop_padding`` without
  ``pad_crop`` in ``train.augment``, ``train.epochs`` other than 1 on an
  online stream, and a model module's argument (``model.<name>.<arg>``)
  for another model. Only explicit settings are refused: a config file
  may keep such values for when it is switched (the default config's
  momentum 0.9 with ``sgd``); :func:`ignored_settings` lists those."""
  for path in given:
    why = _ignored(config, path)
    if why is not None:
      raise ConfigError(why)


def ignored_settings(config: ml_collections.ConfigDict) -> list[str]:
  """Why the run ignores each field :func:`check_overrides` checks that
  ``config`` sets away from the default config's value (a config file's
  momentum for plain ``sgd``, a CNN's channels with the MLP): notes for
  the dry run, since a file may keep them deliberately."""
  defaults, out = default_config(), []
  for path in _CHECKED:
    section, field = path.split(".")
    if field not in config[section]:
      continue
    value, default = config[section][field], defaults[section].get(field)
    same = (tuple(value) == tuple(default)
            if isinstance(value, (list, tuple))
            and isinstance(default, (list, tuple)) else value == default)
    why = None if same else _ignored(config, path)
    if why is not None:
      out.append(why)
  return out


def _model_kwargs(mc: ml_collections.ConfigDict) -> dict[str, Any]:
  fields = BACKBONE_FIELDS.get(mc.name)
  if fields is None:  # a model module: its kwargs in config.model.<name>
    return dict(mc.get(mc.name, {}))
  out = {}
  for f in fields:
    if f not in mc:  # configs written before the field existed
      continue
    v = mc[f]
    out[f] = tuple(v) if isinstance(v, (list, tuple)) else v
  return out


def _model_outputs(mc: ml_collections.ConfigDict, num_classes: int,
                   strategy: "strategies.Strategy") -> int:
  """The head's width: ``model.outputs``, or the stream's classes when 0.

  Another width makes the outputs an embedding (CoPE's is 100-d on MNIST),
  which only a strategy with its own task loss and prediction reads as
  such; any other would score class ids against the wrong columns, so it
  is refused.
  """
  n = mc.get("outputs", 0)
  if not (checks.is_whole(n) and n >= 0):
    raise ConfigError(f"model.outputs={n!r}: expected a whole number >= 1 "
                      "(or 0 for the stream's classes)")
  if n in (0, num_classes):
    return num_classes
  if strategy.task_loss is None or strategy.predict is None:
    raise ConfigError(
        f"model.outputs={n} differs from the stream's {num_classes} "
        f"classes; only a strategy that replaces both the task loss and the "
        f"prediction reads the outputs as an embedding (cope, scr), not "
        f"{strategy.name!r}: set model.outputs=0")
  return int(n)


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built from a config."""
  config: ml_collections.ConfigDict
  scenario: Scenario          # the scenario experiences train on
  learner: Learner
  strategy_name: str
  # optimizer.schedule='plateau': each experience's held-out rows
  # (jaxcl.plateau.holdout); () otherwise.
  monitors: tuple = ()
  # The learners :func:`execute` derived from ``learner`` (stacked runs, a
  # mesh), by their settings: a new Learner compiles its functions anew, so
  # executing the same Setup again (seeds in turn) reuses these. Not an
  # __init__ field: ``dataclasses.replace`` gives a new Setup its own.
  derived: dict = dataclasses.field(default_factory=dict, init=False,
                                    repr=False, compare=False)

  def learner_for(self, members: int = 0, member_data: bool = False,
                  mesh: Any = None, state_shardings: Any = None) -> Learner:
    """``learner`` with these run settings, the same object (and compiled
    functions) each time they are asked for."""
    changes = dict(members=members, member_data=member_data, mesh=mesh,
                   state_shardings=state_shardings)
    leaves, treedef = jax.tree.flatten(state_shardings)
    key = (members, member_data, mesh, treedef, tuple(leaves))
    if key == (0, False, None, jax.tree.structure(None), ()):
      return self.learner
    base, derived = self.derived.get(key, (None, None))
    if base is not self.learner:  # new, or ``learner`` was reassigned
      base, derived = self.derived[key] = (
          self.learner, dataclasses.replace(self.learner, **changes))
    return derived


def strategy_kwargs(config: ml_collections.ConfigDict
                    ) -> dict[str, dict[str, Any]]:
  """The arguments :func:`build_strategy` passes each member's factory:
  ``config.strategy.<name>``'s, plus what a member takes from the run
  unless given (the others are the factory's defaults)."""
  skw = {k: dict(v) for k, v in config.strategy.items() if k != "name"}
  # Arguments a member takes from the run, unless given: where auxiliary
  # data is read (DMC: where the run's own data set is read) and the
  # number of epochs (AER's alternation follows them).
  data_dir = config.dataset.get("data_dir", "")
  epochs = 1 if config.scenario.get("online", False) else config.train.epochs
  for name in {n.strip() for n in config.strategy.name.split("+")}:
    if name not in strategies.available():
      continue  # from_spec names the unknown strategy
    defaults, given = strategies.defaults(name), skw.get(name, {})
    if data_dir and "aux_data_dir" in defaults and not given.get(
        "aux_data_dir"):
      skw.setdefault(name, {})["aux_data_dir"] = data_dir
    if "train_epochs" in defaults and "train_epochs" not in given:
      skw.setdefault(name, {})["train_epochs"] = epochs
    elif "train_epochs" in defaults and given["train_epochs"] != epochs:
      # The member would refuse only when the first experience ended.
      raise ConfigError(
          f"strategy.{name}.train_epochs={given['train_epochs']!r}, but the "
          f"run trains {epochs} epoch(s) per experience (train.epochs"
          f"{'; scenario.online makes it 1' if epochs != config.train.epochs else ''}"
          f"); leave train_epochs out or set it to {epochs}")
  return skw


def build_strategy(config: ml_collections.ConfigDict
                   ) -> tuple["strategies.Strategy", Any]:
  """``config.strategy``'s record and its scenario transform (the factory
  checks the arguments)."""
  return strategies.from_spec(config.strategy.name, strategy_kwargs(config))


def build_optimizer(config: ml_collections.ConfigDict, schedule_steps: int,
                    epochs: int | None = None):
  """``config.optimizer``'s optax transformation; a schedule decays over
  ``schedule_steps`` optimiser steps (an experience's ``epochs``, by
  default ``train.epochs``)."""
  oc = config.optimizer
  return make_optimizer(oc.name, oc.learning_rate, momentum=oc.momentum,
                        weight_decay=oc.weight_decay, schedule=oc.schedule,
                        schedule_steps=schedule_steps,
                        clip_norm=oc.get("clip_norm", 0.0),
                        milestones=tuple(oc.get("milestones", ())),
                        gamma=oc.get("gamma", 0.1),
                        epochs=config.train.epochs if epochs is None
                        else epochs)


def _eval_batch(config: ml_collections.ConfigDict, sc: Scenario) -> int:
  """``train.eval_batch_size``, capped at the largest test set (rounded up
  to a multiple of the devices of ``parallel.devices``): a larger batch
  only adds padding rows to every test set (a batch of 10^9 asked for
  1.2 TB before session 44). Accuracies do not depend on it."""
  bs = config.train.eval_batch_size
  if not checks.is_whole(bs) or bs < 1:
    return bs  # make_learner names it
  devices = config.get("parallel", {}).get("devices", 1)
  n = jax.device_count() if devices == 0 else max(devices, 1)
  largest = max(len(e.test_y) for e in sc.eval_experiences)
  return min(bs, -(-largest // n) * n)


def _check_classes_once(held: Sequence[str], sc: Scenario) -> None:
  """Refuses a strategy of ``strategies.ONE_EXPERIENCE_PER_CLASS`` among
  the method names ``held`` on a stream that brings a class back, before
  anything is trained (its own hook would refuse only when the second
  experience starts)."""
  names = [n for n in held if n in strategies.ONE_EXPERIENCE_PER_CLASS]
  if not names:
    return
  seen: set[int] = set()
  for e in sc.experiences:
    classes = set(np.unique(e.train_y).tolist())
    again = sorted(classes & seen)
    if again:
      raise ConfigError(
          f"strategy {names[0]!r} learns each class in one experience, but "
          f"experience {e.index} of {sc.name} brings classes {again} back "
          "(blurry and domain-incremental streams do); use a split stream "
          "(scenario.type='split', kind 'class' or 'task')")
    seen |= classes


def setup(config: ml_collections.ConfigDict,
          scenario: Scenario | None = None,
          strategy: "strategies.Strategy | None" = None) -> Setup:
  """Builds scenario, model, optimiser, strategy and the compiled learner.

  ``strategy`` (a record, e.g. ``chain(...)`` built in a script) replaces
  the one named by ``config.strategy``. Either way the strategy's
  ``scenario`` re-cut (joint, cumulative) is applied to the stream, which
  is given as built.

  Raises:
    ConfigError / ValueError: any bad name or value, naming it and the
      valid choices.
  """
  base = scenario if scenario is not None else build_scenario(config)
  if strategy is None:
    strategy, _ = build_strategy(config)
  # The record's own re-cut of the stream (joint, cumulative), for a
  # record passed in too: until session 54 one passed to jaxcl.run
  # trained on the stream as given, so get("cumulative") ran as naive.
  sc = strategy.scenario(base) if strategy.scenario is not None else base
  # By the record's methods, so a record passed in is refused as early as
  # a config's name (its hook would refuse only at the second experience).
  _check_classes_once([m.name for m in methods(strategy)], sc)
  sc, monitors = _plateau_holdout(config, sc)
  tc = config.train
  if tc.batch_size < 1:
    raise ConfigError(f"train.batch_size must be >= 1, got {tc.batch_size}")
  smallest = min(e.num_train for e in sc.experiences)
  if tc.batch_size > smallest:
    raise ConfigError(
        f"train.batch_size={tc.batch_size} is larger than the smallest "
        f"experience ({smallest} training examples); use at most {smallest}")
  heads = sc.num_tasks if config.model.multi_head else 1
  if config.model.multi_head and sc.kind != "task":
    raise ConfigError("model.multi_head=True needs a task-incremental "
                      f"scenario (scenario.kind='task'), got {sc.kind!r}")
  outputs = _model_outputs(config.model, sc.num_classes, strategy)
  mkw = _model_kwargs(config.model)
  if config.model.name == "hypernet" and "input_dim" not in mkw:
    # The target MLP's input size is the stream's (its default is MNIST's).
    mkw["input_dim"] = int(np.prod(sc.input_shape))
  model = models.build(config.model.name, outputs, num_heads=heads, **mkw)
  info = stream_info(sc, tc.batch_size)
  # An online stream is one pass whatever train.epochs says; a schedule
  # sized for train.epochs passes stopped part-way (session 43).
  epochs = 1 if sc.online else tc.epochs
  tx = build_optimizer(config, -(-info.train_size // tc.batch_size) * epochs,
                       epochs)
  normalize = config.dataset.get("normalize", ())
  ctx = make_context(model, tx, info, _augmenter(tc, sc, normalize),
                     _compute_dtype(config.model), normalize)
  eval_every = tc.get("eval_every_steps", 0)
  checks.whole("train.eval_every_steps", eval_every, 0,
               "0: evaluate at the end of each experience only")
  confusion = tc.get("confusion", True)
  checks.flag("train.confusion", confusion)
  learner = make_learner(ctx, strategy, epochs=epochs,
                         eval_batch_size=_eval_batch(config, sc),
                         checkpoint_every_steps=config.checkpoint.every_steps,
                         eval_every_steps=eval_every, confusion=confusion,
                         task_aware=sc.kind == "class",
                         # Continual evaluation on class-incremental streams
                         # also keeps the accuracy over the exposed classes.
                         per_class=sc.kind == "class" and eval_every > 0,
                         reset_optimizer=tc.reset_optimizer)
  return Setup(config, sc, learner, strategy.name, monitors)


def _plateau_holdout(config: ml_collections.ConfigDict, sc: Scenario
                     ) -> tuple[Scenario, tuple]:
  """With ``optimizer.schedule='plateau'``: its settings checked and each
  experience's held-out rows split off (:func:`jaxcl.plateau.holdout`);
  ``(sc, ())`` otherwise."""
  oc = config.optimizer
  if oc.get("schedule") != "plateau":
    return sc, ()
  try:
    plateau.check(oc.get("patience", 5), oc.get("lr_factor", 3.0),
                  oc.get("lr_min", 1e-4), oc.get("holdout", 0.1))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  every = config.checkpoint.get("every_steps", 0)
  if every:
    raise ConfigError(
        f"optimizer.schedule='plateau' keeps its best model and patience "
        f"on the host between epochs, which checkpoints inside an "
        f"experience would lose: use checkpoint.every_steps=0 (saves at "
        f"the experiences' ends), got {every}")
  try:
    return plateau.holdout(sc, oc.get("holdout", 0.1))
  except ScenarioError as e:
    raise ConfigError(str(e)) from None


# --------------------------------------------------------------------------
# The stream.


@dataclasses.dataclass
class Result:
  """What a run returns.

  Attributes:
    accuracy: the accuracy matrix ``R`` (training experiences x test sets).
    random_accuracy: the randomly initialised model's accuracy per test set
      (the FWT reference).
    metrics: :func:`jaxcl.metrics.summary` of ``accuracy``.
    state: the final training state.
    times: wall-clock seconds of this invocation: ``total``, ``train``
      (incl. compilation), ``eval``; and ``before``, the time earlier
      invocations spent reaching the checkpoint this one resumed from (0
      for a fresh run, NaN when that checkpoint did not record it).
    learner: the compiled functions of the run (to reuse or inspect).
    curve: the accuracy curve of continual evaluation, None without it.
    confusion: int32 ``(experiences, C, C)``: at each experience's end,
      ``[i, y, p]`` test examples of class ``y`` (over all the test sets)
      predicted as ``p``; -1 throughout for an experience whose matrix is
      unknown (it ended before a resume from a checkpoint of an older
      jaxcl). None without ``train.confusion``.
    task_accuracy: on a class-incremental stream, the accuracy matrix with
      each test set's predictions restricted to its own classes, as if
      its task were given (the Task-IL accuracy Mammoth reports beside
      Class-IL; NaN for an experience that ended before a resume from an
      older jaxcl's checkpoint); None on other streams.
    test_sizes: the test sets' numbers of examples, the columns of
      ``accuracy`` (the weights of the pooled accuracies,
      :func:`jaxcl.metrics.pooled_accuracy`).
  """
  accuracy: np.ndarray
  random_accuracy: np.ndarray
  metrics: dict[str, float]
  state: TrainState
  times: dict[str, float]
  learner: Learner | None = None
  curve: Curve | None = None
  confusion: np.ndarray | None = None
  task_accuracy: np.ndarray | None = None
  test_sizes: tuple[int, ...] | None = None


def map_runs(result: Result, f: Any) -> Result:
  """``result`` with ``f`` applied to each of its per-run arrays (the
  accuracy matrices, the curve's accuracies, the confusion matrices):
  ``a[None]`` stacks one run as a sweep's, ``a.mean(0)`` averages a
  sweep's runs. One list of them, so that an array added to the result is
  stacked and averaged alike."""
  def opt(a):
    return None if a is None else f(np.asarray(a))

  curve = result.curve
  if curve is not None:
    curve = dataclasses.replace(curve, accuracy=f(np.asarray(curve.accuracy)),
                                exposed=opt(curve.exposed))
  return dataclasses.replace(
      result, accuracy=f(np.asarray(result.accuracy)),
      random_accuracy=f(np.asarray(result.random_accuracy)), curve=curve,
      confusion=opt(result.confusion),
      task_accuracy=opt(result.task_accuracy))


def _curve_slots(learner: Learner) -> int:
  """Room for one experience's continual evaluations: in each epoch the
  multiples of ``eval_every_steps`` and its end, at most ``epoch_steps //
  eval_every_steps + 1``; the last epoch's end is the experience's row of
  the accuracy matrix, also kept on the curve."""
  return learner.epochs * (learner.epoch_steps // learner.eval_every_steps
                           + 1)


def _curve(random_acc: np.ndarray, acc: np.ndarray, step: np.ndarray,
           exposed: np.ndarray | None = None) -> Curve:
  """The :class:`Curve` of the filled slots (``step >= 0``) of ``acc``
  ((runs,) experiences x slots x test sets) and ``exposed`` ((runs,)
  experiences x slots), after the initial point."""
  filled = step >= 0
  experience = np.broadcast_to(np.arange(step.shape[0])[:, None],
                               step.shape)[filled]
  points = acc[filled] if acc.ndim == 3 else acc[:, filled]
  if exposed is not None:  # (nothing is exposed to the initial model)
    exposed = np.concatenate([np.full(exposed.shape[:-2] + (1,), np.nan),
                              exposed[..., filled]], axis=-1)
  return Curve(np.concatenate([[0], step[filled]]),
               np.concatenate([[-1], experience]),
               np.concatenate([random_acc[..., None, :], points], axis=-2),
               exposed)


def _exposure(sc: Scenario, num_classes: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """For the accuracy over the exposed classes: which classes are exposed
  by each experience's end, bool ``(experiences, C)``, those of its
  training data and of every earlier experience's (a blurry stream's
  classes turn up before their home experience); and each class's test
  examples over all the test sets, ``(C,)``."""
  exposed = np.zeros((len(sc.experiences), num_classes), bool)
  for i, e in enumerate(sc.experiences):
    exposed[i:, list(e.classes)] = True
  labels = np.concatenate([np.asarray(e.test_y, np.int64)
                           for e in sc.eval_experiences])
  return exposed, np.bincount(labels, minlength=num_classes)[:num_classes]


def first_steps(order: np.ndarray, train_y: np.ndarray,
                num_classes: int) -> np.ndarray:
  """Each class's first step in an epoch: the index of the first batch of
  the batch table ``order`` ((steps, batch) rows of the training data,
  -1 padding; :func:`jaxcl.train.epoch_indices`) holding one of its
  examples (labels ``train_y``); ``steps`` for a class it never holds.
  Koh et al.'s A_AUC tests a class from its first example on: after
  ``k`` steps of an experience's first epoch, the classes with a first
  step below ``k`` are exposed."""
  steps = order.shape[0]
  first = np.full(num_classes, steps, np.int64)
  valid = order >= 0
  labels = np.asarray(train_y, np.int64)[np.maximum(order, 0)]
  at = np.broadcast_to(np.arange(steps)[:, None], order.shape)
  np.minimum.at(first, labels[valid], at[valid])
  return first


# (Not float16: its narrow exponent needs loss scaling, or small gradients
# flush to zero and the run learns less without a word.)
COMPUTE_DTYPES = ("float32", "bfloat16")


def _compute_dtype(mc: ml_collections.ConfigDict) -> Any:
  """``model.compute_dtype`` as a dtype, None for float32 (the plain
  path, unchanged)."""
  name = mc.get("compute_dtype", "float32")
  if name == "float16":
    raise ConfigError(
        "model.compute_dtype='float16' needs loss scaling, which jaxcl does "
        "not do (small gradients would flush to zero); use 'bfloat16', "
        "float32's range at half the bits")
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f"model.compute_dtype={name!r}; valid: "
                      f"{list(COMPUTE_DTYPES)} (bfloat16 for mixed "
                      "precision on TPUs and recent GPUs)")
  return None if name == "float32" else jax.numpy.dtype(name)


def _augment_ops(tc: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``train.augment``'s operation names (unchecked beyond the type)."""
  ops = tc.get("augment", ())
  if isinstance(ops, str) or not isinstance(ops, (tuple, list)):
    raise ConfigError(
        f"train.augment must be a sequence of names from "
        f"{list(augment.OPS)} (e.g. ('pad_crop', 'flip')), got {ops!r}")
  # (The command line's --config.train.augment=pad_crop,flip arrives as
  # one string of both.)
  return tuple(p.strip() for op in ops for p in str(op).split(",")
               if p.strip())


def _augmenter(tc: ml_collections.ConfigDict, sc: Scenario,
               normalize: Any = ()) -> Any:
  """``train.augment``'s ``(key, x) -> x`` for the stream's inputs, or None
  for none; refuses, by name, an operation that is unknown or does not
  fit the inputs (a flip of flat vectors). ``normalize`` is the inputs'
  ``dataset.normalize``: the operations run on the pixels, as
  torchvision's run before its ``Normalize``."""
  ops = _augment_ops(tc)
  if not ops:
    return None
  try:
    return augment.pipeline(ops, sc.input_shape,
                            crop_padding=tc.get("crop_padding", 4),
                            normalize=tuple(normalize),
                            who="train.augment")
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _accuracy_row(out: Any) -> Any:
  """An evaluation's accuracy row (:func:`jaxcl.train.evaluate` returns a
  dict when it computes more)."""
  return out["accuracy"] if isinstance(out, dict) else out


def _recency_classes(sc: Scenario) -> tuple[list[int], list[int]] | None:
  """The classes trained and the last experience's classes, for
  :func:`jaxcl.metrics.recency_bias`: a class-incremental stream of two or
  more experiences whose classes do not recur; None for other streams."""
  classes = [set(e.classes) for e in sc.experiences]
  trained = set().union(*classes)
  if (sc.kind != "class" or len(classes) < 2
      or sum(map(len, classes)) != len(trained)):
    return None
  return sorted(trained), sorted(classes[-1])


def _check_finite(losses, ran, experience, epoch, first_step):
  # (steps,) for one run, (members, steps) for a vmapped sweep.
  losses, ran = np.asarray(losses), np.asarray(ran)
  bad = np.argwhere(ran & ~np.isfinite(losses))
  if bad.size:
    where = tuple(bad[0])
    member = f"sweep member {where[0]}, " if len(where) == 2 else ""
    raise NonFiniteLossError(
        f"non-finite loss {losses[where]} in {member}experience "
        f"{experience}, epoch {epoch}, step {first_step + int(where[-1])} of "
        "the epoch; lower the learning rate or check the strategy's "
        "hyperparameters")


def _mean_row(row: np.ndarray, members: int) -> np.ndarray:
  """An accuracy row, for a sweep (runs x test sets) the mean over runs."""
  return row.mean(axis=0) if members else row


def _unstack(tree: Any, i: int) -> Any:
  return jax.tree.map(lambda a: a[i], tree)


def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


def _host_hook(hook, ctx, state, exps: Sequence[Experience], members: int,
               progress: Callable[[int], Callable[..., Any]] | None = None):
  """Applies a host-side hook per run: hooks see one run's state and that
  run's experience, whatever the sweep (they may call their own jitted code
  on it). ``exps`` holds one experience, shared by the runs, or one per
  run. ``progress``: run index -> the hook's :attr:`Context.progress`
  (None: the context's own)."""
  def ctx_of(i):
    return (ctx if progress is None else
            dataclasses.replace(ctx, progress=progress(i)))
  if not members:
    return hook(ctx_of(0), state, exps[0])
  return _stack([hook(ctx_of(i), _unstack(state, i), exps[i % len(exps)])
                 for i in range(members)])


def _hook_progress(reporter, what: str, members: int
                   ) -> Callable[[int], Callable[..., Any]] | None:
  """Run index -> a :attr:`Context.progress` whose bars the reporter shows
  as ``what`` (the experience and the strategy), naming the run in a sweep;
  None for a reporter without :meth:`~jaxcl.report.Reporter.work_progress`."""
  if not hasattr(reporter, "work_progress"):
    return None

  def of_run(i: int):
    who = what + (f" (run {i + 1}/{members})" if members else "")
    return lambda total, desc, unit="step": reporter.work_progress(
        total, f"{who}: {desc}", unit)
  return of_run


def check_same_stream(streams: Sequence[Scenario]) -> None:
  """Raises :class:`ConfigError` unless the scenarios are draws of one
  stream: a sweep's runs share one program, so the stream's length,
  sizes, test labels, task ids and class layout (each experience's
  classes) must agree. The inputs may differ (permuted or rotated draws),
  and so may the training examples each experience holds, labels
  included (blurry draws deal other examples of the same classes); each
  run trains on its own."""
  first = streams[0]
  for k, sc in enumerate(streams[1:], 1):
    def differ(what):
      raise ConfigError(
          f"the runs' scenarios must be draws of one stream (other inputs, "
          f"or other training examples of the same classes); draw {k} "
          f"({sc.name}) differs from draw 0 ({first.name}) in {what}")
    for f in ("kind", "num_classes", "num_tasks", "online"):
      if getattr(sc, f) != getattr(first, f):
        differ(f)
    if not np.array_equal(sc.task_classes, first.task_classes):
      differ("task_classes")
    for name in ("experiences", "eval_experiences"):
      mine, theirs = getattr(sc, name), getattr(first, name)
      if len(mine) != len(theirs):
        differ(f"the number of {name}")
      for i, (a, b) in enumerate(zip(mine, theirs)):
        if (a.task_id, a.classes) != (b.task_id, b.classes):
          differ(f"the task id or classes of {name}[{i}]")
        if a.num_train != b.num_train:
          differ(f"the number of training examples of {name}[{i}] "
                 f"({a.num_train} against draw 0's {b.num_train})")
        # (The loop's steps and the evaluation's test rows are the first
        # draw's; a run's own training labels stay its own.)
        for f in ("test_y", "train_task", "test_task"):
          if not np.array_equal(getattr(a, f), getattr(b, f)):
            differ(f"{f} of {name}[{i}]")


def _reset_opt(ctx, state, members: int):
  if not members:
    return reset_opt_state(ctx, state)
  return _stack([reset_opt_state(ctx, _unstack(state, i))
                 for i in range(members)])


def run(config: ml_collections.ConfigDict, workdir: str | None = None, *,
        scenario: Scenario | None = None,
        strategy: "strategies.Strategy | None" = None,
        reporter: Any = None, resume: bool | None = None) -> Result:
  """Trains the configured stream and evaluates after each experience.

  With a ``workdir``, the run checkpoints after every experience (and every
  ``config.checkpoint.every_steps`` steps) and resumes from the newest valid
  checkpoint found there.

  Args:
    config: a config like :func:`default_config`.
    workdir: run directory for logs, plots and checkpoints (None: nothing is
      written).
    scenario: use this scenario instead of building one from the config
      (as built: a joint or cumulative strategy re-cuts it).
    strategy: use this strategy record instead of ``config.strategy``.
    reporter: a :class:`jaxcl.report.Reporter` (built from ``workdir`` when
      None and ``workdir`` is given).
    resume: None resumes when a checkpoint exists; True requires one; False
      refuses to start in a directory that has one.
  """
  if workdir:
    check_workdir(workdir)  # before any data is loaded
  s = setup(config, scenario, strategy)
  state = initial_state(s, config.seed)
  return execute(s, state, workdir, reporter=reporter, resume=resume)


def _size(tree: Any) -> str:
  """``1,234 values, 4.9 kB``: a pytree's element count and bytes."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
  n = sum(int(np.prod(x.shape)) for x in leaves)
  nbytes = float(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                     for x in leaves))
  for unit in ("B", "kB", "MB", "GB"):
    if nbytes < 1000 or unit == "GB":
      break
    nbytes /= 1000
  return f"{n:,} values, {nbytes:.3g} {unit}"


def describe(s: Setup, state: TrainState) -> str:
  """What executing ``s`` from ``state`` would train, in a few lines: the
  stream experience by experience, the steps, and the state's size by
  part (``jaxcl run --dry_run`` prints it before training anything).

  The sizes are the state's as built, so a replay memory or a per-task
  copy of the weights shows in ``strategy``.
  """
  c, sc, learner = s.config, s.scenario, s.learner
  steps = learner.epoch_steps * learner.epochs
  lines = [
      f"stream: {sc.name}, {len(sc.experiences)} experiences, "
      f"{sc.kind}-incremental, {sc.num_classes} classes, input "
      f"{tuple(sc.input_shape)}{', online (one pass)' if sc.online else ''}"]
  for e in sc.experiences:
    shown = list(e.classes[:12]) + (["..."] if len(e.classes) > 12 else [])
    lines.append(
        f"  experience {e.index}: task {e.task_id}, {len(e.classes)} "
        f"classes [{', '.join(map(str, shown))}], {e.num_train} train / "
        f"{len(e.test_y)} test examples")
  oc = c.optimizer
  schedule = oc.get("schedule", "constant")
  lines += [
      f"training: {learner.epochs} epoch(s) x {learner.epoch_steps} steps "
      f"of batch {learner.ctx.info.batch_size} per experience ({steps} "
      f"steps; shorter experiences pad with skipped steps), evaluation "
      f"batch {learner.eval_batch_size}"
      + ("" if learner.eval_batch_size == c.train.eval_batch_size else
         f" (train.eval_batch_size={c.train.eval_batch_size} capped at the "
         "largest test set)"),
      # The fields this model reads (another backbone's are ignored).
      f"model: {c.model.name}("
      + ", ".join(f"{k}={v!r}" for k, v in _model_kwargs(c.model).items())
      + f"); optimizer: {oc.name}"
      + (f" (momentum {oc.momentum:g})" if oc.name == "momentum" else
         " (no momentum)" if oc.name == "sgd" else "")
      + f", learning rate {oc.learning_rate:g}"
      f"{'' if schedule == 'constant' else f', {schedule} schedule'}"
      + (f" (x {oc.get('gamma', 0.1):g} from epochs "
         f"{', '.join(map(str, oc.get('milestones', ())))})"
         if schedule == "multistep" else "")
      + f"; strategy: {s.strategy_name}"]
  # Values a config file keeps that this run ignores (refused when given
  # on the command line).
  lines += [f"note: {why}" for why in ignored_settings(c)]
  if learner.ctx.compute_dtype is not None:
    lines.append(f"mixed precision: the model computes in "
                 f"{learner.ctx.compute_dtype.name}; parameters, optimiser "
                 "and losses in float32")
  if learner.ctx.augment is not None:
    ops = _augment_ops(c.train)
    pad = (f" (padding {c.train.get('crop_padding', 4)})"
           if "pad_crop" in ops else "")
    lines.append(f"augmentation of each training batch: {', '.join(ops)}"
                 f"{pad}")
  if learner.eval_every_steps:
    lines.append(
        f"continual evaluation: every {learner.eval_every_steps} steps of "
        "each epoch and at its end, up to "
        f"{_curve_slots(learner)} evaluations of every test set per "
        f"experience (compiled chunks of {learner.chunk_steps} steps)")
  lines.append("state:")
  for part in ("params", "opt_state", "model_state", "strategy"):
    lines.append(f"  {part:<12} {_size(getattr(state, part))}")
  return "\n".join(lines)


def initial_state(s: Setup, seed: int) -> TrainState:
  """A fresh state from ``seed``, starting from ``config.model.pretrained``
  params when given (the "pretrained vs scratch" choice, for any model)."""
  ctx, strategy = s.learner.ctx, s.learner.strategy
  path = s.config.model.get("pretrained", "")
  if not path:
    return init_state(ctx, strategy, seed)
  from jaxcl import pretrained
  template = init_state(ctx, strategy, seed).params
  params = pretrained.assign(template, pretrained.load(path))
  return init_state(ctx, strategy, seed, params=params)


def run_mesh(s: Setup, members: int = 0) -> Any:
  """The device mesh ``config.parallel.devices`` asks for (None: one
  device), once the run is checked to fit it."""
  from jaxcl import parallel
  devices = s.config.get("parallel", {}).get("devices", 1)
  if devices == 1:
    return None
  if members:
    raise ConfigError("parallel.devices != 1 with a sweep is not supported "
                      "yet; run the sweep on one device")
  mesh = parallel.make_mesh(devices)
  n = mesh.shape[parallel.DATA]
  batch, eval_batch = s.learner.ctx.info.batch_size, s.learner.eval_batch_size
  if batch % n or eval_batch % n:
    raise ConfigError(
        f"train.batch_size={batch} and train.eval_batch_size={eval_batch} "
        f"must be multiples of the {n} devices")
  return mesh


def execute(s: Setup, state: TrainState, workdir: str | None = None, *,
            members: int = 0, reporter: Any = None,
            resume: bool | None = None,
            fingerprint_extra: dict[str, Any] | None = None,
            member_scenarios: Sequence[Scenario] | None = None) -> Result:
  """Streams ``s.scenario`` from ``state`` (k stacked states if ``members``).

  The loop behind :func:`run` and :func:`jaxcl.sweep.sweep`: places the
  state on the mesh (``config.parallel.devices``), restores a checkpoint
  when there is one, and trains / evaluates / checkpoints experience by
  experience. ``member_scenarios`` (a sweep only): one scenario per run,
  draws of one stream (:func:`check_same_stream`);
  each run trains and is tested on its own.
  """
  from jaxcl import checkpoint, parallel, report  # side effects: the edges

  if workdir:
    check_workdir(workdir)
  t_start = time.perf_counter()
  config = s.config
  learner, sc = s.learner, s.scenario
  ctx, strategy = learner.ctx, learner.strategy
  streams = [sc]
  if member_scenarios is not None:
    if not members or len(member_scenarios) != members:
      raise ConfigError(f"member_scenarios: one scenario per run of a sweep "
                        f"({members} runs), got {len(member_scenarios)}")
    check_same_stream([sc] + list(member_scenarios))
    streams = list(member_scenarios)
  member_data = len(streams) > 1
  if s.monitors and members:
    raise ConfigError(
        "optimizer.schedule='plateau' decides on the host for one run at a "
        "time (its patience, rate and best model): train the seeds one "
        f"after another (jaxcl run per seed), not as one sweep of {members}")
  oc = config.optimizer
  scheme_kw = dict(patience=oc.get("patience", 5),
                   factor=oc.get("lr_factor", 3.0),
                   lr_min=oc.get("lr_min", 1e-4))
  learner = s.learner_for(members, member_data)
  place = jax.device_put
  mesh = run_mesh(s, members)
  if mesh is not None:
    shardings = parallel.state_sharding(
        state, mesh, min_bytes=config.parallel.shard_min_bytes)
    learner = s.learner_for(members, member_data, mesh, shardings)
    rep = parallel.replicated(mesh)
    place = lambda t: parallel.place(t, jax.tree.map(lambda _: rep, t))
    state = parallel.place(state, shardings)

  def settle(state):
    """After host-side work: no aliased buffers (the chunk donates the
    state) and, on a mesh, the state back on its shardings."""
    state = unalias(state)
    if learner.mesh is not None:
      state = parallel.place(state, learner.state_shardings)
    return state

  n_train, n_test = len(sc.experiences), len(sc.eval_experiences)
  # The test sets' sizes: where they differ (scenario.first_classes), the
  # pooled accuracies LUCIR's and PyCIL's code report are added.
  sizes = tuple(len(e.test_y) for e in sc.eval_experiences)
  acc = np.full(((members,) if members else ()) + (n_train, n_test), np.nan)
  # Continual evaluation: the curve's points by experience and slot
  # (unfilled: NaN accuracies, step -1), in the checkpoints' progress.
  every_eval = learner.eval_every_steps
  curve = {}
  if every_eval:
    slots = _curve_slots(learner)
    curve = {"curve_accuracy": np.full(acc.shape[:-1] + (slots, n_test),
                                       np.nan),
             "curve_step": np.full((n_train, slots), -1, np.int32)}
    if learner.per_class:
      # The accuracy over the classes exposed so far, at each point.
      curve["curve_exposed"] = np.full(acc.shape[:-1] + (slots,), np.nan)
      exposure, class_count = _exposure(sc, ctx.info.num_classes)
  # What the experiences' ends add to the accuracy matrix, in the
  # checkpoints' progress: the confusion matrices (-1: not evaluated) and
  # the task-aware accuracies (NaN).
  ends = {}
  if learner.confusion:
    c = ctx.info.num_classes
    ends["confusion"] = np.full(acc.shape[:-1] + (c, c), -1, np.int32)
  if learner.task_aware:
    ends["task_accuracy"] = np.full(acc.shape, np.nan)
  test = place(test_arrays(sc.eval_experiences, learner.eval_batch_size)
               if len(streams) == 1 else stacked_test_arrays(
                   [t.eval_experiences for t in streams],
                   learner.eval_batch_size))
  ckpt, position = None, checkpoint.Position()
  resume_step = None  # global step of the checkpoint resumed from
  random_acc = None
  before = 0.0  # seconds spent by earlier invocations (resumed runs)
  if workdir:
    ckpt = checkpoint.Checkpointer(
        workdir, checkpoint.run_fingerprint(config, fingerprint_extra),
        keep=config.checkpoint.keep)
    if resume is False and ckpt.steps():
      raise ConfigError(f"{workdir} already holds checkpoints; use another "
                        "--workdir or resume")
    progress_like = {"accuracy": acc,
                     "random_accuracy": acc[..., 0, :] * 0, **curve, **ends}
    # Checkpoints written before session 46 hold neither, nor (before
    # session 47) the exposed classes' accuracies.
    restored = (ckpt.restore(state, progress_like,
                             optional=tuple(ends) + ("curve_exposed",))
                if ckpt.steps() else None)
    if restored is None and resume:
      raise ConfigError(f"--resume: no checkpoint to resume in {workdir}")
    if restored is not None:
      state, progress, position = restored
      acc = np.asarray(progress["accuracy"], np.float64)
      random_acc = np.asarray(progress["random_accuracy"])
      curve = {k: np.array(progress[k], v.dtype) if k in progress else v
               for k, v in curve.items()}
      ends = {k: np.array(progress[k], v.dtype) if k in progress else v
              for k, v in ends.items()}
      before = progress["seconds"]
      state = settle(state)
      resume_step = int(np.max(np.asarray(state.step)))
  if reporter is None and workdir:
    # Joint tests its one experience on every test set; a stream cut short
    # (its first experiences, tested on all) keeps one test set each.
    per_experience = n_train == n_test or all(
        a is b for a, b in zip(sc.experiences, sc.eval_experiences))
    reporter = report.Reporter(workdir, config, resume_step=resume_step,
                               per_experience=per_experience,
                               runs=max(members, 1),
                               experience_classes=[e.classes
                                                   for e in sc.experiences],
                               test_sizes=sizes)
  reporter = reporter or report.NullReporter()

  eval_time = 0.0
  if random_acc is None:
    t0 = time.perf_counter()
    # float64, the dtype a resumed run restores it in (progress_like), so
    # that a fresh and a resumed run return the same Result.
    # With end evaluations, their program gives it too: one program fewer
    # to compile when there is no continual evaluation.
    random_acc = np.asarray(_accuracy_row(
        learner.end_eval_fn(state, test) if ends else
        learner.eval_fn(state, test)), np.float64)
    eval_time += time.perf_counter() - t0
    if every_eval:
      reporter.curve(-1, _mean_row(random_acc, members), 0)

  def add_point(i, out, step, exposed=None):
    """Puts an evaluation (its row, or :func:`jaxcl.train.evaluate`'s
    dict) on the curve, in experience ``i``'s next slot; ``exposed``:
    the classes exposed by then (bool ``((runs,) C)``), by default all
    those of experience ``i`` and the earlier ones."""
    row = np.asarray(_accuracy_row(out))
    k = int(np.sum(curve["curve_step"][i] >= 0))
    curve["curve_accuracy"][..., i, k, :] = row
    curve["curve_step"][i, k] = step
    if "curve_exposed" in curve:
      x = metrics.exposed_accuracy(
          np.asarray(out["class_correct"]), class_count,
          exposure[i] if exposed is None else exposed)
      curve["curve_exposed"][..., i, k] = x
      if hasattr(reporter, "curve_exposed"):
        # (Before the row: the reporter logs them in one record.)
        reporter.curve_exposed(i, float(np.mean(x)))
    reporter.curve(i, _mean_row(row, members), step)

  def save(state, pos):
    if ckpt is not None:
      ckpt.save(state, {"accuracy": acc, "random_accuracy": random_acc,
                        **curve, **ends}, pos,
                seconds=None if math.isnan(before) else
                before + time.perf_counter() - t_start)

  size = ctx.info.train_size
  train_time = 0.0
  try:
    for i in range(position.experience, n_train):
      exps = [t.experiences[i] for t in streams]
      exp = exps[0]
      t0 = time.perf_counter()
      mid = position.phase == "train" and position.experience == i
      if not mid:
        state = _host_hook(
            strategy.before_experience, ctx, state, exps, members,
            _hook_progress(reporter, f"experience {i + 1}/{n_train}, "
                           f"{s.strategy_name} before it", members))
        if learner.reset_optimizer:
          state = _reset_opt(ctx, state, members)
        if s.monitors:  # every experience starts at the base rate
          state = set_learning_rate(state, config.optimizer.learning_rate)
        state = settle(state)
      if s.monitors:
        held = place(test_arrays([s.monitors[i]], learner.eval_batch_size))
        scheme = plateau.start(config.optimizer.learning_rate,
                               scheme_kw["patience"])
        # The best model so far (copies: the chunk donates the state).
        best = jax.tree.map(jnp.copy, (state.params, state.model_state))
      data = place(device_experience(exp, size) if len(exps) == 1 else
                   stacked_experiences(exps, size))
      first_epoch = position.epoch if mid else 0
      bar = reporter.progress(
          learner.epochs * learner.epoch_steps, f"experience {i + 1}/{n_train}",
          initial=first_epoch * learner.epoch_steps + position.step if mid
          else 0)
      # The steps of each of this experience's epochs that hold examples
      # (later chunks of the padded epoch run none).
      n_steps = steps_per_epoch(exp.num_train, ctx.info.batch_size)
      if "curve_exposed" in curve:
        # Within the first epoch a class is exposed from the first batch
        # that holds it (Koh et al.): its first step in the epoch's order,
        # per run (each run its own order, in a sweep its own labels).
        order = np.asarray(learner.order_fn(state.rng, i, 0, exp.num_train))
        if not members:
          order = order[None]
        first_step = np.stack([first_steps(
            order[m], exps[m if member_data else 0].train_y,
            ctx.info.num_classes) for m in range(len(order))])
        first_step = first_step if members else first_step[0]
        exposed_before = (exposure[i - 1] if i else
                          np.zeros_like(exposure[0]))
      for epoch in range(first_epoch, learner.epochs):
        first = position.step if (mid and epoch == first_epoch) else 0
        epoch_data = data
        if learner.chunk_steps < learner.epoch_steps and (
            not members or member_data):
          # An epoch in several chunks: its batch table once, not per chunk
          # (runs sharing the data keep drawing it inside: each run's key
          # gives its own order, and the shared data has no run axis).
          epoch_data = {**data, "order": place(learner.order_fn(
              state.rng, i, epoch, exp.num_train))}
        for start in range(first, learner.epoch_steps, learner.chunk_steps):
          state, losses, ran = learner.chunk_fn(state, epoch_data,
                                                exp.num_train, i, epoch,
                                                start)
          _check_finite(losses, ran, i, epoch, start)
          ran_np = np.asarray(ran)
          loss = (float(np.asarray(losses)[ran_np].mean()) if ran_np.any()
                  else 0.0)
          bar.update(learner.chunk_steps, loss)
          step = int(np.max(np.asarray(state.step)))
          reporter.scalar("train/loss", loss, step)
          nxt = start + learner.chunk_steps
          last = epoch == learner.epochs - 1 and nxt >= learner.epoch_steps
          ended = nxt >= n_steps  # the epoch's last step has run
          if (every_eval and ran_np.any() and (nxt % every_eval == 0 or ended)
              and not (ended and epoch == learner.epochs - 1)):
            # (The experience's end is evaluated below, after its hook.)
            t1 = time.perf_counter()
            add_point(i, learner.eval_fn(state, test), step,
                      exposed=None if "curve_exposed" not in curve
                      or epoch else exposed_before | (first_step < nxt))
            inside_eval = time.perf_counter() - t1
            eval_time += inside_eval
            t0 += inside_eval  # not training time
          every = learner.checkpoint_every_steps
          if every > 0 and not last and (nxt % every == 0 or
                                         nxt >= learner.epoch_steps):
            # The experience's end is saved after its evaluation below.
            save(state, checkpoint.Position(i, "train", epoch, nxt)
                 if nxt < learner.epoch_steps else
                 checkpoint.Position(i, "train", epoch + 1, 0))
        if s.monitors:
          # FACIL's patience scheme on the held-out rows (jaxcl.plateau).
          loss = float(learner.monitor_fn(state, held))
          scheme, action = plateau.update(scheme, loss, **scheme_kw)
          step = int(np.asarray(state.step))
          reporter.scalar("plateau/held_out_loss", loss, step)
          reporter.scalar("plateau/learning_rate", scheme.lr, step)
          if action == "best":
            best = jax.tree.map(jnp.copy, (state.params, state.model_state))
          elif action == "decay":
            params, model_state = jax.tree.map(jnp.copy, best)
            state = settle(set_learning_rate(state.replace(
                params=params, model_state=model_state), scheme.lr))
          elif action == "stop":
            break
      if s.monitors:  # the experience ends with its best model
        # (No copy: `best` is not read again once it is in the state.)
        params, model_state = best
        state = settle(state.replace(params=params, model_state=model_state))
      bar.close()
      t1 = time.perf_counter()
      with (reporter.waiting(
          f"experience {i + 1}/{n_train}: {s.strategy_name}'s own work "
          "after the experience") if hasattr(reporter, "waiting")
            else contextlib.nullcontext()):
        state = _host_hook(
            strategy.after_experience, ctx, state, exps, members,
            _hook_progress(reporter, f"experience {i + 1}/{n_train}, "
                           f"{s.strategy_name} after it", members))
        # Wait for the hook's dispatched work (RanPAC's eigh, a Fisher), so
        # its time counts as training, not as the evaluation that reads it.
        state = jax.block_until_ready(settle(state))
      if hasattr(reporter, "after_experience"):
        # (GDumb learns only here; EEIL's fine-tuning, a Fisher, ... take
        # time the experience's bar did not show.)
        reporter.after_experience(i, time.perf_counter() - t1)
      train_time += time.perf_counter() - t0
      t0 = time.perf_counter()
      out = (learner.end_eval_fn(state, test) if ends else
             learner.eval_fn(state, test))
      at = (slice(None),) * bool(members) + (i,)  # experience i's entry
      for k, v in ends.items():
        v[at] = np.asarray(out[k])
      acc[..., i, :] = np.asarray(_accuracy_row(out))
      eval_time += time.perf_counter() - t0
      step = int(np.max(np.asarray(state.step)))
      if every_eval:
        add_point(i, out, step)
      if "task_accuracy" in ends and hasattr(reporter, "task_accuracy"):
        # (Before the row: the reporter prints them on one line.)
        reporter.task_accuracy(
            i, _mean_row(ends["task_accuracy"][at], members))
      reporter.experience(i, _mean_row(acc[..., i, :], members), step)
      if "confusion" in ends and hasattr(reporter, "confusion"):
        # (A reporter of one's own may predate this method.)
        reporter.confusion(i, _mean_row(ends["confusion"][at], members))
      save(state, checkpoint.Position(i + 1, "begin"))
  finally:
    if ckpt is not None:
      ckpt.close()
  run_curve = (_curve(random_acc, curve["curve_accuracy"],
                      curve["curve_step"], curve.get("curve_exposed"))
               if every_eval else None)
  run_conf, run_task = ends.get("confusion"), ends.get("task_accuracy")
  recency = _recency_classes(sc)

  def run_summary(m=None):
    pick = (lambda a: a) if m is None else (lambda a: a[m])
    out = metrics.summary(pick(acc), pick(random_acc), sizes)
    if run_curve is not None:
      out.update(metrics.continual_summary(
          run_curve.step, run_curve.experience, pick(run_curve.accuracy)))
      x = None if run_curve.exposed is None else pick(run_curve.exposed)
      # Not with unknown points (an older checkpoint's: NaN).
      if x is not None and not np.isnan(x[1:]).any():
        out["a_auc"] = metrics.exposed_anytime_accuracy(run_curve.step, x)
    last = None if run_conf is None else pick(run_conf)[-1]
    # Not with unknown counts (-1: an older checkpoint's), nor when no
    # example of the last classes was counted (every prediction outside
    # the classes, which the matrix does not count).
    if (last is not None and recency is not None and last.min() >= 0
        and last[recency[1]].sum() > 0):
      out["recency_bias"] = metrics.recency_bias(last, *recency)
    if run_task is not None and not np.isnan(pick(run_task)[-1]).any():
      out["task_acc"] = metrics.average_accuracy(pick(run_task))
    return out

  if members:
    summary = {}
    for m in range(members):
      for k, v in run_summary(m).items():
        summary.setdefault(k, []).append(v)
  else:
    summary = run_summary()
  times = {"total": time.perf_counter() - t_start, "train": train_time,
           "eval": eval_time, "before": before}
  result = Result(acc, random_acc, summary, state, times, learner, run_curve,
                  run_conf, run_task, sizes)
  if members:  # the run directory shows the mean over the sweep's runs
    reporter.finish(dataclasses.replace(
        map_runs(result, lambda a: a.mean(0)),
        metrics={k: float(np.mean(v)) for k, v in summary.items()}))
  else:
    reporter.finish(result)
  return result
