"""The wire contract between coordinator and devices: messages, codec, topics and limits.

Both sides import this module; it imports nothing from the rest of fedge. Every message is a
msgpack map validated by a pydantic model, with a schema version, a type, a message id, the
fleet, the device, the round and a timestamp. numpy arrays travel as a msgpack extension
(dtype, shape, raw little-endian bytes), so a 12k-parameter float16 head costs 24 KB, not the
~70 KB a list of floats would.

Receivers never trust a payload: :func:`decode` turns every kind of bad input into one
:class:`ProtocolError` subclass with a stable ``reason`` (used as a counter key and in
:class:`Reject` replies), and :class:`Receiver` adds replay protection, topic/identity checks,
logging and counters on top. Nothing a peer sends can raise anything else.
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import msgpack
import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

log = logging.getLogger("fedge.protocol")

SCHEMA_VERSION = 1
TOPIC_ROOT = "fedge/v1"
ARRAY_EXT_CODE = 42
ALLOWED_DTYPES = frozenset({"float16", "float32", "float64", "int32", "int64", "uint8"})
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


# --------------------------------------------------------------------------- limits and errors


@dataclass(frozen=True)
class Limits:
    """Hard bounds checked before and during decoding, so a hostile payload cannot make a
    receiver allocate much more than the payload itself."""

    max_payload_bytes: int = 512 * 1024
    max_array_elements: int = 1 << 20
    max_arrays: int = 64
    max_str_len: int = 4096
    max_collection_len: int = 4096


DEFAULT_LIMITS = Limits()


class ProtocolError(ValueError):
    """A message was refused. ``reason`` is a short stable code for counters and rejects."""

    reason: ClassVar[str] = "invalid"


class MalformedMessage(ProtocolError):
    reason = "malformed"


class InvalidMessage(ProtocolError):
    reason = "invalid"


class UnsupportedSchema(ProtocolError):
    reason = "schema_version"


class UnknownMessageType(ProtocolError):
    reason = "unknown_type"


class PayloadTooLarge(ProtocolError):
    reason = "oversized"


class NonFiniteValues(ProtocolError):
    reason = "non_finite"


class WrongShape(ProtocolError):
    reason = "wrong_shape"


class WrongDtype(ProtocolError):
    reason = "wrong_dtype"


class ModelMismatch(ProtocolError):
    reason = "model_mismatch"


class StaleRound(ProtocolError):
    reason = "stale_round"


class ReplayedMessage(ProtocolError):
    reason = "replay"


class UnknownDevice(ProtocolError):
    reason = "unknown_device"


class IdentityMismatch(ProtocolError):
    reason = "identity_mismatch"


# --------------------------------------------------------------------------- arrays


def _validate_array(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise PydanticCustomError("not_array", "expected a numpy array, got {kind}", {"kind": type(value).__name__})
    if value.dtype.name not in ALLOWED_DTYPES:
        raise PydanticCustomError("wrong_dtype", "dtype {dtype} is not allowed", {"dtype": value.dtype.name})
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise PydanticCustomError("non_finite", "array contains NaN or Inf", {})
    return value


Array = Annotated[
    Any,
    PlainValidator(_validate_array),
    PlainSerializer(lambda a: a, return_type=Any),
]
Arrays = dict[str, Array]
MAX_PROTOTYPE_DIM = 4096


def _prototype_vector(value: np.ndarray | None) -> np.ndarray | None:
    """A user prototype is one floating-point vector of at most MAX_PROTOTYPE_DIM numbers: a summary of
    the user, never a list of items (integer arrays, matrices or anything longer are refused here;
    the receiver then checks the exact dimension it expects)."""
    if value is None:
        return value
    if value.dtype.kind != "f":
        raise PydanticCustomError("wrong_dtype", "prototype must be floating point, got {dtype}",
                                  {"dtype": value.dtype.name})
    if value.ndim != 1 or not 0 < value.shape[0] <= MAX_PROTOTYPE_DIM:
        raise PydanticCustomError("wrong_shape", "prototype must be a vector of 1..{n} numbers, got shape {shape}",
                                  {"n": MAX_PROTOTYPE_DIM, "shape": tuple(value.shape)})
    return value


def _pack_ext(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in ALLOWED_DTYPES:
            raise WrongDtype(f"cannot send dtype {obj.dtype.name}")
        le = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))
        return msgpack.ExtType(ARRAY_EXT_CODE, msgpack.packb([obj.dtype.name, list(obj.shape), le.tobytes()]))
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(limits: Limits) -> Callable[[int, bytes], np.ndarray]:
    def hook(code: int, data: bytes) -> np.ndarray:
        if code != ARRAY_EXT_CODE:
            raise MalformedMessage(f"unknown msgpack extension type {code}")
        try:
            dtype_name, shape, raw = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # any failure inside the extension is a malformed array
            raise MalformedMessage(f"malformed array extension: {exc}") from None
        if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
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
        dtype = np.dtype(dtype_name).newbyteorder("<")
        if not isinstance(raw, bytes) or len(raw) != count * dtype.itemsize:
            raise MalformedMessage(
                f"array data is {len(raw)} bytes, shape {shape} {dtype_name} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)

    return hook


# --------------------------------------------------------------------------- messages

DeviceId = Annotated[str, Field(pattern=NAME_RE.pattern)]
Metrics = dict[str, float]


class Message(BaseModel):
    """Header shared by every message. Fields are checked strictly: unknown keys are refused
    (a typo on one side must not silently drop data) and floats must be finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, arbitrary_types_allowed=True)

    v: Literal[1] = SCHEMA_VERSION
    type: str
    msg_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=8, max_length=64)
    fleet: Annotated[str, Field(pattern=NAME_RE.pattern)]
    device_id: DeviceId | None = None
    round_id: int | None = Field(default=None, ge=0)
    ts: float = Field(default_factory=time.time)
    sig: bytes | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array the message carries (for shape checks and byte accounting)."""
        out: dict[str, np.ndarray] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                out[name] = value
            elif isinstance(value, dict):
                out.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, np.ndarray)})
        return out


class Hello(Message):
    """A device announces itself and what it can do when it (re)connects."""

    type: Literal["hello"] = "hello"
    device_id: DeviceId
    runtime: str = Field(max_length=128)
    profile: str = Field(default="generic", max_length=64)
    domain: str = Field(default="", max_length=64)
    n_train: int = Field(ge=0)
    n_eval: int = Field(ge=0)
    model_version: int | None = None
    capabilities: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=32)


class Status(Message):
    """Presence and progress; retained on the device's status topic, and the last will."""

    type: Literal["status"] = "status"
    device_id: DeviceId
    state: Literal["online", "offline", "training", "idle"]
    detail: str = Field(default="", max_length=512)


