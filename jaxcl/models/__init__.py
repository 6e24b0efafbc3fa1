"""Flax (linen) models: a backbone plus a single- or multi-head classifier.

Models are built by name (``build('mlp', ...)``) so configs can pick them:
the backbones in ``BACKBONES`` get a :class:`Classifier` head; any other
name ``foo`` is looked up as a module ``jaxcl/models/foo.py`` exposing
``build(num_classes, num_heads, **kwargs) -> flax module`` with the same call
signature (for models that are not backbone + head, e.g. hypernetworks).
Every model is a :class:`Classifier` whose ``__call__(x, task, train)``
returns logits, and whose ``features=True`` call returns the backbone's
output (used by strategies that work in feature space: iCaRL, CWR*, latent
replay). A model with batch norm (a ``batch_stats`` collection) should also
take ``mask=`` (bool ``(batch,)``) in training mode and count only those
rows in its batch statistics, as ``bn_mlp``, ``resnet18`` and ``resnet32``
do (``jaxcl.models.batch_norm.BatchNorm(...)(h, mask=...)``, PyTorch's
batch norm with flax's variables): the engine passes the padding rows'
mask (:func:`jaxcl.state.batch_stats_mask`); without the keyword,
padding rows count.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any, Callable

from jaxcl import checks
from jaxcl.models import init as inits
from jaxcl.models.classifier import Classifier, check_head
from jaxcl.models.cnn import CNN
from jaxcl.models.mlp import MLP
from jaxcl.models.resnet import CifarResNet, ResNet18

__all__ = ["Classifier", "MLP", "CNN", "ResNet18", "CifarResNet", "build",
           "BACKBONES", "available"]

BACKBONES: dict[str, Callable[..., Any]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet18": ResNet18,
    # He et al.'s CIFAR ResNet-32 (FACIL's and PyCIL's CIFAR-100 backbone);
    # other depths: CifarResNet(depth=...) from Python.
    "resnet32": functools.partial(CifarResNet, depth=32),
}


def build(name: str, num_classes: int, num_heads: int = 1,
          **kwargs: Any) -> Classifier:
  """Builds a classifier by backbone name.

  Args:
    name: one of ``BACKBONES`` (mlp, cnn, resnet18, resnet32).
    num_classes: outputs per head.
    num_heads: 1 for a single head; >1 for one head per task, picked by the
      task id (multi-head).
    **kwargs: the backbone's fields (e.g. ``widths=(400, 400)`` for mlp),
      plus ``init`` (:data:`jaxcl.models.init.INITS`; the MLP's layers and
      the head; other backbones keep their own initialisation) and ``head``
      (:data:`jaxcl.models.classifier.HEADS`: ``linear``, or ``cosine`` for
      LUCIR's cosine-normalised head).
  """
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")
  _check_sizes(name, kwargs)
  if name not in BACKBONES:
    if name not in available():
      raise ValueError(f"unknown model {name!r}; valid: {available()}")
    module = importlib.import_module(f"jaxcl.models.{name}")
    try:
      return module.build(num_classes, num_heads, **kwargs)
    except TypeError as e:
      raise ValueError(f"bad arguments for model {name!r}: {e}") from e
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")
  init = inits.check(kwargs.pop("init", "lecun_normal"))
  head = check_head(kwargs.pop("head", "linear"))
  if name == "mlp":
    kwargs["initializer"] = init
  try:
    backbone = BACKBONES[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for model {name!r}: {e}") from e
  return Classifier(backbone=backbone, num_classes=num_classes,
                    num_heads=num_heads, initializer=init, head=head)


# Layer sizes, by the field names the models use: each must be a whole
# number >= 1 (a 0-wide layer fails deep in flax's initialiser instead).
_SIZE_FIELDS = ("widths", "channels", "hidden", "width", "target_widths")


def _check_sizes(name: str, kwargs: dict[str, Any]) -> None:
  for field in _SIZE_FIELDS:
    if field not in kwargs:
      continue
    value = kwargs[field]
    sizes = value if isinstance(value, (list, tuple)) else (value,)
    if not all(checks.is_whole(s) and s >= 1 for s in sizes):
      raise ValueError(f"model {name!r}: {field}={value!r}; every layer "
                       "size must be a whole number >= 1")


def available() -> list[str]:
  """Backbone names plus model modules that define ``build``."""
  import jaxcl.models as pkg
  extra = []
  for m in pkgutil.iter_modules(pkg.__path__):
    if m.name.startswith("_") or m.name in BACKBONES:
      continue
    if "def build(" in open(f"{pkg.__path__[0]}/{m.name}.py").read():
      extra.append(m.name)
  return sorted(set(BACKBONES) | set(extra))
