"""The tensorflow_datasets path, exercised offline on the local IDX files:
prepare tfds MNIST from the raw files (their first rows; no TensorFlow, no
network), then load it through tfds.data_source exactly as a user with a
prepared data_dir."""

import gzip
import json
import os
import struct

import numpy as np
import pytest

from jaxcl import datasets, tfds_local


# The first rows of each split (all ten classes among them): preparing and
# reading back all 70000 records took 36 s, and the path under test does
# the same per record whatever their number.
_ROWS = {"train": 1200, "test": 300}


def _write_idx(path: str, array: np.ndarray) -> None:
  """``array`` (uint8) as a gzipped IDX file: magic 0x0000080N, then the
  dimensions as big-endian uint32, then the bytes."""
  header = bytes([0, 0, 8, array.ndim]) + struct.pack(
      ">" + "I" * array.ndim, *array.shape)
  with gzip.open(path, "wb", compresslevel=1) as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_subset(tmp_path_factory, data_dir):
  """The first ``_ROWS`` rows of the local MNIST IDX files, as IDX files."""
  out = tmp_path_factory.mktemp("idx")
  src = os.path.join(data_dir, "mnist")
  for key, name in datasets._IDX_FILES.items():
    rows = _ROWS[key.split("_")[0]]
    _write_idx(str(out / name),
               datasets.read_idx(os.path.join(src, name))[:rows])
  return str(out)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, idx_subset):
  out = str(tmp_path_factory.mktemp("tfds"))
  where = tfds_local.prepare("mnist", idx_subset, out)
  # prepare() returns the prepared data set's own directory.
  assert os.path.dirname(where) == os.path.join(out, "mnist")
  assert os.path.isfile(os.path.join(where, "dataset_info.json"))
  return out


