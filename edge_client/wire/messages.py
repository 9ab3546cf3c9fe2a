"""The messages of the wire contract: one pydantic model per message type, with the header every message shares.

Every message is a msgpack map validated by one of these models, with a schema version, a type, a message id,
the fleet, the device, the round and a timestamp. Fields are checked strictly: unknown keys are refused and
floats must be finite; array fields accept only the allowed dtypes and finite values.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edge_client.wire.limits import (
    ALLOWED_DTYPES,
    DEFAULT_LIMITS,
    MAX_PROTOTYPE_DIM,
    MAX_SAMPLES,
    MAX_WIRE_INT,
    PACKED_DTYPES,
    SCHEMA_VERSION,
)
from edge_client.wire.topics import NAME_RE

# --------------------------------------------------------------------------- array fields


_ALLOWED = frozenset(np.dtype(name) for name in ALLOWED_DTYPES)  # dtype objects: `dtype.name` is slow Python code


def _validate_array(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise PydanticCustomError("not_array", "expected a numpy array, got {kind}", {"kind": type(value).__name__})
    if value.dtype not in _ALLOWED:
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


def _validate_packed_part(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.name not in PACKED_DTYPES or value.ndim != 1:
        raise PydanticCustomError("wrong_dtype", "packed values/index must be 1-D int8/uint16/uint32, got {what}",
                                  {"what": getattr(getattr(value, "dtype", None), "name", type(value).__name__)})
    return value


PackedPart = Annotated[Any, PlainValidator(_validate_packed_part), PlainSerializer(lambda a: a, return_type=Any)]


class PackedArray(BaseModel):
    """One compressed delta tensor (edge_client.learning.compress): int8 values times one positive scale, dense
    (no index: every entry in order) or top-k (the strictly increasing flat positions of the values)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, arbitrary_types_allowed=True)

    values: PackedPart
    scale: float = Field(gt=0.0)
    shape: list[Annotated[int, Field(ge=0, le=DEFAULT_LIMITS.max_array_elements)]] = Field(max_length=8)
    index: PackedPart | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PackedArray:
        size = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        if self.values.dtype != np.int8:
            raise PydanticCustomError("wrong_dtype", "packed values must be int8, got {d}",
                                      {"d": self.values.dtype.name})
        if size > DEFAULT_LIMITS.max_array_elements:
            raise PydanticCustomError("wrong_shape", "packed shape {s} is too large", {"s": self.shape})
        if self.index is None:
            if len(self.values) != size:
                raise PydanticCustomError("wrong_shape", "{n} packed values for shape {s}",
                                          {"n": len(self.values), "s": self.shape})
        else:
            idx = self.index.astype(np.int64)
            if self.index.dtype == np.int8 or len(idx) != len(self.values) or len(idx) > size or (
                    len(idx) and (idx[0] < 0 or idx[-1] >= size or np.any(np.diff(idx) <= 0))):
                raise PydanticCustomError("wrong_shape", "packed index must be increasing positions inside shape {s}",
                                          {"s": self.shape})
        return self

    def dequantize(self) -> np.ndarray:
        vals = self.values.astype(np.float32) * np.float32(self.scale)
        if self.index is None:
            return vals.reshape(self.shape)
        out = np.zeros(int(np.prod(self.shape, dtype=np.int64)), np.float32)
        out[self.index.astype(np.int64)] = vals
        return out.reshape(self.shape)


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



