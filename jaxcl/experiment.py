"""Build a run from an ml_collections config and stream it.

``run(config, workdir)`` is what ``jaxcl run`` calls: it loads the data,
builds the scenario, model, optimiser and strategy by name, and trains the
stream experience by experience, evaluating all test sets after each one.
Side effects (files, progress bars) go through :mod:`jaxcl.report` and
:mod:`jaxcl.checkpoint`; the training math is in :mod:`jaxcl.train`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from jaxcl import datasets, metrics, models, scenarios, strategies
from jaxcl.scenarios import Scenario
from jaxcl.state import TrainState
from jaxcl.train import (ConfigError, Learner, NonFiniteLossError,
                         device_experience, init_state, make_context,
                         make_learner, make_optimizer, stream_info,
                         test_arrays, unalias)

__all__ = ["default_config", "build_scenario", "Setup", "setup", "run",
           "Result", "SCENARIO_TYPES"]

SCENARIO_TYPES = ("split", "permuted", "rotated")


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
  ))
  c.scenario = ml_collections.ConfigDict(dict(
      type="split",       # split | permuted | rotated
      kind="class",       # class | task | domain
      n_experiences=5,
      class_order=(),     # () for 0..C-1 (or order_seed's permutation)
      order_seed=-1,      # >=0: a seeded random class order
      online=False,       # one pass (set train.epochs=1, small batch)
      angles=(),          # rotated: explicit angles in degrees
      seed=0,             # permutations / angles
  ))
  c.model = ml_collections.ConfigDict(dict(
      name="mlp",
      widths=(400, 400),  # mlp
      channels=(32, 64),  # cnn
      hidden=128,         # cnn
      width=20,           # resnet18
      multi_head=False,   # one head per task (task-incremental)
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.0,
      schedule="constant"))
  c.train = ml_collections.ConfigDict(dict(
      epochs=2, batch_size=32, eval_batch_size=500, reset_optimizer=True))
  # strategy.name: a name or names joined by '+'; strategy.<name>: kwargs.
  c.strategy = ml_collections.ConfigDict(dict(name="naive"))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=0,      # >0: also save every N steps inside experiences
      keep=3,             # checkpoints kept
  ))
  c.report = ml_collections.ConfigDict(dict(tensorboard=True, plots=True,
                                            progress=True))
  return c


# --------------------------------------------------------------------------
# Building blocks from the config.


def build_scenario(config: ml_collections.ConfigDict) -> Scenario:
  """Loads the data set and builds the (untransformed) scenario."""
  dc, sc = config.dataset, config.scenario
  data = datasets.load(dc.name, data_dir=dc.data_dir or None)
  if dc.train_subset or dc.test_subset:
    data = data.subset(dc.train_subset or None, dc.test_subset or None,
                       seed=config.seed)
  if sc.type == "split":
    s = scenarios.split(
        data, sc.n_experiences, kind=sc.kind,
        class_order=tuple(sc.class_order) or None,
        seed=sc.order_seed if sc.order_seed >= 0 else None)
  elif sc.type == "permuted":
    s = scenarios.permuted(data, sc.n_experiences, kind=sc.kind, seed=sc.seed)
  elif sc.type == "rotated":
    s = scenarios.rotated(data, sc.n_experiences, kind=sc.kind,
                          angles=tuple(sc.angles) or None, seed=sc.seed)
  else:
    raise ConfigError(f"unknown scenario type {sc.type!r}; valid: "
                      f"{list(SCENARIO_TYPES)}")
  return scenarios.online(s) if sc.online else s


def _model_kwargs(mc: ml_collections.ConfigDict) -> dict[str, Any]:
  fields = {"mlp": ("widths",), "cnn": ("channels", "hidden"),
            "resnet18": ("width",)}.get(mc.name)
  if fields is None:  # a model module: its kwargs in config.model.<name>
    return dict(mc.get(mc.name, {}))
  out = {}
  for f in fields:
    v = mc[f]
    out[f] = tuple(v) if isinstance(v, (list, tuple)) else v
  return out


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built from a config."""
  config: ml_collections.ConfigDict
  scenario: Scenario          # the scenario experiences train on
  learner: Learner
  strategy_name: str


