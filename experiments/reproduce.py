"""Reproduce the results table: every method against its published number.

Runs each entry of :data:`ENTRIES` (a committed config file, its variant
argument, the published number and its source) with several seeds as one
vmapped sweep, resumably (each entry has its own checkpointed run directory
and a finished entry is not run again), and writes ``RESULTS.md`` — one
table per protocol with jaxcl's mean ± standard error next to the published
number, BWT, forgetting and wall time — plus one PNG per table of average
accuracy over experiences. The report names the commit it ran.

  python -m experiments.reproduce                       # everything, 3 seeds
  python -m experiments.reproduce --only split_mnist --seeds 5
  python -m experiments.reproduce --smoke --out /tmp/smoke   # tiny, 1 seed

``--only`` runs only entries whose id or table contains any of the given
substrings (the report still shows every entry, the others from their
stored records); ``--skip`` lists matching entries as not run unless a
finished result can be reused (for runs too long for the machine);
``--report_only`` runs nothing and writes the report from the stored
results. A finished entry run with at least the requested seeds is
reused; ``--any_seeds`` reuses finished entries run with any seed count
(their rows say how many seeds). ``--data_dir`` (default ``$JAXCL_DATA_DIR`` or
``../shared/data``) holds the MNIST / Fashion-MNIST IDX files.

Finished results are stored as one small JSON record per entry in
``experiments/results/<entry id>.json`` (``--results``), which is
committed: a fresh checkout writes the same report without re-running
hours of experiments, and a record is reused only while its config's
fingerprint is unchanged. Checkpoints of unfinished runs stay in
``--workdir`` (``runs/``, not committed). An entry whose seeds run one
after another (``scenario_per_seed`` / ``sequential``) keeps the finished
seeds of its record when asked for more: ``--seeds 10`` after a 3-seed
record runs seeds 3-9 only, and the row names the kept seeds' commit.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from typing import Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = "figures"  # the report's plots, beside RESULTS.md


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the results: a method on a protocol.

  Attributes:
    table: the protocol (one table per protocol).
    method: the row's name.
    config: module in ``experiments/`` defining ``get_config(arg)``.
    arg: its variant argument (``quick`` is appended in smoke mode).
    published: the published accuracy (fraction), or None for reference
      rows.
    source: where the published number comes from.
    note: why jaxcl falls short of ``published`` by more than 1.5 points,
      if it does (what differs in the protocol, what was tried); printed
      under the table.
    scenario_per_seed: each seed gets its own scenario draw (permutations,
      angles: ``config.scenario.seed = seed``), as Mammoth and Avalanche
      draw one per run; the seeds then run one after another instead of as
      one vmapped sweep, which shares the data and so the draw.
    sequential: the seeds run one after another as plain programs, on the
      shared scenario draw (as a vmapped sweep would; always so for a
      config with ``optimizer.schedule='plateau'``): for long entries
      whose sweep program costs more per run than a plain one, where a
      vmap buys nothing on a CPU (each seed's arithmetic is the cost). The
      Chaudhry-protocol GEM row is run so: its 3-run sweep took 7-9 min
      per experience at experiences 1-2 here, against 1.5 min on average
      for a plain run; since GEM's past-block loop has an unbatched trip
      count the sweep costs ~1.25x a plain run per run (benchmarks/gem.py
      --runs 3).
    pretrain: for methods over a pretrained backbone (Piggyback): the
      variant argument of the same config module whose run (seed 0) gives
      the backbone; its final params are saved once and passed to the entry
      as ``pretrained=<file>``.
    metric: what the row's accuracy column reports (:data:`METRICS`):
      ``acc``, the final accuracy averaged over the test sets (the
      default), or the average incremental accuracy, or either pooled
      over the test examples (``*_pooled``: LUCIR's and PyCIL's figures on
      streams whose experiences differ in size); the table's title says
      which. Computed from the stored matrices and test-set sizes.
  """
  table: str
  method: str
  config: str
  arg: str
  published: float | None = None
  source: str = ""
  note: str = ""
  scenario_per_seed: bool = False
  sequential: bool = False
  pretrain: str = ""
  metric: str = "acc"

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f"Entry {self.method!r}: metric must be one of "
                       f"{list(METRICS)}, got {self.metric!r}")

  @property
  def id(self) -> str:
    return f"{self.config}__{_safe(self.arg)}"


