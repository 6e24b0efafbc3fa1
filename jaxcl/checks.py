"""Argument checks shared by the strategy factories (and model sizes).

They run when a strategy is built, before any tracing, and name the
argument as ``"<strategy>: <argument>"`` with the range it allows. A bool
is not a number here, and NaN or infinity is not a valid rate, strength or
size: ``nan <= 0`` is False, so a bare comparison lets it through to
training, where it surfaces as a non-finite loss blamed on the learning
rate.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["nonnegative", "positive", "positive_or_inf", "whole", "flag",
           "is_whole", "is_real", "fraction", "at_least", "one_of"]


def is_real(value: Any) -> bool:
  """A finite real number (numpy's too), not a bool (``isinstance(x, (int,
  float))`` admits True, which then reads as 1)."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def is_whole(value: Any) -> bool:
  """An int (numpy's too), not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def nonnegative(name: str, value: Any) -> None:
  """A finite number >= 0."""
  if not (is_real(value) and value >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def positive(name: str, value: Any) -> None:
  """A finite number > 0."""
  if not (is_real(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def fraction(name: str, value: Any) -> None:
  """A number in [0, 1) (a momentum, a decay rate)."""
  if not (is_real(value) and 0 <= value < 1):
    raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def at_least(name: str, value: Any, minimum: float, note: str = "") -> None:
  """A finite number >= ``minimum`` (``note`` says why)."""
  if not (is_real(value) and value >= minimum):
    raise ValueError(f"{name} must be a number >= {minimum}{note}, got "
                     f"{value!r}")


def positive_or_inf(name: str, value: Any) -> None:
  """A number > 0, where infinity means "no limit"."""
  if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and value > 0):
    raise ValueError(f"{name} must be > 0 (inf: no limit), got {value!r}")


def whole(name: str, value: Any, minimum: int = 0, note: str = "") -> None:
  """An int >= ``minimum`` (``note`` says what a special value means)."""
  if not is_whole(value) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}"
                     f"{f' ({note})' if note else ''}, got {value!r}")


def flag(name: str, value: Any) -> None:
  """True or False (a string such as ``'no'`` would otherwise read as on)."""
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be True or False, got {value!r}")


def one_of(name: str, value: Any, allowed: tuple) -> None:
  """One of the values ``allowed`` (a mode's name, say)."""
  if value not in allowed:
    raise ValueError(f"{name} must be one of {list(allowed)}, got "
                     f"{value!r}")
