"""Per-strategy speed on Split and Permuted MNIST: steps/s, FLOP/s, compile
vs run time.

For each strategy, its own family's protocol (the committed config) is set
up; experience 0 is trained for one epoch (so memories, Fisher, masks are
populated), then the compiled experience program of experience 1 is timed
on its own: compile time (lower + compile), one warm-up call, then
one timed epoch chunk. FLOPs per step come from XLA's cost analysis of the
compiled program (XLA counts the scan body once, i.e. one step; the figure
includes the strategy's extra work: replay rows, memory gradients,
penalties), set against a large ``jnp.dot``'s measured FLOP/s here.

  python benchmarks/strategies.py [--data_dir ../shared/data] [--only gem]
      [--protocol split permuted overhead cil analytic]

``--smoke`` checks that the script runs: the reference matmul is 512^2
(2 repetitions) instead of 4096^2, so the "% matmul" column means nothing;
choose the rows with ``--protocol`` / ``--only`` (tests/test_benchmarks.py
runs ``--smoke --protocol split --only naive``).

iCaRL is a class-incremental method with no Permuted MNIST protocol of its
own; its Permuted row runs the Split protocol's settings on the permuted
(domain-incremental) stream, for the speed figure only.
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
from benchmarks.common import add_data_dir  # noqa: E402

from benchmarks.throughput import matmul_flops  # noqa: E402  one copy

def _permuted(c):
  """A Split-protocol config run on the permuted stream instead."""
  c.scenario.type, c.scenario.kind, c.scenario.n_experiences = (
      "permuted", "domain", 10)
  return c


def _naive(c):
  """The same protocol (model, optimiser, batch) without the strategy: the
  fair reference for a strategy's overhead per step."""
  c.strategy = type(c.strategy)(dict(name="naive"))
  return c


def _cnn(c):
  """Session 30's LiDER protocol (runs/s30/lider/compare.py; no committed
  config exists): the DER++ protocol at memory 200 with the ``cnn`` model
  (conv 32-64, dense 128) in place of the MLP."""
  c.model.name = "cnn"
  return c


def _naive_cnn(c):
  return _naive(_cnn(c))


def _lider_derpp(c):
  """DER++ on the cnn plus LiDER (its own reservoir of 200, Mammoth's
  ``derpp_lider`` defaults), as compare.py builds it."""
  c = _cnn(c)
  c.strategy.name = "lider+derpp"
  c.strategy.lider = dict(mem_size=200)
  return c


def _aer_abs(c):
  """AER + ABS in ER-ACE's Split MNIST protocol (memory 500, batch 10 +
  10), at 2 epochs instead of one online pass (its alternation needs 2;
  the time per step does not depend on the epoch count)."""
  c.strategy = type(c.strategy)(dict(name="aer_abs",
                                     aer_abs=dict(mem_size=500)))
  c.scenario.online = False  # an online stream is one pass
  c.train.epochs = 2
  return c


def _puridiver(c):
  """PuriDivER in ER-ACE's Split MNIST protocol (memory 500, batch 10 +
  10). Its buffer fitting runs at an experience's end, outside the step
  timed here: 2 fitting epochs keep ``prepare`` short. The memory update
  runs in every step (``freeze_buffer_after_first=False``): by default it
  runs in an experience's first epoch only, which the warm-up call before
  the timed one has used up, so the default would time the cheap step."""
  c.strategy = type(c.strategy)(dict(name="puridiver", puridiver=dict(
      mem_size=500, buffer_fitting_epochs=2,
      warmup_buffer_fitting_epochs=1, freeze_buffer_after_first=False)))
  return c


