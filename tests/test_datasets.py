"""Data sources: raw IDX files, digits, and their errors."""

import gzip
import os
import shutil
import struct

import numpy as np
import pytest

from jaxcl import datasets


def test_mnist_from_idx(mnist):
  assert mnist.train_x.shape == (60000, 28, 28, 1)
  assert mnist.test_x.shape == (10000, 28, 28, 1)
  assert mnist.train_x.dtype == np.float32
  assert 0.0 <= mnist.train_x.min() and mnist.train_x.max() == 1.0
  assert set(np.unique(mnist.train_y)) == set(range(10))
  # The first MNIST training label is a 5 (LeCun's file), first test a 7.
  assert mnist.train_y[0] == 5 and mnist.test_y[0] == 7


def test_unit_float_is_the_float32_division_for_every_pixel_value():
  # In-place division must give the bits of ``x.astype(float32) / 255.0``
  # (what every recorded result was trained on), for all 256 values.
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
  scaled = datasets._unit_float(pixels)
  assert scaled.shape == (1, 16, 16, 1) and scaled.dtype == np.float32
  np.testing.assert_array_equal(
      scaled[..., 0], pixels.astype(np.float32) / 255.0)
  assert scaled[0, 15, 15, 0] == 1.0


def test_fashion_mnist_from_idx(data_dir):
  f = datasets.load("fashion_mnist", data_dir=data_dir)
  assert f.train_x.shape == (60000, 28, 28, 1) and f.num_classes == 10
  assert np.bincount(f.train_y).tolist() == [6000] * 10


def test_digits_offline():
  d = datasets.load("digits")
  assert d.train_x.shape[1:] == (8, 8, 1)
  assert len(d.train_y) + len(d.test_y) == 1797
  assert d.train_x.max() <= 1.0
  # Stratified: every class in the test set.
  assert set(np.unique(d.test_y)) == set(range(10))


def test_digits_file_equals_sklearn_loader(monkeypatch):
  # The digits are read from scikit-learn's CSV without importing it; they
  # must be exactly what its public loader gives, and a scikit-learn with
  # another file layout falls back to that loader.
  import sklearn
  from sklearn.datasets import load_digits

  # The fast path is taken with the scikit-learn installed here (if its
  # layout changes, the loader falls back and this says the 1.4 s is back).
  assert os.path.exists(os.path.join(os.path.dirname(sklearn.__file__),
                                     *datasets._DIGITS_FILE))
  ref = load_digits()
  images, labels = datasets._digits_arrays()
  np.testing.assert_array_equal(images, ref.images)
  np.testing.assert_array_equal(labels, ref.target)
  monkeypatch.setattr(datasets, "_DIGITS_FILE", ("no", "such.csv.gz"))
  images2, labels2 = datasets._digits_arrays()
  np.testing.assert_array_equal(images2, ref.images)
  np.testing.assert_array_equal(labels2, ref.target)


def test_unknown_dataset_lists_valid():
  with pytest.raises(datasets.DataError, match="valid: .*digits.*mnist"):
    datasets.load("imagenet_tiny")


def test_missing_data_dir():
  with pytest.raises(datasets.DataError, match="does not exist"):
    datasets.load("mnist", data_dir="/nonexistent/dir")


def test_missing_file_named(tmp_path, data_dir):
  d = tmp_path / "mnist"
  d.mkdir()
  for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz"):
    os.symlink(os.path.join(data_dir, "mnist", f), d / f)
  with pytest.raises(datasets.DataError,
                     match="t10k-labels-idx1-ubyte.gz.*yann.lecun"):
    datasets.load("mnist", data_dir=str(tmp_path))


def test_corrupt_files_named(tmp_path, data_dir):
  d = tmp_path / "mnist"
  shutil.copytree(os.path.join(data_dir, "mnist"), d)
  bad = d / "t10k-labels-idx1-ubyte.gz"
  os.chmod(d, 0o755)
  os.chmod(bad, 0o644)
  raw = gzip.open(bad).read()
  with gzip.open(bad, "wb") as f:  # truncated payload, valid gzip
    f.write(raw[:-10])
  with pytest.raises(datasets.DataError,
                     match="corrupt data file .*t10k-labels.*header says"):
    datasets.load("mnist", data_dir=str(tmp_path))
  bad.write_bytes(b"not a gzip file at all")
  with pytest.raises(datasets.DataError, match="corrupt data file"):
    datasets.load("mnist", data_dir=str(tmp_path))


def test_read_idx_roundtrip(tmp_path):
  arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  p = tmp_path / "x-idx3-ubyte"
  p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 3, 4) +
                arr.tobytes())
  np.testing.assert_array_equal(datasets.read_idx(str(p)), arr)


