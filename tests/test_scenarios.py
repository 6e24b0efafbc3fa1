"""Scenarios: splits, permutations, rotations, online, user arrays."""

import re

import numpy as np
import pytest

from conftest import slow_beyond
from jaxcl import scenarios
from jaxcl.datasets import Dataset


def test_split_classes_disjoint_cover_and_sizes(digits):
  s = scenarios.split(digits, 5)
  assert s.kind == "class" and s.num_tasks == 1 and len(s) == 5
  seen = [set(e.classes) for e in s.experiences]
  for i in range(5):
    for j in range(i + 1, 5):
      assert not seen[i] & seen[j]
  assert set().union(*seen) == set(range(10))
  for e in s.experiences:
    assert e.num_train == int(np.isin(digits.train_y, e.classes).sum())
    assert len(e.test_y) == int(np.isin(digits.test_y, e.classes).sum())
    assert set(np.unique(e.train_y)) == set(e.classes)
    assert set(np.unique(e.test_y)) == set(e.classes)
  assert sum(e.num_train for e in s.experiences) == len(digits.train_y)


def test_split_task_incremental_task_ids_and_class_table(digits):
  s = scenarios.split(digits, 5, kind="task", class_order=[9, 8, 7, 6, 5, 4,
                                                            3, 2, 1, 0])
  assert s.num_tasks == 5
  assert [e.task_id for e in s.experiences] == list(range(5))
  assert s.experiences[0].classes == (9, 8)
  assert np.all(s.experiences[2].train_task == 2)
  np.testing.assert_array_equal(np.flatnonzero(s.task_classes[0]), [8, 9])
  assert s.task_classes.sum() == 10


def test_split_seeded_order_reproducible_and_differs(digits):
  a = scenarios.split(digits, 5, seed=3)
  b = scenarios.split(digits, 5, seed=3)
  c = scenarios.split(digits, 5, seed=4)
  assert [e.classes for e in a.experiences] == [e.classes for e in
                                                b.experiences]
  assert [e.classes for e in a.experiences] != [e.classes for e in
                                                c.experiences]
  np.testing.assert_array_equal(a.experiences[1].train_x,
                                b.experiences[1].train_x)


def test_split_domain_incremental_relabels_to_position_in_group(digits):
  order = [3, 8, 0, 5, 9, 1, 2, 7, 6, 4]
  s = scenarios.split(digits, 5, kind="domain", class_order=order)
  assert s.kind == "domain" and s.num_tasks == 1 and s.num_classes == 2
  assert s.task_classes.shape == (1, 2) and s.task_classes.all()
  for i, e in enumerate(s.experiences):
    first, second = order[2 * i], order[2 * i + 1]
    assert e.classes == (0, 1) and e.task_id == 0
    keep = np.isin(digits.train_y, [first, second])
    # Same examples as the class-incremental split, in the same order ...
    np.testing.assert_array_equal(e.train_x, digits.train_x[keep])
    # ... with label 0 for the group's first class and 1 for its second.
    np.testing.assert_array_equal(
        e.train_y, (digits.train_y[keep] == second).astype(np.int32))
    keep_te = np.isin(digits.test_y, [first, second])
    np.testing.assert_array_equal(
        e.test_y, (digits.test_y[keep_te] == second).astype(np.int32))
    assert np.all(e.train_task == 0) and np.all(e.test_task == 0)


def test_split_domain_trains_a_two_way_head(digits):
  from jaxcl import experiment
  c = experiment.default_config()
  c.scenario.kind = "domain"
  c.train.epochs = 1
  c.report.progress = False
  sc = experiment.build_scenario(c)
  assert sc.num_classes == 2
  res = experiment.run(c)
  acc = np.asarray(res.accuracy)
  assert acc.shape == (5, 5)
  # Each pair is learned when trained (a 2-way problem, chance 0.5).
  assert np.all(np.diag(acc) > 0.7), acc


