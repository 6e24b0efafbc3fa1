"""The ``jaxcl`` command.

  jaxcl run [--config FILE[:ARGS]] [--config.KEY=VALUE ...] [--workdir DIR]
            [--resume | --noresume] [--dry_run]
  jaxcl sweep [--config ...] --seeds 0,1,2 [--values KEY=V1,V2 ...]
            [--scenario_per_seed] [--workdir DIR] [--dry_run]
  jaxcl methods [NAME ... | --markdown]
  jaxcl compare DIR ... [--markdown] [--metrics acc,bwt,...] [--plot FILE]

``sweep`` trains every (seed, value) run as one vmapped program and reports
each run's metrics and the mean ± standard error over seeds.

``--dry_run`` builds and checks the run (data, stream, model, optimiser,
strategy, the initial state; a sweep's whole grid) and prints the
resolved config and what would be trained, then stops: nothing is trained
and nothing is written.

``methods`` lists the strategies by family; with names, it prints each
one's paper, arguments and defaults (``--markdown``: docs/methods.md).

``compare`` reads finished run directories (a sweep's: one row per
hyperparameter setting, mean ± standard error over its seeds) and prints
their metrics side by side (``--markdown``: a Markdown table;
``--metrics``: these columns, in this order); ``--plot`` also draws their
average accuracy over the experiences seen (and, when every run has one,
the continual-evaluation curves) to FILE.

``--config`` is an ml_collections config file defining ``get_config(arg)``
(see ``experiments/``); without it the default experiment runs (Split
Digits, no download). Every config field can be overridden on the command
line. The run directory (default ``runs/<name>-<time>``) receives the
resolved config, logs, TensorBoard events, the accuracy matrix and plots.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")
COMMANDS = ("run", "sweep", "methods", "compare")

# Defined in main(): ml_collections applies --config.<path> overrides when
# the flag is defined, and a path the config lacks must be reported there.
_CONFIG = None
# --config.strategy.<name>.<arg> and --config.model.<name>.<arg> overrides,
# applied by this module (see _split_node_overrides): (section, name, arg,
# text) in command-line order.
_NODE_ARGS: list[tuple[str, str, str, str]] = []
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: runs/<config name>-<time>). "
    "A directory that holds checkpoints of the same config is resumed.")
_RESUME = flags.DEFINE_bool(
    "resume", None, "Require a checkpoint to resume (--noresume: refuse to "
    "start in a directory that has one). Default: resume when one exists.")

_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Build and check the run (data, stream, model, "
    "optimiser, strategy, initial state; a sweep's grid), print the resolved "
    "config and what would be trained, and stop: nothing is trained or "
    "written.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (run the "
    "same command on every host of a multi-host job).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"],
                           "sweep: seeds of the runs (comma-separated).")
_PER_SEED = flags.DEFINE_bool(
    "scenario_per_seed", False, "sweep: each run trains on its seed's own "
    "draw of a permuted / rotated / blurry stream (permutations, angles, "
    "which examples are dealt where), still in one vmapped program; the "
    "runs' data are stacked, not shared.")
_VALUES = flags.DEFINE_multi_string(
    "values", [], "sweep: KEY=V1,V2,... hyperparameter values (repeatable); "
    "the grid is seeds x all values.")

USAGE = __doc__


_UNNAMED = ("report.", "checkpoint.", "dataset.data_dir")


def _run_name(config) -> str:
  """The config's name followed by the command line's overrides, as
  ``split_digits_naive,strategy.name=ewc,train.epochs=1``: a run of a config
  with another strategy or setting is not named as the config alone. An
  explicit ``--config.name`` is used as it is."""
  name = config.get("name", "run")
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  if "name" in overrides:
    return name
  def text(v):  # (400, 400) -> 400-400
    return "-".join(map(str, v)) if isinstance(v, (tuple, list)) else v
  # Settings of the outputs, not of the experiment, are left out.
  parts = [f"{k}={text(v)}" for k, v in overrides.items()
           if not k.startswith(_UNNAMED)]
  parts += [f"{section}.{node}.{arg}={text(_literal(value))}"
            for section, node, arg, value in _NODE_ARGS]
  if not parts:
    return name
  # A directory name: no path separators, spaces or brackets; bounded.
  suffix = re.sub(r"[^\w.=+,-]+", "", ",".join(parts))[:120]
  return f"{name},{suffix}"


def _default_workdir(name: str) -> str:
  return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


# The run directory of the command in progress, named when it is
# interrupted (a default directory has the time in its name, so the same
# command without --workdir would start afresh).
_ACTIVE_WORKDIR: list[str] = []


def _quiet_logs() -> None:
  # jax logs at INFO that it found no TPU; absl would print that to stderr.
  import logging
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  # orbax logs each checkpoint save at INFO through absl (~280 lines for
  # the default run, burying the progress bars and results): warnings
  # only, unless the user asks for more with --verbosity / -v.
  if not flags.FLAGS["verbosity"].present:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  if _MULTIHOST.value and not _DRY_RUN.value:  # a dry run joins no job
    from jaxcl import parallel
    parallel.initialize_multihost()


_NODE_ARG = re.compile(
    r"^--?config\.(strategy|model)\.(\w+)\.(\w+)(?:=(.*))?$", re.S)


def _split_node_overrides(
    args: list[str]) -> tuple[list[str], list[tuple[str, str, str, str]]]:
  """Takes ``--config.strategy.<name>.<arg>[=]VALUE`` and
  ``--config.model.<model name>.<arg>[=]VALUE`` out of ``args``.

  A strategy's arguments are fields of ``config.strategy.<name>``, and a
  model's of ``config.model.<name>``; a config defines them only for what
  it sets up (the default config for none), and ml_collections overrides
  only fields that exist. These overrides are applied after the config is
  loaded instead, so that ``--config.strategy.name=ewc
  --config.strategy.ewc.lam=1000`` or ``--config.model.name=masked_mlp
  --config.model.masked_mlp.mask=edge_popup`` work on any config; the
  strategy's factory and the model's builder check names and values. A
  ``model.<name>`` that names no model stays an unknown field.
  """
  from jaxcl import models
  rest, found, i = [], [], 0
  while i < len(args):
    m = _NODE_ARG.match(args[i])
    if m is None or (m.group(1) == "model"
                     and m.group(2) not in models.available()):
      rest.append(args[i])
    elif m.group(4) is not None:
      found.append((m.group(1), m.group(2), m.group(3), m.group(4)))
    elif i + 1 < len(args):  # --config.strategy.ewc.lam 1000
      found.append((m.group(1), m.group(2), m.group(3), args[i + 1]))
      i += 1
    else:
      raise ValueError(f"{args[i]} needs a value")
    i += 1
  return rest, found


def _literal(text: str):
  """``'1000'`` -> 1000, ``'(16,)'`` -> (16,), ``'True'`` -> True; anything
  that is not a Python literal stays a string (``exact``)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _factory_default(name: str, arg: str):
  from jaxcl import strategies
  if name not in strategies.available():
    return None  # from_spec names the unknown strategy
  return strategies.defaults(name).get(arg)


