"""The MPI wire protocol of the parameter server: tags, header and buffers, in one place.

Every message is one preallocated, contiguous byte buffer sent with mpi4py's upper-case calls
(``Isend``/``Issend``/``Recv``/``Iprobe``/...), so nothing is ever pickled. A buffer starts with a
fixed header of :data:`HEADER_LEN` int64 values, followed by the payload:

=================  ==========  ==============================================================
message            tag         payload after the header
=================  ==========  ==============================================================
``PARAMS``         TAG_PARAMS  the model's float state (:func:`psadv.models.flat_state`), float32
``EXAMPLES``       TAG_PUSH    ``count`` adversarial examples (float32 or float16, see ``DTYPE``),
                               then ``count`` int32 labels
``GRADIENTS``      TAG_PUSH    float32: the gradient of every parameter (``model.parameters()``
                               order), then every floating-point buffer after the attacker's
                               forward pass (BatchNorm running statistics), for ``count`` examples
``STOP``           TAG_CONTROL none (server -> attacker: finish the batch, drain, send DONE)
``DONE``           TAG_CONTROL none (attacker -> server: nothing of mine is in flight any more)
``SIGNAL``         TAG_CONTROL none (attacker -> server: I caught SIGTERM/SIGUSR1/SIGINT;
                               ``COUNT`` holds the signal number)
``BYE``            TAG_CONTROL none (server -> attacker, after every DONE: the run has ended, exit)
=================  ==========  ==============================================================

Header fields (indices into the int64 header): ``KIND``, ``VERSION`` (the model version the
parameters are / the push was computed with), ``COUNT`` (examples), ``SENDER`` (rank),
``PROGRESS`` (training progress in [0, 1] as a fixed-point integer, so attackers follow the
server's ε ramp and attack-steps schedule), ``DTYPE`` (0 float32, 1 float16), ``NBYTES`` (payload
bytes), ``EPOCH``/``POSITION`` (the sender's data stream
position after this batch; in the first PARAMS message: where a resumed attacker continues,
-1 = from the start), ``COMPUTE_US`` (a push: the attacker's microseconds computing it).
A push of gradients also carries the statistics of the batch behind them, float64 values stored bit
for bit (:func:`set_float`, :func:`get_float`): ``LOSS`` (the loss the attacker differentiated),
``ACCURACY`` (its accuracy on the adversarial batch) and ``PENALTY`` (the GradAlign penalty, NaN
without one), so the server's train rows show the loss in every push mode.

The push payloads are laid out by :class:`ExampleLayout` and :class:`GradientLayout`, which both
sides use to pack, unpack, size and validate them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .pushmodes import push_mode

# --- tags ------------------------------------------------------------------------------------
TAG_PARAMS = 101
TAG_PUSH = 102
TAG_CONTROL = 103

# --- message kinds ---------------------------------------------------------------------------
PARAMS, EXAMPLES, GRADIENTS, STOP, DONE, SIGNAL, BYE = 1, 2, 3, 4, 5, 6, 7
KIND_NAMES = {PARAMS: "params", EXAMPLES: "examples", GRADIENTS: "gradients", STOP: "stop", DONE: "done",
              SIGNAL: "signal", BYE: "bye"}

# --- header layout ---------------------------------------------------------------------------
HEADER_LEN = 16
HEADER_BYTES = HEADER_LEN * 8
KIND, VERSION, COUNT, SENDER, PROGRESS, DTYPE, NBYTES, EPOCH, POSITION, COMPUTE_US, LOSS, ACCURACY, PENALTY = range(13)
PROGRESS_SCALE = 1 << 40

DTYPES = {"float32": 0, "float16": 1}
NP_DTYPES = {0: np.float32, 1: np.float16}
LABEL_DTYPE = np.int32


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class Message:
    """One preallocated message buffer: ``header`` (int64 view) and typed payload views."""

    def __init__(self, payload_bytes: int):
        self.capacity = HEADER_BYTES + _align8(payload_bytes)
        self.buf = np.zeros(self.capacity, dtype=np.uint8)
        self.header = self.buf[:HEADER_BYTES].view(np.int64)
        self.request = None  # the MPI request while this buffer is being sent

    def payload(self, nbytes: int | None = None) -> np.ndarray:
        end = self.capacity if nbytes is None else HEADER_BYTES + nbytes
        return self.buf[HEADER_BYTES:end]

    def set_header(self, kind: int, version: int = 0, count: int = 0, sender: int = 0, progress: float = 0.0,
                   dtype: int = 0, nbytes: int = 0, epoch: int = -1, position: int = -1) -> None:
        h = self.header
        h[:] = 0
        h[KIND], h[VERSION], h[COUNT], h[SENDER] = kind, version, count, sender
        h[PROGRESS] = int(round(min(max(progress, 0.0), 1.0) * PROGRESS_SCALE))
        h[DTYPE], h[NBYTES], h[EPOCH], h[POSITION] = dtype, nbytes, epoch, position

    def message_bytes(self) -> int:
        """Bytes to send: the header plus the payload the header announces."""
        return HEADER_BYTES + int(self.header[NBYTES])

    def busy(self) -> bool:
        """Is the buffer still being sent? (Tests the request; never blocks.)"""
        if self.request is None:
            return False
        if self.request.Test():
            self.request = None
            return False
        return True


def progress_of(header: np.ndarray) -> float:
    return float(header[PROGRESS]) / PROGRESS_SCALE


def set_float(header: np.ndarray, field: int, value: float) -> None:
    """Store a float64 in an int64 header field, bit for bit."""
    header[field:field + 1].view(np.float64)[0] = value


def get_float(header: np.ndarray, field: int) -> float:
    return float(header[field:field + 1].view(np.float64)[0])


# --- layouts of the payloads -------------------------------------------------------------------
class ExampleLayout:
    """Where ``count`` examples of ``shape`` and their labels sit in an EXAMPLES payload, and, with
    ``train_size`` (``--refine-steps``: the server continues stale attacks from the clean examples;
    ``--grad-align``: it regularises around them), their int32 indices into the training set after
    the labels."""

    kind = EXAMPLES

    def __init__(self, shape: tuple[int, ...], batch_size: int, wire_dtype: str, train_size: int | None = None):
        self.shape = tuple(shape)
        self.batch_size = batch_size
        self.train_size = train_size
        self.dtype_code = DTYPES[wire_dtype]
        self.dtype = np.dtype(NP_DTYPES[self.dtype_code])
        self.per_example = int(np.prod(self.shape))
        self.max_bytes = self.nbytes(batch_size)

    def x_bytes(self, count: int) -> int:
        return _align8(count * self.per_example * self.dtype.itemsize)

    def _int_bytes(self, count: int) -> int:
        return _align8(count * np.dtype(LABEL_DTYPE).itemsize)

    def nbytes(self, count: int) -> int:
        return self.x_bytes(count) + self._int_bytes(count) * (2 if self.train_size else 1)

    def pack(self, msg: Message, x: np.ndarray, y: np.ndarray, indices: np.ndarray | None = None) -> int:
        count = len(y)
        xb, ib = self.x_bytes(count), self._int_bytes(count)
        payload = msg.payload()
        payload[:xb].view(self.dtype)[:x.size] = x.reshape(-1)
        payload[xb:xb + count * 4].view(LABEL_DTYPE)[:] = y
        if self.train_size:
            payload[xb + ib:xb + ib + count * 4].view(LABEL_DTYPE)[:] = indices
        return self.nbytes(count)

    def views(self, msg: Message, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(x as float32-or-float16 array of shape (count, *shape), y as int32) inside ``msg``."""
        xb = self.x_bytes(count)
        payload = msg.payload()
        x = payload[:xb].view(self.dtype)[:count * self.per_example].reshape(count, *self.shape)
        y = payload[xb:xb + count * 4].view(LABEL_DTYPE)
        return x, y

    def indices(self, msg: Message, count: int) -> np.ndarray:
        """The examples' indices into the training set (only with ``train_size``)."""
        start = self.x_bytes(count) + self._int_bytes(count)
        return msg.payload()[start:start + count * 4].view(LABEL_DTYPE)

    def dtype_problem(self, code: int) -> str | None:
        return None if code == self.dtype_code else f"dtype code {code}, expected {self.dtype_code} ({self.dtype})"

    def values_problem(self, msg: Message, count: int, num_classes: int) -> str | None:
        x, y = self.views(msg, count)
        if not np.isfinite(x).all():
            return "non-finite values in the examples"
        if x.min() < 0.0 or x.max() > 1.0:
            return f"pixels outside [0, 1] (min {float(x.min()):g}, max {float(x.max()):g})"
        if y.min() < 0 or y.max() >= num_classes:
            return f"labels outside 0..{num_classes - 1}"
        if self.train_size:
            idx = self.indices(msg, count)
            if idx.min() < 0 or idx.max() >= self.train_size:
                return f"example indices outside 0..{self.train_size - 1}"
        return None