def test_split_with_a_larger_first_experience(digits):
  # "B4 Inc2": the first experience learns the order's first 4 classes,
  # the other 3 experiences 2 each, in the order given; task-incremental
  # tasks follow the same groups; every example is in its class's group.
  order = [3, 9, 0, 5, 1, 8, 2, 7, 6, 4]
  s = scenarios.split(digits, 4, class_order=order, first_classes=4)
  assert [e.classes for e in s.experiences] == [
      (3, 9, 0, 5), (1, 8), (2, 7), (6, 4)]
  for e in s.experiences:
    assert e.num_train == int(np.isin(digits.train_y, e.classes).sum())
    assert set(np.unique(e.test_y)) == set(e.classes)
  assert s.num_classes == 10 and s.task_classes.shape == (1, 10)
  t = scenarios.split(digits, 4, kind="task", class_order=order,
                      first_classes=4)
  np.testing.assert_array_equal(t.task_classes.sum(1), [4, 2, 2, 2])
  np.testing.assert_array_equal(np.flatnonzero(t.task_classes[1]), [1, 8])
  assert [e.task_id for e in t.experiences] == [0, 1, 2, 3]
  # first_classes equal to an even split's size is the even split.
  even = scenarios.split(digits, 5, seed=2)
  same = scenarios.split(digits, 5, seed=2, first_classes=2)
  assert [e.classes for e in even.experiences] == [
      e.classes for e in same.experiences]
  # Domain-incremental experiences share one label set: same sizes only.
  with pytest.raises(ValueError, match=r"first_classes=4 with "
                     r"kind='domain'.*must be the same size"):
    scenarios.split(digits, 4, kind="domain", first_classes=4)


@pytest.mark.parametrize("n,first,match", [
    (3, 5, r"first_classes=5 with n_experiences=3: the 5 classes of digits "
           r"after the first experience's do not split equally over 2 more "
           r"experiences; valid n_experiences: \[2, 6\]"),
    (1, 4, r"over 0 more experiences; valid n_experiences: \[2, 3, 4, 7\]"),
    (2, 10, r"first_classes=10 leaves no class for the later experiences; "
            r"digits has 10 classes"),
    (3, -1, r"first_classes must be a whole number >= 0"),
    (3, 2.5, r"first_classes must be a whole number >= 0")])
def test_split_refuses_a_first_experience_that_leaves_uneven_rest(
    digits, n, first, match):
  with pytest.raises(ValueError, match=match):
    scenarios.split(digits, n, first_classes=first)


@pytest.mark.parametrize("n", [3, 4, 0])
def test_split_rejects_non_divisor(digits, n):
  with pytest.raises(ValueError, match="does not divide"):
    scenarios.split(digits, n)


def test_split_rejects_bad_class_order(digits):
  with pytest.raises(ValueError, match="not a permutation"):
    scenarios.split(digits, 5, class_order=[0] * 10)
  # Compared as given, not after a cast to int: (1.5,) once read as [1],
  # and 'abc' raised int()'s bare "invalid literal" error.
  for order in ([1.5], ["abc"], [*range(9), 9.5]):
    with pytest.raises(ValueError, match=re.escape(
        f"class_order {order} is not a permutation of 0..9")):
      scenarios.split(digits, 5, class_order=order)
  # numpy's integers are whole numbers.
  s = scenarios.split(digits, 5, class_order=np.arange(10)[::-1])
  assert s.experiences[0].classes == (9, 8)


def test_permuted_are_permutations_and_differ(digits):
  s = scenarios.permuted(digits, 3, seed=1)
  assert s.kind == "domain" and len(s) == 3
  flat = digits.train_x.reshape(len(digits.train_x), -1)
  perms = []
  for e in s.experiences:
    ex = e.train_x.reshape(len(e.train_x), -1)
    # Recover the permutation column by column from distinct pixel columns.
    np.testing.assert_allclose(np.sort(ex, axis=1), np.sort(flat, axis=1))
    np.testing.assert_array_equal(e.train_y, digits.train_y)
    np.testing.assert_array_equal(e.test_y, digits.test_y)
    perms.append(ex)
  assert not np.array_equal(perms[0], perms[1])
  assert not np.array_equal(perms[1], perms[2])
  again = scenarios.permuted(digits, 3, seed=1)
  np.testing.assert_array_equal(again.experiences[2].test_x,
                                s.experiences[2].test_x)


