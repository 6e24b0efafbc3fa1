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


def test_pooled_accuracies_weight_each_test_set_by_its_examples():
  # A first experience of 500 test examples, then two of 100 (LUCIR's B50
  # Inc10 in miniature): the accuracy on the union of the test sets seen,
  # by hand, against the unweighted mean over experiences.
  n = [500, 100, 100]
  assert metrics.pooled_accuracy(R, n) == pytest.approx(
      (0.5 * 500 + 0.7 * 100 + 0.95 * 100) / 700)
  over = [0.9, (0.6 * 500 + 0.8 * 100) / 600,
          (0.5 * 500 + 0.7 * 100 + 0.95 * 100) / 700]
  np.testing.assert_allclose(metrics.pooled_accuracy_over_time(R, n), over)
  assert metrics.pooled_incremental_accuracy(R, n) == pytest.approx(
      np.mean(over))
  assert metrics.pooled_accuracy(R, n) < metrics.average_accuracy(R) - 0.1
  # Equal sizes: the plain means.
  assert metrics.pooled_incremental_accuracy(R, [7, 7, 7]) == pytest.approx(
      metrics.average_incremental_accuracy(R))
  s = metrics.summary(R, B, sizes=n)
  assert s["acc_pooled"] == metrics.pooled_accuracy(R, n)
  assert s["inc_acc_pooled"] == metrics.pooled_incremental_accuracy(R, n)
  # Only when the sizes differ; a joint row gets the pooled ACC alone.
  assert "acc_pooled" not in metrics.summary(R, B, sizes=[7, 7, 7])
  assert set(metrics.summary(np.array([[0.9, 0.8]]), sizes=[3, 1])) == {
      "acc", "acc_pooled"}
  for bad in ([500, 100], [500, 0, 100]):
    with pytest.raises(ValueError, match=r"sizes must hold one positive "
                       r"test-set size per column of the accuracy matrix "
                       r"\(3\), got"):
      metrics.pooled_accuracy(R, bad)


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


# A continual-evaluation curve of three experiences: the initial model,
# then two points per experience, the second its end (the row of R).
# Experience 0 drops to 0.3 early in experience 1 and recovers to 0.7 by
# its end: the stability gap the matrix does not see.
CURVE_STEP = np.array([0, 5, 10, 15, 20, 25, 30])
CURVE_EXP = np.array([-1, 0, 0, 1, 1, 2, 2])
CURVE_ACC = np.array([[0.1, 0.1, 0.1],
                      [0.6, 0.0, 0.0],
                      [0.9, 0.0, 0.0],
                      [0.3, 0.5, 0.0],
                      [0.7, 0.8, 0.0],
                      [0.6, 0.2, 0.4],
                      [0.65, 0.75, 0.9]])


def test_min_accuracy_takes_the_lowest_point_after_each_experience():
  # Experience 0: min(0.3, 0.7, 0.6, 0.65); experience 1: min(0.2, 0.75).
  # Its own points (0.6 while it trains) never count.
  assert metrics.min_accuracy(CURVE_EXP, CURVE_ACC) == pytest.approx(
      (0.3 + 0.2) / 2)
  # On the matrix's rows alone (the experiences' ends) the gap is missed.
  ends = [0, 2, 4, 6]
  assert metrics.min_accuracy(CURVE_EXP[ends], CURVE_ACC[ends]) == (
      pytest.approx((0.65 + 0.75) / 2))
  assert np.isnan(metrics.min_accuracy([-1, 0], [[0.1], [0.8]]))


def test_worst_case_accuracy_weights_the_last_experience_by_one_over_t():
  assert metrics.worst_case_accuracy(CURVE_EXP, CURVE_ACC) == pytest.approx(
      0.9 / 3 + (2 / 3) * 0.25)
  # One experience: its final accuracy.
  assert metrics.worst_case_accuracy([-1, 0, 0], [[0.1], [0.5], [0.8]]) == (
      pytest.approx(0.8))


def test_anytime_accuracy_averages_the_seen_experiences_over_steps():
  seen = [0.6, 0.9, (0.3 + 0.5) / 2, 0.75, (0.6 + 0.2 + 0.4) / 3,
          (0.65 + 0.75 + 0.9) / 3]
  assert metrics.anytime_accuracy(CURVE_STEP, CURVE_EXP, CURVE_ACC) == (
      pytest.approx(np.mean(seen)))
  # Each point stands for the steps since the one before it: 1 step for
  # the first, 19 for the second, 2 for each of the others.
  step = np.array([0, 1, 20, 22, 24, 26, 28])
  w = np.array([1, 19, 2, 2, 2, 2])
  assert metrics.anytime_accuracy(step, CURVE_EXP, CURVE_ACC) == (
      pytest.approx(np.sum(w * np.array(seen)) / w.sum()))
  with pytest.raises(ValueError, match="after training steps"):
    metrics.anytime_accuracy([0, 0], [-1, 0], [[0.1], [0.2]])
  with pytest.raises(ValueError, match="never decrease"):
    metrics.anytime_accuracy(CURVE_STEP[::-1], CURVE_EXP, CURVE_ACC)


