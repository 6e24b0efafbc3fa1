"""Config helpers shared by the files in ``experiments/`` and the default."""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["parse_arg", "load"]


def _convert(value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", ""):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean, got {value!r}")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """Parses a config-file argument ``'key=value,flag'`` (big_vision style).

  ``jaxcl run --config experiments/split_mnist.py:strategy=joint,quick``
  passes ``'strategy=joint,quick'`` to ``get_config``. Every key must be
  declared in ``defaults`` (a bare ``flag`` sets a boolean to True); values
  take the default's type.

  Raises:
    ValueError: an unknown key, naming the valid ones.
  """
  out = dict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: "
                       f"{sorted(defaults)}")
    out[key] = _convert(value, defaults[key]) if "=" in part else True
  return out


def load(spec: str):
  """The config of ``'path/to/file.py[:arg]'``: the file's
  ``get_config(arg)`` (``None`` without ``:arg``), as ``--config`` names
  one on the command line; for tools outside the ``jaxcl`` command
  (``jaxcl.pretrained``, ``experiments/memory_purity.py``).

  Raises:
    ValueError: a path that is not a readable Python file.
  """
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("config_file", path)
  if module_spec is None:
    raise ValueError(f"config {spec!r}: {path!r} is not a Python file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
