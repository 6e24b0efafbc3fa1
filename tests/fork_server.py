"""One process that imports jax and jaxcl once, and forks a child for each
command the tests ask it to run: the ``jaxcl`` command
(tests/cli_children.py), the benchmark scripts (tests/test_benchmarks.py)
and the checkpoint driver (tests/resume_driver.py). A new process spends
2-3 s of CPU importing jax and jaxcl before it computes anything, most of
what such a command costs in a test.

The server side, :func:`serve`, runs in that process after its imports,
before any JAX backend exists (so forking is safe; asserted): for each
request line on its stdin (JSON) it forks a child that sends its stdout
and stderr to the request's ``out`` and ``err`` files and runs
``target(request)`` as the interpreter would run a script (an escaping
exception's traceback printed and exit code 1; ``sys.exit``'s code, or
its message and code 1), then prints the child's pid and, when it ends,
its exit code (negative: the signal that ended it). Each child gets its own
backend, compilation and signals, as a new process would.

The test side, :class:`Server`, starts the process and sends requests;
a request that outlives its timeout has its child killed.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable


def serve(target: Callable[[dict], Any]) -> None:
  """The server loop (see the module docstring)."""
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
      _child(req, target)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)


def _child(req: dict, target: Callable[[dict], Any]) -> None:
  code = 1
  try:
    for fd, path in ((1, req["out"]), (2, req["err"])):
      f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(f, fd)
      os.close(f)
    try:
      target(req)
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


class Server:
  """The forking process, started with ``argv`` (a script that imports
  what its children need, then calls :func:`serve`), in ``cwd`` with
  ``env``. Use :meth:`run` for each command and :meth:`close` at the
  end."""

  def __init__(self, argv: list[str], cwd: Any = None,
               env: dict[str, str] | None = None):
    self.home = tempfile.mkdtemp(prefix="fork_server_")
    self.proc = subprocess.Popen(argv, cwd=cwd, env=env,
                                 stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    self.count = 0
    self._pending = b""  # read from the pipe, not yet returned as lines

  def _line(self, wait: float) -> int | None:
    """The server's next line as an int, or None after ``wait`` seconds
    without one. Read with ``os.read`` into ``_pending``, never through
    the pipe's buffered reader: a quick child's pid and exit code arrive
    together, and a ``readline`` would take both into its buffer, where
    ``select`` on the pipe does not see the second (it then waited out
    the timeout and killed a finished child)."""
    deadline = time.monotonic() + wait
    fd = self.proc.stdout.fileno()
    while b"\n" not in self._pending:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([fd], [], [], left)[0]:
        return None
      chunk = os.read(fd, 4096)
      assert chunk, f"the forking process died (exit {self.proc.wait()})"
      self._pending += chunk
    got, self._pending = self._pending.split(b"\n", 1)
    return int(got)

  def run(self, request: dict, name: list[str], timeout: float = 300
          ) -> subprocess.CompletedProcess:
    """Runs ``request`` (what the server's target reads; ``out`` and
    ``err`` are added) in a child; returns its exit code and output as a
    CompletedProcess named ``name``. Past ``timeout`` seconds the child is
    killed and ``subprocess.TimeoutExpired`` raised."""
    self.count += 1
    files = [os.path.join(self.home, f"{self.count}.{k}")
             for k in ("out", "err")]
    self.proc.stdin.write(json.dumps(
        {**request, "out": files[0], "err": files[1]}) + "\n")
    self.proc.stdin.flush()
    pid = self._line(60)
    assert pid is not None, "the forking process does not answer"
    code = self._line(timeout)
    if code is None:
      os.kill(pid, signal.SIGKILL)
      self._line(60)
      raise subprocess.TimeoutExpired(name, timeout)
    stdout, stderr = (open(f).read() for f in files)
    for f in files:
      os.remove(f)
    return subprocess.CompletedProcess(name, code, stdout, stderr)

  def close(self) -> None:
    """Ends the forking process (killed if it does not end within 60 s)
    and removes its scratch files."""
    self.proc.stdin.close()
    try:
      self.proc.wait(timeout=60)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
        self.proc.wait()
      shutil.rmtree(self.home, ignore_errors=True)
