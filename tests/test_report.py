"""The run directory's files (report.py) against hand-computed values: the
JSONL and CSV logs, the accuracy matrix file, the TensorBoard events, the
plots' data, the printed table and progress lines, and a resumed run's
log truncation."""

import csv
import glob
import json
import os
import re
import struct
from typing import Any, NamedTuple

import ml_collections
import numpy as np
import pytest

from jaxcl import metrics, report
from test_metrics import B, R


class Result(NamedTuple):
  """The fields of experiment.Result that Reporter.finish reads."""
  accuracy: np.ndarray
  random_accuracy: np.ndarray
  metrics: dict[str, float]
  times: dict[str, float]


def report_config(validation=0.0, tensorboard=True, plots=True):
  return ml_collections.ConfigDict({
      "dataset": {"name": "digits", "validation": validation},
      "report": {"progress": False, "tensorboard": tensorboard,
                 "plots": plots}})


def tb_events(workdir) -> list[Any]:
  """Every Event in the run's TensorBoard files (TFRecord framing: a
  uint64 length, its CRC, the payload, the payload's CRC)."""
  from tensorboardX.proto.event_pb2 import Event
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "tb", "events*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(Event.FromString(data[pos + 12:pos + 12 + n]))
      pos += 12 + n + 4
  return events


def tb_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] in the order written."""
  out: dict[str, list[tuple[int, float]]] = {}
  for e in tb_events(workdir):
    for v in e.summary.value:
      out.setdefault(v.tag, []).append((e.step, v.simple_value))
  return out


def run_reporter(workdir, accuracy, config=None, runs=1, random_acc=None):
  """A run's reporting calls: a loss, one row per experience, the end."""
  acc = np.asarray(accuracy)
  r = report.Reporter(str(workdir), config or report_config(), runs=runs)
  r.scalar("train/loss", 0.5, 7)
  for i, row in enumerate(acc):
    r.experience(i, row, step=10 * (i + 1))
  b = np.zeros(acc.shape[1]) if random_acc is None else random_acc
  r.finish(Result(acc, np.asarray(b), metrics.summary(acc), {"total": 1.5}))


# The average over the experiences seen after each experience of R.
SEEN = [0.9, (0.6 + 0.8) / 2, (0.5 + 0.7 + 0.95) / 3]


def test_reporter_writes_the_run_directory(tmp_path):
  run_reporter(tmp_path, R, report_config(validation=0.25), random_acc=B)
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert records[0] == {"step": 7, "train/loss": 0.5}
  for i, rec in enumerate(records[1:4]):
    assert rec["step"] == 10 * (i + 1) and rec["experience"] == i
    np.testing.assert_allclose(rec["accuracy"], R[i])
    assert rec["average_accuracy_seen"] == pytest.approx(SEEN[i])
  assert records[4]["final"] == pytest.approx(metrics.summary(R))
  assert records[4]["times"] == {"total": 1.5} and len(records) == 5

  with open(tmp_path / "metrics.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["experience", "acc_exp0", "acc_exp1", "acc_exp2",
                     "average_accuracy_seen"]
  assert [int(r[0]) for r in rows[1:]] == [0, 1, 2]
  np.testing.assert_allclose([[float(v) for v in r[1:4]] for r in rows[1:]],
                             R, atol=1e-6)
  np.testing.assert_allclose([float(r[4]) for r in rows[1:]], SEEN, atol=1e-6)

  saved = json.load(open(tmp_path / "accuracy_matrix.json"))
  np.testing.assert_allclose(saved["accuracy"], R)
  np.testing.assert_allclose(saved["random_accuracy"], B)
  assert saved["metrics"] == pytest.approx(metrics.summary(R))
  assert saved["evaluated_on"] == "validation"
  assert "mean_of_runs" not in saved and saved["times"] == {"total": 1.5}
  for png in ("accuracy_matrix.png", "average_accuracy.png"):
    assert (tmp_path / png).stat().st_size > 0

  tb = tb_scalars(tmp_path)
  assert tb["train/loss"] == [(7, 0.5)]
  # Evaluation scalars are indexed by experience, not by global step.
  steps, seen = zip(*tb["eval/average_accuracy_seen"])
  assert steps == (0, 1, 2)
  np.testing.assert_allclose(seen, SEEN, rtol=1e-6)
  for j in range(3):
    steps, values = zip(*tb[f"eval/accuracy_exp{j}"])
    assert steps == (0, 1, 2)
    np.testing.assert_allclose(values, R[:, j], rtol=1e-6)
  summary = metrics.summary(R)
  assert {k[len("final/"):] for k in tb if k.startswith("final/")} == set(
      summary)
  for k, v in summary.items():
    assert tb[f"final/{k}"] == [(0, pytest.approx(v, abs=1e-6))]


