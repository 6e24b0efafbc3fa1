"""Host memory and time to build a transformed MNIST stream and walk it.

For each case a fresh subprocess builds the stream, stacks its test sets
(as a run does for evaluation) and then takes every experience's padded
training arrays in order (as the training loop does), and prints the build
time, the walk time and the process's peak resident memory. The MNIST
arrays themselves (60,000 + 10,000 float32 images, 220 MB) are part of
every figure.

  python benchmarks/stream_memory.py [--data_dir ../shared/data]
                                     [--cases permuted20,rotated20,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import add_data_dir  # noqa: E402

CASES = ("permuted20", "rotated20", "cumulative_permuted10")


def build(case: str, data):
  from jaxcl import scenarios
  return {
      "permuted20": lambda: scenarios.permuted(data, 20),
      "rotated20": lambda: scenarios.rotated(data, 20,
                                             interpolation="nearest"),
      "cumulative_permuted10": lambda: scenarios.cumulative(
          scenarios.permuted(data, 10)),
  }[case]()


def one(case: str, data_dir: str) -> dict:
  from jaxcl import datasets, train
  data = datasets.load("mnist", data_dir=data_dir)
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  sc = build(case, data)
  t1 = time.perf_counter()
  test = train.test_arrays(sc.eval_experiences, 1000)
  size = max(e.num_train for e in sc.experiences)
  for e in sc.experiences:
    train.device_experience(e, size)
  t2 = time.perf_counter()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  del test
  return {"case": case, "build_s": t1 - t0, "walk_s": t2 - t1,
          "data_mb": base, "peak_mb": peak}


def main() -> None:
  ap = argparse.ArgumentParser()
  add_data_dir(ap)
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--one", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.one:
    print(json.dumps(one(a.one, a.data_dir)))
    return
  cases = a.cases.split(",")
  bad = [c for c in cases if c not in CASES]
  if bad:
    raise SystemExit(f"unknown case(s) {bad}; valid: {list(CASES)}")
  print(f"{'case':24s} {'build s':>8s} {'walk s':>7s} {'MNIST MB':>9s} "
        f"{'peak MB':>8s}")
  for case in cases:
    out = subprocess.run([sys.executable, __file__, "--one", case,
                          "--data_dir", a.data_dir], check=True,
                         capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"{case:24s} {r['build_s']:8.1f} {r['walk_s']:7.1f} "
          f"{r['data_mb']:9.0f} {r['peak_mb']:8.0f}")


if __name__ == "__main__":
  main()
