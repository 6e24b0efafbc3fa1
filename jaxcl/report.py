"""Run outputs: JSONL/CSV logs, TensorBoard events, plots, tables, progress.

A run directory holds:

* ``config.json``: the resolved config;
* ``metrics.jsonl``: one JSON record per logged event (training loss,
  the accuracy row after each experience, the final summary);
* ``metrics.csv``: one row per experience (accuracy on every test set and
  the average over the experiences seen so far; with test sets of
  unequal size, also the accuracy over their pooled examples);
* ``accuracy_matrix.json``: the matrix, the random-init accuracies, the
  metrics, ``test_sizes`` (the test sets' sizes, the pooled accuracies'
  weights), on a class-incremental stream ``task_accuracy`` (the matrix
  with each test set's predictions restricted to its own classes), and
  ``evaluated_on``: ``test``, or ``validation`` when
  ``config.dataset.validation`` replaced the test sets by held-out
  training data. A sweep's directory holds the mean over all its runs
  (``mean_of_runs``: their number); each run's results are in
  ``sweep.json``;
* ``tb/``: TensorBoard events (scalars; with plots, each experience's
  confusion matrix as the image ``eval/confusion``);
* ``accuracy_matrix.png`` and ``average_accuracy.png``;
* with continual evaluation (``train.eval_every_steps``):
  ``accuracy_curve.csv``, one row per evaluation (global step, the
  experience being trained, the accuracy on every test set, the average
  over the experiences seen and, on class-incremental streams, the
  accuracy over the test examples of the classes exposed so far), and
  ``accuracy_curve.png``;
* with ``train.confusion`` (the default): ``confusion.npz`` (``confusion``,
  the ``(experiences, C, C)`` counts of each experience's end, the mean
  over the runs for a sweep; ``experience_classes``, each experience's
  classes, -1 padded) and ``confusion.png``, the last one, each row
  divided by its examples, classes in the order the experiences brought
  them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np

from jaxcl import metrics
from jaxcl.state import SilentBar

__all__ = ["Reporter", "NullReporter", "evaluated_on", "label_noise_note",
           "format_table",
           "plot_accuracy_matrix", "plot_average_accuracy",
           "plot_accuracy_curve", "plot_confusion", "confusion_image",
           "figure", "integer_ticks", "seen_average", "task_accuracy_json"]


class NullReporter:
  """Writes nothing (library use without a run directory)."""

  def progress(self, total: int, desc: str, initial: int = 0):
    del total, desc, initial
    return SilentBar()

  def work_progress(self, total: int, desc: str, unit: str = "step"):
    del total, desc, unit
    return SilentBar()

  def scalar(self, name: str, value: float, step: int) -> None:
    del name, value, step

  def experience(self, index: int, row: np.ndarray, step: int) -> None:
    del index, row, step

  def curve(self, experience: int, row: np.ndarray, step: int) -> None:
    del experience, row, step

  def curve_exposed(self, experience: int, value: float) -> None:
    del experience, value

  def confusion(self, index: int, counts: np.ndarray) -> None:
    del index, counts

  def task_accuracy(self, index: int, row: np.ndarray) -> None:
    del index, row

  def after_experience(self, index: int, seconds: float) -> None:
    del index, seconds

  def waiting(self, what: str) -> contextlib.AbstractContextManager:
    del what
    return contextlib.nullcontext()

  def finish(self, result: Any) -> None:
    del result


class _Bar:
  """An experience's progress: a tqdm bar on a terminal or in a notebook.

  Elsewhere (a batch job's log file, a pipe) every tqdm redraw would stay
  in the file as one more ``\\r``-joined chunk of a single line, erased at
  the end; there the bar is a plain line every ``interval`` seconds
  instead. Either way the reporter prints one line per experience when it
  has been evaluated (see ``Reporter.experience``).
  """

  def __init__(self, total: int, desc: str, interval: float = 60.0,
               initial: int = 0, unit: str = "step"):
    self.desc, self.total, self.initial = desc, total, initial
    self.unit = unit
    self.done, self.loss, self.seconds = initial, None, 0.0
    self._interval = interval
    self._start = self._shown = time.perf_counter()
    self._tqdm = None
    if sys.stderr.isatty() or "ipykernel" in sys.modules:
      from tqdm.auto import tqdm
      self._tqdm = tqdm(total=total, desc=desc, unit=unit, leave=False,
                        dynamic_ncols=True, initial=initial)

  def update(self, n: int, loss: float | None = None) -> None:
    self.done = min(self.done + n, self.total)
    if loss is not None:
      self.loss = loss
    if self._tqdm is not None:
      if loss is not None:
        self._tqdm.set_postfix(loss=f"{loss:.4f}", refresh=False)
      self._tqdm.update(n)
      return
    now = time.perf_counter()
    if now - self._shown >= self._interval and self.done < self.total:
      self._shown = now
      print(f"{self.desc}: {self.done}/{self.total} {self.unit}s, "
            f"{now - self._start:.0f} s" + _loss_text(self.loss),
            file=sys.stderr, flush=True)

  def close(self) -> None:
    self.seconds = time.perf_counter() - self._start
    if self._tqdm is not None:
      self._tqdm.close()


def _loss_text(loss: float | None) -> str:
  return "" if loss is None else f", loss {loss:.4f}"


class Reporter(NullReporter):
  """Writes a run directory (see the module docstring)."""

  def __init__(self, workdir: str, config: Any, progress: bool | None = None,
               resume_step: int | None = None, runs: int = 1,
               per_experience: bool | None = None,
               experience_classes: Sequence[Sequence[int]] = (),
               test_sizes: Sequence[int] = ()):
    """``resume_step``: the global step of the checkpoint a resumed run
    starts from. The logs keep what came up to it, and drop what the
    killed invocation logged after it, which the resumed run logs again.
    ``per_experience``: one test set per training experience, so the
    experiences seen are the leading test sets; False for a stream that
    tests one experience on every test set (Joint), whose average is over
    them all; None (a reporter built by hand) guesses from the final
    matrix: a single row is Joint's. ``experience_classes``: each
    training experience's classes, for the confusion matrix's file and
    plot. ``test_sizes``: the test sets' sizes; when they differ, each
    experience's record also holds ``pooled_accuracy_seen``, the accuracy
    over the test examples of the experiences seen (LUCIR's and PyCIL's
    per-step figure)."""
    self.workdir = workdir
    self._classes = [list(c) for c in experience_classes]
    self._sizes = (tuple(test_sizes) if metrics.unequal_sizes(test_sizes)
                   else None)
    self._task: tuple[int, list[float]] | None = None  # task_accuracy()
    self._hook: tuple[int, float] | None = None  # after_experience()
    self._exposed: float | None = None  # curve_exposed()
    self._per_experience = per_experience
    # A sweep's directory shows the mean over its runs (every seed and
    # setting); its files say so. Per-run results: sweep.json.
    self._runs = runs
    os.makedirs(workdir, exist_ok=True)
    rc = getattr(config, "report", None)
    self._progress = (rc.progress if rc is not None else True
                      ) if progress is None else progress
    self._tb_on = rc.tensorboard if rc is not None else True
    self._plots = rc.plots if rc is not None else True
    self._split = evaluated_on(config)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) if hasattr(
          config, "to_json_best_effort") else json.dumps(config, indent=2))
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      _truncate_log(path, resume_step)
    self._jsonl = open(path, "a" if resume_step is not None else "w")
    self._bar: _Bar | None = None
    self._notice: threading.Timer | None = None  # waiting()'s, pending
    self._tb = None
    if self._tb_on:
      from tensorboardX import SummaryWriter
      # TensorBoard discards the earlier events from purge_step on, as
      # the JSONL log does above.
      self._tb = SummaryWriter(
          os.path.join(workdir, "tb"),
          purge_step=None if resume_step is None else resume_step + 1)

  def _log(self, record: dict[str, Any]) -> None:
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def progress(self, total: int, desc: str, initial: int = 0):
    """The experience's bar. ``initial``: the steps a resumed experience
    had already run."""
    if not self._progress:
      return SilentBar()
    self._bar = _Bar(total, desc, initial=initial)
    return self._bar

  def work_progress(self, total: int, desc: str, unit: str = "step"):
    """A bar for a strategy hook's own loop (SPR's fills, PackNet's
    retraining epochs: :attr:`jaxcl.state.Context.progress`), beside the
    experience's bar, whose steps and seconds the experience's line
    reports. It replaces :meth:`waiting`'s pending notice, which would
    only say the same."""
    if not self._progress:
      return SilentBar()
    if self._notice is not None:
      self._notice.cancel()
    return _Bar(total, desc, unit=unit)

  def scalar(self, name: str, value: float, step: int) -> None:
    self._log({"step": step, name: value})
    if self._tb is not None:
      self._tb.add_scalar(name, value, step)

  def _seen(self, index: int, row: list[float]) -> list[float]:
    """The accuracies of the test sets seen after experience ``index`` (a
    reporter built by hand takes one test set per experience until its
    final matrix says otherwise)."""
    return row if self._per_experience is False else row[:index + 1]

  def task_accuracy(self, index: int, row: np.ndarray) -> None:
    """Experience ``index``'s task-aware accuracy row (a class-incremental
    stream's Task-IL), given before :meth:`experience`, which logs and
    prints it beside the row."""
    self._task = (index, [float(v) for v in row])

  # Work with no bar of its own (a strategy's retraining at an
  # experience's end) says what is running once it has taken this long.
  WAIT_NOTICE_SECONDS = 5.0

  @contextlib.contextmanager
  def waiting(self, what: str) -> Iterator[None]:
    """Prints ``what`` (e.g. "experience 3/5: GDumb's own work after the
    experience") if the block is still running after
    :attr:`WAIT_NOTICE_SECONDS`, so a minutes-long retraining does not
    look like a hang; nothing for a block done sooner, nor without
    progress output."""
    if not self._progress:
      yield
      return
    timer = threading.Timer(
        self.WAIT_NOTICE_SECONDS,
        lambda: print(f"{what} ...", file=sys.stderr, flush=True))
    timer.daemon = True
    self._notice = timer
    timer.start()
    try:
      yield
    finally:
      timer.cancel()
      self._notice = None

  def after_experience(self, index: int, seconds: float) -> None:
    """The seconds experience ``index``'s end took before its evaluation
    (the strategy's ``after_experience``: GDumb's retraining, EEIL's
    fine-tuning, a Fisher), given before :meth:`experience`, which logs
    them and, from half a second on, prints them beside its steps."""
    self._hook = (index, float(seconds))

  def _given_for(self, index: int, attr: str) -> Any:
    """What :meth:`task_accuracy` or :meth:`after_experience` gave (in
    ``attr``) for experience ``index`` before its row, cleared; None if
    nothing was, or only for another experience (a stale one)."""
    given = getattr(self, attr)
    setattr(self, attr, None)
    return given[1] if given is not None and given[0] == index else None

  def experience(self, index: int, row: np.ndarray, step: int) -> None:
    row = [float(v) for v in row]
    avg = float(np.mean(self._seen(index, row)))
    record = {"step": step, "experience": index, "accuracy": row,
              "average_accuracy_seen": avg}
    if self._sizes is not None and self._per_experience is not False:
      record["pooled_accuracy_seen"] = metrics.pooled_seen(row, self._sizes,
                                                           index)
    hook = self._given_for(index, "_hook")
    if hook is not None:
      record["after_experience_seconds"] = hook
    task_row, task = self._given_for(index, "_task"), None
    if task_row is not None:
      task = float(np.mean(self._seen(index, task_row)))
      record.update(task_accuracy=task_row, task_average_accuracy_seen=task)
    self._log(record)
    if self._tb is not None:
      self._tb.add_scalar("eval/average_accuracy_seen", avg, index)
      if "pooled_accuracy_seen" in record:
        self._tb.add_scalar("eval/pooled_accuracy_seen",
                            record["pooled_accuracy_seen"], index)
      for j, v in enumerate(row):
        self._tb.add_scalar(f"eval/accuracy_exp{j}", v, index)
      if task is not None:
        self._tb.add_scalar("eval/task_average_accuracy_seen", task, index)
      if hook is not None:
        self._tb.add_scalar("time/after_experience_seconds", hook, index)
    if self._bar is not None:
      # The line that stays in a terminal (the bar is erased) and in a log.
      bar, self._bar = self._bar, None
      mean = f" (mean of {self._runs} runs)" if self._runs > 1 else ""
      seen = (f"experiences 1-{index + 1}" if index else "experience 1")
      if self._per_experience is False:
        seen = f"all {len(row)} test sets"
      secs = f"{bar.seconds:.{1 if bar.seconds >= 1 else 2}f}"
      ran = (f"{bar.total - bar.initial} steps (resumed at step "
             f"{bar.initial})" if bar.initial else f"{bar.total} steps")
      if bar.initial < bar.done < bar.total:  # the plateau schedule's stop
        ran = (f"{bar.done - bar.initial} of {ran} (stopped early: the "
               "rate fell below optimizer.lr_min)")
      til = f" (Task-IL {task:.4f})" if task is not None else ""
      after = (f", then {hook:.1f} s of the strategy's own work"
               if hook is not None and hook >= 0.5 else "")
      print(f"{bar.desc}: {ran} in {secs} s"
            f"{_loss_text(bar.loss)}{after}; average {self._split} accuracy "
            f"over "
            f"{seen}: {avg:.4f}{til}{mean}", file=sys.stderr, flush=True)

  def curve_exposed(self, experience: int, value: float) -> None:
    """The next curve point's accuracy over the test examples of the
    classes exposed so far (class-incremental streams), given before
    :meth:`curve`, which logs it in the point's record."""
    del experience
    self._exposed = float(value)

  def curve(self, experience: int, row: np.ndarray, step: int) -> None:
    """A continual evaluation at global ``step`` while ``experience`` trains
    (-1: the initial model); the experiences' ends are on it too."""
    row = [float(v) for v in row]
    record = {"step": step, "curve_experience": experience,
              "curve_accuracy": row}
    if experience >= 0:
      record["curve_average_seen"] = float(np.mean(self._seen(experience,
                                                              row)))
    exposed, self._exposed = self._exposed, None
    if exposed is not None and not math.isnan(exposed):
      record["curve_exposed_accuracy"] = exposed
    self._log(record)
    if self._tb is not None:
      for j, v in enumerate(row):
        self._tb.add_scalar(f"curve/accuracy_exp{j}", v, step)
      if experience >= 0:
        self._tb.add_scalar("curve/average_accuracy_seen",
                            record["curve_average_seen"], step)
      if "curve_exposed_accuracy" in record:
        self._tb.add_scalar("curve/exposed_accuracy",
                            record["curve_exposed_accuracy"], step)

  def confusion(self, index: int, counts: np.ndarray) -> None:
    """Experience ``index``'s confusion matrix (a sweep's: the mean over
    its runs) as TensorBoard's image ``eval/confusion`` (with plots and
    TensorBoard on): :func:`confusion_image`, not a matplotlib figure,
    whose drawing took ~0.3 s per experience."""
    if self._tb is None or not self._plots:
      return
    order, boundaries = self._class_order(index, counts.shape[-1])
    image = confusion_image(counts, order, boundaries)
    self._tb.add_image("eval/confusion", image, index, dataformats="HWC")

  def _class_order(self, index: int, num_classes: int
                   ) -> tuple[list[int], list[int]]:
    """The classes in the order experiences ``0..index`` brought them (each
    once), then any they did not; and the positions after each
    experience's, for lines between them."""
    order, ends = [], set()
    for cls in self._classes[:index + 1]:
      order += [c for c in cls if c not in order]
      ends.add(len(order))
    order += [c for c in range(num_classes) if c not in order]
    return order, sorted(e for e in ends if 0 < e < len(order))

  def finish(self, result: Any) -> None:
    acc = np.asarray(result.accuracy)
    self._log({"final": result.metrics, "times": result.times})
    with open(os.path.join(self.workdir, "accuracy_matrix.json"), "w") as f:
      json.dump({"accuracy": acc.tolist(), "evaluated_on": self._split,
                 **({"mean_of_runs": self._runs,
                     "per_run": "sweep.json"} if self._runs > 1 else {}),
                 "random_accuracy": np.asarray(
                     result.random_accuracy).tolist(),
                 **task_accuracy_json(result),
                 # The pooled accuracies' weights (a result of one's own
                 # may predate them).
                 **({"test_sizes": list(result.test_sizes)}
                    if getattr(result, "test_sizes", None) else {}),
                 "metrics": result.metrics, "times": result.times}, f,
                indent=2)
    with open(os.path.join(self.workdir, "metrics.csv"), "w",
              newline="") as f:
      w = csv.writer(f)
      # Test sets of unequal size: also the accuracy over their pooled
      # examples (as metrics.jsonl logs it per experience).
      pooled = (metrics.pooled_accuracy_over_time(acc, self._sizes)
                if self._sizes is not None and self._per_experience
                is not False and acc.shape[0] == acc.shape[1] else None)
      w.writerow(["experience"] + [f"acc_exp{j}" for j in range(acc.shape[1])]
                 + ["average_accuracy_seen"]
                 + ["pooled_accuracy_seen"] * (pooled is not None))
      for i, (row, seen) in enumerate(zip(acc, seen_average(
          acc, self._per_experience))):
        w.writerow([i] + [f"{v:.6f}" for v in row] + [f"{seen:.6f}"]
                   + ([] if pooled is None else [f"{pooled[i]:.6f}"]))
    curve = getattr(result, "curve", None)
    if curve is not None:
      seen = metrics.seen_accuracy(curve.experience, curve.accuracy,
                                   self._per_experience)
      with open(os.path.join(self.workdir, "accuracy_curve.csv"), "w",
                newline="") as f:
        w = csv.writer(f)
        exposed = getattr(curve, "exposed", None)
        w.writerow(["step", "experience"] +
                   [f"acc_exp{j}" for j in range(acc.shape[1])] +
                   ["average_accuracy_seen"] +
                   ["exposed_accuracy"] * (exposed is not None))
        for k, row in enumerate(np.asarray(curve.accuracy)):
          w.writerow([int(curve.step[k]), int(curve.experience[k])] +
                     [f"{v:.6f}" for v in row] + [_csv(seen[k])] +
                     ([] if exposed is None else [_csv(exposed[k])]))
    confusion = getattr(result, "confusion", None)
    if confusion is not None:
      self._write_confusion(np.asarray(confusion))
    if self._plots:
      plot_accuracy_matrix(acc, os.path.join(self.workdir,
                                             "accuracy_matrix.png"),
                           split=self._split, runs=self._runs)
      plot_average_accuracy(acc, os.path.join(self.workdir,
                                              "average_accuracy.png"),
                            self._per_experience)
      if curve is not None:
        plot_accuracy_curve(curve, os.path.join(self.workdir,
                                                "accuracy_curve.png"),
                            split=self._split, runs=self._runs,
                            per_experience=self._per_experience)
    if self._tb is not None:
      for k, v in result.metrics.items():
        self._tb.add_scalar(f"final/{k}", v, 0)
      self._tb.close()
    self._jsonl.close()


  def _write_confusion(self, confusion: np.ndarray) -> None:
    width = max(map(len, self._classes), default=0)
    classes = np.full((len(self._classes), width), -1, np.int32)
    for i, c in enumerate(self._classes):
      classes[i, :len(c)] = c
    np.savez_compressed(os.path.join(self.workdir, "confusion.npz"),
                        confusion=confusion, experience_classes=classes,
                        mean_of_runs=self._runs)
    known = [i for i, m in enumerate(confusion) if m.min() >= 0]
    if self._plots and known:
      i = known[-1]
      order, boundaries = self._class_order(i, confusion.shape[-1])
      plot_confusion(confusion[i], os.path.join(self.workdir,
                                                "confusion.png"),
                     order=order, boundaries=boundaries,
                     title=f"after experience {i + 1}" + (
                         f" (mean of {self._runs} runs)" if self._runs > 1
                         else ""), split=self._split)


def _row_shares(confusion: np.ndarray, order: Sequence[int]) -> np.ndarray:
  """The matrix with its classes in ``order``, each row divided by its
  examples (NaN for a row without any)."""
  n = np.asarray(confusion, np.float64)[np.ix_(order, order)]
  rows = n.sum(1, keepdims=True)
  return np.where(rows > 0, n / np.where(rows > 0, rows, 1), np.nan)


def confusion_image(confusion: np.ndarray, order: Sequence[int],
                    boundaries: Sequence[int] = (), size: int = 256
                    ) -> np.ndarray:
  """The row shares of :func:`plot_confusion` as a uint8 ``(H, W, 3)``
  image, each cell a square of viridis colour (rows without examples
  grey), white lines after ``boundaries``; no text: drawn with NumPy in
  about a millisecond."""
  from matplotlib import colormaps

  share = _row_shares(confusion, order)
  rgb = colormaps["viridis"](np.nan_to_num(share))[..., :3]
  rgb[np.isnan(share)] = 0.5
  k = max(1, size // len(order))
  img = np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
  for b in boundaries:
    img[b * k - 1, :] = img[:, b * k - 1] = 1.0
  return (img * 255).round().astype(np.uint8)


def plot_confusion(confusion: np.ndarray, path: str | None,
                   order: Sequence[int] | None = None,
                   boundaries: Sequence[int] = (), title: str = "",
                   split: str = "test") -> Any:
  """A heatmap of the confusion matrix ``N[y, p]``, each row divided by its
  examples (rows without any stay blank), classes in ``order`` on both
  axes, with lines after the positions ``boundaries`` (the experiences'
  ends); written to ``path`` unless it is None; returns the figure."""
  order = (list(range(np.shape(confusion)[0])) if order is None
           else list(order))
  share = _row_shares(confusion, order)
  size = min(2 + 0.35 * len(order), 12)
  fig, ax = figure((size + 1, size))
  im = ax.imshow(share, vmin=0, vmax=1, cmap="viridis")
  for b in boundaries:
    ax.axhline(b - 0.5, color="w", lw=0.8)
    ax.axvline(b - 0.5, color="w", lw=0.8)
  if len(order) <= 30:
    ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize=7)
    ax.set_yticks(range(len(order)), [str(c) for c in order], fontsize=7)
  ax.set_xlabel("predicted class")
  ax.set_ylabel(f"true class ({split} examples)")
  ax.set_title("confusion matrix" + (f" {title}" if title else ""))
  fig.colorbar(im, ax=ax, fraction=0.046, label="share of the row")
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=100)
  return fig


