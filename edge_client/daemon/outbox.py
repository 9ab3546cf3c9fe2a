"""The outbox: every update is written here before it is published and stays until the coordinator answers it (its
Receipt, or a Reject naming it; the broker's PUBACK only says the broker has it), so a device that loses its link,
or its process, sends the identical message (same id) again and the coordinator counts it once and answers again.
:class:`~edge_client.daemon.store.DeviceStore` is the durable outbox of the daemon;
:class:`MemoryOutbox` serves in-process (simulated) devices.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

OutboxState = Literal["pending", "sent", "acked", "received", "rejected"]
OUTBOX_STATES: tuple[OutboxState, ...] = ("pending", "sent", "acked", "received", "rejected")  # forward only
SETTLED = ("received", "rejected")  # final: the coordinator answered


@dataclass(frozen=True)
class OutboxEntry:
    round_id: int
    msg_id: str
    topic: str
    payload: bytes
    state: OutboxState
    attempts: int


class Outbox(Protocol):
    """Where updates wait for the coordinator's Receipt; :class:`edge_client.daemon.store.DeviceStore` is the durable
    one."""

    def outbox_put(self, round_id: int, msg_id: str, topic: str, payload: bytes) -> None: ...
    def outbox_mark(self, round_id: int, msg_id: str, state: OutboxState) -> None: ...
    def outbox_settle(self, msg_id: str, state: OutboxState) -> OutboxEntry | None: ...
    def outbox_for_round(self, round_id: int) -> OutboxEntry | None: ...
    def outbox_unsettled(self, older_than_s: float = 0.0) -> list[OutboxEntry]: ...
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...


class MemoryOutbox:
    """The outbox of in-process (simulated) devices: survives reconnects, not restarts."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._entries: dict[int, OutboxEntry] = {}
        self._touched: dict[int, float] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Nothing to make atomic: this outbox, like the learner it serves, dies with the process."""
        yield

    def outbox_put(self, round_id: int, msg_id: str, topic: str, payload: bytes) -> None:
        with self._lock:
            self._entries.setdefault(round_id, OutboxEntry(round_id, msg_id, topic, bytes(payload), "pending", 0))
            self._touched.setdefault(round_id, time.time())
            for old in sorted(self._entries)[: -self.keep]:
                if self._entries[old].state in SETTLED:
                    del self._entries[old]

    def outbox_mark(self, round_id: int, msg_id: str, state: OutboxState) -> None:
        with self._lock:
            e = self._entries.get(round_id)
            if e is None or e.msg_id != msg_id or e.state in SETTLED:
                return
            forward = OUTBOX_STATES.index(state) > OUTBOX_STATES.index(e.state)
            self._entries[round_id] = OutboxEntry(e.round_id, e.msg_id, e.topic, e.payload,
                                                  state if forward else e.state, e.attempts + (state == "sent"))
            self._touched[round_id] = time.time()

    def outbox_settle(self, msg_id: str, state: OutboxState) -> OutboxEntry | None:
        entry = next((e for e in list(self._entries.values()) if e.msg_id == msg_id), None)
        if entry is None:
            return None
        self.outbox_mark(entry.round_id, msg_id, state)
        return self._entries.get(entry.round_id)

    def outbox_for_round(self, round_id: int) -> OutboxEntry | None:
        return self._entries.get(round_id)

    def outbox_unsettled(self, older_than_s: float = 0.0) -> list[OutboxEntry]:
        with self._lock:
            now = time.time()
            return [e for r, e in self._entries.items()
                    if e.state not in SETTLED and now - self._touched.get(r, 0.0) >= older_than_s]
