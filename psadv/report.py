"""``psadv scaling-report``: throughput, accuracy, staleness and the server bottleneck of finished runs.

Input: run directories (single-process or MPI), or a sweep that this module launches itself
(:func:`run_sweep`). Output, in a report directory: ``report.md`` and ``report.html`` with tables
and PNG plots, and ``report.json`` with every number. Each number in ``report.json`` is an object
``{"value": …, "kind": "measured" | "predicted", "from": "…"}``: *measured* numbers come from the
run directories (metrics rows and summary.json), *predicted* ones from the bottleneck model below.

**The bottleneck model.** Per model version the server is busy c_s seconds (``server_seconds.busy``
/ versions applied in the session: receiving, validating, the optimizer step); an attacker needs
c_a seconds per batch (``attacker_compute_seconds`` / batches it produced). With n attackers the
attackers offer n / c_a batches/s and the server can apply at most 1 / c_s, so

    throughput(n) ≈ min(n / c_a, 1 / c_s) batches/s,   n* = c_a / c_s,   speedup(n) = min(n, n*) / min(1, n*).

n* is the attacker count at which the server, not the attackers, limits throughput. The model is
fitted on the smallest attacker count of a group (ideally 1, where attackers do not compete for
cores) and compared with what the other runs of the group measured. It applies to the
``examples`` and ``gradients`` push modes; in ``sync`` mode every version waits for every attacker.

A run without summary.json (killed, still running) is reported as *partial* with what its metrics
hold; a sweep run whose launcher exited non-zero as *failed*; neither is dropped.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import PsadvError, UsageError
from .rundir import read_metrics, write_json

REPORT_FILES = ("report.md", "report.html", "report.json", "throughput.png", "accuracy.png", "robust_vs_time.png",
                "staleness.png", "staleness_accuracy.png")
# Config fields that do not change what a run measures: runs differing only in these are one recipe.
IDENTITY_FIELDS = {"run_dir", "data_dir", "device", "threads", "log_every", "checkpoint_every", "keep_checkpoints",
                   "steps", "epochs", "time_budget", "target_robust_acc", "eval_every", "seed"}
SWEEP_FLAGS = ("--run-dir", "--push", "--max-staleness", "--resume", "--overwrite")
PREDICT_AT = (1, 2, 4, 8, 16, 32, 64)
ROW_FIELDS = {"train": ("version", "time", "examples_seen"), "eval": ("version", "time", "clean_acc", "robust_acc"),
              "world": ("size",), "end": ("version",)}


def measured(value, source: str) -> dict:
    return {"value": value, "kind": "measured", "from": source}


def predicted(value, source: str) -> dict:
    return {"value": value, "kind": "predicted", "from": source}


def _round(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


# --- reading runs --------------------------------------------------------------------------------
@dataclass
class Run:
    """What one run directory holds, and what is missing from it."""

    name: str
    path: Path
    status: str = "complete"  # complete | stopped (by a signal, resumable) | partial | failed
    problems: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict | None = None
    rows: list[dict] = field(default_factory=list)
    final_eval: dict | None = None
    launch: dict | None = None

    @property
    def is_mpi(self) -> bool:
        return self.attackers > 0

    @property
    def attackers(self) -> int:
        if self.summary and "attackers" in self.summary:
            return int(self.summary["attackers"])
        worlds = self.of_kind("world")
        if worlds:
            return int(worlds[-1]["size"]) - 1
        if self.launch is not None:
            return int(self.launch["attackers"])
        return 0

    @property
    def push(self) -> str | None:
        if not self.is_mpi:
            return None
        return self.config.get("push") or (self.launch or {}).get("push")

    @property
    def batch_size(self) -> int | None:
        return self.config.get("batch_size")

    def of_kind(self, kind: str) -> list[dict]:
        """Rows of one kind that carry the fields the report reads (others are counted as problems)."""
        need = ROW_FIELDS.get(kind, ())
        return [r for r in self.rows if r.get("kind") == kind and all(r.get(f) is not None for f in need)]


def _read_json(path: Path, problems: list[str]):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name} is unreadable ({type(exc).__name__})")
        return None


def load_run(path: Path, name: str | None = None, launch: dict | None = None) -> Run:
    path = Path(path)
    run = Run(name or path.name, path, launch=launch)
    config = _read_json(path / "config.json", run.problems)
    if config is None:
        run.problems.append("no config.json")
    else:
        run.config = config.get("config", {})
    if (path / "metrics.jsonl").exists():
        run.rows = read_metrics(path / "metrics.jsonl")
    else:
        run.problems.append("no metrics.jsonl")
    run.summary = _read_json(path / "summary.json", run.problems)
    run.final_eval = _read_json(path / "final_eval.json", run.problems)
    if run.summary is None:
        run.status = "partial"
        run.problems.append("no summary.json: the run did not finish (killed, failed or still running)")
    elif str(run.summary.get("stop_reason", "")).startswith("signal"):
        run.status = "stopped"
        run.problems.append(f"stopped by a {run.summary['stop_reason']} before its budget; psadv train --resume "
                            "continues it")
    unusable = sum(1 for r in run.rows if r.get("kind") in ROW_FIELDS) - sum(len(run.of_kind(k)) for k in ROW_FIELDS)
    if unusable:
        run.problems.append(f"{unusable} metrics rows lack fields the report needs and were left out")
    if launch is not None and launch.get("returncode") != 0:
        run.status = "failed"
        run.problems.insert(0, f"launcher exited with code {launch.get('returncode')}")
    if not run.of_kind("eval"):
        run.problems.append("no evaluation rows")
    return run


def natural_key(path: Path) -> list:
    """pgd-2 before pgd-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def is_run_dir(path: Path) -> bool:
    """Anything psadv train writes marks a run directory (checkpoints/ comes first)."""
    return any((path / name).exists() for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints"))


def find_runs(paths: list[str]) -> list[Run]:
    """Each path is a run directory or a directory of them (one level); anything else is an error."""
    runs: list[Run] = []
    for text in paths:
        path = Path(text)
        if not path.is_dir():
            raise UsageError(f"{path} is not a directory")
        if is_run_dir(path):
            runs.append(load_run(path))
            continue
        inner = sorted((p for p in path.iterdir() if p.is_dir() and is_run_dir(p)), key=natural_key)
        if not inner:
            raise UsageError(f"{path} is not a run directory (no config.json, metrics.jsonl or checkpoints/) "
                             "and holds none")
        runs.extend(load_run(p, f"{path.name}/{p.name}") for p in inner)
    names = [r.name for r in runs]
    for r in runs:  # two inputs with the same name: use the full path to tell them apart
        if names.count(r.name) > 1:
            r.name = str(r.path)
    return runs


# --- numbers of one run ----------------------------------------------------------------------------
def _session_start_version(run: Run) -> int:
    """The version the last session started from: that of the ``end`` row before the last ``world`` row."""
    start = last_end = 0
    for row in run.rows:
        if row.get("kind") == "end" and row.get("version") is not None:
            last_end = int(row["version"])
        elif row.get("kind") == "world":
            start = last_end
    return start


def throughput(run: Run) -> dict:
    """Steady examples/s and versions/s: medians over consecutive train rows (start-up, evaluation
    and checkpoint pauses fall in few windows and do not move a median); else the whole run."""
    train = sorted(run.of_kind("train"), key=lambda r: r["version"])
    rates_ex, rates_v = [], []
    for a, b in zip(train, train[1:]):
        dt = b["time"] - a["time"]
        if dt > 0 and b["version"] > a["version"]:
            rates_ex.append((b["examples_seen"] - a["examples_seen"]) / dt)
            rates_v.append((b["version"] - a["version"]) / dt)
    if rates_ex:
        source = f"median over {len(rates_ex)} windows between train rows of metrics.jsonl"
        return {"examples_per_s": measured(round(statistics.median(rates_ex), 1), source),
                "versions_per_s": measured(round(statistics.median(rates_v), 3), source)}
    s = run.summary
    if s and s.get("elapsed"):
        source = "summary.json: examples_seen / elapsed (whole run, start-up and evaluation included)"
        return {"examples_per_s": measured(round(s["examples_seen"] / s["elapsed"], 1), source),
                "versions_per_s": measured(round(s["version"] / s["elapsed"], 3), source)}
    return {}


def evaluation_pauses(run: Run) -> tuple[list[dict], float | None]:
    """Eval rows, each with ``train_time`` (its time less the evaluation pauses before it), and the
    run's total evaluation pause (None when not measurable).

    Eval rows with ``eval_seconds`` carry the time the evaluated version was reached and how long
    the evaluation took: the single-process trainer stops training for it (a pause), the MPI server
    evaluates between training steps (no pause). Older rows carry the time the evaluation ended, and
    the train row of that version, written just before evaluating, gives its start; where an
    evaluation has no train row at its version its pause is unknown, and so is every train_time
    from there on.
    """
    evals = run.of_kind("eval")
    concurrent = run.is_mpi and bool(evals) and all("eval_seconds" in r for r in evals)
    curve, train_at, paused, known = [], {}, 0.0, True
    usable = {id(r) for r in evals} | {id(r) for r in run.of_kind("train")}
    for r in (r for r in run.rows if id(r) in usable):
        if r["kind"] == "train":
            train_at[r["version"]] = r["time"]
            continue
        if concurrent:
            start, pause = r["time"], 0.0
        elif "eval_seconds" in r:
            start, pause = r["time"], r["eval_seconds"]
        else:
            start = train_at.get(r["version"])
            known = known and start is not None and start <= r["time"]
            pause = r["time"] - start if known else 0.0
        curve.append({"time": r["time"], "train_time": round(start - paused, 3) if known else None,
                      "version": r["version"], "clean_acc": r["clean_acc"], "robust_acc": r["robust_acc"],
                      "examples": r.get("examples"), "attack": r.get("attack")})
        paused += pause
    return curve, (round(paused, 3) if known else None)


def accuracy_curve(run: Run) -> list[dict]:
    return evaluation_pauses(run)[0]


def time_to_target(run: Run, target: float) -> dict | None:
    """First evaluation at or above ``target`` robust accuracy (on the run's evaluation slice)."""
    curve = accuracy_curve(run)
    if not curve:
        return None
    slice_ = f"eval rows of metrics.jsonl ({curve[-1]['examples']} test examples, {curve[-1]['attack']})"
    for point in curve:
        if point["robust_acc"] >= target:
            train = point["train_time"]
            return {"seconds": measured(round(point["time"], 2), slice_ + "; wall-clock, evaluation pauses included"),
                    "training_seconds": measured(None if train is None else round(train, 2),
                                                 slice_ + ("; evaluation pauses excluded" if train is not None else
                                                           "; evaluation pauses not measurable (no train row at an "
                                                           "evaluated version)")),
                    "version": measured(point["version"], slice_), "reached": True}
    return {"seconds": measured(None, slice_ + ": target not reached"),
            "training_seconds": measured(None, slice_ + ": target not reached"),
            "version": measured(None, slice_), "reached": False}


def costs(run: Run) -> dict:
    """c_s (server busy seconds per version) and c_a (attacker seconds per batch) of an MPI run."""
    s = run.summary
    if not run.is_mpi or not s or "server_seconds" not in s:
        return {}
    out = {}
    versions = s["version"] - _session_start_version(run)
    busy = s["server_seconds"].get("busy")
    if versions > 0 and busy is not None:
        out["c_s"] = measured(_round(busy / versions, 6),
                              f"summary.json server_seconds.busy {busy}s / {versions} versions of the last session")
    produced = sum(s.get("produced_examples", {}).values())
    compute = sum(s.get("attacker_compute_seconds", {}).values())
    if produced and run.batch_size:
        batches = produced / run.batch_size
        out["c_a"] = measured(_round(compute / batches, 6),
                              f"summary.json attacker_compute_seconds {compute:.3f}s / {batches:.0f} batches "
                              f"(all attackers)")
    busy = [r["busy"] for r in run.of_kind("attacker") if r.get("busy") is not None]
    if busy:
        out["attacker_busy"] = measured(round(statistics.median(busy), 3),
                                        f"median over {len(busy)} attacker rows of metrics.jsonl (share of time computing)")
    if "c_s" in out and "c_a" in out and out["c_s"]["value"]:
        out["n_star"] = predicted(_round(out["c_a"]["value"] / out["c_s"]["value"], 2),
                                  f"c_a / c_s of {run.name}")
    return out


def staleness_of(run: Run) -> dict:
    """Staleness numbers: emulated S of a single-process run, or what the server measured."""
    if not run.is_mpi:
        S = int(run.config.get("emulate_staleness", 0) or 0)
        return {"kind": "emulated", "S": measured(S, "config.json emulate_staleness")}
    s = run.summary or {}
    out = {"kind": "real", "max_staleness": measured(run.config.get("max_staleness"), "config.json"),
           "refresh_every": measured(run.config.get("refresh_every"), "config.json")}
    for key in ("staleness_histogram", "staleness_mean", "staleness_max", "rejected_fraction", "utilization",
                "rejected_stale", "rejected_invalid", "applied", "pushes"):
        if key in s:
            out[key] = measured(s[key], f"summary.json {key}")
    if "staleness_mean" not in out:  # a partial run: the last train row's window
        rows = [r for r in run.of_kind("train") if r.get("staleness_mean") is not None]
        if rows:
            out["staleness_mean"] = measured(rows[-1]["staleness_mean"], "last train row (partial run)")
            out["utilization"] = measured(rows[-1].get("utilization"), "last train row (partial run)")
    return out


def describe_run(run: Run, target: float) -> dict:
    last = (run.summary or {}).get("last_eval")
    evals = run.of_kind("eval")
    if last is None and evals:
        last = evals[-1]
    info = {"name": run.name, "path": str(run.path), "status": run.status, "problems": run.problems,
            "mode": "mpi" if run.is_mpi else "single", "attackers": run.attackers, "push": run.push,
            "config": run.config, "throughput": throughput(run), "costs": costs(run),
            "staleness": staleness_of(run), "accuracy_curve": accuracy_curve(run),
            "time_to_target": time_to_target(run, target)}
    if last is not None:
        where = f"last evaluation ({last.get('examples')} test examples, {last.get('attack')})"
        info["final"] = {"clean_acc": measured(last["clean_acc"], where), "robust_acc": measured(last["robust_acc"], where)}
    if run.final_eval:
        fe = run.final_eval
        where = f"final_eval.json ({fe.get('examples')} test examples, {fe.get('attack')})"
        info["final_eval"] = {"clean_acc": measured(fe.get("clean_acc"), where),
                              "robust_acc": measured(fe.get("robust_acc"), where)}
    if run.summary:
        info["elapsed"] = measured(run.summary.get("elapsed"), "summary.json elapsed")
        paused = evaluation_pauses(run)[1]
        if paused is not None and run.summary.get("elapsed") is not None:
            info["training_seconds"] = measured(round(run.summary["elapsed"] - paused, 2),
                                                f"elapsed less {paused:.1f}s of evaluation pauses")
        info["version"] = measured(run.summary.get("version"), "summary.json version")
        info["stop_reason"] = run.summary.get("stop_reason")
    elif run.rows:
        timed = [r for r in run.rows if "time" in r and "version" in r]
        if timed:
            newest = max(timed, key=lambda r: (r["version"], r["time"]))
            info["elapsed"] = measured(newest["time"], "newest metrics row (partial run)")
            info["version"] = measured(newest["version"], "newest metrics row (partial run)")
    if run.launch:
        info["launch"] = run.launch
    hosts = {}
    for world in run.of_kind("world")[-1:]:
        for rank in world.get("ranks", []):
            hosts[rank.get("host")] = hosts.get(rank.get("host"), 0) + 1
    if hosts:
        info["ranks_per_host"] = hosts
    return info


# --- groups and the bottleneck model ---------------------------------------------------------------
# Config fields that only the MPI roles read: a single-process run of the same recipe lacks them.
MPI_FIELDS = {"push", "max_staleness", "refresh_every", "lr_damping", "wire_dtype", "emulate_staleness"}


def recipe(run: Run, drop: set[str] = frozenset()) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in run.config.items() if k not in IDENTITY_FIELDS | drop))


