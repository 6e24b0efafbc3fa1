"""Training throughput against the machine's dense matmul limit.

Prints, for Split MNIST Naive with an MLP 784-400-400-10, batch 128,
SGD with momentum, 2 epochs per experience, evaluation after each:

* the measured f32 FLOP/s of a large ``jnp.dot`` (the machine's limit);
* compile time of the experience program and of evaluation;
* training steps/s and achieved FLOP/s (analytic count: forward
  2*B*sum(fan_in*fan_out), backward twice that);
* wall time of the whole stream after compilation (train + eval);
* wall time of the whole ``jaxcl run`` process, imports and compilation
  included (subprocesses, best of ``--process_reps``): Split MNIST
  without plots, the README's default command, and Split MNIST again with
  JAX's persistent compilation cache warm.

  python benchmarks/throughput.py [--data_dir ../shared/data]
      [--process_reps 3] [--smoke]

``--smoke`` checks that the script runs, in well under a minute: a 512^2
matmul (2 repetitions), Split MNIST cut to 2000 training / 1000 test
examples (batch 128 kept) in-process and in the ``jaxcl run`` processes,
and one process per figure. Its figures are not the benchmark's
(tests/test_benchmarks.py runs it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import add_data_dir  # noqa: E402

# --smoke: Split MNIST's training / test examples (all 60000 / 10000 else).
SMOKE_SUBSETS = (2000, 1000)


def matmul_flops(n: int = 4096, reps: int = 10) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def mlp_step_flops(batch: int, widths=(784, 400, 400, 10)) -> float:
  fwd = 2 * batch * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
  return 3 * fwd


def main() -> None:
  ap = argparse.ArgumentParser()
  add_data_dir(ap)
  ap.add_argument("--process_reps", type=int, default=3,
                  help="fresh `jaxcl run` processes per figure (best kept)")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny sizes, one process per figure: checks that "
                       "the script runs (figures not meaningful)")
  args = ap.parse_args()
  if args.smoke:
    args.process_reps = 1

  from experiments import split_mnist_baselines
  from jaxcl import experiment, train

  n = 512 if args.smoke else 4096
  peak = matmul_flops(n, 2) if args.smoke else matmul_flops()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
  print(f"dense matmul ({n}^2 f32): {peak / 1e9:.1f} GFLOP/s")

  c = split_mnist_baselines.get_config("strategy=naive")
  c.dataset.data_dir = args.data_dir
  c.report.progress = False
  if args.smoke:
    c.dataset.train_subset, c.dataset.test_subset = SMOKE_SUBSETS
  s = experiment.setup(c)
  learner, ctx, sc = s.learner, s.learner.ctx, s.scenario
  state = train.init_state(ctx, learner.strategy, 0)
  size = ctx.info.train_size
  datas = [jax.device_put(train.device_experience(e, size))
           for e in sc.experiences]
  test = jax.device_put(train.test_arrays(sc.eval_experiences,
                                          learner.eval_batch_size))
  t = time.perf_counter()
  chunk = learner.chunk_fn.lower(state, datas[0], 1, 0, 0, 0).compile()
  t_compile = time.perf_counter() - t
  t = time.perf_counter()
  ev = learner.eval_fn.lower(state, test).compile()
  t_compile_eval = time.perf_counter() - t

  t0 = time.perf_counter()
  train_time = eval_time = 0.0
  steps = 0
  for i, exp in enumerate(sc.experiences):
    t = time.perf_counter()
    state = state.replace(opt_state=ctx.tx.init(state.params))
    for epoch in range(learner.epochs):
      state, losses, ran = chunk(state, datas[i], exp.num_train, i, epoch, 0)
      steps += int(np.asarray(ran).sum())  # one host sync per epoch
    train_time += time.perf_counter() - t
    t = time.perf_counter()
    np.asarray(ev(state, test))
    eval_time += time.perf_counter() - t
  total = time.perf_counter() - t0
  flops = mlp_step_flops(128)
  print(f"compile: experience program {t_compile:.2f} s, "
        f"evaluation {t_compile_eval:.2f} s")
  print(f"train: {steps} steps in {train_time:.3f} s = "
        f"{steps / train_time:.0f} steps/s; "
        f"{steps * flops / train_time / 1e9:.1f} GFLOP/s = "
        f"{100 * steps * flops / train_time / peak:.1f}% of matmul peak")
  print(f"eval (5 test sets x 5 experiences): {eval_time:.3f} s")
  print(f"whole stream after compilation (train + eval): {total:.3f} s")

  mnist = ["--config", os.path.join(REPO, "experiments",
                                    "split_mnist_baselines.py"),
           f"--config.dataset.data_dir={args.data_dir}",
           "--config.report.progress=False", "--config.report.plots=False",
           "--config.report.tensorboard=False"]
  if args.smoke:
    mnist += [f"--config.dataset.train_subset={SMOKE_SUBSETS[0]}",
              f"--config.dataset.test_subset={SMOKE_SUBSETS[1]}"]
  print("whole `jaxcl run` process, imports, data and compilation included "
        f"(best of {args.process_reps}):")
  print(f"  Split MNIST naive, no plots/tb: {_process(mnist, args):.2f} s")
  # The README's main command as a user types it: Split Digits, plots,
  # TensorBoard, progress bars.
  print(f"  README default (Split Digits, plots, tb): "
        f"{_process([], args):.2f} s")
  # A second run with JAX's persistent compilation cache (README tip):
  # the first run fills it, the timed ones read it.
  with tempfile.TemporaryDirectory(prefix="jaxcl_bench_cache_") as cache:
    env = {"JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    _process(mnist, args, env, reps=1)
    print(f"  Split MNIST naive, compilation cache warm: "
          f"{_process(mnist, args, env):.2f} s")


def _process(cli_args: list[str], args: argparse.Namespace,
             env: dict[str, str] | None = None, reps: int | None = None
             ) -> float:
  """Best wall time of ``jaxcl run <cli_args>`` in fresh processes."""
  best = float("inf")
  for _ in range(reps or args.process_reps):
    # A fresh run directory: an old one would be resumed (or refused).
    with tempfile.TemporaryDirectory(prefix="jaxcl_bench_run_") as workdir:
      t = time.perf_counter()
      p = subprocess.run(
          [sys.executable, "-m", "jaxcl.cli", "run", *cli_args,
           "--workdir", workdir], capture_output=True, text=True, cwd=REPO,
          env={**os.environ, "JAXCL_DATA_DIR": args.data_dir, **(env or {})})
      elapsed = time.perf_counter() - t
    if p.returncode:
      raise SystemExit(f"jaxcl run failed:\n{p.stderr[-2000:]}")
    best = min(best, elapsed)
  return best

if __name__ == "__main__":
  main()
