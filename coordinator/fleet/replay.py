"""The coordinator's replay memory in the fleet database, on either backend, written through the batch writer.

Why not :class:`edge_client.wire.memory.SqliteReplay` (what devices use): it is a second connection to a SQLite
file, one commit (one fsync) per remembered id, and a PostgreSQL coordinator had no file, so it kept the ids in
memory only -- a Forget replayed after a restart was accepted again. Here the ids live in the fleet database's own
``replay_seen`` / ``replay_last`` tables (the same tables and schema, so an existing SQLite fleet file keeps what it
remembered), and each write is queued on the :class:`~coordinator.fleet.ingest.BatchWriter`, so it commits with the
batch it arrives in. It is durable before anything acts on the message: the coordinator handles the only act-once
message it receives, a Forget, after ``writer.flush()``, which commits the id first; and the broker's PUBACK comes
after that. Until the commit, and for the newest ids after it, an in-memory window answers ``seen`` without a query.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from coordinator.fleet.ingest import Op
from coordinator.fleet.state import FleetState
from edge_client.wire.memory import MemoryReplay


class FleetReplay:
    """:class:`edge_client.wire.memory.ReplayMemory` over a :class:`FleetState`; `submit` queues a write (the batch
    writer's ``submit``). Ids are kept for `keep_s` seconds, at most `max_ids` of them."""

    def __init__(self, state: FleetState, submit: Callable[[Op], None], keep_s: float = 30 * 86400.0,
                 max_ids: int = 1_000_000) -> None:
        self.state, self.submit, self.keep_s, self.max_ids = state, submit, keep_s, max_ids
        self._recent = MemoryReplay(window=10_000)  # written but perhaps not yet committed, and the newest
        self._lock = threading.Lock()
        self._writes = 0

    def seen(self, msg_id: str) -> bool:
        return self._recent.seen(msg_id) or self.state.replay_seen(msg_id)

    def remember(self, msg_id: str) -> None:
        self._recent.remember(msg_id)
        with self._lock:
            self._writes += 1
            prune = self._writes % 1000 == 0  # bounded: old ids go (their messages are refused as too old anyway)
        now = time.time()
        self.submit(lambda st: st.remember_replay(msg_id, now, (now - self.keep_s, self.max_ids) if prune else None))

    def last(self, key: str) -> float | None:
        mine, stored = self._recent.last(key), self.state.replay_last(key)
        return max((v for v in (mine, stored) if v is not None), default=None)

    def advance(self, key: str, value: float) -> None:
        self._recent.advance(key, value)
        self.submit(lambda st: st.advance_replay(key, float(value)))
