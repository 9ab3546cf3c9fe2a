"""msgpack codec of the wire: numpy arrays as an extension (dtype, shape, little-endian bytes), and
:func:`decode`, which turns every kind of bad input into one typed :class:`~edge_client.wire.errors.ProtocolError`.

A 12k-parameter float16 head costs 24 KB this way, not the ~70 KB a list of floats would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np
from pydantic import ValidationError

from edge_client.wire.errors import (
    InvalidMessage,
    MalformedMessage,
    NonFiniteValues,
    PayloadTooLarge,
    ProtocolError,
    RetiredMessageType,
    UnknownMessageType,
    UnsupportedSchema,
    WrongDtype,
    WrongShape,
)
from edge_client.wire.limits import ARRAY_EXT_CODE, DEFAULT_LIMITS, SCHEMA_VERSION, WIRE_DTYPES, Limits
from edge_client.wire.messages import ANY_MESSAGE, MESSAGE_TYPES, RETIRED_TYPES, Message


def pack_ext(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in WIRE_DTYPES:
            raise WrongDtype(f"cannot send dtype {obj.dtype.name}")
        le = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))
        return msgpack.ExtType(ARRAY_EXT_CODE, msgpack.packb([obj.dtype.name, list(obj.shape), le.tobytes()]))
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


# dtype name -> (little-endian wire dtype, native dtype), built once: a coordinator decodes thousands of arrays a second
_WIRE_DTYPES = {name: (np.dtype(name).newbyteorder("<"), np.dtype(name).newbyteorder("=")) for name in WIRE_DTYPES}


def ext_hook(limits: Limits) -> Callable[[int, bytes], np.ndarray]:
    def hook(code: int, data: bytes) -> np.ndarray:
        if code != ARRAY_EXT_CODE:
            raise MalformedMessage(f"unknown msgpack extension type {code}")
        try:
            dtype_name, shape, raw = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # any failure inside the extension is a malformed array
            raise MalformedMessage(f"malformed array extension: {exc}") from None
        if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
            raise WrongDtype(f"array dtype {dtype_name!r} is not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and 0 <= d <= limits.max_array_elements for d in shape)
        ):
            raise MalformedMessage(f"bad array shape {shape!r}")
        count = math.prod(shape)
        if count > limits.max_array_elements:
            raise PayloadTooLarge(f"array of {count} elements exceeds {limits.max_array_elements}")
        dtype, native = _WIRE_DTYPES[dtype_name]
        if not isinstance(raw, bytes) or len(raw) != count * dtype.itemsize:
            raise MalformedMessage(
                f"array data is {len(raw)} bytes, shape {shape} {dtype_name} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).astype(native, copy=True).reshape(shape)

    return hook


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Serialise a message; refuses to produce a payload the receiver would reject as oversized."""
    payload = msgpack.packb(msg.model_dump(mode="python"), default=pack_ext, use_bin_type=True)
    if len(payload) > limits.max_payload_bytes:
        raise PayloadTooLarge(f"{msg.type} message is {len(payload)} bytes, limit {limits.max_payload_bytes}")
    return payload


_ERROR_BY_PYDANTIC_TYPE: dict[str, type[ProtocolError]] = {
    "non_finite": NonFiniteValues,
    "finite_number": NonFiniteValues,
    "wrong_dtype": WrongDtype,
    "wrong_shape": WrongShape,
    "too_many_arrays": PayloadTooLarge,
}


def decode(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and validate a payload. Raises a :class:`ProtocolError` subclass, nothing else: whatever a peer sends,
    a receiver gets a typed refusal it can count and answer, never an exception that stops its network thread."""
    try:
        return _decode(payload, limits)
    except ProtocolError:
        raise
    except Exception as exc:  # a check that itself failed on hostile input: still a typed refusal
        raise MalformedMessage(f"undecodable message: {type(exc).__name__}: {exc}"[:500]) from None


def _decode(payload: bytes, limits: Limits) -> Message:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise MalformedMessage(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > limits.max_payload_bytes:
        raise PayloadTooLarge(f"payload is {len(payload)} bytes, limit {limits.max_payload_bytes}")
    try:
        raw = msgpack.unpackb(
            bytes(payload),
            raw=False,
            ext_hook=ext_hook(limits),
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_payload_bytes,
            max_array_len=limits.max_collection_len,
            max_map_len=limits.max_collection_len,
            max_ext_len=limits.max_payload_bytes,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, StackError, ...)
        raise MalformedMessage(f"not a msgpack message: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedMessage(f"message must be a map, got {type(raw).__name__}")
    version = raw.get("v")
    # exact type first: the field may hold anything (an array, a map), and comparing those is not a yes or no
    if type(version) is not int or version != SCHEMA_VERSION:
        raise UnsupportedSchema(f"schema version {_short(version)} is not supported (this side speaks "
                                f"{SCHEMA_VERSION})")
    kind = raw.get("type")
    if type(kind) is str and kind in RETIRED_TYPES:
        raise RetiredMessageType(f"{kind}: {RETIRED_TYPES[kind]}")
    if type(kind) is not str or kind not in MESSAGE_TYPES:
        raise UnknownMessageType(f"unknown message type {_short(kind)}")
    try:
        return ANY_MESSAGE.validate_python(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for err in errors:
            if err["type"] in _ERROR_BY_PYDANTIC_TYPE:
                raise _ERROR_BY_PYDANTIC_TYPE[err["type"]](_describe(errors)) from None
        raise InvalidMessage(f"{kind}: {_describe(errors)}") from None


def _short(value: Any) -> str:
    """A bounded description of a hostile value for a log line."""
    return f"of type {type(value).__name__}" if not isinstance(value, int | str | None) else repr(value)[:64]


def _describe(errors: list[Any]) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or '<root>'}: {e['msg']}" for e in errors[:5])


def check_arrays(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *, what: str = "arrays"
) -> None:
    """Refuse arrays whose names or shapes differ from what the receiver expects, or that are
    not floating point. Called by the coordinator on every update and by devices on every
    global model."""
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise WrongShape(f"{what}: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        arr = arrays[name]
        if arr.dtype.kind != "f":
            raise WrongDtype(f"{what}.{name}: expected floating point, got {arr.dtype.name}")
        if tuple(arr.shape) != tuple(shape):
            raise WrongShape(f"{what}.{name}: expected shape {tuple(shape)}, got {tuple(arr.shape)}")

