"""The scripts in benchmarks/ still run against today's jaxcl.

They print speed figures and nothing else checks them, so an API change
in jaxcl could break one silently. Each is run once at its smallest size,
as a user runs it (``python benchmarks/<script>.py ...``: the script run
as ``__main__`` with its own argv; none has a ``main(argv)``), and its
output is checked: exit code 0, no traceback, and every figure it promises
printed, with its label and a number that parses (positive where it must
be). The figures themselves are not checked: a smoke run's sizes are too
small to mean anything, and the machine may be loaded.

A new process spends 2-3 s of CPU importing jax and jaxcl before a script
does anything, so each script runs in a child forked from one process
that imported them once (tests/fork_server.py, as tests/cli_children.py
runs the ``jaxcl`` command). The child runs the file with ``runpy`` as the
interpreter would: ``sys.argv``, ``sys.path[0]`` the script's folder, its
own stdout and stderr, an escaping exception's traceback printed and exit
code 1, ``sys.exit``'s code or message.

The children inherit conftest.py's cheap XLA compile flags (they are set
in ``os.environ`` before the forking process starts), which cut these
runs' time 2-5x; the benchmarks' own figures are taken without them.
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import DATA_DIR, REPO

NUM = r"(-?\d+(?:\.\d*)?(?:e[+-]?\d+)?)"  # a printed float (or int)


_FORKER = f"""
import os, runpy, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import flax.linen, jax, jax.numpy, numpy, optax
import jaxcl, jaxcl.experiment, jaxcl.strategies, jaxcl.sweep, jaxcl.train
import fork_server


def target(req):
  sys.argv = [req["script"], *req["args"]]
  sys.path[0] = os.path.dirname(os.path.abspath(req["script"]))
  runpy.run_path(req["script"], run_name="__main__")


fork_server.serve(target)
"""


@pytest.fixture(scope="module")
def forker():
  """The forking process (see _FORKER and the module's docstring), started
  in the repository with the scripts' environment."""
  from fork_server import Server
  server = Server([sys.executable, "-c", _FORKER], cwd=REPO,
                  env=dict(os.environ, JAXCL_DATA_DIR=DATA_DIR,
                           JAX_PLATFORMS="cpu"))
  try:
    yield server
  finally:
    server.close()


@pytest.fixture
def run_script(forker):
  """``run_script(name, *args, timeout=300, check=True)``: ``python
  benchmarks/<name> args`` from the repository, offline data, in a forked
  child; with ``check``, asserts it exited 0 and printed no traceback."""

  def run(name: str, *args: str, timeout: float = 300,
          check: bool = True) -> subprocess.CompletedProcess:
    p = forker.run({"script": os.path.join("benchmarks", name),
                    "args": list(args)}, [name, *args], timeout)
    if check:
      assert p.returncode == 0, (
          f"{name} {' '.join(args)} exited {p.returncode}:\n"
          f"{p.stderr[-4000:]}")
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-4000:]
    return p
  return run


def figures(pattern: str, text: str) -> list[float]:
  """The numbers of the one line of ``text`` that ``pattern`` (with
  ``NUM`` groups) matches in full; fails, showing ``text``, if none."""
  m = re.search(r"^\s*" + pattern + r"\s*$", text, re.M)
  assert m, f"no line matching {pattern!r} in:\n{text}"
  return [float(g) for g in m.groups()]


def positive(pattern: str, text: str) -> list[float]:
  vals = figures(pattern, text)
  assert all(v > 0 for v in vals), (pattern, vals)
  return vals


@pytest.fixture(scope="module")
def data(data_dir):
  """The offline MNIST files (conftest's check): most scripts read them."""
  return data_dir