def scaling_groups(runs: list[Run]) -> list[dict]:
    """MPI runs of one recipe at different attacker counts: measured speedup and the model's.

    A group is named by the config values that differ between groups. Runs without a config
    (a launch that failed before writing one) cannot be placed and are listed by the caller.
    """
    mpi = [r for r in runs if r.is_mpi and r.config]
    keys = sorted({recipe(r) for r in mpi})
    dicts = [dict(k) for k in keys]
    differing = sorted({f for d in dicts for f in d if len({x.get(f) for x in dicts}) > 1} - {"push"})
    groups = []
    for key, values in zip(keys, dicts):
        members = sorted((r for r in mpi if recipe(r) == key), key=lambda r: (r.attackers, r.name))
        push = json.loads(values["push"])
        label = ", ".join([f"push={push}"] + [f"{f}={json.loads(values[f]) if f in values else '–'}" for f in differing])
        usable = [r for r in members if throughput(r)]
        base = usable[0] if usable else None
        group = {"label": label, "push": push, "runs": [r.name for r in members],
                 "baseline": base.name if base else None, "points": [], "model": None}
        singles = [r for r in runs if not r.is_mpi and r.config and throughput(r)
                   and recipe(r, MPI_FIELDS) == recipe(members[0], MPI_FIELDS)]
        if singles:
            group["single_process"] = {"run": singles[0].name, **throughput(singles[0])}
        model = None
        if base is not None and push in ("examples", "gradients"):
            c = costs(base)
            if c.get("n_star") and c["c_a"]["value"]:
                model = {"fitted_on": base.name, "attackers": base.attackers, "c_s": c["c_s"], "c_a": c["c_a"],
                         "n_star": c["n_star"], "batch_size": base.batch_size}
                # what the model leaves out (messages, waiting, ranks sharing cores), measured at the baseline
                factor = throughput(base)["examples_per_s"]["value"] / model_rate(model, base.attackers)
                model["overhead_factor"] = measured(round(factor, 3), f"measured ÷ predicted examples/s of {base.name}")
        for r in members:
            group["points"].append(scaling_point(r, base, model))
        if model:
            largest = max(r.attackers for r in members)
            model["predictions"] = [
                {"attackers": n, "speedup": predicted(round(model_speedup(model, n), 3), "min(n, n*) / min(1, n*)"),
                 "examples_per_s": predicted(round(model_rate(model, n), 1), "batch × min(n / c_a, 1 / c_s)"),
                 "examples_per_s_with_overhead": predicted(round(model_rate(model, n) * model["overhead_factor"]["value"], 1),
                                                           "batch × min(n / c_a, 1 / c_s) × overhead factor")}
                for n in sorted(set(PREDICT_AT) | {largest})]
        elif push == "sync":
            group["model_note"] = "sync mode: every version waits for all attackers; the bottleneck model does not apply"
        elif base is not None:
            group["model_note"] = f"{base.name} lacks server or attacker timings (a partial run?), so no prediction"
        group["model"] = model
        groups.append(group)
    return groups