def test_permuted_applies_same_permutation_to_train_and_test():
  x = np.arange(2 * 4, dtype=np.float32).reshape(2, 2, 2, 1)
  d = Dataset("toy", x, np.array([0, 1], np.int32), x.copy(),
              np.array([0, 1], np.int32), 2)
  s = scenarios.permuted(d, 2, seed=0)
  for e in s.experiences:
    np.testing.assert_array_equal(e.train_x, e.test_x)
    assert sorted(e.train_x[0].ravel().tolist()) == [0, 1, 2, 3]


def test_permuted_pad_and_first_identity():
  x = np.arange(1, 2 * 4 + 1, dtype=np.float32).reshape(2, 2, 2, 1)
  d = Dataset("toy", x, np.array([0, 1], np.int32), x.copy(),
              np.array([0, 1], np.int32), 2)
  s = scenarios.permuted(d, 3, seed=0, first_identity=True, pad=1)
  first = s.experiences[0].train_x
  assert first.shape == (2, 4, 4, 1)
  # Unpermuted: the image sits in the middle of a zero border.
  np.testing.assert_array_equal(first[:, 1:3, 1:3], x)
  assert first.sum() == x.sum()
  for e in s.experiences[1:]:
    assert e.train_x.shape == (2, 4, 4, 1)
    # A permutation of the padded image: the same 4 values and 12 zeros,
    # and the blank inputs move with it.
    for i in range(2):
      np.testing.assert_array_equal(np.sort(e.train_x[i].ravel()),
                                    np.sort(first[i].ravel()))
    assert not np.array_equal(e.train_x, first)
  assert not np.array_equal(s.experiences[1].train_x, s.experiences[2].train_x)


def test_config_pads_permuted_images():
  from jaxcl import experiment
  c = experiment.default_config()
  c.scenario.type = "permuted"
  c.scenario.kind = "domain"
  c.scenario.n_experiences = 2
  c.scenario.pad = 2
  c.scenario.first_identity = True
  sc = experiment.build_scenario(c)
  x = sc.experiences[0].train_x
  assert x.shape[1:] == (12, 12, 1)  # the 8x8 digits, 2 blank pixels a side
  assert np.all(x[:, :2] == 0) and np.all(x[:, :, -2:] == 0)
  assert sc.experiences[1].train_x.shape == x.shape


@pytest.mark.parametrize("pad", [-1, 1.5])
def test_permuted_rejects_bad_pad(digits, pad):
  with pytest.raises(ValueError, match="pad must be"):
    scenarios.permuted(digits, 2, pad=pad)


def test_permuted_pad_needs_images():
  x = np.zeros((2, 5), np.float32)
  d = Dataset("flat", x, np.array([0, 1], np.int32), x.copy(),
              np.array([0, 1], np.int32), 2)
  with pytest.raises(ValueError, match="pad needs"):
    scenarios.permuted(d, 2, pad=1)


def test_rotated_zero_is_identity_and_90_moves_pixels():
  x = np.zeros((1, 5, 5, 1), np.float32)
  x[0, 0, 2, 0] = 1.0  # top middle
  d = Dataset("toy", x, np.array([0], np.int32), x, np.array([0], np.int32),
              1)
  with pytest.raises(scenarios.ScenarioError, match="3 angles but "
                     "n_experiences=5"):
    scenarios.rotated(d, 5, angles=[0.0, 90.0, 180.0])
  s = scenarios.rotated(d, angles=[0.0, 90.0, 180.0])
  np.testing.assert_allclose(s.experiences[0].train_x, x, atol=1e-6)
  r180 = s.experiences[2].train_x[0, ..., 0]
  assert r180[4, 2] == pytest.approx(1.0, abs=1e-5)  # bottom middle
  r90 = s.experiences[1].train_x[0, ..., 0]
  assert r90.sum() == pytest.approx(1.0, abs=1e-5)
  assert r90[2, 0] == pytest.approx(1.0, abs=1e-5) or r90[2, 4] == \
      pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("angle", [12.345, 30.0, 77.3, 145.2, 179.9])
def test_rotation_matches_pil_direction_and_nearest_pixels(angle):
  # PIL's Image.rotate is what torchvision's rotate (so Mammoth's
  # rot-mnist) calls: counter-clockwise, nearest neighbour by default.
  image = pytest.importorskip("PIL.Image")
  x = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
  ours = lambda how: scenarios._rotate(
      x[None, :, :, None].astype(np.float32), angle, how)[0, :, :, 0]
  pil = lambda res: np.asarray(image.fromarray(x).rotate(angle, resample=res),
                               np.float32)
  np.testing.assert_array_equal(ours("nearest"), pil(image.NEAREST))
  # Bilinear: PIL rounds to uint8 and treats the border its own way; inside
  # it agrees to rounding, which a clockwise turn would not.
  inner = np.s_[4:-4, 4:-4]
  assert np.abs(ours("bilinear") - pil(image.BILINEAR))[inner].max() < 1.0