def task_accuracy_json(result: Any) -> dict[str, Any]:
  """``{'task_accuracy': nested lists}`` (null for an unknown entry) when
  the run has a task-aware matrix (a sweep's: one per run); else ``{}``."""
  task = getattr(result, "task_accuracy", None)
  if task is None:
    return {}
  return {"task_accuracy": json_lists(task)}


def json_lists(a: Any) -> Any:
  """``a`` as nested lists for JSON, null for NaN (``json`` would write
  ``NaN``, which JSON does not allow)."""
  a = np.asarray(a, np.float64)
  return np.where(np.isnan(a), None, a.astype(object)).tolist()


def _csv(v: float) -> str:
  """A CSV cell: six decimals, empty for NaN."""
  return "" if np.isnan(v) else f"{v:.6f}"


def _truncate_log(path: str, step: int) -> None:
  """Keeps the records of ``path`` logged at or before global ``step``.

  A killed run may have logged steps past its last checkpoint (and a
  finished one its summary); the resumed run logs them again, so without
  this they would appear twice. A line cut short by the kill is dropped.
  """
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and record.get("step", step + 1) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def evaluated_on(config: Any) -> str:
  """``'validation'`` when ``config.dataset.validation`` holds out part of
  the training set to evaluate on, else ``'test'``."""
  dataset = getattr(config, "dataset", None)
  return "validation" if dataset is not None and dataset.get(
      "validation", 0.0) else "test"


