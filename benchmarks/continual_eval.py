"""The cost of continual evaluation (``train.eval_every_steps``).

Buzzega et al.'s Split MNIST protocol (experiments/split_mnist_replay.py:
MLP 784-100-100-10, online, batch 10 + 10 replayed, ER memory 200), one
run per evaluation interval N (0: at the experiences' ends only, the
plain run). Each N's program is compiled by a first run, and the second,
from a fresh state, is timed: its training and evaluation seconds over
the stream, the number of evaluations (each reads every test set), the
milliseconds per evaluation, and the whole stream's time against N = 0.

  python benchmarks/continual_eval.py [--data_dir ../shared/data]
      [--every 0,200,50,10] [--smoke]

``--smoke`` checks that the script runs (MNIST cut to 2000 training and
1000 test examples, N = 0 and 20); its figures are not the benchmark's.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import add_data_dir  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  add_data_dir(ap)
  ap.add_argument("--every", default="0,200,50,10",
                  help="evaluation intervals in steps (0: none inside)")
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  from experiments import split_mnist_replay
  from jaxcl import experiment, train

  every = [int(v) for v in ("0,20" if args.smoke else args.every).split(",")]
  print(f"device: {jax.devices()[0].platform} x{jax.device_count()}")
  rows = []
  for n in every:
    c = split_mnist_replay.get_config("strategy=replay,mem_size=200")
    c.dataset.data_dir = args.data_dir
    if args.smoke:
      c.dataset.train_subset, c.dataset.test_subset = 2000, 1000
    c.train.eval_every_steps = n
    c.report.progress = False
    s = experiment.setup(c)
    if not rows:  # the stream, once
      sc = s.scenario
      batch = s.learner.ctx.info.batch_size
      steps = s.learner.epochs * sum(train.steps_per_epoch(e.num_train, batch)
                                     for e in sc.experiences)
      tests = sum(len(e.test_y) for e in sc.eval_experiences)
      print(f"{c.name}: {len(sc.experiences)} experiences, {steps} steps, "
            f"test sets of {tests} images in all")
    experiment.execute(s, experiment.initial_state(s, c.seed))  # compiles
    r = experiment.execute(s, experiment.initial_state(s, c.seed))
    # The initial model's evaluation, then the curve's points or the
    # experiences' ends.
    evals = 1 + (len(r.curve.step) - 1 if r.curve is not None
                 else len(r.accuracy))
    total = r.times["train"] + r.times["eval"]
    rows.append((n, evals, r.times["train"], r.times["eval"],
                 1e3 * r.times["eval"] / evals, total))
  # The plain run's time (N = 0), else the first interval's.
  base = next((row[-1] for row in rows if row[0] == 0), rows[0][-1])
  print(f"{'every':>6} {'evaluations':>12} {'train s':>9} {'eval s':>9} "
        f"{'ms/eval':>9} {'total s':>9} {'x plain':>8}")
  for n, evals, train_s, ev, per, total in rows:
    print(f"{n:>6} {evals:>12} {train_s:>9.2f} {ev:>9.2f} {per:>9.2f} "
          f"{total:>9.2f} {total / base:>8.2f}")


if __name__ == "__main__":
  main()
