"""``jaxcl compare``: finished run directories read back (a sweep's rows
per setting, recomputed here from its per-run records), the tables to the
character, the plot, and the refusals."""

import json
import os
import re

import numpy as np
import pytest

import jaxcl
from jaxcl import cli, compare, metrics, sweep
from jaxcl.metrics import Curve
from test_train import quick_config


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A plain run and a 2-seed x 2-learning-rate sweep on Split Digits,
  both with continual evaluation."""
  root = tmp_path_factory.mktemp("compare")
  c = quick_config(**{"train.eval_every_steps": 6})
  c.report.tensorboard = False
  run_dir, sweep_dir = str(root / "one"), str(root / "grid")
  jaxcl.run(c, run_dir)
  sweep.sweep(c, seeds=[0, 1], values={"optimizer.learning_rate": [0.05,
                                                                    0.2]},
              workdir=sweep_dir)
  return run_dir, sweep_dir


def test_a_runs_row_is_its_results(dirs):
  run_dir, _ = dirs
  (row,) = compare.read(run_dir)
  with open(os.path.join(run_dir, "accuracy_matrix.json")) as f:
    whole = json.load(f)
  assert (row.label, row.n, row.evaluated_on) == ("one", 1, "test")
  assert row.metrics == {k: (pytest.approx(v), None)
                         for k, v in whole["metrics"].items()}
  np.testing.assert_allclose(row.accuracy, whole["accuracy"])
  # The curve, from accuracy_curve.csv: its metrics are the run's.
  got = metrics.continual_summary(row.curve.step, row.curve.experience,
                                  row.curve.accuracy)
  for k, v in got.items():
    assert whole["metrics"][k] == pytest.approx(v, abs=1e-5)
  # The exposed classes' accuracy column, by name (none initially).
  assert np.isnan(row.curve.exposed[0])
  assert whole["metrics"]["a_auc"] == pytest.approx(
      metrics.exposed_anytime_accuracy(row.curve.step, row.curve.exposed),
      abs=1e-5)


def test_a_sweeps_rows_are_its_settings(dirs):
  _, sweep_dir = dirs
  rows = compare.read(sweep_dir)
  with open(os.path.join(sweep_dir, "sweep.json")) as f:
    data = json.load(f)
  assert [r.label for r in rows] == [
      "grid optimizer.learning_rate=0.05", "grid optimizer.learning_rate=0.2"]
  acc = np.asarray(data["accuracy"])
  curves = np.asarray(data["curve"]["accuracy"])
  for r, lr in zip(rows, (0.05, 0.2)):
    idx = [i for i, m in enumerate(data["members"])
           if m["optimizer.learning_rate"] == lr]
    assert len(idx) == r.n == 2
    # Mean and standard error over the setting's two seeds.
    for k in ("acc", "min_acc", "anytime_acc"):
      v = np.array([data["metrics"][i][k] for i in idx])
      assert r.metrics[k] == (pytest.approx(v.mean()),
                              pytest.approx(v.std(ddof=1) / np.sqrt(2)))
    np.testing.assert_allclose(r.accuracy, acc[idx].mean(0))
    np.testing.assert_allclose(r.curve.accuracy, curves[idx].mean(0))
    exposed = np.asarray(data["curve"]["exposed"], np.float64)
    np.testing.assert_allclose(r.curve.exposed, exposed[idx].mean(0))
  assert rows[0].metrics["acc"] != rows[1].metrics["acc"]


def _rows():
  acc = np.array([[1.0, 0.0], [0.5, 0.9]])
  return [compare.Row("naive", 1, {"acc": (0.7, None), "bwt": (-0.5, None)},
                      acc, "test"),
          compare.Row("replay lr=0.1", 3, {"acc": (0.81234, 0.0123)}, acc,
                      "test")]


def test_tables_to_the_character():
  assert compare.table(_rows()) == "\n".join([
      "run            n              acc      bwt",
      "------------------------------------------",
      "naive          1           0.7000  -0.5000",
      "replay lr=0.1  3  0.8123 ± 0.0123        -"])
  assert compare.table(_rows(), markdown=True, metrics=["bwt", "acc"]) == (
      "\n".join(["| run | n | bwt | acc |", "|---|---:|---:|---:|",
                 "| naive | 1 | -0.5000 | 0.7000 |",
                 "| replay lr=0.1 | 3 | - | 0.8123 ± 0.0123 |"]))
  mixed = _rows()
  mixed[1].evaluated_on = "validation"
  assert compare.table(mixed).endswith(
      "(evaluated on: test, validation splits differ between rows)")


def test_plot_draws_the_curves_when_every_row_has_one(tmp_path):
  rows = _rows()
  fig = compare.plot(rows, str(tmp_path / "a.png"))
  assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 2
  np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(),
                             [1.0, 0.7])
  for r in rows:
    r.curve = Curve(np.array([0, 5, 9]), np.array([-1, 0, 1]),
                    np.array([[0.1, 0.2], [0.8, 0.0], [0.6, 0.9]]))
  fig = compare.plot(rows, str(tmp_path / "b.png"))
  assert len(fig.axes) == 2
  np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(),
                             [np.nan, 0.8, 0.75])
  assert os.path.getsize(tmp_path / "b.png") > 0


def test_cli_compare(dirs, tmp_path, capsys):
  run_dir, sweep_dir = dirs
  cli.main(["jaxcl", "compare", run_dir, sweep_dir, "--metrics",
            "acc,wc_acc", "--plot", str(tmp_path / "c.png")])
  out = capsys.readouterr().out.splitlines()
  assert out[0].split() == ["run", "n", "acc", "wc_acc"]
  assert [line.split()[0] for line in out[2:5]] == ["one", "grid", "grid"]
  assert out[-1] == f"plot: {tmp_path / 'c.png'}"
  # Two directories of one name are told apart by their paths.
  cli.main(["jaxcl", "compare", run_dir, run_dir + "/", "--metrics", "acc"])
  out = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in out[2:]] == [run_dir, run_dir + "/"]
  assert os.path.getsize(tmp_path / "c.png") > 0
  for name, text in (("cut", '{"accuracy": [[0.5'),
                     ("other", '{"accuracy": [[0.5]]}')):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "accuracy_matrix.json").write_text(text)
  for args, message in (
      ([str(tmp_path / "nowhere")], "is not a directory"),
      ([str(tmp_path)], "holds no finished run: no accuracy_matrix.json"),
      ([run_dir, "--metrics", "acc,bogus"],
       r"--metrics: unknown metric\(s\) \['bogus'\]; these runs have \['acc'"),
      ([run_dir, "--plot"], "--plot needs a value"),
      ([run_dir, "--metrics="], "--metrics needs at least one metric name"),
      ([run_dir, "--plot", str(tmp_path / "no" / "p.png")],
       r"--plot .*p.png: the folder .*no does not exist"),
      ([run_dir, "--color"], "unknown option '--color'"),
      ([], "no run directory given"),
      ([str(tmp_path / "cut")], r"cut/accuracy_matrix.json is not readable "
       r"JSON \(Expecting"),
      ([str(tmp_path / "other")], r"other/accuracy_matrix.json lacks "
       r"\['metrics'\]: not a jaxcl run's record")):
    with pytest.raises(SystemExit) as e:
      cli.main(["jaxcl", "compare", *args])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxcl: error: ")
    assert re.search(message, err), err


def test_a_sweep_without_its_record_is_its_mean(dirs, tmp_path):
  """A sweep's directory whose sweep.json is gone: one row, the mean over
  its runs (accuracy_matrix.json says how many), without a spread."""
  import shutil
  _, sweep_dir = dirs
  copy = tmp_path / "grid_copy"
  shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns(
      "sweep.json", "checkpoints"))
  (row,) = compare.read(str(copy))
  with open(copy / "accuracy_matrix.json") as f:
    whole = json.load(f)
  assert row.n == whole["mean_of_runs"] == 4
  assert row.metrics["acc"] == (pytest.approx(whole["metrics"]["acc"]), None)
