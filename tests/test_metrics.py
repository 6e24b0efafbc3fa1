"""Metrics against hand-computed values."""

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
  # b_j pairs with R[j-1, j], the column it was measured on:
  # ((0.1 - 0.2) + (0.3 - 0.05)) / 2; b_0 is never used.
  assert metrics.forward_transfer(R, [0.3, 0.2, 0.05]) == pytest.approx(0.075)
  assert metrics.forward_transfer(R, [9.0, 0.2, 0.05]) == pytest.approx(0.075)


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
  # The best is taken before the last experience only, so an experience
  # the last one improved has negative forgetting: 0.5 - 0.7.
  improving = np.array([[0.5, 0.0], [0.7, 0.9]])
  assert metrics.forgetting(improving) == pytest.approx(-0.2)


def test_one_experience_has_no_transfer_or_forgetting():
  one = np.array([[0.8]])
  assert metrics.backward_transfer(one) == 0.0
  assert metrics.forgetting(one) == 0.0
  assert metrics.forward_transfer(one, [0.1]) == 0.0
  assert metrics.summary(one, [0.1]) == {
      "acc": pytest.approx(0.8), "bwt": 0.0, "forgetting": 0.0, "fwt": 0.0,
      "inc_acc": pytest.approx(0.8), "learning_acc": pytest.approx(0.8)}


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
  # The same hand-computed values as the tests above.
  assert s == {"acc": pytest.approx((0.5 + 0.7 + 0.95) / 3),
               "bwt": pytest.approx(-0.25), "forgetting": pytest.approx(0.25),
               "fwt": pytest.approx(0.05),
               "inc_acc": pytest.approx((0.9 + 0.7 + 2.15 / 3) / 3),
               "learning_acc": pytest.approx((0.9 + 0.8 + 0.95) / 3)}
  # In R, BWT = -forgetting; where an experience peaks later they differ:
  # BWT ((0.5 - 0.6) + (0.7 - 0.8)) / 2, forgetting (0.4 + 0.1) / 2.
  peak_later = metrics.summary(np.array([[0.6, 0.1, 0.2],
                                         [0.9, 0.8, 0.3],
                                         [0.5, 0.7, 0.95]]))
  assert peak_later["bwt"] == pytest.approx(-0.1)
  assert peak_later["forgetting"] == pytest.approx(0.25)
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