# protocol -> (name, config module, variant, patch): each strategy in its
# own family's protocol; "naive@x" rows are Naive in the protocol (config)
# of the rows that follow them, and rows of that config print their time
# per step relative to it.
PROTOCOLS = {
    "split": [
        ("naive", "split_mnist_baselines", "strategy=naive", None),
        ("naive@ewc", "split_mnist_regularisation", "strategy=ewc,kind=task",
         _naive),
        ("ewc", "split_mnist_regularisation", "strategy=ewc,kind=task", None),
        ("replay", "split_mnist_replay", "strategy=replay,mem_size=500",
         None),
        ("gem", "split_mnist_hybrid", "strategy=gem,mem_size=500", None),
        ("icarl", "split_mnist_hybrid", "strategy=icarl,mem_size=500", None),
        ("supsup", "split_mnist_architectural", "strategy=supsup,mode=gg",
         None),
    ],
    # DESIGN.md's per-step overhead targets (replay, EWC, SI, LwF <= 1.5x
    # Naive): each strategy against Naive in the very same protocol.
    "overhead": [
        ("naive@reg", "split_mnist_regularisation", "strategy=ewc,kind=task",
         _naive),
        ("ewc", "split_mnist_regularisation", "strategy=ewc,kind=task", None),
        ("si", "split_mnist_regularisation", "strategy=si,kind=task", None),
        ("lwf", "split_mnist_regularisation", "strategy=lwf,kind=task", None),
        ("naive@er", "split_mnist_replay", "strategy=replay,mem_size=500",
         _naive),
        ("replay", "split_mnist_replay", "strategy=replay,mem_size=500",
         None),
        # 10 stored rows with their logits replayed (DER 200), and 10 + 10
        # (DER++ 500): one extra forward pass over them.
        ("der", "split_mnist_replay", "strategy=der,mem_size=200", None),
        ("derpp", "split_mnist_replay", "strategy=derpp,mem_size=500", None),
        # DER++'s rows plus the constraints' maxima and, each step, a
        # forward pass over the replayed rows for the online transplant.
        ("xder", "split_mnist_replay", "strategy=xder,mem_size=500", None),
        # Replay's rows and memory, with the class mask on the incoming rows.
        ("er_ace", "split_mnist_replay", "strategy=er_ace,mem_size=500",
         None),
        # ER-ACE's rows, plus a positive and a negative per incoming row
        # and the contrastive loss on their features.
        ("er_aml", "split_mnist_replay", "strategy=er_aml,mem_size=500",
         None),
        # Replay's rows and memory, plus 10 more memory rows each moved by
        # 2 MI-FGSM steps (a forward and backward pass each) towards an
        # incoming row at the virtually updated parameters; read against
        # Replay's row as well as Naive's.
        ("rar", "split_mnist_replay", "strategy=rar,mem_size=500", None),
        # ER with tricks: Replay's rows with a loss-aware balanced memory
        # (one sequential choice per incoming row) and per-row scores.
        ("er_tricks", "split_mnist_replay",
         "strategy=er_tricks,mem_size=500", None),
        # Replay plus STAR: its own reservoir, 10 rows, one ascent step
        # (a backward pass) and the KL's gradient at the perturbed point.
        ("star+replay", "split_mnist_replay",
         "strategy=replay,plus=star,mem_size=500", None),
        # ER-ACE plus CSCCT: a forward pass of the previous experience's
        # model over the 10 + 10 rows and two small cosine matrices.
        ("cscct+er_ace", "split_mnist_replay",
         "strategy=er_ace,plus=cscct,mem_size=500", None),
        # ER-ACE's rows with a loss-ordered insertion, ABS's sequential
        # slot choice per offered row and a parameter copy per epoch.
        ("aer_abs", "split_mnist_replay", "strategy=er_ace,mem_size=500",
         _aer_abs),
        # Replay's rows (cropped), plus each step an eval-mode forward pass
        # over the 500 + 10 memory and incoming rows, their 510 x 510
        # cosine matrix and 10 sequential drop rounds.
        ("puridiver", "split_mnist_replay", "strategy=er_ace,mem_size=500",
         _puridiver),
        # MIR's protocol (MLP 400-400, online batch 10, memory 500) and its
        # own Naive. MIR: a virtual SGD step, then a forward pass over 50
        # candidates at both parameters, and 10 replayed rows. ASER (the same
        # protocol): two forward passes (eval mode) over its class-balanced
        # subsamples and the incoming rows, a sort of the candidates for each
        # evaluation point, 10 replayed rows; and the KNN-SV memory update,
        # another feature pass and sort, after the step.
        ("naive@mir", "split_mnist_replay", "strategy=mir,mem_size=500",
         _naive),
        ("mir", "split_mnist_replay", "strategy=mir,mem_size=500", None),
        ("aser", "split_mnist_replay", "strategy=aser,mem_size=500", None),
        # GSS's protocol has batch 128 (Mammoth's settings): its own Naive.
        ("naive@gss", "split_mnist_replay", "strategy=gss,mem_size=200",
         _naive),
        ("gss", "split_mnist_replay", "strategy=gss,mem_size=200", None),
        # LiDER + DER++ on the cnn (session 30's comparison; no committed
        # config: split_mnist_replay's DER++ at memory 200, lr 0.03, 128
        # replayed, with model.name='cnn', as runs/s30/lider/compare.py):
        # its own Naive and DER++ on the same cnn. LiDER adds a forward
        # pass over 2 x 10 of its own memory's rows and 10 power iterations
        # per layer pair. ``subset=10000`` (~200 steps per experience) keeps
        # the three rows to minutes on a CPU; the time per step does not
        # depend on the stream's length (batch and memory are fixed).
        ("naive@cnn", "split_mnist_replay",
         "strategy=derpp,mem_size=200,subset=10000", _naive_cnn),
        ("derpp_cnn", "split_mnist_replay",
         "strategy=derpp,mem_size=200,subset=10000", _cnn),
        ("lider+derpp", "split_mnist_replay",
         "strategy=derpp,mem_size=200,subset=10000", _lider_derpp),
    ],
    # The exemplar-based class-incremental methods, each against Naive in
    # the hybrid Split MNIST protocol (batch 10 + 10 exemplars).
    "cil": [
        ("naive@cil", "split_mnist_hybrid", "strategy=icarl,mem_size=500",
         _naive),
        ("icarl", "split_mnist_hybrid", "strategy=icarl,mem_size=500", None),
        ("bic", "split_mnist_hybrid", "strategy=bic,mem_size=500", None),
        ("lucir", "split_mnist_hybrid", "strategy=lucir,mem_size=500", None),
        ("il2m", "split_mnist_hybrid", "strategy=il2m,mem_size=500", None),
        # EEIL's step (its balanced fine-tuning runs once per experience,
        # outside the timed program; its rows' wall times include it).
        ("eeil", "split_mnist_hybrid", "strategy=eeil,mem_size=500", None),
    ],
    # Deep SLDA against Naive on its stream (batch 10): the covariance's
    # D x D update per step, on the 784 pixels and on a 100-unit backbone.
    "analytic": [
        ("naive@slda", "split_mnist_analytic", "features=input", _naive),
        ("slda", "split_mnist_analytic", "features=input", None),
        ("slda_backbone", "split_mnist_analytic", "features=backbone", None),
        # FeCAM's protocol has an MLP 400-400 and SGD 0.01: its own Naive.
        # From experience 1 on (the timed one) its step still runs the
        # forward and backward pass, then restores the frozen parameters.
        ("naive@fecam", "split_mnist_analytic", "strategy=fecam", _naive),
        ("fecam", "split_mnist_analytic", "strategy=fecam", None),
    ],
    "permuted": [
        ("naive", "permuted_mnist_baselines", "strategy=naive", None),
        ("naive@ewc", "permuted_mnist_regularisation", "strategy=ewc",
         _naive),
        ("ewc", "permuted_mnist_regularisation", "strategy=ewc", None),
        ("hypernetwork", "permuted_mnist_regularisation",
         "strategy=hypernetwork", None),
        ("replay", "permuted_mnist_replay", "strategy=replay,mem_size=500",
         None),
        ("gem", "permuted_mnist_hybrid", "strategy=gem,mem_size=500", None),
        ("icarl", "split_mnist_hybrid", "strategy=icarl,mem_size=500",
         _permuted),
        ("supsup", "permuted_mnist_architectural",
         "strategy=supsup,mode=gg,width=256", None),
    ],
}


