"""FeTrIL's SVM fit: jaxcl's Newton-CG in JAX against liblinear.

FeTrIL (``jaxcl/strategies/fetril.py``) refits one-vs-rest squared-hinge
linear SVMs at every experience's end, on the experience's features and
the past classes' pseudo-features. The authors and Mammoth call
scikit-learn's ``LinearSVC(dual=False)`` (liblinear, one class after
another on the host); jaxcl solves every class at once inside a jitted
call. This script times both on the same L2-normalised rows, at the
shapes of FeTrIL's last fit on two streams:

* ``mnist``: Split MNIST with FeCAM's MLP 400-400: ~12 000 rows of the
  last two classes and 8 past classes' pseudo-features of ~6 000 rows
  each (400 features, 10 classes);
* ``cifar100``: CIFAR-100 B50 Inc10 with a ResNet-32 (64 features): 5 000
  rows of the last 10 classes and 90 past classes of 500 rows (100
  classes).

The rows are Gaussian blobs (one centre per class, normalised), not real
features: the solvers' work depends on the shapes and the margins, and
the script needs no data. Each fit is timed after compilation (jaxcl) as
the median of ``--rounds``; the two answers' largest coefficient gap and
prediction agreement are printed as a check that both solved the same
problem (tol 1e-4, the references').

  python benchmarks/fetril_svm.py [--case mnist|cifar100|both] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.strategies.fetril import linear_svc

CASES = {"mnist": (12_000 + 8 * 6_000, 400, 10),
         "cifar100": (5_000 + 90 * 500, 64, 100)}


def rows(m: int, d: int, k: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, m)
  x = rng.normal(size=(k, d))[y] + 2.0 * rng.normal(size=(m, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def time_jaxcl(x, y, k, rounds):
  fit = jax.jit(linear_svc, static_argnums=(4, 5, 6))
  args = (jnp.asarray(x), jnp.asarray(y), jnp.ones(len(y), bool),
          jnp.ones(k, bool), 1.0, 1e-4, 100)
  jax.block_until_ready(fit(*args))          # compile
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    out = jax.block_until_ready(fit(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), np.asarray(out[0]), np.asarray(out[1])


def time_liblinear(x, y, rounds):
  from sklearn.svm import LinearSVC
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    clf = LinearSVC(penalty="l2", dual=False, C=1.0, tol=1e-4,
                    fit_intercept=True, intercept_scaling=1).fit(x, y)
    times.append(time.perf_counter() - t)
  return statistics.median(times), clf


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--case", default="both", choices=("mnist", "cifar100",
                                                     "both"))
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  print(f"device: {jax.devices()[0].device_kind}")
  for name in (CASES if args.case == "both" else (args.case,)):
    m, d, k = CASES[name]
    x, y = rows(m, d, k)
    ours, coef, b = time_jaxcl(x, y, k, args.rounds)
    theirs, clf = time_liblinear(x, y, max(1, args.rounds // 3))
    gap = np.abs(coef - clf.coef_).max() / np.abs(clf.coef_).max()
    agree = np.mean((x @ coef.T + b).argmax(1) == clf.predict(x))
    print(f"{name}: {m} rows x {d} features, {k} classes: jaxcl "
          f"{ours:.2f} s, liblinear {theirs:.2f} s (ratio "
          f"{theirs / ours:.2f}); largest coefficient gap {gap:.1e} of the "
          f"largest, predictions agree on {agree:.4f}")


if __name__ == "__main__":
  main()
