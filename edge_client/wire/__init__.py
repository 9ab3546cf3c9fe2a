"""The wire contract between coordinator and devices: messages, codec, typed refusals, topics and limits.

Both sides import it; it imports nothing from the rest of fedge. Import the contract from here
(``from edge_client.wire import Update, decode``); the MQTT connection helpers are :mod:`edge_client.wire.mqtt`.

Receivers never trust a payload: :func:`decode` turns every kind of bad input into one :class:`ProtocolError`
subclass with a stable ``reason`` (a counter key, and what a :class:`Reject` says), and :class:`Receiver` adds
replay protection, topic/identity checks, logging and counters on top. Nothing a peer sends can raise anything else.
"""

from edge_client.wire.codec import check_arrays, decode, encode
from edge_client.wire.errors import (
    DuplicateUpdate,
    IdentityMismatch,
    InternalError,
    InvalidMessage,
    MalformedMessage,
    ModelMismatch,
    NonFiniteValues,
    PayloadTooLarge,
    ProtocolError,
    ReplayedMessage,
    RetiredMessageType,
    Revoked,
    RoundClosed,
    SignatureMismatch,
    StaleRound,
    UnknownDevice,
    UnknownMessageType,
    Unsigned,
    UnsupportedSchema,
    WrongDtype,
    WrongShape,
)
from edge_client.wire.limits import (
    ALLOWED_DTYPES,
    ARRAY_EXT_CODE,
    DEFAULT_LIMITS,
    MAX_PROTOTYPE_DIM,
    SCHEMA_VERSION,
    Limits,
)
from edge_client.wire.messages import (
    MESSAGE_TYPES,
    RETIRED_TYPES,
    BundleChunk,
    BundleManifest,
    Forget,
    GlobalModel,
    Hello,
    Message,
    Receipt,
    Reject,
    RoundTask,
    Status,
    Update,
)
from edge_client.wire.receiver import Receiver
from edge_client.wire.signing import sign, verify
from edge_client.wire.topics import NAME_RE, TOPIC_ROOT, Topics, check_name

__all__ = [
    "ALLOWED_DTYPES",
    "ARRAY_EXT_CODE",
    "DEFAULT_LIMITS",
    "MAX_PROTOTYPE_DIM",
    "MESSAGE_TYPES",
    "NAME_RE",
    "RETIRED_TYPES",
    "SCHEMA_VERSION",
    "TOPIC_ROOT",
    "BundleChunk",
    "BundleManifest",
    "DuplicateUpdate",
    "Forget",
    "GlobalModel",
    "Hello",
    "IdentityMismatch",
    "InternalError",
    "InvalidMessage",
    "Limits",
    "MalformedMessage",
    "Message",
    "ModelMismatch",
    "NonFiniteValues",
    "PayloadTooLarge",
    "ProtocolError",
    "Receipt",
    "Receiver",
    "Reject",
    "ReplayedMessage",
    "RetiredMessageType",
    "Revoked",
    "RoundClosed",
    "RoundTask",
    "SignatureMismatch",
    "StaleRound",
    "Status",
    "Topics",
    "UnknownDevice",
    "UnknownMessageType",
    "Unsigned",
    "UnsupportedSchema",
    "Update",
    "WrongDtype",
    "WrongShape",
    "check_arrays",
    "check_name",
    "decode",
    "encode",
    "sign",
    "verify",
]