def prepare(module: str, arg: str, data_dir: str, patch=None):
  """The learner and the state at the start of experience 1, after one
  epoch of experience 0 (all of them for AER + ABS); returns ``(learner,
  state, data, exp)``."""
  from jaxcl import experiment, train

  c = importlib.import_module(f"experiments.{module}").get_config(arg)
  if patch is not None:
    c = patch(c)
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

  # One epoch of experience 0, so that experience 1 sees a populated
  # strategy (memories, Fisher, masks); a strategy that follows the epochs
  # (AER) is given all of them, as its end-of-experience check demands.
  state = begin(state, 0)
  exp = sc.experiences[0]
  data = jax.device_put(train.device_experience(exp, size))
  epochs = learner.epochs if "aer_abs" in c.strategy.name else 1
  for epoch in range(epochs):
    for start in range(0, learner.epoch_steps, learner.chunk_steps):
      state, _, _ = learner.chunk_fn(state, data, exp.num_train, 0, epoch,
                                     start)
  state = train.unalias(strategy.after_experience(ctx, state, exp))
  state = begin(state, 1)
  exp = sc.experiences[1]
  data = jax.device_put(train.device_experience(exp, size))
  return learner, state, data, exp


def measure(name: str, module: str, arg: str, data_dir: str,
            patch=None) -> dict:
  learner, state, data, exp = prepare(module, arg, data_dir, patch)
  ctx = learner.ctx

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
  add_data_dir(ap)
  ap.add_argument("--only", nargs="*", default=[])
  ap.add_argument("--protocol", nargs="*", default=list(PROTOCOLS),
                  choices=list(PROTOCOLS))
  ap.add_argument("--smoke", action="store_true",
                  help="a 512^2 reference matmul (the %% matmul column is "
                       "then meaningless): checks that the script runs")
  args = ap.parse_args()
  n = 512 if args.smoke else 4096
  peak = matmul_flops(n, 2) if args.smoke else matmul_flops()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"dense matmul {n}^2 f32: {peak / 1e9:.1f} GFLOP/s")
  print(f"{'protocol':>8} {'strategy':>9} {'batch':>5} {'steps':>6} "
        f"{'compile s':>9} "
        f"{'run s':>7} {'steps/s':>8} {'MFLOP/step':>10} {'GFLOP/s':>8} "
        f"{'% matmul':>8} {'x naive':>7}")
  for proto in args.protocol:
    ref = None  # (config, steps/s) of the last naive@ row
    for name, module, arg, patch in PROTOCOLS[proto]:
      if args.only and name not in args.only:
        continue
      r = measure(name, module, arg, args.data_dir, patch)
      if name.startswith("naive@"):
        ref = (module, r["steps_per_s"])
      same = ref and ref[0] == module and not name.startswith("naive")
      ratio = (f"{ref[1] / r['steps_per_s']:>6.2f}x" if same
               else f"{'':>7}")
      print(f"{proto:>8} {r['name']:>9} {r['batch']:>5} {r['steps']:>6} "
            f"{r['compile_s']:>9.2f} {r['run_s']:>7.2f} "
            f"{r['steps_per_s']:>8.0f} {r['flops_per_step'] / 1e6:>10.1f} "
            f"{r['flop_per_s'] / 1e9:>8.2f} "
            f"{100 * r['flop_per_s'] / peak:>7.1f}% {ratio}", flush=True)


if __name__ == "__main__":
  main()