def scaling_point(run: Run, base: Run | None, model: dict | None) -> dict:
    tp = throughput(run)
    point = {"run": run.name, "attackers": run.attackers, "status": run.status, **tp}
    if tp and base is not None:
        base_rate = throughput(base)["examples_per_s"]["value"]
        # relative to one attacker's share of the baseline (the baseline itself when it has one attacker)
        speedup = tp["examples_per_s"]["value"] / base_rate * base.attackers
        point["speedup"] = measured(round(speedup, 3), f"examples/s ÷ (examples/s of {base.name} ÷ {base.attackers})")
        point["efficiency"] = measured(round(speedup / run.attackers, 3), "speedup ÷ attackers")
    if model:
        point["predicted_speedup"] = predicted(round(model_speedup(model, run.attackers), 3),
                                               f"min(n, n*) / min(1, n*) with n* from {model['fitted_on']}")
        point["predicted_examples_per_s"] = predicted(round(model_rate(model, run.attackers), 1),
                                                      f"batch × min(n / c_a, 1 / c_s) of {model['fitted_on']}")
    c = costs(run)
    if c:
        point["costs"] = c
    return point


def model_speedup(model: dict, n: int) -> float:
    """Predicted speedup on the measured speedup's scale: n_b × throughput(n) ÷ throughput(n_b) for the
    baseline's n_b attackers; with n_b = 1 that is min(n, n*) / min(1, n*)."""
    n_b = model["attackers"]
    return n_b * model_rate(model, n) / model_rate(model, n_b)