def test_joint_row_and_a_sweeps_mean(tmp_path):
  # Joint's single row covers every test set: its "seen" average is the
  # whole row. A sweep's directory names the runs its mean is over.
  joint = np.array([[0.9, 0.8, 0.4]])
  run_reporter(tmp_path, joint, runs=3)
  with open(tmp_path / "metrics.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert float(rows[1][-1]) == pytest.approx(0.7, abs=1e-6)
  saved = json.load(open(tmp_path / "accuracy_matrix.json"))
  assert saved["mean_of_runs"] == 3 and saved["per_run"] == "sweep.json"
  assert saved["evaluated_on"] == "test"


def test_report_switches_turn_off_tensorboard_and_plots(tmp_path):
  run_reporter(tmp_path, R, report_config(tensorboard=False, plots=False))
  assert not (tmp_path / "tb").exists()
  assert not list(tmp_path.glob("*.png"))
  assert (tmp_path / "metrics.csv").is_file()


def test_average_accuracy_plot_data(tmp_path):
  # x: experiences trained (1, 2, 3); y: the average over those seen. A
  # joint row plots one point, the whole row's mean.
  fig = report.plot_average_accuracy(R, str(tmp_path / "a.png"))
  np.testing.assert_allclose(fig.axes[0].lines[0].get_xydata(),
                             np.column_stack([[1, 2, 3], SEEN]))
  fig = report.plot_average_accuracy(np.array([[0.9, 0.8, 0.4]]),
                                     str(tmp_path / "b.png"))
  np.testing.assert_allclose(fig.axes[0].lines[0].get_xydata(), [[1, 0.7]])
  # A stream cut to its first experience, tested on all three: the run
  # says each experience has its own test set, and test set 0 is seen.
  fig = report.plot_average_accuracy(np.array([[0.9, 0.8, 0.4]]),
                                     str(tmp_path / "c.png"),
                                     per_experience=True)
  np.testing.assert_allclose(fig.axes[0].lines[0].get_xydata(), [[1, 0.9]])


def test_a_resumed_run_drops_what_was_logged_after_its_checkpoint(tmp_path):
  # The killed invocation logged steps 5, 10 and 12 and was cut inside a
  # record; a finished one would have added its summary (no step). A
  # resume from step 10 keeps 5 and 10 and appends after them.
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 5, "train/loss": 1.0}\n'
                  '{"step": 10, "experience": 0, "accuracy": [0.5]}\n'
                  '{"step": 12, "train/loss": 0.5}\n'
                  '{"final": {"acc": 0.5}}\n'
                  '{"step": 3, "train/lo')
  r = report.Reporter(str(tmp_path), report_config(), resume_step=10)
  r.scalar("train/loss", 0.25, 11)
  records = [json.loads(l) for l in open(path)]
  assert [rec["step"] for rec in records] == [5, 10, 11]
  assert records[2]["train/loss"] == 0.25
  r.finish(Result(R, B, metrics.summary(R), {}))  # closes the writer
  # TensorBoard is told to drop its events from step 11 on (a SessionLog
  # START at the purge step), as the log above was.
  starts = [e.step for e in tb_events(tmp_path)
            if e.HasField("session_log") and e.session_log.status == 1]
  assert starts == [11]


def test_a_kept_last_record_cut_before_its_newline_gets_one(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 4, "train/loss": 1.0}')
  report._truncate_log(str(path), 4)
  assert path.read_text() == '{"step": 4, "train/loss": 1.0}\n'
  report._truncate_log(str(tmp_path / "missing.jsonl"), 4)  # no error
  assert not (tmp_path / "missing.jsonl").exists()