def _config():
  """The parsed config with the strategy and model overrides written in."""
  config = _CONFIG.value
  try:
    config.get("name")
  except OSError as e:
    # ml_collections defers a config file it could not read (missing, a
    # folder) to the first access, as an OSError whose message ends with
    # the cause: name the file and the cause in one line.
    cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    raise ValueError(
        f"--config {flags.FLAGS['config'].config_filename}: cannot read the "
        f"config file ({cause}); give a Python file defining get_config(), "
        "e.g. experiments/split_mnist_baselines.py") from None
  # A setting the rest of the config ignores (another backbone's size,
  # plain SGD's momentum), given on the command line, would change nothing
  # (config files may keep such values for when they are switched).
  from jaxcl import experiment
  given = list(config_flags.get_override_values(flags.FLAGS["config"])) + [
      f"{section}.{name}.{arg}" for section, name, arg, _ in _NODE_ARGS]
  if not _NODE_ARGS:
    experiment.check_overrides(config, given)
    return config
  with config.unlocked():
    for section, name, arg, text in _NODE_ARGS:
      if name not in config[section]:
        config[section][name] = {}
      node, value = config[section][name], _literal(text)
      # lam=1000 where the config or the factory has a float: 1000.0, so
      # the config (and the checkpoint fingerprint) reads the same as
      # lam=1000.0 would.
      old = node.get(arg, _factory_default(name, arg)
                     if section == "strategy" else None)
      if isinstance(old, float) and isinstance(value, int) and not \
          isinstance(value, bool):
        value = float(value)
      try:
        node[arg] = value
      except TypeError as e:  # ml_collections keeps a field's type
        raise ValueError(
            f"--config.{section}.{name}.{arg}={text}: {e}") from e
  experiment.check_overrides(config, given)
  return config


