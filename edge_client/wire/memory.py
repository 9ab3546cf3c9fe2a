"""What a receiver remembers to refuse replays: the ids of act-once messages, and the newest version or time of
each piece of state (a device's status, a task's round, the global model). In memory, or in a SQLite file so that
a restart forgets nothing (the same bytes of a Forget, replayed after a restart, must still be refused)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS replay_seen (msg_id TEXT PRIMARY KEY, received REAL NOT NULL);
CREATE INDEX IF NOT EXISTS replay_seen_received ON replay_seen (received);
CREATE TABLE IF NOT EXISTS replay_last (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""


class ReplayMemory(Protocol):
    def seen(self, msg_id: str) -> bool: ...
    def remember(self, msg_id: str) -> None: ...
    def last(self, key: str) -> float | None: ...
    def advance(self, key: str, value: float) -> None: ...


class MemoryReplay:
    """In-process memory: the newest `window` message ids, and the last value per key."""

    def __init__(self, window: int = 100_000) -> None:
        self.window = window
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, msg_id: str) -> bool:
        with self._lock:
            return msg_id in self._seen

    def remember(self, msg_id: str) -> None:
        with self._lock:
            self._seen[msg_id] = None
            while len(self._seen) > self.window:
                self._seen.popitem(last=False)

    def last(self, key: str) -> float | None:
        with self._lock:
            return self._last.get(key)

    def advance(self, key: str, value: float) -> None:
        with self._lock:
            if value > self._last.get(key, float("-inf")):
                self._last[key] = value


class SqliteReplay:
    """The same memory in tables of a SQLite file (the coordinator's fleet database, the device's store), with its
    own connection; ids are kept for `keep_s` seconds (receivers refuse messages older than that by their time)."""

    def __init__(self, path: str | Path, keep_s: float = 30 * 86400.0, max_ids: int = 1_000_000) -> None:
        self.keep_s, self.max_ids = keep_s, max_ids
        self._db = sqlite3.connect(Path(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._writes = 0

    def seen(self, msg_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM replay_seen WHERE msg_id=?", (msg_id,)).fetchone() is not None

    def remember(self, msg_id: str) -> None:
        with self._lock:
            now = time.time()
            self._db.execute("INSERT OR IGNORE INTO replay_seen (msg_id, received) VALUES (?, ?)", (msg_id, now))
            self._writes += 1
            if self._writes % 1000 == 0:  # bounded: old ids go (their messages are refused as too old anyway)
                self._db.execute("DELETE FROM replay_seen WHERE received < ? OR msg_id IN (SELECT msg_id FROM"
                                 " replay_seen ORDER BY received DESC LIMIT -1 OFFSET ?)", (now - self.keep_s,
                                                                                            self.max_ids))

    def last(self, key: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM replay_last WHERE key=?", (key,)).fetchone()
        return None if row is None else float(row[0])

    def advance(self, key: str, value: float) -> None:
        with self._lock:
            self._db.execute("INSERT INTO replay_last (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET"
                             " value=MAX(value, excluded.value)", (key, float(value)))

    def close(self) -> None:
        with self._lock:
            self._db.close()
