"""Time dilation: run ``psadv`` with every rank's work padded to k× its compute time.

    mpiexec -n N+1 python scripts/dilate.py --factor K [--stats DIR] -- train --data-dir ... --threads 1 ...

N attackers need N cores to run at their real speed; this machine has 2. Dilation lets N + 1 ranks
share them while keeping what the bottleneck model's n* = c_a / c_s depends on: every rank, server
and attackers alike, sleeps after each unit of its work until the unit has taken k × the CPU time it
used, so the job runs as it would on N + 1 cores whose every computation is k times slower
(issue 39, item 2; results/attackers-dilated-scaling.toml). Ranks asleep use no core, so N + 1 ranks
need about (N + 1) / k cores.

What is dilated, from outside psadv (nothing here is a product option):

* the units of work of the two roles: :class:`psadv.server.Server` ``poll`` (receiving and
  validating pushes), ``use`` (the training/apply step of one push), ``refresh`` (parameter sends),
  ``eval_step``, ``save`` and ``_log``; :class:`psadv.attacker.Attacker` ``push`` (attack and pack
  one batch) and ``poll`` (taking in parameters). A unit called from inside another is part of it.
  The final evaluation (``Server.measure_final``) is not dilated: it comes after the time budget
  and enters no rate.
* the moments messages leave: the communicator psadv gets from :func:`psadv.mpi.world` is wrapped
  so that every ``Send``/``Isend``/``Issend`` first pays the padding owed so far. A push thus
  reaches the server when it would on the slow machine, not k times early, and the parameters a
  server sends after a step leave after the dilated step.

Measurements stay consistent: the server's busy time (timed around ``poll`` + ``use`` in
``Server.run``) holds the padding, so c_s comes out k× the undilated one. The attacker stamps
``COMPUTE_US`` just before its ``Issend``, before the padding is paid there; the send wrapper adds
the padding it pays to the stamp, so c_a comes out k× too. Undilated-equivalent numbers are the
dilated ones ÷ k (times) or × k (rates); n* = c_a / c_s needs no correction.

The padding is measured against *CPU* time (``time.thread_time``: torch runs in the calling thread
with ``--threads 1``), not wall time: a unit slowed by another process on the same core is not
padded further, so a busy machine disturbs the dilated run less than an undilated one. Padding is
owed per unit (k × CPU − wall) and paid in sleeps of at least ``MIN_SLEEP`` (shorter debts carry to
the next unit or send); a unit that took longer than k × its CPU time (the machine busy) and a
sleep's overshoot are credited to the next units, up to ``CREDIT_CAP``, so the rank runs at k × its
CPU time on average as long as contention slows it by less than k.

If psadv renames a wrapped method or the wire fields, this script stops with one line naming it,
rather than producing numbers that are quietly undilated.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from pathlib import Path

MIN_SLEEP = 200e-6  # shorter sleeps overshoot by more than they last (time.sleep's ~60 µs floor)
CREDIT_CAP = 0.5  # seconds of overrun (or sleep overshoot) at most credited to later units

# (module, class, methods) wrapped as units of work; every one must exist.
UNITS = (
    ("psadv.server", "Server", ("poll", "use", "refresh", "eval_step", "save", "_log")),
    ("psadv.attacker", "Attacker", ("push", "poll")),
)
SEND_METHODS = ("Send", "Isend", "Issend")


class DilationError(Exception):
    """The wrapper no longer fits psadv's internals."""


class Dilator:
    """Pads units of work to ``factor`` × their CPU time by sleeping; clocks injectable for tests."""

    def __init__(self, factor: float, *, cpu=time.thread_time, wall=time.perf_counter, sleep=time.sleep,
                 min_sleep: float = MIN_SLEEP):
        if not factor >= 1:
            raise DilationError(f"--factor must be a number >= 1, not {factor}")
        self.factor = float(factor)
        self.cpu, self.wall, self._sleep, self.min_sleep = cpu, wall, sleep, min_sleep
        self.depth = 0
        self.debt = 0.0  # padding owed (negative: a sleep overshot, credited to the next)
        self.mark = None  # (cpu, wall) where the running unit's unpaid part began
        self.unit_cpu = 0.0  # CPU seconds of the running unit so far
        self.stats = {"units": 0, "cpu_s": 0.0, "wall_s": 0.0, "slept_s": 0.0, "overrun_s": 0.0, "sleeps": 0,
                      "sends_paid": 0,
                      "by_unit": {}}

    # --- the bookkeeping -------------------------------------------------------------------------
    def _close_segment(self) -> None:
        """Owe the padding of the running unit's part since ``mark``."""
        c, w = self.cpu(), self.wall()
        c0, w0 = self.mark
        cpu, wall = c - c0, w - w0
        self.stats["cpu_s"] += cpu
        self.stats["wall_s"] += wall
        self.unit_cpu += cpu
        pad = self.factor * cpu - wall
        # negative: contention made the work take longer than k × its CPU time; credited (up to
        # CREDIT_CAP) to the next units, so that on average the job runs at k × its CPU time
        self.stats["overrun_s"] += max(0.0, -pad)
        self.debt = max(self.debt + pad, -CREDIT_CAP)
        self.mark = (c, w)

    def pay(self, force: bool = False) -> float:
        """Sleep off the debt (when at least ``min_sleep``, or any positive debt if ``force``);
        returns the seconds slept."""
        if self.debt <= 0 or (self.debt < self.min_sleep and not force):
            return 0.0
        start = self.wall()
        self._sleep(self.debt)
        slept = self.wall() - start
        self.debt -= slept
        self.stats["slept_s"] += slept
        self.stats["sleeps"] += 1
        return slept

    def unit(self, fn, name: str):
        """``fn`` wrapped as a unit of work: after it, pay what it owes."""
        dil = self

        def dilated(*args, **kwargs):
            if dil.depth:  # part of the unit that called it
                return fn(*args, **kwargs)
            dil.depth = 1
            dil.unit_cpu = 0.0
            dil.mark = (dil.cpu(), dil.wall())
            try:
                return fn(*args, **kwargs)
            finally:
                dil._close_segment()
                dil.depth = 0
                dil.mark = None
                dil.stats["units"] += 1
                per = dil.stats["by_unit"].setdefault(name, {"calls": 0, "cpu_s": 0.0})
                per["calls"] += 1
                per["cpu_s"] += dil.unit_cpu
                dil.pay()

        dilated.__wrapped__ = fn
        dilated.__name__ = getattr(fn, "__name__", name)
        return dilated

    def before_send(self) -> float:
        """A message is about to leave: pay everything owed so far (inside a unit, its part up to
        now), so it leaves when it would on the k× slower machine. Returns the seconds slept."""
        if self.depth:
            self._close_segment()
        slept = self.pay(force=True)
        if self.depth:  # the sleep is padding, not the unit's work
            self.mark = (self.cpu(), self.wall())
        self.stats["sends_paid"] += 1
        return slept


