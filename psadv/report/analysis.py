"""The report's numbers: throughput, accuracy over time, staleness and the server bottleneck model.

Pure functions of loaded runs (:class:`~psadv.report.runs.Run`). Each number is an object
``{"value": …, "kind": "measured" | "predicted", "from": "…"}``: *measured* numbers come from the
run directories (metrics rows and summary.json), *predicted* ones from the bottleneck model below.

**The bottleneck model.** Per push it applies the server is busy c_s seconds (``server_seconds.busy``
/ pushes applied in the session: receiving, validating, the optimizer step; one push is one version,
except with ``--push gradients --accumulate K``, where K pushes make one version); an attacker needs
c_a seconds per batch (``attacker_compute_seconds`` / batches it produced). With n attackers the
attackers offer n / c_a batches/s and the server can apply at most 1 / c_s, so

    throughput(n) ≈ min(n / c_a, 1 / c_s) batches/s,   n* = c_a / c_s,   speedup(n) = min(n, n*) / min(1, n*).

n* is the attacker count at which the server, not the attackers, limits throughput. The model is
fitted on the smallest attacker count of a group (ideally 1, where attackers do not compete for
cores) and compared with what the other runs of the group measured.

In ``sync`` mode a version is a round: every attacker computes its batch (in parallel, c_a), then
the server does its work of the round, c_0 once (the optimizer step) and c_1 per push (receiving,
checking, summing), so

    throughput(n) ≈ n / (c_a + c_0 + n·c_1) batches/s,   n* = (c_a − c_0) / c_1,

n* being where the server's share of a round equals the attackers'. c_0 and c_1 are fitted on the
server's busy seconds per round of the group's two smallest attacker counts; a group of one count
has c_0 = 0 and c_1 = its c_s per push, which overstates the server for n > 1 (the prediction errs
low).
"""

from __future__ import annotations

import json
import statistics

from .. import __version__
from ..config import FIELDS
from ..errors import UsageError
from ..pushmodes import examples_per_step
from .runs import FINAL_EVAL, Run

# Config fields that do not change what a run measures: runs differing only in these are one recipe.
IDENTITY_FIELDS = {"run_dir", "data_dir", "device", "threads", "log_every", "checkpoint_every", "keep_checkpoints",
                   "steps", "epochs", "time_budget", "target_robust_acc", "eval_every", "seed"}
PREDICT_AT = (1, 2, 4, 8, 16, 32, 64)


def measured(value, source: str) -> dict:
    return {"value": value, "kind": "measured", "from": source}


def predicted(value, source: str) -> dict:
    return {"value": value, "kind": "predicted", "from": source}