def model_rate(model: dict, n: int) -> float:
    return model["batch_size"] * min(n / model["c_a"]["value"], 1 / model["c_s"]["value"])


# --- the report ------------------------------------------------------------------------------------
def build_report(runs: list[Run], *, target: float, baseline: str | None = None,
                 title: str = "psadv scaling report") -> dict:
    if not runs:
        raise UsageError("no runs to report")
    if baseline is not None and baseline not in [r.name for r in runs]:
        raise UsageError(f"--baseline {baseline!r} is not one of the runs: {', '.join(r.name for r in runs)}")
    described = [describe_run(r, target) for r in runs]
    report = {"title": title, "psadv_version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "target_robust_acc": target, "machine": {"cpu_count": os.cpu_count()},
              "runs": described, "scaling": scaling_groups(runs), "baseline": baseline,
              "not_in_scaling": [r.name for r in runs if r.is_mpi and not r.config]}
    if baseline is not None:
        report["time_to_target_ratio"] = time_ratios(described, baseline)
    return report


def time_ratios(described: list[dict], baseline: str) -> list[dict]:
    """Baseline's time to target ÷ each run's: training seconds (evaluation pauses excluded) where
    both runs have them, else wall-clock seconds."""
    def times(d):
        ttt = d["time_to_target"] or {}
        return ttt.get("training_seconds", {}).get("value"), ttt.get("seconds", {}).get("value")

    base_train, base_wall = times(next(d for d in described if d["name"] == baseline))
    ratios = []
    for d in described:
        train, wall = times(d)
        if base_train and train:
            entry = measured(round(base_train / train, 2), f"training seconds to target of {baseline} ÷ of {d['name']}")
        elif base_wall and wall:
            entry = measured(round(base_wall / wall, 2), f"wall-clock seconds to target of {baseline} ÷ of "
                                                         f"{d['name']} (evaluations included)")
        else:
            entry = measured(None, "target not reached by this run or the baseline")
        ratios.append({"run": d["name"], "ratio": entry})
    return ratios


