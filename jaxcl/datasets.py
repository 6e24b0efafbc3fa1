"""Data sources that return plain NumPy arrays.

Every source ends in the same :class:`Dataset` record (float32 images in
[0, 1] with shape ``(N, H, W, C)``, int32 labels), so scenarios, models and the
training loop never care where the data came from:

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no download);
  the zero-download default.
* ``mnist`` / ``fashion_mnist``: the original gzipped IDX files in a local
  directory (``data_dir`` argument, ``JAXCL_DATA_DIR`` or the tfds
  ``manual_dir`` layout), read with NumPy in ~0.2 s; otherwise through
  ``tensorflow_datasets``.
* ``cifar10`` / ``cifar100``: through ``tensorflow_datasets`` (a prepared
  ``data_dir`` or a network connection).

:meth:`Dataset.with_label_noise` (:func:`noisy_labels`) corrupts the
training labels, symmetric or asymmetric, as Mammoth's ``--noise_rate``,
keeping the true ones in ``train_y_true``.

The tfds path uses ``tfds.data_source`` (array_record, no TensorFlow needed);
see :mod:`jaxcl.tfds_local` for preparing MNIST-style tfds data from the raw
IDX files without TensorFlow or a network.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import struct
from typing import Any, Callable, Sequence

import numpy as np

from jaxcl import checks

__all__ = ["Dataset", "load", "check_name", "DATASETS", "TFDS_PREFIX",
           "read_idx", "DataError", "noisy_labels", "LABEL_NOISE_TYPES",
           "ASYMMETRIC_FLIPS"]


class DataError(ValueError):
  """A data set is missing, corrupt or asked for by an unknown name."""


def standardisation(mean: float | Sequence[float],
                    std: float | Sequence[float],
                    input_shape: Sequence[int]
                    ) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, std)`` as float32 arrays that broadcast over inputs of
  ``input_shape`` (one value, or one per channel: the last axis).

  Raises:
    DataError: unless every mean is finite and every std finite and > 0,
      and a per-channel pair has one value per channel.
  """
  def values(v):
    vs = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    ok = vs and all(checks.is_real(a) for a in vs)
    return vs if ok else None

  m, s = values(mean), values(std)
  if m is None or s is None or min(s) <= 0:
    raise DataError(f"normalize must be (mean, std) with finite numbers "
                    f"and std > 0, got ({mean!r}, {std!r})")
  c = tuple(input_shape)[-1] if len(input_shape) else 1
  for name, vs in (("mean", m), ("std", s)):
    if len(vs) not in (1, c):
      raise DataError(
          f"normalize: {name}={vs!r} has {len(vs)} values; give one for "
          f"every pixel, or one per channel ({c}: the inputs are shaped "
          f"{tuple(input_shape)})")
  return np.float32(m), np.float32(s)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test arrays of one data set.

  Attributes:
    name: the data set's name.
    train_x: float32 ``(N, H, W, C)`` images in [0, 1] (unless
      :meth:`normalized`).
    train_y: int32 ``(N,)`` labels in ``[0, num_classes)``.
    test_x: float32 ``(M, H, W, C)``.
    test_y: int32 ``(M,)``.
    num_classes: number of classes.
    train_y_true: the true training labels when :meth:`with_label_noise`
      corrupted ``train_y`` (int32 ``(N,)``, aligned with it:
      ``train_y != train_y_true`` marks the flipped examples); None when no
      noise was added, ``train_y`` then holding the true labels.
  """
  name: str
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  train_y_true: np.ndarray | None = None

  def subset(self, train: int | None = None, test: int | None = None,
             seed: int = 0) -> "Dataset":
    """A stratification-free random subset (for quick runs and tests) of
    at most ``train`` / ``test`` examples (``None`` or 0: all of them)."""
    for split, n in (("train", train), ("test", test)):
      if n is not None and n < 0:
        raise DataError(f"{split}_subset must be >= 0 (0: all examples), "
                        f"got {n}")
    rng = np.random.default_rng(seed)

    def take(x, y, n, true=None):
      if not n or n >= len(y):
        return x, y, true
      idx = np.sort(rng.permutation(len(y))[:n])
      return x[idx], y[idx], None if true is None else true[idx]

    tx, ty, true = take(self.train_x, self.train_y, train, self.train_y_true)
    vx, vy, _ = take(self.test_x, self.test_y, test)
    return dataclasses.replace(self, train_x=tx, train_y=ty, test_x=vx,
                               test_y=vy, train_y_true=true)

  def normalized(self, mean: float | Sequence[float],
                 std: float | Sequence[float]) -> "Dataset":
    """Inputs standardised as ``(x - mean) / std`` (torchvision's
    ``Normalize``): one pair for every pixel and channel (e.g. MNIST's
    ``(0.1307, 0.3081)`` in Avalanche's and many PyTorch protocols), or
    one value per channel, the inputs' last axis (e.g. FACIL's CIFAR-100
    ``((0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023))``).

    Raises:
      DataError: unless every mean is finite and every std finite and
        > 0, and a per-channel pair has one value per channel.
    """
    m, s = standardisation(mean, std, self.train_x.shape[1:])
    return dataclasses.replace(self, train_x=(self.train_x - m) / s,
                               test_x=(self.test_x - m) / s)

  def validation(self, fraction: float, seed: int = 0) -> "Dataset":
    """The training set split into training and validation examples; the
    validation examples take the test set's place.

    For choosing hyperparameters without looking at the test set (Mammoth's
    ``--validation``, FACIL's ``--validation``): every stream, metric and
    plot built from the result is on held-out training data. The split is
    stratified, ``round(n_c * fraction)`` examples of each class ``c``, so
    every experience of a class-split stream is validated on its own
    classes; it depends on ``seed`` only, so a sweep's runs share it.

    Raises:
      DataError: if ``fraction`` is not in (0, 1), or leaves a class with
        no validation or no training example, or the training labels are
        already noisy (split first, then add noise: the validation labels
        stay clean, as in Mammoth).
    """
    if not (checks.is_real(fraction) and 0 < fraction < 1):
      raise DataError(f"validation must be a fraction in (0, 1) (0: use the "
                      f"test set), got {fraction!r}")
    if self.train_y_true is not None:
      raise DataError(
          "validation split of a data set whose training labels are noisy: "
          "hold out the validation split first, then call "
          "with_label_noise (validation labels stay clean, as in Mammoth)")
    val = _stratified_holdout(self.train_y, fraction, seed)
    counts = np.bincount(self.train_y, minlength=self.num_classes)
    held = np.bincount(self.train_y[val], minlength=self.num_classes)
    bad = [c for c in range(self.num_classes)
           if counts[c] and not 0 < held[c] < counts[c]]
    if bad:
      c = bad[0]
      raise DataError(
          f"validation fraction {fraction} holds out {held[c]} of class "
          f"{c}'s {counts[c]} training examples; every class needs at least "
          f"one validation and one training example (classes {bad})")
    keep = np.ones(len(self.train_y), bool)
    keep[val] = False
    return dataclasses.replace(
        self, train_x=self.train_x[keep], train_y=self.train_y[keep],
        test_x=self.train_x[val], test_y=self.train_y[val])

  def with_label_noise(self, rate: float, kind: str = "symmetric",
                       seed: int = 0) -> "Dataset":
    """The data set with noisy training labels (:func:`noisy_labels`); the
    true ones move to ``train_y_true``, the test labels stay clean.

    At ``rate=0`` the data set itself is returned (same arrays, no
    ``train_y_true``), after the same argument checks.

    Raises:
      DataError: a bad rate, kind or seed (see :func:`noisy_labels`), an
        asymmetric kind for a data set without a flip map, or labels that
        are noisy already.
    """
    if self.train_y_true is not None:
      raise DataError(f"{self.name}: the training labels are noisy "
                      "already; add label noise once, to the true labels")
    noisy = noisy_labels(self.train_y, self.num_classes, rate, kind, seed,
                         dataset=self.name)
    if rate == 0:
      return self
    return dataclasses.replace(self, train_y=noisy,
                               train_y_true=self.train_y)


# --------------------------------------------------------------------------
# Label noise.

LABEL_NOISE_TYPES = ("symmetric", "asymmetric")

# Asymmetric (class-dependent) noise: true class -> the class it is
# mislabelled as, mimicking confusions between similar classes (Patrini et
# al., "Making Deep Neural Networks Robust to Label Noise: a Loss Correction
# Approach", CVPR 2017, Sec. 6). Classes absent from a map keep their
# labels. Mammoth (datasets/utils/label_noise.py) has CIFAR-10's map (and a
# CIFAR-100 one), not MNIST's.
_MNIST_FLIPS = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}  # 2->7, 3->8, 5<->6, 7->1
ASYMMETRIC_FLIPS: dict[str, dict[int, int]] = {
    "mnist": _MNIST_FLIPS,
    # The same ten handwritten digits (8x8 scans), so the same confusions.
    "digits": _MNIST_FLIPS,
    # 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 7 horse,
    # 9 truck: truck->automobile, bird->airplane, deer->horse, cat<->dog.
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
}


def noisy_labels(y: np.ndarray, num_classes: int, rate: float,
                 kind: str = "symmetric", seed: int = 0,
                 dataset: str | None = None) -> np.ndarray:
  r"""Training labels with synthetic label noise (a new array; ``y`` is not
  changed).

  For each source class ``c``, exactly ``round(rate * n_c)`` of its ``n_c``
  examples, drawn uniformly at random, get a wrong label, as in Mammoth's
  ``--noise_rate``: every example is flipped with probability ``rate``
  (up to that rounding) and each class, hence each experience, carries the
  asked-for rate itself, not a binomial draw around it.

  * ``symmetric``: all classes are sources; a flipped label is drawn
    uniformly from the ``C - 1`` *other* classes (Mammoth, Co-teaching's
    "symmetry flipping"), so ``rate`` is the fraction of wrong labels. (Noise
    drawn from *any* class would leave ``rate / C`` of the "flipped" labels
    correct, a true rate of ``rate (C - 1) / C``.) The transition matrix is

    .. math::
      T_{cc} = 1 - r, \qquad T_{cj} = r / (C - 1) \quad (j \ne c).

  * ``asymmetric``: the sources are the classes of ``dataset``'s map in
    :data:`ASYMMETRIC_FLIPS` (MNIST and digits: 2->7, 3->8, 5<->6, 7->1;
    CIFAR-10: truck->automobile, bird->airplane, deer->horse, cat<->dog);
    ``rate`` of each is relabelled as its target, other classes keep their
    labels. Sources are chosen on the true labels, so a 5 made a 6 is
    never turned back into a 5.

  Args:
    y: int ``(N,)`` true labels in ``[0, num_classes)``.
    num_classes: number of classes ``C`` (>= 2).
    rate: the noise rate ``r`` in [0, 1).
    kind: one of :data:`LABEL_NOISE_TYPES`.
    seed: seeds the draw (numpy ``default_rng``); the same ``(y, rate,
      kind, seed)`` always gives the same labels.
    dataset: the data set's name, for ``asymmetric`` (its map).

  Returns:
    The noisy labels, ``y``'s shape and dtype.

  Raises:
    DataError: naming the bad value: a rate outside [0, 1), an unknown kind,
      a negative or non-integer seed, labels outside ``[0, num_classes)``,
      fewer than 2 classes, or ``asymmetric`` for a data set without a map.

  References:
    Patrini et al., `Making Deep Neural Networks Robust to Label Noise: a
    Loss Correction Approach <https://arxiv.org/abs/1609.03683>`_, 2017.
    Han et al., `Co-teaching: Robust Training of Deep Neural Networks with
    Extremely Noisy Labels <https://arxiv.org/abs/1804.06872>`_, 2018.
  """
  real = (isinstance(rate, (int, float, np.floating, np.integer))
          and not isinstance(rate, bool) and np.isfinite(rate))
  if not (real and 0 <= rate < 1):
    raise DataError(f"label noise rate must be a number in [0, 1) (0: clean "
                    f"labels), got {rate!r}")
  if kind not in LABEL_NOISE_TYPES:
    raise DataError(f"unknown label noise type {kind!r}; valid: "
                    f"{list(LABEL_NOISE_TYPES)}")
  if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
          and seed >= 0):
    raise DataError(f"label noise seed must be an int >= 0, got {seed!r}")
  if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 2):
    raise DataError(f"label noise needs at least 2 classes, got "
                    f"num_classes={num_classes!r}")
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise DataError(f"labels must be a 1-d integer array, got {y.dtype} "
                    f"{y.shape}")
  if len(y) and (y.min() < 0 or y.max() >= num_classes):
    raise DataError(f"labels must lie in [0, {num_classes}), got "
                    f"[{y.min()}, {y.max()}]")
  if kind == "asymmetric":
    if dataset not in ASYMMETRIC_FLIPS:
      raise DataError(
          f"asymmetric label noise has no class map for dataset "
          f"{dataset!r}; maps exist for {sorted(ASYMMETRIC_FLIPS)} (use "
          "symmetric noise for other data sets)")
    flips = ASYMMETRIC_FLIPS[dataset]
    if max(max(flips), max(flips.values())) >= num_classes:
      raise DataError(f"{dataset}'s asymmetric map {flips} names classes "
                      f"beyond num_classes={num_classes}")
  else:
    flips = None
  out = y.copy()
  if rate == 0:
    return out
  rng = np.random.default_rng(seed)
  sources = sorted(flips) if flips else range(num_classes)
  for c in sources:
    idx = np.flatnonzero(y == c)
    k = int(round(len(idx) * rate))
    chosen = np.sort(rng.permutation(idx)[:k])
    if flips:
      out[chosen] = flips[c]
    else:
      # Uniform over the C - 1 classes other than c: draw from 0..C-2 and
      # step over c.
      t = rng.integers(0, num_classes - 1, size=k)
      out[chosen] = t + (t >= c)
  return out


def _stratified_holdout(y: np.ndarray, fraction: float,
                        seed: int) -> np.ndarray:
  """Sorted indices of ``round(n_c * fraction)`` random examples of each
  class ``c`` in ``y``."""
  rng = np.random.default_rng(seed)
  held = []
  for c in range(int(y.max()) + 1):
    idx = np.flatnonzero(y == c)
    held.append(rng.permutation(idx)[:int(round(len(idx) * fraction))])
  return np.sort(np.concatenate(held))


# --------------------------------------------------------------------------
# Raw IDX files (MNIST, Fashion-MNIST).

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
_IDX_COUNTS = {"train": 60000, "test": 10000}
_IDX_HINT = {
    "mnist": "http://yann.lecun.com/exdb/mnist/ (or any MNIST mirror)",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist (data/fashion/)",
}


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped (or plain) IDX file into a uint8 array.

  Raises:
    DataError: naming the file when it is missing, truncated or not IDX.
  """
  if not os.path.exists(path):
    raise DataError(f"missing data file {path!r}")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # bad gzip stream, truncated file
    raise DataError(f"corrupt data file {path!r}: {e}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise DataError(
        f"corrupt data file {path!r}: not an IDX file of unsigned bytes "
        "(expected the magic number 0x0000080N)")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"corrupt data file {path!r}: truncated header")
  shape = struct.unpack(">" + "I" * ndim, raw[4:header])
  expected = int(np.prod(shape))
  if len(raw) - header != expected:
    raise DataError(
        f"corrupt data file {path!r}: header says shape {shape} "
        f"({expected} bytes) but the file holds {len(raw) - header} bytes")
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx_dir(name: str, data_dir: str) -> str:
  """``data_dir`` itself or ``data_dir/<name>`` (the ../shared/data layout)."""
  for d in (os.path.join(data_dir, name), data_dir):
    if os.path.exists(os.path.join(d, _IDX_FILES["train_y"])):
      return d
  return os.path.join(data_dir, name)