def test_subset_sizes(digits):
  # 0 (the config default) and sizes past the data mean all of it.
  full = digits.subset(0, 0)
  assert len(full.train_y) == len(digits.train_y)
  assert len(digits.subset(10 ** 6).train_y) == len(digits.train_y)
  assert len(digits.subset(100, 50).test_y) == 50


def test_subset_is_seeded(digits):
  a = digits.subset(100, 50, seed=1)
  b = digits.subset(100, 50, seed=1)
  assert len(a.train_y) == 100 and len(a.test_y) == 50
  np.testing.assert_array_equal(a.train_x, b.train_x)


def test_missing_names_absent_files_without_loading(tmp_path, data_dir):
  assert datasets.missing("digits") is None
  assert datasets.missing("mnist", data_dir) is None
  (tmp_path / "mnist").mkdir()
  (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"")
  why = datasets.missing("mnist", str(tmp_path))
  listed = why.split("missing ")[1].split(" in ")[0].split(", ")
  assert sorted(listed) == ["t10k-images-idx3-ubyte.gz",
                            "t10k-labels-idx1-ubyte.gz",
                            "train-images-idx3-ubyte.gz"]
  assert "cifar10" in datasets.missing("cifar10", str(tmp_path))
  assert "valid" in datasets.missing("svhn")


def _numbered(labels) -> datasets.Dataset:
  """A data set whose training examples carry their own index as pixel."""
  y = np.asarray(labels, np.int32)
  x = np.arange(len(y), dtype=np.float32)[:, None, None, None]
  return datasets.Dataset("numbered", x, y, -np.ones((3, 1, 1, 1),
                                                     np.float32),
                          np.zeros(3, np.int32), int(y.max()) + 1)


def test_validation_split_is_stratified_disjoint_and_seeded():
  # Classes of 10, 20 and 35 examples: round(n * 0.3) = 3, 6 and 10 held out
  # (35 * 0.3 = 10.5 rounds to even).
  d = _numbered([0] * 10 + [1] * 20 + [2] * 35)
  v = d.validation(0.3)
  held, kept = v.test_x.ravel().astype(int), v.train_x.ravel().astype(int)
  np.testing.assert_array_equal(np.bincount(v.test_y), [3, 6, 10])
  np.testing.assert_array_equal(np.bincount(v.train_y), [7, 14, 25])
  # Every example is either held out or kept, with its own label.
  np.testing.assert_array_equal(np.sort(np.concatenate([held, kept])),
                                np.arange(65))
  np.testing.assert_array_equal(v.test_y, d.train_y[held])
  np.testing.assert_array_equal(v.train_y, d.train_y[kept])
  assert (v.test_x >= 0).all()  # the test set (pixels -1) is not used
  np.testing.assert_array_equal(d.validation(0.3).test_x, v.test_x)
  assert not np.array_equal(d.validation(0.3, seed=1).test_x, v.test_x)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, float("nan"), "0.2",
                                      True])
def test_validation_fraction_outside_the_unit_interval_refused(fraction):
  with pytest.raises(datasets.DataError,
                     match=r"validation must be a fraction in \(0, 1\)"):
    _numbered([0, 0, 1, 1]).validation(fraction)


def test_validation_that_empties_a_class_names_it():
  d = _numbered([0] * 40 + [1] * 2)
  with pytest.raises(datasets.DataError, match="holds out 0 of class 1's 2 "
                     r"training examples.*\(classes \[1\]\)"):
    d.validation(0.1)
  with pytest.raises(datasets.DataError, match="holds out 2 of class 1's 2"):
    d.validation(0.9)


def test_normalize_standardises_and_refuses_bad_pairs():
  from jaxcl import experiment
  from jaxcl.datasets import DataError
  c = experiment.default_config()
  raw = experiment.load_data(c)
  c.dataset.normalize = (0.25, 0.5)
  d = experiment.load_data(c)
  np.testing.assert_allclose(d.train_x, (raw.train_x - 0.25) / 0.5, rtol=1e-6)
  np.testing.assert_allclose(d.test_x, (raw.test_x - 0.25) / 0.5, rtol=1e-6)
  for bad in ((0.1, 0.0), (0.1, -1.0), (float("nan"), 1.0)):
    with pytest.raises(DataError, match=r"normalize must be \(mean, std\)"):
      raw.normalized(*bad)
  c.dataset.normalize = (0.1,)
  with pytest.raises(ValueError, match=r"dataset.normalize must be \(\) or"):
    experiment.load_data(c)
