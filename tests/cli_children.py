"""The ``jaxcl`` command in child processes, for the tests of the command
(test_cli.py) and of the README's commands (test_readme.py)."""

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
# spends ~2 s importing jax and jaxcl first: those run in children of one
# process that imported them once (tests/fork_server.py). Each child runs
# jaxcl.cli.main as the `jaxcl` console script does, with its own argv,
# directory and environment. test_default_run_writes_outputs and the
# --help test run `python -m jaxcl.cli` itself.
_FORKER = f"""
import os, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import jaxcl, jaxcl.cli, jaxcl.experiment, jaxcl.strategies, jaxcl.sweep
import fork_server


def target(req):
  os.chdir(req["cwd"])
  os.environ.clear()
  os.environ.update(req["env"])
  sys.argv = ["jaxcl", *req["args"]]
  jaxcl.cli.main()


fork_server.serve(target)
"""


def forker(tmp_path_factory):
  """Yields ``forked(*args, cwd=..., extra_env=None)``: the ``jaxcl``
  command in a forked child (see _FORKER), returning what ``jaxcl``
  returns (conftest.py's ``forked`` fixture)."""
  import fork_server
  server = fork_server.Server([sys.executable, "-c", _FORKER],
                              cwd=tmp_path_factory.mktemp("forker"),
                              env=env())

  def run(*args, cwd, extra_env=None):
    return server.run({"args": list(args), "cwd": str(cwd),
                       "env": {**env(), **(extra_env or {})}},
                      ["jaxcl", *args])

  try:
    yield run
  finally:
    server.close()
