"""Naive fine-tuning: train on each experience in turn, nothing else.

The lower bound of continual learning: it forgets catastrophically in class-
incremental streams (McCloskey & Cohen, 1989).
"""

from jaxcl.strategy import Strategy


def naive() -> Strategy:
  """The identity strategy."""
  return Strategy(name="naive")
