"""Does L2P's query pass run twice per training step?

L2P's loss hook computes the query ``q(x)`` (a prompt-free pass of the
frozen backbone) again for its key term, because a loss hook gets the
logits and not the model's intermediates; the model's own forward pass
computed the same query to pick the prompts. Both passes are the same
operations on the same operands inside one compiled step, so XLA's common
subexpression elimination may merge them. This script measures whether it
does, from the compiled step's own cost analysis:

* ``step(λ)``: FLOPs of one compiled training step with the key term
  (``λ > 0``, the hook's query pass present) and without it (``λ = 0``);
* ``query``: FLOPs of one query pass alone on the same batch.

If the passes were not merged, ``step(λ) − step(0)`` would be about one
query pass; merged, it is the key term's few dot products. The same step
is then timed (after compilation, median of ``--rounds``) with and
without the key term.

  python benchmarks/prompt_query.py [--batch 32] [--dim 64] [--depth 4]
                                    [--steps 50] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import jaxcl
from jaxcl import experiment, train
from jaxcl.models.vit import L2PViT


def _config(args, lam: float):
  c = jaxcl.default_config()          # Split Digits (8 x 8), no download
  c.model.name = "vit"
  c.model.vit = dict(patch=2, dim=args.dim, depth=args.depth, heads=4,
                     mlp_dim=2 * args.dim, pool_size=10, prompt_length=5,
                     top_k=5)
  c.strategy.name = "l2p"
  c.strategy.l2p = dict(lam=lam)
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.train.batch_size = args.batch
  c.report.progress = False
  return c


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"])


def measure(args, lam: float):
  """(step FLOPs, query FLOPs, ms per step) for the L2P step at ``lam``."""
  c = _config(args, lam)
  s = experiment.setup(c)
  ctx, strategy = s.learner.ctx, s.learner.strategy
  state = experiment.initial_state(s, 0)
  b = args.batch
  exp = s.scenario.experiences[0]
  batch = dict(x=jnp.asarray(exp.train_x[:b]),
               y=jnp.asarray(exp.train_y[:b]),
               task=jnp.zeros(b, jnp.int32), mask=jnp.ones(b, jnp.float32),
               index=jnp.arange(b, dtype=jnp.int32))

  def steps(st, bt):
    def body(st, _):
      st, loss = train.train_step(ctx, strategy, st, bt)
      return st, loss
    return jax.lax.scan(body, st, None, length=args.steps)

  one = jax.jit(lambda st, bt: train.train_step(ctx, strategy, st, bt))
  step_flops = _flops(one.lower(state, batch).compile())
  query = jax.jit(lambda p, x: ctx.model.apply({"params": p}, x,
                                               method=L2PViT.query))
  query_flops = _flops(query.lower(state.params, batch["x"]).compile())
  run = jax.jit(steps)
  jax.block_until_ready(run(state, batch))      # compile
  times = []
  for _ in range(args.rounds):
    t = time.perf_counter()
    jax.block_until_ready(run(state, batch))
    times.append((time.perf_counter() - t) / args.steps * 1e3)
  return step_flops, query_flops, statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--depth", type=int, default=4)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  on, query, ms_on = measure(args, 0.1)
  off, _, ms_off = measure(args, 0.0)
  print(f"device: {jax.devices()[0].device_kind}  batch {args.batch}, ViT "
        f"dim {args.dim} depth {args.depth}, pool 10, N 5, L 5")
  print(f"step FLOPs, key term on (lam 0.1): {on:.4g}")
  print(f"step FLOPs, key term off (lam 0):  {off:.4g}")
  print(f"one query pass alone:              {query:.4g}")
  print(f"difference / query pass: {(on - off) / query:.3f} "
        f"(about 1 if the hook's pass ran again; near 0 if XLA merged it)")
  print(f"ms per step: on {ms_on:.2f}, off {ms_off:.2f} "
        f"(ratio {ms_on / ms_off:.3f})")


if __name__ == "__main__":
  main()
