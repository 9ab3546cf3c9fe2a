"""The outbox: every update is written here before it is published and stays until the broker acknowledges it, so
a device that loses its link, or its process, sends the identical message (same id) again and the coordinator
counts it once. :class:`~edge_client.daemon.store.DeviceStore` is the durable outbox of the daemon;
:class:`MemoryOutbox` serves in-process (simulated) devices.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal, Protocol

OutboxState = Literal["pending", "sent", "acked"]


@dataclass(frozen=True)
class OutboxEntry:
    round_id: int
    msg_id: str
    topic: str
    payload: bytes
    state: OutboxState
    attempts: int


class Outbox(Protocol):
    """Where updates wait for their PUBACK; :class:`edge_client.daemon.store.DeviceStore` is the durable one."""

    def outbox_put(self, round_id: int, msg_id: str, topic: str, payload: bytes) -> None: ...
    def outbox_mark(self, round_id: int, msg_id: str, state: OutboxState) -> None: ...
    def outbox_for_round(self, round_id: int) -> OutboxEntry | None: ...
    def outbox_unacked(self) -> list[OutboxEntry]: ...


class MemoryOutbox:
    """The outbox of in-process (simulated) devices: survives reconnects, not restarts."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._entries: dict[int, OutboxEntry] = {}
        self._lock = threading.Lock()

    def outbox_put(self, round_id: int, msg_id: str, topic: str, payload: bytes) -> None:
        with self._lock:
            self._entries.setdefault(round_id, OutboxEntry(round_id, msg_id, topic, bytes(payload), "pending", 0))
            for old in sorted(self._entries)[: -self.keep]:
                if self._entries[old].state == "acked":
                    del self._entries[old]

    def outbox_mark(self, round_id: int, msg_id: str, state: OutboxState) -> None:
        with self._lock:
            e = self._entries.get(round_id)
            if e is not None and e.msg_id == msg_id and e.state != "acked":
                self._entries[round_id] = OutboxEntry(e.round_id, e.msg_id, e.topic, e.payload, state,
                                                      e.attempts + (state == "sent"))

    def outbox_for_round(self, round_id: int) -> OutboxEntry | None:
        return self._entries.get(round_id)

    def outbox_unacked(self) -> list[OutboxEntry]:
        with self._lock:
            return [e for e in self._entries.values() if e.state != "acked"]