def _round(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


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
    k = applied_per_version(run.config, run.attackers)
    busy = s["server_seconds"].get("busy")
    if versions > 0 and busy is not None:
        per = f"{versions} versions" if k == 1 else f"({versions} versions × {k} pushes each)"
        out["c_s"] = measured(_round(busy / (versions * k), 6),
                              f"summary.json server_seconds.busy {busy}s / {per} of the last session")
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


def applied_per_version(config: dict, attackers: int = 1) -> int:
    """Applied pushes per model version: ``--accumulate`` K with pushes of gradients, one from each of
    the ``attackers`` in a synchronous round, else one."""
    if config.get("push") == "sync":
        return max(1, attackers)
    return int(config.get("accumulate", 1) or 1) if config.get("push") == "gradients" else 1


def staleness_of(run: Run) -> dict:
    """Staleness numbers: none for a plain single-process run (each batch attacked with the model
    it trains), emulated S of a single-process run with --emulate-staleness, or what the server
    measured (or the emulation of N attackers recorded)."""
    if not run.is_mpi and not run.config.get("emulate_attackers"):
        S = int(run.config.get("emulate_staleness", 0) or 0)
        return {"kind": "emulated" if S else "none", "S": measured(S, "config.json emulate_staleness")}
    s = run.summary or {}
    out = {"kind": "real" if run.is_mpi else f"{run.config['emulate_attackers']} emulated attackers",
           "max_staleness": measured(run.config.get("max_staleness"), "config.json"),
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
            "metrics_lines_skipped": run.skipped_lines,
            "mode": "mpi" if run.is_mpi else "single", "attackers": run.attackers, "push": run.push,
            "config": run.config, "throughput": throughput(run), "costs": costs(run),
            "staleness": staleness_of(run), "accuracy_curve": accuracy_curve(run),
            "time_to_target": time_to_target(run, target)}
    if last is not None:
        where = f"last evaluation ({last.get('examples')} test examples, {last.get('attack')})"
        info["final"] = {"clean_acc": measured(last["clean_acc"], where), "robust_acc": measured(last["robust_acc"], where)}
    if run.final_eval:
        fe = run.final_eval
        where = f"{FINAL_EVAL} ({fe.get('examples')} test examples, {fe.get('attack')})"
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
# Config fields that only the MPI roles read: a single-process run of the same recipe lacks them (or,
# for the refinement of stale pushes, resolves them without attackers: config.make_config).
MPI_FIELDS = {"push", "max_staleness", "refresh_every", "lr_damping", "wire_dtype", "emulate_staleness",
              "refine_steps", "refine_step_ratio", "refine_on"}


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
        if base is not None and push in ("examples", "gradients", "sync"):
            c = costs(base)
            if c.get("n_star") and c["c_a"]["value"]:
                model = {"fitted_on": base.name, "attackers": base.attackers, "c_s": c["c_s"], "c_a": c["c_a"],
                         "n_star": c["n_star"], "batch_size": base.batch_size, "synchronous": push == "sync"}
                if push == "sync":
                    model.update(round_fit(usable, c["c_a"]["value"]))
                # what the model leaves out (messages, waiting, ranks sharing cores), measured at the baseline
                factor = throughput(base)["examples_per_s"]["value"] / model_rate(model, base.attackers)
                model["overhead_factor"] = measured(round(factor, 3), f"measured ÷ predicted examples/s of {base.name}")
        for r in members:
            group["points"].append(scaling_point(r, base, model))
        if model:
            largest = max(r.attackers for r in members)
            rate, speedup = model_formulas(model)
            model["predictions"] = [
                {"attackers": n, "speedup": predicted(round(model_speedup(model, n), 3), speedup),
                 "examples_per_s": predicted(round(model_rate(model, n), 1), rate),
                 "examples_per_s_with_overhead": predicted(round(model_rate(model, n) * model["overhead_factor"]["value"], 1),
                                                           f"{rate} × overhead factor")}
                for n in sorted(set(PREDICT_AT) | {largest})]
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
        rate, speedup = model_formulas(model)
        point["predicted_speedup"] = predicted(round(model_speedup(model, run.attackers), 3),
                                               f"{speedup} with c_s, c_a from {model['fitted_on']}")
        point["predicted_examples_per_s"] = predicted(round(model_rate(model, run.attackers), 1),
                                                      f"{rate} of {model['fitted_on']}")
    c = costs(run)
    if c:
        point["costs"] = c
    return point


def model_speedup(model: dict, n: int) -> float:
    """Predicted speedup on the measured speedup's scale: n_b × throughput(n) ÷ throughput(n_b) for the
    baseline's n_b attackers; with n_b = 1 that is min(n, n*) / min(1, n*)."""
    n_b = model["attackers"]
    return n_b * model_rate(model, n) / model_rate(model, n_b)


def round_fit(runs: list[Run], c_a: float) -> dict:
    """A sync group's server work per round, c_0 + n·c_1, fitted on its two smallest attacker counts
    (busy seconds per version against attackers), and the n* it gives."""
    per_round = {}
    for r in sorted(runs, key=lambda r: r.attackers):
        c = costs(r)
        if "c_s" in c and r.attackers not in per_round:
            per_round[r.attackers] = c["c_s"]["value"] * r.attackers
    counts = sorted(per_round)[:2]
    c_0, c_1, source = 0.0, per_round[counts[0]] / counts[0], f"c_s per push of {counts[0]} attacker(s), all per push"
    if len(counts) == 2:
        (n1, n2), (r1, r2) = counts, (per_round[counts[0]], per_round[counts[1]])
        slope = (r2 - r1) / (n2 - n1)
        if 0 < slope and r1 - n1 * slope >= 0:
            c_0, c_1 = r1 - n1 * slope, slope
            source = f"server busy seconds per round at {n1} and {n2} attackers: {r1:.6f}, {r2:.6f}"
    return {"c_0": predicted(_round(c_0, 6), source), "c_1": predicted(_round(c_1, 6), source),
            "n_star": predicted(_round((c_a - c_0) / c_1, 2), "(c_a − c_0) / c_1")}


def seconds_per_round(model: dict, n: int) -> float:
    """A synchronous round of n attackers: their batches side by side, then the server's work."""
    return model["c_a"]["value"] + model["c_0"]["value"] + n * model["c_1"]["value"]


def model_rate(model: dict, n: int) -> float:
    """Predicted examples/s of n attackers: asynchronous pushes wait for the slower of the attackers
    and the server; a synchronous round waits for both, one after the other."""
    c_s, c_a = model["c_s"]["value"], model["c_a"]["value"]
    if model.get("synchronous"):
        return model["batch_size"] * n / seconds_per_round(model, n)
    return model["batch_size"] * min(n / c_a, 1 / c_s)


def model_formulas(model: dict) -> tuple[str, str]:
    """How :func:`model_rate` and :func:`model_speedup` compute, in words, for a report's ``from``."""
    if model.get("synchronous"):
        return "batch × n / (c_a + c_0 + n·c_1)", "n (c_a + c_0 + c_1) / (c_a + c_0 + n·c_1)"
    return "batch × min(n / c_a, 1 / c_s)", "min(n, n*) / min(1, n*)"


# --- what N attackers buy -------------------------------------------------------------------------
def versions_to_target(run: Run, target: float) -> int | None:
    """The version of the first periodic evaluation at or above ``target`` (None: never reached)."""
    return next((r["version"] for r in run.of_kind("eval") if r.get("robust_acc", -1) >= target), None)


def staleness_method(config: dict) -> tuple:
    """What a run does against staleness: (--refine-steps, --refine-step-ratio, --reuse-perturbations,
    push mode, --accumulate, --delay-compensation, --refine-on)."""
    push = config.get("push") if config.get("push") in ("gradients", "sync") else "examples"
    gradients = push == "gradients"
    refine = int(config.get("refine_steps", 0) or 0) if push == "examples" else 0
    return (refine, float(config.get("refine_step_ratio", 0) or 0) if refine else 0.0,
            bool(config.get("reuse_perturbations")), push,
            applied_per_version(config), float(config.get("delay_compensation", 0) or 0) if gradients else 0.0,
            (config.get("refine_on") or "server") if refine and not gradients else "server")


def method_label(method: tuple) -> str:
    refine, ratio, reuse, push, k, dc, where = method
    parts = ([f"refine {refine}" + (f" × {ratio:g}ε" if ratio else "") + (" on attackers" if where == "attackers" else "")]
             if refine else []) + (["reuse"] if reuse else [])
    if push == "gradients":
        parts = ["gradients"] + ([f"accumulate {k}"] if k > 1 else []) + ([f"DC λ={dc:g}"] if dc else []) + parts
    elif push == "sync":
        parts = ["sync"] + parts
    return " + ".join(parts) or "none"


def final_robust(run: Run) -> float | None:
    """The final model's robust accuracy: ``psadv eval --save``'s when there is one, else the run's last
    periodic evaluation of its final version."""
    if run.final_eval and run.final_eval.get("robust_acc") is not None:
        return run.final_eval["robust_acc"]
    last = (run.summary or {}).get("last_eval") or {}
    return last.get("robust_acc") if last.get("version") == (run.summary or {}).get("version") else None


def attackers_buy(runs: list[Run], groups: list[dict], target: float) -> dict | None:
    """Predicted time to ``target`` for N attackers: the versions emulated runs of N attackers took
    (the slowest seed: every seed must get there) × the bottleneck model's seconds per version,
    max(c_a / N × pushes per applied push, c_s + K·c_a / k) — attackers whose pushes are rejected as
    too stale must make more of them; the server's own work per version plus K refinement steps of
    an attack step's cost, c_a / k — with c_s and c_a measured on an MPI run of the report (c_s of a run
    with the same refinement, when the report has one, is the server's work measured whole)."""
    emulated = [r for r in runs if not r.is_mpi and r.config.get("emulate_attackers")]
    if not emulated:
        return None
    by_name = {r.name: r for r in runs}
    fitted = [g["model"] for g in groups if g.get("model")]

    def method_of(model):  # the staleness method of the MPI run a model was fitted on
        return staleness_method(by_name[model["fitted_on"]].config)

    def refinement(model):  # (steps, step ratio) of the MPI run a model was fitted on
        return method_of(model)[:2]
    like = dict(emulated[0].config)
    if like.get("push") == "sync":
        # synchronous attackers share one batch between them: they are compared with one process
        # at its own batch, as `psadv train` runs
        like["batch_size"] = FIELDS["batch_size"].default
    single = single_process_to_target(runs, like, target, grid=eval_grid(emulated[0].config))
    rows = []
    for key in sorted({(int(r.config["emulate_attackers"]), staleness_method(r.config)) for r in emulated}):
        n, method = key
        refine = method[0]
        members = sorted((r for r in emulated if (int(r.config["emulate_attackers"]), staleness_method(r.config)) == key),
                         key=lambda r: r.name)
        per_seed = [versions_to_target(r, target) for r in members]
        reached = None if any(v is None for v in per_seed) else max(per_seed)
        row = {"attackers": n, "refine_steps": refine, "method": method_label(method), "runs": [r.name for r in members],
               "versions_to_target": measured(reached, f"first periodic evaluation ≥ {target:.0%}, slowest of "
                                                       f"{len(members)} run(s): {per_seed}")}
        finals = [final_robust(r) for r in members]
        if finals and None not in finals:
            row["final_robust_acc"] = measured(_round(sum(finals) / len(finals), 4),
                                               f"mean over {len(finals)} run(s) of the final model's robust accuracy: "
                                               f"{finals}")
            row["final_robust_spread"] = measured(_round(max(finals) - min(finals), 4), "max − min over the runs")
        applied = sum((r.summary or {}).get("applied", 0) for r in members)
        rejected = sum((r.summary or {}).get("rejected_stale", 0) for r in members)
        per_push = (applied + rejected) / applied if applied else 1.0
        row["pushes_per_version"] = measured(_round(per_push, 4), "(applied + rejected_stale) ÷ applied of the "
                                                                  "emulated runs")
        # the server's seconds per push: measured on an MPI run of the same push mode with the same
        # method (refinement; accumulation), or, for pushes of examples, predicted as c_s of a run
        # without refinement plus K attack steps' cost (a run with refinement measures a server doing
        # more than c_s: it prices only its own method)
        models = [m for m in fitted if method_of(m)[3] == method[3]]
        if method[3] == "sync":  # an attacker's batch sets c_a: only a run of the same batch prices it
            models = [m for m in models if m["batch_size"] == int(members[0].config.get("batch_size") or 0)]
        same = next((m for m in models if method_of(m)[:2] == method[:2] and method_of(m)[4] == method[4]
                     and method_of(m)[6] == method[6]), None)
        # refinement on the attackers moves its cost into c_a: only a run that did the same prices it
        estimable = method[3] == "examples" and method[6] == "server"
        fit = same or (next((m for m in models if refinement(m)[0] == 0), None) if estimable else None)
        k = method[4]  # pushes per version
        if fit is not None and reached is not None:
            c_s, c_a = fit["c_s"]["value"], fit["c_a"]["value"]
            steps = max(1, int(members[0].config.get("attack_steps") or 1))
            server = c_s if same or not refine else c_s + refine * c_a / steps
            how = "c_s" if same or not refine else "c_s + K·c_a / k"
            if method[3] == "sync":  # a round: the attackers' batches side by side, then the server's N pushes
                per_version = seconds_per_round(fit, n)
                row["seconds_per_version"] = predicted(_round(per_version, 6), f"c_a + c_0 + N·c_1 with the round "
                                                                               f"fit of {fit['fitted_on']}")
                row["n_star"] = fit["n_star"]
            else:
                per_version = k * max(c_a / n * per_push, server)
                row["seconds_per_version"] = predicted(_round(per_version, 6),
                                                       f"{f'{k} × ' if k > 1 else ''}max(c_a / N × pushes per applied "
                                                       f"push, {how}) with c_s, c_a of {fit['fitted_on']}")
                row["n_star"] = predicted(_round(c_a / server, 2), f"c_a / ({how})")
            row["time_to_target"] = predicted(round(reached * per_version, 1), "versions to target × seconds per version")
        rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["attackers"] == 1 and r["method"] == row["method"]), None)
        t = row.get("time_to_target", {}).get("value")
        if base and t and base.get("time_to_target"):
            row["speedup_over_one_attacker"] = predicted(round(base["time_to_target"]["value"] / t, 2),
                                                         "time to target of 1 attacker ÷ of N")
        if single and single.get("seconds") and t:
            row["speedup_over_single_process"] = predicted(round(single["seconds"]["value"] / t, 2),
                                                           "time to target of one process ÷ of N attackers, both "
                                                           "versions to target × seconds per version")
    return {"target": target, "model_from": ", ".join(m["fitted_on"] for m in fitted) or None, "single_process": single,
            "rows": rows}


