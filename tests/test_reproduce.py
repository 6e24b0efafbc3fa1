"""The reproduction script's smoke mode: tiny subsets, 1 seed."""

import os

from experiments import reproduce


def test_smoke_writes_results_with_commit_and_plots(tmp_path, data_dir):
  path = reproduce.main([
      "--smoke", "--only", "split_mnist_baselines__strategy_naive",
      "permuted_mnist_baselines", "--out", str(tmp_path / "out"),
      "--workdir", str(tmp_path / "work"), "--data_dir", data_dir])
  text = open(path).read()
  assert "SMOKE MODE" in text and "commit: `" in text
  assert "| Naive |" in text and "failed" not in text
  assert "Permuted MNIST" in text
  pngs = [f for f in os.listdir(tmp_path / "out") if f.endswith(".png")]
  assert len(pngs) >= 2
  # Resumable: a second call reuses the finished entries.
  mtime = os.path.getmtime(tmp_path / "work_smoke" /
                           "split_mnist_baselines__strategy_naive" /
                           "entry.json")
  reproduce.main([
      "--smoke", "--only", "split_mnist_baselines__strategy_naive",
      "--out", str(tmp_path / "out2"), "--workdir", str(tmp_path / "work"),
      "--data_dir", data_dir])
  assert os.path.getmtime(tmp_path / "work_smoke" /
                          "split_mnist_baselines__strategy_naive" /
                          "entry.json") == mtime


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
