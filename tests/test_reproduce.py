"""The reproduction script's smoke mode: tiny subsets, 1 seed."""

import dataclasses
import json
import os
import shutil
import subprocess
import types

import numpy as np
import pytest

from experiments import reproduce

NAIVE = "split_mnist_baselines__strategy_naive"
# --only NAIVE also selects the task-incremental Naive entry: skipped (listed
# as not run) where a test checks the same on the class-incremental one, to
# train half as much.
SKIP_TASK = ["--skip", f"{NAIVE}_kind_task"]


@pytest.fixture(autouse=True, scope="module")
def _idx_files_read_once():
  """Each run of this module's entries reads its MNIST / Fashion-MNIST IDX
  files anew (~1 s of CPU: decompressing and converting them), 18 times
  in all, for the same data. Here a directory's files are read once, and
  later runs get those arrays (made read-only: a write into them fails);
  a directory without them fails as before. What is checked is the
  script's bookkeeping, not the reader (test_datasets.py)."""
  from jaxcl import datasets
  read, kept = datasets._load_idx, {}

  def load_idx(name, data_dir):
    key = (name, os.path.realpath(data_dir))
    if key not in kept:
      d = read(name, data_dir)
      for a in (d.train_x, d.train_y, d.test_x, d.test_y):
        a.flags.writeable = False
      kept[key] = d
    return kept[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(datasets, "_load_idx", load_idx)
    yield


@pytest.fixture(autouse=True, scope="module")
def _pngs_unrendered():
  """Rendering PNGs (matplotlib's Agg drawing and encoding) was a quarter
  of this module's CPU time: three per training run (jaxcl.report's
  per-run plots) and one per table of every report written. No test here
  looks into them (test_report.py and test_confusion.py check the per-run
  plots), so ``Figure.savefig`` writes an empty file at the path instead:
  the plots are still built, and their files written and linked. Files
  under the folders added to the yielded set are rendered: the shared
  smoke invocation's report plots, which its test checks."""
  from matplotlib.figure import Figure
  real, rendered = Figure.savefig, set()

  def savefig(self, fname, *args, **kwargs):
    if any(str(fname).startswith(d + os.sep) for d in rendered):
      return real(self, fname, *args, **kwargs)
    open(fname, "wb").close()

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Figure, "savefig", savefig)
    yield rendered


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir, _pngs_unrendered):
  """One finished smoke invocation (class-incremental Naive and Permuted
  MNIST Naive): ``(root, report path)``, the run directories in
  ``root/work_smoke``. Each training run compiles its own programs, most of
  these tests' time, so the tests that need finished entries share it; a
  test that changes it works on a copy (``_copy_smoke``). Its report's
  plots are rendered."""
  root = tmp_path_factory.mktemp("smoke")
  _pngs_unrendered.add(str(root / "out"))
  path = reproduce.main([
      "--smoke", "--only", NAIVE, "permuted_mnist_baselines", *SKIP_TASK,
      "--out", str(root / "out"), "--workdir", str(root / "work"),
      "--data_dir", data_dir])
  return root, path


def _copy_smoke(smoke_run, tmp_path) -> str:
  """The shared smoke invocation's run directories copied (with their
  times) into ``tmp_path/w_smoke``; returns the ``--workdir`` to pass."""
  shutil.copytree(smoke_run[0] / "work_smoke", tmp_path / "w_smoke")
  return str(tmp_path / "w")


