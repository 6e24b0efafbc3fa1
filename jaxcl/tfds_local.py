"""Prepare tfds MNIST / Fashion-MNIST from the raw IDX files, offline.

Users with a network load data through ``tensorflow_datasets``; on clusters
the data usually already sits in a tfds ``data_dir``. The official MNIST
builders cannot prepare without TensorFlow (they read the IDX files with
``tf.io.gfile``), so this module subclasses them — same name, version and
features — reading the IDX ``.gz`` files with NumPy from a ``manual_dir``.
The result is an ordinary array_record tfds data set that
``tfds.data_source`` (and :func:`jaxcl.datasets.from_tfds`) reads without
TensorFlow, exactly as if it had been downloaded.

  python -c "from jaxcl import tfds_local; tfds_local.prepare('mnist', \\
      manual_dir='../shared/data/mnist', data_dir='~/tensorflow_datasets')"
"""

from __future__ import annotations

import os

from jaxcl.datasets import DataError, _IDX_FILES, read_idx

__all__ = ["prepare", "SUPPORTED"]

SUPPORTED = ("mnist", "fashion_mnist")


def _builder_class(name: str):
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist as tfds_mnist

  base = {"mnist": tfds_mnist.MNIST,
          "fashion_mnist": tfds_mnist.FashionMNIST}[name]

  class LocalIdx(base, skip_registration=True):
    """The official builder, reading the IDX files from ``manual_dir``."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the four original IDX .gz files in the manual_dir.")

    def _split_generators(self, dl_manager):
      d = str(dl_manager.manual_dir)
      return {
          "train": self._generate_local(os.path.join(d, _IDX_FILES["train_x"]),
                                        os.path.join(d, _IDX_FILES["train_y"])),
          "test": self._generate_local(os.path.join(d, _IDX_FILES["test_x"]),
                                       os.path.join(d, _IDX_FILES["test_y"])),
      }

    def _generate_local(self, images_path, labels_path):
      # tfds encodes NumPy images with TensorFlow but PIL images with PIL,
      # so yield PIL images to stay TensorFlow-free.
      from PIL import Image
      images = read_idx(images_path)  # (N, 28, 28) uint8
      labels = read_idx(labels_path)
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"image": Image.fromarray(image, mode="L"),
                  "label": int(label)}

  LocalIdx.name = name
  del tfds
  return LocalIdx


def prepare(name: str, manual_dir: str, data_dir: str | None = None) -> str:
  """Writes tfds array_record data for ``name`` from raw IDX files.

  Args:
    name: ``mnist`` or ``fashion_mnist``.
    manual_dir: directory with the four IDX ``.gz`` files.
    data_dir: tfds data directory (default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).

  Returns:
    The prepared data set's directory.

  Raises:
    DataError: unsupported name or missing IDX files.
  """
  if name not in SUPPORTED:
    raise DataError(f"tfds_local.prepare supports {list(SUPPORTED)}, got "
                    f"{name!r}")
  missing = [f for f in _IDX_FILES.values()
             if not os.path.exists(os.path.join(manual_dir, f))]
  if missing:
    raise DataError(f"{name}: missing {', '.join(missing)} in manual_dir "
                    f"{manual_dir!r}")
  import tensorflow_datasets as tfds

  builder = _builder_class(name)(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder.data_dir
