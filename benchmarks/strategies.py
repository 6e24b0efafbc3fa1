"""Per-strategy speed on Split MNIST: steps/s, FLOP/s, compile vs run time.

For each strategy, its own family's Split MNIST protocol (the committed
config) is set up; experience 0 is trained in full (so memories, Fisher,
masks are populated), then the compiled experience program of experience 1
is timed on its own: compile time (lower + compile), one warm-up call, then
one timed epoch chunk. FLOPs per step come from XLA's cost analysis of the
compiled program (XLA counts the scan body once, i.e. one step; the figure
includes the strategy's extra work: replay rows, memory gradients,
penalties), set against a large ``jnp.dot``'s measured FLOP/s here.

  python benchmarks/strategies.py [--data_dir ../shared/data] [--only gem]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.throughput import matmul_flops  # noqa: E402  one copy

# (name, config module, variant): each strategy in its own family's protocol.
STRATEGIES = [
    ("naive", "split_mnist_baselines", "strategy=naive"),
    ("ewc", "split_mnist_regularisation", "strategy=ewc,kind=task"),
    ("replay", "split_mnist_replay", "strategy=replay,mem_size=500"),
    ("gem", "split_mnist_hybrid", "strategy=gem,mem_size=500"),
    ("icarl", "split_mnist_hybrid", "strategy=icarl,mem_size=500"),
    ("supsup", "split_mnist_architectural", "strategy=supsup,mode=gg"),
]


def measure(name: str, module: str, arg: str, data_dir: str) -> dict:
  from jaxcl import experiment, train

  c = importlib.import_module(f"experiments.{module}").get_config(arg)
  c.dataset.data_dir = c.dataset.data_dir or data_dir
  c.report.progress = False
  s = experiment.setup(c)
  learner, sc = s.learner, s.scenario
  ctx, strategy = learner.ctx, learner.strategy
  state = experiment.initial_state(s, 0)
  size = ctx.info.train_size

  def begin(state, i):
    state = strategy.before_experience(ctx, state, sc.experiences[i])
    state = train.reset_opt_state(ctx, state)
    return train.unalias(state)

  # Experience 0 in full, so that experience 1 sees a populated strategy.
  state = begin(state, 0)
  exp = sc.experiences[0]
  data = jax.device_put(train.device_experience(exp, size))
  for epoch in range(learner.epochs):
    for start in range(0, learner.epoch_steps, learner.chunk_steps):
      state, _, _ = learner.chunk_fn(state, data, exp.num_train, 0, epoch,
                                     start)
  state = train.unalias(strategy.after_experience(ctx, state, exp))
  state = begin(state, 1)
  exp = sc.experiences[1]
  data = jax.device_put(train.device_experience(exp, size))

  # A fresh learner has a fresh jit wrapper: its compile is really timed.
  fresh = dataclasses.replace(learner)
  t = time.perf_counter()
  compiled = fresh.chunk_fn.lower(state, data, exp.num_train, 1, 0,
                                  0).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA's cost analysis counts a loop body once: this is one step's FLOPs.
  flops_step = float(cost.get("flops", 0.0)) if cost else 0.0
  state, losses, ran = compiled(state, data, exp.num_train, 1, 0, 0)  # warm
  np.asarray(losses)
  t = time.perf_counter()
  state, losses, ran = compiled(state, data, exp.num_train, 1, 1 % max(
      learner.epochs, 1), 0)
  steps = int(np.asarray(ran).sum())
  run_s = time.perf_counter() - t
  return {"name": name, "batch": ctx.info.batch_size, "steps": steps,
          "compile_s": compile_s, "run_s": run_s,
          "steps_per_s": steps / run_s,
          "flop_per_s": flops_step * steps / run_s,
          "flops_per_step": flops_step}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data_dir", default=os.environ.get(
      "JAXCL_DATA_DIR", os.path.join(REPO, "..", "shared", "data")))
  ap.add_argument("--only", nargs="*", default=[])
  args = ap.parse_args()
  peak = matmul_flops()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"dense matmul 4096^2 f32: {peak / 1e9:.1f} GFLOP/s")
  print(f"{'strategy':>8} {'batch':>5} {'steps':>6} {'compile s':>9} "
        f"{'run s':>7} {'steps/s':>8} {'MFLOP/step':>10} {'GFLOP/s':>8} "
        f"{'% matmul':>8}")
  for name, module, arg in STRATEGIES:
    if args.only and name not in args.only:
      continue
    r = measure(name, module, arg, args.data_dir)
    print(f"{r['name']:>8} {r['batch']:>5} {r['steps']:>6} "
          f"{r['compile_s']:>9.2f} {r['run_s']:>7.2f} "
          f"{r['steps_per_s']:>8.0f} {r['flops_per_step'] / 1e6:>10.1f} "
          f"{r['flop_per_s'] / 1e9:>8.2f} "
          f"{100 * r['flop_per_s'] / peak:>7.1f}%", flush=True)


if __name__ == "__main__":
  main()