def test_rotated_draws_a_seeded_angle_per_experience_below_max_angle():
  """Without ``angles``, experience i is rotated by the i-th of
  ``n_experiences`` angles drawn uniformly in [0, max_angle) from
  ``seed`` (the GEM paper's Rotated MNIST): each experience its own angle,
  each seed its own draw."""
  x = np.random.default_rng(2).integers(1, 5, (2, 9, 9, 1)).astype(
      np.float32)
  y = np.array([0, 1], np.int32)
  d = Dataset("toy", x, y, x[:1].copy(), y[:1].copy(), 2)
  for seed, max_angle in ((0, 180.0), (3, 60.0)):
    s = scenarios.rotated(d, 3, seed=seed, max_angle=max_angle)
    want = np.random.default_rng(seed).uniform(0, max_angle, 3)
    for e, a in zip(s.experiences, want):
      np.testing.assert_array_equal(e.train_x, scenarios._rotate(x, a))
      np.testing.assert_array_equal(e.test_x, scenarios._rotate(x[:1], a))


def test_rotated_interpolation_is_checked_and_configurable():
  x = np.random.default_rng(1).integers(1, 5, (3, 9, 9, 1)).astype(
      np.float32)
  y = np.array([0, 1, 0], np.int32)
  d = Dataset("toy", x, y, x, y, 2)
  with pytest.raises(ValueError, match="unknown interpolation 'cubic'.*"
                     "bilinear.*nearest"):
    scenarios.rotated(d, angles=[10.0], interpolation="cubic")
  near = scenarios.rotated(d, angles=[33.0], interpolation="nearest")
  lin = scenarios.rotated(d, angles=[33.0])
  # Nearest only moves pixels: every output value is an input value or 0.
  vals = set(np.unique(d.train_x).tolist()) | {0.0}
  assert set(np.unique(near.experiences[0].train_x).tolist()) <= vals
  assert not np.array_equal(near.experiences[0].train_x,
                            lin.experiences[0].train_x)


def test_online_and_from_arrays():
  rng = np.random.default_rng(0)
  train = [(rng.normal(size=(20, 3)), np.array([0, 1] * 10)),
           (rng.normal(size=(20, 3)), np.array([2, 3] * 10))]
  test = [(rng.normal(size=(6, 3)), np.array([0, 1] * 3)),
          (rng.normal(size=(6, 3)), np.array([2, 3] * 3))]
  s = scenarios.from_arrays(train, test, kind="task")
  assert s.num_classes == 4 and s.num_tasks == 2
  assert s.experiences[1].classes == (2, 3)
  # Task-IL: experience i is task i, on every train and test row.
  for i, e in enumerate(s.experiences):
    assert e.task_id == i
    np.testing.assert_array_equal(e.train_task, np.full(20, i))
    np.testing.assert_array_equal(e.test_task, np.full(6, i))
  np.testing.assert_array_equal(np.flatnonzero(s.task_classes[1]), [2, 3])
  o = scenarios.online(s)
  assert o.online and len(o) == 2
  with pytest.raises(ValueError, match="labels must lie"):
    scenarios.from_arrays(train, test, num_classes=3)


def test_joint_and_cumulative(digits):
  # A task split: the merged experiences mix task ids (a class split's
  # are all 0), and each row must keep its own.
  s = scenarios.split(digits, 5, kind="task")
  j = scenarios.joint(s)
  assert len(j.experiences) == 1 and len(j.eval_experiences) == 5
  assert j.experiences[0].num_train == len(digits.train_y)
  c = scenarios.cumulative(s)
  sizes = [e.num_train for e in c.experiences]
  assert sizes == list(np.cumsum([e.num_train for e in s.experiences]))
  assert c.experiences[2].classes == tuple(sorted(
      s.experiences[0].classes + s.experiences[1].classes +
      s.experiences[2].classes))
  tasks = lambda exps: np.concatenate([e.train_task for e in exps])
  np.testing.assert_array_equal(c.experiences[2].train_task,
                                tasks(s.experiences[:3]))
  np.testing.assert_array_equal(j.experiences[0].train_task,
                                tasks(s.experiences))
  assert set(np.unique(j.experiences[0].train_task)) == set(range(5))