def _start() -> tuple[Any, str, str]:
  """``(config, name, workdir)`` of the command in progress (``run`` and
  ``sweep``), after quieting the logs (and joining a multi-host job); the
  directory is recorded for the message an interrupt prints."""
  _quiet_logs()
  config = _config()
  name = _run_name(config)
  workdir = _WORKDIR.value or _default_workdir(name)
  _ACTIVE_WORKDIR[:] = [workdir]
  return config, name, workdir


def _resume_note(workdir: str, resume: bool | None, config,
                 extra: dict[str, Any] | None = None) -> str:
  """What a run in ``workdir`` would start from (``resume``: --resume),
  from its checkpoints' metadata (``extra``: a sweep's fingerprint
  fields)."""
  d = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(d)
                 if n.isdigit()) if os.path.isdir(d) else []
  if not steps:
    return (f"{workdir}: no checkpoint; with --resume the run would refuse "
            "to start" if resume else
            f"{workdir}: no checkpoint; the run would start fresh")
  if resume is False:
    return (f"{workdir} holds checkpoints (steps {steps}); with --noresume "
            "the run would refuse to start")
  from jaxcl import checkpoint
  skipped = []
  ckpt = checkpoint.Checkpointer(
      workdir, checkpoint.run_fingerprint(config, extra),
      keep=config.checkpoint.keep, log=skipped.append)
  try:
    newest = ckpt.newest()
  finally:
    ckpt.close()
  lines = [f"  ({m.removeprefix('jaxcl: ')})" for m in skipped]
  if newest is None:
    head = (f"{workdir} holds checkpoints (steps {steps}) but none reads: "
            + ("with --resume the run would refuse to start" if resume else
               "the run would start fresh"))
  elif newest[2]:
    head = (f"{workdir}: its newest checkpoint (step {newest[0]}) comes from "
            "a different config; the run would refuse to start. "
            "Differences:\n  " + "\n  ".join(newest[2]))
  else:
    head = (f"{workdir}: the run would resume from checkpoint {newest[0]} "
            f"({newest[1].where()}), the config being the same")
  return "\n".join([head] + lines)


def _dry_run(config, name: str, workdir: str, describe,
             extra=None) -> None:
  """``--dry_run``: the resolved config and ``describe()``'s lines (the
  built run), with nothing trained or written; ``extra()``: a sweep's
  fingerprint fields, once it is built."""
  from jaxcl import checkpoint, experiment, strategies
  experiment.check_workdir(workdir)
  checkpoint.check_keep(config.checkpoint.keep)  # checked when it opens
  text = describe()  # builds first: a bad value fails before any output
  # One field per line, as --config.<field> overrides name them.
  fields = {k: repr(v) for k, v in
            checkpoint._flatten(config.to_dict()).items()}
  # The strategy's arguments as its factory gets them (some from the run:
  # train_epochs, aux_data_dir) and, marked, the defaults of the others,
  # so that every value of the run is on screen.
  given = experiment.strategy_kwargs(config)
  for member in {n.strip() for n in config.strategy.name.split("+")}:
    for arg, value in strategies.defaults(member).items():
      if arg in given.get(member, {}):
        fields[f"strategy.{member}.{arg}"] = repr(given[member][arg])
      else:
        fields[f"strategy.{member}.{arg}"] = f"{value!r} (default)"
  print(f"jaxcl: {name} -> {workdir} (dry run: nothing trained or "
        "written)\nconfig:")
  print("\n".join(f"  {k} = {v}" for k, v in sorted(fields.items())))
  print(text)
  print(_resume_note(workdir, _RESUME.value, config,
                     extra() if extra else None))


def _note_ignored(config) -> None:
  """Says, on stderr before the run starts, which values the config file
  keeps that the run ignores (a ResNet-32's ``model.width``, momentum with
  plain ``sgd``): a file may keep them deliberately, so they are not
  refused as command-line overrides are, but a run must not drop them
  silently. The dry run lists the same notes."""
  from jaxcl import experiment
  for why in experiment.ignored_settings(config):
    print(f"jaxcl: note: {why}", file=sys.stderr, flush=True)