# The accuracy columns an entry may report (Entry.metric).
METRICS = ("acc", "inc_acc", "acc_pooled", "inc_acc_pooled")


def entry_metric(record: dict, metric: str):
  """``(mean, se)`` of ``metric`` over a record's seeds, from its stored
  matrices (and test-set sizes, for the pooled ones); ``record['acc']``
  for ``acc``; None when the record lacks what it needs."""
  if metric == "acc":
    return record["acc"]
  from jaxcl import metrics, sweep
  sizes = record.get("test_sizes")
  if "accuracy" not in record or (metric.endswith("_pooled") and
                                  sizes is None):
    return None
  per_seed = []
  for a in record["accuracy"]:
    s = metrics.summary(np.asarray(a), sizes=sizes)
    # Equal sizes: the pooled figures are the plain ones.
    per_seed.append({metric: s.get(metric,
                                   s[metric.replace("_pooled", "")])})
  return sweep.summarise(per_seed)[metric]


def _safe(s: str) -> str:
  """``s`` as a file name (and config argument) part."""
  return "".join(c if c.isalnum() else "_" for c in s)


# The published anchors named in the project's issues; each config's
# docstring states its protocol in full.
_SM_BASE = "Split MNIST (5x2), MLP 2x400, 2 epochs, batch 128"
ENTRIES: list[Entry] = [
    Entry(f"{_SM_BASE}, class-incremental", "Naive", "split_mnist_baselines",
          "strategy=naive"),
    Entry(f"{_SM_BASE}, class-incremental", "Joint", "split_mnist_baselines",
          "strategy=joint"),
    Entry(f"{_SM_BASE}, class-incremental", "Cumulative",
          "split_mnist_baselines", "strategy=cumulative"),
    Entry(f"{_SM_BASE}, class-incremental", "Ensemble",
          "split_mnist_baselines", "strategy=ensemble"),
    Entry(f"{_SM_BASE}, task-incremental", "Naive", "split_mnist_baselines",
          "strategy=naive,kind=task"),
    Entry(f"{_SM_BASE}, task-incremental", "Ensemble",
          "split_mnist_baselines", "strategy=ensemble,kind=task"),
    Entry(f"{_SM_BASE}, class-incremental", "Freezing (FACIL)",
          "split_mnist_baselines", "strategy=freezing"),
    Entry(f"{_SM_BASE}, task-incremental", "Freezing (FACIL)",
          "split_mnist_baselines", "strategy=freezing,kind=task"),
    Entry(f"{_SM_BASE}, class-incremental", "From scratch (Avalanche)",
          "split_mnist_baselines", "strategy=from_scratch"),
    Entry(f"{_SM_BASE}, task-incremental", "From scratch (Avalanche)",
          "split_mnist_baselines", "strategy=from_scratch,kind=task"),
    Entry("Permuted MNIST (10), MLP 2x1000, 1 epoch, domain-incremental",
          "Naive", "permuted_mnist_baselines", "strategy=naive"),
]


def _load_more_entries() -> None:
  """Strategy families register their rows in ``experiments/<family>_
  entries.py`` modules exposing ``ENTRIES`` (kept beside their configs)."""
  here = os.path.dirname(os.path.abspath(__file__))
  for name in sorted(os.listdir(here)):
    if name.endswith("_entries.py"):
      mod = importlib.import_module(f"experiments.{name[:-3]}")
      for e in mod.ENTRIES:
        if e not in ENTRIES:
          ENTRIES.append(e)