class GradientLayout:
    """A GRADIENTS payload, float32: the gradient of every parameter, then every floating-point
    buffer. The buffers travel because only a forward pass on data updates them (BatchNorm running
    statistics): the server copies the attacker's into its model."""

    kind = GRADIENTS
    dtype_code = DTYPES["float32"]

    def __init__(self, param_shapes: Sequence[tuple[int, ...]], buffer_shapes: Sequence[tuple[int, ...]]):
        self.param_shapes = [tuple(s) for s in param_shapes]
        self.buffer_shapes = [tuple(s) for s in buffer_shapes]
        self.size = sum(int(np.prod(s)) for s in self.param_shapes + self.buffer_shapes)
        self.max_bytes = self.size * 4

    @classmethod
    def of(cls, model) -> GradientLayout:
        """The layout of ``model``'s gradients and buffers (the same on both sides of the wire)."""
        from .models import float_buffers  # torch only where a model is at hand

        return cls([p.shape for p in model.parameters()], [b.shape for b in float_buffers(model)])

    def nbytes(self, count: int) -> int:
        return self.max_bytes  # one gradient, whatever the number of examples behind it

    def values(self, msg: Message) -> np.ndarray:
        """The whole payload as one float32 vector (a view into ``msg``)."""
        return float_view(msg, self.size)

    def pack(self, msg: Message, gradients: Sequence[np.ndarray], buffers: Sequence[np.ndarray]) -> int:
        flat = self.values(msg)
        offset = 0
        for a in (*gradients, *buffers):
            flat[offset:offset + a.size] = a.reshape(-1)
            offset += a.size
        if offset != self.size:
            raise ValueError(f"{offset} gradient and buffer values for a payload of {self.size}")
        return self.max_bytes

    def split(self, flat):
        """(gradients, buffers) as views of a flat vector laid out like the payload (numpy or torch)."""
        out, offset = [], 0
        for shape in self.param_shapes + self.buffer_shapes:
            n = int(np.prod(shape))
            out.append(flat[offset:offset + n].reshape(shape))
            offset += n
        return out[:len(self.param_shapes)], out[len(self.param_shapes):]

    def dtype_problem(self, code: int) -> str | None:
        return None if code == self.dtype_code else f"gradient dtype code {code}, expected float32"

    def values_problem(self, msg: Message, count: int, num_classes: int) -> str | None:
        if not np.isfinite(self.values(msg)).all():
            return "non-finite values in the gradient"
        loss, accuracy, penalty = (get_float(msg.header, f) for f in (LOSS, ACCURACY, PENALTY))
        # cross-entropy plus λ·(1 − cos) is finite and non-negative; the penalty lies in [0, 2] or is off (NaN)
        if not (np.isfinite(loss) and loss >= 0 and 0 <= accuracy <= 1 and (np.isnan(penalty) or 0 <= penalty <= 2)):
            return f"batch statistics out of range (loss {loss}, accuracy {accuracy}, GradAlign penalty {penalty})"
        return None