def test_format_table():
  table = report.format_table(np.array([[0.5, 0.25], [0.125, 1.0]]),
                              {"acc": 0.5625, "bwt": -0.375,
                               "forgetting": 0.375},
                              split="validation")
  assert table.splitlines() == [
      "after \\ vali   exp0   exp1",
      "-" * 26,
      "        exp0  0.500  0.250",
      "        exp1  0.125  1.000",
      "",
      "         acc:  0.5625",
      "         bwt: -0.3750",
      "  forgetting:  0.3750"]
  # A longer name widens the column, the colons still aligned.
  table = report.format_table(np.array([[0.5]]), {
      "acc": 0.5, "inc_acc_pooled": 0.25})
  assert table.splitlines()[-2:] == ["           acc:  0.5000",
                                     "inc_acc_pooled:  0.2500"]


def test_evaluated_on_and_label_noise_note():
  config = report_config()
  assert report.evaluated_on(config) == "test"
  assert report.evaluated_on(report_config(validation=0.1)) == "validation"
  assert report.evaluated_on(ml_collections.ConfigDict()) == "test"
  assert report.label_noise_note(config) is None
  config.dataset.label_noise = 0.0
  assert report.label_noise_note(config) is None
  config.dataset.update(label_noise=0.3, label_noise_type="asymmetric",
                        label_noise_seed=7)
  assert report.label_noise_note(config) == (
      "(trained on noisy labels: 0.3 of each class's training labels, "
      "asymmetric, noise seed 7; evaluated on clean labels)")


def test_average_accuracy_plot_has_whole_number_ticks(tmp_path):
  # A count of experiences: matplotlib's default gave 1.0, 1.5, 2.0, ...
  fig = report.plot_average_accuracy(R, str(tmp_path / "a.png"))
  ticks = fig.axes[0].get_xticks()
  assert len(ticks) >= 3
  np.testing.assert_array_equal(ticks, np.round(ticks))
  assert (tmp_path / "a.png").stat().st_size > 0


@pytest.mark.parametrize("n", [3, report.LEGEND_INSIDE + 1, 30])
def test_curve_legend_keeps_many_curves_apart(n, tmp_path):
  """Up to LEGEND_INSIDE curves: the legend inside the axes, colours as
  drawn. More: the legend beside the axes (past its right edge, the
  figure widened), every curve's colour and style pair its own, and the
  saved figure takes the legend in."""
  fig, ax = report.figure((6, 4))
  for i in range(n):
    ax.plot([1, 2, 3], [0.5, 0.6, 0.7 - 0.01 * i], label=f"row {i}")
  report.curve_legend(fig, ax)
  legend = ax.get_legend()
  assert [t.get_text() for t in legend.get_texts()] == [
      f"row {i}" for i in range(n)]
  fig.canvas.draw()
  box = legend.get_window_extent()
  axes_box = ax.get_window_extent()
  looks = {(l.get_color() if isinstance(l.get_color(), str)
            else tuple(l.get_color()), l.get_linestyle())
           for l in ax.get_lines()}
  if n <= report.LEGEND_INSIDE:
    assert box.x1 <= axes_box.x1 + 1
    assert tuple(fig.get_size_inches()) == (6, 4)
  else:
    assert box.x0 >= axes_box.x1
    assert fig.get_size_inches()[0] > 6
    assert len(looks) == n
    fig.savefig(tmp_path / "f.png", bbox_inches="tight")
    import matplotlib.image
    width = matplotlib.image.imread(tmp_path / "f.png").shape[1]
    assert width >= box.x1 - axes_box.x0