class Forget(Message):
    """The device's owner ran ``fedge-edge forget-me``: the coordinator deletes what it stored from this
    device (its updates with their deltas and prototypes, its personal head, its registration). Models
    that already averaged the device's updates cannot be un-averaged; only the per-device records go."""

    type: Literal["forget"] = "forget"
    device_id: DeviceId


class RoundTask(Message):
    """The coordinator asks a device to train (or only evaluate) on a given global version."""

    type: Literal["task"] = "task"
    device_id: DeviceId
    round_id: int = Field(ge=0)
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    kind: Literal["train", "evaluate"] = "train"
    model_version: int = Field(ge=0)
    deadline_ts: float
    local_epochs: int = Field(default=1, ge=1, le=100)
    lr: float = Field(default=1e-3, gt=0, le=1.0)
    batch_size: int = Field(default=64, ge=1, le=65536)
    prox_mu: float = Field(default=0.0, ge=0)
    # when the coordinator opened this round (kept across its restarts): tells a resumed round from another
    # fleet database's round with the same number, so a device re-sends a stored update only to the former
    round_opened: float = Field(default=0.0, ge=0)
    options: dict[str, float | int | str | bool] = Field(default_factory=dict, max_length=64)
    # bi-level personalised aggregation: this device's own starting head (empty: the global head)
    params: Arrays = Field(default_factory=dict)
    # FCUCR inter-user prototype transfer: the similarity-weighted mean of the prototypes of the users
    # most similar to this device's user (one vector; None: the coordinator has none for it yet)
    prototype: Array | None = None

    _prototype = field_validator("prototype")(_prototype_vector)


