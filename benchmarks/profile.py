"""Where a strategy's step time goes: a jax.profiler trace, summarised.

Sets up one strategy as ``benchmarks/strategies.py`` does (its family's
protocol, experience 1 after one epoch of experience 0), runs one compiled
experience chunk under ``jax.profiler.trace`` and prints the XLA operations
(fusions, dots, reductions, ...) that took the most time, summed over the
chunk, with their share of the traced device time. The trace itself is kept
(``--trace_dir``) for TensorBoard's profile plugin or Perfetto.

  python benchmarks/profile.py --protocol permuted --strategy gem
  python benchmarks/profile.py --protocol split --strategy ewc --top 20
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import add_data_dir  # noqa: E402

from benchmarks.strategies import PROTOCOLS, prepare  # noqa: E402


def summarise(trace_dir: str, top: int) -> list[tuple[str, float, int]]:
  """``(op name, total ms, count)`` of the longest XLA ops in a trace."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                    recursive=True)
  if not files:
    raise SystemExit(f"no perfetto trace under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total = collections.Counter()
  count = collections.Counter()
  for e in events:
    # Complete events of the XLA executor threads; python / runtime
    # bookkeeping events are named with '::' or start with '$'.
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name = e.get("name", "")
    if "::" in name or name.startswith("$") or name.startswith("Thunk"):
      continue
    total[name] += e["dur"] / 1e3
    count[name] += 1
  return [(n, ms, count[n]) for n, ms in total.most_common(top)]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--protocol", default="permuted", choices=list(PROTOCOLS))
  ap.add_argument("--strategy", default="gem")
  ap.add_argument("--top", type=int, default=15)
  ap.add_argument("--trace_dir", default="")
  add_data_dir(ap)
  args = ap.parse_args()
  rows = {r[0]: r for r in PROTOCOLS[args.protocol]}
  if args.strategy not in rows:
    raise SystemExit(f"unknown strategy {args.strategy!r} for protocol "
                     f"{args.protocol}; valid: {sorted(rows)}")
  _, module, arg, patch = rows[args.strategy]
  learner, state, data, exp = prepare(module, arg, args.data_dir, patch)
  # Warm up (compile) on the first chunk, then trace a second one.
  state, losses, _ = learner.chunk_fn(state, data, exp.num_train, 1, 0, 0)
  np.asarray(losses)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jaxcl_trace_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    state, losses, ran = learner.chunk_fn(state, data, exp.num_train, 1, 1,
                                          0)
    np.asarray(losses)
  steps = int(np.asarray(ran).sum())
  rows = summarise(trace_dir, args.top)
  traced = sum(ms for _, ms, _ in summarise(trace_dir, 10 ** 6))
  print(f"{args.protocol} {args.strategy}: {steps} steps traced; XLA ops "
        f"{traced:.0f} ms in all ({traced / max(steps, 1):.2f} ms/step); "
        f"trace in {trace_dir}")
  print(f"{'ms':>9} {'share':>6} {'calls':>7}  op")
  for name, ms, n in rows:
    print(f"{ms:>9.1f} {100 * ms / traced:>5.1f}% {n:>7}  {name[:90]}")


if __name__ == "__main__":
  main()