# Config fields that make one process's seconds per version comparable with the emulated runs'
# attackers: the same attack, batch and threads per rank (one core per attacker in the model).
RECIPE_KEYS = ("model", "attack", "attack_steps", "attack_step_ratio", "batch_size", "threads", "precision")
# and what makes its versions to target comparable: the same periodic evaluation, every as many
# training examples (a run with --eval-every 0 has only its final evaluation, which says nothing
# about when it got there)
EVAL_KEYS = ("eval_attack", "eval_examples")


def eval_grid(config: dict) -> int:
    """Training examples between two periodic evaluations (0: none): a version of N emulated
    synchronous attackers is N batches."""
    per_step = examples_per_step(int(config.get("batch_size") or 0), config.get("push") or "examples",
                                 int(config.get("emulate_attackers") or 0))
    return int(config.get("eval_every") or 0) * per_step


def single_process_to_target(runs: list[Run], like: dict, target: float, grid: int | None = None) -> dict | None:
    """One process's time to ``target``, priced the way N attackers' is: the versions plain
    single-process runs took (the slowest seed among those with periodic evaluations) × the seconds per
    version of the fastest plain run of the same recipe (``RECIPE_KEYS`` as in ``like``; the median
    over its train rows, so a quiet timing run without evaluations can price seeds graded elsewhere).
    Only runs with the periodic evaluation of ``like`` (``EVAL_KEYS``, every ``grid`` training
    examples: ``like``'s own by default) count versions to target.
    None when the report holds no plain run of that recipe."""
    plain = [r for r in runs if not r.is_mpi and r.config and not r.config.get("emulate_attackers")
             and not r.config.get("emulate_staleness")
             and all(r.config.get(k) == like.get(k) for k in RECIPE_KEYS)]
    graded = sorted((r for r in plain if r.of_kind("eval") and r.config.get("eval_every")
                     and all(r.config.get(k) == like.get(k) for k in EVAL_KEYS)
                     and eval_grid(r.config) == (eval_grid(like) if grid is None else grid)), key=lambda r: r.name)
    timed = [(throughput(r)["versions_per_s"]["value"], r.name) for r in plain if throughput(r)]
    if not graded and not timed:
        return None
    per_seed = [versions_to_target(r, target) for r in graded]
    reached = None if not per_seed or None in per_seed else max(per_seed)
    out = {"runs": [r.name for r in graded],
           "versions_to_target": measured(reached, f"first periodic evaluation ≥ {target:.0%}, slowest of "
                                                   f"{len(per_seed)} run(s): {per_seed}")}
    if timed:
        rate, name = max(timed)
        out["seconds_per_version"] = measured(_round(1 / rate, 6), f"1 / median versions/s of {name}")
        if reached is not None:
            out["seconds"] = predicted(round(reached / rate, 1), "versions to target × seconds per version")
    return out