def test_smoke_writes_results_with_commit_and_plots(tmp_path, data_dir,
                                                    smoke_run):
  root, path = smoke_run
  text = open(path).read()
  assert "SMOKE MODE" in text and "commit: `" in text
  assert "| Naive |" in text and "| failed:" not in text
  assert "failed: 0" in text  # the header's count
  assert "Permuted MNIST" in text
  pngs = sorted(os.listdir(root / "out" / reproduce.FIGURES))
  assert len(pngs) >= 2 and text.count("![") == len(pngs)
  for png in pngs:  # each plot is linked from the report, by its folder
    assert f"]({reproduce.FIGURES}/{png})" in text
    with open(root / "out" / reproduce.FIGURES / png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # drawn (see above)
  # Resumable: a second call reuses the finished entries (of a copy: the
  # shared run stays as it was).
  shutil.copytree(root / "out", tmp_path / "out")
  work = _copy_smoke(smoke_run, tmp_path)
  figs = tmp_path / "out" / reproduce.FIGURES
  record = tmp_path / "w_smoke" / NAIVE / "entry.json"
  mtime = os.path.getmtime(record)
  path = reproduce.main([
      "--smoke", "--only", NAIVE, *SKIP_TASK, "--out", str(tmp_path / "out"),
      "--workdir", work, "--data_dir", data_dir])
  # Fewer tables now: the first report's extra plots are not left behind.
  text = open(path).read()
  assert sorted(os.listdir(figs)) == pngs[:text.count("![")] != pngs
  assert os.path.getmtime(record) == mtime
  # The record keeps the test sets' sizes, for the pooled accuracies: the
  # smoke subset's five Split MNIST test sets (not all of one size).
  sizes = json.load(open(record))["test_sizes"]
  assert len(sizes) == 5 and all(n > 0 for n in sizes)


def test_every_entry_names_a_buildable_config():
  import importlib
  reproduce._load_more_entries()
  ids = [e.id for e in reproduce.ENTRIES]
  assert len(ids) == len(set(ids)), "duplicate entries"
  for e in reproduce.ENTRIES:
    mod = importlib.import_module(f"experiments.{e.config}")
    c = mod.get_config(e.arg + ",quick")
    assert c.strategy.name, e
    if e.published is not None:
      assert 0 < e.published <= 1 and e.source, e


def test_changed_config_reruns_entry_and_keeps_old_run(tmp_path, data_dir,
                                                       monkeypatch,
                                                       smoke_run):
  """A cached result is reused only for the same config: a changed config
  re-runs the entry, and the old run directory is kept aside."""
  # The finished first run is the shared one's.
  args = ["--smoke", "--only", NAIVE, *SKIP_TASK,
          "--out", str(tmp_path / "out"),
          "--workdir", _copy_smoke(smoke_run, tmp_path),
          "--data_dir", data_dir]
  entry = tmp_path / "w_smoke" / NAIVE
  first = json.load(open(entry / "entry.json"))
  assert first["commit"] and first["fingerprint"]["train.epochs"] >= 1
  from experiments import split_mnist_baselines as mod
  orig = mod.get_config

  def changed(arg=None):
    c = orig(arg)
    c.optimizer.learning_rate = c.optimizer.learning_rate / 2
    return c
  monkeypatch.setattr(mod, "get_config", changed)
  reproduce.main(args)
  second = json.load(open(entry / "entry.json"))
  assert (second["fingerprint"]["optimizer.learning_rate"] ==
          first["fingerprint"]["optimizer.learning_rate"] / 2)
  assert os.path.exists(str(entry) + ".stale/entry.json")
  # An unfinished run of another config (checkpoints, no entry.json) is set
  # aside too, not a failure: back to the original config.
  os.remove(entry / "entry.json")
  monkeypatch.setattr(mod, "get_config", orig)
  path = reproduce.main(args)
  assert "| failed:" not in open(path).read()
  third = json.load(open(entry / "entry.json"))
  assert third["fingerprint"] == first["fingerprint"]


def test_gap_over_one_and_a_half_points_is_explained_or_flagged(tmp_path):
  E = reproduce.Entry
  a = E("T", "A", "split_mnist_baselines", "strategy=naive", 0.90, "X",
        note="lr not tuned")
  b = E("T", "B", "split_mnist_baselines", "strategy=joint", 0.90, "Y")
  c = E("T", "C", "split_mnist_baselines", "strategy=cumulative", 0.90, "Z")
  res = lambda acc, seeds=(0,): {"acc": [acc, 0.01], "wall_time": 1.0,
                                 "commit": "abc1234", "over_time": [acc],
                                 "seeds": list(seeds)}
  path = reproduce.write_report(
      {a.id: res(0.88), b.id: res(0.80, (0, 1)), c.id: res(0.89)}, [a, b, c],
      str(tmp_path), [0], False, 0.0)
  text = open(path).read()
  assert "**A** is more than 1.5 points below X (90.0): lr not tuned" in text
  assert "**B** is more than 1.5 points below Y (90.0): NOT YET EXPLAINED" \
      in text
  assert "**C**" not in text  # 1 point short: within tolerance
  assert "| `abc1234` |" in text
  # A run from a work tree with uncommitted changes says so: its hash
  # alone would name code that did not produce the row.
  dirty = {**res(0.89), "commit": "def5678" + "0" * 33 +
           " (with uncommitted changes)"}
  shown = open(reproduce.write_report({c.id: dirty}, [c],
                                      str(tmp_path / "d"), [0], False,
                                      0.0)).read()
  assert "| `def5678 + uncommitted changes` |" in shown
  # A row run with other seeds than the report's (--any_seeds) says so.
  assert "| B | 80.00 ± 1.00 (2 seeds) |" in text
  # One seed: no error bar (a standard error needs two).
  assert "| A | 88.00 |" in text
  # A record with more seeds than asked for is reused, and the header says
  # such rows name their count; with --any_seeds, also rows with others.
  assert ("* seeds per entry: 1 (0), except rows that name their own count "
          "(reused records run with more seeds); mean") in text
  path = reproduce.write_report(
      {b.id: res(0.80, (0, 1))}, [b], str(tmp_path / "any"), [0], False,
      0.0, any_seeds=True)
  assert ("* seeds per entry: 1 (0), except rows that name their own count "
          "(reused records run with more seeds or others); mean") \
      in open(path).read()


def test_entry_metric_reads_the_pooled_incremental_accuracy(tmp_path):
  # LUCIR's rows report the mean over the steps of the accuracy on every
  # test example of the classes seen: computed from the record's matrices
  # and test-set sizes (a 500-example first set, then two of 100), by
  # hand here, and used for the row and its gap check.
  E = reproduce.Entry
  e = E("T", "L", "split_mnist_baselines", "strategy=naive", 0.80, "X",
        metric="inc_acc_pooled")
  mats = [[[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 0.95]],
          [[0.7, 0.0, 0.1], [0.6, 0.6, 0.2], [0.4, 0.5, 0.9]]]
  sizes = [500, 100, 100]

  def pooled_inc(m):
    m = np.asarray(m)
    return np.mean([m[i, :i + 1] @ sizes[:i + 1] / sum(sizes[:i + 1])
                    for i in range(3)])

  want = [pooled_inc(m) for m in mats]
  rec = {"acc": [0.74, 0.02], "wall_time": 1.0, "commit": "abc1234",
         "over_time": [0.8, 0.7, 0.6], "seeds": [0, 1], "accuracy": mats,
         "test_sizes": sizes}
  mean, se = reproduce.entry_metric(rec, "inc_acc_pooled")
  assert mean == pytest.approx(np.mean(want))
  assert se == pytest.approx(np.std(want, ddof=1) / np.sqrt(2))
  assert reproduce.entry_metric(rec, "acc") == [0.74, 0.02]
  text = open(reproduce.write_report({e.id: rec}, [e], str(tmp_path),
                                     [0, 1], False, 0.0)).read()
  assert f"| L | {100 * mean:.2f} ± {100 * se:.2f} |" in text
  assert "**L** is more than 1.5 points below X" in text  # 0.71 < 0.785
  # A record without the sizes cannot give it, and says so.
  old = {k: v for k, v in rec.items() if k != "test_sizes"}
  assert reproduce.entry_metric(old, "inc_acc_pooled") is None
  text = open(reproduce.write_report({e.id: old}, [e], str(tmp_path / "o"),
                                     [0, 1], False, 0.0)).read()
  assert ("| L | recorded without the matrices and test-set sizes "
          "inc_acc_pooled needs: rerun |") in text
  with pytest.raises(ValueError, match=r"Entry 'L': metric must be one of "
                     r"\['acc', 'inc_acc', 'acc_pooled', 'inc_acc_pooled'\]"
                     r", got 'top5'"):
    E("T", "L", "split_mnist_baselines", "strategy=naive", metric="top5")


def test_entry_without_its_data_is_listed_as_not_run(tmp_path, data_dir):
  """CIFAR rows on a machine without the data: 'not run', not 'failed',
  and nothing cached (a later run with the data runs them); a report
  written without running (--report_only) gives the same reason."""
  empty = tmp_path / "no_data"
  empty.mkdir()
  path = reproduce.main([
      "--smoke", "--only", "split_cifar10__strategy_naive_kind_class",
      "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "w"),
      "--data_dir", str(empty)])
  text = open(path).read()
  assert "| Naive | not run: data set cifar10 not available here" in text
  assert not os.path.exists(tmp_path / "w_smoke" /
                            "split_cifar10__strategy_naive_kind_class" /
                            "entry.json")
  path = reproduce.main([
      "--smoke", "--report_only", "--only",
      "split_cifar10__strategy_naive_kind_class", "--out",
      str(tmp_path / "out1"), "--workdir", str(tmp_path / "w"),
      "--data_dir", str(empty)])
  assert "| Naive | not run: data set cifar10 not available here" in \
      open(path).read()
  # --skip: listed as not run, nothing attempted (the data is there).
  path = reproduce.main([
      "--smoke", "--only", "permuted_mnist_baselines", "--skip",
      "permuted_mnist", "--out", str(tmp_path / "out2"), "--workdir",
      str(tmp_path / "w"), "--data_dir", data_dir])
  text = open(path).read()
  assert "| Naive | not run: skipped in this invocation (--skip" in text
  assert "with results: 0, not run: 1, failed: 0" in text
  assert "--skip permuted_mnist" in text


def test_report_only_runs_nothing_and_shows_stored_and_imported_rows(
    tmp_path, data_dir, smoke_run):
  """--report_only writes the report from stored records: an entry without
  one is listed as not run (nothing is trained), and a record carried over
  from an older report (no per-experience curve) is marked † with its
  source, instead of failing the plot."""
  naive = NAIVE
  joint = "split_mnist_baselines__strategy_joint"
  base = ["--smoke", "--workdir", _copy_smoke(smoke_run, tmp_path),
          "--data_dir", data_dir]
  rec_path = tmp_path / "w_smoke" / naive / "entry.json"
  rec = json.load(open(rec_path))
  del rec["over_time"], rec["accuracy"]
  rec["imported_from"] = "an older report"
  rec["acc"] = [0.4321, 0.0]
  json.dump(rec, open(rec_path, "w"))
  path = reproduce.main(base + ["--report_only", "--only", naive, joint,
                                "--out", str(tmp_path / "b")])
  text = open(path).read()
  assert not (tmp_path / "w_smoke" / joint).exists()  # nothing was run
  joint_row = next(l for l in text.splitlines() if l.startswith("| Joint"))
  assert "not run: no stored result" in joint_row
  naive_row = next(l for l in text.splitlines() if l.startswith("| Naive"))
  assert "43.21" in naive_row and "†" in naive_row
  assert "† carried over from an older report" in text


def test_commit_marks_code_changes_but_not_new_records(tmp_path):
  """A record the same invocation wrote into experiments/results/ does not
  make the next entry's commit 'with uncommitted changes'; an edit to a
  config or to jaxcl/ does."""
  git = lambda *a: subprocess.run(
      ["git", "-c", "user.name=t", "-c", "user.email=t@t", *a],
      cwd=tmp_path, check=True, capture_output=True)
  for d in ("jaxcl", "experiments/results"):
    (tmp_path / d).mkdir(parents=True)
  (tmp_path / "jaxcl" / "a.py").write_text("x = 1\n")
  (tmp_path / "experiments" / "c.py").write_text("y = 1\n")
  git("init", "-q")
  git("add", "-A")
  git("commit", "-qm", "c")
  mark = " (with uncommitted changes)"
  assert not reproduce._commit(str(tmp_path)).endswith(mark)
  (tmp_path / "experiments" / "results" / "e.json").write_text("{}")
  assert not reproduce._commit(str(tmp_path)).endswith(mark)
  (tmp_path / "experiments" / "c.py").write_text("y = 2\n")
  assert reproduce._commit(str(tmp_path)).endswith(mark)
  git("checkout", "-q", "--", "experiments/c.py")
  (tmp_path / "jaxcl" / "b.py").write_text("z = 1\n")
  assert reproduce._commit(str(tmp_path)).endswith(mark)


def test_record_names_the_commit_its_run_started_from(tmp_path, data_dir,
                                                      monkeypatch, smoke_run):
  """A commit made while an entry runs is not the code it ran: the record
  names the tree as the run started."""
  calls = iter(["a" * 40, "b" * 40, "c" * 40])
  monkeypatch.setattr(reproduce, "_commit", lambda: next(calls))
  naive = NAIVE
  # Without its record the entry runs again: through the same path as a
  # fresh run (commit, train, record), its training resumed from the shared
  # run's finished checkpoints instead of compiled anew.
  work = _copy_smoke(smoke_run, tmp_path)
  os.remove(tmp_path / "w_smoke" / naive / "entry.json")
  reproduce.main(["--smoke", "--workdir", work, "--data_dir",
                  data_dir, "--only", naive, *SKIP_TASK, "--out",
                  str(tmp_path / "o")])
  rec = json.load(open(tmp_path / "w_smoke" / naive / "entry.json"))
  assert rec["commit"] == "a" * 40


def test_record_outside_the_workdir_is_written_and_reused(tmp_path,
                                                          data_dir,
                                                          smoke_run):
  """Full runs keep their record in the committed results directory, apart
  from the (uncommitted) checkpoints; a second call reuses it."""
  reproduce._load_more_entries()
  e = next(e for e in reproduce.ENTRIES if e.id == NAIVE)
  record = str(tmp_path / "results" / f"{e.id}.json")
  # The shared run's checkpoints without its record: run_entry trains
  # (resuming them) and writes the record.
  shutil.copytree(smoke_run[0] / "work_smoke" / e.id, tmp_path / "work")
  os.remove(tmp_path / "work" / "entry.json")
  first = reproduce.run_entry(e, [0], str(tmp_path / "work"), data_dir,
                              smoke=True, record=record)
  assert json.load(open(record))["acc"] == list(first["acc"])
  assert not os.path.exists(tmp_path / "work" / "entry.json")
  mtime = os.path.getmtime(record)
  again = reproduce.run_entry(e, [0], str(tmp_path / "work"), data_dir,
                              smoke=True, record=record, skip="not expected")
  assert list(again["acc"]) == list(first["acc"]) and os.path.getmtime(record) == mtime


def test_pretrained_backbone_entry_pretrains_first_and_names_its_run(
    tmp_path, data_dir):
  """An entry over a pretrained backbone (Piggyback) first runs its
  pretraining config and saves the params; the record's fingerprint names
  the pretraining run, not the file's location, so another checkout reuses
  it."""
  reproduce._load_more_entries()
  e = next(e for e in reproduce.ENTRIES if e.pretrain and
           "fashion" not in e.arg)
  work = str(tmp_path / "root" / e.id)
  r = reproduce.run_entry(e, [0], work, data_dir, smoke=True)
  assert "acc" in r, r
  files = os.listdir(tmp_path / "root" / "_pretrained")
  assert files == [f"{e.config}__strategy_pretrain_quick.npz"]
  assert f"<{e.config}.py:strategy=pretrain,quick>" in \
      r["fingerprint"].values()
  assert not any(str(tmp_path) in str(v) for v in r["fingerprint"].values())
  # The backbone is what the pretraining run produced (Fashion-MNIST).
  from jaxcl import pretrained
  assert pretrained.load(str(tmp_path / "root" / "_pretrained" / files[0]))


def _seed_1_replay(data_dir, scenario_seed, workdir=None):
  """Seed 1's plain quick Permuted MNIST Replay run on scenario draw
  ``scenario_seed`` (the sweep result; checkpointed in ``workdir``)."""
  from jaxcl import sweep
  from experiments import permuted_mnist_replay as mod
  c = mod.get_config("strategy=replay,mem_size=50,quick")
  c.dataset.data_dir = data_dir
  c.scenario.seed = scenario_seed
  return sweep.sweep(c, seeds=[1], workdir=workdir)


REPLAY = reproduce.Entry("t", "Replay", "permuted_mnist_replay",
                         "strategy=replay,mem_size=50")


@pytest.fixture(scope="module")
def seed_1_runs(tmp_path_factory, data_dir):
  """The references: seed 1's plain run on scenario draw 0 and on draw 1,
  ``{draw: (sweep result, run directory)}``; draw 0's finished directory is
  also the seed an interrupted invocation left behind (copied) in
  test_sequential_entry_grown_by_seeds_runs_only_the_new_ones."""
  root = tmp_path_factory.mktemp("seed_1")
  return {d: (_seed_1_replay(data_dir, d, str(root / f"draw_{d}")),
              root / f"draw_{d}") for d in (0, 1)}


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory, data_dir):
  """A sequential Replay entry run fresh with seeds 0 and 1: ``(entry,
  result, workdir)``; read by two tests (copied before a change)."""
  e = dataclasses.replace(REPLAY, sequential=True)
  w = tmp_path_factory.mktemp("sequential") / "w"
  return e, reproduce.run_entry(e, [0, 1], str(w), data_dir, smoke=True), w


