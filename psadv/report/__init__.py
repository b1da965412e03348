"""``psadv scaling-report``: throughput, accuracy, staleness and the server bottleneck of finished runs.

Input: run directories (single-process or MPI), or a sweep launched first (:mod:`.sweep`). Output,
in a report directory: ``report.md`` and ``report.html`` with tables and PNG plots, and
``report.json`` with every number, each marked *measured* or *predicted* and where it comes from.

One module per concern: :mod:`.runs` reads run directories, :mod:`.analysis` computes the numbers
and the bottleneck model (pure functions), :mod:`.render` writes Markdown, HTML and PNGs, and
:mod:`.sweep` launches sweeps. This module ties them into the command.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import UsageError
from ..rundir import write_json
from .analysis import build_report
from .render import report_blocks, make_plots, prepare_out, render_html, render_markdown
from .runs import FINAL_EVAL, Run, find_runs, load_run
from .sweep import Sweep, SweepResult, check_launcher, parse_int_list, plan, run_sweep

__all__ = ["FINAL_EVAL", "Run", "Sweep", "SweepResult", "find_runs", "load_run", "run_sweep", "scaling_report",
           "write_report"]


def write_report(runs: list[Run], out: Path, *, target: float, baseline: str | None = None,
                 title: str = "psadv scaling report") -> dict:
    report = build_report(runs, target=target, baseline=baseline, title=title,
                          created=time.strftime("%Y-%m-%d %H:%M:%S"), cpu_count=os.cpu_count())
    plots = make_plots(report, out)
    report["plots"] = plots
    blocks = report_blocks(report, plots)
    (out / "report.md").write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks, report["title"]))
    write_json(out / "report.json", report)
    return report


def scaling_report(run_dirs: list[str], out: str | Path, *, target: float = 0.89, baseline: str | None = None,
                   overwrite: bool = False, resume: bool = False, workers: str | None = None,
                   max_staleness: str | None = None, push: str | None = None, launcher: str | None = None,
                   time_budget: float | None = None, steps: int | None = None, data_dir: str | None = None,
                   train_args: list[str] = (), title: str = "psadv scaling report", echo=print) -> dict:
    """The ``psadv scaling-report`` command: check every input, then (sweep) launch, then report.

    Returns the report; when a signal stopped the sweep, ``{"stopped_by": SIGNAL, ...}`` instead.
    """
    from ..config import FIELDS, choices_of

    out = Path(out)
    sweep = None
    if workers is None:
        sweep_only = {"--max-staleness": max_staleness, "--push": push, "--launcher": launcher,
                      "--time-budget": time_budget, "--steps": steps, "--data-dir": data_dir,
                      "--resume": resume or None, "flags after --": list(train_args) or None}
        given = [name for name, value in sweep_only.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to a sweep; add --workers")
        if not run_dirs:
            raise UsageError("give run directories to report on, or --workers to launch a sweep")
    else:
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        pushes = push.split(",") if push else [FIELDS["push"].default]
        unknown = [p for p in pushes if p not in choices_of("push")]
        if unknown:
            raise UsageError(f"--push: unknown mode {unknown[0]!r}; choose from {', '.join(choices_of('push'))}")
        sweep = Sweep(workers=parse_int_list(workers, "--workers"),
                      max_staleness=parse_int_list(max_staleness, "--max-staleness") if max_staleness else [None],
                      push=pushes, launcher=launcher or "mpiexec -n {n}", time_budget=time_budget, steps=steps,
                      data_dir=data_dir, train_args=list(train_args))
    runs = find_runs(run_dirs)
    names = [r.name for r in runs]
    if sweep:  # checks the sweep's flags and launcher before anything is written
        jobs = plan(sweep, out / "runs", overwrite=overwrite, resume=resume)
        check_launcher(sweep, jobs)
        names += [job["name"] for job in jobs]
    if baseline is not None and baseline not in names:
        raise UsageError(f"--baseline {baseline!r} is not one of the runs: {', '.join(names)}")
    prepare_out(out, overwrite or resume)  # --resume keeps the sweep's runs and replaces the report
    if sweep:
        result = run_sweep(sweep, out / "runs", overwrite=overwrite, resume=resume, echo=echo)
        if result.stopped_by:
            # the allocation ends soon: its last seconds go to the checkpoint (and a requeue), and
            # the report waits for the whole sweep (--resume continues it)
            return {"stopped_by": result.stopped_by, "launched": len(result.run_dirs), "planned": len(result.jobs)}
        runs += [load_run(job["run_dir"], job["name"], None if job.get("kept") else job) for job in result.jobs]
    for run in runs:  # in the report's problems too; said here, as a final number the report does not show
        if run.stale_final_eval:
            echo(f"psadv: warning: {run.name}: {run.stale_final_eval}")
    return write_report(runs, out, target=target, baseline=baseline, title=title)
