"""LiteRT (TFLite) backend of the backbone runner: interpreter loading, spec metadata, fixed-batch signatures.

Why this shape:

* The interpreter comes from ``ai-edge-litert`` (current, numpy 2) and falls back to
  ``tflite-runtime`` (stopped at 2.14, numpy < 2) for old device images; both are imported lazily so
  an ONNX-only device never needs either.
* The model spec travels inside the ``.tflite`` file as TFLite model metadata ``fedge.spec`` (the same
  JSON the ONNX file carries), so a device learns context/feature size from the file it runs. Neither
  interpreter exposes model metadata, so :func:`read_metadata` walks the flatbuffer itself (a few
  bounds-checked reads of the schema's ``Model.metadata`` and ``Model.buffers``); this works with
  either runtime and with no flatbuffers package.
* litert-torch cannot lower the backbone with a symbolic batch dimension, so ``export/tflite_export.py``
  writes one signature per fixed batch size (``batch_1``, ``batch_8``, ``batch_32``; the weights are
  shared, the file grows ~7 %). :class:`LiteRTBackbone` splits N rows greedily into the largest batches
  that fit (no padding when a batch-1 signature exists) and pads only for files without one. A file
  with a dynamic batch (shape signature -1, e.g. from another converter) is resized instead.
"""

from __future__ import annotations

import importlib
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("fedge.runtime")

TFLITE_MAGIC = b"TFL3"  # flatbuffer file identifier at bytes 4..8 of every .tflite file
OUTPUTS = ("features", "loc", "scale")


class TFLiteFormatError(ValueError):
    """The bytes are not a well-formed TFLite flatbuffer (truncated, corrupt or another format)."""


def is_tflite(path: str | Path) -> bool:
    """True when the file carries the TFLite flatbuffer identifier (whatever its suffix)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[4:8] == TFLITE_MAGIC


# --------------------------------------------------------------------------- flatbuffer metadata


class _Table:
    """Just enough of the flatbuffer wire format to read tables, vectors and strings, with every
    offset checked against the buffer so a corrupt file raises TFLiteFormatError, not IndexError."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        vtable = pos - self._i32(pos)
        self.vt_len = self._u16(vtable)
        self.vtable = vtable

    def check_span(self, pos: int, size: int) -> None:
        if pos < 0 or pos + size > len(self.buf):
            raise TFLiteFormatError(f"offset {pos}+{size} outside the {len(self.buf)}-byte file")

    def _u16(self, pos: int) -> int:
        self.check_span(pos, 2)
        return struct.unpack_from("<H", self.buf, pos)[0]

    def _u32(self, pos: int) -> int:
        self.check_span(pos, 4)
        return struct.unpack_from("<I", self.buf, pos)[0]

    def _i32(self, pos: int) -> int:
        self.check_span(pos, 4)
        return struct.unpack_from("<i", self.buf, pos)[0]

    def field(self, index: int) -> int | None:
        """Absolute position of field `index`, or None when the field is absent."""
        slot = 4 + 2 * index
        if slot + 2 > self.vt_len:
            return None
        off = self._u16(self.vtable + slot)
        return self.pos + off if off else None

    def _deref(self, index: int) -> int | None:
        at = self.field(index)
        return None if at is None else at + self._u32(at)

    def scalar(self, index: int, fmt: str, default: int = 0) -> int:
        at = self.field(index)
        if at is None:
            return default
        self.check_span(at, struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, at)[0]

    def bytes_(self, index: int) -> bytes | None:
        """A [ubyte] vector or a string field."""
        at = self._deref(index)
        if at is None:
            return None
        n = self._u32(at)
        self.check_span(at + 4, n)
        return self.buf[at + 4 : at + 4 + n]

    def tables(self, index: int) -> list[_Table]:
        at = self._deref(index)
        if at is None:
            return []
        n = self._u32(at)
        self.check_span(at + 4, 4 * n)
        return [_Table(self.buf, p + self._u32(p)) for p in (at + 4 + 4 * i for i in range(n))]


# schema.fbs field indices: Model{version, operator_codes, subgraphs, description, buffers,
# metadata_buffer, metadata, ...}; Metadata{name, buffer}; Buffer{data, offset, size}
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6


