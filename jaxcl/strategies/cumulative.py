"""Cumulative training: experience i trains on the data of experiences 0..i.

A replay upper bound with unlimited memory.
"""

from jaxcl import scenarios
from jaxcl.strategy import Strategy


def cumulative() -> Strategy:
  """Naive training on the cumulative data (see :func:`scenario`)."""
  return Strategy(name="cumulative", scenario=scenario)


def scenario(s: scenarios.Scenario) -> scenarios.Scenario:
  return scenarios.cumulative(s)