# -m slow since session 56 (15-20 s, CI's budget): test_sweep.py's
# test_scenario_per_seed_runs_each_seed_on_its_own_draw checks the same
# per-seed draws through the sweep the entry runs on.
@pytest.mark.slow
def test_scenario_per_seed_gives_each_seed_its_own_draw(tmp_path, data_dir,
                                                        seed_1_runs,
                                                        sequential_run):
  """With scenario_per_seed each seed runs on its own permutations (scenario
  seed = seed): seed 1's matrix is a single run of that draw, not the
  vmapped sweep's shared draw of scenario seed 0."""
  e = dataclasses.replace(REPLAY, scenario_per_seed=True)
  # Seed 0's draw is scenario seed 0, the sequential entry's: its finished
  # run directory is resumed (only a run of the same config is: another
  # draw's checkpoints would be set aside and every seed run afresh).
  shutil.copytree(sequential_run[2] / "seed_0", tmp_path / "w" / "seed_0")
  r = reproduce.run_entry(e, [0, 1], str(tmp_path / "w"), data_dir,
                          smoke=True)
  assert r["fingerprint"]["reproduce.scenario_per_seed"] is True
  acc = np.asarray(r["accuracy"])
  assert acc.shape[0] == 2
  np.testing.assert_allclose(acc[1], seed_1_runs[1][0].accuracy[0],
                             atol=1e-6)
  assert not np.allclose(acc[1], seed_1_runs[0][0].accuracy[0], atol=1e-3)
  text = open(reproduce.write_report({e.id: r}, [e], str(tmp_path / "o"),
                                     [0, 1], True, 0.0)).read()
  assert "| Replay | " in text and " ‡ |" in text  # marked as per-seed
  v = [float(np.mean(a[-1])) for a in acc]  # ACC per seed
  assert abs(r["acc"][0] - np.mean(v)) < 1e-6
  assert abs(r["acc"][1] - np.std(v, ddof=1) / np.sqrt(2)) < 1e-6