class Update(Message):
    """What a device sends back: parameter deltas (never data), how many samples produced them,
    and metrics measured on the device's own held-back window."""

    type: Literal["update"] = "update"
    device_id: DeviceId
    round_id: int = Field(ge=0)
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    kind: Literal["train", "evaluate"] = "train"
    base_version: int = Field(ge=0)
    n_samples: int = Field(ge=0)
    delta: Arrays = Field(default_factory=dict)
    metrics: Metrics = Field(default_factory=dict)
    train_seconds: float = Field(default=0.0, ge=0)
    round_opened: float = Field(default=0.0, ge=0)  # echoed from the task (see RoundTask.round_opened)
    # FCUCR: the user's prototype (one vector summarising recent history; no item ids), or None
    prototype: Array | None = None

    _prototype = field_validator("prototype")(_prototype_vector)

    @field_validator("delta")
    @classmethod
    def _bounded(cls, v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(v) > DEFAULT_LIMITS.max_arrays:
            raise PydanticCustomError("too_many_arrays", "too many arrays ({n})", {"n": len(v)})
        return v


class GlobalModel(Message):
    """The current global head (retained), versioned so devices know what a task refers to."""

    type: Literal["global_model"] = "global_model"
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    version: int = Field(ge=0)
    params: Arrays
    backbone_sha256: str = Field(default="", max_length=64)
    # The export's model id, shared by all its formats (ONNX, int8, TFLite); devices check it first.
    backbone_id: str = Field(default="", max_length=128)


class ModelFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=NAME_RE.pattern)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ModelManifest(Message):
    """Which backbone files a device must run for a task (retained)."""

    type: Literal["manifest"] = "manifest"
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    model_id: str = Field(max_length=128)
    version: int = Field(ge=0)
    files: list[ModelFile] = Field(max_length=32)
    spec: dict[str, float | int | str | list[float]] = Field(default_factory=dict)


class BundleManifest(Message):
    """A signed model bundle announcement (retained). ``manifest`` is the canonical JSON the
    coordinator signed, carried byte for byte so the device verifies exactly what was signed;
    the detached ed25519 signature travels in the header's ``sig``. Parsing the JSON is the
    bundle layer's job (edge_client/bundle.py), after the signature checks out."""

    type: Literal["bundle_manifest"] = "bundle_manifest"
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    version: int = Field(ge=0)
    manifest: bytes = Field(max_length=64 * 1024)


class BundleChunk(Message):
    """One fixed-size piece of one bundle file, published (retained) on ``chunks/{seq}``. The chunk
    hash catches transport damage early; the file hash in the signed manifest is what is trusted."""

    type: Literal["bundle_chunk"] = "bundle_chunk"
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    version: int = Field(ge=0)
    file: str = Field(pattern=NAME_RE.pattern)
    index: int = Field(ge=0, le=1 << 20)
    total: int = Field(ge=1, le=1 << 20)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    data: bytes = Field(max_length=256 * 1024)


class Reject(Message):
    """Tells a peer its message was refused and why, so failures are visible on both ends."""

    type: Literal["reject"] = "reject"
    ref_msg_id: str = Field(max_length=64)
    reason: str = Field(max_length=64)
    detail: str = Field(default="", max_length=1024)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.model_fields["type"].default: cls
    for cls in (Hello, Status, Forget, RoundTask, Update, GlobalModel, ModelManifest, BundleManifest, BundleChunk,
                Reject)
}
AnyMessage = Annotated[
    Hello | Status | Forget | RoundTask | Update | GlobalModel | ModelManifest | BundleManifest | BundleChunk
    | Reject,
    Field(discriminator="type"),
]
_ANY = TypeAdapter(AnyMessage)


