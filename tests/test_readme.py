"""The README's examples as written: its Python blocks run, and each of its
``jaxcl`` commands builds (``--dry_run``), so the front page cannot drift
from the library unnoticed. The README's placeholders for data folders
are replaced by this machine's offline data; nothing is downloaded."""

import inspect
import json
import os
import re
import shlex

import numpy as np
import pytest

import cli_children
from cli_children import REPO

with open(os.path.join(REPO, "README.md")) as _f:
  README = _f.read()


def blocks(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
  # In order and in one namespace, as a reader pastes them into a session
  # (the sweep block's `import jaxcl` serves the block after it).
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("JAXCL_DATA_DIR", raising=False)
  ns = {}
  for i, code in enumerate(blocks("python")):
    exec(compile(code, f"README.md python block {i}", "exec"), ns)
  printed = capsys.readouterr().out
  import jaxcl
  from jaxcl import experiment

  # The config file: its variant arguments reach the config.
  c = ns["get_config"]("strategy=ewc,seed=3")
  assert (c.dataset.name, c.strategy.name, c.seed, tuple(c.model.widths)) \
      == ("mnist", "ewc", 3, (400, 400))
  experiment.build_strategy(c)  # a config the factories accept
  assert ns["get_config"]().strategy.name == "naive"

  # The script: a strategy by name, then the same chained with one of the
  # reader's own. The matrix is the stream's (5 x 5) and the metrics are
  # its own: ACC is the last row's mean.
  acc = np.asarray(ns["result"].accuracy)
  assert acc.shape == (5, 5)
  np.testing.assert_allclose(ns["result"].metrics["acc"], acc[-1].mean(),
                             rtol=1e-6)
  assert ns["result"].learner.strategy.name == "l2_to_init+ensemble"
  assert isinstance(ns["strategy"], jaxcl.Strategy)

  # The sweep: seeds x values runs, one matrix each, and the printed table
  # one line per value with n = 3 seeds.
  r = ns["r"]
  assert np.asarray(r.accuracy).shape == (6, 5, 5)
  assert [(m["seed"], m["optimizer.learning_rate"]) for m in r.members] == [
      (s, lr) for lr in (0.1, 0.03) for s in (0, 1, 2)]
  for lr in ("0.1", "0.03"):
    assert f"optimizer.learning_rate={lr} [n=3]: acc " in printed

  # Runs one after another from one Setup share its compiled program, and
  # the seeds differ.
  results = ns["results"]
  assert len(results) == 3
  assert all(x.learner is ns["s"].learner for x in results)
  assert not np.array_equal(results[0].accuracy, results[1].accuracy)
  assert os.listdir(tmp_path) == []  # no workdir given: nothing written


def _commands() -> list[tuple[dict[str, str], list[str]]]:
  """Every command line of the README's bash blocks, continuation lines
  joined and comments dropped, as ``(environment, argv)``."""
  out = []
  for block in blocks("bash"):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #")[0].strip()
      if not line or line.startswith("#"):
        continue
      for command in line.split("&&"):  # pip install ... && jaxcl run
        words = shlex.split(command)
        env = {}
        while re.fullmatch(r"[A-Z_]+=.*", words[0]):
          key, _, value = words.pop(0).partition("=")
          env[key] = value
        out.append((env, words))
  return out


def test_the_readme_commands_are_the_ones_checked():
  # The parser must find every `jaxcl` command the README shows, or the
  # test below would skip the ones it missed.
  shown = sum(len(re.findall(
      r"(?:^|\s)jaxcl (?:run|sweep|methods|compare)\b", b))
      for b in blocks("bash"))
  parsed = [w for _, w in _commands() if w[0] == "jaxcl"]
  assert len(parsed) == shown >= 15
  assert {w[1] for w in parsed} == {"run", "sweep", "methods", "compare"}


# The dry runs below are ~25 `jaxcl` commands in children forked from one
# process (conftest.py's ``forked``). Most read MNIST (~1 s of CPU each:
# decompressing and converting the IDX files) and compile the same small
# init programs, over a third of the test's time. So the forking process
# here also reads the offline MNIST and Fashion-MNIST once, before it
# forks, and the children get those arrays (read-only: a write fails)
# wherever they would read the IDX files of that same directory; any
# other directory (the tfds commands' empty one, a missing one) goes
# through the loader as before. The children share one persistent
# compilation cache (JAX reads the variables when the forking process
# imports it), as the test drivers of conftest.py's ``child_env`` do.
_PRELOAD = r"""
import os
from jaxcl import datasets as _datasets
_read_idx_files = _datasets._load_idx
_kept = {}


def _load_idx(name, data_dir):
  got = _kept.get((name, os.path.realpath(data_dir)))
  return got if got is not None else _read_idx_files(name, data_dir)


for _name in ("mnist", "fashion_mnist"):
  _d = _read_idx_files(_name, DATA_DIR)
  for _a in (_d.train_x, _d.train_y, _d.test_x, _d.test_y):
    _a.flags.writeable = False
  _kept[(_name, os.path.realpath(DATA_DIR))] = _d
_datasets._load_idx = _load_idx
"""


@pytest.fixture(scope="module")
def forked_with_data(tmp_path_factory, data_dir, child_env):
  """conftest.py's ``forked``, its forking process holding the offline
  MNIST files' data sets and the children sharing a compilation cache (see
  _PRELOAD)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(cli_children, "_FORKER", _PRELOAD.replace(
        "DATA_DIR", repr(str(data_dir))) + cli_children._FORKER)
    for k, v in child_env.items():
      mp.setenv(k, v)
    children = cli_children.forker(tmp_path_factory)
    run = next(children)  # the forking process starts here
  yield run
  next(children, None)


def test_readme_commands_build(tmp_path, forked_with_data, data_dir):
  forked = forked_with_data
  # Placeholders become this machine's data; the tfds folders an empty one,
  # so those commands must stop at the data with the loader's own advice.
  empty_tfds = tmp_path / "tensorflow_datasets"
  empty_tfds.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  places = {"/path/to/mnist_idx_files": data_dir, "DIR": data_dir,
            "../shared/data": data_dir, "~/tensorflow_datasets": empty_tfds,
            "$HOME/tensorflow_datasets": empty_tfds,
            "/shared/runs/smnist": cwd / "smnist"}
  checked = 0
  for env, words in _commands():
    if words[0] != "jaxcl":
      continue
    args = []
    for w in words[1:]:
      key, eq, value = w.partition("=")
      if eq and value in places:
        w = f"{key}={places[value]}"
      elif w in places:
        w = str(places[w])
      elif w.startswith("experiments/"):
        w = os.path.join(REPO, w)
      args.append(w)
    env = {k: str(places.get(v, v)) for k, v in env.items()}
    if "TFDS_DATA_DIR" not in env:
      # A reader's MNIST files, where a command gives no data_dir (the
      # README's Data section); the tfds command must not find them.
      env["JAXCL_DATA_DIR"] = str(data_dir)
    if args[0] == "compare":
      _check_compare(args, tmp_path / "compare", forked)
      continue
    if args[0] == "methods":
      p = forked(*args, cwd=cwd, extra_env=env)
      assert p.returncode == 0 and p.stdout, (words, p.stderr)
      for name in args[1:]:
        assert f"### `{name}`" in p.stdout or f"`{name}`" in p.stdout
      continue
    p = forked(*args, "--dry_run", cwd=cwd, extra_env=env)
    checked += 1
    assert "Traceback" not in p.stderr, (words, p.stderr)
    data_dirs = [a.partition("=")[2] for a in args
                 if a.startswith("--config.dataset.data_dir=")]
    if str(empty_tfds) in data_dirs + [env.get("TFDS_DATA_DIR")]:
      name = re.search(r"cifar100|cifar10|mnist", " ".join(args)).group()
      assert p.returncode == 1 and p.stderr.startswith(
          f"jaxcl: error: {name}: no prepared tensorflow_datasets data in "
          f"data_dir="), (words, p.stderr)
    else:
      assert p.returncode == 0 and p.stderr == "", (words, p.stderr)
      assert "(dry run: nothing trained or written)" in p.stdout
      assert "\nstate" in p.stdout, p.stdout
      if args[0] == "sweep":
        assert re.search(r"runs \(\d+, one vmapped program\)", p.stdout)
  assert checked >= 12
  assert os.listdir(cwd) == [] and os.listdir(empty_tfds) == []


def _check_compare(args, where, forked):
  """The README's ``jaxcl compare`` line on stand-ins for its run
  directories (an accuracy_matrix.json each; test_compare.py reads real
  ones): its options parse, every directory is a row, the plot is
  written."""
  where.mkdir(exist_ok=True)
  dirs, plot, i = [], None, 1
  while i < len(args):
    if args[i] in ("--metrics", "--plot"):
      plot = args[i + 1] if args[i] == "--plot" else plot
      i += 2
      continue
    if not args[i].startswith("-"):
      dirs.append(args[i])
    i += 1
  for d in dirs:
    os.makedirs(where / d)
    with open(where / d / "accuracy_matrix.json", "w") as f:
      json.dump({"accuracy": [[0.9, 0.0], [0.6, 0.8]], "evaluated_on":
                 "test", "metrics": {"acc": 0.7, "min_acc": 0.5,
                                     "anytime_acc": 0.75}}, f)
  p = forked(*args, cwd=where)
  assert p.returncode == 0 and p.stderr == "", (args, p.stderr)
  for d in dirs:
    assert f"| {os.path.basename(d)} | 1 |" in p.stdout, p.stdout
  assert plot and os.path.getsize(where / plot) > 0


def test_readme_tfds_preparation_matches_the_function():
  # The README's tfds_local.prepare(...) call (run in test_tfds.py on a
  # subset): its keyword arguments are the function's.
  from jaxcl import tfds_local
  (call,) = re.findall(r"tfds_local\.prepare\((.*?)\)", README, re.S)
  kwargs = re.findall(r"(\w+)=", call)
  assert kwargs == ["manual_dir", "data_dir"]
  inspect.signature(tfds_local.prepare).bind("mnist", **dict.fromkeys(kwargs))


def test_the_methods_sections_count_is_the_registrys():
  """The README's "N strategies in eight families" went stale once (73
  said, 76 registered): it is read from the registry's families."""
  from jaxcl import strategies
  m = re.search(r"^(\d+) strategies in (\w+) families", README, re.M)
  assert m, "the Methods section's count is gone"
  words = {8: "eight", 9: "nine", 10: "ten"}
  assert int(m.group(1)) == len(strategies.available())
  assert m.group(2) == words.get(len(strategies.FAMILIES))
