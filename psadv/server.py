"""The parameter-server role (MPI rank 0): train on whatever the attackers push.

The server drives :class:`psadv.training.Trainer` (the same config, checkpoints and metrics as the
single-process trainer). Its loop is small pieces, like mpi4py.futures' manager:

* **poll**: while a receive buffer of the bounded queue is free, ``Iprobe`` for a push, ``Recv``
  it, validate it (size, dtype, finite values, ranges); take in control messages; start the
  parameter sends that were waiting for their buffer.
* **use** the oldest queued push as :class:`psadv.staleness.StalenessPolicy` says: a rejected
  push is counted and its attacker gets fresh parameters; otherwise one optimizer step on the
  examples (``examples``) or with the gradient (``gradients``, with the policy's lr scale);
  ``sync`` steps with the policy's average once every attacker's gradient has arrived. Payloads
  are packed and unpacked by :mod:`psadv.wire`'s layouts.
* **refresh**: every ``--refresh-every`` versions (every version in sync mode) the parameters go to
  every attacker with ``Isend``; at most one parameter message per attacker is in flight.
* nothing to do: sleep with exponential back-off (counted as waiting in the utilization).

Periodic evaluation runs on a snapshot of the model, one small piece between training steps (or
whenever the queue is empty), so the attackers never wait for it.

On stop (version/time budget, robust-accuracy target, or a signal) the server sends STOP, writes
the final checkpoint *first*, runs the final evaluation (not after a signal, and a signal cuts it
short: :meth:`psadv.training.Trainer.end_run`), then drains pushes until every attacker says DONE,
sends every attacker BYE (they wait for it, so a signal during the final evaluation ends no rank
early) and writes the summary. An attacker that does not answer within
``WIND_DOWN_SECONDS`` (hung, stopped) ends the job with a one-line error; the checkpoint is saved.
"""

from __future__ import annotations

import collections
import math
import sys
import time

import numpy as np
import torch

from . import wire
from .attacks import refine
from .checkpoint.restore import restoring
from .console import ProgressBar
from .data import dataset_info
from .errors import PsadvError
from .gradpush import GradientPushes
from .metrics import grad_align_field
from .models import build_model, flat_state, load_flat_state_
from .mpi import Backoff, World
from .pushmodes import push_mode
from .schedules import refine_attack
from .staleness import StalenessPolicy, window_stats
from .stop import SignalFlag
from .training import Trainer

EVAL_PIECE = 50  # examples per evaluation piece, interleaved with training steps
# After STOP an attacker finishes its batch, waits for its last pushes to be taken, and says DONE:
# well under a second plus one batch. The checkpoint is written before this wait, so a generous
# limit costs nothing but the time to notice a hung attacker.
WIND_DOWN_SECONDS = 10.0


