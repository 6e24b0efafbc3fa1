"""The fork server the command, benchmark and checkpoint tests run their
children through (tests/fork_server.py)."""

import os
import subprocess
import sys
import time

import pytest

import fork_server

HERE = os.path.dirname(os.path.abspath(__file__))

# Each request's ``code`` decides how its child ends.
_TARGET = f"""
import sys
sys.path.insert(0, {HERE!r})
import fork_server


def target(req):
  print("child", req["n"])
  if req["code"] == "raise":
    raise RuntimeError("from the child")
  if req["code"]:
    sys.exit(req["code"])


fork_server.serve(target)
"""


def test_a_slow_reader_gets_each_quick_childs_code_in_turn():
  # A quick child's pid and exit code reach the pipe together when the
  # test side reads late (a loaded machine). Session 53's CI: the reader
  # took both lines into its buffer, waited out the timeout for the
  # second and killed a finished child (ProcessLookupError), and every
  # later request read the wrong lines.
  server = fork_server.Server([sys.executable, "-c", _TARGET])
  read = server._line

  def late(wait):
    time.sleep(0.3)   # the two lines are in the pipe by now
    return read(wait)

  server._line = late
  try:
    start = time.monotonic()
    for n, code in enumerate((0, 3, "raise", 0)):
      p = server.run({"n": n, "code": code}, ["child", str(n)], timeout=20)
      assert p.args == ["child", str(n)]
      assert p.stdout == f"child {n}\n"
      if code == "raise":
        assert p.returncode == 1
        assert "RuntimeError: from the child" in p.stderr
      else:
        assert (p.returncode, p.stderr) == (code, "")
    # Nothing waited out a timeout: 4 requests, 8 lines read 0.3 s late.
    assert time.monotonic() - start < 15
  finally:
    server.close()


def test_a_child_past_its_timeout_is_killed_and_the_next_request_works():
  server = fork_server.Server([sys.executable, "-c", _TARGET.replace(
      'print("child", req["n"])',
      'print("child", req["n"])\n  import time\n'
      '  time.sleep(60 if req["n"] == 0 else 0)')])
  try:
    with pytest.raises(subprocess.TimeoutExpired):
      server.run({"n": 0, "code": 0}, ["child", "0"], timeout=2)
    p = server.run({"n": 1, "code": 0}, ["child", "1"], timeout=20)
    assert (p.returncode, p.stdout) == (0, "child 1\n")
  finally:
    server.close()