def test_strategies_smoke(data, run_script):
  out = run_script("strategies.py", "--smoke", "--protocol", "split",
                   "--only", "naive").stdout
  positive(rf"device: \S+ x\d+; dense matmul 512\^2 f32: {NUM} GFLOP/s", out)
  assert re.search(r"protocol\s+strategy\s+batch\s+steps\s+compile s\s+"
                   r"run s\s+steps/s\s+MFLOP/step\s+GFLOP/s\s+% matmul\s+"
                   r"x naive", out), out
  batch, steps, comp, run, sps, mflop, gflops, pct = positive(
      rf"split\s+naive\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+"
      rf"{NUM}\s+{NUM}%", out)
  assert batch == 128 and steps > 1
  # Naive is its own reference: the "x naive" column is left empty.
  assert len(out.strip().splitlines()) == 3, out


def test_profile_smoke(data, tmp_path, run_script):
  trace = tmp_path / "trace"
  out = run_script("profile.py", "--protocol", "split", "--strategy",
                   "naive", "--top", "5", "--trace_dir", str(trace)).stdout
  steps, total, per_step = positive(
      rf"split naive: {NUM} steps traced; XLA ops {NUM} ms in all "
      rf"\({NUM} ms/step\); trace in " + re.escape(str(trace)), out)
  assert steps > 1
  lines = out.strip().splitlines()
  assert re.fullmatch(r"\s*ms\s+share\s+calls\s+op", lines[1]), out
  rows = [re.fullmatch(rf"\s*{NUM}\s+{NUM}%\s+(\d+)\s+(\S.*)", l)
          for l in lines[2:]]
  # Every line after the header is an op row, at most --top of them.
  assert rows and len(rows) <= 5, out
  assert all(r is not None for r in rows), out
  ms = [float(r.group(1)) for r in rows]
  assert all(m >= 0 for m in ms) and all(int(r.group(3)) > 0 for r in rows)
  # The top ops, slowest first, within the traced total (printed to the
  # ms; each row to 0.1 ms).
  assert ms == sorted(ms, reverse=True), out
  assert sum(ms) <= total + 0.5 + 0.05 * len(ms), out
  assert glob.glob(str(trace / "**" / "*.trace.json.gz"), recursive=True)


@pytest.mark.slow
def test_stream_memory_smoke(data, run_script):
  out = run_script("stream_memory.py", "--cases", "permuted20").stdout
  assert re.search(r"case\s+build s\s+walk s\s+MNIST MB\s+peak MB", out)
  build, walk, data_mb, peak = figures(
      rf"permuted20\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}", out)
  assert build >= 0 and walk > 0 and 0 < data_mb <= peak


@pytest.mark.slow
def test_sweep_smoke(data, run_script):
  out = run_script("sweep.py", "--seeds", "2", "--experiences", "2",
                   "--arg", "strategy=naive,quick=True").stdout
  assert re.search(r"split_mnist_baselines:strategy=naive,quick=True, "
                   r"2 experiences, 2 seeds", out), out
  t, acc, sd = figures(rf"vmapped sweep of 2 runs: {NUM} s "
                       rf"\(ACC {NUM} ± {NUM}\)", out)
  assert t > 0 and 0 <= acc <= 1 and sd >= 0
  positive(rf"2 sequential jaxcl.run calls: {NUM} s", out)
  positive(rf"2 sequential runs sharing one compiled program: {NUM} s", out)
  positive(rf"speed-up of the sweep: {NUM}x over separate runs, {NUM}x "
           r"over a shared-program loop", out)


@pytest.mark.slow
def test_gem_smoke(data, run_script):
  out = run_script("gem.py", "--steps", "5", "--reps", "1", "--rounds", "1",
                   "--protocols", "buzzega200").stdout
  positive(rf"dual QP alone \(19 constraints, in jit\): {NUM} us/solve", out)
  assert re.search(r"^buzzega200: MLP \(100, 100\), batch 128, 5 steps "
                   r"timed, best of 1 x 1$", out, re.M), out
  rows = {}
  for label in ("naive", "gem", "gem@10", "gem/stk", "gem/stk@10", "agem"):
    rows[label] = positive(
        rf"{re.escape(label)}\s+{NUM} ms/step\s+{NUM}x(?:\s+.*)?", out)
  assert rows["naive"][1] == 1.0