def test_sequential_entry_runs_plain_programs_on_the_shared_draw(
    sequential_run, seed_1_runs):
  """With sequential=True the seeds run one after another (a run directory
  each) on the scenario draw the vmapped sweep would share (scenario seed
  0), not on a draw of their own."""
  _, r, w = sequential_run
  assert "reproduce.scenario_per_seed" not in r["fingerprint"]
  assert sorted(p.name for p in w.iterdir()
                if p.name.startswith("seed_")) == ["seed_0", "seed_1"]
  acc = np.asarray(r["accuracy"])
  np.testing.assert_allclose(acc[1], seed_1_runs[0][0].accuracy[0],
                             atol=1e-6)
  assert not np.allclose(acc[1], seed_1_runs[1][0].accuracy[0], atol=1e-3)


def test_sequential_entry_grown_by_seeds_runs_only_the_new_ones(
    tmp_path, data_dir, sequential_run, seed_1_runs):
  """A sequential entry's record of the same config keeps its finished
  seeds: asked for seeds 0 and 1 after a seed-0 record, only seed 1 runs,
  and the record and report name where seed 0 came from. A changed config
  keeps nothing."""
  e, _, seq_w = sequential_run
  record = str(tmp_path / "results" / f"{e.id}.json")
  # The seed-0 record, written by run_entry; its seed resumes the shared
  # run's finished seed 0 instead of training it again.
  shutil.copytree(seq_w / "seed_0", tmp_path / "w" / "seed_0")
  first = reproduce.run_entry(e, [0], str(tmp_path / "w"), data_dir,
                              smoke=True, record=record)
  stored = json.load(open(record))
  assert stored["seeds"] == [0] and len(stored["accuracy"]) == 1
  stored["commit"] = "abc1234" + "0" * 33  # an earlier commit's record
  stored["wall_time"] = 1000.0
  json.dump(stored, open(record, "w"))
  shutil.rmtree(tmp_path / "w" / "seed_0")  # a rerun would recreate it
  # Seed 1 finished by an invocation that stopped before writing the record
  # (as when a long entry is stopped between seeds): its time still counts.
  earlier, earlier_dir = seed_1_runs[0]
  shutil.copytree(earlier_dir, tmp_path / "w" / "seed_1")
  r = reproduce.run_entry(e, [0, 1], str(tmp_path / "w"), data_dir,
                          smoke=True, record=record)
  assert not (tmp_path / "w" / "seed_0").exists()
  assert r["wall_time"] > 1000.0 + earlier.times["train"]
  assert "wall_time_partial" not in r
  acc = np.asarray(r["accuracy"])
  np.testing.assert_array_equal(acc[0], np.asarray(first["accuracy"][0]))
  np.testing.assert_allclose(acc[1], earlier.accuracy[0], atol=1e-6)
  assert r["seeds"] == [0, 1]
  assert r["kept_commits"] == {"0": stored["commit"]}
  assert r["wall_time"] > 1000.0  # the kept seed's time is counted
  v = [float(np.mean(a[-1])) for a in acc]
  assert abs(r["acc"][0] - np.mean(v)) < 1e-6
  text = open(reproduce.write_report({e.id: r}, [e], str(tmp_path / "o"),
                                     [0, 1], True, 0.0)).read()
  assert "(seed 0: `abc1234`)" in text
  # A run resumed from checkpoints that did not record their time: the
  # wall time is a lower bound, and the report says so.
  text = open(reproduce.write_report(
      {e.id: {**r, "wall_time_partial": True}}, [e], str(tmp_path / "o"),
      [0, 1], True, 0.0)).read()
  assert f"| ≥ {r['wall_time']:.0f} |" in text
  # Grown again: seed 1 is kept at the commit it ran at, not seed 0's.
  assert reproduce._kept({"0": "abc1234" + "0" * 33, "1": "def5678",
                          "2": "def5678"}) == \
      " (seed 0: `abc1234`) (seeds 1, 2: `def5678`)"
  # Another config (here: another memory size) keeps no seed: asked for
  # the record's own seed 0, it runs it (a kept seed would run nothing,
  # and a reused record would leave no run directory).
  e2 = dataclasses.replace(e, arg="strategy=replay,mem_size=40")
  json.dump({**stored, "fingerprint": r["fingerprint"]},
            open(str(tmp_path / "other.json"), "w"))
  r2 = reproduce.run_entry(e2, [0], str(tmp_path / "w2"), data_dir,
                           smoke=True, record=str(tmp_path / "other.json"))
  assert "kept_commits" not in r2 and r2["seeds"] == [0]
  assert sorted(p.name for p in (tmp_path / "w2").iterdir()
                if p.name.startswith("seed_")) == ["seed_0"]


