"""``metrics.jsonl``: the one declaration of its row kinds and fields, and the log that writes them.

Every row has ``kind`` and ``wall`` (Unix time of writing). :class:`MetricsLog` refuses a row that
does not match :data:`SCHEMA`, so the writers (the single-process loop in :mod:`psadv.single`,
the server in :mod:`psadv.server`) and the readers (``psadv scaling-report``) agree on one list.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import StorageError, io_error_text


def finite_json(value):
    """``value`` with every NaN or infinity replaced by None: bare ``NaN`` is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


@dataclass(frozen=True)
class RowKind:
    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    @classmethod
    def of(cls, required: str, optional: str = "") -> RowKind:
        return cls(frozenset(required.split()), frozenset(optional.split()))


COMMON = frozenset({"kind", "wall"})

# What the server adds to the end row and summary.json (its staleness policy, wire and clocks); an
# emulation of N attackers adds the policy's part and ``emulated_attackers``.
SERVER_SUMMARY = ("push attackers max_staleness staleness_histogram staleness_mean staleness_max pushes applied "
                  "rejected_stale rejected_invalid drained rejected_fraction utilization server_seconds "
                  "session_seconds produced_examples attacker_compute_seconds push_bytes_per_example "
                  "wire_bytes_per_example wire_dtype "
                  "unfinished_attackers")  # attackers that never said DONE after STOP

SCHEMA: dict[str, RowKind] = {
    # under MPI, once at the start: every rank's host, pid, device and threads
    "world": RowKind.of("size ranks"),
    # every --log-every versions; loss and adv_acc are means over the window's batches: the optimizer
    # steps on examples, or a server's applied pushes of gradients (the loss each attacker differentiated)
    "train": RowKind.of(
        "version time examples_seen progress lr eps attack attack_steps examples_per_s",
        "loss adv_acc grad_align "  # grad_align: the window's mean GradAlign penalty (grad_align_field)
        "epoch staleness rejected_in_window "  # the single process: data epoch, emulated staleness or attackers
        "push produced_per_s utilization staleness_mean staleness_max rejected_stale rejected_invalid queue"),  # server
    # the server, after each train row: what one attacker produced in the window
    "attacker": RowKind.of("version time rank examples_per_s busy"),
    # a periodic or final evaluation of the model of ``version``, reached at ``time``
    # (``attacks``: per attack of the cascade; ``masking_gap``: see psadv.attacks.suite.masking_gap)
    "eval": RowKind.of("version time eval_seconds examples_seen examples clean_acc robust_acc attack",
                       "attacks masking_gap"),
    # the server refused a malformed push
    "rejected": RowKind.of("version sender reason"),
    # the run's summary (also summary.json); final_evaluation: "measured", "skipped (signal …)" or
    # "interrupted (signal …)" (psadv.training.Trainer.end_run)
    "end": RowKind.of("stop_reason version examples_seen elapsed time_to_target target_robust_acc last_eval "
                      "best_robust_acc",
                      SERVER_SUMMARY + " emulated_attackers"  # --emulate-attackers: the policy's
                      " final_evaluation"),
}


# The fields that hold text; the others hold numbers (null for NaN, which JSON lacks) or nested JSON.
# A reader checks a row's values (``well_typed``) so that a damaged row is skipped, not plotted.
TEXT_FIELDS = frozenset("kind attack stop_reason push reason wire_dtype final_evaluation".split())
# The axes (versions, seconds, Unix time) stay far below this; a larger one is damage, and it
# overflows a plot's range.
MAX_AXIS = 1e15
# Any other number: a loss of a diverging run may be huge, but psadv computes in float32 at most.
MAX_VALUE = 3.4028234663852886e38  # float32's largest finite value


def _number(value, limit: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= limit


def well_typed(row: dict) -> bool:
    """Whether ``row``'s values have their fields' types: text only in :data:`TEXT_FIELDS`, every
    number finite, ``version`` a count, and the axes ``version``, ``time``, ``wall`` plausible."""
    for key, value in row.items():
        if key == "version":
            ok = _number(value, MAX_AXIS) and isinstance(value, int) and value >= 0
        elif key in ("time", "wall"):
            ok = _number(value, MAX_AXIS)
        elif isinstance(value, str):
            ok = key in TEXT_FIELDS
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = _number(value, MAX_VALUE)
        else:  # null, a flag, or nested JSON (per-attack rows, histograms, per-rank dicts)
            ok = True
        if not ok:
            return False
    return True


def row_problems(row: dict) -> list[str]:
    """What is wrong with a metrics row (unknown kind, missing or unknown fields); [] if nothing."""
    kind = row.get("kind")
    if kind not in SCHEMA:
        return [f"unknown row kind {kind!r}"]
    spec = SCHEMA[kind]
    missing = spec.required - row.keys()
    unknown = row.keys() - spec.required - spec.optional - COMMON
    return ([f"{kind} row lacks {', '.join(sorted(missing))}"] if missing else []) + \
        ([f"{kind} row has undeclared {', '.join(sorted(unknown))}"] if unknown else [])


class MetricsLog:
    """Append-only JSON-lines log; each row is flushed so a crash loses at most one row. Each row
    written also goes to every one of ``sinks`` (trackers: :mod:`psadv.trackers`)."""

    def __init__(self, path: Path, sinks: list | None = None):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1)
        self.sinks = list(sinks or [])
        self.failed = False  # a write failed: its StorageError was raised, and closing must not replace it

    def write(self, kind: str, **fields) -> dict:
        row = {"kind": kind, "wall": round(time.time(), 3), **fields}
        problems = row_problems(row)
        if problems:
            raise ValueError(f"metrics row does not match psadv.metrics.SCHEMA: {'; '.join(problems)}")
        clean = finite_json(row)
        try:
            self._file.write(json.dumps(clean, sort_keys=True, allow_nan=False) + "\n")
            for sink in self.sinks:
                sink.write(clean)
        except OSError as exc:
            self.failed = True
            raise StorageError(f"cannot write {self.path}: {io_error_text(exc)}") from None
        return row

    def close(self) -> None:
        """Close the log and its sinks (idempotent). After a failed write the first error stands: a
        full disk fails the flush at close again, and that bare "No space left on device" (no file
        named) used to replace the error that named the log."""
        try:
            self._file.close()
        except OSError as exc:
            if not self.failed:
                self.failed = True
                raise StorageError(f"cannot write {self.path}: {io_error_text(exc)}") from None
        finally:
            sinks, self.sinks = self.sinks, []
            for sink in sinks:
                try:
                    sink.close()
                except OSError:
                    if not self.failed:
                        raise


def grad_align_field(penalties: list[float]) -> dict:
    """A train row's ``grad_align``: the window's mean GradAlign penalty, 1 − the mean cosine of the
    input gradients (near 0: aligned; near 1: unrelated), when the window computed any."""
    return {"grad_align": round(sum(penalties) / len(penalties), 5)} if penalties else {}