def test_permuted_inputs_built_on_demand_in_any_order(digits):
  """Each experience's inputs are its own permutation of the data, however
  the experiences are visited (the kept arrays are keyed by experience and
  split), and the kept arrays are read-only."""
  s = scenarios.permuted(digits, 4, seed=5)
  rng = np.random.default_rng(5)
  d = int(np.prod(digits.train_x.shape[1:]))
  perms = [rng.permutation(d) for _ in range(4)]
  flat = lambda a: a.reshape(len(a), -1)
  for i in [3, 0, 2, 0, 1, 3, 1, 2]:
    e = s.experiences[i]
    np.testing.assert_array_equal(flat(e.train_x), flat(digits.train_x)[:,
                                                                         perms[i]])
    np.testing.assert_array_equal(flat(e.test_x), flat(digits.test_x)[:,
                                                                       perms[i]])
  with pytest.raises(ValueError, match="read-only"):
    s.experiences[0].train_x[0, 0, 0, 0] = 1.0
  with pytest.raises(ValueError, match="unknown split 'val'"):
    s.experiences[0].inputs("val")


def test_transformed_stream_builds_lazily_and_keeps_two_arrays():
  """Nothing is built when the stream is made; each (experience, split) is
  built once while it stays among the two most recently used, and arrays
  dropped from those are freed."""
  import gc
  import weakref
  x = np.arange(6 * 4, dtype=np.float32).reshape(6, 2, 2, 1)
  y = np.arange(6, dtype=np.int32) % 2
  d = Dataset("toy", x, y, x[:2].copy(), y[:2].copy(), 2)
  calls = []

  def shift(k):
    def f(a):
      calls.append(k)
      return a + k
    return f

  s = scenarios._same_classes_stream(d, "shifted", "domain",
                                     [shift(k) for k in range(3)])
  assert calls == [] and s.experiences[2].num_train == 6
  a0 = s.experiences[0].train_x
  assert s.experiences[0].train_x is a0 and calls == [0]
  np.testing.assert_array_equal(s.experiences[1].test_x, x[:2] + 1)
  assert calls == [0, 1]
  ref = weakref.ref(a0)
  del a0
  s.experiences[2].train_x  # evicts experience 0's training inputs
  gc.collect()
  assert ref() is None and calls == [0, 1, 2]
  np.testing.assert_array_equal(s.experiences[0].train_x, x)  # rebuilt
  assert calls == [0, 1, 2, 0]


def test_cumulative_of_a_transformed_stream_is_lazy_and_exact():
  x = np.arange(4 * 4, dtype=np.float32).reshape(4, 2, 2, 1)
  y = np.array([0, 1, 0, 1], np.int32)
  d = Dataset("toy", x, y, x[:2].copy(), y[:2].copy(), 2)
  s = scenarios.permuted(d, 3, seed=2)
  c = scenarios.cumulative(s)
  j = scenarios.joint(s)
  for i, e in enumerate(c.experiences):
    np.testing.assert_array_equal(e.train_x, np.concatenate(
        [s.experiences[k].train_x for k in range(i + 1)]))
    np.testing.assert_array_equal(e.test_x, s.experiences[i].test_x)
    np.testing.assert_array_equal(e.train_task, np.zeros(4 * (i + 1)))
  np.testing.assert_array_equal(j.experiences[0].train_x,
                                c.experiences[2].train_x)


def test_unknown_kind():
  with pytest.raises(ValueError, match="valid"):
    scenarios.from_arrays([(np.zeros((2, 1)), np.zeros(2, int))],
                          [(np.zeros((2, 1)), np.zeros(2, int))],
                          kind="bogus")


