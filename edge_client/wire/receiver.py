"""The receiving side: decoding plus the checks that need memory (replays, identities, registrations)."""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable

from edge_client.wire.codec import decode
from edge_client.wire.errors import IdentityMismatch, ProtocolError, ReplayedMessage, UnknownDevice
from edge_client.wire.limits import DEFAULT_LIMITS, Limits
from edge_client.wire.messages import Message
from edge_client.wire.topics import Topics

log = logging.getLogger("fedge.protocol")


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
