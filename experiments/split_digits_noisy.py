"""Split Digits with noisy labels: the noisy-label replay methods side by
side (scikit-learn's 8x8 digits; no download).

5 experiences of 2 classes, class-incremental, symmetric label noise
(``noise``, default 0.4: that fraction of each class's training labels
replaced by another class, drawn uniformly; the test labels are clean),
MLP 64-100-100-10, plain SGD lr 0.1, batch 32, one epoch,
memory of 200 examples for every method: session 33's PuriDivER
evaluation (docs/notes_replay.md; its note says "momentum 0.9", the
default config's value, which plain ``sgd`` ignores: with momentum,
Replay and ER-ACE score lower than its table), now a config:

  jaxcl sweep --config experiments/split_digits_noisy.py:strategy=spr \\
      --seeds 0,1,2 --workdir runs/noisy/spr
  python -m experiments.memory_purity \\
      experiments/split_digits_noisy.py:strategy=spr runs/noisy/spr 0,1,2

(the second command: how many of each run's stored labels are wrong).
Session 58's rows are in docs/notes_replay.md.

``strategy``: ``replay``, ``er_ace``, ``gdumb`` (30 epochs from scratch),
``puridiver``, ``aer_abs`` (``aer=False``: alternate replay needs 2
epochs) or ``spr`` (delayed and purified buffers of 200, the authors'
other settings: 4000 / 3000 self-supervised epochs per fill). The papers'
numbers are on MNIST / CIFAR with other networks; these rows are read
against each other. Arguments: ``strategy``, ``noise``, ``mem``,
``epochs``, ``seed``.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config

STRATEGIES = ("replay", "er_ace", "gdumb", "puridiver", "aer_abs", "spr")


def get_config(arg=None):
  a = parse_arg(arg, strategy="spr", noise=0.4, mem=200, epochs=1, seed=0)
  s = a["strategy"]
  if s not in STRATEGIES:
    raise ValueError(f"split_digits_noisy: unknown strategy {s!r}; valid: "
                     f"{list(STRATEGIES)}")
  c = default_config()
  c.name = f"split_digits_noisy{a['noise']:g}_{s}_mem{a['mem']}"
  c.seed = a["seed"]
  c.dataset.label_noise = a["noise"]
  c.model.widths = (100, 100)
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.train.batch_size = 32
  c.train.epochs = a["epochs"]
  c.strategy.name = s
  kw = {"mem_size": a["mem"]}
  if s == "spr":
    kw["delayed_size"] = a["mem"]
  elif s == "aer_abs":
    kw.update(aer=a["epochs"] >= 2, train_epochs=a["epochs"])
  c.strategy[s] = kw
  return c
