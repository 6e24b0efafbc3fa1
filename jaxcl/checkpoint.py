"""Checkpoint, resume and fall back, with orbax.

A checkpoint is an explicit pytree — never a pickled object (the peer that
pickles its whole strategy breaks on every upgrade):

* ``state``: the :class:`TrainState` (params, optimiser state, strategy state
  such as buffers / Fisher / masks, the PRNG key), stacked over runs in a
  sweep;
* ``progress``: the accuracy matrix so far (NaN rows not yet trained) and the
  random-init accuracies;
* ``meta`` (JSON): the stream position and the run's config fingerprint.

The position says where the state stands: ``phase='begin'`` of experience
``i`` (nothing of it done yet), or ``phase='train'`` of experience ``i`` at
``(epoch, step)`` with its ``before_experience`` hook already applied. Keys
derive from the state's base key and the step count, so a resumed run draws
exactly the same batches and keys: a run killed anywhere and resumed ends
bit-identical to one that never stopped.

Orbax writes each checkpoint to a temporary directory and renames it when
complete; an unfinished one is never listed. A checkpoint that exists but
fails to restore (truncated or corrupt files) is reported and skipped for the
next older one. At least two checkpoints are kept, so deleting the oldest
never removes the only valid one.

A checkpoint that reads but holds another state (a strategy's state gained a
field in a newer jaxcl, a parameter changed shape) is refused, like one of
another config: its tree, shapes and dtypes, from orbax's metadata, are
compared with the state this run builds before any array is read. It is not
treated as corrupt: falling back over it would start the run over in its
directory, and the new saves would rotate it out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np

__all__ = ["Position", "Checkpointer", "IncompatibleCheckpointError",
           "fingerprint", "differences"]

# Config sections that do not change what a run computes.
_IGNORED = ("report", "checkpoint", "name", "parallel")
# Where the data is read from does not change the computation (moving the
# IDX files, or spelling the path differently, must not refuse a resume).
_IGNORED_FIELDS = ("dataset.data_dir",)


class IncompatibleCheckpointError(ValueError):
  """The run directory holds a checkpoint of a different configuration, or
  one whose state this version of jaxcl does not build."""


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a saved state stands in the stream."""
  experience: int = 0
  phase: str = "begin"   # "begin" | "train"
  epoch: int = 0
  step: int = 0          # next step of the epoch to run (phase "train")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def where(self) -> str:
    """``'2 experience(s) done'`` or ``'in experience 3, epoch 1, step
    15'``."""
    if self.phase == "begin":
      return f"{self.experience} experience(s) done"
    return (f"in experience {self.experience + 1}, epoch {self.epoch + 1}, "
            f"step {self.step}")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
  else:
    out[prefix[:-1]] = d
  return out


def check_keep(keep: int) -> None:
  """Refuses ``checkpoint.keep`` below 2."""
  if keep < 2:
    raise ValueError(
        f"checkpoint.keep={keep}: keep at least 2 so that a crash while "
        "saving can never leave the run without a valid checkpoint")


def fingerprint(config: Any) -> dict[str, Any]:
  """The config fields that determine the computation, flattened to
  ``{'model.widths': [400, 400], ...}`` (JSON types)."""
  d = json.loads(config.to_json_best_effort()) if hasattr(
      config, "to_json_best_effort") else dict(config)
  return _comparable(_flatten(d))


def run_fingerprint(config: Any,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """:func:`fingerprint` plus a caller's ``extra`` fields (a sweep's
  members), as stored in a checkpoint's JSON metadata (tuples as lists),
  so that it compares equal to a stored one."""
  return json.loads(json.dumps({**fingerprint(config), **(extra or {})}))


def _comparable(fp: dict[str, Any]) -> dict[str, Any]:
  """A fingerprint without the ignored fields (older checkpoints and result
  caches stored some of them)."""
  return {k: v for k, v in fp.items()
          if k.split(".")[0] not in _IGNORED and k not in _IGNORED_FIELDS}


def _leaves(tree: Any) -> dict[str, Any]:
  """``{'strategy.buffer.x': (shape, dtype), ...}`` for a pytree or orbax's
  metadata tree of one, named as orbax names the stored arrays
  (NamedTuple / dataclass fields by name, sequence items by index). Empty
  nodes (``()``, ``{}``, an ``EmptyState``; ``None`` in metadata) map to
  None: orbax needs them at the same places too."""
  import orbax.checkpoint as ocp
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=ocp.utils.is_empty_or_leaf)
  out = {}
  for path, leaf in flat:
    name = ".".join(ocp.tree.str_keypath(path))
    if leaf is None or ocp.utils.is_empty_node(leaf):
      out[name] = None
    else:  # arrays, ShapeDtypeStructs, ArrayMetadata, Python scalars
      dtype = getattr(leaf, "dtype", None)
      out[name] = (tuple(getattr(leaf, "shape", ())),
                   np.dtype(type(leaf) if dtype is None else dtype))
  return out


