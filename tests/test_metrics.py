"""Metrics against hand-computed values."""

import re

import numpy as np
import pytest

from jaxcl import metrics

R = np.array([[0.9, 0.1, 0.2],
              [0.6, 0.8, 0.3],
              [0.5, 0.7, 0.95]])
B = np.array([0.1, 0.2, 0.1])


def test_average_accuracy():
  assert metrics.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_accuracy_over_time():
  np.testing.assert_allclose(metrics.accuracy_over_time(R),
                             [0.9, 0.7, (0.5 + 0.7 + 0.95) / 3])


def test_backward_transfer_negative_when_forgetting():
  # ((0.5 - 0.9) + (0.7 - 0.8)) / 2
  assert metrics.backward_transfer(R) == pytest.approx(-0.25)
  improving = np.array([[0.5, 0.0], [0.7, 0.9]])
  assert metrics.backward_transfer(improving) == pytest.approx(0.2)


def test_forward_transfer_sign():
  # ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.1-0.2) + (0.3-0.1)) / 2
  assert metrics.forward_transfer(R, B) == pytest.approx(0.05)
  assert metrics.forward_transfer(R, [0.5, 0.5, 0.5]) < 0


def test_forgetting_uses_best_earlier_accuracy():
  # exp0: max(0.9, 0.6) - 0.5 = 0.4; exp1: max(0.8) - 0.7 = 0.1
  assert metrics.forgetting(R) == pytest.approx(0.25)
  # In R every column's best is its diagonal: here experience 0 peaks
  # after it was learned (backward transfer), and the peak counts.
  peak_later = np.array([[0.6, 0.1, 0.2],
                         [0.9, 0.8, 0.3],
                         [0.5, 0.7, 0.95]])
  # exp0: max(0.6, 0.9) - 0.5 = 0.4; exp1: 0.8 - 0.7 = 0.1
  assert metrics.forgetting(peak_later) == pytest.approx(0.25)


def test_average_incremental_accuracy_averages_the_seen_accuracies():
  # (0.9 + (0.6 + 0.8) / 2 + (0.5 + 0.7 + 0.95) / 3) / 3
  expected = (0.9 + 0.7 + 2.15 / 3) / 3
  assert metrics.average_incremental_accuracy(R) == pytest.approx(expected)
  # Unlike ACC, it credits the accuracy held before the last experience.
  late = np.array([[1.0, 0.0], [0.0, 1.0]])
  assert metrics.average_accuracy(late) == pytest.approx(0.5)
  assert metrics.average_incremental_accuracy(late) == pytest.approx(0.75)


def test_learning_accuracy_is_the_diagonal_mean():
  assert metrics.learning_accuracy(R) == pytest.approx((0.9 + 0.8 + 0.95) / 3)
  with pytest.raises(ValueError, match="square"):
    metrics.learning_accuracy(np.ones((1, 3)))


def test_summary_and_shapes():
  s = metrics.summary(R, B)
  assert set(s) == {"acc", "bwt", "forgetting", "fwt", "inc_acc",
                    "learning_acc"}
  assert s["inc_acc"] == metrics.average_incremental_accuracy(R)
  assert s["learning_acc"] == metrics.learning_accuracy(R)
  assert set(metrics.summary(R)) == {"acc", "bwt", "forgetting", "inc_acc",
                                     "learning_acc"}
  joint = metrics.summary(np.array([[0.9, 0.8]]))
  assert joint == {"acc": pytest.approx(0.85)}
  with pytest.raises(ValueError, match="square"):
    metrics.backward_transfer(np.ones((1, 3)))
  with pytest.raises(ValueError, match="random_acc"):
    metrics.forward_transfer(R, [0.1])


def test_average_accuracy_plot_has_whole_number_ticks(tmp_path):
  # A count of experiences: matplotlib's default gave 1.0, 1.5, 2.0, ...
  from jaxcl import report
  fig = report.plot_average_accuracy(R, str(tmp_path / "a.png"))
  ticks = fig.axes[0].get_xticks()
  assert len(ticks) >= 3
  np.testing.assert_array_equal(ticks, np.round(ticks))
  assert (tmp_path / "a.png").stat().st_size > 0


def test_progress_in_a_log_file_is_whole_lines(capsys):
  # Under pytest stderr is not a terminal, as in a batch job's log: no
  # tqdm redraws ('\r'), a plain line at most every `interval` seconds,
  # never past the total.
  from jaxcl import report
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
  from jaxcl import report
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