def test_conv_in_scan_smoke(run_script):
  # The CNN alone: every model goes through the same loop of the script
  # (the MLP, its reference in a real run, only compiled the same seven
  # programs again, ~40 % of this test's CPU time).
  out = run_script("conv_in_scan.py", "--steps", "2", "--batch", "8",
                   "--channels", "4", "8", "--runs", "2", "--models",
                   "cnn").stdout
  assert re.search(r"batch 8, 2 steps per measurement, conv jaxcl", out)
  for model in ("cnn {'channels': (4, 8), 'hidden': 128}",):
    part = out.split(model, 1)
    assert len(part) == 2, f"no section {model!r} in:\n{out}"
    sect = part[1].split("\n\n", 1)[0]
    for label in ("forward, jitted alone", "forward, in a scan",
                  "gradient, jitted alone", "gradient, in a scan",
                  "train step, loop of jitted calls",
                  "train step, in a scan"):
      positive(rf"{re.escape(label)}\s+{NUM} ms/step", sect)
    positive(rf"scan / alone: forward {NUM}x, gradient {NUM}x, "
             rf"step {NUM}x", sect)
    positive(rf"2-run vmapped step, jitted alone\s+{NUM} ms/step "
             rf"\({NUM}x 2 plain steps\)", sect)


def test_prompt_query_smoke(run_script):
  out = run_script("prompt_query.py", "--batch", "4", "--dim", "16",
                   "--depth", "1", "--steps", "2", "--rounds", "1").stdout
  assert "batch 4, ViT dim 16 depth 1, pool 10, N 5, L 5" in out, out
  on, = positive(rf"step FLOPs, key term on \(lam 0.1\): {NUM}", out)
  off, = positive(rf"step FLOPs, key term off \(lam 0\):\s+{NUM}", out)
  positive(rf"one query pass alone:\s+{NUM}", out)
  assert on >= off
  figures(rf"difference / query pass: {NUM} \(about 1 if the hook's pass "
          r"ran again; near 0 if XLA merged it\)", out)
  positive(rf"ms per step: on {NUM}, off {NUM} \(ratio {NUM}\)", out)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="PyTorch is installed: the full comparison is a "
                           "benchmark run, not a test")
def test_vs_pytorch_without_torch_is_a_clear_message(run_script):
  p = run_script("vs_pytorch.py", "--methods", "naive", check=False)
  assert p.returncode == 1, (p.returncode, p.stderr)
  assert "this benchmark needs PyTorch (pip install torch quadprog)" in (
      p.stderr), p.stderr
  assert p.stdout == ""


@pytest.mark.slow
def test_throughput_smoke(data, run_script):
  out = run_script("throughput.py", "--smoke").stdout
  positive(rf"dense matmul \(512\^2 f32\): {NUM} GFLOP/s", out)
  positive(rf"compile: experience program {NUM} s, evaluation {NUM} s", out)
  steps, secs, sps, gflops, pct = positive(
      rf"train: {NUM} steps in {NUM} s = {NUM} steps/s; {NUM} GFLOP/s = "
      rf"{NUM}% of matmul peak", out)
  assert steps == int(steps) > 1
  positive(rf"eval \(5 test sets x 5 experiences\): {NUM} s", out)
  positive(rf"whole stream after compilation \(train \+ eval\): {NUM} s",
           out)
  assert "(best of 1):" in out, out
  for label in ("Split MNIST naive, no plots/tb",
                "README default (Split Digits, plots, tb)",
                "Split MNIST naive, compilation cache warm"):
    positive(rf"{re.escape(label)}: {NUM} s", out)


# The scripts' other modes: slow only to keep the default suite's share
# of these checks under a minute (each is a few seconds to half a minute).
# Since session 56 (the suite at CI's budget again) also the stream-memory,
# sweep and GEM scripts' smoke runs (11-26 s each): the default suite keeps
# the strategies, profile, conv-in-scan, prompt-query and continual-eval
# scripts.


