"""Config helpers shared by the files in ``experiments/`` and the default."""

from __future__ import annotations

from typing import Any

__all__ = ["parse_arg"]


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
