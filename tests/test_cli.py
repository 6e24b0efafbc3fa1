"""The `jaxcl` command: default run, outputs, clear errors."""

import json
import os
import re
import shutil

import numpy as np
import pytest

# `forked` (conftest.py) runs the command in a child forked from one
# process that imported jax once.
from cli_children import REPO, jaxcl


@pytest.fixture(scope="module")
def ewc_run(tmp_path_factory, forked):
  """One short EWC run, strategy arguments from the command line (one
  ``=``-joined, one space-separated), in the default run directory:
  ``(process, cwd)``. Read by two tests."""
  cwd = tmp_path_factory.mktemp("ewc_run")
  p = forked("run", *_EWC_ARGS, cwd=cwd)
  return p, cwd


_EWC_ARGS = ("--config.strategy.name=ewc", "--config.strategy.ewc.lam=10",
             "--config.strategy.ewc.fisher", "empirical",
             "--config.train.epochs=1", "--config.model.widths=(32,16)",
             "--config.report.plots=False", "--config.report.progress=False")


def test_default_run_writes_outputs(tmp_path):
  # Its time is a benchmark's (benchmarks/throughput.py times the README's
  # command), not a test's: a wall-clock bound fails on a loaded host.
  p = jaxcl("run", "--workdir", str(tmp_path / "run"), cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "acc:" in p.stdout and "bwt:" in p.stdout
  assert "after \\ test " in p.stdout and "validation" not in p.stdout
  # No INFO log lines (orbax logs every checkpoint save at INFO).
  assert not re.search(r"^I\d{4} ", p.stderr, re.M), p.stderr[:500]
  run = tmp_path / "run"
  for f in ("config.json", "metrics.jsonl", "metrics.csv",
            "accuracy_matrix.json", "accuracy_matrix.png",
            "average_accuracy.png"):
    assert (run / f).is_file(), f
  assert any(n.startswith("events") for n in os.listdir(run / "tb"))
  acc = json.load(open(run / "accuracy_matrix.json"))
  assert len(acc["accuracy"]) == 5 and len(acc["accuracy"][0]) == 5
  assert acc["evaluated_on"] == "test" and "mean_of_runs" not in acc
  # Split Digits' test sets differ by a row or two: their sizes, and the
  # accuracy over the pooled test examples they weight.
  n = acc["test_sizes"]
  assert len(n) == 5 and sum(n) == 450 and len(set(n)) > 1
  assert acc["metrics"]["acc_pooled"] == pytest.approx(
      np.dot(acc["accuracy"][-1], n) / sum(n))
  lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
  assert sum("experience" in l for l in lines) == 5
  assert json.load(open(run / "config.json"))["dataset"]["name"] == "digits"
  # stderr is a pipe here, as in a batch job's log: one whole line per
  # experience (no tqdm '\r' redraws), with its steps and the average
  # accuracy over the experiences seen, as logged.
  assert "\r" not in p.stderr
  # Class-incremental: the Task-IL average beside it.
  shown = re.findall(r"^experience (\d)/5: (\d+) steps in [\d.]+ s, loss "
                     r"[\d.]+; average test accuracy over experiences? "
                     r"(?:1-)?(\d): (\d\.\d{4}) \(Task-IL (\d\.\d{4})\)$",
                     p.stderr, re.M)
  assert [(int(i), int(j)) for i, _, j, _, _ in shown] == [
      (i, i) for i in range(1, 6)], p.stderr
  logged = [l for l in lines if "experience" in l]
  steps = np.diff([0] + [l["step"] for l in logged])
  np.testing.assert_array_equal([int(n) for _, n, _, _, _ in shown], steps)
  np.testing.assert_allclose(
      [float(a) for *_, a, _ in shown],
      [l["average_accuracy_seen"] for l in logged], atol=5e-5)
  np.testing.assert_allclose(
      [float(t) for *_, t in shown],
      [l["task_average_accuracy_seen"] for l in logged], atol=5e-5)


def test_override_and_experiment_file(tmp_path, forked):
  p = forked("run", "--config",
            os.path.join(REPO, "experiments", "split_digits_baselines.py") +
            ":strategy=joint", "--config.train.epochs=1",
            "--config.report.plots=False", "--workdir", str(tmp_path / "r"),
            "--config.dataset.validation=0.25", "--verbosity=0",
            "--config.dataset.label_noise=0.2", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "after \\ vali " in p.stdout
  assert ("evaluated on the validation split: 0.25 of the training set"
          in p.stdout)
  assert ("(trained on noisy labels: 0.2 of each class's training labels, "
          "symmetric, noise seed 0; evaluated on clean labels)" in p.stdout)
  # Asked for, the INFO logs are back (here: orbax's checkpoint saves).
  assert re.search(r"^I\d{4} .*checkpoint", p.stderr, re.M)
  cfg = json.load(open(tmp_path / "r" / "config.json"))
  assert cfg["strategy"]["name"] == "joint" and cfg["train"]["epochs"] == 1


@pytest.mark.parametrize("args,match", [
    (["--config.train.epoch=3"], 'Did you mean "epochs"'),
    (["--config.model.hypernetz.input_dim=64"], "'hypernetz'"),
    (["--config", os.path.join(REPO, "experiments",
                                "split_digits_baselines.py"),
      "--config.train.epochz=1"], "'epochz'"),
])
def test_unknown_config_field_is_a_clear_error(tmp_path, args, match,
                                               forked):
  """An override of a field the config lacks (a typo, also in a model's
  name) names the field, without a traceback."""
  p = forked("run", *args, "--workdir", str(tmp_path / "r"), cwd=tmp_path)
  assert p.returncode == 2
  assert "a --config override names a field the config does not have" \
      in p.stderr and match in p.stderr
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "r").exists()  # nothing ran


@pytest.mark.parametrize("flag,match", [
    ("--config.strategy.name=bogus", "unknown strategy 'bogus'; valid:"),
    ("--config.optimizer.name=bogus", "unknown optimizer 'bogus'; valid:"),
    ("--config.dataset.name=bogus", "unknown dataset 'bogus'; valid:"),
])
def test_bad_names_clear_error_no_traceback(tmp_path, flag, match, forked):
  p = forked("run", flag, "--workdir", str(tmp_path / "r"), cwd=tmp_path)
  assert p.returncode == 1
  assert match in p.stderr
  assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args,match", [
    (["--config.model.channels=8,16"],
     r"model.channels=(8, 16) is read by the cnn backbone only; "
     r"model.name='mlp' would ignore it (it reads model.widths, model.init, "
     r"model.head)"),
    (["--config.model.name=cnn", "--config.model.widths=64"],
     "model.widths=(64,) is read by the mlp backbone only; model.name='cnn'"),
    (["--config.model.shortcut=pad"],
     "model.shortcut='pad' is read by the resnet32 backbone only; "
     "model.name='mlp' would ignore it"),
    (["--config.model.name=masked_mlp", "--config.model.init=torch"],
     "model.init='torch' is read by the mlp, cnn, resnet18 and resnet32 "
     "backbones only; model.name='masked_mlp' would ignore it (a model "
     "module takes its arguments as model.masked_mlp.<arg>)"),
    # Plain SGD (the default optimiser) has no momentum.
    (["--config.optimizer.momentum=0.5"],
     "optimizer.momentum=0.5: optimizer.name='sgd' would ignore it (it is "
     "the heavy-ball coefficient of optimizer 'momentum'; set "
     "--config.optimizer.name=momentum)"),
    (["--config.optimizer.gamma=0.5"],
     "optimizer.gamma=0.5: optimizer.schedule='constant' would ignore it"),
    (["--config.train.augment=flip", "--config.train.crop_padding=2"],
     "train.crop_padding=2: train.augment=('flip',) would ignore it"),
    (["--config.scenario.online=True", "--config.train.epochs=3"],
     "train.epochs=3: scenario.online=True trains one pass over each "
     "experience"),
    (["--config.model.masked_mlp.mask=threshold"],
     "model.masked_mlp.mask='threshold' is an argument of model module "
     "'masked_mlp'; model.name='mlp' would ignore it (set "
     "--config.model.name=masked_mlp)"),
])
def test_a_setting_the_run_would_ignore_is_refused(tmp_path, args, match,
                                                   forked):
  """A field the rest of the config makes the run ignore (another
  backbone's size, plain SGD's momentum, a multistep factor without the
  schedule, a crop padding without the crop, another model module's
  argument), set on the command line,
  would silently change nothing: refused, naming what is read instead.
  The same fields where they are read run (dry run)."""
  p = forked("run", *args, "--workdir", str(tmp_path / "r"), cwd=tmp_path)
  assert p.returncode == 1
  assert match in p.stderr and "Traceback" not in p.stderr
  assert not (tmp_path / "r").exists()


