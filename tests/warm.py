"""Warm ``python train.py`` processes for the tests: ``subprocess``'s ``run``/``Popen``, forked
from a server that has already imported JAX and jaxgc.

Each ``train.py`` a test starts would spend about 3 CPU-seconds importing JAX, flax, optax,
orbax and grain before doing anything, and the suite starts dozens. Here a server per pytest
process imports them once (with JAX's backend *not* started, so no threads exist) and
forks one child per command. A child is a real process: its own pid, its own signal
handlers (SIGTERM, SIGINT, SIGSTOP and ``kill -9`` reach it and nothing else), its own
files and exit status, its stdin/stdout/stderr the caller's pipes (passed over a Unix
socket). It runs the script as ``python script.py`` would: ``sys.argv``, ``sys.path[0]``,
``__main__``, then non-daemon threads joined and ``atexit`` run, then ``os._exit``.

Variables read at import (``JAX_*``, ``PYTHON*``) are the server's own: there is one
server per set of their values (``XLA_FLAGS`` is read when the backend starts, in the
child). What a server cannot reproduce runs as an ordinary subprocess: a command that is
not ``[sys.executable, script.py | -m module, ...]``, or options beyond ``cwd``/``env``/
the three streams/``text``. ``JAXGC_TESTS_NO_WARM=1`` turns the servers off.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

PIPE, DEVNULL, STDOUT = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT
TimeoutExpired, CalledProcessError = subprocess.TimeoutExpired, subprocess.CalledProcessError
CompletedProcess = subprocess.CompletedProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ("jax", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "absl.app",
           "jaxgc", "jaxgc.experiment", "jaxgc.planner", "configs.default")
_IMPORT_TIME_ENV = ("JAX_", "PYTHON")
_OPTIONS = {"cwd", "env", "stdin", "stdout", "stderr", "text", "universal_newlines"}

_server: dict = {}


def _runnable(args, options) -> bool:
  if os.environ.get("JAXGC_TESTS_NO_WARM") == "1" or set(options) - _OPTIONS:
    return False
  args = [os.fspath(a) for a in args] if isinstance(args, (list, tuple)) else None
  if not args or len(args) < 2 or args[0] != sys.executable:
    return False
  return args[1] == "-m" and len(args) > 2 or args[1].endswith(".py")


def _address(env) -> str:
  """The socket of the server for ``env``'s import-time variables, started on first use
  (one per pytest process and such environment; ended when that process ends)."""
  key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(_IMPORT_TIME_ENV)))
  if _server.get("pid") != os.getpid():
    _server.clear()
    _server["pid"] = os.getpid()
  if key not in _server:
    path = os.path.join(tempfile.mkdtemp(prefix="jaxgc-warm-"), "s")
    server_env = {k: v for k, v in os.environ.items() if not k.startswith(_IMPORT_TIME_ENV)}
    proc = subprocess.Popen([sys.executable, __file__, path], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**server_env, **dict(key)})
    line = proc.stdout.readline().strip()
    if line != "ready":
      raise RuntimeError(f"the warm train.py server did not start: {line!r}")
    _server[key] = path
    atexit.register(proc.kill)
  return _server[key]


class Popen:
  """:class:`subprocess.Popen` for a warm child (or a real subprocess where it cannot be)."""

  def __init__(self, args, stdin=None, stdout=None, stderr=None, cwd=None, env=None,
               text=False, universal_newlines=False, **options):
    options.update(cwd=cwd, env=env)
    self.args, self.returncode, self._text = args, None, text or universal_newlines
    kinds = {"stdin": stdin, "stdout": stdout, "stderr": stderr}
    if not _runnable(args, {k: v for k, v in options.items() if v is not None or k in _OPTIONS}):
      self._real = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr,
                                    text=self._text, **options)
      self.pid, self.stdin = self._real.pid, self._real.stdin
      self.stdout, self.stderr = self._real.stdout, self._real.stderr
      return
    self._real = None
    self.stdin = self.stdout = self.stderr = None
    send, close = [], []
    for i, (name, kind) in enumerate(kinds.items()):
      if kind is None:
        send.append(i)
      elif kind == DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR)
        send.append(fd)
        close.append(fd)
      elif kind == STDOUT and name == "stderr":
        send.append(send[1])
      elif kind == PIPE:
        r, w = os.pipe()
        child, mine = (r, w) if name == "stdin" else (w, r)
        send.append(child)
        close.append(child)
        mode = ("w" if name == "stdin" else "r") + ("" if self._text else "b")
        setattr(self, name, open(mine, mode, encoding="utf-8" if self._text else None))
      elif hasattr(kind, "fileno"):
        send.append(kind.fileno())
      else:
        send.append(kind)
    env = dict(os.environ if env is None else env)
    request = json.dumps({"argv": [os.fspath(a) for a in args][1:],
                          "cwd": os.fspath(cwd or os.getcwd()), "env": env}).encode()
    self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self._conn.connect(_address(env))
    socket.send_fds(self._conn, [struct.pack("!I", len(request)) + request], send)
    for fd in close:
      os.close(fd)
    self._buffer = b""
    self.pid = int(self._line(None))
    self._readers: list[threading.Thread] = []
    self._output: dict = {}

  def _line(self, timeout):
    self._conn.settimeout(timeout)
    while b"\n" not in self._buffer:
      chunk = self._conn.recv(64)
      if not chunk:
        raise RuntimeError("the warm train.py server went away")
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    return line.decode()

  def poll(self):
    if self._real is not None:
      self.returncode = self._real.poll()
    elif self.returncode is None:
      with contextlib.suppress(BlockingIOError, TimeoutError):
        self._reaped(int(self._line(0.0)))
    return self.returncode

  def _reaped(self, code):
    # The child stays a zombie (so os.kill on its pid still succeeds, as with a real
    # Popen) until this acknowledgement.
    self.returncode = code
    with contextlib.suppress(OSError):
      self._conn.sendall(b"k")
      self._conn.settimeout(30)
      while self._conn.recv(64):   # the server closes once it has reaped the child
        pass
    self._conn.close()

  def wait(self, timeout=None):
    if self._real is not None:
      self.returncode = self._real.wait(timeout)
    elif self.returncode is None:
      try:
        code = int(self._line(timeout))
      except TimeoutError:
        raise TimeoutExpired(self.args, timeout) from None
      self._reaped(code)
    return self.returncode

  def communicate(self, input=None, timeout=None):  # noqa: A002  (subprocess's name)
    if self._real is not None:
      out = self._real.communicate(input, timeout)
      self.returncode = self._real.returncode
      return out
    end = None if timeout is None else time.monotonic() + timeout
    if not self._readers:
      if self.stdin is not None:
        if input:
          self.stdin.write(input)
        self.stdin.close()
      for name in ("stdout", "stderr"):
        stream = getattr(self, name)
        if stream is not None:
          reader = threading.Thread(target=lambda s=stream, n=name: self._output.update(
              {n: s.read()}), daemon=True)
          reader.start()
          self._readers.append(reader)
    for reader in self._readers:
      reader.join(None if end is None else max(0.0, end - time.monotonic()))
      if reader.is_alive():
        raise TimeoutExpired(self.args, timeout)
    self.wait(None if end is None else max(0.0, end - time.monotonic()))
    for name in ("stdout", "stderr"):
      stream = getattr(self, name)
      if stream is not None:
        stream.close()
    return self._output.get("stdout"), self._output.get("stderr")

  def send_signal(self, sig):
    if self.poll() is None:
      os.kill(self.pid, sig)

  def terminate(self):
    self.send_signal(signal.SIGTERM)

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for stream in (self.stdout, self.stderr, self.stdin):
      if stream is not None:
        stream.close()
    self.wait()


def run(args, *, input=None, capture_output=False, timeout=None, check=False,  # noqa: A002
        **options):
  """:func:`subprocess.run` on :class:`Popen`."""
  if capture_output:
    options.update(stdout=PIPE, stderr=PIPE)
  if input is not None:
    options["stdin"] = PIPE
  with Popen(args, **options) as proc:
    try:
      out, err = proc.communicate(input, timeout=timeout)
    except TimeoutExpired:
      proc.kill()
      proc.wait()
      raise
  if check and proc.returncode:
    raise CalledProcessError(proc.returncode, args, out, err)
  return CompletedProcess(args, proc.returncode, out, err)


# -- the server (run as a script) -------------------------------------------------------------

def _exit_code(code) -> int:
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)
  return 1


def _child(request) -> None:
  """In the forked child: become ``python <argv>`` and exit as it would."""
  argv = request["argv"]
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
    signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  import runpy  # pylint: disable=import-outside-toplevel
  code = 0
  try:
    try:
      if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = request["cwd"]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
      else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
      code = _exit_code(e.code)
    except KeyboardInterrupt:
      import traceback  # pylint: disable=import-outside-toplevel
      traceback.print_exc()
      code = -signal.SIGINT
    except BaseException:  # noqa: BLE001  (as the interpreter: print and exit 1)
      import traceback  # pylint: disable=import-outside-toplevel
      traceback.print_exc()
      code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # noqa: SLF001  (as at exit)
    atexit._run_exitfuncs()  # noqa: SLF001
  finally:
    for stream in (sys.stdout, sys.stderr):
      with contextlib.suppress(Exception):
        stream.flush()
    if code == -signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _serve(path: str) -> None:
  sys.path.insert(0, ROOT)
  for name in PRELOAD:
    importlib.import_module(name)
  import gc  # pylint: disable=import-outside-toplevel
  gc.freeze()   # the imported objects stay shared (copy-on-write) with every child
  server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  server.bind(path)
  server.listen(64)
  print("ready", flush=True)
  parent, children, exited = os.getppid(), {}, {}
  while os.getppid() == parent:
    ready, _, _ = select.select([server, *exited], [], [], 0.02)
    for conn in ready:
      if conn is not server:   # the client read the status (or went away): reap
        os.waitpid(exited.pop(conn), 0)
        conn.close()
    if server in ready:
      conn, _ = server.accept()
      conn.settimeout(30)
      data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
      size = struct.unpack("!I", data[:4])[0]
      while len(data) < 4 + size:
        data += conn.recv(1 << 20)
      request = json.loads(data[4:4 + size])
      pid = os.fork()
      if pid == 0:
        server.close()
        for other in [*children.values(), *exited]:
          other.close()
        conn.close()
        for i, fd in enumerate(fds):
          os.dup2(fd, i)
        for fd in set(fds):
          if fd > 2:
            os.close(fd)
        _child(request)
      for fd in fds:
        os.close(fd)
      conn.sendall(f"{pid}\n".encode())
      children[pid] = conn
    for pid in list(children):
      # WNOWAIT: the child stays a zombie until its client has read the status.
      done = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
      if done is None:
        continue
      conn = children.pop(pid)
      code = done.si_status if done.si_code == os.CLD_EXITED else -done.si_status
      try:
        conn.sendall(f"{code}\n".encode())
        exited[conn] = pid
      except OSError:
        os.waitpid(pid, 0)
        conn.close()

if __name__ == "__main__":
  _serve(sys.argv[1])
