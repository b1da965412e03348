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
``GRADIENTS``      TAG_PUSH    the flat parameter gradient (float32), for ``count`` examples
``STOP``           TAG_CONTROL none (server -> attacker: finish the batch, drain, send DONE)
``DONE``           TAG_CONTROL none (attacker -> server: nothing of mine is in flight any more)
``SIGNAL``         TAG_CONTROL none (attacker -> server: I caught SIGTERM/SIGUSR1/SIGINT;
                               ``COUNT`` holds the signal number)
=================  ==========  ==============================================================

Header fields (indices into the int64 header): ``KIND``, ``VERSION`` (the model version the
parameters are / the push was computed with), ``COUNT`` (examples), ``SENDER`` (rank),
``PROGRESS`` (training progress in [0, 1] as a fixed-point integer, so attackers follow the
server's ε ramp and attack-steps schedule), ``DTYPE`` (0 float32, 1 float16), ``NBYTES`` (payload
bytes), ``SEQ`` (the sender's message counter), ``EPOCH``/``POSITION`` (the sender's data stream
position after this batch; in the first PARAMS message: where a resumed attacker continues,
-1 = from the start).
"""

from __future__ import annotations

import numpy as np

# --- tags ------------------------------------------------------------------------------------
TAG_PARAMS = 101
TAG_PUSH = 102
TAG_CONTROL = 103

# --- message kinds ---------------------------------------------------------------------------
PARAMS, EXAMPLES, GRADIENTS, STOP, DONE, SIGNAL = 1, 2, 3, 4, 5, 6
KIND_NAMES = {PARAMS: "params", EXAMPLES: "examples", GRADIENTS: "gradients", STOP: "stop", DONE: "done",
              SIGNAL: "signal"}

# --- header layout ---------------------------------------------------------------------------
HEADER_LEN = 16
HEADER_BYTES = HEADER_LEN * 8
KIND, VERSION, COUNT, SENDER, PROGRESS, DTYPE, NBYTES, SEQ, EPOCH, POSITION, COMPUTE_US = range(11)
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
                   dtype: int = 0, nbytes: int = 0, seq: int = 0, epoch: int = -1, position: int = -1) -> None:
        h = self.header
        h[:] = 0
        h[KIND], h[VERSION], h[COUNT], h[SENDER] = kind, version, count, sender
        h[PROGRESS] = int(round(min(max(progress, 0.0), 1.0) * PROGRESS_SCALE))
        h[DTYPE], h[NBYTES], h[SEQ], h[EPOCH], h[POSITION] = dtype, nbytes, seq, epoch, position

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


# --- layouts of the payloads -------------------------------------------------------------------
class ExampleLayout:
    """Where ``count`` examples of ``shape`` and their labels sit in an EXAMPLES payload."""

    def __init__(self, shape: tuple[int, ...], batch_size: int, wire_dtype: str):
        self.shape = tuple(shape)
        self.batch_size = batch_size
        self.dtype_code = DTYPES[wire_dtype]
        self.dtype = np.dtype(NP_DTYPES[self.dtype_code])
        self.per_example = int(np.prod(self.shape))
        self.max_bytes = self.nbytes(batch_size)

    def x_bytes(self, count: int) -> int:
        return _align8(count * self.per_example * self.dtype.itemsize)

    def nbytes(self, count: int) -> int:
        return self.x_bytes(count) + _align8(count * np.dtype(LABEL_DTYPE).itemsize)

    def pack(self, msg: Message, x: np.ndarray, y: np.ndarray) -> int:
        count = len(y)
        xb = self.x_bytes(count)
        payload = msg.payload()
        payload[:xb].view(self.dtype)[:x.size] = x.reshape(-1)
        payload[xb:xb + count * 4].view(LABEL_DTYPE)[:] = y
        return self.nbytes(count)

    def views(self, msg: Message, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(x as float32-or-float16 array of shape (count, *shape), y as int32) inside ``msg``."""
        xb = self.x_bytes(count)
        payload = msg.payload()
        x = payload[:xb].view(self.dtype)[:count * self.per_example].reshape(count, *self.shape)
        y = payload[xb:xb + count * 4].view(LABEL_DTYPE)
        return x, y


def float_view(msg: Message, n: int) -> np.ndarray:
    """The first ``n`` float32 values of the payload (PARAMS and GRADIENTS)."""
    return msg.payload(n * 4).view(np.float32)


def validate_push(msg: Message, nbytes_received: int, source: int, *, expected_kind: int, batch_size: int,
                  version: int, layout: ExampleLayout | None, n_grad: int, num_classes: int) -> str | None:
    """Why a received push is malformed (shape, dtype, size, values), or None if it is fine.

    NaN/Inf anywhere, pixels outside [0, 1] or labels out of range are rejected here, so a bad push
    never reaches the model.
    """
    h = msg.header
    if nbytes_received < HEADER_BYTES:
        return f"message of {nbytes_received} bytes is shorter than the header"
    kind, count = int(h[KIND]), int(h[COUNT])
    if kind != expected_kind:
        return f"kind {KIND_NAMES.get(kind, kind)} where {KIND_NAMES[expected_kind]} was expected"
    if int(h[SENDER]) != source:
        return f"header names sender {int(h[SENDER])} but it came from rank {source}"
    if not 1 <= count <= batch_size:
        return f"count {count} outside 1..{batch_size}"
    if not 0 <= int(h[VERSION]) <= version:
        return f"version {int(h[VERSION])} outside 0..{version}"
    if kind == EXAMPLES:
        if int(h[DTYPE]) != layout.dtype_code:
            return f"dtype code {int(h[DTYPE])}, expected {layout.dtype_code} ({layout.dtype})"
        expected = layout.nbytes(count)
    else:
        if int(h[DTYPE]) != DTYPES["float32"]:
            return f"gradient dtype code {int(h[DTYPE])}, expected float32"
        expected = n_grad * 4
    if int(h[NBYTES]) != expected or nbytes_received != HEADER_BYTES + expected:
        return f"{nbytes_received - HEADER_BYTES} payload bytes (header says {int(h[NBYTES])}), expected {expected}"
    if kind == EXAMPLES:
        x, y = layout.views(msg, count)
        if not np.isfinite(x).all():
            return "non-finite values in the examples"
        if x.min() < 0.0 or x.max() > 1.0:
            return f"pixels outside [0, 1] (min {float(x.min()):g}, max {float(x.max()):g})"
        if y.min() < 0 or y.max() >= num_classes:
            return f"labels outside 0..{num_classes - 1}"
    elif not np.isfinite(float_view(msg, n_grad)).all():
        return "non-finite values in the gradient"
    return None