# --------------------------------------------------------------------------- codec


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Serialise a message; refuses to produce a payload the receiver would reject as oversized."""
    payload = msgpack.packb(msg.model_dump(mode="python"), default=_pack_ext, use_bin_type=True)
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
    """Parse and validate a payload. Raises a :class:`ProtocolError` subclass, nothing else."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise MalformedMessage(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > limits.max_payload_bytes:
        raise PayloadTooLarge(f"payload is {len(payload)} bytes, limit {limits.max_payload_bytes}")
    try:
        raw = msgpack.unpackb(
            bytes(payload),
            raw=False,
            ext_hook=_ext_hook(limits),
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
    if raw.get("v") != SCHEMA_VERSION:
        raise UnsupportedSchema(f"schema version {raw.get('v')!r} is not supported (this side speaks {SCHEMA_VERSION})")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise UnknownMessageType(f"unknown message type {kind!r}")
    try:
        return _ANY.validate_python(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for err in errors:
            if err["type"] in _ERROR_BY_PYDANTIC_TYPE:
                raise _ERROR_BY_PYDANTIC_TYPE[err["type"]](_describe(errors)) from None
        raise InvalidMessage(f"{kind}: {_describe(errors)}") from None


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


# --------------------------------------------------------------------------- topics


def check_name(value: str, what: str) -> str:
    """Fleet and device ids become topic levels: no '/', '+', '#' or empty levels."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names under ``fedge/v1/{fleet}/``."""

    fleet: str

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet")

    @property
    def root(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    def status(self, device_id: str) -> str:
        return f"{self.root}/devices/{check_name(device_id, 'device id')}/status"

    def hello(self, device_id: str) -> str:
        return f"{self.root}/devices/{check_name(device_id, 'device id')}/hello"

    def task(self, device_id: str) -> str:
        return f"{self.root}/devices/{check_name(device_id, 'device id')}/task"

    def forget(self, device_id: str) -> str:
        return f"{self.root}/devices/{check_name(device_id, 'device id')}/forget"

    def update(self, round_id: int, device_id: str) -> str:
        return f"{self.root}/rounds/{int(round_id)}/updates/{check_name(device_id, 'device id')}"

    def manifest(self, task: str) -> str:
        return f"{self.root}/models/{check_name(task, 'task')}/manifest"

    def global_model(self, task: str) -> str:
        return f"{self.root}/models/{check_name(task, 'task')}/global"

    def chunk(self, task: str, n: int) -> str:
        return f"{self.root}/models/{check_name(task, 'task')}/chunks/{int(n)}"

    def bundle(self, task: str) -> str:
        """Signed bundle manifest (retained); beside ``manifest``, which keeps the unsigned one."""
        return f"{self.root}/models/{check_name(task, 'task')}/bundle"

    def all_chunks(self, task: str) -> str:
        return f"{self.root}/models/{check_name(task, 'task')}/chunks/+"

    # wildcard filters the coordinator subscribes to
    @property
    def all_updates(self) -> str:
        return f"{self.root}/rounds/+/updates/+"

    @property
    def all_hellos(self) -> str:
        return f"{self.root}/devices/+/hello"

    @property
    def all_statuses(self) -> str:
        return f"{self.root}/devices/+/status"

    @property
    def all_forgets(self) -> str:
        return f"{self.root}/devices/+/forget"

    def device_of(self, topic: str) -> str | None:
        """The device id a topic belongs to (the publisher's identity as the broker's ACL sees it)."""
        parts = topic.split("/")
        base = len(self.root.split("/"))
        if parts[:base] != self.root.split("/"):
            return None
        rest = parts[base:]
        if len(rest) == 3 and rest[0] == "devices":
            return rest[1]
        if len(rest) == 4 and rest[0] == "rounds" and rest[2] == "updates":
            return rest[3]
        return None


# --------------------------------------------------------------------------- receiving side


class Receiver:
    """Decoding plus the checks that need memory: replayed message ids, a device publishing
    under another device's topic, devices nobody registered. Every refusal is logged once with
    its reason and counted, so an operator can see what a fleet is sending."""

    def __init__(
        self,
        name: str,
        limits: Limits = DEFAULT_LIMITS,
        is_known_device: Callable[[str], bool] | None = None,
        replay_window: int = 100_000,
    ) -> None:
        self.name = name
        self.limits = limits
        self.is_known_device = is_known_device
        self.replay_window = replay_window
        self.rejected: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self._seen: OrderedDict[str, None] = OrderedDict()

    def accept(self, topic: str, payload: bytes, topics: Topics | None = None) -> Message:
        """Return the validated message or raise (after logging and counting) a ProtocolError."""
        try:
            msg = decode(payload, self.limits)
            if topics is not None:
                owner = topics.device_of(topic)
                if owner is not None and msg.device_id != owner:
                    raise IdentityMismatch(f"message for device {msg.device_id!r} arrived on {owner!r}'s topic")
                if msg.fleet != topics.fleet:
                    raise IdentityMismatch(f"message for fleet {msg.fleet!r} arrived on fleet {topics.fleet!r}")
            if self.is_known_device is not None and msg.device_id and not self.is_known_device(msg.device_id):
                raise UnknownDevice(f"device {msg.device_id!r} is not registered")
            if msg.msg_id in self._seen:
                raise ReplayedMessage(f"message {msg.msg_id} was already received")
        except ProtocolError as err:
            self.reject(err, topic, len(payload) if isinstance(payload, bytes | bytearray) else -1)
            raise
        self.remember(msg.msg_id)
        self.accepted[msg.type] += 1
        return msg

    def remember(self, msg_id: str) -> None:
        self._seen[msg_id] = None
        while len(self._seen) > self.replay_window:
            self._seen.popitem(last=False)

    def reject(self, err: ProtocolError, topic: str, size: int = -1) -> None:
        """Count and log a refusal found here or by a later, stateful check of the caller."""
        self.rejected[err.reason] += 1
        log.warning("%s rejected message on %s (%d bytes): %s: %s", self.name, topic, size, err.reason, err)