def _absent_idx_files(d: str) -> list[str]:
  """The IDX files missing from directory ``d``."""
  return [f for f in _IDX_FILES.values()
          if not os.path.exists(os.path.join(d, f))]


def _load_idx(name: str, data_dir: str) -> Dataset:
  if not os.path.isdir(data_dir):
    raise DataError(
        f"data directory {data_dir!r} does not exist; pass an existing "
        f"directory holding {name}'s IDX .gz files (or {name}/ with them)")
  d = _find_idx_dir(name, data_dir)
  absent = _absent_idx_files(d)
  if absent:
    raise DataError(
        f"{name}: missing {', '.join(absent)} in {d!r}; expected the four "
        f"original IDX .gz files ({', '.join(_IDX_FILES.values())}) from "
        f"{_IDX_HINT.get(name, 'the data set authors')}")
  arr = {k: read_idx(os.path.join(d, f)) for k, f in _IDX_FILES.items()}
  for split in ("train", "test"):
    x, y = arr[f"{split}_x"], arr[f"{split}_y"]
    if x.ndim != 3 or len(x) != len(y) or len(y) != _IDX_COUNTS[split]:
      raise DataError(
          f"{name}: {split} files in {d!r} hold images {x.shape} and labels "
          f"{y.shape}; expected {_IDX_COUNTS[split]}x28x28 and "
          f"{_IDX_COUNTS[split]} labels")
    if y.max() > 9:
      raise DataError(f"{name}: {split} labels in {d!r} exceed 9")
  return Dataset(name, _unit_float(arr["train_x"]),
                 arr["train_y"].astype(np.int32), _unit_float(arr["test_x"]),
                 arr["test_y"].astype(np.int32), 10)


