"""``psadv train``: pick the single-process trainer or the MPI roles, and run.

Under an MPI launcher with N >= 2 ranks, rank 0 is the parameter server (:mod:`psadv.server`) and
ranks 1..N-1 are attackers (:mod:`psadv.attacker`); otherwise the single-process trainer
(:mod:`psadv.single`) runs.

MPI start-up is two collective checks (:func:`psadv.mpi.agree_on_errors`): first every rank
resolves the config and loads the data without touching the disk; then rank 0 prepares the run
directory and builds the trainer while the attackers build their models. A user error on any rank
(a bad data directory, an existing run directory) makes every rank exit with the same code, the
message printed once. Anything raised later ends the whole job through MPI_Abort.
"""

from __future__ import annotations

import os

import click

from .config import Config
from .console import adversary_line, budget_line, summary_line
from .errors import ConfigError, PsadvError
from .pushmodes import push_mode
from .runsetup import check_batch_size, open_run_dir, resolve_run
from .single import train_single


def launch(overrides: dict, file_values: dict, *, resume: str | None, overwrite: bool, show_progress: bool,
           trust_config_code: bool = False) -> None:
    from .mpi import world

    w = world()
    if w is not None:
        _launch_mpi(w, overrides, file_values, resume=resume, overwrite=overwrite, show_progress=show_progress,
                    trust_config_code=trust_config_code)
        return
    from .devices import set_threads

    setup = resolve_run(overrides, file_values, resume=resume, overwrite=overwrite,
                        trust_config_code=trust_config_code)
    threads = set_threads(setup.cfg.threads)
    click.echo(start_up_line(f"psadv: run directory {setup.run_dir}", setup.cfg, threads), err=True)
    if threads.warning:
        click.echo(threads.warning, err=True)
    summary = train_single(setup, show_progress=show_progress, threads=threads)
    click.echo(summary_line(summary))


def start_up_line(head: str, cfg: Config, threads=None) -> str:
    """The line ``psadv train`` starts with: where the run goes, the adversary, what a time budget
    covers, and the threads (per process) with why."""
    parts = [head, adversary_line(cfg), budget_line(cfg)]
    if threads is not None:
        parts.append(f"{threads.threads} thread{'s' if threads.threads != 1 else ''} ({threads.why})")
    return "; ".join(part for part in parts if part)


def check_mpi_options(cfg: Config) -> None:
    """Options that cannot work with a server and attackers: ConfigError on the first."""
    if cfg.refine_steps and not push_mode(cfg.push).sends_examples:
        raise ConfigError("--refine-steps continues stale adversarial examples: it needs --push examples")
    # the server refines, and regularises, around the clean examples, which it reads unaugmented
    if cfg.refine_steps and cfg.refine_on == "server" and cfg.augment != "none":
        raise ConfigError("--refine-steps under MPI needs --augment none (the server does not see the "
                          "attackers' augmented batches), or --refine-on attackers")
    if cfg.grad_align and push_mode(cfg.push).sends_examples and cfg.augment != "none":
        raise ConfigError("--grad-align with --push examples needs --augment none (the server does not see "
                          "the attackers' augmented batches); --push gradients computes it on the attackers")
    if cfg.emulate_attackers or cfg.emulate_staleness:
        raise ConfigError("--emulate-attackers and --emulate-staleness are for one process; under MPI "
                          "the attackers are real")


def _launch_mpi(w, overrides: dict, file_values: dict, *, resume: str | None, overwrite: bool,
                show_progress: bool, trust_config_code: bool = False) -> None:
    from .data import load_dataset
    from .devices import pick_device, precision_warning, set_threads
    from .mpi import agree_on_errors, fail_job, gather_strings
    from .stop import SignalFlag

    signals = SignalFlag().install()
    error = None
    setup = train_set = None
    try:  # phase 1: every rank, nothing written
        setup = resolve_run(overrides, file_values, resume=resume, overwrite=overwrite, prepare_dir=False,
                            attackers=w.n_attackers, trust_config_code=trust_config_code)
        cfg = setup.cfg
        threads = set_threads(cfg.threads, w.local_size)
        device = pick_device(cfg.device, w.local_rank)
        train_set = load_dataset(cfg.dataset, "train", cfg.data_dir or None)
        if w.rank == 0:  # the server evaluates on the test split and logs: check both before writing anything
            load_dataset(cfg.dataset, "test", cfg.data_dir or None)
            from .trackers import check_installed

            check_installed(cfg.log)
        check_batch_size(cfg.batch_size, len(train_set) // w.n_attackers,
                         f"an attacker's shard with {w.n_attackers} attackers")
        check_mpi_options(cfg)
    except PsadvError as exc:
        error = exc
    except BaseException as exc:  # noqa: BLE001 - any bug ends the job, never a hang
        fail_job(w, exc)
    agree_on_errors(w, error)

    role = None
    try:  # phase 2: rank 0 prepares the run directory and the trainer, attackers their models
        if w.rank == 0:
            from .server import Server
            from .training import Trainer

            open_run_dir(setup, overwrite=overwrite)
            trainer = Trainer(setup, device=device, train_size=len(train_set), role="server", attackers=w.n_attackers,
                              stop_requested=signals.stop_requested)
            role = Server(w, trainer, signals, show_progress=show_progress, checkpoint=setup.checkpoint,
                          train_set=train_set)
        else:
            from .attacker import Attacker

            role = Attacker(w, setup, train_set, device, signals)
    except PsadvError as exc:
        error = exc
    except BaseException as exc:  # noqa: BLE001
        fail_job(w, exc)
    # A user error on any rank: the run directory rank 0 has just made goes away again.
    agree_on_errors(w, error, cleanup=setup.lock.abandon if setup.lock is not None else None)

    # phase 2b: only now, every rank started, does rank 0 write config.json and open the metrics: a
    # resume that failed on the way left them as they were, and a failure here (a full disk) is
    # undone as in phase 2
    def undo():
        setup.lock.abandon()
        role.trainer.close()

    try:
        if w.rank == 0:
            role.trainer.start()
    except PsadvError as exc:
        error = exc
    except BaseException as exc:  # noqa: BLE001
        fail_job(w, exc)
    agree_on_errors(w, error, cleanup=undo if w.rank == 0 and setup.lock is not None else None)

    try:
        ranks = gather_strings(w, f"{w.host} {os.getpid()} {device} {threads.threads}")
        if w.rank == 0:
            click.echo(start_up_line(f"psadv: run directory {setup.run_dir} ({w.size} ranks: server + "
                                     f"{w.n_attackers} attacker{'s' if w.n_attackers > 1 else ''}, push {cfg.push})",
                                     cfg, threads), err=True)
            if threads.warning:
                click.echo(threads.warning, err=True)
            if warning := precision_warning(cfg.precision, device):
                click.echo(warning, err=True)
            world_row = [dict(zip(("host", "pid", "device", "threads"), text.split()), rank=i)
                         for i, text in enumerate(ranks)]
            role.trainer.metrics.write("world", size=w.size, ranks=world_row)
            summary = role.run()
            click.echo(summary_line(summary))
        else:
            role.run()
    except BaseException as exc:  # noqa: BLE001
        fail_job(w, exc)
