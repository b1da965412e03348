"""Time-dilated scaling sweep: real MPI jobs of 1..32 attackers on a 2-core machine.

    python scripts/dilation_sweep.py --out /tmp/sweep --data-dir /work/shared/data \\
        --recipe 'examples=' --recipe 'gradients=--push gradients' --attackers 1,2,4,8,16,32

For each recipe (a name and the ``psadv train`` options that make it) and each attacker count N it
runs ``mpiexec -n N+1 python scripts/dilate.py --factor k -- train ...`` (the real server, wire and
staleness policy; every rank's work padded to k × its CPU time, see scripts/dilate.py), one job
at a time, then undilated ``mpiexec`` runs at the small counts (``--undilated``) to check the
dilation where the cores suffice. From each run directory it collects examples/s and versions/s
(the scaling report's medians over train-row windows), staleness, rejected fraction, server
utilization, c_s and c_a, and the bottleneck model's n* and predicted speedup (``psadv
scaling-report`` on the dilated runs, fitted on the smallest N), and writes OUT/sweep.json, OUT/sweep.md
and ``dilation_sweep.py record`` makes a results record of it (results/attackers-dilated-scaling.toml).

The factor: k = max(--min-factor, ceil((N + 1) / --cores)), so the job's CPU demand (N + 1) / k
stays within --cores however many attackers there are, and at least --min-factor (6): on a machine
shared with others (load 6 to 15 on 2 cores during results/attackers-dilated-scaling.toml) a unit
slowed by more than k cannot be padded back, and at k = 4 a third of the attackers' time overran
(the "overrun share" column says whether k sufficed). k differs between N; every time is compared
÷ k and every rate × k ("undilated-equivalent"), and n* = c_a / c_s needs neither.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DILATE = ROOT / "scripts" / "dilate.py"


def factor_for(n: int, cores: float, min_factor: float) -> float:
    """The dilation k for N attackers: (N + 1) ranks need (N + 1) / k cores, at most ``cores``."""
    return float(max(min_factor, math.ceil((n + 1) / cores)))


def train_args(args, budget: float, extra: str, run_dir: Path) -> list[str]:
    # periodic evaluation off and a tiny final one: the sweep measures throughput, not accuracy
    return ["train", "--data-dir", args.data_dir, "--threads", "1", "--time-budget", f"{budget:g}",
            "--eval-every", "0", "--eval-examples", str(args.eval_examples), "--eval-steps", "5",
            "--log-every", str(args.log_every), "--checkpoint-every", "0", "--no-progress",
            "--seed", str(args.seed), "--run-dir", str(run_dir), *shlex.split(extra)]


def command(n: int, k: float | None, args, budget: float, extra: str, run_dir: Path) -> list[str]:
    launcher = ["mpiexec", "-n", str(n + 1)]
    if k is None:
        return [*launcher, sys.executable, "-m", "psadv.cli", *train_args(args, budget, extra, run_dir)]
    return [*launcher, sys.executable, str(DILATE), "--factor", f"{k:g}", "--stats", str(run_dir.parent / "dilation"),
            "--", *train_args(args, budget, extra, run_dir)]


class MemoryWatch:
    """The lowest MemAvailable seen while a job runs (sampled every second from /proc/meminfo);
    below ``floor_mib`` it stops the job with SIGTERM (psadv checkpoints and stops), so a sweep of
    33 ranks never pushes a shared machine into the OOM killer."""

    def __init__(self, proc: subprocess.Popen, floor_mib: int):
        self.proc, self.floor_mib = proc, floor_mib
        self.lowest_mib = None
        self.stopped_for_memory = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def available_mib() -> int | None:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
        except OSError:
            return None
        return None

    def _run(self):
        while not self._stop.is_set():
            a = self.available_mib()
            if a is not None and (self.lowest_mib is None or a < self.lowest_mib):
                self.lowest_mib = a
            if a is not None and a < self.floor_mib and not self.stopped_for_memory:
                self.stopped_for_memory = True
                os.killpg(self.proc.pid, signal.SIGTERM)
            self._stop.wait(1.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_one(cmd: list[str], run_dir: Path, timeout: float, floor_mib: int) -> dict:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    with open(run_dir.parent / "output.txt", "w") as out:
        # its own process group: the memory guard and the timeout stop this job and nothing else
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        with MemoryWatch(proc, floor_mib) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = "timeout"
    if mem.stopped_for_memory:
        rc = f"stopped: MemAvailable below {floor_mib} MiB"
    return {"rc": rc, "wall_s": round(time.perf_counter() - start, 1), "load_before": round(load0, 2),
            "load_after_1min": round(os.getloadavg()[0], 2), "lowest_mem_available_mib": mem.lowest_mib}


def dilation_stats(run_dir: Path) -> dict | None:
    """Sums over the ranks' dilation-rank<R>.json: how much of the wall time was padding, and how
    much work overran k × its CPU time (contention the padding could not absorb)."""
    files = sorted((run_dir.parent / "dilation").glob("dilation-rank*.json"))
    if not files:
        return None
    ranks = [json.loads(f.read_text()) for f in files]
    out = {"ranks": len(ranks)}
    for role, sel in (("server", [r for r in ranks if r["rank"] == 0]), ("attackers", [r for r in ranks if r["rank"]])):
        cpu = sum(r["cpu_s"] for r in sel)
        wall = sum(r["wall_s"] for r in sel)
        slept = sum(r["slept_s"] for r in sel)
        over = sum(r.get("overrun_s", 0.0) for r in sel)
        out[role] = {"cpu_s": round(cpu, 3), "work_wall_s": round(wall, 3), "slept_s": round(slept, 3),
                     # padded time = work + sleep; k × CPU would be exact dilation
                     "padded_over_cpu": round((wall + slept) / cpu, 3) if cpu else None,
                     "overrun_share": round(over / (wall + slept), 4) if wall + slept else None}
    return out


def collect(run_dir: Path, k: float) -> dict:
    from psadv.report.analysis import costs, throughput
    from psadv.report.runs import load_run

    run = load_run(run_dir)
    s = run.summary or {}
    tp, c = throughput(run), costs(run)
    row = {"status": run.status, "version": s.get("version"), "elapsed": s.get("elapsed")}
    for key in ("staleness_mean", "staleness_max", "rejected_fraction", "utilization"):
        row[key] = s.get(key)
    ex = tp.get("examples_per_s", {}).get("value")
    vs = tp.get("versions_per_s", {}).get("value")
    c_s, c_a = c.get("c_s", {}).get("value"), c.get("c_a", {}).get("value")
    row.update(k=k, examples_per_s=ex, versions_per_s=vs, c_s=c_s, c_a=c_a,
               n_star=c.get("n_star", {}).get("value"),
               # a k× slower machine: its rates × k, its times ÷ k are this machine's
               examples_per_s_equiv=None if ex is None else round(ex * k, 1),
               versions_per_s_equiv=None if vs is None else round(vs * k, 3),
               c_s_equiv=None if c_s is None else round(c_s / k, 6),
               c_a_equiv=None if c_a is None else round(c_a / k, 6))
    return row


def scaling_report(out: Path, run_dirs: list[Path]) -> dict:
    """``psadv scaling-report`` on the dilated runs of one recipe: n* and predicted speedup per N."""
    report_dir = out / "report"
    cmd = [sys.executable, "-m", "psadv.cli", "scaling-report", "--overwrite", "-o", str(report_dir),
           *map(str, run_dirs)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-500:]}
    report = json.loads((report_dir / "report.json").read_text())
    groups = [g for g in report["scaling"] if g.get("model")]
    if not groups:
        return {"error": "the scaling report fitted no model", "command": shlex.join(cmd)}
    g = groups[0]
    model = g["model"]
    by_run = {p["run"]: p for p in g["points"]}
    return {"command": shlex.join(cmd), "fitted_on": model["fitted_on"], "n_star": model["n_star"]["value"],
            "predicted_speedup": {str(p["attackers"]): p["predicted_speedup"]["value"] for p in by_run.values()
                                  if "predicted_speedup" in p}}


def sweep(args) -> dict:
    out = Path(args.out)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "cores": args.cores,
              "min_factor": args.min_factor, "budget_s": args.budget, "undilated_budget_s": args.undilated_budget,
              "recipes": []}
    counts = [int(x) for x in args.attackers.split(",")]
    checks = [int(x) for x in args.undilated.split(",") if x] if args.undilated else []
    for spec in args.recipe:
        name, _, extra = spec.partition("=")
        rec = {"name": name, "options": extra, "dilated": [], "undilated": []}
        dirs = []
        for n in counts:
            k = factor_for(n, args.cores, args.min_factor)
            run_dir = out / name / "dilated" / f"n{n:02d}" / "run"
            cmd = command(n, k, args, args.budget, extra, run_dir)
            print(f"[{name}] N={n} k={k:g}: {shlex.join(cmd)}", flush=True)
            info = run_one(cmd, run_dir, timeout=args.budget + 240, floor_mib=args.memory_floor)
            row = {"attackers": n, "command": shlex.join(cmd), **info}
            if info["rc"] == 0:
                row.update(collect(run_dir, k))
                row["dilation"] = dilation_stats(run_dir)
                dirs.append(run_dir)
            shown = ("rc", "wall_s", "examples_per_s_equiv", "c_s_equiv", "c_a_equiv", "staleness_mean", "utilization",
                     "lowest_mem_available_mib")
            print(f"    -> {json.dumps({x: row.get(x) for x in shown})}", flush=True)
            rec["dilated"].append(row)
        for n in checks:
            run_dir = out / name / "undilated" / f"n{n:02d}" / "run"
            cmd = command(n, None, args, args.undilated_budget, extra, run_dir)
            print(f"[{name}] undilated N={n}: {shlex.join(cmd)}", flush=True)
            info = run_one(cmd, run_dir, timeout=args.undilated_budget + 240, floor_mib=args.memory_floor)
            row = {"attackers": n, "command": shlex.join(cmd), **info}
            if info["rc"] == 0:
                row.update(collect(run_dir, 1.0))
            shown = ("rc", "examples_per_s", "c_s", "c_a", "staleness_mean")
            print(f"    -> {json.dumps({x: row.get(x) for x in shown})}", flush=True)
            rec["undilated"].append(row)
        rec["model"] = scaling_report(out / name, dirs) if dirs else {"error": "no dilated run finished"}
        speedups(rec)
        result["recipes"].append(rec)
        (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def speedups(rec: dict) -> None:
    """Measured speedup on undilated-equivalent examples/s, vs the smallest N; the model's beside it."""
    rows = [r for r in rec["dilated"] if r.get("examples_per_s_equiv")]
    if not rows:
        return
    base = rows[0]
    predicted = rec.get("model", {}).get("predicted_speedup", {})
    for r in rows:
        r["speedup"] = round(r["examples_per_s_equiv"] / base["examples_per_s_equiv"] * base["attackers"], 2)
        r["predicted_speedup"] = predicted.get(str(r["attackers"]))
    for u in rec["undilated"]:
        d = next((r for r in rows if r["attackers"] == u["attackers"]), None)
        if d is None or not u.get("examples_per_s"):
            continue
        u["dilated_vs_undilated"] = {
            key: (round(d[eq] / u[key], 3) if d.get(eq) is not None and u.get(key) else None)
            for key, eq in (("examples_per_s", "examples_per_s_equiv"), ("c_s", "c_s_equiv"), ("c_a", "c_a_equiv"),
                            ("staleness_mean", "staleness_mean"), ("utilization", "utilization"))}


