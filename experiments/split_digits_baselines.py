"""Split Digits baselines (scikit-learn's 8x8 digits; no download).

5 experiences of 2 classes, MLP 64-400-400-10, SGD lr 0.1, batch 32,
2 epochs. The offline default protocol; seconds on a CPU.

  jaxcl run --config experiments/split_digits_baselines.py:strategy=joint

Arguments: ``strategy`` (naive | joint | cumulative | ensemble), ``kind``
(class | task), ``seed``.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config


def get_config(arg=None):
  a = parse_arg(arg, strategy="naive", kind="class", seed=0)
  c = default_config()
  c.name = f"split_digits_{a['kind']}_{a['strategy']}"
  c.seed = a["seed"]
  c.scenario.kind = a["kind"]
  c.strategy.name = a["strategy"]
  return c
