"""Joint training: the offline upper bound.

One experience holding all training data of the stream; the accuracy matrix
has a single row over all of the stream's test sets.
"""

from jaxcl import scenarios
from jaxcl.strategy import Strategy


def joint() -> Strategy:
  """Naive training on the joint data (see :func:`scenario`)."""
  return Strategy(name="joint", scenario=scenario)


def scenario(s: scenarios.Scenario) -> scenarios.Scenario:
  return scenarios.joint(s)