@pytest.mark.slow
def test_strategies_ratio_to_naive_smoke(data, run_script):
  """A ``naive@`` row, then a strategy of the same config: the "x naive"
  column (their steps/s ratio)."""
  out = run_script("strategies.py", "--smoke", "--protocol", "overhead",
                   "--only", "naive@reg", "ewc").stdout
  row = rf"\s+{NUM}" * 5 + rf"\s+{NUM}\s+{NUM}\s+{NUM}%"
  naive = positive(rf"overhead\s+naive@reg{row}", out)
  ewc = positive(rf"overhead\s+ewc{row}\s+{NUM}x", out)
  # steps/s are printed rounded to units: the ratio agrees to a few %.
  assert abs(ewc[-1] - naive[4] / ewc[4]) <= 0.1 * ewc[-1]


@pytest.mark.slow
def test_gem_stream_and_vmapped_runs_smoke(data, run_script):
  out = run_script("gem.py", "--steps", "5", "--reps", "1", "--rounds", "1",
                   "--protocols", "buzzega200", "--stream", "--runs",
                   "2").stdout
  for m in ("gem", "gem/stk"):
    for k in (0, 5, 10, 15):
      positive(rf"{re.escape(m)}@{k}\s+{NUM} ms/step\s+{NUM}x(?:\s+.*)?",
               out)
    positive(rf"{re.escape(m)}@10x2\s+{NUM} ms/step\s+{NUM}x\s+a sweep of "
             r"2 vmapped runs, per run", out)
    positive(rf"{re.escape(m)} mean\s+{NUM} ms/step\s+{NUM}x\s+mean step "
             r"over the 20 experiences .*", out)


@pytest.mark.slow
def test_sweep_scenario_per_seed_smoke(data, run_script):
  out = run_script("sweep.py", "--config", "permuted_mnist_replay", "--arg",
                   "strategy=replay,mem_size=200,quick=True",
                   "--scenario_per_seed", "--seeds", "2", "--experiences",
                   "2").stdout
  assert "2 experiences, 2 seeds, each on its own scenario draw" in out, out
  positive(rf"vmapped sweep of 2 runs: {NUM} s \(ACC {NUM} ± {NUM}\)", out)
  positive(rf"2 sequential jaxcl.run calls: {NUM} s", out)
  positive(rf"speed-up of the sweep: {NUM}x over separate runs", out)
  assert "shared-program" not in out


@pytest.mark.slow
def test_conv_in_scan_flax_conv_smoke(run_script):
  out = run_script("conv_in_scan.py", "--steps", "2", "--batch", "8",
                   "--channels", "4", "8", "--runs", "1", "--models", "cnn",
                   "--conv", "lax").stdout
  assert "conv lax" in out, out
  for label in ("gradient, in a scan", "train step, in a scan"):
    positive(rf"{re.escape(label)}\s+{NUM} ms/step", out)
  positive(rf"scan / alone: forward {NUM}x, gradient {NUM}x, step {NUM}x",
           out)
  assert "vmapped" not in out  # --runs 1 skips the sweep's step


def test_continual_eval_smoke(data, run_script):
  out = run_script("continual_eval.py", "--smoke").stdout
  assert re.search(r"split_mnist_replay_200: 5 experiences, \d+ steps, test "
                   r"sets of 1000 images in all", out), out
  assert re.search(r"every\s+evaluations\s+train s\s+eval s\s+ms/eval\s+"
                   r"total s\s+x plain", out), out
  evals, *times, ratio = positive(
      rf"0\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}", out)
  assert evals == 6 and ratio == 1.0  # the initial model and 5 ends
  more, *_ = positive(rf"20\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}",
                      out)
  assert more > evals


def test_autoaugment_smoke(run_script):
  out = run_script("autoaugment.py", "--batch", "4", "--rounds", "1").stdout
  assert "backend cpu, batch 4 of 32x32x3" in out, out
  positive(rf"jaxcl compile: {NUM} s", out)
  positive(rf"jaxcl: {NUM} ms per batch, {NUM} images/s", out)
  positive(rf"PIL loop \(one process\): {NUM} ms per batch, {NUM} images/s",
           out)