def test_only_keeps_larger_records_and_the_whole_report(tmp_path, data_dir):
  """A 3-seed request for an entry whose record holds 10 seeds reuses the
  record (it once re-ran the entry and overwrote the record with 3 seeds),
  and an --only run still reports every entry, the others from their
  stored records."""
  ten = "split_mnist_hybrid__strategy_gem_mem_size_200"
  results = tmp_path / "results"
  results.mkdir()
  committed = os.path.join(reproduce.REPO, "experiments", "results",
                           f"{ten}.json")
  assert len(json.load(open(committed))["seeds"]) == 10
  shutil.copy(committed, results)
  before = (results / f"{ten}.json").read_bytes()
  path = reproduce.main(["--only", ten, "--seeds", "3", "--results",
                         str(results), "--out", str(tmp_path / "o"),
                         "--workdir", str(tmp_path / "w"), "--data_dir",
                         data_dir])
  assert (results / f"{ten}.json").read_bytes() == before
  assert not (tmp_path / "w" / ten).exists()  # nothing was trained
  text = open(path).read()
  n = len(reproduce.ENTRIES)
  assert f"entries: {n} of the {n} registered; with results: 1," in text
  assert "(10 seeds)" in text
  assert "not run: no stored result for this config (not selected by " \
         "--only)" in text