def _commit(repo: str = REPO) -> str:
  """HEAD, marked when ``jaxcl/`` or ``experiments/`` has uncommitted
  changes. The results directory is left out: an invocation writes its
  entries' records there one after another, and a record written a moment
  before is not a change to the code the next entry runs."""
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--",
                            "jaxcl", "experiments",
                            ":(exclude)experiments/results"], cwd=repo,
                           capture_output=True, text=True).stdout.strip()
    return sha + (" (with uncommitted changes)" if dirty else "")
  except OSError:
    return "unknown"


def _machine() -> str:
  import jax
  dev = jax.devices()[0]
  return (f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {dev.platform} ({dev.device_kind}) "
          f"x{jax.device_count()}")


def _no_data(name: str, why: str) -> str:
  return f"data set {name} not available here ({why[:100]}...)"


def run_entry(entry: Entry, seeds: Sequence[int], workdir: str,
              data_dir: str, smoke: bool, any_seeds: bool = False,
              skip: str | None = None, record: str | None = None) -> dict:
  """Runs (or reuses the finished result of) one entry.

  A finished result (the JSON file ``record``, by default ``entry.json``
  in ``workdir``) is reused when its config is unchanged and it ran
  ``seeds`` or more (or, with ``any_seeds``, any seeds: for entries too
  long to repeat; the report then names their seeds). With ``skip`` (the
  reason) an entry without such a result is reported as not run instead of
  run: as missing its data set where that is so, else with ``skip``.
  """
  from jaxcl import checkpoint, datasets, metrics, sweep

  mod = importlib.import_module(f"experiments.{entry.config}")
  quick = ",quick" if smoke else ""
  arg = entry.arg + quick
  backbone = ""
  if entry.pretrain:
    backbone = os.path.join(os.path.dirname(os.path.abspath(workdir)),
                            "_pretrained",
                            f"{entry.config}__{_safe(entry.pretrain + quick)}"
                            ".npz")
    arg += f",pretrained={backbone}"
  config = mod.get_config(arg)
  config.dataset.data_dir = config.dataset.data_dir or data_dir
  config.report.progress = False
  fp = checkpoint.fingerprint(config)
  if backbone:  # the backbone is named by its run, not by where it lies
    fp = {k: (f"<{entry.config}.py:{entry.pretrain}{quick}>"
              if v == backbone else v) for k, v in fp.items()}
  if entry.scenario_per_seed:
    fp["reproduce.scenario_per_seed"] = True
  # The plateau schedule decides per run on the host: its seeds run one
  # after another, as a sequential entry's do.
  one_by_one = (entry.scenario_per_seed or entry.sequential
                or config.optimizer.get("schedule") == "plateau")
  done = record or os.path.join(workdir, "entry.json")
  kept: dict[int, np.ndarray] = {}  # seed -> accuracy matrix, not rerun
  kept_commits: dict[str, str] = {}  # seed -> the commit it ran at
  fewer = None   # a record of this config with too few seeds
  if os.path.exists(done):
    with open(done) as f:
      prev = json.load(f)
    # The same rule as resuming a checkpoint (checkpoint.differences).
    same = "fingerprint" in prev and not checkpoint.differences(
        prev["fingerprint"], fp)
    # A record of more seeds than asked for holds the asked-for runs and
    # more: reused, never replaced by a smaller one (a 3-seed request once
    # re-ran and overwrote the 10-seed records).
    if same and (any_seeds or set(seeds) <= set(prev.get("seeds", ()))):
      return prev
    if same:
      fewer = list(prev.get("seeds", ()))
    # Seeds that run one after another are independent programs: a record
    # of the same config keeps its finished seeds, so growing an entry from
    # 1 to 3 seeds runs only the 2 new ones (hours, for the long entries).
    if same and one_by_one and \
        "accuracy" in prev:
      kept = {int(s): np.asarray(a) for s, a in
              zip(prev["seeds"], prev["accuracy"]) if s in seeds}
      kept_commits = {str(s): prev.get("kept_commits", {}).get(
          str(s), prev.get("commit", "unknown")) for s in kept}
  if skip is not None:
    why = datasets.missing(config.dataset.name, config.dataset.data_dir)
    if not why and fewer is not None:
      # Not "no stored result": one is stored, of fewer seeds.
      skip = (f"the stored result has seeds {fewer}, not all of "
              f"{list(seeds)} (--any_seeds reports it)")
    return {"skipped": _no_data(config.dataset.name, why) if why else skip}

  def set_aside(why: str) -> None:
    # Keep the old run beside the new one rather than resume from
    # incompatible checkpoints.
    if not os.path.exists(workdir):
      return
    stale = workdir.rstrip("/") + ".stale"
    if os.path.exists(stale):
      shutil.rmtree(stale)
    os.rename(workdir, stale)
    print(f"{entry.id}: {why}; old run moved to {stale}", file=sys.stderr)

  earlier: list[float] = []  # resumed runs' seconds before this call
  sizes: list = []  # the test sets' sizes, as the runs report them

  def train() -> tuple[np.ndarray, dict]:
    """``(seeds, T, E)`` accuracy matrices and the metrics' mean / se."""
    if not one_by_one:
      r = sweep.sweep(config, seeds=list(seeds), workdir=workdir)
      earlier.append(r.times["before"])
      sizes[:] = r.result.test_sizes
      return r.accuracy, r.groups[0]
    accs = []
    for s in seeds:
      if s in kept:
        accs.append(kept[s])
        continue
      c = copy.deepcopy(config)
      if entry.scenario_per_seed:
        c.scenario.seed = s
      r = sweep.sweep(c, seeds=[s],
                      workdir=os.path.join(workdir, f"seed_{s}"))
      earlier.append(r.times["before"])
      sizes[:] = r.result.test_sizes
      accs.append(r.accuracy[0])
    # From the matrices alone, so that kept and new seeds count alike.
    return np.stack(accs), sweep.summarise([metrics.summary(a)
                                            for a in accs])

  if os.path.exists(done) and not kept:
    set_aside("config or seeds changed since the cached result")
  # The code this run executes is the tree as it starts: a commit made
  # while it runs (a long entry, other work beside it) is not that code.
  commit = _commit()
  t = time.perf_counter()
  try:
    if backbone and not os.path.exists(backbone):
      from jaxcl import pretrained
      pre = mod.get_config(entry.pretrain + quick)
      pre.dataset.data_dir = pre.dataset.data_dir or data_dir
      pre.report.progress = False
      pretrained.pretrain(pre, backbone)
    try:  # an unfinished run of this config resumes from its checkpoints
      acc, g = train()
    except checkpoint.IncompatibleCheckpointError:
      set_aside("an unfinished run of another config, seeds or state "
                "layout (an earlier jaxcl)")
      acc, g = train()
  except datasets.DataError as e:  # e.g. CIFAR on an offline machine
    return {"skipped": _no_data(config.dataset.name, str(e))}
  except Exception as e:  # recorded in RESULTS.md, not hidden
    return {"error": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc()[-2000:]}
  # A resumed run's earlier invocations count too; a checkpoint from before
  # that was recorded leaves the time a lower bound.
  wall = time.perf_counter() - t + sum(x for x in earlier
                                       if not math.isnan(x))
  if kept:  # the kept seeds' share of the earlier record's time
    wall += prev.get("wall_time", 0.0) * len(kept) / len(prev["seeds"])
  out = {
      "seeds": list(seeds), "wall_time": wall, "fingerprint": fp,
      "commit": commit,
      "acc": g["acc"], "bwt": g.get("bwt"), "forgetting": g.get("forgetting"),
      "accuracy": acc.tolist(),
      # Every seed kept from an earlier record: its sizes, if it has them.
      "test_sizes": list(sizes) or (prev.get("test_sizes") if kept
                                    else None),
      "over_time": [float(np.mean(acc[:, i, :i + 1])) if acc.shape[1] > 1
                    else float(np.mean(acc[:, i])) for i in
                    range(acc.shape[1])],
  }
  if entry.metric.endswith("_pooled") and out["test_sizes"] and \
      acc.shape[1] == acc.shape[2]:  # the curve the column's metric reads
    out["over_time"] = np.mean(
        [metrics.pooled_accuracy_over_time(a, out["test_sizes"])
         for a in acc], axis=0).tolist()
  if any(math.isnan(x) for x in earlier) or (
      kept and prev.get("wall_time_partial")):
    out["wall_time_partial"] = True
  if kept:  # which seeds came from the earlier record, and its commit
    out["kept_commits"] = kept_commits
  os.makedirs(os.path.dirname(done), exist_ok=True)
  with open(done + ".tmp", "w") as f:  # never a half-written record
    json.dump(out, f)
  os.replace(done + ".tmp", done)
  return out