def _unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1] with a channel axis: ``x / 255`` in
  float32, divided in place (one 188 MB array for MNIST's training set,
  not two)."""
  out = images.astype(np.float32)
  np.divide(out, np.float32(255.0), out=out)
  return out[..., None]


# --------------------------------------------------------------------------
# tensorflow_datasets (no TensorFlow: array_record data sources).


def from_tfds(name: str, data_dir: str | None = None,
              download: bool = False) -> Dataset:
  """Loads a tfds image-classification data set through ``tfds.data_source``.

  ``data_source`` needs no TensorFlow. With ``download=False`` and an
  unprepared data set it returns ``{}`` with only a warning, so that case is
  turned into an error here. The image and label are the builder's
  ``supervised_keys`` (``image`` / ``label`` without them); every image
  must have the same shape, and pixels are scaled from 0..255 to [0, 1].
  The whole ``train`` and ``test`` splits are read into host memory.
  """
  import tensorflow_datasets as tfds  # heavy import, only on this path

  # tfds reads $TFDS_DATA_DIR once at import; honour a later setting too.
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
      builder.download_and_prepare()
    # Without a prepared copy tfds blames the (absent) data's file format
    # and suggests deleting it, so that case gets the error below.
    prepared = os.path.isfile(os.path.join(builder.data_dir,
                                           "dataset_info.json"))
    sources = (tfds.data_source(name, data_dir=data_dir, download=False)
               if prepared else {})
  except Exception as e:  # tfds raises many types; report them in one place
    raise DataError(
        f"{name}: could not open the tensorflow_datasets data in "
        f"data_dir={data_dir!r}: {type(e).__name__}: {e}") from e
  if not sources:
    raise DataError(
        f"{name}: no prepared tensorflow_datasets data in data_dir="
        f"{data_dir!r} (or $TFDS_DATA_DIR). Prepare it once with network "
        f"access (`tfds build {name}`)" + (
            ", or from the raw IDX files with jaxcl.tfds_local.prepare(), "
            "or pass --config.dataset.data_dir=<dir with the IDX .gz files>"
            if name in _IDX_HINT else
            ", or pass --config.dataset.data_dir=<the tfds data_dir where "
            "it is prepared>"))
  absent = [k for k in ("train", "test") if k not in sources]
  if absent:
    raise DataError(
        f"{name}: jaxcl needs a 'train' and a 'test' split; this data set "
        f"has {sorted(sources)} (no {' / '.join(absent)})")
  image_key, label_key = _supervised_keys(name, builder.info)

  def arrays(split):
    src = sources[split]
    n = len(src)
    recs = src.__getitems__(range(n)) if hasattr(src, "__getitems__") else [
        src[i] for i in range(n)]
    images = [np.asarray(r[image_key]) for r in recs]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
      raise DataError(
          f"{name}: its {split} images have {len(shapes)} different shapes "
          f"(e.g. {sorted(shapes)[:3]}); jaxcl needs one shape per data set "
          "(resize them into a data set of your own)")
    x = np.stack(images)
    y = np.asarray([int(r[label_key]) for r in recs], dtype=np.int32)
    if x.ndim == 3:
      x = x[..., None]
    return x.astype(np.float32) / 255.0, y

  tx, ty = arrays("train")
  vx, vy = arrays("test")
  num_classes = builder.info.features[label_key].num_classes
  return Dataset(name, tx, ty, vx, vy, int(num_classes))


def _supervised_keys(name: str, info: Any) -> tuple[str, str]:
  """The image and class-label features of a tfds data set: its
  ``supervised_keys`` when they are a pair of names, else ``image`` /
  ``label``; refused, naming its features, when they are not an image
  and a ``ClassLabel``."""
  keys = getattr(info, "supervised_keys", None)
  image_key, label_key = (tuple(keys) if isinstance(keys, (tuple, list))
                          and len(keys) == 2
                          and all(isinstance(k, str) for k in keys)
                          else ("image", "label"))
  features = info.features
  names = sorted(features.keys()) if hasattr(features, "keys") else []
  image = features[image_key] if image_key in names else None
  label = features[label_key] if label_key in names else None
  if (image is None or label is None
      or getattr(label, "num_classes", None) is None
      or len(getattr(image, "shape", ())) not in (2, 3)):
    raise DataError(
        f"{name}: not an image-classification data set jaxcl can read: it "
        f"needs an image feature ({image_key!r}) and a class label "
        f"({label_key!r}) among its features {names}")
  return image_key, label_key


# --------------------------------------------------------------------------
# scikit-learn digits (offline default).


# Where scikit-learn keeps the digits, relative to its package directory.
_DIGITS_FILE = ("datasets", "data", "digits.csv.gz")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: 1797 images of 8 x 8 pixels in 0..16, labels.

  Read from the CSV file scikit-learn ships (what its ``load_digits``
  parses) without importing scikit-learn, whose import took 1.4 s of a 7 s
  ``jaxcl run``; the public loader is the fallback for another layout.
  """
  spec = importlib.util.find_spec("sklearn")
  if spec is None:
    raise ImportError("the 'digits' data set ships with scikit-learn, which "
                      "is not installed: pip install scikit-learn")
  path = os.path.join(os.path.dirname(spec.origin or ""), *_DIGITS_FILE)
  if spec.origin and os.path.exists(path):
    table = np.loadtxt(path, delimiter=",")  # 64 pixels, then the label
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int32)
  from sklearn.datasets import load_digits
  d = load_digits()
  return d.images, d.target.astype(np.int32)


