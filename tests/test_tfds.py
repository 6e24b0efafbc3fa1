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
  with pytest.raises(datasets.DataError, match="no prepared|could not open"):
    datasets.from_tfds("mnist", data_dir=str(tmp_path))


def test_prepare_rejects_missing_files(tmp_path):
  with pytest.raises(datasets.DataError, match="missing"):
    tfds_local.prepare("mnist", str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(datasets.DataError, match="supports"):
    tfds_local.prepare("cifar10", str(tmp_path))