def make_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    runs = report["runs"]
    # a scaling plot needs two attacker counts; single-count groups stay in the tables
    groups = [g for g in report["scaling"] if len({p["attackers"] for p in g["points"] if "speedup" in p}) > 1]
    if groups:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
        largest = max(p["attackers"] for g in groups for p in g["points"])
        n_stars = [g["model"]["n_star"]["value"] for g in groups if g.get("model")]
        # log-log axes: ideal scaling is a straight line; x reaches far enough to show where the
        # predicted curve bends (at most 64 attackers)
        xmax = min(64, max([largest, 2] + [math.ceil(1.5 * n) for n in n_stars]))
        grid = sorted({2 ** (i / 16) for i in range(16 * int(math.log2(xmax)) + 1)} | {float(xmax)}
                      | {n for n in n_stars if 1 < n < xmax})
        singles = set()
        for i, g in enumerate(groups):
            color = f"C{i}"
            pts = [p for p in g["points"] if "speedup" in p]
            ns = [p["attackers"] for p in pts]
            base = next(p for p in g["points"] if p["run"] == g["baseline"])
            per_attacker = base["examples_per_s"]["value"] / base["attackers"]
            ax1.plot(ns, [p["examples_per_s"]["value"] for p in pts], "o-", color=color, label=f"{g['label']}: measured")
            ax1.plot(grid, [per_attacker * n for n in grid], ":", color=color, alpha=0.6, label="ideal linear")
            ax2.plot(ns, [p["speedup"]["value"] for p in pts], "o-", color=color, label=f"{g['label']}: measured")
            model = g.get("model")
            if model:
                label = f"predicted, n* = {model['n_star']['value']:.1f}"
                ax1.plot(grid, [model_rate(model, n) for n in grid], "--", color=color, alpha=0.8, label=label)
                ax2.plot(grid, [model_speedup(model, n) for n in grid], "--", color=color, alpha=0.8, label=label)
            single = g.get("single_process")
            if single and single["run"] not in singles:
                singles.add(single["run"])
                ax1.axhline(single["examples_per_s"]["value"], color="k", lw=0.8, ls="-.",
                            label=f"one process ({short(single['run'])})")
        ax2.plot([1, xmax], [1, xmax], "k:", alpha=0.6, label="ideal linear")
        ax1.set(xlabel="attackers", ylabel="examples/s into the optimizer", title="Throughput vs attackers")
        ax2.set(xlabel="attackers", ylabel="speedup vs the baseline run", title="Speedup vs attackers")
        ticks = sorted({2 ** i for i in range(int(math.log2(xmax)) + 1)} | {p["attackers"] for g in groups
                                                                             for p in g["points"]})
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlim(0.85, xmax * 1.15)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        save(fig, "throughput.png")

    curves = [d for d in runs if d["accuracy_curve"]]
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, d in enumerate(curves):
            c = d["accuracy_curve"]
            t = [p["time"] for p in c]
            ax.plot(t, [p["robust_acc"] for p in c], "o-", ms=3, color=f"C{i % 10}", label=f"{d['name']} robust")
            ax.plot(t, [p["clean_acc"] for p in c], ":", color=f"C{i % 10}", alpha=0.7)
        ax.axhline(report["target_robust_acc"], color="k", lw=0.8, ls="--", label=f"target {report['target_robust_acc']:.0%}")
        ax.set(xlabel="wall-clock seconds (training, including periodic evaluation)", ylabel="accuracy on the eval slice",
               title="Robust (solid) and clean (dotted) accuracy vs time", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1, loc="best")
        save(fig, "accuracy.png")

    points = [(d, robust_and_time(d)) for d in runs]
    points = [(d, rt) for d, rt in points if rt is not None]
    if len(points) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        # labels alternate above and below in order of time, so neighbouring points stay readable
        order = {id(d): k for k, (d, _) in enumerate(sorted(points, key=lambda p: p[1][1]))}
        for i, (d, (robust, seconds, _)) in enumerate(points):
            marker = "s" if d["mode"] == "mpi" else "o"
            ax.plot([seconds], [robust], marker, color=f"C{i % 10}", ms=7)
            ax.annotate(short(d["name"]), (seconds, robust), fontsize=7, textcoords="offset points",
                        xytext=(4, 5) if order[id(d)] % 2 == 0 else (4, -11))
        ax.axhline(report["target_robust_acc"], color="k", lw=0.8, ls="--")
        where = {rt[2] for _, rt in points}
        ax.set(xlabel="training seconds (evaluation pauses excluded where measurable)",
               ylabel="robust accuracy (" + ("final_eval.json" if where == {"final_eval"} else
                                              "final_eval.json, else last eval") + ")",
               title="Robust accuracy vs training time (circles: one process, squares: MPI)", ylim=(0, 1.02))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        save(fig, "robust_vs_time.png")

    hists = [d for d in runs if d["staleness"].get("staleness_histogram")]
    if hists:
        cols = min(3, len(hists))
        rows_ = math.ceil(len(hists) / cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.0 * rows_), squeeze=False)
        for ax, d in zip(axes.flat, hists):
            hist = d["staleness"]["staleness_histogram"]["value"]
            numeric = sorted((int(k), v) for k, v in hist.items() if not k.startswith(">"))
            ax.bar([k for k, _ in numeric], [v for _, v in numeric], width=0.9, color="C0", label="applied")
            over = [(k, v) for k, v in hist.items() if k.startswith(">")]
            for k, v in over:
                x = int(k[1:]) + 1
                ax.bar([x], [v], width=0.9, color="C3", label=f"rejected (τ{k})")
            st = d["staleness"]
            ax.set_title(f"{d['name']}\nmean τ {_v(st.get('staleness_mean', {}), '{:.2f}')}, "
                         f"rejected {st.get('rejected_fraction', {}).get('value', 0):.1%}", fontsize=8)
            ax.set_xlabel("staleness τ (versions)", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("pushes", fontsize=8)
            if over:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(hists):]:
            ax.axis("off")
        save(fig, "staleness.png")

    series = staleness_series(runs)
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for (label, pts), marker in zip(series.items(), "os^"):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker + "-", label=label)
            for x, y, name in pts:
                ax.annotate(short(name), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="staleness (versions)", ylabel="robust accuracy (final_eval.json, else last eval)",
               title="Robust accuracy after the budget vs staleness", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "staleness_accuracy.png")
    return made


def short(name: str) -> str:
    """A run's name without its parent directory, for labels inside plots."""
    return name.rsplit("/", 1)[-1]


def robust_and_time(d: dict) -> tuple | None:
    """(robust accuracy, training seconds, source) of a described run: the strong final evaluation
    when there is one, and training seconds without evaluation pauses when measurable."""
    source = "final_eval" if "final_eval" in d else "final"
    robust = d.get(source, {}).get("robust_acc", {}).get("value")
    seconds = d.get("training_seconds", d.get("elapsed", {})).get("value")
    return None if robust is None or seconds is None else (robust, seconds, source)


def staleness_series(runs: list[dict]) -> dict:
    """Robust accuracy vs staleness, when runs differ in it: emulated S (one process), and measured
    mean τ of MPI runs that differ in --max-staleness or --refresh-every."""
    def robust(d):  # the strong final evaluation when there is one
        return d.get("final_eval", d.get("final", {})).get("robust_acc", {}).get("value")

    emulated = [(d["staleness"]["S"]["value"], robust(d), d["name"])
                for d in runs if d["mode"] == "single" and robust(d) is not None]
    real = [(d["staleness"]["staleness_mean"]["value"], robust(d), d["name"])
            for d in runs if d["mode"] == "mpi" and robust(d) is not None
            and (d["staleness"].get("staleness_mean") or {}).get("value") is not None]
    knobs = {(d["config"].get("max_staleness"), d["config"].get("refresh_every")) for d in runs if d["mode"] == "mpi"}
    series = {}
    if len({p[0] for p in emulated}) > 1:
        series["one process, emulated staleness S"] = emulated
    if len(real) > 1 and len(knobs) > 1:
        series["MPI, measured mean staleness τ"] = real
    return series


