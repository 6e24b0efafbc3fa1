"""Continual-learning strategies, one module per method.

A strategy named ``foo`` lives in ``jaxcl/strategies/foo.py`` and exposes a
factory ``foo(**hyperparameters) -> Strategy``. A module may also define
``scenario(s: Scenario) -> Scenario`` when the method changes what data the
experiences train on (Joint, Cumulative). :func:`get` looks strategies up by
module name, so adding a method needs no registry edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from jaxcl.strategy import Strategy, chain

__all__ = ["available", "get", "from_spec"]


def available() -> list[str]:
  """Names of all strategy modules."""
  import jaxcl.strategies as pkg
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                if not m.name.startswith("_"))


def _module(name: str):
  if name not in available():
    raise ValueError(f"unknown strategy {name!r}; valid: {available()}")
  return importlib.import_module(f"jaxcl.strategies.{name}")


def get(name: str, **kwargs: Any) -> Strategy:
  """Builds strategy ``name`` with hyperparameters ``kwargs``.

  Raises:
    ValueError: unknown name (listing the valid ones) or bad arguments.
  """
  factory = getattr(_module(name), name)
  try:
    return factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for strategy {name!r}: {e}") from e


def from_spec(spec: str, kwargs: dict[str, dict[str, Any]] | None = None
              ) -> tuple[Strategy, Callable]:
  """Builds ``'ewc+replay'``-style specs: the chain of the named strategies.

  Args:
    spec: strategy names joined by ``+`` (applied left to right).
    kwargs: per-name hyperparameters, e.g. ``{'ewc': {'lam': 100.}}``.

  Returns:
    The strategy and a function mapping a scenario to the one it trains on
    (identity unless a member defines ``scenario``).
  """
  kwargs = kwargs or {}
  names = [n.strip() for n in spec.split("+") if n.strip()]
  if not names:
    raise ValueError(f"empty strategy spec {spec!r}; valid names: "
                     f"{available()}")
  unknown = set(kwargs) - set(names)
  if unknown:
    raise ValueError(f"hyperparameters given for {sorted(unknown)}, which "
                     f"are not in the strategy spec {spec!r}")
  members = [get(n, **dict(kwargs.get(n, {}))) for n in names]
  transforms = [getattr(_module(n), "scenario", None) for n in names]
  transforms = [t for t in transforms if t is not None]
  if len(transforms) > 1:
    raise ValueError(f"{spec!r}: at most one member may change the training "
                     "data (joint, cumulative)")

  def scenario_fn(s):
    return transforms[0](s) if transforms else s

  strategy = members[0] if len(members) == 1 else chain(*members)
  return strategy, scenario_fn
