"""``psadv train``: pick the single-process trainer or the MPI roles, and run."""

from __future__ import annotations

import click

from .training import resolve_run, summary_line, train_single


def launch(overrides: dict, file_values: dict, *, resume: str | None, overwrite: bool, show_progress: bool) -> None:
    setup = resolve_run(overrides, file_values, resume=resume, overwrite=overwrite)
    click.echo(f"psadv: run directory {setup.run_dir}", err=True)
    summary = train_single(setup, show_progress=show_progress)
    click.echo(summary_line(summary))