# --- the report as one object ---------------------------------------------------------------------
def build_report(runs: list[Run], *, target: float, baseline: str | None = None, title: str = "psadv scaling report",
                 created: str, cpu_count: int | None) -> dict:
    """Everything report.json holds; ``created`` and ``cpu_count`` describe where it is made."""
    if not runs:
        raise UsageError("no runs to report")
    if baseline is not None and baseline not in [r.name for r in runs]:
        raise UsageError(f"--baseline {baseline!r} is not one of the runs: {', '.join(r.name for r in runs)}")
    described = [describe_run(r, target) for r in runs]
    groups = scaling_groups(runs)
    report = {"title": title, "psadv_version": __version__, "created": created,
              "target_robust_acc": target, "machine": {"cpu_count": cpu_count},
              "runs": described, "scaling": groups, "baseline": baseline,
              "attackers_buy": attackers_buy(runs, groups, target),
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


# --- what the plots compare ------------------------------------------------------------------------
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

    # a plain one-process run is the series' S = 0
    emulated = [(d["staleness"]["S"]["value"], robust(d), d["name"])
                for d in runs if d["staleness"]["kind"] in ("emulated", "none") and robust(d) is not None]

    def mean_tau(mode):
        return [(d["staleness"]["staleness_mean"]["value"], robust(d), d["name"])
                for d in runs if d["mode"] == mode and d["staleness"]["kind"] not in ("emulated", "none")
                and robust(d) is not None
                and (d["staleness"].get("staleness_mean") or {}).get("value") is not None]

    real, attackers = mean_tau("mpi"), mean_tau("single")
    knobs = {(d["config"].get("max_staleness"), d["config"].get("refresh_every")) for d in runs if d["mode"] == "mpi"}
    series = {}
    if len({p[0] for p in emulated}) > 1:
        series["one process, emulated staleness S"] = emulated
    if len(real) > 1 and len(knobs) > 1:
        series["MPI, measured mean staleness τ"] = real
    if len({p[0] for p in attackers}) > 1:
        series["one process, N emulated attackers (mean τ)"] = attackers
    return series