# --- rendering ------------------------------------------------------------------------------------
def _v(entry, fmt: str = "{}", missing: str = "–") -> str:
    value = entry.get("value") if isinstance(entry, dict) else entry
    if value is None:
        return missing
    return fmt.format(value)


def _blocks(report: dict, plots: list[str]) -> list[tuple]:
    """The report as blocks, rendered to Markdown and HTML: ("h", level, text), ("p", text),
    ("table", header, rows), ("img", file, alt), ("pre", text)."""
    runs, target = report["runs"], report["target_robust_acc"]
    b: list[tuple] = [("h", 1, report["title"])]
    b.append(("p", f"{len(runs)} runs; psadv {report['psadv_version']}; made {report['created']} on a machine with "
                   f"{report['machine']['cpu_count']} CPU cores. Every number comes from the run directories "
                   "(*measured*) unless marked *predicted* (the bottleneck model below); report.json holds each "
                   "number with its kind and source."))
    bad = [d for d in runs if d["status"] != "complete" or d["problems"]]
    if bad:
        b.append(("h", 2, "Runs with missing or partial metrics"))
        b.append(("table", ["run", "status", "problems"], [[d["name"], d["status"], "; ".join(d["problems"])] for d in bad]))

    b.append(("h", 2, "Runs"))
    header = ["run", "mode", "attackers", "status", "versions", "seconds", "training seconds", "examples/s",
              "versions/s", "clean", "robust", "robust measured with", f"time to {target:.0%}"]
    rows = []
    for d in runs:
        tp, fin, ttt = d["throughput"], d.get("final", {}), d["time_to_target"]
        where = fin.get("robust_acc", {}).get("from", "").removeprefix("last evaluation (").removesuffix(")")
        rows.append([d["name"], d["mode"] + (f" ({d['push']})" if d["push"] else ""), str(d["attackers"]), d["status"],
                     _v(d.get("version", {})), _v(d.get("elapsed", {}), "{:.1f}"),
                     _v(d.get("training_seconds", {}), "{:.1f}"),
                     _v(tp.get("examples_per_s", {}), "{:,.0f}"), _v(tp.get("versions_per_s", {}), "{:.2f}"),
                     _v(fin.get("clean_acc", {}), "{:.1%}"), _v(fin.get("robust_acc", {}), "{:.1%}"), where,
                     _ttt(ttt)])
    b.append(("table", header, rows))
    b.append(("p", "examples/s and versions/s are the median over the windows between consecutive train rows of "
                   "metrics.jsonl (start-up and evaluation pauses excluded); seconds are wall-clock training time "
                   "including periodic evaluation, training seconds the same without the evaluation pauses (the "
                   "single-process trainer stops for each evaluation; the MPI server evaluates between training "
                   "steps and does not pause). Clean and robust accuracy are the last evaluation, on the "
                   "evaluation slice named in the column."))
    finals = [d for d in runs if "final_eval" in d]
    if finals:
        b.append(("p", "Final models under the strong attack (`psadv eval RUN --json`, saved as final_eval.json in "
                       "the run directory):"))
        b.append(("table", ["run", "clean", "robust", "measured with"],
                  [[d["name"], _v(d["final_eval"]["clean_acc"], "{:.2%}"), _v(d["final_eval"]["robust_acc"], "{:.2%}"),
                    d["final_eval"]["robust_acc"]["from"]] for d in finals]))

    b.append(("h", 2, "Throughput, speedup and the server bottleneck"))
    if not report["scaling"]:
        b.append(("p", "No MPI runs: nothing to scale."))
    if report["not_in_scaling"]:
        b.append(("p", "Not placed in a group (no config.json): " + ", ".join(report["not_in_scaling"]) + "."))
    for g in report["scaling"]:
        b.append(("h", 3, g["label"]))
        base_n = next((p["attackers"] for p in g["points"] if p["run"] == g["baseline"]), None)
        caveat = "" if base_n == 1 else (f" There is no 1-attacker run: speedups assume the baseline's {base_n} "
                                         "attackers scaled linearly.")
        b.append(("p", f"Baseline: {g['baseline']}. Speedup = examples/s ÷ the baseline's examples/s per attacker; "
                       f"efficiency = speedup ÷ attackers.{caveat}"))
        rows = []
        single = g.get("single_process")
        if single:
            rows.append([single["run"], "0 (one process)", "complete", _v(single["examples_per_s"], "{:,.0f}"),
                         _v(single["versions_per_s"], "{:.2f}"), "", "", "", "", "", "", ""])
        for p in g["points"]:
            c = p.get("costs", {})
            rows.append([p["run"], str(p["attackers"]), p["status"], _v(p.get("examples_per_s", {}), "{:,.0f}"),
                         _v(p.get("versions_per_s", {}), "{:.2f}"), _v(p.get("speedup", {}), "{:.2f}"),
                         _v(p.get("efficiency", {}), "{:.0%}"), _v(p.get("predicted_examples_per_s", {}), "{:,.0f}"),
                         _v(p.get("predicted_speedup", {}), "{:.2f}"), _v(c.get("c_s", {}), "{:.4f}"),
                         _v(c.get("c_a", {}), "{:.4f}"), _v(c.get("attacker_busy", {}), "{:.0%}")])
        b.append(("table", ["run", "attackers", "status", "examples/s", "versions/s", "speedup", "efficiency",
                            "predicted examples/s", "predicted speedup", "c_s (s/version)", "c_a (s/batch)",
                            "attacker busy"], rows))
        model = g.get("model")
        if model:
            b.append(("p", f"Measured on {model['fitted_on']} ({model['attackers']} attacker(s)): server c_s = "
                           f"{model['c_s']['value']:.4f} s per version, attacker c_a = {model['c_a']['value']:.4f} s "
                           f"per batch of {model['batch_size']}. Predicted: the server saturates at "
                           f"n* = c_a / c_s = **{model['n_star']['value']:.1f} attackers**."))
            b.append(("p", f"At the baseline the model predicts {model_rate(model, model['attackers']):,.0f} examples/s "
                           f"and {model['overhead_factor']['value']:.0%} of that was measured (the overhead factor: "
                           "messages, waiting and ranks sharing cores, which the model leaves out)."))
            b.append(("table", ["attackers", "predicted speedup", "predicted examples/s", "× overhead factor"],
                      [[str(p["attackers"]), f"{p['speedup']['value']:.2f}", f"{p['examples_per_s']['value']:,.0f}",
                        f"{p['examples_per_s_with_overhead']['value']:,.0f}"] for p in model["predictions"]]))
        elif g.get("model_note"):
            b.append(("p", g["model_note"] + "."))
    b.append(("p", "**Model.** Per version the server is busy c_s seconds (server_seconds.busy ÷ versions applied; "
                   "receiving, validating and the optimizer step); an attacker needs c_a seconds per batch "
                   "(attacker_compute_seconds ÷ batches produced). With n attackers the attackers offer n/c_a "
                   "batches/s and the server applies at most 1/c_s, so throughput ≈ min(n/c_a, 1/c_s) and "
                   "speedup(n) = min(n, n*) / min(1, n*) with n* = c_a/c_s, the attacker count from which the "
                   "server limits throughput (n* < 1: one attacker already saturates the server). c_s and c_a are measured on the group's baseline run; everything in the "
                   "*predicted* columns follows from those two numbers. Where attackers and the server share fewer "
                   "cores than ranks, measured c_a grows with n (the c_a column) and measured speedup falls below "
                   "the prediction: the prediction assumes a core or GPU per attacker (this report was made on a "
                   f"machine with {report['machine']['cpu_count']} cores; report.json lists each run's ranks per "
                   "host). Attacker busy is the median share of time an attacker spent computing; well below 100% "
                   "means attackers wait for the server."))
    if "throughput.png" in plots:
        b.append(("img", "throughput.png", "throughput and speedup vs attackers"))

    b.append(("h", 2, "Accuracy vs wall-clock time"))
    if "accuracy.png" in plots:
        b.append(("img", "accuracy.png", "robust and clean accuracy vs time"))
    if "robust_vs_time.png" in plots:
        b.append(("img", "robust_vs_time.png", "final robust accuracy vs training time"))
    rows = []
    for d in runs:
        ttt = d["time_to_target"] or {}
        rows.append([d["name"], _ttt(d["time_to_target"]), _v(ttt.get("training_seconds", {}), "{:.1f}s"),
                     _v(ttt.get("version", {})), ttt.get("seconds", {}).get("from", "no evaluation rows")])
    b.append(("table", ["run", f"seconds to ≥{target:.0%} robust", "training seconds (evaluations excluded)",
                        "version", "measured on"], rows))
    if report.get("baseline"):
        b.append(("p", f"Time to target relative to the baseline {report['baseline']} "
                       "(baseline seconds ÷ run seconds; >1 is faster):"))
        b.append(("table", ["run", "speedup in time to target"],
                  [[r["run"], _v(r["ratio"], "{:.2f}×")] for r in report["time_to_target_ratio"]]))

    b.append(("h", 2, "Staleness"))
    rows = []
    for d in runs:
        st = d["staleness"]
        if st["kind"] == "emulated":
            rows.append([d["name"], "emulated", _v(st["S"]), "–", "–", "–", "–"])
        else:
            rows.append([d["name"], "real", _v(st.get("max_staleness", {})), _v(st.get("staleness_mean", {}), "{:.2f}"),
                         _v(st.get("staleness_max", {})), _v(st.get("rejected_fraction", {}), "{:.1%}"),
                         _v(st.get("utilization", {}), "{:.1%}")])
    b.append(("table", ["run", "staleness", "S (emulated) or --max-staleness", "mean τ", "max τ", "rejected",
                        "server utilization"], rows))
    b.append(("p", "Server utilization = busy ÷ (busy + waiting) in the server loop. Rejected = pushes staler than "
                   "--max-staleness (or invalid) ÷ pushes received."))
    if "staleness.png" in plots:
        b.append(("img", "staleness.png", "staleness histograms"))
    if "staleness_accuracy.png" in plots:
        b.append(("img", "staleness_accuracy.png", "robust accuracy vs staleness"))
    return b