class _MessageIds:
    """Message ids: 64 random bits drawn once per process (again in a forked child) and a counter. Unique like a
    uuid4 -- ids only ever have to differ, receivers remember the ones they saw -- at a fraction of the cost: a
    coordinator sends a task and a receipt to each of 10,000 devices per round, and os.urandom per message showed in
    its profile."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_msg_id = _MessageIds()


DeviceId = Annotated[str, Field(pattern=NAME_RE.pattern)]
# Every integer on the wire is bounded by the schema: msgpack carries up to 2^64-1, SQLite stores up to 2^63-1, and
# a version of 2^64-1 would pin a device forever. Counts and ids stay exact in a double.
Count = Annotated[int, Field(ge=0, le=MAX_WIRE_INT)]
WireInt = Annotated[int, Field(ge=-MAX_WIRE_INT, le=MAX_WIRE_INT)]
OptionValue = WireInt | float | Annotated[str, Field(max_length=256)] | bool
Metrics = dict[str, float]


class Message(BaseModel):
    """Header shared by every message. Fields are checked strictly: unknown keys are refused
    (a typo on one side must not silently drop data) and floats must be finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, arbitrary_types_allowed=True)

    v: Literal[1] = SCHEMA_VERSION
    type: str
    msg_id: str = Field(default_factory=new_msg_id, min_length=8, max_length=64)
    fleet: Annotated[str, Field(pattern=NAME_RE.pattern)]
    device_id: DeviceId | None = None
    round_id: Count | None = None
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
    n_train: Count
    n_eval: Count
    model_version: Count | None = None
    capabilities: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=32)
    # What the device runs, for the fleet view and bundle rollouts. Left out of the payload while unset, so a
    # device that does not say encodes exactly as before these fields existed.
    backbone_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$", exclude_if=lambda v: v == "")
    bundle_version: int | None = Field(default=None, ge=0, exclude_if=lambda v: v is None)
    # A forecasting device that opts in (device.toml announce_prototype) says what its data looks like before it
    # trains, so a prototype strategy can place it (edge_client/learning/prototype.py); absent otherwise.
    prototype: Array | None = Field(default=None, exclude_if=lambda v: v is None)

    _prototype = field_validator("prototype")(_prototype_vector)


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
    round_id: Count
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    kind: Literal["train", "evaluate"] = "train"
    model_version: Count
    deadline_ts: float
    local_epochs: int = Field(default=1, ge=1, le=100)
    lr: float = Field(default=1e-3, gt=0, le=1.0)
    batch_size: int = Field(default=64, ge=1, le=65536)
    prox_mu: float = Field(default=0.0, ge=0)
    # when the coordinator opened this round (kept across its restarts): tells a resumed round from another
    # fleet database's round with the same number, so a device re-sends a stored update only to the former
    round_opened: float = Field(default=0.0, ge=0)
    options: dict[Annotated[str, Field(max_length=64)], OptionValue] = Field(default_factory=dict, max_length=64)
    # task-vector personalised aggregation: this device's own starting head (empty: the global head)
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
    round_id: Count
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    kind: Literal["train", "evaluate"] = "train"
    base_version: Count
    n_samples: int = Field(ge=0, le=MAX_SAMPLES)
    delta: Arrays = Field(default_factory=dict)
    metrics: Metrics = Field(default_factory=dict)
    train_seconds: float = Field(default=0.0, ge=0)
    round_opened: float = Field(default=0.0, ge=0)  # echoed from the task (see RoundTask.round_opened)
    # FCUCR: the user's prototype (one vector summarising recent history; no item ids), or None
    prototype: Array | None = None

    # A compressed delta (int8 per-tensor scale, or top-k): when present it is the delta; `delta` is then filled
    # with its float32 values on decoding and left out of the payload.
    packed: dict[Annotated[str, Field(max_length=64)], PackedArray] | None = Field(
        default=None, exclude_if=lambda v: v is None, max_length=DEFAULT_LIMITS.max_arrays)

    _prototype = field_validator("prototype")(_prototype_vector)

    @model_validator(mode="after")
    def _unpack(self) -> Update:
        if self.packed is not None:
            if self.delta:
                raise PydanticCustomError("wrong_shape", "an update carries either delta or packed, not both", {})
            object.__setattr__(self, "delta", {k: p.dequantize() for k, p in self.packed.items()})
        return self

    @model_serializer(mode="wrap")
    def _without_unpacked(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.packed is not None:
            data.pop("delta", None)
        return data

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
    version: Count
    params: Arrays
    backbone_sha256: str = Field(default="", max_length=64)
    # The export's model id, shared by all its formats (ONNX, int8, TFLite); devices check it first.
    backbone_id: str = Field(default="", max_length=128)


class BundleManifest(Message):
    """A signed model bundle announcement (retained). ``manifest`` is the canonical JSON the
    coordinator signed, carried byte for byte so the device verifies exactly what was signed;
    the detached ed25519 signature travels in the header's ``sig``. Parsing the JSON is the
    bundle layer's job (edge_client/bundles/manifest.py), after the signature checks out."""

    type: Literal["bundle_manifest"] = "bundle_manifest"
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    version: Count
    manifest: bytes = Field(max_length=64 * 1024)


class BundleChunk(Message):
    """One fixed-size piece of one bundle file, published (retained) on ``chunks/{seq}``. The chunk
    hash catches transport damage early; the file hash in the signed manifest is what is trusted."""

    type: Literal["bundle_chunk"] = "bundle_chunk"
    task: str = Field(default="tsfm", pattern=NAME_RE.pattern)
    version: Count
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


class Receipt(Message):
    """The coordinator stored an update (or already had it, byte for byte): the application-level acknowledgement.
    A broker's PUBACK only says the broker has the message; the device keeps an update in its outbox until this
    arrives (or a Reject naming it), and re-sends it otherwise."""

    type: Literal["receipt"] = "receipt"
    device_id: DeviceId
    round_id: Count
    ref_msg_id: str = Field(min_length=8, max_length=64)


# --------------------------------------------------------------------------- secure aggregation (SecAgg+)
# edge_client.secagg.protocol describes the four stages. Device -> coordinator on rounds/{round}/secagg/{device};
# coordinator -> device on the device's task topic. Keys and shares are opaque bytes of bounded length: the protocol
# layer checks what they contain (a share that does not decrypt is a typed refusal there).

MAX_SECAGG_VECTOR = 1 << 17  # quantised parameters per masked input (512 KB of uint32: the payload limit)
X25519Key = Annotated[bytes, Field(min_length=32, max_length=32)]
KeySignature = Annotated[bytes, Field(max_length=64)]  # ed25519 over the keys; empty without an identity
Ciphertext = Annotated[bytes, Field(min_length=16, max_length=512)]
ShareBytes = Annotated[bytes, Field(min_length=1, max_length=66)]


class SecAggKeys(Message):
    """Stage 1 (device): the public halves of the round's two X25519 key pairs, signed with the identity key."""

    type: Literal["secagg_keys"] = "secagg_keys"
    device_id: DeviceId
    round_id: Count
    c_pk: X25519Key
    s_pk: X25519Key
    key_sig: KeySignature = b""


class SecAggRoster(Message):
    """Stage 1 (coordinator): what the round masks and the keys of this device's neighbours."""

    type: Literal["secagg_roster"] = "secagg_roster"
    device_id: DeviceId
    round_id: Count
    size: int = Field(ge=1, le=MAX_SECAGG_VECTOR)
    value_range: float = Field(gt=0, le=1e6)
    bits: int = Field(ge=1, le=31)
    threshold: int = Field(ge=1, le=4096)
    neighbours: dict[DeviceId, tuple[X25519Key, X25519Key, KeySignature]] = Field(max_length=4096)
    # the neighbours' X.509 certificates (DER) in fleets with identities: the device checks each against its fleet
    # CA and each neighbour's key signature with it, so not even the coordinator can substitute a key
    certs: dict[DeviceId, Annotated[bytes, Field(max_length=4096)]] = Field(default_factory=dict, max_length=4096)


class SecAggShares(Message):
    """Stage 2 (device): its encrypted Shamir shares, one per neighbour."""

    type: Literal["secagg_shares"] = "secagg_shares"
    device_id: DeviceId
    round_id: Count
    shares: dict[DeviceId, Ciphertext] = Field(max_length=4096)


class SecAggInbox(Message):
    """Stage 2 (coordinator): the shares other devices encrypted for this one (sender -> ciphertext)."""

    type: Literal["secagg_inbox"] = "secagg_inbox"
    device_id: DeviceId
    round_id: Count
    shares: dict[DeviceId, Ciphertext] = Field(max_length=4096)


class SecAggMasked(Message):
    """Stage 3 (device): the masked quantised update, little-endian uint32 -- the only payload the coordinator
    stores of a secure round."""

    type: Literal["secagg_masked"] = "secagg_masked"
    device_id: DeviceId
    round_id: Count
    masked: bytes = Field(min_length=4, max_length=4 * MAX_SECAGG_VECTOR)


class SecAggUnmask(Message):
    """Stage 4 (coordinator): whose masked input arrived, and who shared keys but sent none."""

    type: Literal["secagg_unmask"] = "secagg_unmask"
    device_id: DeviceId
    round_id: Count
    survivors: list[DeviceId] = Field(max_length=4096)
    dropped: list[DeviceId] = Field(max_length=4096)


class SecAggReveal(Message):
    """Stage 4 (device): for each neighbour, one share -- of its self-mask seed ("b", it survived) or of its mask key
    ("s", it dropped) -- as (kind, x, y)."""

    type: Literal["secagg_reveal"] = "secagg_reveal"
    device_id: DeviceId
    round_id: Count
    shares: dict[DeviceId, tuple[Literal["b", "s"], Annotated[int, Field(ge=1, le=4096)], ShareBytes]] = Field(
        max_length=4096)


SECAGG_FROM_DEVICE = (SecAggKeys, SecAggShares, SecAggMasked, SecAggReveal)
SECAGG_FROM_COORDINATOR = (SecAggRoster, SecAggInbox, SecAggUnmask)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.model_fields["type"].default: cls
    for cls in (Hello, Status, Forget, RoundTask, Update, GlobalModel, BundleManifest, BundleChunk, Reject, Receipt,
                *SECAGG_FROM_DEVICE, *SECAGG_FROM_COORDINATOR)
}
AnyMessage = Annotated[
    Hello | Status | Forget | RoundTask | Update | GlobalModel | BundleManifest | BundleChunk | Reject | Receipt
    | SecAggKeys | SecAggRoster | SecAggShares | SecAggInbox | SecAggMasked | SecAggUnmask | SecAggReveal,
    Field(discriminator="type"),
]
# Types this schema version once had and no longer accepts: decoding one is a typed refusal that says why.
RETIRED_TYPES: dict[str, str] = {
    "manifest": "the unsigned model manifest is retired; the signed bundle manifest (models/{task}/bundle) replaces it",
}
ANY_MESSAGE = TypeAdapter(AnyMessage)
