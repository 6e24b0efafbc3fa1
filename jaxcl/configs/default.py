"""The default experiment: Split Digits, class-incremental, Naive.

scikit-learn's bundled digits (no download), 5 experiences of 2 classes,
MLP 64-400-400-10, SGD, 2 epochs per experience. Runs in seconds on a CPU.

  jaxcl run                                   # this config
  jaxcl run --config.strategy.name=joint      # any field can be overridden
"""

from jaxcl.experiment import default_config


def get_config(arg=None):
  del arg
  return default_config()