def setup(config: ml_collections.ConfigDict,
          scenario: Scenario | None = None,
          strategy: "strategies.Strategy | None" = None) -> Setup:
  """Builds scenario, model, optimiser, strategy and the compiled learner.

  ``strategy`` (a record, e.g. ``chain(...)`` built in a script) replaces
  the one named by ``config.strategy``.

  Raises:
    ConfigError / ValueError: any bad name or value, naming it and the
      valid choices.
  """
  base = scenario if scenario is not None else build_scenario(config)
  if strategy is None:
    skw = {k: dict(v) for k, v in config.strategy.items() if k != "name"}
    strategy, transform = strategies.from_spec(config.strategy.name, skw)
    sc = transform(base)
  else:
    sc = base
  tc = config.train
  smallest = min(e.num_train for e in sc.experiences)
  if tc.batch_size > smallest:
    raise ConfigError(
        f"train.batch_size={tc.batch_size} is larger than the smallest "
        f"experience ({smallest} training examples); use at most {smallest}")
  heads = sc.num_tasks if config.model.multi_head else 1
  if config.model.multi_head and sc.kind != "task":
    raise ConfigError("model.multi_head=True needs a task-incremental "
                      f"scenario (scenario.kind='task'), got {sc.kind!r}")
  model = models.build(config.model.name, sc.num_classes, num_heads=heads,
                       **_model_kwargs(config.model))
  oc = config.optimizer
  info = stream_info(sc, tc.batch_size)
  steps = -(-info.train_size // tc.batch_size) * tc.epochs
  tx = make_optimizer(oc.name, oc.learning_rate, momentum=oc.momentum,
                      weight_decay=oc.weight_decay, schedule=oc.schedule,
                      schedule_steps=steps)
  ctx = make_context(model, tx, info)
  epochs = 1 if sc.online else tc.epochs
  learner = make_learner(ctx, strategy, epochs=epochs,
                         eval_batch_size=tc.eval_batch_size,
                         checkpoint_every_steps=config.checkpoint.every_steps,
                         reset_optimizer=tc.reset_optimizer)
  return Setup(config, sc, learner, strategy.name)


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
    times: wall-clock seconds: ``total``, ``train`` (incl. compilation),
      ``eval``.
    learner: the compiled functions of the run (to reuse or inspect).
  """
  accuracy: np.ndarray
  random_accuracy: np.ndarray
  metrics: dict[str, float]
  state: TrainState
  times: dict[str, float]
  learner: Learner | None = None


def _check_finite(losses, ran, experience, epoch, first_step):
  losses, ran = np.asarray(losses), np.asarray(ran)
  bad = np.flatnonzero(ran & ~np.isfinite(losses))
  if bad.size:
    raise NonFiniteLossError(
        f"non-finite loss {losses[bad[0]]} in experience {experience}, "
        f"epoch {epoch}, step {first_step + int(bad[0])} of the epoch; "
        "lower the learning rate or check the strategy's hyperparameters")


def run(config: ml_collections.ConfigDict, workdir: str | None = None, *,
        scenario: Scenario | None = None,
        strategy: "strategies.Strategy | None" = None,
        reporter: Any = None) -> Result:
  """Trains the configured stream and evaluates after each experience.

  Args:
    config: a config like :func:`default_config`.
    workdir: run directory for logs, plots and checkpoints (None: nothing is
      written).
    scenario: use this scenario instead of building one from the config.
    strategy: use this strategy record instead of ``config.strategy``.
    reporter: a :class:`jaxcl.report.Reporter` (built from ``workdir`` when
      None and ``workdir`` is given).
  """
  from jaxcl import report  # side effects live at the edges

  t_start = time.perf_counter()
  s = setup(config, scenario, strategy)
  if reporter is None and workdir:
    reporter = report.Reporter(workdir, config)
  reporter = reporter or report.NullReporter()
  learner, sc = s.learner, s.scenario
  ctx, strategy = learner.ctx, learner.strategy
  state = init_state(ctx, strategy, config.seed)
  test = jax.device_put(test_arrays(sc.eval_experiences,
                                    learner.eval_batch_size))
  t_eval = time.perf_counter()
  random_acc = np.asarray(learner.eval_fn(state, test))
  eval_time = time.perf_counter() - t_eval
  n_train, n_test = len(sc.experiences), len(sc.eval_experiences)
  acc = np.full((n_train, n_test), np.nan)
  size = ctx.info.train_size
  train_time = 0.0
  for i, exp in enumerate(sc.experiences):
    t0 = time.perf_counter()
    state = strategy.before_experience(ctx, state, exp)
    if learner.reset_optimizer:
      state = state.replace(opt_state=ctx.tx.init(state.params))
    state = unalias(state)
    data = jax.device_put(device_experience(exp, size))
    total = learner.epochs * learner.epoch_steps
    bar = reporter.progress(total, f"experience {i + 1}/{n_train}")
    for epoch in range(learner.epochs):
      for start in range(0, learner.epoch_steps, learner.chunk_steps):
        state, losses, ran = learner.chunk_fn(state, data, exp.num_train, i,
                                              epoch, start)
        _check_finite(losses, ran, i, epoch, start)
        ran_np = np.asarray(ran)
        loss = float(np.asarray(losses)[ran_np].mean()) if ran_np.any() else 0.
        bar.update(learner.chunk_steps, loss)
        reporter.scalar("train/loss", loss, int(state.step))
    bar.close()
    state = strategy.after_experience(ctx, state, exp)
    train_time += time.perf_counter() - t0
    t0 = time.perf_counter()
    acc[i] = np.asarray(learner.eval_fn(state, test))
    eval_time += time.perf_counter() - t0
    reporter.experience(i, acc[i], int(state.step))
  summary = metrics.summary(acc, random_acc)
  times = {"total": time.perf_counter() - t_start, "train": train_time,
           "eval": eval_time}
  result = Result(acc, random_acc, summary, state, times, learner)
  reporter.finish(result)
  return result