def _tree_differences(saved: Any, current: Any, prefix: str = "",
                     dtypes: bool = True) -> list[str]:
  """Where a checkpoint's stored tree (orbax metadata) differs from the
  pytree this run restores into, as messages naming each path; empty when
  every array is where this run expects it, with its shape (and dtype,
  when ``dtypes``: orbax would cast it silently)."""
  a, b = _leaves(saved), _leaves(current)

  def show(v):
    return "empty" if v is None else f"{v[1].name}{list(v[0])}"

  out = []
  for k in sorted(set(a) | set(b)):
    name = prefix + (k or "<root>")
    if k not in b:
      out.append(f"{name}: in the checkpoint ({show(a[k])}), not in this "
                 "version")
    elif k not in a:
      out.append(f"{name}: in this version ({show(b[k])}), not in the "
                 "checkpoint")
    elif (a[k] is None) != (b[k] is None) or (
        a[k] is not None and (a[k][0] != b[k][0] or (
            dtypes and a[k][1] != b[k][1]))):
      out.append(f"{name}: {show(a[k])} in the checkpoint, {show(b[k])} in "
                 "this version")
  return out


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The fields in which two fingerprints differ, as messages; empty when a
  run with ``current`` may resume (or reuse) what ``saved`` computed."""
  saved, current = _comparable(saved), _comparable(current)
  # A field added to the config after the checkpoint was written, at its
  # default, computes what the old code did (e.g. model.init).
  from jaxcl.experiment import default_config  # late: experiment imports us
  defaults = fingerprint(default_config())
  saved = dict(saved, **{k: v for k, v in current.items()
                         if k not in saved and k in defaults
                         and defaults[k] == v})
  keys = sorted(set(saved) | set(current))
  return [f"{k}: checkpoint has {saved.get(k, '<absent>')!r}, this run has "
          f"{current.get(k, '<absent>')!r}"
          for k in keys if saved.get(k, "<absent>") != current.get(
              k, "<absent>")]


class Checkpointer:
  """Saves and restores a run's checkpoints in ``<workdir>/checkpoints``.

  Args:
    workdir: the run directory.
    config_fp: :func:`fingerprint` of the run's config.
    keep: checkpoints to keep (>= 2).
    log: where to say what happened (fallbacks, resumes).
  """

  def __init__(self, workdir: str, config_fp: dict[str, Any], keep: int = 3,
               log=None):
    import orbax.checkpoint as ocp  # heavy import, only when checkpointing

    check_keep(keep)
    self._ocp = ocp
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.config_fp = config_fp
    self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    # The handlers are named so that a step's metadata can be read alone
    # (restore compares the stored tree with the expected state first).
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           progress=ocp.StandardCheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))
    steps = self._manager.all_steps()
    self._next = (max(steps) + 1) if steps else 0

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state: Any, progress: dict[str, np.ndarray],
           position: Position, seconds: float | None = None) -> None:
    """Saves asynchronously; call :meth:`close` before the process ends.

    ``seconds``: the run's wall time up to this state, over all the
    invocations that led to it (restored as ``progress['seconds']``).
    """
    ocp = self._ocp
    meta = {"position": position.to_json(), "config": self.config_fp}
    if seconds is not None:
      meta["seconds"] = float(seconds)
    self._manager.save(
        self._next,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.StandardSave(progress),
            meta=ocp.args.JsonSave(meta)))
    self._next += 1

  def restore(self, state_like: Any, progress_like: dict[str, np.ndarray],
              optional: Sequence[str] = ()):
    """The newest valid checkpoint as ``(state, progress, position)``.

    ``progress`` also holds ``seconds``, the run's wall time up to the
    checkpoint (NaN for checkpoints saved without it). Returns None when
    there is none. Falls back over corrupt checkpoints, saying so.
    ``optional``: keys of ``progress_like`` that older checkpoints lack;
    ``progress`` has them only when the checkpoint does.

    Raises:
      IncompatibleCheckpointError: the newest readable checkpoint comes from
        another configuration, or holds a state of another tree, shapes or
        dtypes than ``state_like`` (another jaxcl version); the message
        lists what differs. Nothing in the directory is changed.
    """
    ocp = self._ocp
    steps = self.steps()
    for step, meta in self._metas():
      diff = differences(meta.get("config", {}), self.config_fp)
      if diff:
        raise IncompatibleCheckpointError(
            f"the run directory's checkpoint ({self.directory}, step {step}) "
            "comes from a different config; refusing to resume. "
            "Differences:\n  " + "\n  ".join(diff) +
            "\nUse another --workdir, or the original config.")
      try:
        stored = self._manager.metadata(step).item_metadata
        stored = {k: getattr(stored.get(k), "tree", None)
                  for k in ("state", "progress")}
      except Exception:  # unreadable metadata: the restore below says so
        stored = {}
      wanted = progress_like
      if isinstance(stored.get("progress"), dict):
        wanted = {k: v for k, v in progress_like.items()
                  if k not in optional or k in stored["progress"]}
      if all(stored.get(k) is not None for k in ("state", "progress")):
        # Progress dtypes are not compared: checkpoints written before
        # session 35 saved the random accuracies as float32 (restored
        # into float64, a harmless cast).
        diff = (_tree_differences(stored["state"], state_like) +
                _tree_differences(stored["progress"], wanted,
                                 "progress.", dtypes=False))
        if diff:
          more = (f"\n  ... and {len(diff) - 10} more" if len(diff) > 10
                  else "")
          raise IncompatibleCheckpointError(
              f"the run directory's checkpoint ({self.directory}, step "
              f"{step}) has the same config but holds a state this version "
              "of jaxcl does not build (a strategy's state or the model's "
              "parameters changed since it was written); refusing to "
              "resume, and leaving the directory as it is. First "
              "differences:\n  " + "\n  ".join(diff[:10]) + more +
              "\nUse another --workdir to start afresh, or resume with the "
              "jaxcl version that wrote the checkpoint.")
      try:
        abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(state_like)),
                progress=ocp.args.StandardRestore(abstract(wanted))))
      except Exception as e:  # truncated / corrupt array files
        self._log(f"jaxcl: checkpoint {step} in {self.directory} is corrupt "
                  f"({type(e).__name__}: {str(e)[:200]}); falling back to "
                  "the previous one")
        continue
      position = Position(**meta["position"])
      self._log(f"jaxcl: resumed from checkpoint {step} ({position.where()})" +
                (", the newest valid one" if step != steps[-1] else ""))
      progress = dict(restored["progress"])
      progress["seconds"] = float(meta.get("seconds", float("nan")))
      return restored["state"], progress, position
    return None

  def _metas(self):
    """``(step, metadata)`` of each checkpoint, newest first, skipping (and
    saying so) those whose metadata does not read."""
    ocp = self._ocp
    for step in reversed(self.steps()):
      try:
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # corrupt metadata: any error means unusable
        self._log(f"jaxcl: checkpoint {step} in {self.directory} is "
                  f"unreadable ({type(e).__name__}: {str(e)[:200]}); "
                  "falling back to the previous one")
        continue
      yield step, meta

  def newest(self) -> tuple[int, Position, list[str]] | None:
    """The newest checkpoint whose metadata reads, as ``(step, position,
    differences)``: where it stands and how its config differs from this
    run's (:func:`differences`; empty: :meth:`restore` would resume from
    it, unless its arrays turn out corrupt or of another state). None
    when there is none. Reads metadata only (``--dry_run``)."""
    for step, meta in self._metas():
      return (step, Position(**meta["position"]),
              differences(meta.get("config", {}), self.config_fp))
    return None

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