TABLE_COLUMNS = ["recipe", "N", "k", "ex/s dilated", "ex/s equivalent", "speedup vs N=1", "predicted speedup",
                 "versions/s equivalent", "c_s equivalent ms", "c_a equivalent ms", "n*", "staleness mean",
                 "staleness max", "rejected", "utilization", "padded/CPU attackers", "overrun share attackers"]


def table_rows(result: dict) -> list[list]:
    rows = []
    for rec in result["recipes"]:
        for r in rec["dilated"]:
            dil = (r.get("dilation") or {}).get("attackers") or {}

            def ms(x):
                return None if x is None else round(x * 1e3, 2)

            rows.append([rec["name"], r["attackers"], r.get("k"), r.get("examples_per_s"),
                         r.get("examples_per_s_equiv"),
                         r.get("speedup"), r.get("predicted_speedup"), r.get("versions_per_s_equiv"),
                         ms(r.get("c_s_equiv")), ms(r.get("c_a_equiv")), r.get("n_star"), r.get("staleness_mean"),
                         r.get("staleness_max"), r.get("rejected_fraction"), r.get("utilization"),
                         dil.get("padded_over_cpu"), dil.get("overrun_share")])
    return rows


def check_rows(result: dict) -> list[list]:
    rows = []
    for rec in result["recipes"]:
        for u in rec["undilated"]:
            d = next((r for r in rec["dilated"] if r["attackers"] == u["attackers"]), {})

            def ms(x):
                return None if x is None else round(x * 1e3, 2)

            ratio = u.get("dilated_vs_undilated") or {}
            rows.append([rec["name"], u["attackers"], d.get("k"), u.get("examples_per_s"),
                         d.get("examples_per_s_equiv"),
                         ratio.get("examples_per_s"), ms(u.get("c_s")), ms(d.get("c_s_equiv")), ratio.get("c_s"),
                         ms(u.get("c_a")), ms(d.get("c_a_equiv")), ratio.get("c_a"), u.get("staleness_mean"),
                         d.get("staleness_mean"), u.get("load_before"), d.get("load_before")])
    return rows


