"""The attacker role (MPI ranks 1..N-1): generate adversarial examples (or gradients) and push them.

An attacker holds a copy of the model at some version, draws batches from its shard of the
training set, attacks them with :func:`psadv.attacks.perturb` under the server's schedule
(progress travels in the PARAMS header), and pushes the result to the server with ``Issend``.
At most ``--max-in-flight`` pushes are outstanding; an ``Issend`` completes only once the
server has matched it, so an attacker can never run ahead of the server's bounded queue.
Between batches it picks up the newest parameters and looks for STOP. Waiting is ``Iprobe`` plus
an exponential back-off sleep, never a spin.
"""

from __future__ import annotations

import math
import time

import torch

from . import schedules, wire
from .attacks import PerturbationMemory, perturb, refine
from .augment import augment_batch
from .data import BatchStream, shard_indices
from .devices import autocast, training_layout
from .errors import CheckpointError
from .gradalign import training_loss
from .models import build_model, flat_state, float_buffers, load_flat_state_
from .mpi import Backoff, World
from .pushmodes import push_mode
from .stop import SignalFlag


class Attacker:
    def __init__(self, w: World, setup, train_set, device: torch.device, signals: SignalFlag):
        from mpi4py import MPI

        self.MPI = MPI
        self.w, self.comm, self.cfg = w, w.comm, setup.cfg
        self.device, self.signals = device, signals
        cfg = self.cfg
        self.mode = cfg.push
        self.attack_schedule = schedules.AttackSchedule(cfg)
        # its weights come from the server
        self.model = training_layout(build_model(cfg.model, **setup.model_args).to(device), cfg.precision)
        self.seed = cfg.seed + w.rank  # each attacker its own random starts, seeded as its loop starts
        self.params = list(self.model.parameters())
        self.buffers = float_buffers(self.model)
        self.n_state = flat_state(self.model).numel()
        self.x_train, self.y_train = train_set.x, train_set.y  # read-only arrays, indexed per batch
        self.layout = wire.push_layout(self.mode, shape=train_set.x.shape[1:], batch_size=cfg.batch_size,
                                       wire_dtype=cfg.wire_dtype, model=self.model,
                                       train_size=len(train_set) if wire.carries_indices(cfg) else None)
        self.slots = [wire.Message(self.layout.max_bytes) for _ in range(cfg.max_in_flight)]
        self.params_in = wire.Message(self.n_state * 4)
        self.control_in = wire.Message(0)
        self.control_out = wire.Message(0)
        shard = shard_indices(len(train_set), cfg.seed, w.rank - 1, w.n_attackers)
        self.stream = BatchStream(shard, cfg.batch_size, seed=cfg.seed + w.rank)
        # the shard's perturbations only live here: a resumed job starts its memory afresh
        self.memory = PerturbationMemory(len(train_set), train_set.x.shape[1:]) if cfg.reuse_perturbations else None
        self.version = -1  # no parameters yet
        self.progress = 0.0
        self.fresh = False  # a PARAMS message arrived since the last push (sync mode waits for one)
        self.pushes = 0
        self.stopping = False
        self.ended = False  # the server's BYE: the run is over
        self.signal_sent = False

    # --- receiving ------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Take in every pending PARAMS (the newest wins) and STOP; True if anything arrived."""
        MPI, comm, status = self.MPI, self.comm, self.MPI.Status()
        got = False
        while comm.Iprobe(source=0, tag=wire.TAG_PARAMS, status=status):
            comm.Recv([self.params_in.buf, MPI.BYTE], source=0, tag=wire.TAG_PARAMS, status=status)
            self._load_params(status.Get_count(MPI.BYTE))
            got = True
        while comm.Iprobe(source=0, tag=wire.TAG_CONTROL, status=status):
            comm.Recv([self.control_in.buf, MPI.BYTE], source=0, tag=wire.TAG_CONTROL)
            kind = int(self.control_in.header[wire.KIND])
            self.stopping = self.stopping or kind in (wire.STOP, wire.BYE)
            self.ended = self.ended or kind == wire.BYE
            got = True
        return got

    def _load_params(self, nbytes: int) -> None:
        h = self.params_in.header
        if int(h[wire.KIND]) != wire.PARAMS or nbytes != wire.HEADER_BYTES + self.n_state * 4:
            raise RuntimeError(f"malformed parameter message ({nbytes} bytes, kind {int(h[wire.KIND])})")
        first = self.version < 0
        version = int(h[wire.VERSION])
        if version < self.version:
            return
        load_flat_state_(self.model, torch.from_numpy(wire.float_view(self.params_in, self.n_state)).to(self.device))
        self.version = version
        self.progress = wire.progress_of(h)
        self.fresh = True
        if first and int(h[wire.EPOCH]) >= 0:  # a resumed run: continue the data stream
            try:
                self.stream.restore({"epoch": int(h[wire.EPOCH]), "position": int(h[wire.POSITION])})
            except CheckpointError:  # another batch size than before: start the shard afresh
                pass

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        torch.manual_seed(self.seed)  # the attack's random starts draw from torch's global generator
        backoff = Backoff(cap=push_mode(self.mode).poll_cap)
        while True:
            if self.poll():
                backoff.reset()
            if self.stopping:
                break
            self._forward_signal()
            slot = next((s for s in self.slots if not s.busy()), None)
            waiting_sync = self.mode == "sync" and not self.fresh
            if slot is None or self.version < 0 or waiting_sync:
                backoff.wait()
                continue
            self.push(slot)
            backoff.reset()
        self.finish()

    def _forward_signal(self) -> None:
        """A signal caught here is passed to the server, which checkpoints and stops the job."""
        if self.signals.signum is not None and not self.signal_sent:
            self.control_out.set_header(wire.SIGNAL, self.version, count=self.signals.signum, sender=self.w.rank)
            self.comm.Send([self.control_out.buf, self.MPI.BYTE], dest=0, tag=wire.TAG_CONTROL)
            self.signal_sent = True

    def push(self, slot: wire.Message) -> None:
        start = time.perf_counter()
        cfg = self.cfg
        self.pushes += 1
        position = self.stream.state()
        idx = self.stream.next()
        x = torch.from_numpy(augment_batch(cfg.augment, self.x_train[idx], cfg.seed, self.w.rank, position))
        x = x.to(self.device)
        y = torch.from_numpy(self.y_train[idx]).to(self.device)
        attack = self.attack_schedule.at(self.progress)
        memory = self.memory
        with autocast(cfg.precision, self.device):
            x_adv = perturb(self.model, x, y, attack,
                            start=memory.starts(torch.from_numpy(idx), x, attack) if memory else None)
        # (at ε = 0, the start of an ε ramp, there is nothing to refine)
        if cfg.refine_steps and cfg.refine_on == "attackers" and self.mode == "examples" and attack.eps > 0:
            x_adv = self._refine_fresh(x, y, x_adv, attack)
        if memory is not None:
            memory.remember(torch.from_numpy(idx), x, x_adv, attack)
        stats = None
        if self.mode == "examples":
            nbytes = self.layout.pack(slot, x_adv.detach().cpu().numpy().astype(self.layout.dtype, copy=False),
                                      y.cpu().numpy(), idx)
        else:
            self.model.train()
            with autocast(cfg.precision, self.device):
                loss, logits, penalty = training_loss(self.model, x_adv, y, clean=x, weight=cfg.grad_align,
                                                      eps=attack.eps, norm=attack.norm)
            grads = torch.autograd.grad(loss, self.params)
            nbytes = self.layout.pack(slot, [g.float().cpu().numpy() for g in grads],
                                      [b.detach().float().cpu().numpy() for b in self.buffers])
            stats = {wire.LOSS: loss.item(), wire.ACCURACY: (logits.argmax(1) == y).float().mean().item(),
                     wire.PENALTY: math.nan if penalty is None else penalty.item()}
        state = self.stream.state()
        slot.set_header(self.layout.kind, self.version, count=len(y), sender=self.w.rank, progress=self.progress,
                        dtype=self.layout.dtype_code, nbytes=nbytes, epoch=state["epoch"], position=state["position"])
        for field, value in (stats or {}).items():
            wire.set_float(slot.header, field, value)
        slot.header[wire.COMPUTE_US] = int((time.perf_counter() - start) * 1e6)
        slot.request = self.comm.Issend([slot.buf[:slot.message_bytes()], self.MPI.BYTE], dest=0, tag=wire.TAG_PUSH)
        self.fresh = False

    def _refine_fresh(self, x, y, x_adv, attack):
        """--refine-on attackers: take in the newest parameters, and if they are newer than those the
        batch was attacked with, refine its examples against them (guarded, as the server would); the
        push then carries that newer version, for which its examples are adversarial."""
        started = self.version
        self.poll()
        if self.version <= started:
            return x_adv
        with autocast(self.cfg.precision, self.device):
            return refine(self.model, x, y, schedules.refine_attack(attack, self.cfg.refine_steps,
                                                                     self.cfg.refine_step_ratio), start=x_adv)

    def finish(self) -> None:
        """After STOP: let every push in flight be matched (the server drains them), then DONE, then
        wait for the server's BYE. Until then this rank's command has not ended, so a stop signal
        (SIGTERM from SLURM while the server evaluates its final model) is caught and passed on,
        not the end of this rank: the job still exits 0, as the server does. A server that dies
        instead takes the job with it (MPI_Abort, or the launcher)."""
        backoff = Backoff()
        while any(s.busy() for s in self.slots):
            self.poll()
            self._forward_signal()
            backoff.wait()
        self.poll()
        self.control_out.set_header(wire.DONE, self.version, sender=self.w.rank)
        self.comm.Send([self.control_out.buf, self.MPI.BYTE], dest=0, tag=wire.TAG_CONTROL)
        backoff.reset()
        while True:
            if self.poll():
                backoff.reset()
            if self.ended:
                return
            self._forward_signal()
            backoff.wait()