class Server:
    def __init__(self, w: World, trainer: Trainer, signals: SignalFlag, *, show_progress: bool = True,
                 checkpoint=None, train_set=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.w, self.comm, self.trainer, self.signals = w, w.comm, trainer, signals
        cfg = self.cfg = trainer.cfg
        self.mode = cfg.push
        self.show_progress = show_progress
        self.attackers = list(range(1, w.size))
        self.n_state = flat_state(trainer.model).numel()
        info = dataset_info(cfg.dataset, cfg.data_dir or None)
        self.num_classes = info.num_classes
        # --refine-steps: stale examples are attacked further from their clean originals, and
        # --grad-align regularises around them; the pushes name them by index into the training set
        # every rank holds
        self.refines = bool(cfg.refine_steps) and cfg.refine_on == "server"
        self.x_train = train_set.x if wire.carries_indices(cfg) else None
        self.layout = wire.push_layout(self.mode, shape=info.shape, batch_size=cfg.batch_size,
                                       wire_dtype=cfg.wire_dtype, model=trainer.model,
                                       train_size=len(self.x_train) if self.x_train is not None else None)
        # The bounded queue: a fixed pool of receive buffers. When none is free the server stops
        # matching pushes, the attackers' Issends stay incomplete and they wait (back-pressure).
        self.queue_size = max(2, len(self.attackers))
        self.free = [wire.Message(self.layout.max_bytes) for _ in range(self.queue_size)]
        self.queue: collections.deque[tuple[wire.Message, int]] = collections.deque()
        self.params_out = {r: wire.Message(self.n_state * 4) for r in self.attackers}
        self.control_in = wire.Message(0)
        self.control_out = {r: wire.Message(0) for r in self.attackers}
        self.waiting_send: set[int] = set()
        self.sent_version = {r: -1 for r in self.attackers}
        self._flat_cache: tuple[int, np.ndarray] | None = None
        self.done: set[int] = set()
        self.policy = StalenessPolicy(self.mode, cfg.max_staleness, len(self.attackers), lr_damping=cfg.lr_damping)
        self.gradients = GradientPushes.of(trainer) if self.mode == "gradients" else None
        # Counters that survive a resume (checkpoint state "mpi", with the policy's totals).
        self.totals = {"pushes": 0, "rejected_invalid": 0, "drained": 0, "push_bytes": 0, "param_bytes": 0,
                       "examples_received": 0}
        self.streams = {r: (-1, -1) for r in self.attackers}
        if checkpoint is not None:
            with restoring(checkpoint.path):
                self._restore(checkpoint)
        self.produced = collections.Counter()  # examples received per attacker (this session)
        self.compute_s = collections.Counter()  # attacker compute seconds (from the push headers)
        self.time = {"busy": 0.0, "wait": 0.0, "eval": 0.0, "checkpoint": 0.0}
        self._window = self._window_start()
        self._max_compute = 0.0
        self.eval_model: torch.nn.Module | None = None
        self.eval_job = None  # (AccuracyJob, version, time at that version, examples seen)

    # --- resume --------------------------------------------------------------------------------
    def _restore(self, ckpt) -> None:
        saved = ckpt.state.get("mpi") or {}
        for key in self.totals:
            if key in saved:
                self.totals[key] = int(saved[key])
        self.policy.restore(saved, ckpt.extra.get("staleness_hist"))
        streams = saved.get("attacker_streams")
        if streams and len(streams) == len(self.attackers) and saved.get("push") == self.mode:
            self.streams = {r: tuple(streams[i]) for i, r in enumerate(self.attackers)}

    # --- sending parameters ------------------------------------------------------------------
    def _flat(self) -> np.ndarray:
        version = self.trainer.version
        if self._flat_cache is None or self._flat_cache[0] != version:
            self._flat_cache = (version, flat_state(self.trainer.model).cpu().numpy())
            if self.gradients is not None:  # delay compensation needs the weights each push was made with
                self.gradients.sent(version, self._flat_cache[1])
        return self._flat_cache[1]

    def send_params(self, rank: int) -> None:
        """Start sending the current parameters to ``rank``, or as soon as its buffer is free."""
        msg = self.params_out[rank]
        if msg.busy():
            self.waiting_send.add(rank)
            return
        self.waiting_send.discard(rank)
        epoch, position = self.streams[rank] if self.sent_version[rank] < 0 else (-1, -1)
        msg.set_header(wire.PARAMS, self.trainer.version, sender=0, progress=self.trainer.progress(),
                       nbytes=self.n_state * 4, epoch=epoch, position=position)
        wire.float_view(msg, self.n_state)[:] = self._flat()
        msg.request = self.comm.Isend([msg.buf[:msg.message_bytes()], self.MPI.BYTE], dest=rank, tag=wire.TAG_PARAMS)
        self.sent_version[rank] = self.trainer.version
        self.totals["param_bytes"] += msg.message_bytes()

    def refresh(self, ranks=None) -> None:
        for r in ranks if ranks is not None else self.attackers:
            if self.sent_version[r] < self.trainer.version:
                self.send_params(r)

    # --- receiving ---------------------------------------------------------------------------
    def poll(self, accept: bool = True) -> bool:
        """Receive pushes into free queue buffers, control messages; start waiting parameter sends.

        With ``accept=False`` (shutting down) pushes are received and dropped.
        """
        MPI, comm, status = self.MPI, self.comm, self.MPI.Status()
        got = False
        while self.free and comm.Iprobe(source=MPI.ANY_SOURCE, tag=wire.TAG_PUSH, status=status):
            src, nbytes = status.Get_source(), status.Get_count(MPI.BYTE)
            msg = self.free.pop()
            buf = msg.buf if nbytes <= msg.capacity else np.empty(nbytes, dtype=np.uint8)
            comm.Recv([buf, MPI.BYTE], source=src, tag=wire.TAG_PUSH)
            got = True
            self.totals["push_bytes"] += nbytes
            problem = "larger than any valid push" if buf is not msg.buf else wire.validate_push(
                msg, nbytes, src, layout=self.layout, batch_size=self.cfg.batch_size, version=self.trainer.version,
                num_classes=self.num_classes)
            if problem is not None:
                self.free.append(msg)
                self.totals["rejected_invalid"] += 1
                print(f"psadv: warning: rank 0: rejected a push from rank {src}: {problem}", file=sys.stderr,
                      flush=True)
                self.trainer.metrics.write("rejected", version=self.trainer.version, sender=src, reason=problem)
                if self.mode == "sync" and accept:  # it waits for parameters before computing again
                    self.send_params(src)
                continue
            h = msg.header
            count = int(h[wire.COUNT])
            self.totals["pushes"] += 1
            self.totals["examples_received"] += count
            self.produced[src] += count
            self._window["produced"][src] += count
            self.compute_s[src] += int(h[wire.COMPUTE_US]) / 1e6
            self._window["compute"][src] += int(h[wire.COMPUTE_US]) / 1e6
            self._max_compute = max(self._max_compute, int(h[wire.COMPUTE_US]) / 1e6)
            self.streams[src] = (int(h[wire.EPOCH]), int(h[wire.POSITION]))
            if accept:
                self.queue.append((msg, src))
            else:
                self.totals["drained"] += 1
                self.free.append(msg)
        while comm.Iprobe(source=MPI.ANY_SOURCE, tag=wire.TAG_CONTROL, status=status):
            src = status.Get_source()
            comm.Recv([self.control_in.buf, MPI.BYTE], source=src, tag=wire.TAG_CONTROL)
            kind = int(self.control_in.header[wire.KIND])
            if kind == wire.SIGNAL and self.signals.forwarded is None:
                self.signals.forwarded = int(self.control_in.header[wire.COUNT])
            elif kind == wire.DONE:
                self.done.add(src)
            got = True
        for r in list(self.waiting_send):
            if not self.params_out[r].busy():
                self.send_params(r)
        return got

    # --- using a push --------------------------------------------------------------------------
    def use(self, msg: wire.Message, src: int) -> bool:
        """Train on one queued push, as the staleness policy says; True when the model version advanced."""
        trainer, h = self.trainer, msg.header
        verdict = self.policy.judge(trainer.version, int(h[wire.VERSION]))
        if not verdict.accepted:
            self.refresh([src])
            return False
        self._window["tau"].append(verdict.tau)
        count = int(h[wire.COUNT])
        if self.mode == "examples":
            x, y = self.layout.views(msg, count)
            x = torch.from_numpy(x).to(self.trainer.device, torch.float32)
            y = torch.from_numpy(y).to(self.trainer.device, torch.int64)
            refining = self.refines and verdict.tau > 0
            clean = None
            if self.x_train is not None and (refining or self.cfg.grad_align):
                clean = torch.from_numpy(self.x_train[self.layout.indices(msg, count)]).to(self.trainer.device)
            if refining:
                with trainer.autocast():
                    refining_attack = refine_attack(trainer.training_attack(), self.cfg.refine_steps,
                                                    self.cfg.refine_step_ratio)
                    x = refine(trainer.model, clean, y, refining_attack, start=x)
            out = trainer.step(x, y, clean=clean)
            self._note_batch(out["loss"], out["acc"], out["grad_align"])
            return True
        # a gradient's batch statistics come in its header: the loss the attacker differentiated
        penalty = wire.get_float(h, wire.PENALTY)
        self._note_batch(wire.get_float(h, wire.LOSS), wire.get_float(h, wire.ACCURACY),
                         None if math.isnan(penalty) else penalty)
        if self.mode == "gradients":
            grads, buffers = self.layout.split(torch.from_numpy(self.layout.values(msg)))
            return self.gradients.apply(grads, buffers, count, int(h[wire.VERSION]), verdict.lr_scale)
        else:  # the receive buffer goes back to the pool: the policy keeps a copy until the round is complete
            step = self.policy.add_sync(src, torch.from_numpy(self.layout.values(msg)).clone(), count)
            if step is None:
                return False
            trainer.apply_gradients(*self.layout.split(step.gradient), step.examples)
        return True

    # --- metrics -------------------------------------------------------------------------------
    def _note_batch(self, loss: float, acc: float, penalty: float | None) -> None:
        """One applied batch's loss, adversarial accuracy and GradAlign penalty, for the window's means."""
        win = self._window
        win["loss"] += loss
        win["acc"] += acc
        win["batches"] += 1
        if penalty is not None:
            win["align"].append(penalty)

    def _window_start(self) -> dict:
        return {"t": time.perf_counter(), "examples": self.trainer.state.examples_seen,
                "produced": collections.Counter(), "compute": collections.Counter(), "tau": [], "loss": 0.0, "acc": 0.0,
                "batches": 0, "align": [], "busy": self.time["busy"], "wait": self.time["wait"]}

    def _log(self, out_lr: float | None) -> float:
        trainer, win = self.trainer, self._window
        now = time.perf_counter()
        dt = max(now - win["t"], 1e-9)
        consumed = trainer.state.examples_seen - win["examples"]
        busy, wait = self.time["busy"] - win["busy"], self.time["wait"] - win["wait"]
        taus = win["tau"]
        own = dict(push=self.mode, produced_per_s={str(r): round(win["produced"][r] / dt, 1) for r in self.attackers},
                   utilization=round(busy / max(busy + wait, 1e-9), 4),
                   **window_stats(taus),
                   rejected_stale=self.policy.rejected_stale, rejected_invalid=self.totals["rejected_invalid"],
                   queue=len(self.queue))
        if win["batches"]:
            own.update(loss=win["loss"] / win["batches"], adv_acc=win["acc"] / win["batches"],
                       **grad_align_field(win["align"]))
        trainer.check_finite()  # gradients and sync mode compute no loss here: watch the weights
        row = trainer.log_train(lr=out_lr, attack=trainer.training_attack(), rate=consumed / dt, **own)
        for r in self.attackers:  # per attacker: examples/s it produced, and the share of time it computed
            trainer.metrics.write("attacker", version=trainer.version, time=row["time"], rank=r,
                                  examples_per_s=round(win["produced"][r] / dt, 1),
                                  busy=round(min(1.0, win["compute"][r] / dt), 4))
        self._window = self._window_start()
        return consumed / dt

    def staleness_summary(self) -> dict:
        t = self.totals
        elapsed = max(sum(self.time.values()), 1e-9)
        busy_wait = max(self.time["busy"] + self.time["wait"], 1e-9)
        consumed = max(self.trainer.state.examples_seen, 1)
        return {
            "push": self.mode, "attackers": len(self.attackers), **self.policy.summary(),
            "pushes": t["pushes"], "rejected_invalid": t["rejected_invalid"], "drained": t["drained"],
            # of every push received (valid or not), the share that never reached the model as rejected
            "rejected_fraction": round((self.policy.rejected_stale + t["rejected_invalid"]) /
                                       max(1, t["pushes"] + t["rejected_invalid"]), 4),
            "utilization": round(self.time["busy"] / busy_wait, 4),
            "server_seconds": {k: round(v, 3) for k, v in self.time.items()},
            "session_seconds": round(elapsed, 3),
            "produced_examples": {str(r): int(self.produced[r]) for r in self.attackers},
            "attacker_compute_seconds": {str(r): round(self.compute_s[r], 3) for r in self.attackers},
            "push_bytes_per_example": round(t["push_bytes"] / max(1, t["examples_received"]), 1),
            "wire_bytes_per_example": round((t["push_bytes"] + t["param_bytes"]) / consumed, 1),
            "wire_dtype": self.cfg.wire_dtype,
        }

    # --- evaluation without stalling the attackers ------------------------------------------------
    def start_evaluation(self) -> None:
        """Evaluate a snapshot of the current (graded) model in small pieces between training steps, so the
        server keeps consuming pushes (and the attackers keep producing) while it evaluates."""
        while self.eval_job is not None:  # the previous one is still running: finish it first
            self.eval_step()
        trainer = self.trainer
        if self.eval_model is None:
            self.eval_model = build_model(self.cfg.model, **trainer.model_args).to(trainer.device)
        load_flat_state_(self.eval_model, flat_state(trainer.graded_model))
        self.eval_job = (trainer.slice_accuracy_job(self.eval_model, batch_size=EVAL_PIECE), trainer.version,
                         trainer.elapsed(), trainer.state.examples_seen)

    def eval_step(self) -> bool:
        """Evaluate one piece of the running evaluation; True when it finished (and was logged)."""
        start = time.perf_counter()
        job, version, at, examples = self.eval_job
        job.step()
        if job.done:
            self.trainer.record_eval(job.result(), version, at, examples)
            self.eval_job = None
        self.time["eval"] += time.perf_counter() - start
        return self.eval_job is None

    def measure_final(self, interrupted) -> bool:
        """Finish the periodic evaluation still running, then measure the graded model of the last
        version unless that one did; False as soon as ``interrupted()``."""
        while self.eval_job is not None:  # eval_step counts its own time
            if interrupted():
                return False
            self.eval_step()
        start = time.perf_counter()
        measured = self.trainer.measure_final(interrupted)
        self.time["eval"] += time.perf_counter() - start
        return measured

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self):
        start = time.perf_counter()
        n_train = max(1, self.trainer.batches_per_epoch * self.cfg.batch_size *
                      push_mode(self.mode).batches_per_version(self.cfg.accumulate, len(self.attackers)))
        mpi_state = {"push": self.mode, "attackers": len(self.attackers), **self.totals, **self.policy.state(),
                     "attacker_streams": [list(self.streams[r]) for r in self.attackers]}
        # data_stream lets the single-process trainer resume an MPI run (from the epoch start).
        epoch = int(self.trainer.state.examples_seen // n_train)
        path = self.trainer.save(extra={"staleness_hist": self.policy.hist},
                                 extra_state={"mpi": mpi_state, "data_stream": {"epoch": epoch, "position": 0}})
        self.time["checkpoint"] += time.perf_counter() - start
        return path

    # --- the loop ------------------------------------------------------------------------------
    def stop_reason(self) -> str | None:
        name = self.signals.name()
        return f"signal {name}" if name else self.trainer.stop_reason()

    def run(self) -> dict:
        trainer, cfg = self.trainer, self.cfg
        bar = ProgressBar(trainer, "server", self.show_progress)
        self.refresh()
        backoff = Backoff(cap=push_mode(self.mode).poll_cap)
        reason = self.stop_reason()
        lr = None
        while reason is None:
            t0 = time.perf_counter()
            got = self.poll()
            if not self.queue:
                if self.eval_job is not None:  # nothing to train on: get on with the evaluation
                    self.eval_step()
                    reason = self.stop_reason()
                    continue
                if not got:
                    backoff.wait()
                self.time["wait"] += time.perf_counter() - t0
                reason = self.stop_reason()
                continue
            backoff.reset()
            msg, src = self.queue.popleft()
            advanced = self.use(msg, src)
            self.free.append(msg)
            self.time["busy"] += time.perf_counter() - t0
            if advanced:
                lr = self.trainer.optimizer.param_groups[0]["lr"]
                bar.advanced()
                if self.mode == "sync" or trainer.due(cfg.refresh_every):
                    self.refresh()
                if trainer.due(cfg.log_every):
                    bar.show(self._log(lr))
                if trainer.due(cfg.eval_every):
                    self.start_evaluation()
                if self.eval_job is not None and self.eval_step():
                    bar.show()
            # after every push, applied or not: under steady rejection a signal must not wait
            reason = self.stop_reason()
            if advanced and trainer.due(cfg.checkpoint_every) and reason is None:
                self.save()
        bar.close()
        stop_requests = self.send_stop()

        def wind_down() -> dict:
            # after the checkpoint and the final evaluation: the server owns the model, so it saves
            # it before it waits on any attacker
            try:
                self.wind_down(stop_requests)
            except AttackersUnresponsive as exc:
                trainer.finish(reason, extra_summary={**self.staleness_summary(), "unfinished_attackers": exc.ranks})
                raise AttackersUnresponsive(exc.ranks, f"{exc}; checkpoint {trainer.manager.latest()} is saved, "
                                            f"--resume {trainer.run_dir} continues the run") from None
            return self.staleness_summary()

        return trainer.end_run(reason, self.save, self.signals, measure=self.measure_final, summary=wind_down)

    def send_stop(self) -> list:
        """Stop taking pushes and send STOP to every attacker (without waiting)."""
        self.waiting_send.clear()
        for msg, _ in self.queue:  # queued but never used: in-flight examples are lost
            self.totals["drained"] += 1
            self.free.append(msg)
        self.queue.clear()
        requests = []
        for r in self.attackers:
            msg = self.control_out[r]
            msg.set_header(wire.STOP, self.trainer.version, sender=0)
            requests.append(self.comm.Isend([msg.buf[:wire.HEADER_BYTES], self.MPI.BYTE], dest=r, tag=wire.TAG_CONTROL))
        return requests

    def wind_down(self, stop_requests: list) -> None:
        """Drain what is in flight until every attacker has said DONE, so every rank can finalize;
        an attacker that does not answer in time (hung, stopped) ends the wait."""
        limit = WIND_DOWN_SECONDS + 5 * self._max_compute
        deadline = time.perf_counter() + limit
        backoff = Backoff()

        def settled() -> bool:
            return (len(self.done) == len(self.attackers) and all(req.Test() for req in stop_requests)
                    and not any(self.params_out[r].busy() for r in self.attackers))

        while not settled():
            if not self.poll(accept=False):
                backoff.wait()
            if time.perf_counter() > deadline:
                missing = sorted(set(self.attackers) - self.done)
                raise AttackersUnresponsive(missing or self.attackers,
                                            f"attacker{'s' if len(missing) != 1 else ''} "
                                            f"{', '.join(map(str, missing)) or '(parameter sends)'} did not "
                                            f"finish within {limit:.0f}s after STOP")
        self.poll(accept=False)
        self.say_bye()

    def say_bye(self) -> None:
        """BYE to every attacker, which has said DONE and waits for it: the run has ended."""
        requests = []
        for r in self.attackers:
            msg = self.control_out[r]
            msg.set_header(wire.BYE, self.trainer.version, sender=0)
            requests.append(self.comm.Isend([msg.buf[:wire.HEADER_BYTES], self.MPI.BYTE], dest=r, tag=wire.TAG_CONTROL))
        self.MPI.Request.Waitall(requests)  # header-only messages: sent eagerly, at once


class AttackersUnresponsive(PsadvError):
    """Attackers did not answer STOP in time; the job must be ended from rank 0."""

    def __init__(self, ranks: list[int], message: str):
        super().__init__(message)
        self.ranks = ranks
