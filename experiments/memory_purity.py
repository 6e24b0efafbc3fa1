"""How clean a noisy-label run's memory is: for each run of a finished sweep
directory, the fraction of stored labels that are not the true ones.

  python -m experiments.memory_purity \\
      experiments/split_digits_noisy.py:strategy=spr runs/noisy/spr 0,1,2

Arguments: the sweep's config (``file.py:arg``), its run directory and its
seeds. The sweep is resumed from its final checkpoint (nothing is trained
again when it finished) and each run's ``state.strategy.memory`` (a
:class:`jaxcl.buffers.Memory`: Replay, ER-ACE, GDumb, PuriDivER, SPR's
purified buffer, ...) is matched, example by example, against the data
set's true labels (``dataset.label_noise`` keeps them as
``train_y_true``). Prints, per run: accuracy, the wrong fraction, the
stored and distinct examples, and the examples per stored label.
"""

from __future__ import annotations

import sys

import numpy as np

from jaxcl import configs, experiment, sweep
from jaxcl.sweep import parse_seeds


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise SystemExit(__doc__)
  try:
    config = configs.load(argv[0])
  except ValueError as e:
    raise SystemExit(f"memory_purity: {e}") from None
  config.report.plots = config.report.progress = False
  seeds = parse_seeds(argv[2].split(","))
  r = sweep.sweep(config, seeds, {}, argv[1])
  memory = getattr(r.result.state.strategy, "memory", None)
  if memory is None:
    raise SystemExit(f"memory_purity: strategy {config.strategy.name!r} "
                     "keeps no `memory` in its state")
  data = experiment.load_data(config)
  if data.train_y_true is None:
    raise SystemExit("memory_purity: the run has no label noise "
                     "(dataset.label_noise = 0): every label is true")
  truth = {np.asarray(x, np.float32).tobytes(): int(t)
           for x, t in zip(data.train_x, data.train_y_true)}
  classes = int(np.max(data.train_y)) + 1
  for k, seed in enumerate(seeds):
    pick = (lambda a: np.asarray(a[k])) if len(seeds) > 1 else np.asarray
    valid = pick(memory.valid)
    xs, ys = pick(memory.x)[valid], pick(memory.y)[valid]
    wrong = np.mean([truth[x.astype(np.float32).tobytes()] != y
                     for x, y in zip(xs, ys)])
    print(f"seed {seed}: acc {r.metrics[k]['acc']:.3f}, wrong labels "
          f"{wrong:.3f}, stored {int(valid.sum())}, distinct "
          f"{len({x.tobytes() for x in xs})}, per label "
          f"{np.bincount(ys, minlength=classes).tolist()}")


if __name__ == "__main__":
  main(sys.argv[1:])
