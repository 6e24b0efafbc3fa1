"""Wall time of 8 seeds in one vmapped sweep against 8 sequential runs.

Split MNIST Naive (experiments/split_mnist_baselines.py: MLP 784-400-400-10,
batch 128, 2 epochs per experience). Both sides include compilation, as a
user would experience them; sequential runs reuse nothing between runs
(each ``jaxcl.run`` builds its own program, like separate jobs), and a
second figure reuses one compiled learner across the 8 runs (the best a
sequential loop can do).

  python benchmarks/sweep.py [--data_dir ../shared/data] [--seeds 8]

``--scenario_per_seed`` times streams drawn per seed (each run its own
permutations or angles, as Mammoth draws them): one sweep with
``scenario_per_seed=True`` against sequential runs that each build their
own draw (what ``experiments/reproduce.py`` does for such entries), e.g.

  python benchmarks/sweep.py --config permuted_mnist_replay \
      --arg strategy=replay,mem_size=200 --scenario_per_seed --seeds 4 \
      --experiences 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import add_data_dir  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  add_data_dir(ap)
  ap.add_argument("--seeds", type=int, default=8)
  ap.add_argument("--config", default="split_mnist_baselines")
  ap.add_argument("--arg", default="strategy=naive",
                  help="the config file's argument")
  ap.add_argument("--scenario_per_seed", action="store_true")
  ap.add_argument("--experiences", type=int, default=0,
                  help="> 0: override scenario.n_experiences")
  args = ap.parse_args()

  import importlib

  import jaxcl
  from jaxcl import experiment, sweep, train

  mod = importlib.import_module(f"experiments.{args.config}")
  c = mod.get_config(args.arg)
  c.dataset.data_dir = args.data_dir
  c.report.progress = False
  if args.experiences:
    c.scenario.n_experiences = args.experiences
  per_seed = args.scenario_per_seed
  scenario = None if per_seed else experiment.build_scenario(c)
  seeds = list(range(args.seeds))
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"{args.config}:{args.arg}, {c.scenario.n_experiences} experiences, "
        f"{len(seeds)} seeds" + (", each on its own scenario draw"
                                 if per_seed else ""))

  t = time.perf_counter()
  r = sweep.sweep(c, seeds=seeds, scenario=scenario,
                  scenario_per_seed=per_seed)
  t_sweep = time.perf_counter() - t
  print(f"vmapped sweep of {len(seeds)} runs: {t_sweep:.2f} s "
        f"(ACC {r.groups[0]['acc'][0]:.4f} ± {r.groups[0]['acc'][1]:.4f})")

  t = time.perf_counter()
  for s in seeds:
    c.seed = s
    if per_seed:
      c.scenario.seed = s  # jaxcl.run builds the seed's own draw
    jaxcl.run(c, scenario=scenario)
  t_seq = time.perf_counter() - t
  print(f"{len(seeds)} sequential jaxcl.run calls: {t_seq:.2f} s")
  if per_seed:  # every draw is its own scenario: no program to share
    print(f"speed-up of the sweep: {t_seq / t_sweep:.2f}x over separate "
          "runs")
    return

  # Sequential with one compiled learner (compile once, run 8 times).
  s = experiment.setup(c, scenario)
  t = time.perf_counter()
  for seed in seeds:
    state = train.init_state(s.learner.ctx, s.learner.strategy, seed)
    experiment.execute(s, state)
  t_seq_reuse = time.perf_counter() - t
  print(f"{len(seeds)} sequential runs sharing one compiled program: "
        f"{t_seq_reuse:.2f} s")
  print(f"speed-up of the sweep: {t_seq / t_sweep:.2f}x over separate runs, "
        f"{t_seq_reuse / t_sweep:.2f}x over a shared-program loop")


if __name__ == "__main__":
  main()