def test_tfds_mnist_matches_idx(prepared, idx_subset, monkeypatch):
  # jaxcl's IDX loader, told to expect the subset's row counts.
  monkeypatch.setattr(datasets, "_IDX_COUNTS", dict(_ROWS))
  mnist = datasets.load("mnist", idx_subset)
  assert np.bincount(mnist.train_y).min() > 0  # every class is in it
  monkeypatch.delenv("JAXCL_DATA_DIR", raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", prepared)
  d = datasets.load("mnist")  # no data_dir: the tfds path
  assert d.train_x.shape == mnist.train_x.shape == (_ROWS["train"], 28, 28, 1)
  assert d.test_x.shape == mnist.test_x.shape == (_ROWS["test"], 28, 28, 1)
  assert d.num_classes == 10
  # tfds stores records shuffled: compare order-free statistics per class.
  for split in ("train", "test"):
    x, y = getattr(d, f"{split}_x"), getattr(d, f"{split}_y")
    rx, ry = getattr(mnist, f"{split}_x"), getattr(mnist, f"{split}_y")
    np.testing.assert_array_equal(np.bincount(y), np.bincount(ry))
    for c in range(10):
      np.testing.assert_allclose(x[y == c].sum(), rx[ry == c].sum(),
                                 rtol=1e-6)
    # The same images, each with its own label (a multiset: tfds shuffles;
    # sums would not see a transposed or mirrored image).
    key = lambda xs, ys: sorted(
        (int(l), (im * 255).round().astype(np.uint8).tobytes())
        for im, l in zip(xs, ys))
    assert key(x, y) == key(rx, ry), split


def test_unprepared_tfds_dir_is_an_error(tmp_path, monkeypatch):
  # Not tfds's own message, which blamed the absent data's file format and
  # suggested deleting it.
  # The IDX files are a way only for the MNIST-style sets.
  for name, hint in (("mnist", "from the raw IDX files"),
                     ("cifar10", "the tfds data_dir where it is prepared")):
    with pytest.raises(datasets.DataError, match=f"{name}: no prepared "
                       f"tensorflow_datasets data in data_dir='{tmp_path}'"
                       rf".*\(`tfds build {name}`\)") as e:
      datasets.from_tfds(name, data_dir=str(tmp_path))
    assert hint in str(e.value) and ("IDX" in str(e.value)) == (
        name == "mnist")
  # $TFDS_DATA_DIR (set after tfds was imported) is where both look.
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert datasets.missing("cifar10") == (
      f"cifar10: no prepared tensorflow_datasets data in data_dir="
      f"'{tmp_path}'")
  with pytest.raises(datasets.DataError, match=f"cifar10: no prepared "
                     f"tensorflow_datasets data in data_dir='{tmp_path}'"):
    datasets.load("cifar10")


def test_data_dirs_starting_with_a_tilde_are_expanded(prepared, monkeypatch,
                                                      tmp_path, data_dir):
  # `--config.dataset.data_dir=~/x` reaches jaxcl unexpanded.
  monkeypatch.setenv("HOME", str(tmp_path))
  os.symlink(prepared, tmp_path / "tfds")
  os.symlink(os.path.join(data_dir, "mnist"), tmp_path / "idx")
  assert datasets.missing("cifar10", "~/tfds") == (
      f"cifar10: no prepared tensorflow_datasets data in data_dir="
      f"'{tmp_path}/tfds'")
  assert datasets.missing("mnist", "~/idx") is None
  assert datasets.load("mnist", "~/idx").train_x.shape == (60000, 28, 28, 1)


def test_prepare_rejects_missing_files(tmp_path):
  # Named before tfds writes anything.
  (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
  with pytest.raises(datasets.DataError, match=(
      "mnist: missing train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"
      f", t10k-images-idx3-ubyte.gz in manual_dir '{tmp_path}'$")):
    tfds_local.prepare("mnist", str(tmp_path), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  with pytest.raises(datasets.DataError, match="supports"):
    tfds_local.prepare("cifar10", str(tmp_path))


def test_prepare_fashion_mnist_is_tfds_fashion_mnist(tmp_path, data_dir):
  # The Fashion-MNIST builder (its class names), from its own IDX files.
  src = os.path.join(data_dir, "fashion_mnist")
  for key, name in datasets._IDX_FILES.items():
    rows = 40 if key.startswith("train") else 20
    _write_idx(str(tmp_path / name),
               datasets.read_idx(os.path.join(src, name))[:rows])
  out = str(tmp_path / "tfds")
  where = tfds_local.prepare("fashion_mnist", str(tmp_path), out)
  # What the prepared copy itself records (a reader's registered builder
  # would supply its own names whatever was written).
  with open(os.path.join(where, "label.labels.txt")) as f:
    assert f.read().split("\n")[:2] == ["T-shirt/top", "Trouser"]
  with open(os.path.join(where, "dataset_info.json")) as f:
    assert "Fashion-MNIST" in json.load(f)["description"]
  d = datasets.from_tfds("fashion_mnist", data_dir=out)
  assert d.train_x.shape == (40, 28, 28, 1) and d.test_x.shape == (20, 28,
                                                                     28, 1)
  first = datasets.read_idx(os.path.join(src, datasets._IDX_FILES["test_y"]))
  np.testing.assert_array_equal(np.sort(d.test_y), np.sort(first[:20]))


def test_any_tfds_data_set_by_name(prepared, idx_subset, monkeypatch):
  """``tfds:<name>`` reads that tensorflow_datasets data set, even where
  jaxcl's own loader of the name would read other files (here MNIST's IDX
  files in $JAXCL_DATA_DIR): the records in tfds's stored order."""
  monkeypatch.setattr(datasets, "_IDX_COUNTS", dict(_ROWS))
  monkeypatch.setenv("JAXCL_DATA_DIR", idx_subset)
  idx = datasets.load("mnist")
  via = datasets.load("tfds:mnist", prepared)
  direct = datasets.from_tfds("mnist", data_dir=prepared)
  for f in ("train_x", "train_y", "test_x", "test_y"):
    np.testing.assert_array_equal(getattr(via, f), getattr(direct, f))
  assert via.name == "mnist" and via.num_classes == 10
  assert not np.array_equal(via.train_y, idx.train_y)  # not the IDX order
  assert datasets.missing("tfds:mnist", prepared) is None
  assert datasets.missing("tfds:mnist", idx_subset) == (
      f"mnist: no prepared tensorflow_datasets data in data_dir="
      f"'{idx_subset}'")
  # A run reads it from the config.
  import jaxcl
  c = jaxcl.default_config()
  c.dataset.name, c.dataset.data_dir = "tfds:mnist", prepared
  c.model.widths, c.train.epochs = (32,), 1
  c.report.progress = False
  r = jaxcl.run(c)
  assert r.accuracy.shape == (5, 5) and r.metrics["learning_acc"] > 0.8


def test_bad_tfds_names_and_data_sets(prepared, monkeypatch):
  with pytest.raises(datasets.DataError, match="dataset 'tfds:' names no "
                     "tensorflow_datasets data set; write tfds:<name>"):
    datasets.load("tfds:")
  with pytest.raises(datasets.DataError, match=r"unknown dataset 'svhn'; "
                     r"valid: \[.*'mnist'.*\], or tfds:<name> for any "
                     "tensorflow_datasets image-classification data set"):
    datasets.check_name("svhn")
  datasets.check_name("tfds:svhn_cropped")  # known by form, not read
  from jaxcl.strategies.dmc import dmc
  with pytest.raises(ValueError, match="dmc: aux_dataset: dataset 'tfds:' "
                     "names no"):
    dmc(aux_dataset="tfds:")
  # Features that are not an image and a class label, named.
  from types import SimpleNamespace as NS
  info = NS(supervised_keys=None, features={
      "image": NS(shape=(28, 28, 1)), "objects": NS(shape=())})
  with pytest.raises(datasets.DataError, match=r"boxes: not an "
                     r"image-classification data set jaxcl can read: it "
                     r"needs an image feature \('image'\) and a class label "
                     r"\('label'\) among its features \['image', "
                     r"'objects'\]"):
    datasets._supervised_keys("boxes", info)
  # supervised_keys name the pair when it is not image / label.
  info = NS(supervised_keys=("img", "fine"), features={
      "img": NS(shape=(8, 8)), "fine": NS(num_classes=3)})
  assert datasets._supervised_keys("x", info) == ("img", "fine")
  # Images of several shapes: refused, with examples of them.
  import tensorflow_datasets as tfds
  recs = [{"image": np.zeros(s, np.uint8), "label": 0}
          for s in ((28, 28, 1), (30, 28, 1))]
  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: {
      "train": recs, "test": recs})
  with pytest.raises(datasets.DataError, match=r"mnist: its train images "
                     r"have 2 different shapes \(e.g. \[\(28, 28, 1\), "
                     r"\(30, 28, 1\)\]\); jaxcl needs one shape"):
    datasets.from_tfds("mnist", data_dir=prepared)
  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: {
      "train": recs, "validation": recs})
  with pytest.raises(datasets.DataError, match=r"mnist: jaxcl needs a "
                     r"'train' and a 'test' split; this data set has "
                     r"\['train', 'validation'\] \(no test\)"):
    datasets.from_tfds("mnist", data_dir=prepared)
