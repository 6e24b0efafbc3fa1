"""The `jaxcl` command: default run, outputs, clear errors."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jaxcl(*args, cwd):
  env = dict(os.environ)
  env.pop("JAXCL_DATA_DIR", None)  # the default must need no data files
  return subprocess.run([sys.executable, "-m", "jaxcl.cli", *args], cwd=cwd,
                        capture_output=True, text=True, env=env, timeout=300)


def test_default_run_writes_outputs(tmp_path):
  t0 = time.perf_counter()
  p = jaxcl("run", "--workdir", str(tmp_path / "run"), cwd=tmp_path)
  elapsed = time.perf_counter() - t0
  assert p.returncode == 0, p.stderr[-2000:]
  assert elapsed < 60
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
  lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
  assert sum("experience" in l for l in lines) == 5
  assert json.load(open(run / "config.json"))["dataset"]["name"] == "digits"


def test_override_and_experiment_file(tmp_path):
  p = jaxcl("run", "--config",
            os.path.join(REPO, "experiments", "split_digits_baselines.py") +
            ":strategy=joint", "--config.train.epochs=1",
            "--config.report.plots=False", "--workdir", str(tmp_path / "r"),
            "--config.dataset.validation=0.25", "--verbosity=0", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "after \\ vali " in p.stdout
  assert ("evaluated on the validation split: 0.25 of the training set"
          in p.stdout)
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
def test_unknown_config_field_is_a_clear_error(tmp_path, args, match):
  """An override of a field the config lacks (a typo, also in a model's
  name) names the field, without a traceback."""
  p = jaxcl("run", *args, "--workdir", str(tmp_path / "r"), cwd=tmp_path)
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
def test_bad_names_clear_error_no_traceback(tmp_path, flag, match):
  p = jaxcl("run", flag, "--workdir", str(tmp_path / "r"), cwd=tmp_path)
  assert p.returncode == 1
  assert match in p.stderr
  assert "Traceback" not in p.stderr


def test_methods_lists_every_strategy_and_describes_one(tmp_path):
  from jaxcl import strategies
  p = jaxcl("methods", cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  listed = re.findall(r"^  (\w+) ", p.stdout, re.M)
  assert sorted(listed) == strategies.available()
  p = jaxcl("methods", "ewc", cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  # The signature's defaults and the factory's own argument docs.
  assert "ewc(lam=100.0, fisher='exact'" in p.stdout
  assert "lam: penalty strength" in p.stdout and "Kirkpatrick" in p.stdout
  p = jaxcl("methods", "ewcc", cwd=tmp_path)
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


def test_strategy_arguments_from_the_command_line(tmp_path):
  # The default config defines no strategy.<name> node; these overrides
  # are applied after it is loaded, and the factory checks them.
  p = jaxcl("run", "--workdir", str(tmp_path / "r"),
            "--config.strategy.name=ewc", "--config.strategy.ewc.lam=10",
            "--config.strategy.ewc.fisher", "empirical",
            "--config.train.epochs=1", "--config.report.progress=False",
            cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  saved = json.load(open(tmp_path / "r" / "config.json"))["strategy"]
  # lam=10 is stored as the factory's float, as lam=10.0 would be.
  assert saved == {"name": "ewc", "ewc": {"lam": 10.0, "fisher": "empirical"}}
  p = jaxcl("run", "--workdir", str(tmp_path / "s"),
            "--config.strategy.name=ewc", "--config.strategy.ewc.lamda=1",
            cwd=tmp_path)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "unexpected keyword argument 'lamda'" in p.stderr
  # A model's arguments likewise (the default config has no model.hat_mlp).
  p = jaxcl("run", "--workdir", str(tmp_path / "h"),
            "--config.strategy.name=hat", "--config.scenario.kind=task",
            "--config.model.name=hat_mlp", "--config.model.hat_mlp.num_tasks",
            "5", "--config.train.epochs=1", "--config.report.progress=False",
            "--config.report.plots=False", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  saved = json.load(open(tmp_path / "h" / "config.json"))["model"]
  assert saved["name"] == "hat_mlp" and saved["hat_mlp"] == {"num_tasks": 5}
  p = jaxcl("run", "--config.strategy.ewc.lam", cwd=tmp_path)
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


def test_default_run_directory_names_the_overrides(tmp_path):
  # It was named after the config alone: `--config.strategy.name=ewc` on the
  # default config wrote runs/split_digits_naive-<time>. Output settings
  # (report.*) are not part of the name.
  p = jaxcl("run", "--config.strategy.name=ewc",
            "--config.strategy.ewc.lam=10", "--config.train.epochs=1",
            "--config.model.widths=(32,16)", "--config.report.plots=False",
            "--config.report.progress=False", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  (run,) = os.listdir(tmp_path / "runs")
  assert re.fullmatch(r"split_digits_naive,strategy\.name=ewc,train\.epochs=1,"
                      r"model\.widths=32-16,strategy\.ewc\.lam=10-\d{8}-\d{6}",
                      run), run
  assert p.stdout.startswith(f"jaxcl: {run[:-16]} -> runs/{run}\n")
