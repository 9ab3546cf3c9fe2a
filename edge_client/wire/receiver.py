"""The receiving side: decoding plus the checks that need memory or keys (replays, identities, signatures)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from edge_client.wire.codec import decode
from edge_client.wire.errors import IdentityMismatch, ProtocolError, ReplayedMessage, UnknownDevice
from edge_client.wire.limits import DEFAULT_LIMITS, Limits
from edge_client.wire.memory import MemoryReplay, ReplayMemory
from edge_client.wire.messages import GlobalModel, Message, RoundTask
from edge_client.wire.topics import Topics

log = logging.getLogger("fedge.protocol")

# Messages that act once: a second copy of one is a replay. The others are idempotent by design: an update is stored
# once per (round, device) and a re-sent copy is answered with its receipt again; hellos, statuses, global models and
# bundle pieces are state (retained: every reconnect delivers them again). Tasks and global models are also ordered:
# one older than the newest seen (an earlier round, an earlier version) is refused even with a new message id.
ONCE_ONLY = frozenset({"forget", "task", "reject", "receipt"})


def _order(msg: Message) -> tuple[str, float] | None:
    """(key, value) a message must not go back on."""
    if isinstance(msg, RoundTask):
        return f"task:{msg.task}:{msg.device_id}", msg.round_opened
    if isinstance(msg, GlobalModel):
        return f"global:{msg.task}", float(msg.version)
    return None


class Receiver:
    """Decoding plus the checks that need memory: replayed message ids, a device publishing under another device's
    topic, devices nobody registered, and (with ``authenticate``) signatures. Every refusal is logged once with its
    reason and counted in :attr:`rejected` (the one counter by reason an operator or a dashboard reads).

    ``memory`` keeps replay state (:class:`edge_client.wire.memory.SqliteReplay` survives restarts);
    ``authenticate(msg)`` raises a ProtocolError unless the message comes from whom it claims (the signature check
    of each side); ``max_age_s`` refuses act-once messages older than the memory keeps ids for."""

    def __init__(
        self,
        name: str,
        limits: Limits = DEFAULT_LIMITS,
        is_known_device: Callable[[str], bool] | None = None,
        memory: ReplayMemory | None = None,
        authenticate: Callable[[Message], None] | None = None,
        max_age_s: float | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.is_known_device = is_known_device
        self.memory: ReplayMemory = memory if memory is not None else MemoryReplay()
        self.authenticate = authenticate
        self.max_age_s = max_age_s
        self.rejected: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()

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
            if self.authenticate is not None:
                self.authenticate(msg)
            self._check_fresh(msg)
        except ProtocolError as err:
            self.reject(err, topic, len(payload) if isinstance(payload, bytes | bytearray) else -1)
            raise
        if msg.type in ONCE_ONLY:
            self.memory.remember(msg.msg_id)
        if msg.type != "global_model":  # a global model counts once the device took it (see advance)
            self.advance(msg)
        self.accepted[msg.type] += 1
        return msg

    def advance(self, msg: Message) -> None:
        """Remember a message's round or version as the newest: nothing older is accepted from now on (for a global
        model, called by the device once it passed its own checks, so a refused head does not lock out older
        genuine ones)."""
        if (order := _order(msg)) is not None:
            self.memory.advance(*order)

    def _check_fresh(self, msg: Message) -> None:
        if msg.type in ONCE_ONLY:
            if self.memory.seen(msg.msg_id):
                raise ReplayedMessage(f"message {msg.msg_id} was already received")
            if self.max_age_s is not None and msg.ts < time.time() - self.max_age_s:
                raise ReplayedMessage(f"{msg.type} {msg.msg_id} is older than the replay window")
        order = _order(msg)
        if order is not None:
            last = self.memory.last(order[0])
            if last is not None and order[1] < last:
                raise ReplayedMessage(f"{msg.type} goes back to {order[1]:g} after {last:g} ({order[0]})")

    def callback_failed(self, exc: BaseException) -> None:
        """Count an MQTT callback that raised (guarded by :func:`edge_client.wire.mqtt.guarded`): a bug or an input
        no check foresaw, logged with its traceback where it happened; the connection stays up."""
        self.rejected["callback_error"] += 1

    def reject(self, err: ProtocolError, topic: str, size: int = -1) -> None:
        """Count and log a refusal found here or by a later, stateful check of the caller."""
        self.rejected[err.reason] += 1
        log.warning("%s rejected message on %s (%d bytes): %s: %s", self.name, topic, size, err.reason, err)