PushLayout = ExampleLayout | GradientLayout


def push_layout(mode: str, *, shape: tuple[int, ...], batch_size: int, wire_dtype: str, model,
                train_size: int | None = None) -> PushLayout:
    """The payload of a push in ``--push`` ``mode``: examples of ``shape`` (with their indices into
    a training set of ``train_size`` when given), or ``model``'s gradients."""
    if push_mode(mode).sends_examples:
        return ExampleLayout(shape, batch_size, wire_dtype, train_size)
    return GradientLayout.of(model)


def carries_indices(cfg) -> bool:
    """Whether pushes of examples name their clean originals by index into the training set: the
    server needs them to refine stale pushes itself (--refine-on server) and for --grad-align."""
    return push_mode(cfg.push).sends_examples and (bool(cfg.refine_steps and cfg.refine_on == "server")
                                                   or bool(cfg.grad_align))


def float_view(msg: Message, n: int) -> np.ndarray:
    """The first ``n`` float32 values of the payload (PARAMS and GRADIENTS)."""
    return msg.payload(n * 4).view(np.float32)


def validate_push(msg: Message, nbytes_received: int, source: int, *, layout: PushLayout, batch_size: int,
                  version: int, num_classes: int) -> str | None:
    """Why a received push is malformed (shape, dtype, size, values), or None if it is fine.

    NaN/Inf anywhere, pixels outside [0, 1], labels out of range or a gradient's batch statistics out
    of range are rejected here, so a bad push never reaches the model or the metrics.
    """
    h = msg.header
    if nbytes_received < HEADER_BYTES:
        return f"message of {nbytes_received} bytes is shorter than the header"
    kind, count = int(h[KIND]), int(h[COUNT])
    if kind != layout.kind:
        return f"kind {KIND_NAMES.get(kind, kind)} where {KIND_NAMES[layout.kind]} was expected"
    if int(h[SENDER]) != source:
        return f"header names sender {int(h[SENDER])} but it came from rank {source}"
    if not 1 <= count <= batch_size:
        return f"count {count} outside 1..{batch_size}"
    if not 0 <= int(h[VERSION]) <= version:
        return f"version {int(h[VERSION])} outside 0..{version}"
    problem = layout.dtype_problem(int(h[DTYPE]))
    if problem is not None:
        return problem
    expected = layout.nbytes(count)
    if int(h[NBYTES]) != expected or nbytes_received != HEADER_BYTES + expected:
        return f"{nbytes_received - HEADER_BYTES} payload bytes (header says {int(h[NBYTES])}), expected {expected}"
    return layout.values_problem(msg, count, num_classes)
