"""Finished run directories, read back and compared (``jaxcl compare``).

A run directory's ``accuracy_matrix.json`` holds its matrix and metrics; a
sweep's ``sweep.json`` every run's, grouped by hyperparameter setting. The
comparison has one row per run directory, or per setting of a sweep, with
each metric as a mean ± standard error over the setting's seeds (a single
run: its value). :func:`table` formats the rows as plain text or Markdown;
:func:`plot` draws each row's average accuracy over the experiences seen
and, when every row has one, its continual-evaluation curve.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from jaxcl import metrics, report, sweep
from jaxcl.metrics import Curve

__all__ = ["Row", "read", "table", "plot", "RunDirError"]


class RunDirError(ValueError):
  """A directory that holds no finished run."""


@dataclasses.dataclass
class Row:
  """One run directory, or one hyperparameter setting of a sweep.

  Attributes:
    label: the directory's name, and the setting for a sweep's grid.
    n: the runs behind the row (a sweep's seeds).
    metrics: ``{metric: (mean, standard error)}``; the error is None for a
      single run.
    accuracy: the accuracy matrix (the mean over the row's runs).
    evaluated_on: ``test`` or ``validation``.
    curve: the continual-evaluation curve (the mean over the row's runs),
      or None.
  """
  label: str
  n: int
  metrics: dict[str, tuple[float, float | None]]
  accuracy: np.ndarray
  evaluated_on: str
  curve: Curve | None = None


def _load(path: str, keys: Sequence[str]) -> dict[str, Any]:
  """A run's JSON record, with ``keys``; a file cut short, edited or of
  another program is refused by name."""
  try:
    with open(path) as f:
      record = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunDirError(f"{path} is not readable JSON ({e}); rerun the run "
                      "(or the sweep) that wrote it") from None
  missing = [k for k in keys if not isinstance(record, dict)
             or k not in record]
  if missing:
    raise RunDirError(f"{path} lacks {missing}: not a jaxcl run's record")
  return record


def _read_curve(workdir: str) -> Curve | None:
  path = os.path.join(workdir, "accuracy_curve.csv")
  if not os.path.exists(path):
    return None
  with open(path, newline="") as f:
    header, *rows = list(csv.reader(f))
  # By name: the columns after the accuracies vary (exposed_accuracy on
  # class-incremental streams since session 47).
  acc = [k for k, h in enumerate(header) if h.startswith("acc_exp")]
  exposed = None
  if "exposed_accuracy" in header:
    at = header.index("exposed_accuracy")
    exposed = np.array([float(r[at]) if r[at] else np.nan for r in rows])
  return Curve(np.array([int(r[0]) for r in rows]),
               np.array([int(r[1]) for r in rows]),
               np.array([[float(r[k]) for k in acc] for r in rows]),
               exposed)


def read(workdir: str, name: str | None = None) -> list[Row]:
  """The rows of one finished run directory (a sweep: one per setting),
  labelled ``name`` (default: the directory's own name).

  Raises:
    RunDirError: ``workdir`` is not a directory, or holds no finished run
      (``accuracy_matrix.json`` is written when the stream ends).
  """
  if not os.path.isdir(workdir):
    raise RunDirError(f"{workdir!r} is not a directory; give the run "
                      "directories of finished runs (their --workdir)")
  path = os.path.join(workdir, "accuracy_matrix.json")
  if not os.path.exists(path):
    raise RunDirError(
        f"{workdir!r} holds no finished run: no accuracy_matrix.json (a run "
        "writes it when its stream ends; an unfinished one resumes with the "
        "same command)")
  whole = _load(path, ("accuracy", "metrics"))
  name = name or os.path.basename(os.path.normpath(workdir))
  split = whole.get("evaluated_on", "test")
  sweep_path = os.path.join(workdir, "sweep.json")
  if not os.path.exists(sweep_path):
    # A sweep's directory without its sweep.json: the mean of its runs,
    # without their spread.
    return [Row(name, int(whole.get("mean_of_runs", 1)),
                {k: (float(v), None) for k, v in whole["metrics"].items()},
                np.asarray(whole["accuracy"], np.float64), split,
                _read_curve(workdir))]
  record = _load(sweep_path, ("members", "accuracy", "groups"))
  members, acc = record["members"], np.asarray(record["accuracy"],
                                                np.float64)
  curve = record.get("curve")
  # Sweeps before session 45 kept no per-run curves; the directory's CSV
  # is the mean over all runs, so it stands for a grid of one setting.
  whole_curve = _read_curve(workdir) if len(record["groups"]) == 1 else None
  rows = []
  for group in record["groups"]:
    setting = group["setting"]
    idx = sweep.members_of(members, setting)
    label = name + "".join(f" {k}={v}" for k, v in setting.items())
    metrics = {k: (float(v[0]), float(v[1]) if group["n"] > 1 else None)
               for k, v in group.items() if k not in ("setting", "n")}
    rows.append(Row(
        label, group["n"], metrics, acc[idx].mean(0), split,
        whole_curve if curve is None else Curve(
            np.asarray(curve["step"]), np.asarray(curve["experience"]),
            np.asarray(curve["accuracy"], np.float64)[idx].mean(0),
            None if curve.get("exposed") is None else np.asarray(
                curve["exposed"], np.float64)[idx].mean(0))))
  return rows


def _cell(value: tuple[float, float | None]) -> str:
  mean, se = value
  return f"{mean:.4f}" if se is None else f"{mean:.4f} ± {se:.4f}"


def table(rows: Sequence[Row], markdown: bool = False,
          metrics: Sequence[str] | None = None) -> str:
  """The rows' metrics as a table: plain text with aligned columns, or
  Markdown. ``metrics``: the columns, in order (default: every metric any
  row has, in the order they first appear); a row without one shows
  ``-``."""
  if metrics is None:
    metrics = list(dict.fromkeys(k for r in rows for k in r.metrics))
  head = ["run", "n"] + list(metrics)
  body = [[r.label, str(r.n)] + [_cell(r.metrics[m]) if m in r.metrics
                                 else "-" for m in metrics] for r in rows]
  if markdown:
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(b) + " |" for b in body]
  else:
    width = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, width)))
    lines = [fmt(head), "-" * len(fmt(head))] + [fmt(b) for b in body]
  splits = sorted({r.evaluated_on for r in rows})
  if splits != ["test"]:
    lines.append(f"(evaluated on: {', '.join(splits)} split"
                 f"{'s differ between rows' if len(splits) > 1 else ''})")
  return "\n".join(lines)


def plot(rows: Sequence[Row], path: str) -> Any:
  """Each row's average accuracy over the experiences seen, after each
  experience; beside it, when every row has one, the continual-evaluation
  curve of that average over the training steps. Returns the figure."""
  from matplotlib.figure import Figure

  curves = all(r.curve is not None for r in rows)
  fig = Figure(figsize=(11 if curves else 6, 4))
  axes = list(np.atleast_1d(fig.subplots(1, 2 if curves else 1)))
  for r in rows:
    ys = report.seen_average(r.accuracy)
    axes[0].plot(np.arange(1, len(ys) + 1), ys, marker="o", label=r.label)
  axes[0].set_xlabel("experiences trained")
  axes[0].set_ylabel(f"average {rows[0].evaluated_on} accuracy (seen)")
  report.integer_ticks(axes[0])
  if curves:
    for r in rows:
      axes[1].plot(r.curve.step, metrics.seen_accuracy(
          r.curve.experience, r.curve.accuracy), lw=1, label=r.label)
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("average accuracy (seen), continual evaluation")
  for ax in axes:
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return fig
