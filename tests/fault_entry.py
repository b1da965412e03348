"""``psadv`` with one injected fault: a test-only entry point, never part of the product.

The MPI tests run ``mpiexec -n N python tests/fault_entry.py FAULT train …``; every rank wraps the
roles' real methods, then runs the ordinary CLI. ``FAULT`` is ``KIND,rank=R,after=N``:

* ``nan-push``: attacker R's N-th batch (counting from 1) is NaN, so it pushes NaN examples or a
  NaN gradient, which the server must reject;
* ``raise``: attacker R raises at its N-th batch, or (R = 0) the server raises once the model
  reaches version N;
* ``stall``: the server (R = 0) stops working for a minute at version N, so its attackers fill
  the bounded queue and must wait without spinning;
* ``reject``: the server (R = 0) rejects every push, slowly, so its queue never empties;
* ``fail-setup``: attacker R fails at start-up with a user error (after rank 0 made the run
  directory);
* ``fail-start``: the server (R = 0) fails with a storage error where it first writes into the run
  directory (``Trainer.start``: config.json, the metrics log), after every rank started;
* ``count-refines``: no fault: the server (R = 0) counts the pushes it refines
  (``--refine-steps``) and prints ``refined N pushes`` on exit;
* ``count-grad-align``: no fault: rank R counts the GradAlign penalties it computes
  (``--grad-align``) and prints ``rank R: GradAlign penalties N`` on exit;
* ``count-precision``: no fault: rank R counts the dtypes of its convolutions' outputs, in
  evaluation and elsewhere (:class:`ConvDtypes`), and prints ``rank R: conv outputs …`` on exit.
"""

from __future__ import annotations

import os
import sys
import time

STALL_SECONDS = 60.0


def parse(text: str) -> tuple[str, int, int]:
    kind, *rest = text.split(",")
    fields = dict(part.split("=", 1) for part in rest)
    if kind not in ("nan-push", "raise", "stall", "reject", "fail-setup", "fail-start", "count-refines",
                    "count-grad-align", "count-precision"):
        raise SystemExit(f"fault_entry: unknown fault {kind!r}")
    return kind, int(fields.get("rank", 1)), int(fields.get("after", 1))


def count_calls(module, name: str, before: str, after: str = "") -> None:
    """Count the calls of ``module.name`` (looked up there at each call) and print
    ``{before} N {after}`` on exit."""
    import atexit

    real, calls = getattr(module, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(module, name, counted)
    atexit.register(lambda: print(f"{before} {calls[0]} {after}".rstrip(), file=sys.stderr, flush=True))


class ConvDtypes:
    """Counts the outputs of every ``Conv2d`` by dtype, those of psadv's evaluation (inside
    ``AccuracyJob``) apart from the rest (the training attack and step): ``counts[phase, dtype]``."""

    def __init__(self):
        import collections

        self.counts: collections.Counter = collections.Counter()
        self.evaluating = 0

    def install(self) -> ConvDtypes:
        import torch
        from psadv.grading import AccuracyJob

        real_batch = AccuracyJob._batch

        def batch(job, *args, **kwargs):
            self.evaluating += 1
            try:
                return real_batch(job, *args, **kwargs)
            finally:
                self.evaluating -= 1

        def hook(module, inputs, output):
            if isinstance(module, torch.nn.Conv2d):
                self.counts["eval" if self.evaluating else "train", str(output.dtype).removeprefix("torch.")] += 1

        AccuracyJob._batch = batch
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        self.remove = lambda: (setattr(AccuracyJob, "_batch", real_batch), handle.remove())
        return self

    def line(self) -> str:
        return ", ".join(f"{phase} {dtype} {n}" for (phase, dtype), n in sorted(self.counts.items()))


def install(kind: str, rank: int, after: int) -> None:
    from psadv import attacker, server

    me = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    if me != rank:
        return
    if kind == "fail-setup":
        from psadv.errors import UsageError

        def failing_init(self, *args, **kwargs):
            raise UsageError("injected start-up error (tests/fault_entry.py)")

        attacker.Attacker.__init__ = failing_init
        return
    if kind == "fail-start":
        from psadv import training
        from psadv.errors import StorageError

        def failing_start(self):
            raise StorageError(f"cannot write {self.run_dir / 'config.json'}: No space left on device (injected)")

        training.Trainer.start = failing_start
        return
    if kind == "count-precision":
        import atexit

        recorder = ConvDtypes().install()
        atexit.register(lambda: print(f"rank {me}: conv outputs {recorder.line()}", file=sys.stderr, flush=True))
        return
    if kind == "count-grad-align":
        from psadv import gradalign

        count_calls(gradalign, "grad_align_penalty", f"rank {me}: GradAlign penalties")
        return
    if rank > 0:
        import torch

        real_perturb, calls = attacker.perturb, [0]

        def perturb(model, x, y, attack, start=None):
            calls[0] += 1
            x_adv = real_perturb(model, x, y, attack, start=start)
            if calls[0] == after and kind == "raise":
                raise RuntimeError(f"injected fault (tests/fault_entry.py) at push {after}")
            if calls[0] == after and kind == "nan-push":
                return torch.full_like(x_adv, float("nan"))
            return x_adv

        attacker.perturb = perturb
        return
    if kind == "count-refines":
        count_calls(server, "refine", "refined", "pushes")
    elif kind == "reject":
        def reject(self, msg, src):
            time.sleep(0.2)  # slower than any attacker here: the queue never empties
            self.policy.rejected_stale += 1
            return False

        server.Server.use = reject
    elif kind == "stall":  # after the train row of version N, so the test sees where it stalled
        real_log = server.Server._log

        def log(self, lr):
            rate = real_log(self, lr)
            if self.trainer.version == after:
                time.sleep(STALL_SECONDS)
            return rate

        server.Server._log = log
    else:
        real_use = server.Server.use

        def use(self, msg, src):
            advanced = real_use(self, msg, src)
            if advanced and self.trainer.version == after:
                raise RuntimeError(f"injected fault (tests/fault_entry.py) at version {after}")
            return advanced

        server.Server.use = use


if __name__ == "__main__":
    install(*parse(sys.argv[1]))
    from psadv.cli import main

    sys.argv = ["psadv", *sys.argv[2:]]
    main()
