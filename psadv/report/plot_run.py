"""``psadv plot RUN``: one run's metrics against versions and against wall-clock time, as PNGs.

The curves come from metrics.jsonl: loss, the training adversary's ε, the learning rate,
staleness and examples/s from the ``train`` rows, clean and robust accuracy from the ``eval``
rows. Drawing reuses the scaling report's helpers (:mod:`psadv.report.render`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..rundir import METRICS, read_metrics
from .render import pyplot, save_figure

PLOT_DIR = "plots"
PLOT_FILES = {"version": "by_version.png", "time": "by_time.png"}
# panel -> (y label, [(line label, row kind, field names: the first one a row has)])
PANELS = {
    "loss": ("training loss", [("loss", "train", ("loss",))]),
    "accuracy": ("accuracy on the eval slice", [("clean", "eval", ("clean_acc",)), ("robust", "eval", ("robust_acc",))]),
    "eps": ("training ε", [("ε", "train", ("eps",))]),
    "lr": ("learning rate", [("lr", "train", ("lr",))]),
    # the server reports the window's mean staleness, the single process its (emulated) staleness
    "staleness": ("staleness (versions)", [("staleness", "train", ("staleness_mean", "staleness"))]),
    "rate": ("examples/s", [("examples/s", "train", ("examples_per_s",))]),
}


def run_series(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """panel -> line -> [(version, time, value)] from metrics rows; rows lacking a value are skipped."""
    series: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for panel, (_, lines) in PANELS.items():
        for label, kind, names in lines:
            points = []
            for row in rows:
                if row.get("kind") != kind or row.get("version") is None or row.get("time") is None:
                    continue
                value = next((row[n] for n in names if isinstance(row.get(n), (int, float))), None)
                if value is not None and not isinstance(value, bool):
                    points.append((int(row["version"]), float(row["time"]), float(value)))
            if points:
                series.setdefault(panel, {})[label] = points
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw the run's curves into ``out`` (default RUN_DIR/plots/); the PNGs written."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    if not metrics.is_file():
        raise UsageError(f"{run_dir} is not a run directory (it has no {METRICS})")
    series = run_series(read_metrics(metrics))
    if not series:
        raise UsageError(f"{metrics} holds no train or eval rows to plot yet")
    out = Path(out) if out is not None else run_dir / PLOT_DIR
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    written = []
    for axis, name in PLOT_FILES.items():
        fig, axes = plt.subplots(2, 3, figsize=(13, 7))
        for ax, (panel, (ylabel, _)) in zip(axes.flat, PANELS.items()):
            lines = series.get(panel, {})
            for label, points in lines.items():
                xs = [p[0] if axis == "version" else p[1] for p in points]
                ax.plot(xs, [p[2] for p in points], "o-" if len(points) < 30 else "-", ms=3, label=label)
            if not lines:
                ax.text(0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes, color="0.5")
            ax.set(xlabel="version (optimizer steps)" if axis == "version" else
                   "wall-clock seconds of training (across resumes)", ylabel=ylabel)
            if panel == "accuracy":
                ax.set_ylim(0, 1.02)
            if len(lines) > 1:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{run_dir.name}: metrics against {'versions' if axis == 'version' else 'wall-clock time'}")
        save_figure(fig, out / name)
        written.append(out / name)
    return written
