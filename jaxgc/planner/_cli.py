"""``python -m jaxgc.planner``: the command line of :func:`jaxgc.planner.plan`.

Each bad value is one line on stderr naming its flag, exit code 2; the library's
:class:`~jaxgc.errors.ParamError` says which argument, and :data:`_FLAGS` which flag.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from jaxgc import network as _network
from jaxgc import timing as _timing
from jaxgc.errors import ParamError
from jaxgc.planner import _rank as _planner

__all__ = ["main", "parse_args", "format_table"]

PROG = "python -m jaxgc.planner"
# ParamError.param of the library -> the flag that set it.
_FLAGS = {"num_workers": "--num_workers", "num_params": "--num_params", "trials": "--trials",
          "protocols": "--protocols", "loads": "--loads", "ells": "--ells",
          "message_dtypes": "--dtypes", "ell_sets": "--ell_sets"}


class _Error(Exception):
  """A bad command-line value: printed as one line naming the flag."""


def _number(flag: str, text: str, *, positive: bool = False, allow_zero: bool = True) -> float:
  try:
    x = float(text)
  except ValueError:
    raise _Error(f"{flag}: {text!r} is not a number.") from None
  if not math.isfinite(x):
    raise _Error(f"{flag}: must be finite, got {text!r}.")
  if positive and (x < 0 or (x == 0 and not allow_zero)):
    want = "> 0" if not allow_zero else ">= 0"
    raise _Error(f"{flag}: must be {want}, got {text!r}.")
  return x


def _ints(flag: str, text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.replace(",", " ").split())
  except ValueError:
    raise _Error(f"{flag}: {text!r} is not a list of integers (e.g. 2,3,4).") from None
  if not values or min(values) < 1:
    raise _Error(f"{flag}: needs integers >= 1, got {text!r}.")
  return values


def _straggler(flag: str, words: list[str] | None, failure_prob: float):
  if not words:
    words = ["slowdown"]
  name = words[0]
  params: dict[str, float | str] = {}
  for w in words[1:]:
    if "=" not in w:
      raise _Error(f"{flag}: parameter {w!r} is not KEY=VALUE (e.g. {flag} slowdown factor=5).")
    k, v = w.split("=", 1)
    try:
      params[k] = float(v)
    except ValueError:
      params[k] = v
  try:
    return _timing.get_straggler_model(name, failure_prob, **params)
  except (ValueError, TypeError) as e:
    raise _Error(f"{flag}: {e}") from None


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    # One line, no usage block: the flag and what is wrong.
    raise _Error(message)


def parse_args(argv=None) -> dict:
  """The command line as keyword arguments of :func:`jaxgc.planner.plan` (plus ``json``)."""
  p = _Parser(prog=PROG,
              description="Rank (protocol, load, ell) by simulated step time, best first.")
  p.add_argument("--num_workers", required=True, help="workers m")
  p.add_argument("--num_params", required=True, help="model size d (e.g. 1e9)")
  p.add_argument("--bandwidth", required=True, help="bytes per second (100 Gbit/s = 1.25e10)")
  p.add_argument("--latency", default="0", help="seconds per round (default 0)")
  p.add_argument("--topology", default="ps", help="ps (PS ingress) or ring (all-reduce)")
  p.add_argument("--straggler", nargs="+", metavar="NAME [KEY=VALUE]",
                 help="straggler model and parameters (default: slowdown)")
  p.add_argument("--failure_prob", default="0", help="per-worker failure probability")
  p.add_argument("--protocols", default=",".join(_planner.DEFAULT_PROTOCOLS))
  p.add_argument("--loads", default=",".join(map(str, _planner.DEFAULT_LOADS)))
  p.add_argument("--ells", default=",".join(map(str, _planner.DEFAULT_ELLS)))
  p.add_argument("--ell_sets", default="",
                 help="sets of ell chosen per step, each one candidate, e.g. '1,2,4;1,2' "
                      "(PROTOCOL.md §14)")
  p.add_argument("--trials", default="1000", help="simulated steps per candidate")
  p.add_argument("--dtype", default="float32", help="gradient dtype (bytes per number)")
  p.add_argument("--dtypes", default="float32",
                 help="message precisions on the wire to choose from with ell, e.g. "
                      "float32,bfloat16,int8 (PROTOCOL.md §15)")
  p.add_argument("--seed", default="0")
  p.add_argument("--json", action="store_true", help="print the rows as JSON")
  a = p.parse_args(argv)

  workers = _number("--num_workers", a.num_workers)
  if not workers.is_integer() or workers < 2:
    raise _Error(f"--num_workers: must be an integer >= 2, got {a.num_workers!r}.")
  d = _number("--num_params", a.num_params)
  if d < 1 or not d.is_integer():
    raise _Error(f"--num_params: must be a positive whole number of parameters, got "
                 f"{a.num_params!r}.")
  bandwidth = _number("--bandwidth", a.bandwidth, positive=True, allow_zero=False)
  latency = _number("--latency", a.latency, positive=True)
  if a.topology not in ("ps", "ring"):
    raise _Error(f"--topology: unknown topology {a.topology!r}; choose ps (PS ingress) or "
                 "ring (ring all-reduce).")
  failure_prob = _number("--failure_prob", a.failure_prob, positive=True)
  trials = _number("--trials", a.trials, positive=True, allow_zero=False)
  if not trials.is_integer():
    raise _Error(f"--trials: must be a positive integer, got {a.trials!r}.")
  try:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    dtype = jnp.dtype(a.dtype)
  except TypeError:
    raise _Error(f"--dtype: unknown dtype {a.dtype!r} (e.g. float32, bfloat16).") from None
  try:
    message_dtypes = _planner.check_message_dtypes(a.dtypes.replace(",", " ").split())
  except ParamError as e:
    raise _Error(f"--dtypes: {e}") from None
  names = tuple(n for n in a.protocols.replace(",", " ").split())
  loads, ells = _ints("--loads", a.loads), _ints("--ells", a.ells)
  ell_sets = [_ints("--ell_sets", part) for part in a.ell_sets.split(";") if part.strip()]
  try:
    _planner.candidates(int(workers), names, loads, ells, ell_sets=ell_sets)
  except ParamError as e:
    raise _Error(_grid_error(e, a)) from None
  return dict(
      num_workers=int(workers), num_params=int(d),
      network=_network.get_network(a.topology, bandwidth, latency),
      straggler=_straggler("--straggler", a.straggler, failure_prob),
      protocols=names, loads=loads, ells=ells, ell_sets=ell_sets,
      trials=int(trials), dtype=dtype, seed=int(_number("--seed", a.seed)), json=a.json,
      message_dtypes=message_dtypes)


def _grid_error(e: ParamError, a: argparse.Namespace) -> str:
  """The line for a grid the library rejects: the flag(s) its ``param`` names, the message."""
  msg = " ".join(str(e).split())
  if e.param == "ells":         # no ell fits a load: the two flags together
    return f"--ells {a.ells} with --loads {a.loads}: {msg}"
  if e.param == "loads":        # the loads are checked one by one above: none fits m
    return f"--loads {a.loads} with --num_workers {a.num_workers}: {msg}"
  return f"{_FLAGS.get(e.param or '', '--protocols')}: {msg}"


def format_table(rows: list[dict], top: int | None = None) -> str:
  """The rows as a fixed-width table (times in seconds, messages in MB, the share of steps
  with an exact gradient)."""
  head = (f"{'protocol':<22}{'load':>5}{'ell':>8}{'wire':>9}{'E[step] s':>12}{'p95 s':>10}"
          f"{'compute s':>11}{'comm s':>10}{'MB/worker':>11}{'exact':>7}")
  lines = [head, "-" * len(head)]
  for r in rows[:top]:
    name = r["protocol"] + (f" (b={r['num_backup']})" if r.get("num_backup") else "")
    ell = ",".join(map(str, r["ell"])) if isinstance(r["ell"], (tuple, list)) else r["ell"]
    lines.append(f"{name:<22}{r['load']:>5}{ell:>8}{r.get('message_dtype', 'float32'):>9}"
                 f"{r['mean_step_time']:>12.4g}"
                 f"{r['p95_step_time']:>10.4g}{r['compute_time']:>11.4g}"
                 f"{r['comm_time']:>10.4g}{r['bytes_per_worker'] / 1e6:>11.4g}"
                 f"{r['exact_fraction']:>7.0%}")
  return "\n".join(lines)


def main(argv=None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code (2: a
  bad flag, one line on stderr)."""
  try:
    kwargs = parse_args(argv)
    as_json = kwargs.pop("json")
    rows = _planner.plan(**kwargs)
  except _Error as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  except ParamError as e:           # an argument the library rejects, named by its flag
    flag = _FLAGS.get(e.param or "")
    print(f"{PROG}: {flag + ': ' if flag else ''}{' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except ValueError as e:           # any other value the library rejects: still one line
    print(f"{PROG}: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  if as_json:
    print(json.dumps(rows))
  else:
    best = rows[0]
    print(f"{kwargs['num_workers']} workers, d = {kwargs['num_params']:.3g}, "
          f"network {kwargs['network']}; best: {best['protocol']} load={best['load']} "
          f"ell={best['ell']} {best['message_dtype']}, E[step] = {best['mean_step_time']:.4g} s")
    if best["exact_fraction"] < 1:
      exact = next((r for r in rows if r["exact_fraction"] == 1), None)
      if exact is not None:
        print(f"(it drops chunks: exact gradients in {best['exact_fraction']:.0%} of the steps; "
              f"best exact: {exact['protocol']} load={exact['load']} ell={exact['ell']}, "
              f"E[step] = {exact['mean_step_time']:.4g} s)")
    print(format_table(rows))
  return 0
