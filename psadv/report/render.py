"""The report rendered: report.md and report.html from one list of blocks, and the PNG plots.

Rendering only lays out what :mod:`psadv.report.analysis` computed; it computes no new numbers
except the model's curves drawn through the plots.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

from ..errors import StorageError, UsageError, io_error_text
from .analysis import model_rate, model_speedup, robust_and_time, staleness_series

REPORT_FILES = ("report.md", "report.html", "report.json", "throughput.png", "accuracy.png", "robust_vs_time.png",
                "staleness.png", "staleness_accuracy.png")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write ``path`` atomically (temp file + rename) and close ``fig``."""
    plt = pyplot()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {io_error_text(exc)}") from None
    finally:
        plt.close(fig)


def make_plots(report: dict, out: Path) -> list[str]:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    made = []

    def save(fig, name: str) -> None:
        save_figure(fig, out / name)
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


# --- rendering ------------------------------------------------------------------------------------
def _v(entry, fmt: str = "{}", missing: str = "–") -> str:
    value = entry.get("value") if isinstance(entry, dict) else entry
    if value is None:
        return missing
    return fmt.format(value)


def report_blocks(report: dict, plots: list[str]) -> list[tuple]:
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
        b.append(("p", "Final models under the strong attack (final_eval.json in the run directory, written by "
                       "`psadv eval RUN --save`):"))
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
        if model and model.get("synchronous"):
            b.append(("p", f"Measured on {model['fitted_on']} ({model['attackers']} attacker(s)): attacker c_a = "
                           f"{model['c_a']['value']:.4f} s per batch of {model['batch_size']}; the server's work of a "
                           f"round c_0 + n·c_1 with c_0 = {model['c_0']['value']:.4f} s and c_1 = "
                           f"{model['c_1']['value']:.5f} s per push ({model['c_0']['from']}). A round waits for both: "
                           f"the server's share equals the attackers' at n* = (c_a − c_0) / c_1 = "
                           f"**{model['n_star']['value']:.1f} attackers**."))
        elif model:
            b.append(("p", f"Measured on {model['fitted_on']} ({model['attackers']} attacker(s)): server c_s = "
                           f"{model['c_s']['value']:.4f} s per version, attacker c_a = {model['c_a']['value']:.4f} s "
                           f"per batch of {model['batch_size']}. Predicted: the server saturates at "
                           f"n* = c_a / c_s = **{model['n_star']['value']:.1f} attackers**."))
        if model:
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
    if any((g.get("model") or {}).get("synchronous") for g in report["scaling"]):
        b.append(("p", "**Synchronous rounds** (push=sync) wait for every attacker, then for the server: throughput "
                       "≈ n × batch / (c_a + c_0 + n·c_1), where c_0 is the server's work once a round (the optimizer "
                       "step) and c_1 its work per push; their c_s column is per push."))
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
        if st["kind"] == "none":  # one process, each batch attacked with the model it trains
            rows.append([d["name"], "none (one process)", "–", "–", "–", "–", "–"])
        elif st["kind"] == "emulated":
            rows.append([d["name"], "emulated", _v(st["S"]), "–", "–", "–", "–"])
        else:
            rows.append([d["name"], st["kind"], _v(st.get("max_staleness", {})), _v(st.get("staleness_mean", {}), "{:.2f}"),
                         _v(st.get("staleness_max", {})), _v(st.get("rejected_fraction", {}), "{:.1%}"),
                         _v(st.get("utilization", {}), "{:.1%}")])
    b.append(("table", ["run", "staleness", "S (emulated) or --max-staleness", "mean τ", "max τ", "rejected",
                        "server utilization"], rows))
    b.append(("p", "Server utilization = busy ÷ (busy + waiting) in the server loop. Rejected = pushes staler than "
                   "--max-staleness (or invalid) ÷ pushes received."))
    buy = report.get("attackers_buy")
    if buy:
        b.append(("h", 2, "What N attackers buy"))
        b.append(("p", f"Versions to {buy['target']:.0%} robust accuracy are *measured* on runs that emulate N "
                       "attackers in one process (`--emulate-attackers N`, the slowest seed); seconds per version and "
                       "time to target are *predicted* by the bottleneck model, max(c_a / N × pushes per version, "
                       "c_s + K·c_a / k) (stale rejections make attackers push more than once per version), or for "
                       "synchronous attackers a round, c_a + c_0 + N·c_1 (fitted on an MPI run of the same batch per "
                       "attacker), with one core or GPU per attacker"
                       + (f" and c_s, c_a measured on {buy['model_from']}" if buy["model_from"] else
                          " — no MPI run with server and attacker timings is in this report, so no prediction")
                       + ". K is --refine-steps (server-side work), k the attack's steps; the method is what the "
                         "runs did against staleness (`--refine-steps`, `--refine-step-ratio`, `--refine-on`, "
                         "`--reuse-perturbations`), "
                         "and final robust the mean (spread) of the final models, *measured*."
                       + single_process_sentence(buy.get("single_process"))))
        b.append(("table", ["attackers", "method", "final robust (spread)", "versions to target", "n*",
                            "s per version", "time to target", "speedup vs 1 attacker", "vs single process"],
                  [[str(r["attackers"]), r["method"], _final(r), _v(r["versions_to_target"], "{:,}"),
                    _v(r.get("n_star", {}), "{:.1f}"), _v(r.get("seconds_per_version", {}), "{:.4f}"),
                    _v(r.get("time_to_target", {}), "{:,.0f}s"), _v(r.get("speedup_over_one_attacker", {}), "{:.2f}×"),
                    _v(r.get("speedup_over_single_process", {}), "{:.2f}×")] for r in buy["rows"]]))
    if "staleness.png" in plots:
        b.append(("img", "staleness.png", "staleness histograms"))
    if "staleness_accuracy.png" in plots:
        b.append(("img", "staleness_accuracy.png", "robust accuracy vs staleness"))
    return b


def _final(row: dict) -> str:
    if "final_robust_acc" not in row:
        return "–"
    return f"{row['final_robust_acc']['value']:.1%} ({100 * row['final_robust_spread']['value']:.1f})"


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


def single_process_sentence(single: dict | None) -> str:
    """How "vs single process" was priced: one process's versions to target (measured, its slowest
    seed) × its seconds per version (measured on the fastest plain run of the same recipe)."""
    if not single:
        return " No plain single-process run of the same recipe is in this report, so no comparison with one process."
    v, spv = single["versions_to_target"]["value"], single.get("seconds_per_version", {}).get("value")
    runs = ", ".join(single["runs"]) or "none with periodic evaluations"
    if v is None or spv is None:
        why = "did not all reach the target" if v is None else "have no train rows to time"
        return f" One process ({runs}): its runs {why}, so no comparison with one process."
    return (f" One process ({runs}) needs {v:,} versions (slowest seed, *measured*) × {spv:.4f} s per version "
            f"({single['seconds_per_version']['from']}, *measured*) = {single['seconds']['value']:,.0f} s, *predicted* "
            f"the same way as N attackers' time.")
