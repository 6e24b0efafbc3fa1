"""A convolutional network's training step inside ``lax.scan`` against the
same step jitted alone, on the current backend.

jaxcl compiles each epoch into one ``lax.scan``. Session 26 found CNN runs
on this 2-core CPU ~3x slower than their step's time predicts; this script
isolates why: the forward pass costs the same in a scan as alone, the
gradient of flax's ``nn.Conv`` (``--conv lax``) does not. Session 27's
``jaxcl.models.conv`` (``--conv jaxcl``, what the models use) writes the
gradient with canonical convolutions and runs as fast in a scan.

  python benchmarks/conv_in_scan.py [--steps 40] [--channels 16 32]
      [--batch 128] [--runs 5] [--conv jaxcl|lax]
      [--models cnn mlp resnet18 resnet32]

Prints ms per step for: the forward pass alone and in a scan; the gradient
alone and in a scan; the full training step (Adam) in a Python loop of
jitted calls and in a scan; and, for reference, an MLP's training step
both ways; and a ``--runs``-run sweep's step (the step vmapped over the
runs' states) against that many plain steps. Synthetic 28x28 inputs
(the cost does not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxcl import models, scenarios, train  # noqa: E402
from jaxcl.models import cnn, resnet  # noqa: E402
from jaxcl.strategy import identity  # noqa: E402


def _stream(n: int):
  rng = np.random.default_rng(0)
  x = rng.random((n, 28, 28, 1), np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  return scenarios.from_arrays([(x, y)], [(x[:100], y[:100])])


def _timed(fn, *args, reps: int = 1) -> float:
  jax.block_until_ready(fn(*args))   # compile, warm up
  t = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--channels", type=int, nargs="+", default=[16, 32])
  ap.add_argument("--runs", type=int, default=5,
                  help="runs of the vmapped sweep step (1: skip it)")
  ap.add_argument("--models", nargs="+", default=["cnn", "mlp"],
                  choices=("cnn", "mlp", "resnet18", "resnet32"))
  ap.add_argument("--conv", choices=("jaxcl", "lax"), default="jaxcl",
                  help="the CNN's convolution: jaxcl.models.conv (the "
                       "default), or flax's nn.Conv on lax's gradient")
  args = ap.parse_args()
  if args.conv == "lax":
    # This process only: the models as before session 27.
    cnn.Conv = resnet.Conv = nn.Conv
  n, b = args.steps, args.batch
  sc = _stream(n * b)
  info = train.stream_info(sc, b)
  xs = jnp.asarray(sc.experiences[0].train_x)
  ys = jnp.asarray(sc.experiences[0].train_y)

  def batch(i):
    return {"x": jax.lax.dynamic_slice_in_dim(xs, i * b, b),
            "y": jax.lax.dynamic_slice_in_dim(ys, i * b, b),
            "task": jnp.zeros((b,), jnp.int32),
            "mask": jnp.ones((b,), jnp.float32)}

  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
        f"batch {b}, {n} steps per measurement, conv {args.conv}")
  sizes = {"cnn": dict(channels=tuple(args.channels), hidden=128),
           "mlp": dict(widths=(400, 400)), "resnet18": dict(width=20),
           "resnet32": dict(shortcut="conv")}
  for m in args.models:
    name = f"{m} {sizes[m]}"
    model = models.build(m, 10, **sizes[m])
    ctx = train.make_context(model, train.make_optimizer("adam", 1e-3), info)
    s = identity()
    state = train.init_state(ctx, s, 0)
    p = state.params
    steps = jnp.arange(n)

    def loss(p, i):
      bt = batch(i)
      out = ctx.logits(p, state.model_state, bt["x"], bt["task"], train=True)
      return jnp.sum(out.astype(jnp.float32) ** 2)

    fwd1 = jax.jit(lambda p, i: loss(p, i))
    fwds = jax.jit(lambda p: jax.lax.scan(
        lambda c, i: (c + loss(p, i), None), 0.0, steps)[0])
    leaf_sum = lambda g: sum(jnp.sum(a) for a in jax.tree.leaves(g))
    grad1 = jax.jit(lambda p, i: leaf_sum(jax.grad(loss)(p, i)))
    grads = jax.jit(lambda p: jax.lax.scan(
        lambda c, i: (c + leaf_sum(jax.grad(loss)(p, i)), None), 0.0,
        steps)[0])
    step1 = jax.jit(lambda st, i: train.train_step(ctx, s, st, batch(i)))

    def step_loop(st):
      # The state threads through the calls, as in a training loop (a
      # call returning only the loss would let XLA drop the update).
      for i in range(n):
        st, out = step1(st, i)
      return out
    stepscan = jax.jit(lambda st: jax.lax.scan(
        lambda c, i: train.train_step(ctx, s, c, batch(i)), st, steps)[1])

    def loop(fn, *a):
      return [fn(*a, i) for i in range(n)][-1]

    rows = [
        ("forward, jitted alone", _timed(loop, fwd1, p) / n),
        ("forward, in a scan", _timed(fwds, p) / n),
        ("gradient, jitted alone", _timed(loop, grad1, p) / n),
        ("gradient, in a scan", _timed(grads, p) / n),
        ("train step, loop of jitted calls", _timed(step_loop, state) / n),
        ("train step, in a scan", _timed(stepscan, state) / n),
    ]
    print(f"\n{name}")
    for label, sec in rows:
      print(f"  {label:34s} {sec * 1e3:8.2f} ms/step")
    print(f"  scan / alone: forward {rows[1][1] / rows[0][1]:.2f}x, "
          f"gradient {rows[3][1] / rows[2][1]:.2f}x, "
          f"step {rows[5][1] / rows[4][1]:.2f}x")
    if args.runs > 1:
      # A sweep's step: the same step vmapped over K runs' states (each
      # its own init), jitted alone, against K plain steps.
      k = args.runs
      states = jax.vmap(lambda key: train.init_state(ctx, s, 0).replace(
          params=train.init_variables(ctx, key)[0]))(
              jax.random.split(jax.random.PRNGKey(1), k))
      vstep = jax.jit(jax.vmap(lambda st, i: train.train_step(
          ctx, s, st, batch(i)), in_axes=(0, None)))

      def vloop(sts):
        for i in range(n):
          sts, out = vstep(sts, i)
        return out

      sweep = _timed(vloop, states) / n
      print(f"  {k}-run vmapped step, jitted alone   {sweep * 1e3:8.2f} "
            f"ms/step ({sweep / (k * rows[4][1]):.2f}x {k} plain steps)")


if __name__ == "__main__":
  main()