def _ttt(ttt: dict | None) -> str:
    if ttt is None:
        return "no eval"
    if not ttt["reached"]:
        return "not reached"
    return f"{ttt['seconds']['value']:.1f}s"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            out[-1] += "".join("\n| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("*")
    return "".join(f"<i>{p}</i>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[tuple], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}"></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 7px}"
             "th{background:#f2f2f2}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing report unless asked; with ``overwrite`` remove only report files."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"report directory {out} exists and is not a directory")
    existing = [name for name in (*REPORT_FILES, "runs") if (out / name).exists()]
    if existing and not overwrite:
        raise UsageError(f"report directory {out} already holds a report ({', '.join(existing)}); "
                         "pass --overwrite to replace it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        if (out / name).exists():
            (out / name).unlink()


def write_report(runs: list[Run], out: Path, *, target: float, baseline: str | None = None,
                 title: str = "psadv scaling report") -> dict:
    report = build_report(runs, target=target, baseline=baseline, title=title)
    plots = make_plots(report, out)
    report["plots"] = plots
    blocks = _blocks(report, plots)
    (out / "report.md").write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks, report["title"]))
    write_json(out / "report.json", report)
    return report


# --- sweeps ----------------------------------------------------------------------------------------
@dataclass
class Sweep:
    workers: list[int]
    max_staleness: list[int | None]
    push: list[str]
    launcher: str
    time_budget: float | None
    steps: int | None
    data_dir: str | None
    train_args: list[str]


def parse_int_list(text: str, what: str, minimum: int = 0) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    if any(v < minimum for v in values):
        raise UsageError(f"{what} values must be >= {minimum}, got {text!r}")
    return sorted(set(values))