def _run(argv) -> None:
  del argv
  config, name, workdir = _start()
  from jaxcl import experiment, report
  if _DRY_RUN.value:
    def describe():
      s = experiment.setup(config)
      experiment.run_mesh(s)  # the devices, as the run checks them
      return experiment.describe(s, experiment.initial_state(s, config.seed))
    _dry_run(config, name, workdir, describe)
    return
  print(f"jaxcl: {name} -> {workdir}", flush=True)
  _note_ignored(config)
  result = experiment.run(config, workdir, resume=_RESUME.value)
  split = report.evaluated_on(config)
  print(report.format_table(result.accuracy, result.metrics, split))
  if split != "test":
    print(f"(evaluated on the {split} split: "
          f"{config.dataset.validation:g} of the training set, held out)")
  noise = report.label_noise_note(config)
  if noise:
    print(noise)
  if result.curve is not None:
    print(f"continual evaluation: {len(result.curve.step)} points on the "
          "accuracy curve (accuracy_curve.csv, accuracy_curve.png)")
  print(f"\ntime: {result.times['total']:.1f} s "
        f"(train {result.times['train']:.1f} s, eval "
        f"{result.times['eval']:.1f} s); outputs in {workdir}")


def _sweep(argv) -> None:
  del argv
  config, name, workdir = _start()
  from jaxcl import experiment, report, sweep
  seeds = sweep.parse_seeds(_SEEDS.value)
  values = sweep.parse_values(_VALUES.value)
  if _DRY_RUN.value:
    built = []

    def describe():
      p = sweep.plan(config, seeds, values, workdir,
                     scenario_per_seed=_PER_SEED.value)
      built.append(p)
      # A grid of one run is trained unstacked (sweep.sweep).
      experiment.run_mesh(p.setup, len(p.members) if len(p.members) > 1
                          else 0)
      states = p.initial_states()  # checks that each swept key is state
      runs = "\n".join(f"  {m}" for m in p.members)
      how = "one vmapped program" if len(p.members) > 1 else "not vmapped"
      return (f"runs ({len(p.members)}, {how}):\n{runs}\n"
              + experiment.describe(p.setup, states[0]).replace(
                  "state:", "state (per run):"))
    _dry_run(config, name, workdir, describe,
             extra=lambda: built[0].fingerprint_extra())
    return
  print(f"jaxcl sweep: {name}, seeds {seeds}"
        f"{' (each on its own scenario draw)' if _PER_SEED.value else ''}, "
        f"{values or 'no hyperparameter grid'} -> {workdir}", flush=True)
  _note_ignored(config)
  result = sweep.sweep(config, seeds, values, workdir,
                       scenario_per_seed=_PER_SEED.value)
  for m, met in zip(result.members, result.metrics):
    print(f"  {m}: " + "  ".join(f"{k} {v:.4f}" for k, v in met.items()))
  split = report.evaluated_on(config)
  print(f"\nmean ± standard error over seeds"
        f"{'' if split == 'test' else ', on the ' + split + ' split'}:")
  print(sweep.format_groups(result.groups))
  noise = report.label_noise_note(config)
  if noise:
    print(noise)
  print(f"\ntime: {result.times['total']:.1f} s; outputs in {workdir}")


def _define_config_flag(sys_argv: list[str]) -> None:
  global _CONFIG
  if _CONFIG is None:
    # sys_argv: ml_collections finds the overrides in it, and must not see
    # the strategy / model overrides this module applies itself.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", _DEFAULT, "Experiment config file (default: Split Digits).",
        lock_config=True, sys_argv=sys_argv)