def label_noise_note(config: Any) -> str | None:
  """A line saying the training labels were noisy (``config.dataset.
  label_noise > 0``), for the printed results; None for clean labels."""
  dataset = getattr(config, "dataset", None)
  rate = dataset.get("label_noise", 0.0) if dataset is not None else 0.0
  if not rate:
    return None
  return (f"(trained on noisy labels: {rate:g} of each class's training "
          f"labels, {dataset.get('label_noise_type', 'symmetric')}, noise "
          f"seed {dataset.get('label_noise_seed', 0)}; evaluated on clean "
          "labels)")


def format_table(accuracy: np.ndarray, summary: dict[str, float],
                 split: str = "test") -> str:
  """The accuracy matrix and metrics as a plain-text table (``split``: the
  data the columns were evaluated on, named in the header)."""
  acc = np.asarray(accuracy)
  head = f"after \\ {split[:4]:<4} " + " ".join(f"{f'exp{j}':>6}"
                                     for j in range(acc.shape[1]))
  lines = [head, "-" * len(head)]
  for i, row in enumerate(acc):
    lines.append(f"{f'exp{i}':>12} " + " ".join(f"{v:6.3f}" for v in row))
  lines.append("")
  # Right-aligned names (12 wide, wider for a longer name: inc_acc_pooled).
  width = max([12] + [len(k) for k in summary])
  lines += [f"{k:>{width}}: {v: .4f}" for k, v in summary.items()]
  return "\n".join(lines)


def figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
  """A matplotlib figure and its axes, for writing to a file.

  Built without ``pyplot``: no display backend is chosen (servers have
  none), nothing global keeps the figure alive (no ``close``), and a run
  does not pay pyplot's import (0.4 s of the README's ``jaxcl run``).
  """
  from matplotlib.figure import Figure

  fig = Figure(figsize=figsize)
  return fig, fig.subplots()


def plot_accuracy_matrix(accuracy: np.ndarray, path: str,
                         split: str = "test", runs: int = 1) -> None:
  """A heatmap of ``R[i, j]`` with the values written in the cells."""
  acc = np.asarray(accuracy)
  fig, ax = figure((1 + 0.6 * acc.shape[1], 1 + 0.6 * acc.shape[0]))
  im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis")
  if acc.size <= 400:
    for (i, j), v in np.ndenumerate(acc):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
              color="w" if v < 0.6 else "k")
  ax.set_xlabel(f"{split} experience")
  ax.set_ylabel("after training experience")
  ax.set_title("accuracy matrix" + (f" (mean of {runs} runs)"
                                     if runs > 1 else ""))
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


# Above this many curves the legend leaves the axes (inside, it covered
# them) and the colours run through a 20-colour map with line styles.
LEGEND_INSIDE = 8


def curve_legend(fig: Any, ax: Any) -> None:
  """A legend for ``ax``'s curves that does not hide them: inside the axes
  for up to :data:`LEGEND_INSIDE` curves; beyond, beside the axes (the
  figure widened and heightened to fit; save it with
  ``bbox_inches='tight'``), each curve with its own colour and line style
  (matplotlib's default cycle repeats after 10)."""
  from matplotlib import colormaps

  curves = ax.get_lines()
  if not curves:
    return
  if len(curves) <= LEGEND_INSIDE:
    ax.legend(fontsize=7)
    return
  cmap = colormaps["tab20"]
  for i, line in enumerate(curves):
    line.set_color(cmap(i % 20))
    line.set_linestyle(("-", "--", ":")[(i // 20) % 3])
  cols = 1 if len(curves) <= 24 else 2
  w, h = fig.get_size_inches()
  fig.set_size_inches(w + 3.2 * cols,
                      max(h, 0.17 * math.ceil(len(curves) / cols) + 0.8))
  ax.legend(fontsize=6, ncol=cols, loc="upper left",
            bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def integer_ticks(ax: Any) -> None:
  """Whole-number ticks on ``ax``'s x axis (a count of experiences)."""
  from matplotlib.ticker import MaxNLocator

  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def seen_average(accuracy: np.ndarray,
                 per_experience: bool | None = None) -> np.ndarray:
  """Average accuracy over the experiences seen, after each experience;
  over every test set when they are not one per experience (Joint's).
  ``per_experience`` None: guessed from the matrix, a single row being
  Joint's."""
  acc = np.asarray(accuracy)
  if per_experience is None:
    per_experience = acc.shape[0] > 1
  return np.array([float(np.mean(row[:i + 1] if per_experience else row))
                   for i, row in enumerate(acc)])


def plot_average_accuracy(accuracy: np.ndarray, path: str,
                          per_experience: bool | None = None) -> Any:
  """Average accuracy over the experiences seen, after each experience
  (:func:`seen_average`); returns the figure."""
  ys = seen_average(accuracy, per_experience)
  fig, ax = figure((5, 3.5))
  ax.plot(np.arange(1, len(ys) + 1), ys, marker="o")
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("experiences trained")
  integer_ticks(ax)
  ax.set_ylabel("average accuracy (seen)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return fig


def plot_accuracy_curve(curve: Any, path: str, split: str = "test",
                        runs: int = 1,
                        per_experience: bool | None = None) -> Any:
  """The continual-evaluation curve: each test set's accuracy over the
  training steps from when its experience starts training (the stability
  gap shows as a dip at the next experience's start), the average over
  the experiences seen (:func:`jaxcl.metrics.seen_accuracy`), and the
  experiences' ends as dotted lines; returns the figure."""
  acc = np.asarray(curve.accuracy)
  step, exp = np.asarray(curve.step), np.asarray(curve.experience)
  n_test = acc.shape[1]
  square = (n_test == int(exp.max()) + 1 if per_experience is None
            else per_experience)
  fig, ax = figure((7, 4))
  colors = [f"C{j % 10}" for j in range(n_test)]
  for j in range(n_test):
    on = exp >= (j if square else 0)
    if on.any():  # from the point before (its start) onwards
      first = max(int(np.argmax(on)) - 1, 0)
      ax.plot(step[first:], acc[first:, j], color=colors[j], lw=1,
              label=f"exp{j}" if n_test <= 10 else None)
  seen = metrics.seen_accuracy(exp, acc, square)
  ax.plot(step, seen, color="k", lw=2, label="average (seen)")
  exposed = getattr(curve, "exposed", None)
  if exposed is not None:
    ax.plot(step, exposed, color="k", lw=1.5, ls="--",
            label="exposed classes")
  for e in np.unique(exp[exp >= 0]):
    ax.axvline(step[exp == e][-1], color="gray", ls=":", lw=0.8)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("training step")
  ax.set_ylabel(f"{split} accuracy")
  ax.set_title("continual evaluation" + (f" (mean of {runs} runs)"
                                          if runs > 1 else ""))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return fig
