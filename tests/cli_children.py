"""The ``jaxcl`` command in child processes, for the tests of the command
(test_cli.py) and of the README's commands (test_readme.py)."""

import json
import os
import subprocess
import sys

import jaxcl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the jaxcl under test lives. The children run in other directories,
# so without it first on their path they imported the installed jaxcl, and
# a copy under test (a mutation audit's, shadowing the install through the
# working directory) never reached them (session 43).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(
    jaxcl.__file__)))


def env() -> dict[str, str]:
  env = dict(os.environ)
  env.pop("JAXCL_DATA_DIR", None)  # the default must need no data files
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
  return env


def jaxcl(*args, cwd):
  """``python -m jaxcl.cli ARGS`` in its own process."""
  return subprocess.run([sys.executable, "-m", "jaxcl.cli", *args], cwd=cwd,
                        capture_output=True, text=True, env=env(),
                        timeout=300)


# Most commands here fail early or train for a second, and a new process
# spends ~2 s importing jax and jaxcl first: those run in children forked
# from one process that imported them once, before any JAX backend exists
# (so forking is safe; asserted). Each child runs jaxcl.cli.main as the
# `jaxcl` console script does, with its own argv, directory, environment,
# stdout and stderr; an exception that escapes prints its traceback, as
# the interpreter would. test_default_run_writes_outputs and the --help
# test run `python -m jaxcl.cli` itself.
_FORKER = r"""
import json, os, sys, traceback
import jaxcl, jaxcl.cli, jaxcl.experiment, jaxcl.strategies, jaxcl.sweep
from jax._src import xla_bridge
# (A private name: if a JAX version drops it, the check is skipped.)
assert not getattr(xla_bridge, "_backends", None), \
    "a JAX backend started before the fork"
for line in sys.stdin:
  req = json.loads(line)
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      os.chdir(req["cwd"])
      os.environ.clear()
      os.environ.update(req["env"])
      for fd, path in ((1, req["out"]), (2, req["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
      sys.argv = ["jaxcl", *req["args"]]
      try:
        jaxcl.cli.main()
        code = 0
      except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
          code = e.code or 0
        else:
          print(e.code, file=sys.stderr)
      except BaseException:
        traceback.print_exc()
    finally:
      try:
        sys.stdout.flush()
        sys.stderr.flush()
      finally:
        os._exit(code)
  _, status = os.waitpid(pid, 0)
  print(os.waitstatus_to_exitcode(status), flush=True)
"""


def forker(tmp_path_factory):
  """Yields ``forked(*args, cwd=...)``: the ``jaxcl`` command in a forked
  child (see _FORKER), returning what ``jaxcl`` returns (conftest.py's
  ``forked`` fixture)."""
  import select
  home = tmp_path_factory.mktemp("forker")
  proc = subprocess.Popen([sys.executable, "-c", _FORKER], cwd=home,
                          env=env(), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  n = [0]

  def run(*args, cwd, extra_env=None):
    n[0] += 1
    out, err = home / f"{n[0]}.out", home / f"{n[0]}.err"
    proc.stdin.write(json.dumps({"args": list(args), "cwd": str(cwd),
                                 "env": {**env(), **(extra_env or {})},
                                 "out": str(out),
                                 "err": str(err)}) + "\n")
    proc.stdin.flush()
    if not select.select([proc.stdout], [], [], 300)[0]:
      raise subprocess.TimeoutExpired(["jaxcl", *args], 300)
    line = proc.stdout.readline()
    assert line, f"the forking process died (exit {proc.wait()})"
    return subprocess.CompletedProcess(["jaxcl", *args], int(line),
                                       out.read_text(), err.read_text())
  yield run
  proc.stdin.close()
  proc.wait(timeout=60)