def _unknown_field(e: BaseException) -> None:
  """Exits with a clear error for a --config.<path> override of a field the
  config does not have. ml_collections raises KeyError / AttributeError
  for it, when the flag is defined (overrides of the default config) or
  when absl parses the flags (of a --config file)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]  # AttributeError(KeyError(message))
  what = str(e.args[0] if e.args else e).replace("\n", "; ")
  print(f"jaxcl: error: a --config override names a field the config does "
        f"not have ({what}). Only fields the config defines can be set "
        "from the command line; add others in a config file (see "
        "experiments/ for examples)", file=sys.stderr)
  sys.exit(2)


def _methods(names: list[str]) -> None:
  """``jaxcl methods``: no config, no JAX work; only the strategy modules'
  signatures and docstrings."""
  from jaxcl import strategies
  if any(n in ("-h", "--help", "help") for n in names):
    print("usage: jaxcl methods [NAME ... | --markdown]")
    return
  options = [n for n in names if n.startswith("-")]
  if options and (options != ["--markdown"] or len(names) > 1):
    print(f"jaxcl: error: jaxcl methods takes strategy names or "
          f"--markdown alone; got {names}", file=sys.stderr)
    sys.exit(2)
  unknown = [n for n in names if not n.startswith("-")
             and n not in strategies.available()]
  if unknown:
    print(f"jaxcl: error: unknown strategy {unknown[0]!r}; valid: "
          f"{strategies.available()}", file=sys.stderr)
    sys.exit(1)
  if names == ["--markdown"]:
    text = strategies.reference()
  elif names:
    text = "\n".join(strategies.describe(n) for n in names)
  else:
    text = "".join(
        f"{family}:\n" + "".join(f"  {n:<28} {strategies.summary(n)}\n"
                                 for n in members)
        for family, members in strategies.FAMILIES.items())
    text += "\n`jaxcl methods NAME` shows a method's paper and arguments.\n"
  try:
    sys.stdout.write(text)
    sys.stdout.flush()
  except BrokenPipeError:  # `jaxcl methods | head`: the reader left
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _compare(args: list[str]) -> None:
  """``jaxcl compare``: files only, no config and no training."""
  from jaxcl import compare
  usage = ("usage: jaxcl compare DIR ... [--markdown] [--metrics "
           "acc,bwt,...] [--plot FILE]")
  if any(a in ("-h", "--help", "help") for a in args):
    print(usage)
    return
  dirs, markdown, plot, columns, i = [], False, None, None, 0
  try:
    while i < len(args):
      a = args[i]
      name, eq, value = a.partition("=")
      if a == "--markdown":
        markdown = True
      elif name in ("--plot", "--metrics"):
        if not eq:
          if i + 1 >= len(args):
            raise ValueError(f"{a} needs a value")
          i, value = i + 1, args[i + 1]
        if name == "--plot":
          plot = value
        else:
          columns = [m.strip() for m in value.split(",") if m.strip()]
      elif a.startswith("-"):
        raise ValueError(f"unknown option {a!r}; {usage[7:]}")
      else:
        dirs.append(a)
      i += 1
    if not dirs:
      raise ValueError(f"no run directory given; {usage[7:]}")
    if columns == []:
      raise ValueError("--metrics needs at least one metric name")
    where = os.path.dirname(os.path.abspath(plot)) if plot else None
    if where and not os.path.isdir(where):
      raise ValueError(f"--plot {plot}: the folder {where} does not exist")
    # Directories of the same name (runs/a/er, runs/b/er) are told apart
    # by their paths as given.
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    rows = [r for d, n in zip(dirs, names)
            for r in compare.read(d, n if names.count(n) == 1 else d)]
    if columns is not None:
      known = list(dict.fromkeys(k for r in rows for k in r.metrics))
      unknown = [m for m in columns if m not in known]
      if unknown:
        raise ValueError(f"--metrics: unknown metric(s) {unknown}; these "
                         f"runs have {known}")
    print(compare.table(rows, markdown=markdown, metrics=columns))
    if plot:
      compare.plot(rows, plot)
      print(f"plot: {plot}")
  except (ValueError, OSError) as e:
    print(f"jaxcl: error: {e}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return
  command = argv[1]
  if command not in COMMANDS:
    print(f"jaxcl: unknown command {command!r}; valid: {list(COMMANDS)}",
          file=sys.stderr)
    sys.exit(2)
  if command == "methods":
    _methods(argv[2:])
    return
  if command == "compare":
    _compare(argv[2:])
    return
  handler = {"run": _run, "sweep": _sweep}[command]
  if any(a in ("-h", "--help", "--helpshort") for a in argv[2:]):
    # absl's --help lists only the main module's key flags: none for an
    # entry-point script. Show this command's own flags instead.
    _define_config_flag([argv[0]])
    print(USAGE + "\nflags (absl's own: --helpfull):\n\n" +
          flags.FLAGS.module_help(sys.modules[__name__]).strip("\n"))
    return
  try:
    rest, node_args = _split_node_overrides(argv[2:])
  except ValueError as e:
    print(f"jaxcl: error: {e}", file=sys.stderr)
    sys.exit(2)
  _NODE_ARGS[:] = node_args
  try:
    _define_config_flag([argv[0]] + rest)
  except (KeyError, AttributeError) as e:
    _unknown_field(e)
  try:
    app.run(handler, argv=[argv[0]] + rest)
  except (KeyError, AttributeError) as e:
    if flags.FLAGS.is_parsed():  # raised by the run, not by an override
      raise
    _unknown_field(e)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Our errors carry the bad value and the valid choices: show the message,
    # not a traceback.
    print(f"jaxcl: error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    # The last complete checkpoint stays (a save is written to a temporary
    # directory and renamed when whole), so the same command resumes.
    where = ""
    if _ACTIVE_WORKDIR and not _WORKDIR.present:
      where = f" with --workdir {_ACTIVE_WORKDIR[0]}"
    print(f"\njaxcl: interrupted; run the same command{where} to resume "
          "from the last checkpoint", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  main()
