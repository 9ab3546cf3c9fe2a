"""Signed control messages: an ed25519 signature in the header's ``sig`` over the message's own encoding.

Why: a broker ACL says who may publish on a topic, but a broker that is misconfigured, shared or compromised says
nothing about who wrote a payload. The coordinator signs what devices act on (GlobalModel, RoundTask, Reject,
Receipt); devices sign what the coordinator acts on (Hello, Status, Update, Forget). Each side verifies before
acting. The signed bytes are a fixed context string followed by the message encoded with ``sig`` empty; the
receiver re-encodes the decoded message the same way (the codec round-trips byte for byte), so nothing but the
signature travels twice. The context string keeps these signatures apart from any other use of the same key
(the key also certifies a TLS client, whose handshake signatures start with 64 spaces).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_client.wire.codec import encode
from edge_client.wire.errors import IdentityMismatch, SignatureMismatch, Unsigned
from edge_client.wire.limits import Limits
from edge_client.wire.messages import Message

SIGNATURE_CONTEXT = b"fedge-msg-v1\x00"
_UNLIMITED = Limits(max_payload_bytes=1 << 30)  # the signed form is never larger than the message itself

# Who signs which message type: what a device must check the coordinator's key on, and the coordinator a device's.
SIGNED_BY_COORDINATOR = frozenset({"global_model", "task", "reject", "receipt", "secagg_roster", "secagg_inbox",
                                   "secagg_unmask"})
SIGNED_BY_DEVICE = frozenset({"hello", "status", "update", "forget", "secagg_keys", "secagg_shares", "secagg_masked",
                              "secagg_reveal"})


def signing_bytes(msg: Message) -> bytes:
    return SIGNATURE_CONTEXT + encode(msg.model_copy(update={"sig": None}), _UNLIMITED)


def sign(msg: Message, key: Ed25519PrivateKey) -> Message:
    """The message with its signature in ``sig``."""
    return msg.model_copy(update={"sig": key.sign(signing_bytes(msg))})


def verify(msg: Message, public_key: Ed25519PublicKey, signer: str = "the sender") -> None:
    """Raise :class:`Unsigned` or :class:`SignatureMismatch` unless `public_key` signed exactly this message."""
    if not msg.sig:
        raise Unsigned(f"{msg.type} {msg.msg_id} carries no signature; {signer} must sign it")
    try:
        public_key.verify(bytes(msg.sig), signing_bytes(msg))
    except (InvalidSignature, ValueError):
        raise SignatureMismatch(f"{msg.type} {msg.msg_id}: the signature is not {signer}'s") from None


def check_from_coordinator(msg: Message, coordinator_key: Ed25519PublicKey | None) -> None:
    """A device's check of what it receives (``fedge-edge`` and the load harness's emulated devices): only message
    types a coordinator sends, and with an identity (`coordinator_key`) only with the coordinator's signature."""
    if msg.type in SIGNED_BY_DEVICE:
        raise IdentityMismatch(f"the coordinator does not send {msg.type} messages")
    if coordinator_key is not None and msg.type in SIGNED_BY_COORDINATOR:
        verify(msg, coordinator_key, "the coordinator's")
