"""Runs of a stream cut short, for tests that compare a strategy's state
after one experience with its state after more."""

import dataclasses

import jaxcl
from jaxcl import experiment


def run_first(config, n: int, strategy=None):
  """``jaxcl.run`` on the first ``n`` experiences of ``config``'s stream,
  evaluated on every experience's test set (so the accuracy matrix keeps
  the whole stream's width)."""
  sc = experiment.build_scenario(config)
  return jaxcl.run(config, strategy=strategy, scenario=dataclasses.replace(
      sc, experiences=sc.experiences[:n], eval_experiences=sc.experiences))