def test_progress_in_a_log_file_is_whole_lines(capsys):
  # Under pytest stderr is not a terminal, as in a batch job's log: no
  # tqdm redraws ('\r'), a plain line at most every `interval` seconds,
  # never past the total.
  bar = report._Bar(total=10, desc="experience 2/3", interval=0.0)
  bar.update(4)
  bar.update(4, loss=0.25)
  bar.update(4, loss=0.125)  # overshoots: the epoch's last chunk is padded
  bar.close()
  quiet = report._Bar(total=10, desc="experience 3/3", interval=3600.0)
  quiet.update(5, loss=1.0)
  quiet.close()
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = err.splitlines()
  assert len(lines) == 2, err
  assert re.fullmatch(r"experience 2/3: 4/10 steps, \d+ s", lines[0])
  assert re.fullmatch(r"experience 2/3: 8/10 steps, \d+ s, loss 0\.2500",
                      lines[1])
  assert bar.done == 10 and bar.loss == 0.125 and bar.seconds >= 0
  assert quiet.done == 5 and quiet.loss == 1.0


def test_experience_line_of_a_resumed_experience(tmp_path, capsys):
  # A run resumed mid-experience counts (and times) only the steps this
  # invocation ran; the average is over the experiences seen so far.
  r = report.Reporter(str(tmp_path), {}, progress=True, runs=3)
  bar = r.progress(10, "experience 2/4", initial=6)
  assert bar.done == 6
  bar.update(4, loss=0.5)
  bar.close()
  r.experience(1, np.array([0.5, 0.75, 0.0, 0.0]), step=26)
  line = capsys.readouterr().err.strip()
  assert re.fullmatch(
      r"experience 2/4: 4 steps \(resumed at step 6\) in \d\.\d\d s, loss "
      r"0\.5000; average test accuracy over experiences 1-2: 0\.6250 \(mean "
      r"of 3 runs\)", line), line