def test_exposed_accuracy_and_its_anytime_average():
  # Classes 0-3 with 10, 20, 30, 40 test examples; 0 and 2 exposed: the
  # right predictions of those classes over their examples.
  correct = np.array([5, 20, 15, 0])
  count = np.array([10, 20, 30, 40])
  exposed = np.array([True, False, True, False])
  assert metrics.exposed_accuracy(correct, count, exposed) == (
      pytest.approx(20 / 40))
  assert np.isnan(metrics.exposed_accuracy(correct, count,
                                           np.zeros(4, bool)))
  # A sweep's runs (leading axis) at once.
  both = metrics.exposed_accuracy(np.stack([correct, count]), count,
                                  exposed)
  np.testing.assert_allclose(both, [0.5, 1.0])
  # Weighted by the steps since the point before; the initial point's
  # value (NaN: nothing exposed) is ignored.
  assert metrics.exposed_anytime_accuracy(
      [0, 1, 20, 22], [np.nan, 0.4, 0.6, 0.9]) == pytest.approx(
          (1 * 0.4 + 19 * 0.6 + 2 * 0.9) / 22)
  with pytest.raises(ValueError, match="one shape"):
    metrics.exposed_anytime_accuracy([0, 1, 2], [np.nan, 0.5])
  with pytest.raises(ValueError, match="after training steps"):
    metrics.exposed_anytime_accuracy([0, 0], [np.nan, 0.5])


def test_continual_summary_and_bad_curves():
  assert metrics.continual_summary(CURVE_STEP, CURVE_EXP, CURVE_ACC) == {
      "min_acc": pytest.approx(0.25),
      "wc_acc": pytest.approx(0.9 / 3 + (2 / 3) * 0.25),
      "anytime_acc": pytest.approx(metrics.anytime_accuracy(
          CURVE_STEP, CURVE_EXP, CURVE_ACC))}
  # One experience has no minACC; Joint's (one experience, three test
  # sets) has none of them.
  assert set(metrics.continual_summary([0, 4], [-1, 0], [[0.1], [0.7]])) == {
      "wc_acc", "anytime_acc"}
  assert metrics.continual_summary([0, 4], [-1, 0], np.ones((2, 3))) == {}
  with pytest.raises(ValueError, match="never decrease"):
    metrics.min_accuracy(CURVE_EXP[::-1], CURVE_ACC)
  with pytest.raises(ValueError, match="one test set per training"):
    metrics.min_accuracy(CURVE_EXP, CURVE_ACC[:, :2])


def test_windowed_forgetting_and_plasticity_within_a_window_of_steps():
  # Every 5 steps. Drops: experience 0 0.9 -> 0.3 and experience 1
  # 0.8 -> 0.2 in 5 steps, experience 2 none; the mean over all three
  # (De Lange et al.'s code averages over every task, the last included).
  assert metrics.windowed_forgetting(CURVE_STEP, CURVE_EXP, CURVE_ACC,
                                     5) == pytest.approx((0.6 + 0.6) / 3)
  # Rises: 0.3 -> 0.7, 0.2 -> 0.75 and 0.4 -> 0.9.
  assert metrics.windowed_plasticity(CURVE_STEP, CURVE_EXP, CURVE_ACC,
                                     5) == pytest.approx(
                                         (0.4 + 0.55 + 0.5) / 3)
  # No two points within 4 steps: nothing to measure.
  for f in (metrics.windowed_forgetting, metrics.windowed_plasticity):
    assert f(CURVE_STEP, CURVE_EXP, CURVE_ACC, 4) == 0.0
  # A slow decline of experience 0 (0.1 per 5 steps) after its own rise
  # (0.5 -> 0.9); experience 1 only rises; the initial model's point
  # (before experience 0 trains) counts for neither.
  step = [0, 5, 10, 15, 20, 25, 30]
  exp = [-1, 0, 0, 1, 1, 1, 1]
  acc = np.array([[0.1, 0.0], [0.5, 0.0], [0.9, 0.0], [0.8, 0.5],
                  [0.7, 0.6], [0.6, 0.7], [0.8, 0.9]])
  for window, drop, rise in ((5, 0.1, (0.4 + 0.2) / 2),
                             (10, 0.2, (0.4 + 0.3) / 2),
                             (15, 0.3, (0.4 + 0.4) / 2),
                             (100, 0.3, (0.4 + 0.4) / 2)):
    assert metrics.windowed_forgetting(step, exp, acc, window) == (
        pytest.approx(drop / 2)), window
    assert metrics.windowed_plasticity(step, exp, acc, window) == (
        pytest.approx(rise)), window
  for bad in (0, -1, float("nan"), True):
    with pytest.raises(ValueError, match="window \\(steps\\) must be a "
                       "finite number > 0"):
      metrics.windowed_forgetting(CURVE_STEP, CURVE_EXP, CURVE_ACC, bad)
    with pytest.raises(ValueError, match="windowed_plasticity: window"):
      metrics.windowed_plasticity(CURVE_STEP, CURVE_EXP, CURVE_ACC, bad)


def test_windowed_metrics_equal_every_pair_written_out():
  # Random curves (irregular steps, several points per experience): the
  # mean over experiences of the largest drop / rise over all pairs of
  # points from the experience's start, at most `window` steps apart.
  rng = np.random.default_rng(0)
  for _ in range(20):
    t, per = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    exp = np.array([-1] + [i for i in range(t) for _ in range(per)])
    step = np.concatenate([[0], np.cumsum(rng.integers(1, 6, len(exp) - 1))])
    acc = rng.uniform(size=(len(exp), t))
    window = float(rng.integers(1, 15))
    drops, rises = [], []
    for i in range(t):
      pts = [k for k in range(len(exp)) if exp[k] >= i]
      pairs = [(acc[k, i], acc[m, i]) for k in pts for m in pts
               if k < m and step[m] - step[k] <= window]
      drops.append(max([0.0] + [x - y for x, y in pairs]))
      rises.append(max([0.0] + [y - x for x, y in pairs]))
    assert metrics.windowed_forgetting(step, exp, acc, window) == (
        pytest.approx(np.mean(drops)))
    assert metrics.windowed_plasticity(step, exp, acc, window) == (
        pytest.approx(np.mean(rises)))
