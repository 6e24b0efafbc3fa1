"""The tensorflow_datasets path, exercised offline on the local IDX files:
prepare tfds MNIST from the raw files (no TensorFlow, no network), then load
it through tfds.data_source exactly as a user with a prepared data_dir."""

import os

import numpy as np
import pytest

from jaxcl import datasets, tfds_local


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, data_dir):
  out = str(tmp_path_factory.mktemp("tfds"))
  tfds_local.prepare("mnist", os.path.join(data_dir, "mnist"), out)
  return out


def test_tfds_mnist_matches_idx(prepared, mnist, monkeypatch):
  monkeypatch.delenv("JAXCL_DATA_DIR", raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", prepared)
  d = datasets.load("mnist")  # no data_dir: the tfds path
  assert d.train_x.shape == mnist.train_x.shape
  assert d.test_x.shape == mnist.test_x.shape
  assert d.num_classes == 10
  # tfds stores records shuffled: compare order-free statistics per class.
  for split in ("train", "test"):
    x, y = getattr(d, f"{split}_x"), getattr(d, f"{split}_y")
    rx, ry = getattr(mnist, f"{split}_x"), getattr(mnist, f"{split}_y")
    np.testing.assert_array_equal(np.bincount(y), np.bincount(ry))
    for c in range(10):
      np.testing.assert_allclose(x[y == c].sum(), rx[ry == c].sum(),
                                 rtol=1e-6)


def test_unprepared_tfds_dir_is_an_error(tmp_path):
  # Not tfds's own message, which blamed the absent data's file format and
  # suggested deleting it.
  for name in ("mnist", "cifar10"):
    with pytest.raises(datasets.DataError, match=f"{name}: no prepared "
                       f"tensorflow_datasets data in data_dir='{tmp_path}'"
                       rf".*\(`tfds build {name}`\)"):
      datasets.from_tfds(name, data_dir=str(tmp_path))


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
  with pytest.raises(datasets.DataError, match="missing"):
    tfds_local.prepare("mnist", str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(datasets.DataError, match="supports"):
    tfds_local.prepare("cifar10", str(tmp_path))
