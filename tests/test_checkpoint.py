"""Checkpointed streams: SIGKILL anywhere, resume, bit-identical results;
corrupt checkpoints fall back; incompatible configs are refused."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import resume_driver
from resume_driver import REPO, assert_same, driver_env

DRIVER = os.path.join(REPO, "tests", "resume_driver.py")


@pytest.fixture(scope="module", autouse=True)
def _persistent_compilation_cache(child_env):
  """The tests here run the same config several times in this process
  (reference, interrupted, resumed): each ``jaxcl.run`` builds its
  programs anew, and XLA compiled each copy again (2-3 s a run). With
  JAX's persistent compilation cache, for this file only, a copy is read
  back from the cache (conftest.py's ``child_env`` directory, which the
  drivers' processes share), as a resume in a new process would.
  Restored after the file: other files compile as before."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  keys = ("jax_compilation_cache_dir",
          "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], child_env["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update(keys[1], float(
      child_env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  cc.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()


@pytest.fixture(scope="module")
def drive(child_env):
  """``drive(workdir, out, *args)``: resume_driver.py's invocation in a
  child forked from one process that imported jax, jaxcl and orbax once
  (resume_driver.forker; ~3 s of CPU less per invocation), in
  conftest.py's ``child_env``."""
  yield from resume_driver.forker(child_env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, drive):
  """An uninterrupted run: its outputs (``ref.npz``) and, beside them, its
  run directory ``run`` (tests copy it, never change it)."""
  d = tmp_path_factory.mktemp("ref")
  start = time.monotonic()
  p = drive(d / "run", d / "ref.npz")
  assert p.returncode == 0, p.stderr[-3000:]
  # Its wall time, for a kill at a moment inside a whole run.
  (d / "ref.seconds").write_text(str(time.monotonic() - start))
  return d / "ref.npz"


def copy_of_reference_run(reference, tmp_path):
  """A copy of the reference's run directory: checkpoints of this config
  (the last three of a finished run), without running it again."""
  work = tmp_path / "run"
  shutil.copytree(reference.parent / "run", work)
  return work


def test_killed_anywhere_resumes_bit_identical(tmp_path, reference, drive,
                                               child_env):
  work = tmp_path / "run"
  # Kill points (the n-th save of each invocation; 4 saves an experience,
  # resume_driver.config): mid-epoch before a save, during async saves, at
  # an experience boundary (the second kill, during the save after
  # experience 0), through experience 2 of 5; each kill is followed by a
  # resume in the same dir.
  for mode, n in [("before", 3), ("during", 2), ("during", 1),
                  ("before", 5), ("during", 2)]:
    p = drive(work, tmp_path / "x.npz", mode, n)
    assert p.returncode == -signal.SIGKILL, (mode, n, p.stderr[-3000:])
  p = drive(work, tmp_path / "final.npz")
  assert p.returncode == 0, p.stderr[-3000:]
  # A resume says where it starts from (it used to be silent).
  assert re.search(r"jaxcl: resumed from checkpoint \d+ \((\d experience"
                   r"\(s\) done|in experience \d, epoch \d, step \d+)\)$",
                   p.stderr, re.M), p.stderr[-2000:]
  assert_same(tmp_path / "final.npz", reference)
  # The log holds each record once, as an uninterrupted run's does: the
  # steps a killed invocation logged past its last checkpoint are dropped
  # on resume (they used to appear twice).
  assert log_records(work) == log_records(reference.parent / "run")

  # A kill at an arbitrary moment of a whole run (whatever the process is
  # doing then: importing, compiling, training, saving), in a fresh
  # directory. It must land while the run is alive: a kill after the end
  # checked nothing (session 39 found the old fixed 6 s wait landing after
  # the last resume had finished), so a run that outlives none of the
  # waits fails the test instead of passing it. A new process, not a
  # forked one, so that a kill can land in its imports too (the waits are
  # fractions of the forked reference's time, which has none).
  whole = float((reference.parent / "ref.seconds").read_text())
  fresh = tmp_path / "fresh"
  for wait in (0.6 * whole, 0.3 * whole, 0.15 * whole):
    shutil.rmtree(fresh, ignore_errors=True)
    proc = subprocess.Popen([sys.executable, DRIVER, str(fresh),
                             str(tmp_path / "x.npz")],
                            env=driver_env(child_env),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(wait)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if alive:
      break
  assert alive, f"every run ended within {wait:.1f} s; no kill landed"
  p = drive(fresh, tmp_path / "final_fresh.npz")
  assert p.returncode == 0, p.stderr[-3000:]
  assert_same(tmp_path / "final_fresh.npz", reference)
  assert log_records(fresh) == log_records(reference.parent / "run")


def log_records(workdir):
  """metrics.jsonl without its wall times: the final record's and each
  experience's ``after_experience_seconds`` (checked to be there)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for r in records:
    r.pop("times", None)
    if "experience" in r:
      assert r.pop("after_experience_seconds") >= 0
  return records


def test_corrupt_latest_checkpoint_falls_back(tmp_path, reference, drive):
  # The finished reference run's checkpoints: the newest (after the last
  # experience) is corrupted, the resume falls back to the one before it
  # (inside the last experience) and must still end bit-identical.
  work = copy_of_reference_run(reference, tmp_path)
  ckdir = work / "checkpoints"
  steps = sorted(int(s) for s in os.listdir(ckdir) if s.isdigit())
  assert len(steps) >= 2
  latest = ckdir / str(steps[-1])
  n_corrupted = 0
  for root, _, files in os.walk(latest):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.truncate(max(os.path.getsize(path) // 3, 1))
      n_corrupted += 1
  assert n_corrupted > 0
  p = drive(work, tmp_path / "final.npz")
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"checkpoint {steps[-1]}" in p.stderr
  assert "falling back" in p.stderr
  assert re.search(r"jaxcl: resumed from checkpoint \d+ \(.*\), the newest "
                   "valid one", p.stderr), p.stderr[-2000:]
  assert_same(tmp_path / "final.npz", reference)
  # The valid checkpoints were never all deleted on the way.
  assert len([s for s in os.listdir(ckdir) if s.isdigit()]) >= 2


def test_incompatible_config_is_refused(tmp_path, reference, drive):
  work = copy_of_reference_run(reference, tmp_path)
  before = sorted(os.listdir(work / "checkpoints"))
  assert len([s for s in before if s.isdigit()]) >= 2
  p = drive(work, tmp_path / "y.npz", "none", -1, "64")
  assert p.returncode != 0
  assert "IncompatibleCheckpointError" in p.stderr
  assert "model.widths" in p.stderr and "[32]" in p.stderr
  assert sorted(os.listdir(work / "checkpoints")) == before


def test_keep_must_allow_a_fallback(tmp_path):
  import jaxcl
  from resume_driver import config
  c = config()
  c.checkpoint.keep = 1
  with pytest.raises(ValueError, match="keep at least 2"):
    jaxcl.run(c, str(tmp_path / "r"))


def test_workdir_that_is_a_file_is_refused_untouched(tmp_path):
  import jaxcl
  from resume_driver import config
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  with pytest.raises(ValueError, match="workdir .*notes.txt' is a file"):
    jaxcl.run(config(), str(path))
  with pytest.raises(ValueError, match="notes.txt/run'.*notes.txt' is a "
                     "file"):
    jaxcl.run(config(), str(path / "run"))
  assert path.read_text() == "mine"


def test_data_dir_is_not_part_of_the_fingerprint():
  """Moving the data (or spelling its path differently) changes nothing
  computed: resumes and cached results stay valid; older fingerprints
  that stored the path still compare equal."""
  from jaxcl import checkpoint, experiment
  a = experiment.default_config()
  b = experiment.default_config()
  a.dataset.data_dir, b.dataset.data_dir = "/x/../data", "/data"
  assert checkpoint.fingerprint(a) == checkpoint.fingerprint(b)
  old = dict(checkpoint.fingerprint(a), **{"dataset.data_dir": "/x"})
  assert checkpoint.differences(old, checkpoint.fingerprint(b)) == []
  b.dataset.name = "mnist"
  assert checkpoint.differences(old, checkpoint.fingerprint(b))


def test_field_added_later_at_its_default_is_not_a_difference():
  """A checkpoint written before a config field existed resumes when the
  field has its default (the old behaviour), and is refused otherwise."""
  from jaxcl import checkpoint, experiment
  c = experiment.default_config()
  old = checkpoint.fingerprint(c)
  del old["model.init"]
  assert checkpoint.differences(old, checkpoint.fingerprint(c)) == []
  c.model.init = "torch"
  diff = checkpoint.differences(old, checkpoint.fingerprint(c))
  assert diff and "model.init" in diff[0]


def test_resumed_run_counts_the_earlier_invocations_time(tmp_path):
  """Each checkpoint records the run's wall time so far; a resumed run
  reports it as ``times['before']`` (0 for a fresh run), and a checkpoint
  saved without it restores as NaN (unknown), not as 0."""
  import jax.numpy as jnp

  import jaxcl
  from jaxcl import checkpoint
  from resume_driver import config
  first = jaxcl.run(config(), str(tmp_path / "r"))
  assert first.times["before"] == 0.0
  again = jaxcl.run(config(), str(tmp_path / "r"))  # resumes at the end
  assert first.times["train"] < again.times["before"] <= \
      first.times["total"] + 1e-6
  assert again.times["total"] < first.times["train"]  # nothing retrained
  # A checkpoint without the time (saved before it was recorded).
  ck = checkpoint.Checkpointer(str(tmp_path / "old"), {"a": 1})
  state, progress = {"w": jnp.ones(3)}, {"accuracy": np.zeros((2, 2))}
  ck.save(state, progress, checkpoint.Position(1, "begin"))
  ck.save(state, progress, checkpoint.Position(2, "begin"), seconds=12.5)
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path / "old"), {"a": 1})
  _, p, pos = ck.restore(state, progress)
  assert pos.experience == 2 and p["seconds"] == 12.5
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path / "old2"), {"a": 1})
  ck.save(state, progress, checkpoint.Position(1, "begin"))
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path / "old2"), {"a": 1})
  assert np.isnan(ck.restore(state, progress)[1]["seconds"])
  ck.close()


def _files(directory):
  """Every file under ``directory`` with its size and mtime."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), directory)] = (
          st.st_size, st.st_mtime_ns)
  return out


def test_checkpoint_of_another_state_tree_is_refused_untouched(tmp_path):
  """Same config, but the state this code builds differs from the saved
  one (a strategy's state gained a field in a newer jaxcl; an array changed
  shape): the resume is refused naming the paths, and nothing in the run
  directory changes. It used to be taken for a corrupt checkpoint: every
  one was skipped, the run started over in the same directory, and its
  saves rotated the old checkpoints out."""
  import jax.numpy as jnp

  import jaxcl
  from jaxcl import checkpoint
  from resume_driver import config
  c = config()
  c.train.epochs, c.scenario.n_experiences = 1, 2
  work = str(tmp_path / "run")

  def with_state(**leaves):
    return jaxcl.identity()._replace(
        init=lambda ctx, key, params: dict(leaves))

  jaxcl.run(c, work, strategy=with_state(a=jnp.zeros(3)))
  before = _files(work)
  assert len([s for s in os.listdir(os.path.join(work, "checkpoints"))
              if s.isdigit()]) >= 2
  for strategy, says in [
      (with_state(a=jnp.zeros(3), lower=jnp.zeros(2)),
       r"strategy\.lower: in this version \(float32\[2\]\), not in the "
       r"checkpoint"),
      (with_state(), r"strategy\.a: in the checkpoint \(float32\[3\]\), not "
       r"in this version"),
      (with_state(a=jnp.zeros(4)),
       r"strategy\.a: float32\[3\] in the checkpoint, float32\[4\] in this "
       r"version"),
      (with_state(a=jnp.zeros(3, jnp.int32)),  # orbax would cast it
       r"strategy\.a: float32\[3\] in the checkpoint, int32\[3\] in this "
       r"version")]:
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as e:
      jaxcl.run(c, work, strategy=strategy)
    assert re.search(says, str(e.value)), str(e.value)
    assert "same config" in str(e.value) and "--workdir" in str(e.value)
    assert _files(work) == before  # no checkpoint, log or plot touched
  # The state it was written with still resumes (at its end).
  r = jaxcl.run(c, work, strategy=with_state(a=jnp.zeros(3)))
  assert r.times["before"] > 0 and not np.isnan(r.accuracy).any()


def test_corrupt_newest_does_not_hide_an_incompatible_state(tmp_path):
  """Falling back over a corrupt checkpoint still refuses an older one
  whose parameters changed shape: the run never starts over beside it."""
  import jax.numpy as jnp

  from jaxcl import checkpoint
  d = str(tmp_path / "r")
  progress = {"accuracy": np.zeros((2, 2))}
  old = {"params": {"head": {"kernel": jnp.ones((4, 3))}}}
  ck = checkpoint.Checkpointer(d, {"a": 1})
  for i in range(3):
    ck.save(old, progress, checkpoint.Position(i, "begin"))
  ck.close()
  newest = os.path.join(d, "checkpoints", "2")
  for root, _, files in os.walk(newest):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.truncate(max(os.path.getsize(path) // 3, 1))
  before = _files(d)
  logged = []
  ck = checkpoint.Checkpointer(d, {"a": 1}, log=logged.append)
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"step 1\).*\n  params\.head\.kernel: float32"
                     r"\[4, 3\] in the checkpoint, float32\[4, 5\] in this"):
    ck.restore({"params": {"head": {"kernel": jnp.ones((4, 5))}}}, progress)
  ck.close()
  assert any("checkpoint 2" in m and "falling back" in m for m in logged)
  assert _files(d) == before
  # The same shapes still fall back over the corrupt one and resume.
  ck = checkpoint.Checkpointer(d, {"a": 1}, log=logged.append)
  state, _, pos = ck.restore(old, progress)
  ck.close()
  assert pos.experience == 1
  np.testing.assert_array_equal(state["params"]["head"]["kernel"],
                                np.ones((4, 3)))


def test_tree_differences_name_each_path(tmp_path):
  """The comparison behind the refusal, on orbax's own metadata: fields by
  name, items by index, an empty node where an array was, and nothing for
  the same tree (whatever its container types: orbax stores NamedTuples as
  dicts and tuples as lists)."""
  from typing import NamedTuple

  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from jaxcl import checkpoint

  class S(NamedTuple):
    mem: tuple
    seen: jnp.ndarray

  tree = {"strategy": S((jnp.zeros((2, 3)), ()), jnp.zeros(4, jnp.int32))}
  ck = ocp.StandardCheckpointer()
  ck.save(tmp_path / "x", tree)
  ck.wait_until_finished()
  stored = ck.metadata(tmp_path / "x").item_metadata.tree
  assert checkpoint._tree_differences(stored, tree) == []
  other = {"strategy": S((jnp.zeros((2, 3), jnp.bfloat16), jnp.zeros(1)),
                         ())}
  assert checkpoint._tree_differences(stored, other) == [
      "strategy.mem.0: float32[2, 3] in the checkpoint, bfloat16[2, 3] in "
      "this version",
      "strategy.mem.1: empty in the checkpoint, float32[1] in this version",
      "strategy.seen: int32[4] in the checkpoint, empty in this version"]
  assert checkpoint._tree_differences(stored, other, dtypes=False)[0] \
      .startswith("strategy.mem.1")


def test_unreadable_state_metadata_falls_back(tmp_path):
  """A checkpoint whose meta reads but whose state's tree metadata is
  truncated is corrupt, not incompatible: skipped for the older one."""
  import jax.numpy as jnp

  from jaxcl import checkpoint
  d = str(tmp_path / "r")
  state, progress = {"w": jnp.arange(3.0)}, {"accuracy": np.zeros((2, 2))}
  ck = checkpoint.Checkpointer(d, {"a": 1})
  ck.save(state, progress, checkpoint.Position(1, "begin"))
  ck.save(state, progress, checkpoint.Position(2, "begin"))
  ck.close()
  path = os.path.join(d, "checkpoints", "1", "state", "_METADATA")
  with open(path, "r+b") as fh:
    fh.truncate(os.path.getsize(path) // 3)
  logged = []
  ck = checkpoint.Checkpointer(d, {"a": 1}, log=logged.append)
  restored, _, pos = ck.restore(state, progress)
  ck.close()
  assert pos.experience == 1 and "falling back" in logged[0]
  np.testing.assert_array_equal(restored["w"], np.arange(3.0))


def test_fingerprint_ignores_only_what_does_not_change_the_computation():
  """How often a run checkpoints (and how many it keeps), what it reports,
  its name and its devices do not change what it computes: a resume with
  other values of them is not refused. Any other field is a difference
  naming the field and both values."""
  from jaxcl import checkpoint, experiment
  a = experiment.default_config()
  b = experiment.default_config()
  b.checkpoint.every_steps, b.checkpoint.keep = 7, 5
  b.report.plots, b.report.tensorboard = False, False
  b.name, b.parallel.devices = "other", 0
  assert checkpoint.fingerprint(a) == checkpoint.fingerprint(b)
  assert checkpoint.differences(checkpoint.fingerprint(a),
                                checkpoint.fingerprint(b)) == []
  b.train.epochs = 3
  assert checkpoint.differences(checkpoint.fingerprint(a),
                                checkpoint.fingerprint(b)) == [
                                    "train.epochs: checkpoint has 2, this "
                                    "run has 3"]
  # A field the checkpoint holds and this run does not (a sweep's
  # checkpoint of stacked states, resumed by a single run) is a
  # difference; so is one this run adds that no config default explains.
  fp = checkpoint.fingerprint(a)
  sweep = dict(fp, **{"sweep.vmapped": False})
  assert checkpoint.differences(sweep, fp) == [
      "sweep.vmapped: checkpoint has False, this run has '<absent>'"]
  assert checkpoint.differences(fp, sweep) == [
      "sweep.vmapped: checkpoint has '<absent>', this run has False"]


def _saves_until(monkeypatch, n):
  """Makes ``Checkpointer.save`` record each position it is asked to save
  and raise :class:`_Interrupted` at the ``n``-th one (from 1; never for
  n = 0), before saving it: a crash inside the process, the previous save
  being the newest checkpoint. Returns the list of positions."""
  from jaxcl import checkpoint
  real = checkpoint.Checkpointer.save
  real = getattr(real, "real", real)  # not an earlier call's wrapper
  positions = []

  def save(self, state, progress, position, seconds=None):
    positions.append(position)
    if len(positions) == n:
      raise _Interrupted(position)
    real(self, state, progress, position, seconds)
  save.real = real
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  return positions


class _Interrupted(Exception):
  pass


def test_resume_restores_every_part_of_the_state(tmp_path, monkeypatch):
  """The subprocess kill test runs Naive on an MLP, whose strategy and
  model states are empty (and whose optimiser is reset at each experience):
  dropping them on resume passed it. Here a batch-norm MLP (model_state),
  reservoir replay (strategy state: memory, experience, key) and SGD
  momentum kept across experiences (opt_state), interrupted inside an
  experience and again at an experience boundary, end bit-identical to an
  uninterrupted run: every state leaf, the accuracy matrix, the random
  accuracies, the log. ``resume`` and ``checkpoint.keep`` are honoured, and
  the wall time adds up over the invocations."""
  import jax

  import jaxcl
  from jaxcl import checkpoint
  from resume_driver import config
  c = config()
  c.model.name, c.model.bn_mlp = "bn_mlp", dict(widths=(16,))
  c.strategy.name, c.strategy.replay = "replay", dict(mem_size=40)
  c.scenario.n_experiences, c.train.epochs = 2, 1
  c.train.reset_optimizer = False
  # A save every 20 steps (43 per experience): at 20, 40 and each
  # experience's end, 6 a run (orbax's saves are most of these runs' time).
  c.checkpoint.every_steps, c.checkpoint.keep = 20, 2
  ref_dir, work = str(tmp_path / "ref"), str(tmp_path / "run")
  saved = _saves_until(monkeypatch, 0)
  ref = jaxcl.run(c, ref_dir, resume=False)
  assert {"batch_stats"} <= set(ref.state.model_state)
  assert int(ref.state.strategy.memory.seen) > 0
  # keep=2 (the default is 3): the last two saves stay.
  steps = sorted(int(s) for s in os.listdir(os.path.join(ref_dir,
                                                         "checkpoints"))
                 if s.isdigit())
  assert steps == [len(saved) - 2, len(saved) - 1], (steps, len(saved))
  with pytest.raises(jaxcl.ConfigError, match="already holds checkpoints"):
    jaxcl.run(c, ref_dir, resume=False)
  with pytest.raises(jaxcl.ConfigError, match="no checkpoint to resume"):
    jaxcl.run(c, work, resume=True)
  # Interrupted after the ref's mid-th save (inside experience 1), then
  # after its end-th (experience 1's end: experience 2 starts from its
  # checkpoint). An invocation's saves count from 1.
  mid = 1 + [k for k, p in enumerate(saved)
             if p.experience == 0 and p.phase == "train" and p.step > 0][0]
  end = 1 + saved.index(checkpoint.Position(1, "begin"))
  for done, upto in ((0, mid), (mid, end)):
    _saves_until(monkeypatch, upto - done + 1)
    with pytest.raises(_Interrupted) as e:
      jaxcl.run(c, work)
    assert e.value.args[0] == saved[upto]  # resumed where it was
  _saves_until(monkeypatch, 0)
  final = jaxcl.run(c, work, resume=True)
  assert final.times["before"] > 0
  np.testing.assert_array_equal(final.accuracy, ref.accuracy)
  np.testing.assert_array_equal(final.random_accuracy, ref.random_accuracy)
  assert final.random_accuracy.dtype == ref.random_accuracy.dtype
  got, want = (jax.tree_util.tree_flatten_with_path(r.state)[0]
               for r in (final, ref))
  assert [k for k, _ in got] == [k for k, _ in want]
  for (path, a), (_, b) in zip(got, want):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert log_records(work) == log_records(ref_dir)
  # A further invocation (nothing left to train) counts the time of all
  # the earlier ones: the first two's up to their last save, and the
  # third's, which reached its last save after its training and evaluation.
  again = jaxcl.run(c, work)
  assert again.times["before"] >= (final.times["before"] +
                                   final.times["train"] +
                                   final.times["eval"])
  # A sweep's fingerprint adds its own fields: a single run's checkpoint
  # is refused, naming them.
  from jaxcl import experiment
  s = experiment.setup(c)
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"sweep\.seeds: checkpoint has '<absent>', this "
                     r"run has \[0, 1\]"):
    experiment.execute(s, experiment.initial_state(s, c.seed), work,
                       fingerprint_extra={"sweep.seeds": [0, 1]})


def test_keeps_the_newest_and_numbers_on_after_a_reopen(tmp_path):
  """``keep`` checkpoints stay, the newest ones; a reopened directory
  numbers its saves after the newest (not from 0, nor from the count left
  after the rotation: older than the newest, they were restored in its
  place or overwrote a kept one). With keep=2 a corrupt newest still falls
  back to the one before it."""
  import jax.numpy as jnp

  from jaxcl import checkpoint
  d = str(tmp_path / "r")
  progress = {"accuracy": np.zeros((2, 2))}
  state = lambda i: {"w": jnp.full(3, float(i))}
  ck = checkpoint.Checkpointer(d, {"a": 1}, keep=2)
  for i in range(4):
    ck.save(state(i), progress, checkpoint.Position(i, "begin"))
  ck.close()
  ck = checkpoint.Checkpointer(d, {"a": 1}, keep=2)
  assert ck.steps() == [2, 3]
  ck.save(state(4), progress, checkpoint.Position(4, "begin"))
  ck.close()
  ck = checkpoint.Checkpointer(d, {"a": 1}, keep=2)
  assert ck.steps() == [3, 4]
  restored, _, pos = ck.restore(state(0), progress)
  ck.close()
  assert pos.experience == 4
  np.testing.assert_array_equal(restored["w"], np.full(3, 4.0))
  for root, _, files in os.walk(os.path.join(d, "checkpoints", "4")):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.truncate(max(os.path.getsize(path) // 3, 1))
  ck = checkpoint.Checkpointer(d, {"a": 1}, keep=2, log=lambda m: None)
  restored, _, pos = ck.restore(state(0), progress)
  ck.close()
  assert pos.experience == 3
  np.testing.assert_array_equal(restored["w"], np.full(3, 3.0))
  ck = checkpoint.Checkpointer(str(tmp_path / "r3"), {"a": 1}, keep=3)
  for i in range(5):
    ck.save(state(i), progress, checkpoint.Position(i, "begin"))
  ck.close()
  assert ck.steps() == [2, 3, 4]


def test_progress_of_another_shape_is_refused_untouched(tmp_path):
  """The accuracy matrix so far is compared too: one of another shape (a
  checkpoint of a sweep's stacked runs, of another stream length) is
  refused naming it, not read as corrupt and skipped. Its dtypes are not
  compared."""
  import jax.numpy as jnp

  from jaxcl import checkpoint
  d = str(tmp_path / "r")
  state = {"w": jnp.zeros(3)}
  ck = checkpoint.Checkpointer(d, {"a": 1})
  for i in range(2):
    ck.save(state, {"accuracy": np.zeros((2, 2))},
            checkpoint.Position(i, "begin"))
  ck.close()
  before = _files(d)
  ck = checkpoint.Checkpointer(d, {"a": 1})
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"progress\.accuracy: float64\[2, 2\] in the "
                     r"checkpoint, float64\[3, 2, 2\] in this version"):
    ck.restore(state, {"accuracy": np.zeros((3, 2, 2))})
  ck.close()
  assert _files(d) == before
  # Only its shapes: checkpoints written before session 35 hold float32
  # random accuracies, restored into float64.
  d = str(tmp_path / "old")
  ck = checkpoint.Checkpointer(d, {"a": 1})
  ck.save(state, {"accuracy": np.eye(2),
                  "random_accuracy": np.full(2, 0.1, np.float32)},
          checkpoint.Position(1, "begin"))
  ck.close()
  ck = checkpoint.Checkpointer(d, {"a": 1})
  _, p, _ = ck.restore(state, {"accuracy": np.zeros((2, 2)),
                               "random_accuracy": np.zeros(2)})
  ck.close()
  np.testing.assert_array_equal(p["accuracy"], np.eye(2))
  np.testing.assert_array_equal(p["random_accuracy"],
                                np.full(2, 0.1, np.float32))


def test_refusal_lists_ten_differences_and_counts_the_rest(tmp_path):
  import jax.numpy as jnp

  from jaxcl import checkpoint
  d = str(tmp_path / "r")
  progress = {"accuracy": np.zeros((2, 2))}
  old = {f"w{i:02d}": jnp.zeros(2) for i in range(12)}
  ck = checkpoint.Checkpointer(d, {"a": 1})
  ck.save(old, progress, checkpoint.Position(1, "begin"))
  ck.close()
  ck = checkpoint.Checkpointer(d, {"a": 1})
  with pytest.raises(checkpoint.IncompatibleCheckpointError) as e:
    ck.restore({k: jnp.zeros(3) for k in old}, progress)
  ck.close()
  listed = re.findall(r"^  (w\d\d): float32\[2\] in the checkpoint, "
                      r"float32\[3\] in this version$", str(e.value), re.M)
  assert listed == [f"w{i:02d}" for i in range(10)], str(e.value)
  assert "\n  ... and 2 more\n" in str(e.value)


def test_missing_item_metadata_is_corrupt_not_incompatible(tmp_path):
  """An item whose tree metadata file is gone reads as no tree (orbax
  raises for a truncated one, but not for a missing one): the state is not
  compared with nothing and refused as another version's; the checkpoint
  is restored if its arrays read, skipped for the older one if not."""
  import jax.numpy as jnp

  from jaxcl import checkpoint
  state, progress = {"w": jnp.arange(3.0)}, {"accuracy": np.eye(2)}
  for item in ("progress", "state"):
    d = str(tmp_path / item)
    ck = checkpoint.Checkpointer(d, {"a": 1})
    ck.save(state, progress, checkpoint.Position(1, "begin"))
    ck.save(state, progress, checkpoint.Position(2, "begin"))
    ck.close()
    os.remove(os.path.join(d, "checkpoints", "1", item, "_METADATA"))
    ck = checkpoint.Checkpointer(d, {"a": 1}, log=lambda m: None)
    restored, p, pos = ck.restore(state, {"accuracy": np.zeros((2, 2))})
    ck.close()
    assert pos.experience in (1, 2), item
    np.testing.assert_array_equal(restored["w"], np.arange(3.0))
    np.testing.assert_array_equal(p["accuracy"], np.eye(2))


def test_resume_with_another_chunk_trains_the_same_batches(tmp_path,
                                                           monkeypatch):
  """``checkpoint.every_steps`` does not change what a run computes, so a
  run may resume with another value. The resumed epoch then starts at a
  step (15) that is not a multiple of the new chunk (12 steps, epochs
  padded to 24): the chunk's slice of the epoch's batches ran past the
  padded epoch, and ``dynamic_slice`` moved it back, so steps 15-16 trained
  on the batches of steps 12-13 (until session 45)."""
  import jax

  import jaxcl
  from jaxcl import checkpoint
  from resume_driver import config
  c = config()
  c.scenario.n_experiences, c.train.epochs = 2, 1
  c.checkpoint.every_steps = 5
  saved = _saves_until(monkeypatch, 0)
  ref = jaxcl.run(c, str(tmp_path / "ref"), resume=False)
  at = saved.index(checkpoint.Position(0, "train", 0, 15))
  _saves_until(monkeypatch, at + 2)  # stops after saving step 15
  with pytest.raises(_Interrupted):
    jaxcl.run(c, str(tmp_path / "run"))
  _saves_until(monkeypatch, 0)
  c.checkpoint.every_steps = 12
  final = jaxcl.run(c, str(tmp_path / "run"), resume=True)
  for a, b in zip(jax.tree.leaves(final.state), jax.tree.leaves(ref.state)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(final.accuracy, ref.accuracy)


def test_resumed_run_keeps_its_continual_evaluation_curve(tmp_path,
                                                          monkeypatch):
  """The curve's points so far are in the checkpoints: a run interrupted
  inside an experience and resumed ends with the uninterrupted run's
  curve, metrics and log (each point logged once)."""
  import jaxcl
  from jaxcl import checkpoint
  from resume_driver import config
  c = config()
  c.scenario.n_experiences, c.train.epochs = 2, 2
  # Saves at steps 18 and 36 of each 43-step epoch (a multiple of the
  # evaluation interval), 10 a run; the interruption after the save of
  # step 18 of experience 1's second epoch.
  c.train.eval_every_steps, c.checkpoint.every_steps = 3, 18
  saved = _saves_until(monkeypatch, 0)
  ref_dir, work = str(tmp_path / "ref"), str(tmp_path / "run")
  ref = jaxcl.run(c, ref_dir, resume=False)
  at = saved.index(checkpoint.Position(1, "train", 1, 18))
  _saves_until(monkeypatch, at + 2)
  with pytest.raises(_Interrupted):
    jaxcl.run(c, work)
  _saves_until(monkeypatch, 0)
  final = jaxcl.run(c, work, resume=True)
  for f in ("step", "experience", "accuracy", "exposed"):
    np.testing.assert_array_equal(getattr(final.curve, f),
                                  getattr(ref.curve, f))
  assert "a_auc" in final.metrics
  assert final.metrics == ref.metrics
  assert log_records(work) == log_records(ref_dir)
  # Another interval is another curve: refused, naming it.
  c.train.eval_every_steps = 4
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"train.eval_every_steps: checkpoint has 3, this "
                     "run has 4"):
    jaxcl.run(c, work)


def test_resumed_blurry_run_exposes_classes_from_their_first_batch(
    tmp_path, monkeypatch):
  """A run resumed inside an experience's first epoch draws the epoch's
  order again, so its points after the resume expose the classes the
  uninterrupted run's do, a class from its first batch on (nothing of it
  is checkpointed)."""
  import jaxcl
  from jaxcl import checkpoint, experiment
  from resume_driver import config
  c = config()
  c.seed = 1
  c.scenario.type, c.scenario.disjoint, c.scenario.blurred = "blurry", .4, .3
  c.scenario.n_experiences, c.train.epochs = 2, 1
  c.train.eval_every_steps, c.checkpoint.every_steps = 1, 1
  ref = jaxcl.run(c)
  saved = _saves_until(monkeypatch, 2)  # stops after saving step 1
  with pytest.raises(_Interrupted):
    jaxcl.run(c, str(tmp_path))
  assert saved[0] == checkpoint.Position(0, "train", 0, 1)
  _saves_until(monkeypatch, 0)
  c.checkpoint.every_steps = 100
  final = jaxcl.run(c, str(tmp_path), resume=True)
  np.testing.assert_array_equal(final.curve.exposed, ref.curve.exposed)
  # The first point after the resume (step 2) exposes only part of
  # experience 0's classes: some class's first batch is its third.
  s = experiment.setup(c)
  e0 = s.scenario.experiences[0]
  first = experiment.first_steps(np.asarray(s.learner.order_fn(
      experiment.initial_state(s, c.seed).rng, 0, 0, e0.num_train)),
      e0.train_y, 10)
  assert 2 in first[list(e0.classes)]


def test_resumes_a_checkpoint_without_exposed_accuracies(tmp_path,
                                                        monkeypatch):
  """Checkpoints written before session 47 hold no accuracies over the
  exposed classes: a run resumes from one, those of the points before it
  unknown (NaN), the later ones as an uninterrupted run's, and without
  ``a_auc`` (over a part of the stream it would mislead)."""
  import jaxcl
  from jaxcl import checkpoint
  from resume_driver import config
  c = config()
  c.scenario.n_experiences, c.train.eval_every_steps = 2, 5
  # One epoch, saves at steps 20 and 40 and the experiences' ends: 6 a run
  # instead of 36 (orbax's saves were most of the test's time).
  c.train.epochs, c.checkpoint.every_steps = 1, 20
  ref = jaxcl.run(c, str(tmp_path / "ref"), resume=False)
  work = str(tmp_path / "run")
  real_save = checkpoint.Checkpointer.save

  def old_save(self, state, progress, position, seconds=None):
    if position == checkpoint.Position(1, "begin"):
      real_save(self, state, {k: v for k, v in progress.items()
                              if k != "curve_exposed"}, position, seconds)
      raise _Interrupted(position)
    real_save(self, state, progress, position, seconds)

  with monkeypatch.context() as m:
    m.setattr(checkpoint.Checkpointer, "save", old_save)
    with pytest.raises(_Interrupted):
      jaxcl.run(c, work)
  final = jaxcl.run(c, work, resume=True)
  first = final.curve.experience <= 0
  assert np.isnan(final.curve.exposed[first]).all()
  np.testing.assert_array_equal(final.curve.exposed[~first],
                                ref.curve.exposed[~first])
  assert not np.isnan(ref.curve.exposed[1:]).any()
  np.testing.assert_array_equal(final.curve.accuracy, ref.curve.accuracy)
  assert "a_auc" in ref.metrics and "a_auc" not in final.metrics
  assert final.metrics == {k: v for k, v in ref.metrics.items()
                           if k != "a_auc"}


def test_resumes_a_checkpoint_without_confusion_matrices(tmp_path,
                                                         monkeypatch):
  """Checkpoints written before session 46 hold no confusion matrices and
  no task-aware accuracies, and their config no ``train.confusion``: a run
  resumes from one, with the entries of the experiences that ended before
  it unknown (-1 counts, NaN accuracies) and the rest, the metrics and
  the accuracies as an uninterrupted run's."""
  import jaxcl
  from jaxcl import checkpoint
  from resume_driver import config
  c = config()
  # One epoch, a save at step 10 of each 17-step experience and at its
  # end: 10 a run instead of 40 (orbax's saves were most of the test's
  # time); the resume still starts inside experience 1.
  c.train.epochs, c.checkpoint.every_steps = 1, 10
  ref = jaxcl.run(c, str(tmp_path / "ref"), resume=False)
  work = str(tmp_path / "run")
  real_fp, real_save = checkpoint.fingerprint, checkpoint.Checkpointer.save

  def old_save(self, state, progress, position, seconds=None):
    if position == checkpoint.Position(2, "begin"):
      raise _Interrupted(position)
    real_save(self, state, {k: v for k, v in progress.items()
                            if k not in ("confusion", "task_accuracy")},
              position, seconds)

  with monkeypatch.context() as m:  # an older jaxcl
    m.setattr(checkpoint, "fingerprint", lambda cfg: {
        k: v for k, v in real_fp(cfg).items() if k != "train.confusion"})
    m.setattr(checkpoint.Checkpointer, "save", old_save)
    with pytest.raises(_Interrupted):
      jaxcl.run(c, work)
  # Without the key marked optional that checkpoint is refused.
  ckpt = checkpoint.Checkpointer(work, checkpoint.fingerprint(c))
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match="progress.confusion"):
    ckpt.restore(ref.state, {"accuracy": ref.accuracy,
                             "random_accuracy": ref.random_accuracy,
                             "confusion": ref.confusion})
  ckpt.close()
  c.report.plots = True  # (only here: drawing them costs seconds)
  final = jaxcl.run(c, work, resume=True)
  assert (final.confusion[0] == -1).all()
  np.testing.assert_array_equal(final.confusion[1:], ref.confusion[1:])
  assert np.isnan(final.task_accuracy[0]).all()
  np.testing.assert_array_equal(final.task_accuracy[1:],
                                ref.task_accuracy[1:])
  np.testing.assert_array_equal(final.accuracy, ref.accuracy)
  assert final.metrics == ref.metrics
  with np.load(os.path.join(work, "confusion.npz")) as f:
    np.testing.assert_array_equal(f["confusion"], final.confusion)
  with open(os.path.join(work, "accuracy_matrix.json")) as f:
    assert json.load(f)["task_accuracy"][0] == [None] * 5
  assert os.path.getsize(os.path.join(work, "confusion.png")) > 0