def read_metadata(data: bytes) -> dict[str, bytes]:
    """Named metadata buffers of a TFLite model (``Model.metadata``), e.g. ``{"fedge.spec": b"{...}"}``.
    Buffers stored outside the flatbuffer (``offset``/``size``, used by >2 GB models) are followed too."""
    if len(data) < 8 or data[4:8] != TFLITE_MAGIC:
        raise TFLiteFormatError("not a TFLite flatbuffer (identifier 'TFL3' missing)")
    try:
        model = _Table(data, struct.unpack_from("<I", data, 0)[0])
        buffers = model.tables(_MODEL_BUFFERS)
        out = {}
        for md in model.tables(_MODEL_METADATA):
            name = (md.bytes_(0) or b"").decode("utf-8", "replace")
            index = md.scalar(1, "<I")
            if index >= len(buffers):
                raise TFLiteFormatError(f"metadata {name!r} points at buffer {index} of {len(buffers)}")
            buf = buffers[index]
            offset, size = buf.scalar(1, "<Q"), buf.scalar(2, "<Q")
            if offset > 1:
                buf.check_span(offset, size)
                out[name] = data[offset : offset + size]
            else:
                out[name] = buf.bytes_(0) or b""
        return out
    except struct.error as exc:
        raise TFLiteFormatError(f"corrupt flatbuffer: {exc}") from None


# --------------------------------------------------------------------------- interpreter


def load_interpreter_class() -> tuple[Any, str]:
    """(Interpreter class, "package version"): ai-edge-litert first, tflite-runtime for old images."""
    from importlib.metadata import PackageNotFoundError, version

    candidates = (("ai-edge-litert", "ai_edge_litert.interpreter"), ("tflite-runtime", "tflite_runtime.interpreter"))
    for package, module in candidates:
        try:
            interpreter = importlib.import_module(module)
        except ImportError:
            continue
        try:
            return interpreter.Interpreter, f"{package} {version(package)}"
        except PackageNotFoundError:
            return interpreter.Interpreter, package
    raise ImportError("no LiteRT interpreter installed: pip install 'fedge[litert]' (ai-edge-litert), or "
                      "'fedge[tflite]' (tflite-runtime, numpy < 2)")


def litert_available() -> bool:
    """Whether this device can run .tflite backbones at all (used to skip them in bundle checks)."""
    try:
        load_interpreter_class()
    except ImportError:
        return False
    return True


class LiteRTBackbone:
    """A .tflite backbone behind the same call the ONNX session offers: rows (n, L) -> features, loc, scale.

    Raises ValueError (wrapped by the runner into ModelLoadError) when the file cannot be used."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        interpreter_cls, self.version = load_interpreter_class()
        data = path.read_bytes()
        self.metadata = {k: v.decode("utf-8", "replace") for k, v in read_metadata(data).items()}
        interp = interpreter_cls(model_content=data, num_threads=max(1, threads))
        self._interp = interp
        sigs = interp.get_signature_list()
        if not sigs:
            raise TFLiteFormatError("the model has no signatures (inputs/outputs by name)")
        self._runners: dict[int, Any] = {}
        self.dynamic = False
        for key, io in sigs.items():
            if io.get("inputs") != ["context"] or not set(OUTPUTS) <= set(io.get("outputs", [])):
                raise TFLiteFormatError(f"signature {key!r} has inputs {io.get('inputs')} and outputs "
                                        f"{io.get('outputs')}, expected context -> {', '.join(OUTPUTS)}")
            runner = interp.get_signature_runner(key)
            shape = runner.get_input_details()["context"]["shape_signature"]
            if shape[0] < 0:
                self.dynamic = True
            self._runners[int(shape[0])] = runner
        self.batches = sorted(b for b in self._runners if b > 0)

    def _call(self, batch: int, x: np.ndarray) -> list[np.ndarray]:
        out = self._runners[batch](context=x)
        return [np.asarray(out[k]) for k in OUTPUTS]

    def run(self, x: np.ndarray, batch_size: int) -> list[list[np.ndarray]]:
        """[features, loc, scale] per piece of x, covering every row once, in order."""
        if self.dynamic:
            return [self._call(-1, x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        usable = [b for b in self.batches if b <= batch_size] or self.batches[:1]
        parts, i = [], 0
        while i < len(x):
            left = len(x) - i
            fits = [b for b in usable if b <= left]
            b = fits[-1] if fits else usable[0]
            chunk = x[i : i + b]
            if len(chunk) < b:  # no signature small enough: pad with copies of the last row, drop them after
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), axis=0)])
            parts.append([a[: min(b, left)] for a in self._call(b, chunk)])
            i += b
        return parts