def _indexed(n_train=600, n_test=200, c=10, seed=0):
  """A data set whose inputs name their example: train_x[i] == i (test:
  -1 - i), labels drawn at random, so a stream's experiences can be traced
  back to the examples they hold."""
  rng = np.random.default_rng(seed)
  return Dataset("indexed",
                 np.arange(n_train, dtype=np.float32)[:, None],
                 rng.integers(0, c, n_train).astype(np.int32),
                 -1 - np.arange(n_test, dtype=np.float32)[:, None],
                 rng.integers(0, c, n_test).astype(np.int32), c)


def test_blurry_deals_a_fraction_of_the_blurry_classes_over_the_stream():
  """i-Blurry-50-20 over 5 experiences of 10 classes: the first 5 classes
  of the order are disjoint (one per experience), the other 5 blurry (one
  home each). Every training example is in exactly one experience;
  disjoint classes stay home; 20 % of each experience's blurry-class
  examples (rounded down) are pooled and dealt out evenly over all
  experiences; the test sets are the home classes."""
  data = _indexed()
  order = [3, 7, 0, 9, 1, 2, 4, 5, 6, 8]
  s = scenarios.blurry(data, 5, disjoint=0.5, blurred=0.2,
                       class_order=order, sample_seed=1)
  assert s.kind == "class" and s.num_tasks == 1 and s.num_classes == 10
  assert s.name == "blurry50-20_indexed"
  home = {k: i % 5 for i, k in enumerate(order)}
  y = data.train_y
  ids = [e.train_x[:, 0].astype(int) for e in s.experiences]
  assert sorted(np.concatenate(ids)) == list(range(600))
  moved = [int(np.sum(y == order[5 + i]) * 0.2) for i in range(5)]
  pool = sum(moved)
  sizes = []
  for i, (e, idx) in enumerate(zip(s.experiences, ids)):
    np.testing.assert_array_equal(e.train_y, y[idx])
    assert e.classes == tuple(np.unique(e.train_y))
    # The disjoint class is all here, and only here.
    assert np.sum(y[idx] == order[i]) == np.sum(y == order[i])
    # Of the home blurry class, all but the moved ones, plus what the deal
    # brought back; the rest of the experience is its share of the pool.
    home_kept = np.sum(y == order[5 + i]) - moved[i]
    share = len(idx) - np.sum(y == order[i]) - home_kept
    sizes.append(share)
    assert all(home[int(k)] == i or k in order[5:] for k in y[idx])
    want_test = [k for k in range(200) if home[int(data.test_y[k])] == i]
    np.testing.assert_array_equal(e.test_x[:, 0], -1 - np.array(want_test))
  # An even deal of the whole pool: shares differ by at most one.
  assert sum(sizes) == pool > 20 and max(sizes) - min(sizes) <= 1
  # Blurry classes really do leak: some experience holds another's.
  assert any(set(e.classes) - {order[i], order[5 + i]}
             for i, e in enumerate(s.experiences))
  # The same seeds, the same stream; another sample seed, other examples.
  again = scenarios.blurry(data, 5, disjoint=0.5, blurred=0.2,
                           class_order=order, sample_seed=1)
  for a, b in zip(s.experiences, again.experiences):
    np.testing.assert_array_equal(a.train_x, b.train_x)
  other = scenarios.blurry(data, 5, disjoint=0.5, blurred=0.2,
                           class_order=order, sample_seed=2)
  assert any(not np.array_equal(a.train_x, b.train_x)
             for a, b in zip(s.experiences, other.experiences))


def test_blurry_without_blur_is_split(digits):
  """N = 1 (nothing blurry) or M = 0 (nothing dealt): the stream of
  :func:`split` with the same class order."""
  order = [int(k) for k in np.random.default_rng(4).permutation(10)]
  want = scenarios.split(digits, 5, class_order=order)
  for kwargs in (dict(disjoint=1.0, blurred=0.3),
                 dict(disjoint=0.0, blurred=0.0)):
    got = scenarios.blurry(digits, 5, class_order=order, **kwargs)
    for a, b in zip(got.experiences, want.experiences):
      assert set(a.classes) == set(b.classes)
      for f in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_blurry_refuses_what_does_not_split_evenly(digits):
  with pytest.raises(scenarios.ScenarioError, match=re.escape(
      "blurry: disjoint=0.3 of digits's 10 classes over 5 experiences: the "
      "disjoint and the blurry classes must each split evenly over the "
      "experiences; valid: ['0', '0.5', '1']")):
    scenarios.blurry(digits, 5, disjoint=0.3)
  with pytest.raises(scenarios.ScenarioError, match=re.escape(
      "blurry: n_experiences=3 does not divide digits's 10 classes, so no "
      "split into disjoint and blurry classes spreads evenly; valid: "
      "[1, 2, 5, 10]")):
    scenarios.blurry(digits, 3)
  for name, bad in (("disjoint", 1.5), ("blurred", -0.1), ("blurred", True),
                    ("disjoint", float("nan"))):
    with pytest.raises(scenarios.ScenarioError, match=rf"blurry: {name} must "
                       rf"be a fraction in \[0, 1\], got {re.escape(repr(bad))}"):
      scenarios.blurry(digits, 5, **{name: bad})


