"""AutoAugment's CIFAR-10 policy: jaxcl's batched JAX function against the
reference's PIL loop.

The reference (DeepVoltaire's ``CIFAR10Policy``, Mammoth's and CNLL's)
runs per image on the host, inside the data loader's workers; jaxcl's
:func:`jaxcl.autoaugment.cifar10_policy` runs on the device, one draw per
row, inside the compiled step. Under ``vmap`` a row's operation is chosen
by a select, so every row computes all 14 operations for each of its two
slots: the price of fixed shapes, paid on the accelerator. This script
times both on random 32 x 32 RGB images (the cost does not depend on the
content): jaxcl's as the median of ``--rounds`` calls after compilation,
the PIL loop (one process, as a single loader worker) over the same rows.

  python benchmarks/autoaugment.py [--batch 256] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import jax
import numpy as np

from jaxcl import autoaugment


# The reference's operations as its SubPolicy writes them, with PIL: the
# tests' transcription (tests/test_autoaugment.py's ``reference``).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                os.pardir, "tests"))
from PIL import Image  # noqa: E402
from test_autoaugment import reference  # noqa: E402


def pil_policy(images: np.ndarray) -> float:
  """Seconds for the reference loop over ``images`` (uint8 ``(N, H, W,
  3)``)."""
  t = time.perf_counter()
  for arr in images:
    img = Image.fromarray(arr, "RGB")
    p1, n1, l1, p2, n2, l2 = random.choice(autoaugment.CIFAR10_POLICY)
    for p, n, lvl in ((p1, n1, l1), (p2, n2, l2)):
      if random.random() < p:
        m = float(autoaugment.RANGES[n][lvl])
        if n in autoaugment._SIGNED:
          m *= random.choice((-1, 1))
        img = reference(n, img, m)
    np.asarray(img)
  return time.perf_counter() - t


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=5)
  a = ap.parse_args()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(a.batch, 32, 32, 3)).astype(np.uint8)
  x = jax.device_put(images.astype(np.float32) / 255.0)
  f = jax.jit(autoaugment.cifar10_policy)
  t = time.perf_counter()
  jax.block_until_ready(f(jax.random.PRNGKey(0), x))
  compile_s = time.perf_counter() - t
  times = []
  for r in range(a.rounds):
    t = time.perf_counter()
    jax.block_until_ready(f(jax.random.PRNGKey(r + 1), x))
    times.append(time.perf_counter() - t)
  ours = statistics.median(times)
  ref = statistics.median(pil_policy(images) for _ in range(a.rounds))
  print(f"backend {jax.default_backend()}, batch {a.batch} of 32x32x3")
  print(f"jaxcl compile: {compile_s:.2f} s")
  print(f"jaxcl: {ours * 1e3:.2f} ms per batch, "
        f"{a.batch / ours:.0f} images/s")
  print(f"PIL loop (one process): {ref * 1e3:.2f} ms per batch, "
        f"{a.batch / ref:.0f} images/s")


if __name__ == "__main__":
  main()