def _load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
  images, y = _digits_arrays()
  x = (images.astype(np.float32) / 16.0)[..., None]
  # A fixed, stratified split: the same test set on every machine.
  test_idx = _stratified_holdout(y, test_fraction, seed)
  train_mask = np.ones(len(y), bool)
  train_mask[test_idx] = False
  return Dataset("digits", x[train_mask], y[train_mask], x[test_idx],
                 y[test_idx], 10)


def _local_or_tfds(name: str) -> Callable[..., Dataset]:

  def load_fn(data_dir: str | None = None) -> Dataset:
    data_dir = data_dir or os.environ.get("JAXCL_DATA_DIR")
    if data_dir:
      return _load_idx(name, data_dir)
    return from_tfds(name)

  return load_fn


def _tfds_only(name: str) -> Callable[..., Dataset]:

  def load_fn(data_dir: str | None = None) -> Dataset:
    return from_tfds(name, data_dir=data_dir)

  return load_fn


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": lambda data_dir=None: _load_digits(),
    "mnist": _local_or_tfds("mnist"),
    "fashion_mnist": _local_or_tfds("fashion_mnist"),
    "cifar10": _tfds_only("cifar10"),
    "cifar100": _tfds_only("cifar100"),
}


# `dataset.name=tfds:<name>`: any tensorflow_datasets image-classification
# data set, by its tfds name (e.g. tfds:svhn_cropped, tfds:emnist/letters).
TFDS_PREFIX = "tfds:"


