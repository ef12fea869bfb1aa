"""tests/warm.py's children behave as ``subprocess``'s: the same output and exit status for
every way a script ends, real pids that signals reach, and pipes that stream."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import warm

SCRIPT = """
import os, sys, time
mode = sys.argv[1]
print("argv", sys.argv[1:], "cwd", os.path.basename(os.getcwd()), "env", os.environ.get("WARM_T"))
print("to stderr", file=sys.stderr)
if mode == "code":
  sys.exit(3)
if mode == "message":
  sys.exit("one line and exit 1")
if mode == "raise":
  raise RuntimeError("uncaught")
if mode == "stdin":
  print("read", sys.stdin.read().strip())
if mode == "sleep":
  print("sleeping", flush=True)
  time.sleep(60)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
  path = tmp_path_factory.mktemp("warm") / "script.py"
  path.write_text(SCRIPT)
  return str(path)


@pytest.mark.parametrize("mode", ["ok", "code", "message", "raise", "stdin"])
def test_same_output_and_status_as_subprocess(script, tmp_path, mode):
  env = dict(os.environ, WARM_T="x")
  runs = [m.run([sys.executable, script, mode], cwd=tmp_path, env=env, capture_output=True,
                text=True, input="fed" if mode == "stdin" else None, timeout=120)
          for m in (warm, subprocess)]
  ours, theirs = runs
  assert ours.returncode == theirs.returncode
  assert ours.stdout == theirs.stdout
  if mode == "raise":   # the same traceback but for the runner's own frames
    assert ours.stderr.splitlines()[-1] == theirs.stderr.splitlines()[-1]
  else:
    assert ours.stderr == theirs.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signals_reach_the_child_alone_and_its_pid_stays_until_waited(script, sig):
  proc = warm.Popen([sys.executable, script, "sleep"], stdout=warm.PIPE, text=True)
  assert proc.stdout.readline().startswith("argv")     # the pipe streams, line by line
  assert proc.stdout.readline().strip() == "sleeping"
  assert proc.pid != os.getpid() and os.path.exists(f"/proc/{proc.pid}")
  assert proc.poll() is None
  os.kill(proc.pid, sig)
  time.sleep(0.5)
  os.kill(proc.pid, 0)          # exited but not yet waited: still a pid, as with Popen
  assert proc.wait(timeout=30) == -sig
  proc.stdout.close()
  with pytest.raises(ProcessLookupError):
    os.kill(proc.pid, 0)


def test_timeout_raises_and_leaves_the_child_running(script):
  proc = warm.Popen([sys.executable, script, "sleep"], stdout=warm.DEVNULL)
  with pytest.raises(subprocess.TimeoutExpired):
    proc.wait(timeout=0.5)
  proc.kill()
  assert proc.wait(timeout=30) == -signal.SIGKILL