class _FakeSweep:
  """Stands in for ``jaxcl.sweep.sweep`` in run_entry (no training): records
  each call's seeds, scenario seed and run directory, creates the directory
  as a run would, and returns for seed ``s`` the made-up matrix ``_acc(s)``
  (test sets of :data:`_SIZES` examples); ``before`` maps a seed to the
  seconds its earlier invocations took."""

  def __init__(self, before=None):
    self.calls, self.before = [], before or {}

  def __call__(self, config, seeds, workdir=None, **kw):
    from jaxcl import sweep
    self.calls.append((list(seeds), config.scenario.get("seed"), workdir))
    os.makedirs(workdir, exist_ok=True)
    acc = np.stack([_acc(s) for s in seeds])
    groups = [{"acc": (0.5, 0.1), "bwt": (-0.2, 0.01),
               "forgetting": (0.3, 0.02)}]
    return sweep.SweepResult(
        members=[], accuracy=acc, metrics=[], groups=groups,
        times={"before": self.before.get(seeds[0], 0.0)},
        result=types.SimpleNamespace(test_sizes=_SIZES))


_SIZES = (50, 10, 12)


def _acc(seed: int) -> np.ndarray:
  """A made-up 3x3 accuracy matrix, different per seed."""
  return np.array([[0.9, 0.1, 0.2], [0.5, 0.8, 0.1],
                   [0.3, 0.4, 0.7]]) + 0.01 * seed


def test_sweep_entry_runs_its_seeds_and_stores_the_sweep_summary(
    tmp_path, data_dir, monkeypatch):
  """A vmapped entry hands all its seeds to one sweep and stores what it
  returns: the matrices, the per-experience curve (mean accuracy over the
  experiences seen so far, over seeds), ACC / BWT / forgetting from the
  sweep's summary under their own names, and a wall time that counts the
  run's earlier invocations. A finished record is reused for fewer seeds,
  for more only with any_seeds."""
  from jaxcl import sweep
  fake = _FakeSweep(before={0: 100.0})
  monkeypatch.setattr(sweep, "sweep", fake)
  e = reproduce.Entry("t", "Naive", "split_mnist_baselines", "strategy=naive")
  record = str(tmp_path / "results" / f"{e.id}.json")
  r = reproduce.run_entry(e, [0, 1, 2], str(tmp_path / "w"), data_dir,
                          smoke=True, record=record)
  assert [c[0] for c in fake.calls] == [[0, 1, 2]]
  assert fake.calls[0][2] == str(tmp_path / "w")
  assert r["seeds"] == [0, 1, 2]
  assert r["test_sizes"] == list(_SIZES)  # as the runs reported them
  assert list(r["acc"]) == [0.5, 0.1] and list(r["bwt"]) == [-0.2, 0.01]
  assert list(r["forgetting"]) == [0.3, 0.02]
  np.testing.assert_allclose(r["accuracy"], [_acc(s) for s in range(3)])
  # Experience i: the mean over seeds of the first i + 1 test sets' accuracy.
  curve = [np.mean([np.mean(_acc(s)[i][:i + 1]) for s in range(3)])
           for i in range(3)]
  np.testing.assert_allclose(r["over_time"], curve, atol=1e-12)
  assert 100.0 <= r["wall_time"] < 160.0  # earlier invocations counted
  assert "wall_time_partial" not in r
  assert json.load(open(record)) == json.loads(json.dumps(r))
  # Reused: fewer seeds than recorded; more only with any_seeds (when it
  # is not reused, the skip reason names the stored seeds: "no stored
  # result" misled before session 43).
  again = reproduce.run_entry(e, [1], str(tmp_path / "w"), data_dir,
                              smoke=True, record=record, skip="not reused")
  assert again["seeds"] == [0, 1, 2]
  more = dict(seeds=[0, 1, 2, 3], workdir=str(tmp_path / "w"),
              data_dir=data_dir, smoke=True, record=record, skip="not reused")
  assert reproduce.run_entry(e, any_seeds=True, **more)["seeds"] == [0, 1, 2]
  assert reproduce.run_entry(e, **more) == {
      "skipped": "the stored result has seeds [0, 1, 2], not all of "
                 "[0, 1, 2, 3] (--any_seeds reports it)"}
  assert len(fake.calls) == 1
  # An entry that reports a pooled accuracy plots its pooled curve: the
  # test sets weighted by their sizes.
  p = dataclasses.replace(e, metric="inc_acc_pooled")
  r = reproduce.run_entry(p, [0, 1], str(tmp_path / "p"), data_dir,
                          smoke=True, record=str(tmp_path / "p.json"))
  n = np.asarray(_SIZES, float)
  curve = [np.mean([_acc(s)[i][:i + 1] @ n[:i + 1] / n[:i + 1].sum()
                    for s in range(2)]) for i in range(3)]
  np.testing.assert_allclose(r["over_time"], curve, atol=1e-12)


