"""Typed refusals: every kind of bad input is one :class:`ProtocolError` subclass with a stable ``reason``
(a counter key, and what a :class:`~edge_client.wire.messages.Reject` tells the peer)."""

from __future__ import annotations

from typing import ClassVar


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


class RetiredMessageType(ProtocolError):
    """A type this schema version once had (see ``RETIRED_TYPES``): refused, with the reason it went."""

    reason = "retired_type"


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


class RoundClosed(StaleRound):
    """The round was closing (its aggregate being computed) when the update arrived: it is not in that aggregate."""

    reason = "round_closed"


class DuplicateUpdate(ProtocolError):
    """A device sent a second, different update for a round it already has one stored in."""

    reason = "duplicate_update"


class ReplayedMessage(ProtocolError):
    reason = "replay"


class UnknownDevice(ProtocolError):
    reason = "unknown_device"


class IdentityMismatch(ProtocolError):
    reason = "identity_mismatch"


class InternalError(ProtocolError):
    """The receiver failed on a message that passed every check (a bug); the sender is told, the receiver lives on."""

    reason = "internal_error"


class Unsigned(ProtocolError):
    """A message that must be signed carries no signature."""

    reason = "unsigned"


class SignatureMismatch(ProtocolError):
    """A signature that does not verify with the key of the party the message claims to come from."""

    reason = "bad_signature"


class Revoked(ProtocolError):
    """A device whose identity the fleet revoked."""

    reason = "revoked"


class SecAggRefused(ProtocolError):
    """A secure-aggregation message that does not fit the round's stage: not asked for, out of order, from a device
    outside the round, a share that does not decrypt, or a request a device must refuse (edge_client.secagg)."""

    reason = "secagg_refused"
