"""Data sources: raw IDX files, digits, and their errors."""

import gzip
import os
import shutil
import struct

import numpy as np
import pytest

from jaxcl import datasets
from test_tfds import _write_idx


def test_mnist_from_idx(mnist):
  assert mnist.train_x.shape == (60000, 28, 28, 1)
  assert mnist.test_x.shape == (10000, 28, 28, 1)
  assert mnist.train_x.dtype == mnist.test_x.dtype == np.float32
  assert mnist.train_y.dtype == mnist.test_y.dtype == np.int32
  assert 0.0 <= mnist.train_x.min() and mnist.train_x.max() == 1.0
  assert 0.0 <= mnist.test_x.min() and mnist.test_x.max() == 1.0
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


def test_digits_are_sixteen_levels_and_a_quarter_held_out_per_class():
  # Pixels are scikit-learn's 0..16 counts divided by 16, in the images'
  # own orientation; the test set is round(n_c / 4) of each class c (450
  # of the 1797 digits: what every recorded digits result was tested on).
  from sklearn.datasets import load_digits
  ref = load_digits()
  d = datasets.load("digits")
  assert d.train_x.dtype == d.test_x.dtype == np.float32
  assert d.train_y.dtype == d.test_y.dtype == np.int32
  both = np.concatenate([d.train_x, d.test_x])[..., 0] * 16
  np.testing.assert_array_equal(both, np.round(both))
  assert both.min() == 0 and both.max() == 16
  # The same 1797 images (as a multiset: a transposed or shifted image
  # is not among scikit-learn's), with their own labels.
  key = lambda imgs, ys: sorted((y, im.astype(np.uint8).tobytes())
                                for im, y in zip(imgs, ys))
  assert key(both, np.concatenate([d.train_y, d.test_y])) == key(
      ref.images, ref.target)
  held = [int(round(n / 4)) for n in np.bincount(ref.target)]
  np.testing.assert_array_equal(np.bincount(d.test_y), held)
  assert sum(held) == len(d.test_y) == 450


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


def test_missing_data_dir(tmp_path):
  with pytest.raises(datasets.DataError, match="does not exist"):
    datasets.load("mnist", data_dir="/nonexistent/dir")
  # A file is no data directory either.
  (tmp_path / "f").write_bytes(b"")
  with pytest.raises(datasets.DataError, match=(
      f"data directory '{tmp_path}/f' does not exist; pass an existing "
      "directory holding mnist's IDX .gz files")):
    datasets.load("mnist", data_dir=str(tmp_path / "f"))


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
  arr = (np.arange(24, dtype=np.uint8) * 11).reshape(2, 3, 4)  # up to 253
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


def test_normalize_per_channel_standardises_each_channel():
  # torchvision's Normalize with one (mean, std) per channel, the inputs'
  # last axis (FACIL's CIFAR-100 statistics); a single value still counts
  # for every channel; a count that is neither is refused by name.
  from jaxcl.datasets import DataError, Dataset
  rng = np.random.default_rng(0)
  d = Dataset("rgb", rng.uniform(size=(6, 4, 4, 3)).astype(np.float32),
              np.arange(6) % 2, rng.uniform(size=(4, 4, 4, 3)).astype(
                  np.float32), np.arange(4) % 2, 2)
  mean, std = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)
  n = d.normalized(mean, std)
  for c in range(3):
    np.testing.assert_allclose(n.train_x[..., c],
                               (d.train_x[..., c] - mean[c]) / std[c],
                               rtol=1e-5)
    np.testing.assert_allclose(n.test_x[..., c],
                               (d.test_x[..., c] - mean[c]) / std[c],
                               rtol=1e-5)
  assert n.train_x.dtype == np.float32
  np.testing.assert_allclose(d.normalized((0.5,), 0.25).train_x,
                             (d.train_x - 0.5) / 0.25, rtol=1e-6)
  with pytest.raises(DataError, match=r"mean=\(0.1, 0.2\) has 2 values; "
                     r"give one for every pixel, or one per channel \(3"):
    d.normalized((0.1, 0.2), std)
  with pytest.raises(DataError, match=r"std > 0"):
    d.normalized(mean, (0.2, 0.0, 0.2))
  with pytest.raises(DataError, match=r"std > 0"):
    d.normalized(mean, ())


def _idx_bytes(magic: bytes, dims, payload: bytes) -> bytes:
  return magic + struct.pack(">" + "I" * len(dims), *dims) + payload