def test_plateau_entries_run_their_seeds_one_after_another(
    tmp_path, data_dir, monkeypatch):
  """A config with optimizer.schedule='plateau' cannot train its seeds as
  one sweep (it decides per run on the host): its entry runs them one at a
  time, as a sequential entry's, without being marked so."""
  import sys
  from jaxcl import sweep
  from test_train import quick_config
  fake = _FakeSweep()
  monkeypatch.setattr(sweep, "sweep", fake)
  probe = types.ModuleType("experiments.plateau_probe")
  probe.get_config = lambda arg=None: quick_config(
      **{"optimizer.schedule": "plateau"})
  monkeypatch.setitem(sys.modules, "experiments.plateau_probe", probe)
  e = reproduce.Entry("t", "Plateau", "plateau_probe", "x")
  reproduce.run_entry(e, [0, 1], str(tmp_path / "w"), data_dir, smoke=True,
                      record=str(tmp_path / "r.json"))
  assert [c[0] for c in fake.calls] == [[0], [1]]


def test_sequential_entry_keeps_only_the_asked_seeds_of_its_record(
    tmp_path, data_dir, monkeypatch):
  """Asked for seeds 0, 1 and 3 after a record of seeds 0 and 2, a
  sequential entry runs seeds 1 and 3 only (one program each, in its own
  directory), keeps seed 0 with its commit and its share of the record's
  time (half: one of two seeds), drops seed 2, summarises from the
  matrices (mean and standard error of the seeds' ACC), and leaves its run
  directory in place. A seed resumed without a recorded time makes the
  wall time a lower bound."""
  from jaxcl import sweep
  fake = _FakeSweep(before={1: 2.0, 3: float("nan")})
  monkeypatch.setattr(sweep, "sweep", fake)
  e = reproduce.Entry("t", "Replay", "permuted_mnist_replay",
                      "strategy=replay,mem_size=50", sequential=True)
  record = str(tmp_path / f"{e.id}.json")
  w = tmp_path / "w"
  reproduce.run_entry(e, [0, 2], str(w), data_dir, smoke=True, record=record)
  stored = json.load(open(record))
  stored.update(commit="abc1234" + "0" * 33, wall_time=1000.0)
  json.dump(stored, open(record, "w"))
  fake.calls.clear()
  r = reproduce.run_entry(e, [0, 1, 3], str(w), data_dir, smoke=True,
                          record=record)
  assert [(c[0], c[2]) for c in fake.calls] == [
      ([1], str(w / "seed_1")), ([3], str(w / "seed_3"))]
  assert fake.calls[0][1] == fake.calls[1][1]  # the shared draw
  assert r["seeds"] == [0, 1, 3]
  np.testing.assert_allclose(r["accuracy"], [_acc(s) for s in (0, 1, 3)])
  assert r["kept_commits"] == {"0": "abc1234" + "0" * 33}
  assert 502.0 <= r["wall_time"] < 560.0
  assert r["wall_time_partial"] is True
  v = [np.mean(_acc(s)[-1]) for s in (0, 1, 3)]
  np.testing.assert_allclose(r["acc"], [np.mean(v), np.std(v, ddof=1) /
                                        np.sqrt(3)], atol=1e-12)
  assert w.exists() and not os.path.exists(str(w) + ".stale")


