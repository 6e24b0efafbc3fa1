"""Noisy training labels: the draw, its seeds, the config switch, clean
test labels and the kept true labels."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxcl import checkpoint, datasets, experiment
from jaxcl.datasets import DataError, noisy_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _labels(per_class: int, num_classes: int = 10, seed: int = 0):
  """``per_class`` labels of each class, shuffled."""
  y = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  return np.random.default_rng(seed).permutation(y)


def _config(**dataset):
  c = experiment.default_config()
  c.report.progress = False
  for k, v in dataset.items():
    c.dataset[k] = v
  return c


# --------------------------------------------------------------------------
# The draw.


def test_symmetric_flips_the_rate_of_every_class():
  # Classes of different sizes: each loses exactly round(rate * n_c) labels
  # (Mammoth's count), so the overall fraction sits well inside a binomial
  # band around the rate.
  sizes = [50, 80, 101, 120, 65, 90, 77, 130, 59, 110]
  y = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(sizes)])
  rate = 0.3
  noisy = noisy_labels(y, 10, rate, "symmetric", seed=0)
  assert noisy.dtype == y.dtype and noisy.shape == y.shape
  flipped = noisy != y
  per_class = np.bincount(y[flipped], minlength=10)
  np.testing.assert_array_equal(per_class,
                                [int(round(n * rate)) for n in sizes])
  band = 3 * np.sqrt(rate * (1 - rate) / len(y))
  assert abs(flipped.mean() - rate) < band


def test_each_example_is_flipped_with_probability_rate():
  # Over many noise seeds each example's flip frequency is binomial around
  # rate: the flipped examples of a class are a uniform random subset (not,
  # say, its first ones).
  y = _labels(20)
  rate, draws = 0.3, 400
  freq = np.mean([noisy_labels(y, 10, rate, seed=s) != y
                  for s in range(draws)], axis=0)
  sd = np.sqrt(rate * (1 - rate) / draws)
  assert np.abs(freq - rate).max() < 5 * sd, np.abs(freq - rate).max()


def test_classes_draw_their_flips_independently():
  # Each class draws its own subset from one stream. The test above looks
  # at one example at a time, so a generator re-seeded for every class
  # passes it while giving every class of the same size the same flipped
  # positions. 6 of 20 by chance: 1 / C(20, 6) per pair of classes, so
  # among 10 classes a repeated pattern is rare (at most one allowed).
  y = _labels(20)
  for seed in range(5):
    noisy = noisy_labels(y, 10, 0.3, seed=seed)
    patterns = {tuple(np.flatnonzero(noisy[y == c] != c)) for c in range(10)}
    assert len(patterns) >= 9, (seed, len(patterns))


def test_symmetric_never_keeps_the_label_and_spreads_over_the_others():
  y = _labels(1800)
  rate = 0.5
  noisy = noisy_labels(y, 10, rate, seed=3)
  flipped = noisy != y
  # "Other" class: every chosen label changed, so the count is exact.
  assert flipped.sum() == 10 * 900
  counts = np.zeros((10, 10), int)
  np.add.at(counts, (y[flipped], noisy[flipped]), 1)
  assert np.diag(counts).sum() == 0
  # 900 flips of each class over its 9 other classes: 100 expected each,
  # binomial sd sqrt(900 * 1/9 * 8/9) = 9.4.
  off = counts[~np.eye(10, dtype=bool)]
  assert np.abs(off - 100).max() < 5 * 9.43, counts


@pytest.mark.parametrize("name,flips", [
    ("mnist", {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}),
    ("digits", {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}),
    ("cifar10", {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}),
])
def test_asymmetric_flips_only_the_mapped_classes_to_their_targets(name,
                                                                   flips):
  y = _labels(101)
  rate = 0.4
  noisy = noisy_labels(y, 10, rate, "asymmetric", seed=0, dataset=name)
  flipped = noisy != y
  pairs = set(zip(y[flipped].tolist(), noisy[flipped].tolist()))
  assert pairs == set(flips.items())
  # Each source loses round(101 * 0.4) = 40 labels, counted on the true
  # labels (a 5 made a 6 is not turned back); the others keep all theirs.
  expected = [40 if c in flips else 0 for c in range(10)]
  np.testing.assert_array_equal(np.bincount(y[flipped], minlength=10),
                                expected)


# --------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.3", True,
                                  False, None])
def test_rate_outside_the_unit_interval_is_refused(rate):
  with pytest.raises(DataError, match=r"rate must be a number in \[0, 1\).*"
                     + f"got {rate!r}"):
    noisy_labels(_labels(5), 10, rate)


def test_unknown_kind_seed_and_labels_are_refused():
  y = _labels(5)
  with pytest.raises(DataError, match=r"unknown label noise type 'pair'; "
                     r"valid: \['symmetric', 'asymmetric'\]"):
    noisy_labels(y, 10, 0.2, "pair")
  with pytest.raises(DataError, match="seed must be an int >= 0, got -1"):
    noisy_labels(y, 10, 0.2, seed=-1)
  with pytest.raises(DataError, match=r"labels must lie in \[0, 5\)"):
    noisy_labels(y, 5, 0.2)
  with pytest.raises(DataError, match="at least 2 classes"):
    noisy_labels(np.zeros(4, np.int32), 1, 0.2)


@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_asymmetric_without_a_map_names_the_data_sets_with_one(rate):
  with pytest.raises(DataError, match=r"no class map for dataset "
                     r"'fashion_mnist'; maps exist for \['cifar10', "
                     r"'digits', 'mnist'\]"):
    noisy_labels(_labels(5), 10, rate, "asymmetric", dataset="fashion_mnist")
  c = _config(name="digits", label_noise=rate,
              label_noise_type="asymmetric")
  experiment.load_data(c)  # digits has one
  d = datasets.load("digits")
  d = datasets.Dataset("fashion_mnist", d.train_x, d.train_y, d.test_x,
                       d.test_y, 10)
  with pytest.raises(DataError, match="'fashion_mnist'"):
    d.with_label_noise(rate, "asymmetric")


def test_config_values_are_checked_even_at_rate_zero():
  with pytest.raises(DataError, match="unknown label noise type 'symetric'"):
    experiment.load_data(_config(label_noise_type="symetric"))
  with pytest.raises(DataError, match=r"\[0, 1\).*got 1.0"):
    experiment.load_data(_config(label_noise=1.0))


# --------------------------------------------------------------------------
# The data set: clean test labels, true labels kept, seeds.


def test_rate_zero_leaves_every_array_byte_identical():
  clean = datasets.load("digits")
  assert clean.with_label_noise(0.0) is clean
  old = experiment.default_config()
  for f in ("label_noise", "label_noise_type", "label_noise_seed"):
    del old.dataset[f]  # a config written before the fields existed
  for c in (old, _config(), _config(label_noise_seed=7)):
    d = experiment.load_data(c)
    assert d.train_y_true is None
    for f in ("train_x", "train_y", "test_x", "test_y"):
      a, b = getattr(d, f), getattr(clean, f)
      assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f
    s, s0 = experiment.build_scenario(c, d), experiment.build_scenario(old)
    for e, e0 in zip(s.experiences, s0.experiences):
      assert e.train_y.tobytes() == e0.train_y.tobytes()
      assert e.train_x.tobytes() == e0.train_x.tobytes()


def test_noise_reaches_training_labels_only_and_keeps_the_true_ones():
  clean = experiment.load_data(_config())
  d = experiment.load_data(_config(label_noise=0.4))
  np.testing.assert_array_equal(d.test_y, clean.test_y)
  np.testing.assert_array_equal(d.test_x, clean.test_x)
  np.testing.assert_array_equal(d.train_x, clean.train_x)
  np.testing.assert_array_equal(d.train_y_true, clean.train_y)
  assert d.train_y.dtype == np.int32
  assert 0.38 < (d.train_y != d.train_y_true).mean() < 0.42


def test_validation_labels_stay_clean():
  # Split first, then corrupt what is left for training (Mammoth's order).
  clean = experiment.load_data(_config(validation=0.2))
  d = experiment.load_data(_config(validation=0.2, label_noise=0.4))
  np.testing.assert_array_equal(d.test_y, clean.test_y)
  np.testing.assert_array_equal(d.test_x, clean.test_x)
  np.testing.assert_array_equal(d.train_y_true, clean.train_y)
  assert (d.train_y != clean.train_y).mean() > 0.35
  with pytest.raises(DataError, match="hold out the validation split first"):
    d.validation(0.2)


def test_noise_seed_not_the_run_seed_chooses_the_noise():
  a = experiment.load_data(_config(label_noise=0.3))
  c = _config(label_noise=0.3)
  c.seed = 5  # another run of the sweep: the same noisy labels
  np.testing.assert_array_equal(experiment.load_data(c).train_y, a.train_y)
  b = experiment.load_data(_config(label_noise=0.3, label_noise_seed=1))
  np.testing.assert_array_equal(b.train_y_true, a.train_y_true)
  assert (b.train_y != a.train_y).mean() > 0.2
  y = _labels(30)
  np.testing.assert_array_equal(noisy_labels(y, 10, 0.3, seed=4),
                                noisy_labels(y, 10, 0.3, seed=4))


def test_subset_keeps_true_labels_aligned_and_noise_is_added_once():
  d = datasets.load("digits").with_label_noise(0.4, seed=2)
  s = d.subset(train=300, seed=1)
  # Each kept example's pixels find it in the full set: same labels there.
  full = {x.tobytes(): (n, t) for x, n, t in zip(d.train_x, d.train_y,
                                                  d.train_y_true)}
  pairs = [full[x.tobytes()] for x in s.train_x]
  np.testing.assert_array_equal(s.train_y, [p[0] for p in pairs])
  np.testing.assert_array_equal(s.train_y_true, [p[1] for p in pairs])
  with pytest.raises(DataError, match="noisy already"):
    d.with_label_noise(0.2)


def test_a_split_stream_places_examples_by_their_noisy_label():
  # Mammoth splits into tasks after adding the noise: every experience's
  # labels stay within its classes, and some of its images show others.
  c = _config(label_noise=0.4)
  d = experiment.load_data(c)
  s = experiment.build_scenario(c, d)
  for e in s.experiences:
    assert set(np.unique(e.train_y)) <= set(e.classes)
    true = d.train_y_true[np.isin(d.train_y, e.classes)]
    assert len(true) == e.num_train
    # 0.4 of each of the 8 other classes' labels, spread over 9 classes,
    # land on each of the two: a share of about 8 * 0.4 / 9 = 0.36.
    assert 0.25 < (~np.isin(true, e.classes)).mean() < 0.45


def test_old_records_stay_valid_and_noise_is_a_difference():
  c = experiment.default_config()
  old = {k: v for k, v in checkpoint.fingerprint(c).items()
         if not k.startswith("dataset.label_noise")}
  assert checkpoint.differences(old, checkpoint.fingerprint(c)) == []
  c.dataset.label_noise = 0.4
  diff = checkpoint.differences(old, checkpoint.fingerprint(c))
  assert len(diff) == 1 and "dataset.label_noise" in diff[0]


# --------------------------------------------------------------------------
# End to end.


def _joint_digits(rate):
  # Split Digits trained jointly for one epoch (~42 steps): a clean gap,
  # 0.70 against 0.27 at rate 0.4 (seed 0; 0.78 / 0.36 and 0.74 / 0.39 for
  # seeds 1 and 2).
  c = _config(label_noise=rate)
  c.strategy.name = "joint"
  c.train.epochs = 1
  return c


def test_noisy_labels_train_worse_than_clean_ones():
  clean = experiment.run(_joint_digits(0.0)).metrics["acc"]
  noisy = experiment.run(_joint_digits(0.4)).metrics["acc"]
  assert clean > 0.6 and noisy < clean - 0.2, (clean, noisy)


def test_command_line_switch(tmp_path):
  env = dict(os.environ)
  env.pop("JAXCL_DATA_DIR", None)
  base = [sys.executable, "-m", "jaxcl.cli", "run",
          "--config.strategy.name=joint", "--config.train.epochs=1",
          "--config.report.plots=False", "--config.report.tensorboard=False"]
  p = subprocess.run(base + ["--config.dataset.label_noise=0.4",
                             "--workdir", str(tmp_path / "r")],
                     cwd=tmp_path, capture_output=True, text=True, env=env,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  cfg = json.load(open(tmp_path / "r" / "config.json"))
  assert cfg["dataset"]["label_noise"] == 0.4
  assert ("(trained on noisy labels: 0.4 of each class's training labels, "
          "symmetric, noise seed 0; evaluated on clean labels)") in p.stdout
  acc = json.load(open(tmp_path / "r" / "accuracy_matrix.json"))["accuracy"]
  noisy = float(np.mean(acc[-1]))
  assert noisy < 0.5  # clean labels: 0.70
  assert noisy == pytest.approx(
      experiment.run(_joint_digits(0.4)).metrics["acc"], abs=1e-6)
  p = subprocess.run(base + ["--config.dataset.label_noise_type=pair",
                             "--workdir", str(tmp_path / "bad")],
                     cwd=tmp_path, capture_output=True, text=True, env=env,
                     timeout=300)
  assert p.returncode == 1
  assert "unknown label noise type 'pair'" in p.stderr
  assert "Traceback" not in p.stderr


def test_memory_purity_reads_a_sweep_memory_against_the_true_labels(
    tmp_path, capsys):
  """experiments.memory_purity on a finished noisy Replay sweep: its
  reservoir keeps about the stream's 40 % of wrong labels."""
  from experiments import memory_purity
  spec = os.path.join(os.path.dirname(__file__), "..", "experiments",
                      "split_digits_noisy.py") + ":strategy=replay,mem=60"
  memory_purity.main([spec, str(tmp_path / "r"), "0"])
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("seed 0: acc ") and "stored 60, distinct 60" in line
  wrong = float(line.split("wrong labels ")[1].split(",")[0])
  assert 0.25 < wrong < 0.55, line
  labels = json.loads(line.split("per label ")[1])
  assert sum(labels) == 60 and len(labels) == 10