def check_name(name: str) -> None:
  """Refuses (DataError) a name :func:`load` does not know, naming the
  valid ones, without reading any data."""
  _loader(name)


def _loader(name: str) -> Callable[..., Dataset]:
  """The loader of ``name``: one of ``DATASETS``, or ``tfds:<name>``."""
  if name.startswith(TFDS_PREFIX):
    tfds_name = name[len(TFDS_PREFIX):].strip()
    if not tfds_name:
      raise DataError(f"dataset {name!r} names no tensorflow_datasets data "
                      "set; write tfds:<name>, e.g. tfds:svhn_cropped")
    return _tfds_only(tfds_name)
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; valid: {sorted(DATASETS)}, "
                    "or tfds:<name> for any tensorflow_datasets "
                    "image-classification data set")
  return DATASETS[name]


def missing(name: str, data_dir: str | None = None) -> str | None:
  """Why ``load(name, data_dir)`` would fail for want of files, or ``None``.

  Looks for the files without reading them (for reports that list what could
  not run, e.g. CIFAR on an offline machine); ``load`` still validates them.
  """
  try:
    _loader(name)
  except DataError as e:
    return str(e)
  tfds_named = name.startswith(TFDS_PREFIX)
  name = name.removeprefix(TFDS_PREFIX).strip()
  if name == "digits" and not tfds_named:  # ships with scikit-learn
    return None
  data_dir = os.path.expanduser(data_dir) if data_dir else data_dir
  if name in _IDX_HINT and not tfds_named:
    data_dir = data_dir or os.environ.get("JAXCL_DATA_DIR")
    if data_dir:
      d = _find_idx_dir(name, data_dir)
      absent = _absent_idx_files(d)
      return (f"{name}: missing {', '.join(absent)} in {d!r}" if absent
              else None)
  else:  # tfds-only: the local directory is a tfds data_dir
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  try:
    import tensorflow_datasets as tfds  # heavy import, only on this path
    if tfds.builder(name, data_dir=data_dir).is_prepared():
      return None
  except Exception as e:  # tfds raises many types
    return (f"{name}: could not open the tensorflow_datasets data in "
            f"data_dir={data_dir!r}: {type(e).__name__}: {e}")
  return (f"{name}: no prepared tensorflow_datasets data in data_dir="
          f"{data_dir!r}")


def load(name: str, data_dir: str | None = None) -> Dataset:
  """Loads a data set by name.

  Args:
    name: one of ``DATASETS`` (digits, mnist, fashion_mnist, cifar10,
      cifar100), or ``tfds:<name>`` for any tensorflow_datasets
      image-classification data set (:func:`from_tfds`; ``tfds:mnist``
      reads tfds's MNIST even where the IDX files are).
    data_dir: for mnist / fashion_mnist, a directory with the raw IDX ``.gz``
      files (or a ``<name>/`` sub-directory with them); defaults to
      ``$JAXCL_DATA_DIR``, then tensorflow_datasets. For cifar, a tfds
      ``data_dir``.

  Raises:
    DataError: unknown name (listing the valid ones), or missing / corrupt
      files (naming the file, what was expected and where to get it).
  """
  load_fn = _loader(name)
  # `--config.dataset.data_dir=~/x` reaches us unexpanded (the shell
  # expands a leading ~ only at the start of a word).
  return load_fn(data_dir=os.path.expanduser(data_dir) if data_dir
                 else data_dir)
