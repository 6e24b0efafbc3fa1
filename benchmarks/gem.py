"""GEM and A-GEM time per training step against Naive on Permuted MNIST.

For each protocol, the memory is first filled as it is at the *last* of
the 20 experiences (19 past experiences: the most constraints GEM ever
has), then one experience's compiled training program (a ``lax.scan`` of
steps) is timed after compilation, for Naive, GEM and A-GEM. Printed per
method: milliseconds per step and the ratio to Naive, and the time of the
dual QP solve alone (19 constraints, inside jit). GEM's step grows with the
number of past experiences (it differentiates each past memory block), so
it is also timed at experience 10 of 20 (10 past experiences) and, with
``--stream``, at every block size its step can run, for the mean step
over the stream (experience 10 alone understates it: experiences 11-19
run 15 or 20 blocks).

Protocols:

* ``chaudhry``: Chaudhry et al. 2019 (A-GEM paper): MLP 784-256-256-10,
  batch 10, SGD, 250 memory examples per experience (GEM uses all 19 x 250
  each step; ``gem/s10`` 10 drawn per experience and step; A-GEM a
  256-example sample).
* ``buzzega``: Buzzega et al. 2020: MLP 784-100-100-10, batch 128, memory
  200 or 500 in total (10 / 25 per experience).

  python benchmarks/gem.py [--data_dir ../shared/data] [--steps 200]
                           [--protocols chaudhry] [--runs 3] [--rounds 3]

``--stream`` also times GEM at one experience for each block size its
step can run (0, 5, 10, 15 and 20 past blocks) and prints the mean step
over the 20 experiences, each weighted by the experiences that run it.

``--runs k`` also times GEM at experience 10 as a sweep's program (k
stacked runs under one ``vmap``), per step and run: it should cost about
what the plain program does.

Every program of a protocol is compiled first, then all are timed in
``--rounds`` interleaved rounds of ``--reps`` runs and the best time of
each is printed: on a shared machine a slow spell then hits every program
alike instead of one (single timings here vary by 10-25 %).

Only the training-set size per experience is reduced (``--steps`` x batch
examples, the same for every method), which does not change the cost of a
step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import add_data_dir  # noqa: E402

from jaxcl import datasets, models, scenarios, train  # noqa: E402
from jaxcl.strategies._qp import solve_box_qp  # noqa: E402
from jaxcl.strategies.agem import agem  # noqa: E402
from jaxcl.strategies.gem import gem, row_buckets  # noqa: E402
from jaxcl.strategy import identity  # noqa: E402

PROTOCOLS = {
    "chaudhry": dict(widths=(256, 256), batch=10, lr=0.03,
                     methods={"gem": dict(mem_per_experience=250),
                              "gem/s10": dict(mem_per_experience=250,
                                              sample_per_experience=10),
                              "gem/s10stk": dict(mem_per_experience=250,
                                                 sample_per_experience=10,
                                                 gram="stacked"),
                              "agem": dict(mem_per_experience=250,
                                           sample_size=256)}),
    "buzzega200": dict(widths=(100, 100), batch=128, lr=0.2,
                       methods={"gem": dict(mem_size=200),
                                "gem/stk": dict(mem_size=200,
                                                gram="stacked"),
                                "agem": dict(mem_size=200)}),
    "buzzega500": dict(widths=(100, 100), batch=128, lr=0.2,
                       methods={"gem": dict(mem_size=500),
                                "gem/stk": dict(mem_size=500,
                                                gram="stacked"),
                                "agem": dict(mem_size=500)}),
}


# One learner per (stream, protocol, strategy, runs): GEM timed at several
# experiences runs one program (the experience is an argument, and GEM's
# block count a switch inside it), compiled once.
_LEARNERS: dict = {}


def _learner(sc, proto, strategy, runs: int):
  """``(ctx, learner)`` of ``strategy`` on ``sc`` under ``proto``, made
  once per combination (the key's objects are kept alive with it)."""
  key = (id(sc), id(proto), id(strategy), runs)
  if key not in _LEARNERS:
    info = train.stream_info(sc, proto["batch"])
    model = models.build("mlp", 10, widths=proto["widths"])
    ctx = train.make_context(
        model, train.make_optimizer("sgd", proto["lr"]), info)
    learner = dataclasses.replace(
        train.make_learner(ctx, strategy, epochs=1), members=runs)
    _LEARNERS[key] = (sc, proto, strategy, ctx, learner)
  return _LEARNERS[key][3:]


def compiled_chunk(sc, proto, strategy, at: int = -1, runs: int = 0):
  """A zero-argument function that runs experience ``at``'s compiled
  program once (default the last) and returns its seconds per step (per
  run with ``runs``), after the earlier experiences filled the memory.
  With ``runs`` > 0, the program of a sweep: ``runs`` stacked states
  (seeds 0..runs-1) under one ``vmap``."""
  ctx, learner = _learner(sc, proto, strategy, runs)
  exps = sc.experiences
  at = at % len(exps)
  cur = exps[at]

  def filled(seed):
    state = train.init_state(ctx, strategy, seed)
    for e in exps[:at]:  # fill the memory as after `at` experiences
      state = strategy.before_experience(ctx, state, e)
      state = strategy.after_experience(ctx, state, e)
    return train.unalias(strategy.before_experience(ctx, state, cur))

  state = (filled(0) if not runs else jax.tree.map(
      lambda *xs: jnp.stack(xs), *[filled(i) for i in range(runs)]))
  data = jax.device_put(train.device_experience(cur, ctx.info.train_size))
  args = (data, cur.num_train, at, 0, 0)

  def run() -> float:
    nonlocal state  # the chunk donates its input state
    t = time.perf_counter()
    state, losses, _ = learner.chunk_fn(state, *args)
    losses.block_until_ready()
    return (time.perf_counter() - t) / learner.epoch_steps / max(runs, 1)

  run()  # compile
  return run


def time_programs(programs: dict, rounds: int, reps: int) -> dict:
  """Best seconds per step of each program over ``rounds`` rounds of
  ``reps`` runs each, the programs interleaved round by round so that a
  slow spell of a shared machine hits all of them alike."""
  best = {k: np.inf for k in programs}
  for _ in range(rounds):
    for k, run in programs.items():
      for _ in range(reps):
        best[k] = min(best[k], run())
  return best


E = 20  # experiences of the benchmark's Permuted MNIST stream


def stream_mean(best: dict, m: str) -> float:
  """GEM's mean time per step over the stream: experience ``e`` runs the
  program of the smallest block size ``>= e`` (:func:`row_buckets`),
  timed at experience ``k`` for size ``k`` and at the last for ``E``."""
  sizes = row_buckets(E)
  per = []
  for e in range(E):
    k = min(k for k in sizes if k >= e)
    per.append(best[m] if k == E else best[f"{m}@{k}"])
  return float(np.mean(per))


def time_qp(k: int = 19, p_dim: int = 50_000, reps: int = 200) -> float:
  """Seconds per dual QP solve (k constraints, a conflicting gradient)."""
  rng = np.random.default_rng(0)
  g_mat = rng.normal(size=(k, p_dim)).astype(np.float32)
  g_mat += 2 * rng.normal(size=(1, p_dim)).astype(np.float32)
  g = -0.3 * g_mat[:5].sum(0) + rng.normal(size=p_dim).astype(np.float32)
  p = jnp.asarray(g_mat @ g_mat.T + 1e-3 * np.eye(k), jnp.float32)
  q = jnp.asarray(g_mat @ g)

  @jax.jit
  def many(p, q):
    def body(c, i):
      res = solve_box_qp(p, q + 1e-3 * i, 0.5)
      return c + res.v.sum() + res.iterations, None
    return jax.lax.scan(body, 0.0, jnp.arange(reps, dtype=jnp.float32))[0]

  many(p, q).block_until_ready()
  t = time.perf_counter()
  many(p, q).block_until_ready()
  return (time.perf_counter() - t) / reps


def main() -> None:
  ap = argparse.ArgumentParser()
  add_data_dir(ap)
  ap.add_argument("--steps", type=int, default=200,
                  help="training steps per experience (timed program)")
  ap.add_argument("--reps", type=int, default=3,
                  help="timed runs of each program per round")
  ap.add_argument("--rounds", type=int, default=3,
                  help="rounds over all of a protocol's programs (the best "
                       "time of each is printed)")
  ap.add_argument("--protocols", default="chaudhry,buzzega200,buzzega500")
  ap.add_argument("--stream", action="store_true",
                  help="also time GEM at one experience per block size and "
                       "print its mean step over the whole stream")
  ap.add_argument("--runs", type=int, default=0,
                  help="also time GEM as a sweep of this many vmapped runs "
                       "(per step and run), against the plain program")
  args = ap.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"jax {jax.__version__}")
  print(f"dual QP alone (19 constraints, in jit): "
        f"{time_qp() * 1e6:.1f} us/solve")
  mnist = datasets.load("mnist", data_dir=args.data_dir)
  for name in args.protocols.split(","):
    proto = PROTOCOLS[name]
    n = args.steps * proto["batch"]
    data = mnist.subset(max(n, 2500), 500, seed=0)
    sc = scenarios.permuted(data, E, kind="domain", seed=0)
    sc = dataclasses.replace(sc, experiences=[
        dataclasses.replace(e, inputs=scenarios.given(e.train_x[:n],
                                                      e.test_x),
                            train_y=e.train_y[:n],
                            train_task=e.train_task[:n])
        for e in sc.experiences])
    programs, notes = {"naive": compiled_chunk(sc, proto, identity())}, {}
    for m, kw in proto["methods"].items():
      s = (agem if m == "agem" else gem)(**kw)
      programs[m], notes[m] = compiled_chunk(sc, proto, s), str(kw)
      if m.startswith("gem"):
        programs[m + "@10"] = compiled_chunk(sc, proto, s, at=10)
        notes[m + "@10"] = "experience 10 (10 past experiences)"
        if args.stream:  # one experience per block size GEM can run
          for k in row_buckets(E)[:-1]:
            if k != 10:
              programs[f"{m}@{k}"] = compiled_chunk(sc, proto, s, at=k)
        if args.runs:
          k = f"{m}@10x{args.runs}"
          programs[k] = compiled_chunk(sc, proto, s, at=10, runs=args.runs)
          notes[k] = f"a sweep of {args.runs} vmapped runs, per run"
    best = time_programs(programs, args.rounds, args.reps)
    print(f"\n{name}: MLP {proto['widths']}, batch {proto['batch']}, "
          f"{args.steps} steps timed, best of {args.rounds} x {args.reps}")
    for k, t in best.items():
      print(f"  {k:14s} {t * 1e3:8.3f} ms/step {t / best['naive']:6.2f}x"
            f"   {notes.get(k, '')}")
    if args.stream:
      for m in proto["methods"]:
        if m.startswith("gem"):
          t = stream_mean(best, m)
          print(f"  {m + ' mean':14s} {t * 1e3:8.3f} ms/step "
                f"{t / best['naive']:6.2f}x   mean step over the {E} "
                "experiences (each runs the smallest block size >= its "
                "past)")


if __name__ == "__main__":
  main()