def _short(commit: str) -> str:
  """A record's commit as the report shows it: the short hash, marked when
  the run had uncommitted changes to ``jaxcl/`` or ``experiments/`` (the
  hash alone would name code that did not produce the row)."""
  dirty = commit.endswith("(with uncommitted changes)")
  return commit[:7] + (" + uncommitted changes" if dirty else "")


def _kept(commits: dict[str, str]) -> str:
  """`` (seeds 0, 1: `abc1234`)``: which seeds a row kept from earlier
  records, and the commits they ran at."""
  by: dict[str, list[str]] = {}
  for seed, commit in sorted(commits.items(), key=lambda x: int(x[0])):
    by.setdefault(_short(commit), []).append(seed)
  return "".join(f" (seed{'s' * (len(v) > 1)} {', '.join(v)}: `{c}`)"
                 for c, v in by.items())


def _fmt(x, pct=True):
  if x is None:
    return "—"
  if isinstance(x, (list, tuple)):
    m, se = x
    return f"{100 * m:.2f} ± {100 * se:.2f}" if pct else \
        f"{m:+.3f} ± {se:.3f}"
  return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def write_report(results: dict[str, dict], entries: list[Entry], out: str,
                 seeds: Sequence[int], smoke: bool, elapsed: float,
                 only: Sequence[str] = (), any_seeds: bool = False,
                 skip: Sequence[str] = (), report_only: bool = False) -> str:
  """Writes RESULTS.md and the per-table plots; returns the report path."""
  from jaxcl.report import curve_legend, figure, integer_ticks

  os.makedirs(out, exist_ok=True)
  lines = [
      "# jaxcl results" + (" (SMOKE MODE: tiny subsets, not results)"
                           if smoke else ""),
      "",
      f"* commit: `{_commit()}` (the report's; each row names the commit "
      "its run used — a row is re-run when its config changes)",
      f"* machine: {_machine()}",
      f"* date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
      " UTC",
      f"* seeds per entry: {len(seeds)} ({', '.join(map(str, seeds))})"
      ", except rows that name their own count (reused records run "
      "with more seeds" + (" or others" if any_seeds else "") + ")"
      + "; mean ± standard error over seeds; an entry's seeds run as one "
      "vmapped sweep (a single seed runs unvmapped); "
      "entries marked ‡ draw their scenario (permutations, angles) per "
      "seed, as Mammoth does per run, and run their seeds one after "
      "another",
      f"* wall time: {sum(r.get('wall_time', 0.0) for r in results.values()):.0f}"
      f" s summed over the entries (this invocation: {elapsed:.0f} s; "
      "finished entries are reused)",
      "* command: `python -m experiments.reproduce" +
      (" --smoke" if smoke else "") + f" --seeds {len(seeds)}" +
      (" --any_seeds" if any_seeds else "") +
      (" --report_only" if report_only else "") +
      (f" --skip {' '.join(skip)}" if skip else "") +
      (f" --only {' '.join(only)}" if only else "") + "`",
      f"* entries: {len(entries)} of the {len(ENTRIES)} registered" +
      (" (a partial run: the other rows have not been run)"
       if len(entries) < len(ENTRIES) else "") +
      f"; with results: {sum('acc' in results.get(e.id, {}) for e in entries)}"
      f", not run: {sum('skipped' in results.get(e.id, {}) for e in entries)}"
      f", failed: {sum('error' in results.get(e.id, {}) for e in entries)}",
      "",
      "ACC is the average accuracy over all test sets after the last "
      "experience (%); BWT and forgetting as fractions; a published number "
      "jaxcl misses by more than 1.5 points is explained under its table.",
      "",
  ]
  tables: dict[str, list[Entry]] = {}
  for e in entries:
    tables.setdefault(e.table, []).append(e)
  # One plot per table, kept out of the repository's root; plots left by
  # an earlier report with more tables are removed so none goes stale.
  fig_dir = os.path.join(out, FIGURES)
  os.makedirs(fig_dir, exist_ok=True)
  for old in os.listdir(fig_dir):
    if re.fullmatch(r"results_\d+\.png", old):
      os.remove(os.path.join(fig_dir, old))
  for t_i, (table, rows) in enumerate(tables.items()):
    lines += [f"## {table}", "",
              "| method | jaxcl ACC (%) | published (%) | source | BWT | "
              "forgetting | wall time (s) | config | commit |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fig, ax = figure((6, 4))
    gaps, imported = [], set()
    for e in rows:
      r = results.get(e.id, {})
      cfg = f"`{e.config}.py:{e.arg}`"
      if "error" in r:
        lines.append(f"| {e.method} | failed: {r['error'][:120]} | "
                     f"{_fmt(e.published)} | {e.source} | — | — | — | "
                     f"{cfg} | — |")
        continue
      if "skipped" in r:
        lines.append(f"| {e.method} | not run: {r['skipped']} | "
                     f"{_fmt(e.published)} | {e.source} | — | — | — | "
                     f"{cfg} | — |")
        continue
      if not r:
        continue
      n_seeds = len(r.get("seeds", seeds))
      own = ("" if n_seeds == len(seeds) else
             f" ({n_seeds} seed{'s' * (n_seeds > 1)})")
      value = entry_metric(r, e.metric)
      if value is None:
        lines.append(f"| {e.method} | recorded without the matrices and "
                     f"test-set sizes {e.metric} needs: rerun | "
                     f"{_fmt(e.published)} | {e.source} | — | — | — | "
                     f"{cfg} | — |")
        continue
      acc = (_fmt(value) if n_seeds > 1 else  # no error bar from 1 seed
             f"{100 * value[0]:.2f}") + (" ‡" if e.scenario_per_seed
                                         else "")
      # One seed: the value alone (its "standard error" would read 0).
      spread = (lambda v: _fmt(v, False) if n_seeds > 1 or v is None
                else f"{v[0]:+.3f}")
      lines.append(
          f"| {e.method} | {acc}{own} | {_fmt(e.published)} | "
          f"{e.source} | {spread(r.get('bwt'))} | "
          f"{spread(r.get('forgetting'))} | "
          f"{'≥ ' * bool(r.get('wall_time_partial'))}{r['wall_time']:.0f} | "
          f"{cfg} | `{_short(r.get('commit', 'unknown'))}`" +
          _kept(r.get("kept_commits", {})) +
          f"{' †' if 'imported_from' in r else ''} |")
      if "imported_from" in r:
        imported.add(r["imported_from"])
      ys = r.get("over_time")
      if ys:  # records imported from an older report have no curve
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=e.method)
      if e.published is not None and value[0] < e.published - 0.015:
        gaps.append(e)
    lines.append("")
    for e in gaps:
      lines.append(f"* **{e.method}** is more than 1.5 points below "
                   f"{e.source} ({_fmt(e.published)}): " +
                   (e.note or "NOT YET EXPLAINED."))
    if gaps:
      lines.append("")
    for src in sorted(imported):
      lines += [f"† carried over from {src}, run before results were "
                "stored in `experiments/results/`: the numbers as printed "
                "there; the per-experience curve was not kept, so the row "
                "has no line in the plot.", ""]
    ax.set_xlabel("experiences trained")
    integer_ticks(ax)
    ax.set_ylabel("average accuracy (seen)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    curve_legend(fig, ax)
    ax.set_title(table, fontsize=8)
    png = f"results_{t_i:02d}.png"
    # "tight" takes in a legend beside the axes (tight_layout cannot).
    fig.savefig(os.path.join(fig_dir, png), dpi=90, bbox_inches="tight")
    lines += [f"![{table}]({FIGURES}/{png})", ""]
  path = os.path.join(out, "RESULTS.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def main(argv: Sequence[str] | None = None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", nargs="*", default=[])
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--skip", nargs="*", default=[],
                  help="entries (id or table substrings) to list as not run "
                  "instead of running them (e.g. runs too long for this "
                  "machine)")
  ap.add_argument("--any_seeds", action="store_true",
                  help="reuse finished entries run with other seeds (their "
                  "rows name their seed count)")
  ap.add_argument("--report_only", action="store_true",
                  help="run nothing: write the report from the stored "
                  "results, listing entries without one as not run")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny subsets, 1 seed: checks the pipeline only")
  ap.add_argument("--out", default=REPO)
  ap.add_argument("--workdir", default=os.path.join(REPO, "runs",
                                                    "reproduce"),
                  help="checkpoints of the runs (resumable; not committed)")
  ap.add_argument("--results", default=os.path.join(REPO, "experiments",
                                                    "results"),
                  help="one JSON record per finished entry (committed; "
                  "smoke runs keep theirs in the workdir)")
  ap.add_argument("--data_dir", default=os.environ.get(
      "JAXCL_DATA_DIR", os.path.join(REPO, "..", "shared", "data")))
  args = ap.parse_args(argv)
  _load_more_entries()
  selected = {e.id for e in ENTRIES
              if not args.only or any(o in e.id or o in e.table
                                      for o in args.only)}
  if not selected:
    raise SystemExit(f"--only {args.only} matches no entry")
  # The report always covers every entry: those --only leaves out show
  # their stored records (any seeds), so RESULTS.md stays whole.
  entries = ENTRIES if not args.smoke else [e for e in ENTRIES
                                            if e.id in selected]
  seeds = [0] if args.smoke else list(range(args.seeds))
  workroot = args.workdir + ("_smoke" if args.smoke else "")
  from tqdm.auto import tqdm
  t0 = time.perf_counter()
  results = {}
  for e in tqdm(entries, desc="reproduce", unit="entry"):
    skip = ("no stored result for this config (report written with "
            "--report_only)" if args.report_only else
            "no stored result for this config (not selected by --only)"
            if e.id not in selected else
            "skipped in this invocation (--skip: too long for this machine)"
            if any(k in e.id or k in e.table for k in args.skip) else None)
    record = (None if args.smoke else
              os.path.join(args.results, f"{e.id}.json"))
    results[e.id] = run_entry(e, seeds, os.path.join(workroot, e.id),
                              args.data_dir, args.smoke,
                              args.any_seeds or e.id not in selected,
                              skip=skip, record=record)
  path = write_report(results, entries, args.out, seeds, args.smoke,
                      time.perf_counter() - t0, args.only, args.any_seeds,
                      args.skip, args.report_only)
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