def _finish_and_read(r: report.Reporter, n_test: int) -> list[dict]:
  """Finishes a hand-driven reporter (an empty result over ``n_test``
  test sets) and returns its metrics.jsonl records."""
  r.finish(type("R", (), {"accuracy": np.zeros((1, n_test)),
                          "random_accuracy": np.zeros(n_test),
                          "metrics": {}, "times": {}})())
  with open(os.path.join(r.workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_task_il_beside_the_experience_line(tmp_path, capsys):
  """A task-aware row given before the experience's row is logged with it
  and printed beside it; one for another experience is not."""
  r = report.Reporter(str(tmp_path), {}, progress=True, runs=3)
  r.progress(10, "experience 2/4").close()
  r.task_accuracy(1, np.array([0.9, 1.0, 0.5, 0.5]))
  r.experience(1, np.array([0.5, 0.75, 0.0, 0.0]), step=20)
  line = capsys.readouterr().err.strip()
  assert line.endswith("average test accuracy over experiences 1-2: "
                       "0.6250 (Task-IL 0.9500) (mean of 3 runs)"), line
  r.progress(10, "experience 3/4").close()
  r.task_accuracy(1, np.array([0.9, 1.0, 0.5, 0.5]))  # a stale one
  r.experience(2, np.array([0.5, 0.75, 0.25, 0.0]), step=30)
  assert "Task-IL" not in capsys.readouterr().err
  records = _finish_and_read(r, 4)
  assert records[0]["task_accuracy"] == [0.9, 1.0, 0.5, 0.5]
  assert records[0]["task_average_accuracy_seen"] == pytest.approx(0.95)
  assert "task_accuracy" not in records[1]


def test_the_strategys_own_work_after_an_experience_is_timed(tmp_path,
                                                             capsys):
  """The seconds of a strategy's ``after_experience`` (GDumb's
  retraining, which the experience's bar does not show) are logged with
  the experience's row and, from half a second on, printed beside its
  steps; a time given for another experience is not."""
  r = report.Reporter(str(tmp_path), {}, progress=True)
  r.progress(10, "experience 1/3").close()
  r.after_experience(0, 2.54)
  r.experience(0, np.array([0.5, 0.0, 0.0]), step=10)
  line = capsys.readouterr().err.strip()
  assert re.search(r"^experience 1/3: 10 steps in [\d.]+ s, then 2\.5 s of "
                   r"the strategy's own work; average test accuracy over "
                   r"experience 1: 0\.5000$", line), line
  r.progress(10, "experience 2/3").close()
  r.after_experience(1, 0.2)  # logged, not printed
  r.experience(1, np.array([0.5, 0.5, 0.0]), step=20)
  assert "own work" not in capsys.readouterr().err
  r.progress(10, "experience 3/3").close()
  r.after_experience(1, 9.0)  # a stale one
  r.experience(2, np.array([0.5, 0.5, 0.5]), step=30)
  assert "own work" not in capsys.readouterr().err
  records = _finish_and_read(r, 3)
  assert [rec.get("after_experience_seconds") for rec in records[:3]] == [
      2.54, 0.2, None]


def test_unequal_test_sets_log_the_pooled_accuracy_seen(tmp_path):
  """A first test set of 50 examples, then two of 10 (a larger first
  experience): each record also holds the accuracy over the test examples
  of the experiences seen; test sets of one size do not need it."""
  r = report.Reporter(str(tmp_path / "a"), {}, per_experience=True,
                      test_sizes=[50, 10, 10])
  for i, row in enumerate([[0.9, 0.0, 0.0], [0.8, 0.5, 0.0],
                           [0.6, 0.5, 1.0]]):
    r.experience(i, np.array(row), step=10 * (i + 1))
  records = _finish_and_read(r, 3)
  np.testing.assert_allclose(
      [rec["pooled_accuracy_seen"] for rec in records[:3]],
      [0.9, (0.8 * 50 + 0.5 * 10) / 60, (0.6 * 50 + 0.5 * 10 + 10) / 70])
  np.testing.assert_allclose(records[1]["average_accuracy_seen"], 0.65)
  r = report.Reporter(str(tmp_path / "b"), {}, per_experience=True,
                      test_sizes=[10, 10, 10])
  for i in range(3):
    r.experience(i, np.array([0.5, 0.5, 0.5]), step=i)
  assert not any("pooled_accuracy_seen" in rec
                 for rec in _finish_and_read(r, 3))
  # metrics.csv: the same per experience, as a column.
  acc = np.array([[0.9, 0.0, 0.0], [0.8, 0.5, 0.0], [0.6, 0.5, 1.0]])
  r = report.Reporter(str(tmp_path / "c"), {}, per_experience=True,
                      test_sizes=[50, 10, 10])
  r.finish(type("R", (), {"accuracy": acc, "random_accuracy": np.zeros(3),
                          "metrics": {}, "times": {}})())
  with open(tmp_path / "c" / "metrics.csv") as f:
    header, *rows = list(csv.reader(f))
  assert header[-2:] == ["average_accuracy_seen", "pooled_accuracy_seen"]
  np.testing.assert_allclose([float(row[-1]) for row in rows],
                             [0.9, 45 / 60, 45 / 70], atol=1e-6)
  r = report.Reporter(str(tmp_path / "d"), {}, per_experience=True,
                      test_sizes=[10, 10, 10])
  r.finish(type("R", (), {"accuracy": acc, "random_accuracy": np.zeros(3),
                          "metrics": {}, "times": {}})())
  with open(tmp_path / "d" / "metrics.csv") as f:
    assert next(csv.reader(f))[-1] == "average_accuracy_seen"


def test_a_run_logs_its_strategys_time_after_each_experience(tmp_path):
  import jaxcl
  from test_train import quick_config
  c = quick_config(**{"strategy.name": "gdumb", "scenario.n_experiences": 2})
  c.strategy.gdumb = {"epochs": 2}
  jaxcl.run(c, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    times = [json.loads(line).get("after_experience_seconds")
             for line in f if '"experience"' in line]
  assert len(times) == 2 and all(t > 0 for t in times), times
  logged = tb_scalars(tmp_path)["time/after_experience_seconds"]
  assert [i for i, _ in logged] == [0, 1]
  np.testing.assert_allclose([t for _, t in logged], times, rtol=1e-6)


def test_a_long_hook_says_what_is_running(tmp_path, capsys, monkeypatch):
  """Work without a bar of its own (GDumb's retraining at an experience's
  end) is named once it has run for WAIT_NOTICE_SECONDS, so that a long
  one does not look like a hang; shorter work prints nothing."""
  import time

  import jaxcl
  from test_train import quick_config
  r = report.Reporter(str(tmp_path / "hand"), {}, progress=True)
  monkeypatch.setattr(report.Reporter, "WAIT_NOTICE_SECONDS", 0.05)
  with r.waiting("experience 2/5: X's own work after the experience"):
    time.sleep(0.5)
  assert capsys.readouterr().err == (
      "experience 2/5: X's own work after the experience ...\n")
  with r.waiting("quick"):
    pass
  time.sleep(0.2)  # (a timer left running would print by now)
  assert capsys.readouterr().err == ""
  c = quick_config(**{"strategy.name": "gdumb", "scenario.n_experiences": 2,
                      "report.progress": True})
  c.strategy.gdumb = {"epochs": 2}
  monkeypatch.setattr(report.Reporter, "WAIT_NOTICE_SECONDS", 0.0)
  jaxcl.run(c, str(tmp_path / "run"))
  err = capsys.readouterr().err
  # (The first one compiles the retraining: it runs long enough for the
  # timer's thread to print before it is cancelled.)
  assert ("experience 1/2: gdumb's own work after the experience ..."
          in err), err


def test_a_hooks_own_bar_replaces_the_notice_and_counts_its_unit(
    tmp_path, capsys, monkeypatch):
  """A hook that opens a bar (SPR's fills) is not also named by the
  waiting notice; outside a terminal its bar prints plain lines in its
  own unit. With progress off the bar is silent."""
  import time
  r = report.Reporter(str(tmp_path / "a"), {}, progress=True)
  monkeypatch.setattr(report.Reporter, "WAIT_NOTICE_SECONDS", 0.2)
  with r.waiting("experience 1/2: spr's own work after the experience"):
    bar = r.work_progress(3, "experience 1/2, spr after it: fills", "fill")
    time.sleep(0.5)
    bar._interval = 0.0  # a plain line at each update (no terminal here)
    bar.update(1)
    bar.update(1)
    bar.close()
  err = capsys.readouterr().err
  assert "own work" not in err, err
  assert [line.rsplit(", ", 1)[0] for line in err.splitlines()] == [
      f"experience 1/2, spr after it: fills: {k}/3 fills" for k in (1, 2)], err
  # The notice still comes for a hook without a bar, after one that had.
  with r.waiting("later"):
    time.sleep(0.5)
  assert capsys.readouterr().err == "later ...\n"
  quiet = report.Reporter(str(tmp_path / "b"), {}, progress=False)
  quiet.work_progress(3, "fills", "fill").update(3)
  assert capsys.readouterr().err == ""


def test_joint_averages_every_test_set_a_cut_stream_its_own(tmp_path,
                                                            capsys):
  """Joint's one experience is tested on every test set: the logged and
  printed average is over all of them (it read test set 0 alone before
  session 45). A stream cut to its first two experiences, tested on all
  five, averages its own two."""
  import dataclasses

  import jaxcl
  from jaxcl import experiment
  from test_train import quick_config

  def logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f
              if "average_accuracy_seen" in line]

  c = quick_config(**{"strategy.name": "joint", "report.progress": True})
  r = jaxcl.run(c, str(tmp_path / "joint"))
  (rec,) = logged(tmp_path / "joint")
  assert rec["average_accuracy_seen"] == pytest.approx(r.accuracy[0].mean())
  assert rec["average_accuracy_seen"] != pytest.approx(r.accuracy[0, 0])
  assert (f"average test accuracy over all 5 test sets: "
          f"{r.accuracy[0].mean():.4f}") in capsys.readouterr().err
  with open(tmp_path / "joint" / "metrics.csv") as f:
    assert float(list(csv.reader(f))[1][-1]) == pytest.approx(
        r.accuracy[0].mean(), abs=1e-6)
  c = quick_config()
  sc = experiment.build_scenario(c)
  cut = dataclasses.replace(sc, experiences=sc.experiences[:2],
                            eval_experiences=sc.experiences)
  r = jaxcl.run(c, str(tmp_path / "cut"), scenario=cut)
  recs = logged(tmp_path / "cut")
  assert [x["average_accuracy_seen"] for x in recs] == [
      pytest.approx(r.accuracy[0, :1].mean()),
      pytest.approx(r.accuracy[1, :2].mean())]