class DilatedComm:
    """The communicator psadv gets: every send first pays the dilation debt; a push's COMPUTE_US
    stamp (written before the send) gets the padding paid here added."""

    def __init__(self, comm, dil: Dilator, wire):
        self._comm, self._dil, self._wire = comm, dil, wire

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in SEND_METHODS:
            return attr
        dil, wire = self._dil, self._wire

        def send(buf, *args, **kwargs):
            slept = dil.before_send()
            tag = kwargs.get("tag", args[1] if len(args) > 1 else None)
            if slept > 0 and tag == wire.TAG_PUSH:
                data = buf[0] if isinstance(buf, (list, tuple)) else buf
                header = data[:wire.HEADER_BYTES].view("int64")
                header[wire.COMPUTE_US] += int(round(slept * 1e6))
            return attr(buf, *args, **kwargs)

        return send


def install(dil: Dilator):
    """Wrap psadv's units of work and its communicator; DilationError (nothing wrapped) when one is
    missing. Returns a function that undoes it."""
    import importlib

    from psadv import mpi, wire

    found = []
    for module_name, class_name, methods in UNITS:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name, None)
        if cls is None:
            raise DilationError(f"{module_name} has no class {class_name}; update scripts/dilate.py's UNITS")
        for name in methods:
            fn = cls.__dict__.get(name)
            if not callable(fn):
                raise DilationError(f"{module_name}.{class_name} has no method {name!r}; "
                                    "update scripts/dilate.py's UNITS")
            found.append((cls, name, fn))
    for field in ("TAG_PUSH", "HEADER_BYTES", "COMPUTE_US"):
        if not hasattr(wire, field):
            raise DilationError(f"psadv.wire has no {field}; update scripts/dilate.py's DilatedComm")
    real_world = mpi.world

    def world():
        w = real_world()
        if w is None:
            raise DilationError("not an MPI job of 2 or more ranks: nothing to dilate "
                                "(run as mpiexec -n N+1 python scripts/dilate.py ...)")
        w.comm = DilatedComm(w.comm, dil, wire)
        return w

    for cls, name, fn in found:
        setattr(cls, name, dil.unit(fn, f"{cls.__name__}.{name}"))
    mpi.world = world

    def undo():
        for cls, name, fn in found:
            setattr(cls, name, fn)
        mpi.world = real_world

    return undo


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="dilate.py", description=__doc__.split("\n\n")[0],
                                usage="mpiexec -n N+1 python scripts/dilate.py --factor K [--stats DIR] -- "
                                      "train [psadv train options]")
    p.add_argument("--factor", type=float, required=True, help="k >= 1: each unit of work takes k × its CPU time")
    p.add_argument("--stats", type=Path, help="directory for one dilation-rank<R>.json per rank (written at exit)")
    if "--" not in argv:
        p.error("put psadv's command after --, e.g. -- train --data-dir ...")
    cut = argv.index("--")
    args = p.parse_args(argv[:cut])
    if not args.factor >= 1:
        p.error(f"--factor must be >= 1, not {args.factor}")
    if not argv[cut + 1:]:
        p.error("no psadv command after --")
    return args, argv[cut + 1:]


def rank_of_env() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def main(argv: list[str] | None = None) -> None:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    dil = Dilator(args.factor)
    try:
        install(dil)
    except DilationError as exc:
        print(f"dilate.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.stats is not None:
        rank = rank_of_env()

        def write_stats():
            args.stats.mkdir(parents=True, exist_ok=True)
            out = {"rank": rank, "factor": dil.factor, **{k: (round(v, 6) if isinstance(v, float) else v)
                                                          for k, v in dil.stats.items()}}
            (args.stats / f"dilation-rank{rank}.json").write_text(json.dumps(out, indent=1) + "\n")

        atexit.register(write_stats)
    from psadv import mpi
    from psadv.cli import cli

    real_world = mpi.world

    def checked_world():  # a DilationError from world(): one line, and the job ends on every rank
        try:
            return real_world()
        except DilationError as exc:
            print(f"dilate.py: error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)

    mpi.world = checked_world
    cli.main(args=rest, prog_name="psadv")


if __name__ == "__main__":
    main()