def test_a_blurry_run_learns_the_leaked_classes_early():
  """Through ``jaxcl.run``: with half of every class dealt out over the
  stream, each experience holds a few examples of the later ones' classes,
  so the model scores on test sets before their experience (the matrix's
  upper triangle), where a split stream's model cannot (it never saw
  those classes)."""
  import jaxcl
  from test_train import quick_config
  blurred = jaxcl.run(quick_config(**{
      "scenario.type": "blurry", "scenario.disjoint": 0.0,
      "scenario.blurred": 0.5, "train.epochs": 3}))
  split = jaxcl.run(quick_config(**{"train.epochs": 3}))
  assert blurred.accuracy.shape == split.accuracy.shape == (5, 5)
  future = np.triu_indices(5, 1)
  assert split.accuracy[future].max() < 0.02
  assert blurred.accuracy[future].mean() > 0.15


def test_strategies_needing_one_experience_per_class_name_a_blurry_stream(
    digits):
  """BiC, LUCIR, IL2M, X-DER and the other strategies that learn each
  class in one experience refuse the class's return, saying which streams
  bring classes back."""
  from jaxcl.strategy import new_classes
  s = scenarios.blurry(digits, 5, disjoint=0.0, blurred=0.3)
  seen = np.zeros(10, bool)
  seen[list(s.experiences[0].classes)] = True
  with pytest.raises(ValueError, match=re.escape(
      "bic: experience 1 brings classes [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] "
      "again; bic needs each class in one experience (a split stream; "
      "blurry and domain-incremental streams bring classes back)")):
    new_classes("bic", seen, s.experiences[1])


# Six of the fourteen in the default suite (the others, 17 s of the suite's
# CPU in session 55, with -m slow).
@pytest.mark.parametrize("name", slow_beyond(__import__(
    "jaxcl.strategies", fromlist=["x"]).ONE_EXPERIENCE_PER_CLASS,
    ("bic", "wa", "dmc", "siw", "cscct", "ss_il")))
def test_one_experience_per_class_strategies_refuse_recurring_classes(name):
  """A config naming one of ``strategies.ONE_EXPERIENCE_PER_CLASS`` on a
  blurry stream is refused at setup, before anything trains; and the
  strategy's own hook refuses the same stream when its second experience
  starts (past the setup check: the record given to ``jaxcl.run`` under
  another name), so the list names only strategies that do refuse. The
  record under its own name is refused at setup too (since session 54)."""
  import jaxcl
  import resume_configs
  from jaxcl import experiment
  c = resume_configs.config(name)
  c.checkpoint.every_steps = 0
  c.scenario.type, c.scenario.n_experiences = "blurry", 2
  c.scenario.disjoint, c.scenario.blurred = 0.0, 0.3
  with pytest.raises(ValueError, match=re.escape(
      f"strategy '{name}' learns each class in one experience, but "
      "experience 1 of blurry0-30_digits brings classes [0, 1, 2, 3, 4, 5, "
      "6, 7, 8, 9] back (blurry and domain-incremental streams do); use a "
      "split stream")):
    experiment.setup(c)
  record, _ = experiment.build_strategy(c)
  stream = experiment.build_scenario(c)
  with pytest.raises(ValueError, match=f"strategy '{name}' learns each "
                     "class in one experience"):
    experiment.setup(c, stream, record)
  with pytest.raises(ValueError, match=rf"{name}: experience 1 brings "
                     r"classes \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] again"):
    jaxcl.run(c, strategy=record._replace(name=f"my_{name}"),
              scenario=stream)
