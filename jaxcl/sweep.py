"""Many runs in one program: seeds and hyperparameters under ``jax.vmap``.

A run is ``state -> state``, so k runs are one run over k stacked states:
the compiled experience program is ``vmap``-ed over the leading axis and
every run shares the data on the device. What may differ between runs is
what lives in the state:

* ``seed`` — initial parameters, shuffling, every random key;
* ``optimizer.learning_rate`` — an injected optax hyperparameter;
* a strategy hyperparameter that the strategy keeps in its state as a field
  of the same name (e.g. ``strategy.ewc.lam`` when ``EWCState`` has a
  ``lam`` leaf). Hyperparameters that only live in a factory's closure
  cannot differ inside one program; asking to sweep one is an error, not a
  silently shared value.

Host-side hooks (Fisher estimation, consolidation, ...) run per run on that
run's slice of the state.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import experiment, report
from jaxcl.train import ConfigError

__all__ = ["sweep", "plan", "Plan", "SweepResult", "parse_values",
           "summarise"]


@dataclasses.dataclass
class SweepResult:
  """What a sweep returns.

  Attributes:
    members: per run, ``{'seed': s, <key>: value, ...}``.
    accuracy: ``(k, T, E)`` accuracy matrices, one per run.
    metrics: per run, the metrics of its matrix (and of its curve, with
      continual evaluation: ``result.curve`` holds one per run).
    groups: per hyperparameter setting, mean and standard error over
      seeds of each metric: ``{'setting': {...}, 'n': ..., 'acc': (mean,
      se), ...}``.
    times: wall-clock seconds of the whole sweep.
    result: the underlying :class:`jaxcl.experiment.Result`.
  """
  members: list[dict[str, Any]]
  accuracy: np.ndarray
  metrics: list[dict[str, float]]
  groups: list[dict[str, Any]]
  times: dict[str, float]
  result: Any


def parse_values(specs: Sequence[str]) -> dict[str, list[Any]]:
  """``['optimizer.learning_rate=0.01,0.1']`` -> ``{'optimizer.lea...':
  [0.01, 0.1]}`` (numbers parsed as floats)."""
  out = {}
  for spec in specs:
    key, sep, vals = spec.partition("=")
    if not sep or not vals:
      raise ConfigError(f"bad sweep spec {spec!r}; expected KEY=V1,V2,...")
    key = key.strip()
    try:
      out[key] = [float(v) for v in vals.split(",")]
      if any(math.isnan(v) for v in out[key]):
        raise ValueError
    except ValueError:
      raise ConfigError(
          f"sweep {key!r}: values must be numbers, got {vals!r} (one "
          "program sweeps numeric hyperparameters only; run separate jobs "
          "for names or shapes)") from None
  return out


def parse_seeds(items: Sequence[str]) -> list[int]:
  """``['0', '1']`` -> ``[0, 1]``, naming a seed that is not an integer."""
  seeds = []
  for s in items:
    try:
      seeds.append(int(s))
    except ValueError:
      raise ConfigError(f"--seeds: {s!r} is not an integer seed") from None
  return seeds


def _get(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _state_fields(tree: Any, name: str) -> list[tuple]:
  """Paths of NamedTuple fields called ``name`` inside a strategy state."""
  hits = []

  def visit(node, path):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      for f in node._fields:
        if f == name:
          hits.append(path + (f,))
        visit(getattr(node, f), path + (f,))
    elif isinstance(node, (tuple, list)):
      for i, v in enumerate(node):
        visit(v, path + (i,))
    elif isinstance(node, dict):
      for k, v in node.items():
        visit(v, path + (k,))

  visit(tree, ())
  return hits


def _set_path(node, path, value):
  if not path:
    return value
  head, rest = path[0], path[1:]
  if isinstance(node, tuple) and hasattr(node, "_fields") and isinstance(
      head, str):
    return node._replace(**{head: _set_path(getattr(node, head), rest,
                                            value)})
  if isinstance(node, (tuple, list)):
    items = list(node)
    items[head] = _set_path(items[head], rest, value)
    return type(node)(items)
  new = dict(node)
  new[head] = _set_path(node[head], rest, value)
  return new


def _apply_override(state, key: str, value: float, strategy_names):
  if key == "optimizer.learning_rate":
    hp = dict(state.opt_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(value, hp["learning_rate"].dtype)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hp))
  parts = key.split(".")
  if len(parts) == 3 and parts[0] == "strategy" and parts[1] in \
      strategy_names:
    hits = _state_fields(state.strategy, parts[2])
    if len(hits) == 1:
      old = state.strategy
      for p in hits[0]:
        old = getattr(old, p) if isinstance(p, str) else old[p]
      new = jnp.asarray(value, getattr(old, "dtype", jnp.float32))
      return state.replace(strategy=_set_path(state.strategy, hits[0], new))
  raise ConfigError(
      f"cannot sweep {key!r} in one vmapped program: sweepable are the "
      "seeds (their own argument, --seeds), 'optimizer.learning_rate' and "
      "strategy hyperparameters that the strategy keeps in its state "
      "(strategy.<name>.<field>); run separate jobs for the others")


def _no_repeats(what: str, items: list[Any]) -> None:
  seen = set()
  for x in items:
    if x in seen:
      raise ConfigError(f"{what}: {x!r} is given twice in {items}")
    seen.add(x)


def _with_setting(config, setting: dict[str, float]):
  """A copy of ``config`` with one grid setting written in (cast to the
  field's type where the config has the field)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for k, v in setting.items():
      node = c
      *path, last = k.split(".")
      for p in path:
        if p not in node:
          node[p] = {}
        node = node[p]
      old = node.get(last)
      if old is None or isinstance(old, bool):
        node[last] = v
        continue
      cast = type(old)(v)
      if cast != v:  # the state gets v itself; check that, not int(v)
        raise ConfigError(
            f"sweep {k!r}: {v!r} is not of type {type(old).__name__}, the "
            f"type of the config's value {old!r}")
      node[last] = cast
  return c


def _check_setting(config) -> None:
  """The optimiser and strategy factories' own checks of a setting's
  values (no tracing): a negative rate or strength is refused here as it
  is for a single run."""
  experiment.build_optimizer(config, schedule_steps=1)
  experiment.build_strategy(config)


# Scenario types whose draw (config.scenario.seed) changes only the
# training and test inputs (permuted, rotated) or which training examples
# each experience deals (blurry), not the stream's shape.
DRAWN_SCENARIOS = ("permuted", "rotated", "blurry")


def _draws(config, seeds: Sequence[int]) -> dict[int, Any]:
  """Each seed's own draw of the configured permuted / rotated / blurry
  stream."""
  sc = config.scenario
  if sc.type not in DRAWN_SCENARIOS or (sc.type == "rotated" and
                                        tuple(sc.angles)):
    raise ConfigError(
        f"scenario_per_seed draws each seed's permutations, angles or "
        f"blurry deal (config.scenario.seed = the run's seed); it needs "
        f"scenario.type in "
        f"{list(DRAWN_SCENARIOS)} without explicit angles, got "
        f"{sc.type!r}" + (f" with angles {tuple(sc.angles)}"
                          if tuple(sc.get("angles", ())) else ""))
  # One data set (and subset, drawn from the config's own seed) for all:
  # the draws must share their labels.
  data = experiment.load_data(config)
  out = {}
  for seed in seeds:
    c = copy.deepcopy(config)
    c.scenario.seed = seed
    out[seed] = experiment.build_scenario(c, data)
  return out


@dataclasses.dataclass
class Plan:
  """A sweep checked and built, not trained (:func:`plan`).

  Attributes:
    members: per run, ``{'seed': s, <key>: value, ...}``, in training
      order (settings outer, seeds inner).
    settings: the grid's hyperparameter settings, one per group.
    setup: the first run's setup, whose program all runs share.
    member_scenarios: with ``scenario_per_seed``, each run's own stream;
      else None (the runs share ``setup.scenario``).
  """
  members: list[dict[str, Any]]
  settings: list[dict[str, Any]]
  setup: experiment.Setup
  member_scenarios: list[Any] | None

  def fingerprint_extra(self) -> dict[str, Any]:
    """What a sweep's checkpoints record beyond the config: its runs (and
    ``sweep.vmapped: False`` for one run, trained unstacked)."""
    extra = {"sweep.members": self.members}
    if self.member_scenarios is not None:
      extra["sweep.scenario_per_seed"] = True
    if len(self.members) == 1:
      extra["sweep.vmapped"] = False
    return extra

  def initial_states(self) -> list[Any]:
    """Each run's fresh state, its swept values written in; raises
    ConfigError for a key that is not in the state (a value only a
    factory's closure holds cannot differ inside one program)."""
    names = [n.strip()
             for n in self.setup.config.strategy.name.split("+")]
    states = []
    for m in self.members:
      st = experiment.initial_state(self.setup, m["seed"])
      for k in sorted(self.settings[0]):
        st = _apply_override(st, k, m[k], names)
      states.append(st)
    return states


def plan(config, seeds: Sequence[int] = (0,),
         values: dict[str, Sequence[float]] | None = None,
         workdir: str | None = None, scenario=None,
         scenario_per_seed: bool = False) -> Plan:
  """Checks a sweep's grid and builds its shared setup, training nothing
  (:func:`sweep` trains it; ``jaxcl sweep --dry_run`` prints it). The
  arguments are :func:`sweep`'s."""
  values = dict(values or {})
  if workdir:
    experiment.check_workdir(workdir)
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ConfigError("a sweep needs at least one seed")
  if min(seeds) < 0:  # numpy's generators refuse them, after training starts
    raise ConfigError(f"seeds must be >= 0, got {seeds}")
  # A repeated seed or value would be counted twice in the mean and its
  # standard error.
  _no_repeats("seeds", seeds)
  for key, vals in values.items():
    if key == "seed":  # the members' own seeds: a value would replace them
      raise ConfigError(
          f"sweep 'seed': give the seeds as seeds (jaxcl sweep --seeds "
          f"{','.join(str(v).removesuffix('.0') for v in vals)}), not as "
          "values")
    if not vals:
      raise ConfigError(f"sweep {key!r}: no values given")
    _no_repeats(f"sweep {key!r} values", list(vals))
    if key.startswith("strategy."):
      continue  # strategy hyperparameters may be left at their defaults
    try:
      _get(config, key)
    except (KeyError, AttributeError):
      raise ConfigError(f"sweep key {key!r} is not a config field") from None
  keys = sorted(values)
  settings = [dict(zip(keys, combo)) for combo in
              itertools.product(*(values[k] for k in keys))]
  members = [{"seed": s, **setting} for setting in settings for s in seeds]

  # The first member's config builds the shared program; the others must
  # differ only in what the state carries. Their values are written into
  # the state, past the checks of the optimiser and strategy factories, so
  # each setting is built through those factories first.
  configs = [_with_setting(config, setting) for setting in settings]
  for c in configs:
    _check_setting(c)
  base = configs[0]
  member_scenarios = None
  if scenario_per_seed:
    if scenario is not None:
      raise ConfigError("scenario_per_seed builds each seed's scenario from "
                        "the config; do not pass a prebuilt scenario")
    # One setup per seed (the strategy's transform, e.g. Cumulative,
    # applied to its draw): the runs of a seed share its experiences, and
    # the first run's setup is the program's.
    setups = {seed: experiment.setup(base, sc)
              for seed, sc in _draws(base, seeds).items()}
    member_scenarios = [setups[m["seed"]].scenario for m in members]
    s = setups[members[0]["seed"]]
  else:
    s = experiment.setup(base, scenario)
  return Plan(members, settings, s, member_scenarios)


def sweep(config, seeds: Sequence[int] = (0,),
          values: dict[str, Sequence[float]] | None = None,
          workdir: str | None = None, scenario=None,
          scenario_per_seed: bool = False) -> SweepResult:
  """Trains the grid ``seeds x values`` as one vmapped program (a grid of
  one run is trained without vmap, with results shaped as a sweep's).

  Args:
    config: the base config (its own ``seed`` is replaced by ``seeds``).
    seeds: the seeds of the runs.
    values: hyperparameter grid, e.g. ``{'optimizer.learning_rate': [0.01,
      0.1]}``.
    workdir: run directory (checkpoints, ``sweep.json``).
    scenario: a prebuilt scenario.
    scenario_per_seed: each run trains and is tested on its seed's own draw
      of a permuted or rotated stream (``config.scenario.seed`` set to the
      run's seed, as Mammoth draws them per run), or trains on its own
      deal of a blurry stream (Koh et al.'s ``rand1``-``rand3``), still in
      one program.
      A ``dataset.train_subset`` stays the one drawn from
      ``config.seed``, shared by the runs.
      The runs' data are then stacked, not shared: host and device memory
      grow with the number of runs (a Permuted-20 MNIST run's test sets
      are 627 MB).

  Returns:
    A :class:`SweepResult` with each run's accuracy matrix and the mean ±
    standard error over seeds per hyperparameter setting.
  """
  p = plan(config, seeds, values, workdir, scenario, scenario_per_seed)
  s, members, settings = p.setup, p.members, p.settings
  member_scenarios = p.member_scenarios
  states = p.initial_states()
  extra = p.fingerprint_extra()
  if len(members) == 1:
    # One run is not vmapped: under vmap every lax.cond on the state (a
    # skipped padding step, GEM's projection, a one-task batch) becomes a
    # select that runs both branches. The result is stacked as a sweep's.
    one = experiment.execute(s, states[0], workdir, fingerprint_extra=extra)
    result = dataclasses.replace(
        experiment.map_runs(one, lambda a: a[None]),
        metrics={k: [v] for k, v in one.metrics.items()},
        state=jax.tree.map(lambda a: a[None], one.state))
  else:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    result = experiment.execute(s, stacked, workdir, members=len(members),
                                fingerprint_extra=extra,
                                member_scenarios=member_scenarios)
  per_run = [{k: v[i] for k, v in result.metrics.items()}
             for i in range(len(members))]
  groups = []
  for setting in settings:
    idx = members_of(members, setting)
    groups.append({"setting": setting, "n": len(idx),
                   **summarise([per_run[i] for i in idx])})
  out = SweepResult(members, np.asarray(result.accuracy), per_run, groups,
                    result.times, result)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
      curve = result.curve
      json.dump({"members": members, "accuracy": out.accuracy.tolist(),
                 "evaluated_on": report.evaluated_on(config),
                 "metrics": per_run, "groups": groups,
                 **({} if curve is None else {"curve": {
                     "step": curve.step.tolist(),
                     "experience": curve.experience.tolist(),
                     "accuracy": np.asarray(curve.accuracy).tolist(),
                     **({} if curve.exposed is None else {
                         "exposed": report.json_lists(curve.exposed)})}}),
                 **report.task_accuracy_json(result),
                 "times": result.times}, f, indent=2)
  return out


def members_of(members: Sequence[dict[str, Any]],
               setting: dict[str, Any]) -> list[int]:
  """The indices of the runs of ``members`` that have ``setting``'s values
  (one group of the sweep's ``groups``)."""
  return [i for i, m in enumerate(members)
          if all(m.get(k) == v for k, v in setting.items())]


def summarise(per_run: Sequence[dict[str, float]]
              ) -> dict[str, tuple[float, float]]:
  """``{metric: (mean, standard error)}`` over runs' metrics (se 0 for one
  run)."""
  out = {}
  for metric in per_run[0]:
    v = np.array([r[metric] for r in per_run])
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    out[metric] = (float(v.mean()), se)
  return out


def format_groups(groups: list[dict[str, Any]]) -> str:
  """The per-setting mean ± standard error as a plain-text table."""
  lines = []
  for g in groups:
    setting = ", ".join(f"{k}={v}" for k, v in g["setting"].items()) or \
        "(base config)"
    stats = "  ".join(f"{m} {v[0]:.4f} ± {v[1]:.4f}" for m, v in g.items()
                      if m not in ("setting", "n"))
    lines.append(f"{setting} [n={g['n']}]: {stats}")
  return "\n".join(lines)