@pytest.mark.parametrize("raw,match", [
    (b"", "not an IDX file"),
    (b"\x00\x00", "not an IDX file"),
    # type byte 0x0D: IDX floats, not unsigned bytes
    (_idx_bytes(b"\x00\x00\x0d\x01", [2], bytes(8)), "not an IDX file"),
    (_idx_bytes(b"\x01\x00\x08\x01", [2], bytes(2)), "not an IDX file"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated header"),
    # one byte more, or one less, than the header's 2 x 3
    (_idx_bytes(b"\x00\x00\x08\x02", [2, 3], bytes(7)),
     r"header says shape \(2, 3\) \(6 bytes\) but the file holds 7"),
    (_idx_bytes(b"\x00\x00\x08\x02", [2, 3], bytes(5)),
     r"header says shape \(2, 3\) \(6 bytes\) but the file holds 5"),
])
def test_read_idx_refuses_what_is_not_an_idx_file(tmp_path, raw, match):
  p = tmp_path / "bad-idx-ubyte"
  p.write_bytes(raw)
  with pytest.raises(datasets.DataError,
                     match=f"corrupt data file '{p}': .*{match}"):
    datasets.read_idx(str(p))


def test_read_idx_names_a_missing_or_cut_off_gzip_file(tmp_path):
  with pytest.raises(datasets.DataError, match="missing data file '.*nope"):
    datasets.read_idx(str(tmp_path / "nope-idx1-ubyte.gz"))
  # A gzip stream cut short (a partial download): EOFError inside gzip.
  p = tmp_path / "cut-idx1-ubyte.gz"
  _write_idx(str(p), np.arange(5000, dtype=np.uint8) % 251)
  p.write_bytes(p.read_bytes()[:-30])
  with pytest.raises(datasets.DataError, match=f"corrupt data file '{p}'"):
    datasets.read_idx(str(p))


def _link_idx(src: str, dst) -> None:
  """Symlinks the four IDX files of directory ``src`` into ``dst``."""
  os.makedirs(dst, exist_ok=True)
  for f in datasets._IDX_FILES.values():
    os.symlink(os.path.join(src, f), os.path.join(dst, f))


def _first_labels(d: str) -> tuple[int, int]:
  """The first training and test label, read straight off the bytes."""
  return tuple(gzip.open(os.path.join(d, f)).read(9)[8] for f in (
      "train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))


def test_data_dir_is_the_folder_itself_or_its_named_sub_folder(
    tmp_path, data_dir, monkeypatch):
  # MNIST's files in the folder itself and Fashion-MNIST's in its
  # fashion_mnist/ sub-folder: each name gets its own files (the named
  # sub-folder first), whether the folder is passed or $JAXCL_DATA_DIR.
  mnist_dir = os.path.join(data_dir, "mnist")
  fashion_dir = os.path.join(data_dir, "fashion_mnist")
  assert _first_labels(mnist_dir) != _first_labels(fashion_dir)
  _link_idx(mnist_dir, tmp_path)
  _link_idx(fashion_dir, tmp_path / "fashion_mnist")
  monkeypatch.setenv("JAXCL_DATA_DIR", "/nonexistent/jaxcl/data")
  for name, src in (("mnist", mnist_dir), ("fashion_mnist", fashion_dir)):
    d = datasets.load(name, data_dir=str(tmp_path))  # the argument wins
    assert (d.name, d.num_classes) == (name, 10)
    assert (d.train_y[0], d.test_y[0]) == _first_labels(src), name
    assert datasets.missing(name, str(tmp_path)) is None
  monkeypatch.setenv("JAXCL_DATA_DIR", str(tmp_path))
  d = datasets.load("fashion_mnist")
  assert (d.train_y[0], d.test_y[0]) == _first_labels(fashion_dir)
  assert datasets.missing("fashion_mnist") is None
  # $JAXCL_DATA_DIR with no files: named by missing(), refused by load();
  # both name the sub-folder that was expected.
  (tmp_path / "empty").mkdir()
  monkeypatch.setenv("JAXCL_DATA_DIR", str(tmp_path / "empty"))
  assert datasets.missing("mnist") == (
      "mnist: missing " + ", ".join(datasets._IDX_FILES.values()) +
      f" in '{tmp_path}/empty/mnist'")
  with pytest.raises(datasets.DataError, match=(
      f"mnist: missing train-images-idx3-ubyte.gz.* in "
      f"'{tmp_path}/empty/mnist'")):
    datasets.load("mnist")


def _small_idx_dir(path, rows=(12, 6), labels=None, image_rows=None):
  """Four IDX files of ``rows`` (train, test) 28x28 examples."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  for split, n in zip(("train", "test"), rows):
    y = rng.integers(0, 10, n).astype(np.uint8) if labels is None else \
        np.asarray(labels[split], np.uint8)
    m = n if image_rows is None else image_rows[split]
    x = rng.integers(0, 256, (m, 28, 28)).astype(np.uint8)
    _write_idx(os.path.join(path, datasets._IDX_FILES[f"{split}_x"]), x)
    _write_idx(os.path.join(path, datasets._IDX_FILES[f"{split}_y"]), y)
  return str(path)


def test_idx_files_of_the_wrong_size_or_labels_are_refused(tmp_path,
                                                           monkeypatch):
  # Files that parse but are not MNIST's: 12 / 6 examples instead of
  # 60000 / 10000, images and labels of different lengths, a label 10.
  d = _small_idx_dir(tmp_path / "a")
  with pytest.raises(datasets.DataError, match=(
      r"mnist: train files in .* hold images \(12, 28, 28\) and labels "
      r"\(12,\); expected 60000x28x28 and 60000 labels")):
    datasets.load("mnist", d)
  monkeypatch.setattr(datasets, "_IDX_COUNTS", {"train": 12, "test": 6})
  loaded = datasets.load("mnist", d)  # the sizes it is told to expect
  raw_x = datasets.read_idx(os.path.join(d, datasets._IDX_FILES["test_x"]))
  np.testing.assert_array_equal(loaded.test_x[..., 0],
                                raw_x.astype(np.float32) / 255.0)
  d = _small_idx_dir(tmp_path / "b", image_rows={"train": 12, "test": 5})
  with pytest.raises(datasets.DataError, match=(
      r"test files in .* hold images \(5, 28, 28\) and labels \(6,\)")):
    datasets.load("mnist", d)
  d = _small_idx_dir(tmp_path / "c", labels={"train": [10] + [0] * 11,
                                             "test": [1] * 6})
  with pytest.raises(datasets.DataError,
                     match="mnist: train labels in .* exceed 9"):
    datasets.load("mnist", d)


# ---------------------------------------------------------------------------
# Augmentations (jaxcl.augment; SCR's own checks are in test_scr.py).


def test_default_augmentations_and_op_names():
  from jaxcl import augment
  # A mirrored 2, 3, 4, 5, 7 or 9 is not that digit: crop only for
  # single-channel images; all four for RGB; none for flat inputs.
  assert augment.default_ops((8, 8, 1)) == ("crop",)
  assert augment.default_ops((28, 28, 1)) == ("crop",)
  assert augment.default_ops((32, 32, 3)) == augment.SCR_OPS
  assert augment.default_ops((784,)) == ()
  with pytest.raises(ValueError, match=r"scr: an augmentation is named "
                     r"twice in \('crop', 'flip', 'crop'\)"):
    augment.check_ops(["crop", "flip", "crop"], who="scr")


def test_augmentation_pipeline_gives_each_step_its_own_key():
  import jax
  from jaxcl import augment
  x = jax.numpy.asarray(np.random.default_rng(0).uniform(size=(16, 8, 8, 1)),
                        np.float32)
  key = jax.random.PRNGKey(3)
  k_crop, k_flip = jax.random.split(key, 2)
  expected = augment.horizontal_flip(
      k_flip, augment.random_resized_crop(k_crop, x), 0.5)
  np.testing.assert_array_equal(
      augment.pipeline(("crop", "flip"), (8, 8, 1))(key, x), expected)


def test_resized_crop_box_position_is_uniform_and_independent():
  # Channel 0 holds each pixel's row, channel 1 its column; a quarter of
  # the area at ratio 1 is a 4x4 box of the 8x8 image at (top, left),
  # each ~ U[0, 4]. Output pixel (1, 1) reads the source at (top + 0.25,
  # left + 0.25) (pixel centres), where the ramps are exact.
  import jax
  from jaxcl import augment
  n = 400
  rows = np.broadcast_to(np.arange(8.0)[:, None], (8, 8))
  x = np.broadcast_to(np.stack([rows, rows.T], -1), (n, 8, 8, 2))
  out = np.asarray(augment.random_resized_crop(
      jax.random.PRNGKey(0), jax.numpy.asarray(x, np.float32), (0.25, 0.25),
      (1.0, 1.0)))
  top, left = out[:, 1, 1, 0] - 0.25, out[:, 1, 1, 1] - 0.25
  for v in (top, left):
    assert v.min() >= -1e-5 and v.max() <= 4 + 1e-5
    assert abs(v.mean() - 2.0) < 0.25 and abs(v.std() - 4 / 12 ** 0.5) < 0.2
  assert abs(np.corrcoef(top, left)[0, 1]) < 0.2