def test_a_run_notes_what_its_config_file_keeps_and_ignores(tmp_path,
                                                            forked):
  """A config file may keep a value the run ignores (momentum with plain
  SGD, an MLP's widths beside a CNN); the run goes on, but says so on
  stderr before it starts, as the dry run does, and says nothing for a
  file that keeps none."""
  cfg = tmp_path / "keeps.py"
  cfg.write_text(
      "from jaxcl.experiment import default_config\n"
      "def get_config():\n"
      "  c = default_config()\n"
      "  c.optimizer.momentum = 0.5\n"
      "  return c\n")
  p = forked("run", "--config", str(cfg), "--config.train.epochs=1",
             "--config.report.plots=False", "--workdir", str(tmp_path / "r"), cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert ("jaxcl: note: optimizer.momentum=0.5: optimizer.name='sgd' would "
          "ignore it" in p.stderr), p.stderr[-2000:]
  assert p.stderr.index("jaxcl: note:") < p.stderr.index("experience 1/5")
  assert "acc:" in p.stdout
  p = forked("run", "--config",
             os.path.join(REPO, "experiments", "split_digits_baselines.py"),
             "--config.train.epochs=1", "--config.report.plots=False",
             "--config.report.progress=False",
             "--workdir", str(tmp_path / "r2"), cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "jaxcl: note:" not in p.stderr


def test_settings_where_they_are_read_run(tmp_path, forked):
  p = forked("run", "--config.model.name=cnn", "--config.model.channels=8,16",
             "--config.optimizer.name=momentum",
             "--config.optimizer.momentum=0.5",
             "--config.optimizer.schedule=multistep",
             "--config.optimizer.milestones=1", "--config.optimizer.gamma=0.5",
             "--config.train.augment=pad_crop,flip",
             "--config.train.crop_padding=2",
             "--dry_run", "--workdir", str(tmp_path / "r"), cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "channels=(8, 16)" in p.stdout
  assert "optimizer.momentum = 0.5" in p.stdout
  assert ("optimizer: momentum (momentum 0.5), learning rate 0.1, multistep "
          "schedule (x 0.5 from epochs 1)") in p.stdout
  p = forked("run", "--config.model.name=masked_mlp",
             "--config.model.masked_mlp.mask=threshold", "--dry_run",
             "--workdir", str(tmp_path / "r"), cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "model: masked_mlp(mask='threshold')" in p.stdout


def test_methods_lists_every_strategy_and_describes_one(tmp_path, forked):
  from jaxcl import strategies
  p = forked("methods", cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  listed = re.findall(r"^  (\w+) ", p.stdout, re.M)
  assert sorted(listed) == strategies.available()
  p = forked("methods", "ewc", cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  # The signature's defaults and the factory's own argument docs.
  assert "ewc(lam=100.0, fisher='exact'" in p.stdout
  assert "lam: penalty strength" in p.stdout and "Kirkpatrick" in p.stdout
  p = forked("methods", "ewcc", cwd=tmp_path)
  assert p.returncode == 1 and "unknown strategy 'ewcc'; valid" in p.stderr
  assert "Traceback" not in p.stderr


def test_method_reference_is_current_and_complete():
  # docs/methods.md is generated from the code; a changed signature or
  # docstring, or a new strategy module, must be regenerated into it
  # (`jaxcl methods --markdown > docs/methods.md`).
  from jaxcl import strategies
  families = [n for names in strategies.FAMILIES.values() for n in names]
  assert sorted(families) == strategies.available()  # each exactly once
  baselines = set(strategies.FAMILIES["baselines"])
  assert set(strategies.PAPERS) == set(families) - baselines
  assert set(strategies.NEEDS) <= set(families)
  from jaxcl import models
  for need in strategies.NEEDS.values():  # every model named exists
    for model in re.findall(r"the `(\w+)` model", need):
      assert model in models.available(), model
  with open(os.path.join(REPO, "docs", "methods.md")) as f:
    assert f.read() == strategies.reference()


def test_strategy_arguments_from_the_command_line(tmp_path, forked,
                                                  ewc_run):
  # The default config defines no strategy.<name> node; these overrides
  # are applied after it is loaded, and the factory checks them.
  p, cwd = ewc_run
  assert p.returncode == 0, p.stderr[-2000:]
  (run,) = os.listdir(cwd / "runs")
  saved = json.load(open(cwd / "runs" / run / "config.json"))["strategy"]
  # lam=10 is stored as the factory's float, as lam=10.0 would be.
  assert saved == {"name": "ewc", "ewc": {"lam": 10.0, "fisher": "empirical"}}
  assert isinstance(saved["ewc"]["lam"], float)  # 10 == 10.0 in the above
  p = forked("run", "--workdir", str(tmp_path / "s"),
             "--config.strategy.name=ewc", "--config.strategy.ewc.lamda=1",
             cwd=tmp_path)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "unexpected keyword argument 'lamda'" in p.stderr
  # A model's arguments likewise (the default config has no model.hat_mlp).
  p = forked("run", "--workdir", str(tmp_path / "h"),
             "--config.strategy.name=hat", "--config.scenario.kind=task",
             "--config.model.name=hat_mlp",
             "--config.model.hat_mlp.num_tasks", "5",
             "--config.train.epochs=1", "--config.report.progress=False",
             "--config.report.plots=False", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  saved = json.load(open(tmp_path / "h" / "config.json"))["model"]
  assert saved["name"] == "hat_mlp" and saved["hat_mlp"] == {"num_tasks": 5}
  p = forked("run", "--config.strategy.ewc.lam", cwd=tmp_path)
  assert p.returncode == 2 and "--config.strategy.ewc.lam needs a value" \
      in p.stderr


def test_strategy_override_parsing():
  from jaxcl import cli
  rest, found = cli._split_node_overrides(
      ["--config.strategy.name=gem", "--config.strategy.gem.margin=0.1",
       "--config.strategy.gem.gram", "factored", "--workdir", "w",
       "--config.model.hat_mlp.num_tasks=5", "--config.model.bogus.x=1"])
  # A model node that names no model is left for ml_collections to refuse.
  assert rest == ["--config.strategy.name=gem", "--workdir", "w",
                  "--config.model.bogus.x=1"]
  assert found == [("strategy", "gem", "margin", "0.1"),
                   ("strategy", "gem", "gram", "factored"),
                   ("model", "hat_mlp", "num_tasks", "5")]
  assert [cli._literal(t) for t in ("0.1", "200", "(16,)", "True",
                                    "factored")] == [
                                        0.1, 200, (16,), True, "factored"]
  # Text that is not a Python literal (a SyntaxError, not a ValueError, to
  # ast.literal_eval) stays a string too.
  assert [cli._literal(t) for t in ("two words", "1 +", "a/b")] == [
      "two words", "1 +", "a/b"]


def test_command_help_lists_the_commands_flags(tmp_path):
  # absl's --help showed only "Try --helpfull" for the entry-point script.
  for command in ("run", "sweep"):
    p = jaxcl(command, "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    for flag in ("--config:", "--workdir:", "--[no]resume:", "--seeds:",
                 "--values:"):
      assert flag in p.stdout, (command, flag)
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_interrupt_is_one_line_not_a_traceback(monkeypatch, capsys,
                                               tmp_path):
  from jaxcl import cli, experiment

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(experiment, "run", interrupted)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    cli.main(["jaxcl", "run", "--config.train.epochs=1"])
  assert e.value.code == 130
  err = capsys.readouterr().err
  # The default directory has the time in its name: the message names it,
  # since the same command alone would start a new run.
  assert re.search(r"interrupted; run the same command with --workdir "
                   r"runs/split_digits_naive,train\.epochs=1-\d{8}-\d{6} "
                   "to resume", err), err
  assert "Traceback" not in err


def test_default_run_directory_names_the_overrides(ewc_run):
  # It was named after the config alone: `--config.strategy.name=ewc` on the
  # default config wrote runs/split_digits_naive-<time>. Output settings
  # (report.*) are not part of the name.
  p, cwd = ewc_run
  assert p.returncode == 0, p.stderr[-2000:]
  (run,) = os.listdir(cwd / "runs")
  assert re.fullmatch(r"split_digits_naive,strategy\.name=ewc,train\.epochs=1,"
                      r"model\.widths=32-16,strategy\.ewc\.lam=10,"
                      r"strategy\.ewc\.fisher=empirical-\d{8}-\d{6}",
                      run), run
  assert p.stdout.startswith(f"jaxcl: {run[:-16]} -> runs/{run}\n")


def test_unknown_command_and_help_word(tmp_path, forked):
  from jaxcl import cli
  p = forked("bogus", cwd=tmp_path)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr == ("jaxcl: unknown command 'bogus'; valid: ['run', "
                      "'sweep', 'methods', 'compare']\n")
  for args in (("help",), ("--help",), ()):
    p = forked(*args, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout == cli.USAGE + "\n", args


def test_methods_markdown_help_and_several_names(tmp_path, forked):
  from jaxcl import strategies
  p = forked("methods", "--markdown", cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  with open(os.path.join(REPO, "docs", "methods.md")) as f:
    assert p.stdout == f.read()  # the generated reference, whole
  p = forked("methods", "--help", cwd=tmp_path)
  assert (p.returncode, p.stdout) == (
      0, "usage: jaxcl methods [NAME ... | --markdown]\n")
  # Every name given is described, in order.
  p = forked("methods", "lwf", "ewc", cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  assert p.stdout == "\n".join([strategies.describe("lwf"),
                                strategies.describe("ewc")])
  for args in (("--markdown", "ewc"), ("ewc", "--markdown"), ("--bogus",),
               ("--markdown", "--markdown")):
    p = forked("methods", *args, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "", args
    assert ("jaxcl methods takes strategy names or --markdown alone; got "
            f"{list(args)}") in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args,name", [
    # An explicit name is used as it is; data_dir is not part of the name.
    (["--config.name=mine", "--config.strategy.name=bogus",
      "--config.dataset.data_dir=/x"], "mine"),
    (["--config.strategy.name=bo/gus [x]", "--config.dataset.data_dir=/x"],
     "split_digits_naive,strategy.name=bogusx"),
])
def test_run_name_from_the_overrides(tmp_path, forked, args, name):
  # A bad strategy name fails after the run is named, before any training.
  p = forked("run", *args, cwd=tmp_path)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert re.fullmatch(f"jaxcl: {re.escape(name)} -> runs/{re.escape(name)}"
                      r"-\d{8}-\d{6}\n", p.stdout), p.stdout
  assert "jaxcl: error: unknown strategy 'bo" in p.stderr


def test_bad_data_dir_is_a_clear_error(tmp_path, forked):
  p = forked("run", "--config.dataset.name=fashion_mnist",
             f"--config.dataset.data_dir={tmp_path}/no such dir",
             "--workdir", str(tmp_path / "r"), cwd=tmp_path)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert (f"jaxcl: error: data directory '{tmp_path}/no such dir' does not "
          "exist; pass an existing directory holding fashion_mnist's IDX "
          ".gz files (or fashion_mnist/ with them)") in p.stderr


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_unreadable_config_file_is_a_clear_error(tmp_path, forked, command):
  # A mistyped --config path (ml_collections defers the failure to the
  # config's first use, as an OSError) and a folder: one line naming the
  # file and the cause, no traceback.
  for path, cause in ((f"{tmp_path}/experiments/nope.py",
                       "No such file or directory"),
                      (str(tmp_path), "Is a directory")):
    p = forked(command, "--config", path, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.fullmatch(
        f"jaxcl: error: --config {re.escape(path)}: cannot read the config "
        rf"file \(\[Errno \d+\] {cause}: '{re.escape(path)}'\); give a "
        r"Python file defining get_config\(\), e\.g\. "
        r"experiments/split_mnist_baselines\.py\n", p.stderr), p.stderr


def test_resume_flags_reach_the_run(tmp_path, forked, ewc_run):
  # --resume with nothing to resume, and --noresume where a finished run
  # left checkpoints, are refused (each before training anything).
  p = forked("run", "--resume", "--workdir", str(tmp_path / "new"),
             cwd=tmp_path)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert f"--resume: no checkpoint to resume in {tmp_path}/new" in p.stderr
  p, cwd = ewc_run
  assert p.returncode == 0, p.stderr[-2000:]
  (run,) = os.listdir(cwd / "runs")
  p = forked("run", "--noresume", "--workdir", str(cwd / "runs" / run),
             *_EWC_ARGS, cwd=cwd)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert f"{cwd}/runs/{run} already holds checkpoints" in p.stderr


def test_strategy_argument_values_are_checked(tmp_path, forked):
  # True is not promoted to the float lam = 1.0 (the factory refuses it),
  # and a value of the wrong type for a field the config file defines is
  # a one-line error naming the override.
  p = forked("run", "--config.strategy.name=ewc",
             "--config.strategy.ewc.lam=True", "--workdir",
             str(tmp_path / "a"), cwd=tmp_path)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "ewc: lam must be a finite number >= 0, got True" in p.stderr
  p = forked("run", "--config", os.path.join(
      REPO, "experiments", "permuted_mnist_regularisation.py") +
             ":strategy=ewc", "--config.strategy.ewc.lam=abc", "--workdir",
             str(tmp_path / "b"), cwd=tmp_path)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "jaxcl: error: --config.strategy.ewc.lam=abc: " in p.stderr


def _tree(path) -> list[tuple[str, int]]:
  """Every file under ``path`` with its size (what a dry run must leave
  as it was)."""
  return sorted((os.path.join(d, f), os.path.getsize(os.path.join(d, f)))
                for d, _, files in os.walk(path) for f in files)


def test_dry_run_prints_the_run_and_writes_nothing(tmp_path, forked):
  p = forked("run", "--dry_run", "--config.strategy.name=ewc",
             "--config.strategy.ewc.lam=10", "--config.model.widths=(32,16)",
             cwd=tmp_path)
  assert p.returncode == 0 and p.stderr == "", p.stderr
  assert os.listdir(tmp_path) == []  # no run directory, no files
  out = p.stdout
  assert re.match(r"jaxcl: \S+ -> runs/\S+ \(dry run: nothing trained or "
                  r"written\)\nconfig:\n", out), out
  # Every field as --config.<field> names it; the strategy's arguments the
  # config leaves out with the factory's defaults, marked.
  for line in ("  model.widths = (32, 16)", "  strategy.ewc.lam = 10.0",
               "  strategy.ewc.fisher = 'exact' (default)",
               "  strategy.ewc.max_examples = 1000 (default)",
               "  train.batch_size = 32", "  dataset.name = 'digits'"):
    assert line + "\n" in out, line
  # The stream: Split Digits' five experiences of two classes each, the
  # 1797 images of scikit-learn's digits between them.
  exps = re.findall(r"  experience (\d): task 0, 2 classes \[(\d), (\d)\], "
                    r"(\d+) train / (\d+) test examples\n", out)
  assert [(int(e[0]), int(e[1]), int(e[2])) for e in exps] == [
      (i, 2 * i, 2 * i + 1) for i in range(5)]
  assert sum(int(e[3]) + int(e[4]) for e in exps) == 1797
  # Steps per epoch: the largest experience in batches of 32.
  largest = max(int(e[3]) for e in exps)
  assert (f"training: 2 epoch(s) x {-(-largest // 32)} steps of batch 32 per "
          f"experience ({2 * -(-largest // 32)} steps;") in out
  # The MLP 64-32-16-10's parameters, and EWC's state: the merged
  # precision and center (each like params) and three scalars.
  params = 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
  assert f"  params       {params:,} values, {4 * params / 1000:.3g} kB\n" \
      in out, out
  assert f"  strategy     {2 * params + 3:,} values," in out
  assert out.endswith(": no checkpoint; the run would start fresh\n")
  # The model's fields that take effect (the CNN's channels do not).
  assert "\nmodel: mlp(widths=(32, 16), init='lecun_normal', head='linear'); " \
      "optimizer: sgd (no momentum), learning rate 0.1; strategy: ewc\n" \
      in out, out


def test_dry_run_refuses_what_the_run_would(tmp_path, forked):
  # A bad value, a batch larger than an experience (known only once the
  # data is built), the run's own later checks and a swept value a
  # factory keeps in its closure: the run's own messages, before anything
  # is printed or written.
  cases = (
      (("run", "--config.strategy.name=ewc", "--config.strategy.ewc.lam=-1"),
       "jaxcl: error: ewc: lam must be a finite number >= 0, got -1.0\n"),
      (("run", "--config.train.batch_size=5000"),
       "jaxcl: error: train.batch_size=5000 is larger than the smallest "
       "experience (265 training examples); use at most 265\n"),
      # What the run checks only as it executes: the checkpointer, the
      # device mesh.
      (("run", "--config.checkpoint.keep=1"),
       "jaxcl: error: checkpoint.keep=1: keep at least 2 so that a crash "
       "while saving can never leave the run without a valid checkpoint\n"),
      (("run", "--config.parallel.devices=99"),
       "jaxcl: error: parallel.devices=99 but only "),
      (("sweep", "--seeds", "0,1", "--config.parallel.devices=0"),
       "jaxcl: error: parallel.devices != 1 with a sweep is not supported"),
      (("sweep", "--config.strategy.name=lwf", "--seeds", "0",
        "--values", "strategy.lwf.temperature=1,2"),
       "jaxcl: error: cannot sweep 'strategy.lwf.temperature' in one "
       "vmapped program"))
  for args, message in cases:
    p = forked(*args, "--dry_run", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.startswith(message), p.stderr
    assert "Traceback" not in p.stderr and p.stdout == "", p.stdout
  assert os.listdir(tmp_path) == []


def test_sweep_dry_run_lists_the_runs(tmp_path, forked):
  p = forked("sweep", "--dry_run", "--seeds", "0,1", "--values",
             "optimizer.learning_rate=0.1,0.03", "--config.strategy.name=ewc",
             "--values", "strategy.ewc.lam=1,10", cwd=tmp_path)
  assert p.returncode == 0 and p.stderr == "", p.stderr
  runs = re.search(r"runs \((\d+), one vmapped program\):\n((?:  \{.*\}\n)+)",
                   p.stdout)
  assert runs and int(runs.group(1)) == 8, p.stdout
  members = [eval(line) for line in runs.group(2).splitlines()]
  assert members == [
      {"seed": s, "optimizer.learning_rate": lr, "strategy.ewc.lam": lam}
      for lr in (0.1, 0.03) for lam in (1, 10) for s in (0, 1)]
  assert "state (per run):\n  params " in p.stdout
  assert os.listdir(tmp_path) == []


def test_dry_run_says_what_a_run_directory_would_resume(tmp_path, forked,
                                                        ewc_run):
  _, cwd = ewc_run
  (workdir,) = [os.path.join(cwd, "runs", d)
                for d in os.listdir(os.path.join(cwd, "runs"))]
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                         "checkpoints")))
  assert steps
  before = _tree(workdir)
  p = forked("run", "--dry_run", *_EWC_ARGS, "--workdir", workdir,
             cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  # The checkpoints' metadata says where and whether: the newest, written
  # by this config after the last experience.
  assert p.stdout.endswith(
      f"{workdir}: the run would resume from checkpoint {steps[-1]} (5 "
      "experience(s) done), the config being the same\n"), p.stdout[-500:]
  p = forked("run", "--dry_run", *_EWC_ARGS, "--config.strategy.ewc.lam=3",
             "--workdir", workdir, cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  assert p.stdout.endswith(
      f"{workdir}: its newest checkpoint (step {steps[-1]}) comes from a "
      "different config; the run would refuse to start. Differences:\n"
      "  strategy.ewc.lam: checkpoint has 10.0, this run has 3.0\n"), (
          p.stdout[-500:])
  # An unreadable newest checkpoint: the one before it, saying so.
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  meta = broken / "checkpoints" / str(steps[-1]) / "meta" / "metadata"
  assert meta.exists()
  meta.write_text("{not json")
  p = forked("run", "--dry_run", *_EWC_ARGS, "--workdir", str(broken),
             cwd=tmp_path)
  assert re.search(
      rf"{broken}: the run would resume from checkpoint {steps[-2]} "
      r"\(4 experience\(s\) done\), the config being the same\n  "
      rf"\(checkpoint {steps[-1]} in \S+ is unreadable .*falling back to "
      r"the previous one\)\n$", p.stdout), p.stdout[-800:]
  p = forked("run", "--dry_run", "--noresume", "--workdir", workdir,
             cwd=tmp_path)
  assert p.stdout.endswith(f"{workdir} holds checkpoints (steps {steps}); "
                           "with --noresume the run would refuse to start\n")
  new = str(tmp_path / "new")
  p = forked("run", "--dry_run", "--resume", "--workdir", new, cwd=tmp_path)
  assert p.stdout.endswith(f"{new}: no checkpoint; with --resume the run "
                           "would refuse to start\n")
  assert _tree(workdir) == before and not os.path.exists(new)


def test_run_names_the_accuracy_curve(tmp_path, forked, ewc_run):
  """With continual evaluation, ``jaxcl run`` says how many points the
  curve has and where it is (a run without it says nothing of it)."""
  assert "continual evaluation" not in ewc_run[0].stdout
  assert "acc:" in ewc_run[0].stdout  # (the run printed its results)
  p = forked("run", "--config.train.eval_every_steps=4",
             "--config.train.epochs=1", "--config.report.plots=False",
             "--workdir", str(tmp_path / "c"), cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  # 270-272 training examples in batches of 32: 9 steps per experience,
  # evaluated at 4, 8 and the end; and the initial model.
  assert ("continual evaluation: 16 points on the accuracy curve "
          "(accuracy_curve.csv, accuracy_curve.png)") in p.stdout
  with open(tmp_path / "c" / "accuracy_curve.csv") as f:
    assert len(f.read().splitlines()) == 1 + 16