def launcher_prefix(template: str, n: int) -> list[str]:
    if "{n}" not in template:
        raise UsageError(f"--launcher {template!r} must contain {{n}} (the number of processes), "
                         "e.g. 'mpiexec -n {n}' or 'srun -n {n}'")
    try:
        prefix = shlex.split(template.format(n=n))
        if prefix:
            return prefix
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"--launcher {template!r}: only {{n}} may appear in braces, and quotes must close "
                         f"({type(exc).__name__}: {exc})") from None
    raise UsageError("--launcher is empty; give a command such as 'mpiexec -n {n}'")


def sweep_commands(sweep: Sweep, runs_dir: Path, overwrite: bool) -> list[dict]:
    """One ``psadv train`` command per (push, max staleness, workers); workers 0 = one process."""
    for flag in SWEEP_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in sweep.train_args):
            raise UsageError(f"{flag} is set by the sweep; leave it out of the psadv train flags after --")
    if sweep.time_budget is None and sweep.steps is None and not any(
            a.split("=")[0] in ("--time-budget", "--steps", "--epochs") for a in sweep.train_args):
        raise UsageError("a sweep needs a budget per run: --time-budget SECONDS or --steps VERSIONS")
    launcher_prefix(sweep.launcher, 2)
    jobs = []
    for push in sweep.push:
        for S in sweep.max_staleness:
            for n in sweep.workers:
                if n == 0 and (push != sweep.push[0] or S != sweep.max_staleness[0]):
                    continue  # one single-process reference is enough
                name = "single" if n == 0 else f"{push}-w{n}" + (f"-S{S}" if S is not None else "")
                cmd = [sys.executable, "-m", "psadv.cli", "train", "--run-dir", str(runs_dir / name), "--no-progress"]
                if n > 0:
                    cmd = launcher_prefix(sweep.launcher, n + 1) + cmd + ["--push", push]
                    if S is not None:
                        cmd += ["--max-staleness", str(S)]
                if sweep.time_budget is not None:
                    cmd += ["--time-budget", str(sweep.time_budget)]
                if sweep.steps is not None:
                    cmd += ["--steps", str(sweep.steps)]
                if sweep.data_dir:
                    cmd += ["--data-dir", sweep.data_dir]
                if overwrite:
                    cmd.append("--overwrite")
                jobs.append({"name": name, "attackers": n, "push": push if n else None, "max_staleness": S,
                             "cmd": cmd + list(sweep.train_args)})
    return jobs


def run_sweep(sweep: Sweep, out: Path, *, overwrite: bool, echo=print) -> list[Run]:
    """Launch every run of the sweep one after another (a quiet machine for each), then load them."""
    runs_dir = out / "runs"
    jobs = sweep_commands(sweep, runs_dir, overwrite)
    program = launcher_prefix(sweep.launcher, 2)[0]
    if any(job["attackers"] for job in jobs) and shutil.which(program) is None:
        raise PsadvError(f"launcher program {program!r} (from --launcher) is not on PATH")
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for job in jobs:
        echo("$ " + shlex.join(job["cmd"]))
        start = time.perf_counter()
        log = runs_dir / f"{job['name']}.log"
        with open(log, "w") as fh:
            rc = subprocess.run(job["cmd"], stdout=fh, stderr=subprocess.STDOUT).returncode
        launch = {**job, "returncode": rc, "seconds": round(time.perf_counter() - start, 1), "log": str(log)}
        if rc != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            echo(f"psadv: warning: {job['name']} exited with code {rc}: {tail[0]}")
        run_dir = runs_dir / job["name"]
        if run_dir.is_dir():
            runs.append(load_run(run_dir, job["name"], launch))
        else:
            run = Run(job["name"], run_dir, status="failed", launch=launch,
                      problems=[f"launcher exited with code {rc}", "no run directory was created"])
            runs.append(run)
    write_json(runs_dir / "sweep.json", [r.launch for r in runs])
    return runs


def scaling_report(run_dirs: list[str], out: str | Path, *, target: float = 0.89, baseline: str | None = None,
                   overwrite: bool = False, workers: str | None = None, max_staleness: str | None = None,
                   push: str | None = None, launcher: str | None = None, time_budget: float | None = None,
                   steps: int | None = None, data_dir: str | None = None, train_args: list[str] = (),
                   title: str = "psadv scaling report", echo=print) -> dict:
    """The ``psadv scaling-report`` command: check every input, then (sweep) launch, then report."""
    from .config import choices_of

    out = Path(out)
    sweep = None
    if workers is None:
        sweep_only = {"--max-staleness": max_staleness, "--push": push, "--launcher": launcher,
                      "--time-budget": time_budget, "--steps": steps, "--data-dir": data_dir,
                      "flags after --": list(train_args) or None}
        given = [name for name, value in sweep_only.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to a sweep; add --workers")
        if not run_dirs:
            raise UsageError("give run directories to report on, or --workers to launch a sweep")
    else:
        pushes = push.split(",") if push else ["examples"]
        unknown = [p for p in pushes if p not in choices_of("push")]
        if unknown:
            raise UsageError(f"--push: unknown mode {unknown[0]!r}; choose from {', '.join(choices_of('push'))}")
        sweep = Sweep(workers=parse_int_list(workers, "--workers"),
                      max_staleness=parse_int_list(max_staleness, "--max-staleness") if max_staleness else [None],
                      push=pushes, launcher=launcher or "mpiexec -n {n}", time_budget=time_budget, steps=steps,
                      data_dir=data_dir,
                      train_args=list(train_args))
    runs = find_runs(run_dirs)
    names = [r.name for r in runs]
    if sweep:  # checks the sweep's flags before anything is written
        names += [job["name"] for job in sweep_commands(sweep, out / "runs", overwrite)]
    if baseline is not None and baseline not in names:
        raise UsageError(f"--baseline {baseline!r} is not one of the runs: {', '.join(names)}")
    prepare_out(out, overwrite)
    if sweep:
        runs += run_sweep(sweep, out, overwrite=overwrite, echo=echo)
    return write_report(runs, out, target=target, baseline=baseline, title=title)