def test_report_row_cells_tolerance_and_counts(tmp_path):
  """Each row's cells in the header's order (ACC, published, source, BWT,
  forgetting, wall time, config, commit), a record with fewer seeds than
  the report's named, the 1.5-point tolerance on both sides, failed and
  not-run rows listed and counted, a partial report marked, and kept seeds
  listed in numeric order."""
  E = reproduce.Entry
  a = E("T", "A", "split_mnist_baselines", "strategy=naive", 0.804, "P")
  b = E("T", "B", "split_mnist_baselines", "strategy=joint", 0.90, "Q",
        note="b's note")
  c = E("T", "C", "split_mnist_baselines", "strategy=cumulative", 0.90, "R",
        note="c's note")
  d = E("T", "D", "split_mnist_baselines", "strategy=ensemble")
  f = E("T", "F", "split_mnist_baselines", "strategy=freezing")
  g = E("T", "G", "split_mnist_baselines", "strategy=from_scratch")
  three = {"acc": [0.55, 0.02], "bwt": [-0.2, 0.01],
           "forgetting": [0.3, 0.02], "wall_time": 12.0, "commit": "a" * 40,
           "over_time": [0.9, 0.55], "seeds": [0, 1, 2]}
  one = {**three, "acc": [0.884, 0.0], "bwt": [-0.25, 0.0],
         "forgetting": [0.31, 0.0], "seeds": [0]}
  results = {a.id: three, b.id: one,  # 88.4: 1.6 points below 90
             c.id: {**one, "acc": [0.886, 0.0]},  # 1.4 points below
             d.id: {"error": "ValueError: boom"},
             f.id: {"skipped": "not this time"}, g.id: {"skipped": "nor"}}
  text = open(reproduce.write_report(results, [a, b, c, d, f, g],
                                     str(tmp_path),
                                     [0, 1, 2], False, 0.0)).read()
  rows = {l.split(" | ")[0][2:]: [x.strip() for x in l.split("|")[1:-1]]
          for l in text.splitlines() if l.startswith("| ") and
          not l.startswith(("| method", "| ---"))}
  assert rows["A"] == ["A", "55.00 ± 2.00", "80.4", "P", "-0.200 ± 0.010",
                       "+0.300 ± 0.020", "12",
                       "`split_mnist_baselines.py:strategy=naive`",
                       "`aaaaaaa`"]
  assert rows["B"][1:6] == ["88.40 (1 seed)", "90.0", "Q", "-0.250",
                            "+0.310"]
  assert "**B** is more than 1.5 points below Q (90.0): b's note" in text
  assert "**C**" not in text and "c's note" not in text
  assert rows["D"][1].startswith("failed: ValueError: boom")
  assert rows["F"][1] == "not run: not this time"
  assert "; with results: 3, not run: 2, failed: 1" in text
  assert "entries: 6 of the" in text and "(a partial run" in text
  assert reproduce._kept({"10": "c" * 40, "2": "c" * 40}) == \
      " (seeds 2, 10: `ccccccc`)"


def test_command_line_selects_entries_seeds_and_directories(tmp_path,
                                                            monkeypatch):
  """What main hands run_entry for each entry (no run_entry runs): seeds
  0..n-1 (3 by default), the record and run directory named by the entry,
  --only and --skip matched against ids and tables, the others reused with
  any seeds or listed as not run, --smoke keeping only the selected
  entries, one seed and no committed record, and the data directory from
  $JAXCL_DATA_DIR."""
  calls = {}

  def fake_run(e, seeds, workdir, data_dir, smoke, any_seeds, skip, record):
    calls[e.id] = dict(seeds=list(seeds), workdir=workdir, data=data_dir,
                       smoke=smoke, any_seeds=any_seeds, skip=skip,
                       record=record)
    return {"skipped": "fake"}
  monkeypatch.setattr(reproduce, "run_entry", fake_run)
  monkeypatch.setattr(reproduce, "write_report", lambda *a, **k: "report")
  monkeypatch.setenv("JAXCL_DATA_DIR", str(tmp_path / "data"))
  reproduce._load_more_entries()
  pm20 = "Permuted MNIST (20), MLP 100-100, 1 epoch (Buzzega"
  in_pm20 = {e.id for e in reproduce.ENTRIES if pm20 in e.table}
  naive = "split_mnist_baselines__strategy_naive"
  skipped = next(i for i in sorted(in_pm20) if "replay" in i)
  base = ["--results", str(tmp_path / "res"), "--workdir",
          str(tmp_path / "w"), "--out", str(tmp_path / "o")]
  reproduce.main(base + ["--only", naive, pm20, "--skip", skipped])
  assert len(calls) == len(reproduce.ENTRIES)
  chosen = {i for i, c in calls.items() if not c["any_seeds"]}
  # --only naive also matches naive,kind=task (a substring).
  assert chosen == in_pm20 | {naive, f"{naive}_kind_task"}
  assert len(in_pm20) > 10
  for i, c in calls.items():
    assert c["seeds"] == [0, 1, 2] and c["data"] == str(tmp_path / "data")
    assert c["record"] == str(tmp_path / "res" / f"{i}.json")
    assert c["workdir"] == str(tmp_path / "w" / i) and not c["smoke"]
    if i == skipped:
      assert "--skip" in c["skip"]
    elif i in chosen:
      assert c["skip"] is None
    else:
      assert "not selected by --only" in c["skip"]
  # --skip matches tables too.
  calls.clear()
  reproduce.main(base + ["--only", naive, pm20, "--skip", pm20,
                         "--seeds", "5"])
  assert {i for i, c in calls.items() if c["skip"] and "--skip" in
          c["skip"]} == in_pm20
  assert all(c["seeds"] == [0, 1, 2, 3, 4] for c in calls.values())
  calls.clear()
  reproduce.main(base + ["--smoke", "--only", naive, "--seeds", "5"])
  assert set(calls) == {naive, f"{naive}_kind_task"}
  for i, c in calls.items():
    assert c["seeds"] == [0] and c["smoke"] and c["record"] is None
    assert c["workdir"] == str(tmp_path / "w_smoke" / i)