CHECK_COLUMNS = ["recipe", "N", "k", "ex/s undilated", "ex/s dilated equiv", "ratio", "c_s undilated ms",
                 "c_s dilated equiv ms", "ratio", "c_a undilated ms", "c_a dilated equiv ms", "ratio",
                 "staleness undilated", "staleness dilated", "load undilated", "load dilated"]


def markdown(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("–" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def toml_value(v) -> str:
    if v is None:
        return '""'  # the results schema: values that do not apply are "" / 0
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a TOML basic string


def write_record(result: dict, path: Path, fields: dict, notes: str, also: list[dict] = ()) -> None:
    """results/<id>.toml (schema in the team's COMMON.md) with the sweep's table and commands."""
    fields = dict(fields)
    commands = list(fields.pop("commands", []))  # the sweeps' own command lines first
    for res in [result, *also]:
        commands += [r["command"] for rec in res["recipes"] for r in rec["dilated"] + rec["undilated"]]
        commands += [rec["model"]["command"] for rec in res["recipes"] if rec.get("model", {}).get("command")]
    head = {**fields, "commands": commands}
    lines = [f"{k} = {toml_value(v)}" for k, v in head.items()]
    # the results schema has one table: the undilated check goes into the notes
    notes = (notes.strip() + "\n\n**Dilated vs undilated** (ratio = dilated undilated-equivalent ÷ undilated):\n\n"
             + markdown(CHECK_COLUMNS, check_rows(result)))
    lines.append('notes = """\n' + notes.replace("\\", "\\\\").replace('"""', '\\"\\"\\"') + '\n"""')
    lines.append('links = ["design/staleness.md", "guides/scaling-report.md"]')
    lines += ["[machine]", 'cpu = "AMD EPYC VM (2 vCPUs)"', "cores = 2", "bfloat16 = true", 'gpu = "none"',
              "[evaluation]", 'attack = ""', "examples = 0", "[table]",
              f"columns = {toml_value(TABLE_COLUMNS)}", "rows = ["]
    lines += [f"  {toml_value(row)}," for row in table_rows(result)]
    lines.append("]")
    path.write_text("\n".join(lines) + "\n")


def record_main(argv) -> None:
    p = argparse.ArgumentParser(prog="dilation_sweep.py record",
                                description="write a results record from a finished sweep's sweep.json")
    p.add_argument("sweep_json", type=Path)
    p.add_argument("record", type=Path)
    p.add_argument("--fields", type=Path, required=True,
                   help="JSON object of the record's id, title, question, status, date, commit, page, seeds, summary")
    p.add_argument("--notes", type=Path, required=True, help="markdown file of the record's notes")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="another sweep.json whose commands the record lists (checks quoted in the notes)")
    args = p.parse_args(argv)
    write_record(json.loads(args.sweep_json.read_text()), args.record, json.loads(args.fields.read_text()),
                 args.notes.read_text(), [json.loads(a.read_text()) for a in args.also])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["record"]:
        record_main(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the runs, sweep.json and sweep.md")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--recipe", action="append", required=True,
                   help="NAME=OPTIONS: a recipe's name and its psadv train options as one string (repeatable)")
    p.add_argument("--attackers", default="1,2,4,8,16,32")
    p.add_argument("--budget", type=float, default=50.0, help="dilated seconds of training per run (--time-budget)")
    p.add_argument("--cores", type=float, default=1.5, help="cores the dilated job may use: k >= (N + 1) / cores")
    p.add_argument("--min-factor", type=float, default=6.0, help="smallest k")
    p.add_argument("--undilated", default="1,2", help="attacker counts also run undilated ('' = none)")
    p.add_argument("--undilated-budget", type=float, default=20.0)
    p.add_argument("--log-every", type=int, default=5, help="versions per metrics row (the throughput windows)")
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--memory-floor", type=int, default=2048,
                   help="MiB: a job is stopped (SIGTERM) when MemAvailable falls below this")
    args = p.parse_args(argv)
    if args.cores <= 0 or args.min_factor < 1:
        p.error("--cores must be > 0 and --min-factor >= 1")
    for spec in args.recipe:
        if "=" not in spec or not spec.partition("=")[0]:
            p.error(f"--recipe {spec!r}: give NAME=OPTIONS")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        p.error(f"--out {args.out} is not empty")
    result = sweep(args)
    md = ("## Dilated sweep\n\n" + markdown(TABLE_COLUMNS, table_rows(result)) +
          "\n\n## Dilated vs undilated\n\n" + markdown(CHECK_COLUMNS, check_rows(result)) + "\n")
    for rec in result["recipes"]:
        md += f"\n{rec['name']}: model {json.dumps(rec.get('model'))}\n"
    (Path(args.out) / "sweep.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
