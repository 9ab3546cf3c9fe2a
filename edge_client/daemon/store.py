"""The device's durable state: one SQLite file (WAL) under the daemon's ``state_dir``.

Why one local database: a device is unplugged, rebooted and cut off from the broker, and none of that
may lose a reading, an update or the personal model. What is kept here:

- ``samples``: the device's own series, ``(ts, value)``, deduplicated on ``ts`` (a timestamp, or a
  running sequence number for sources without one). Raw data never leaves this file.
- ``outbox``: every update, written *before* it is published and keyed by ``(round_id, msg_id)``;
  ``pending`` (not yet handed to a connection) → ``sent`` (handed to MQTT, no PUBACK yet) → ``acked`` (the broker
  has it) → ``received`` (the coordinator's Receipt: it stored it) or ``rejected`` (a Reject naming it: a closed
  round, say). Until one of the last two, the entry is published again byte for byte, same message id (after a
  crash, a reconnect, or a long wait for the receipt), and the coordinator, which stores one update per round and
  device, counts it once and answers with a receipt again.
- ``personal``: the device's personal head and its learning state (edge_client.learning.state: personal model,
  gate prior, served predictor, track record, top-k residual), written in the same transaction as the update it
  produced (:meth:`DeviceStore.transaction`).
- ``meta``: small facts for ``fedge-edge status`` (last round, last global version, counters).
- ``ingest``: per-source read positions (file offset, inode) and good/bad line counters.

Every method takes the store's lock, so paho's network thread, the training worker and the ingest
threads can share one connection.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.daemon.outbox import OUTBOX_STATES, OutboxEntry, OutboxState

DB_NAME = "device.sqlite"

OUTBOX_TABLE = """CREATE TABLE IF NOT EXISTS outbox (
    round_id INTEGER NOT NULL, msg_id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'acked', 'received', 'rejected')),
    created REAL NOT NULL, updated REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (round_id, msg_id))"""

DEVICE_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    ts REAL PRIMARY KEY, value REAL, source TEXT NOT NULL DEFAULT '', ingested REAL NOT NULL);
CREATE TABLE IF NOT EXISTS personal (name TEXT PRIMARY KEY, params BLOB NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ingest (
    source TEXT PRIMARY KEY, offset INTEGER NOT NULL DEFAULT 0, inode INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0, good INTEGER NOT NULL DEFAULT 0, bad INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL DEFAULT 0);
""" + OUTBOX_TABLE + ";\n"


def params_to_blob(params: Mapping[str, np.ndarray]) -> bytes:
    """A parameter dict as an .npz byte string (no pickle), for SQLite BLOB columns."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in params.items()})
    return buf.getvalue()


def params_from_blob(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@dataclass(frozen=True)
class IngestPosition:
    offset: int = 0
    inode: int = 0
    seq: int = 0
    good: int = 0
    bad: int = 0


class DeviceStore:
    """Thread-safe access to the device's SQLite file."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an outbox row must survive a power cut once written
        self._db.execute("PRAGMA secure_delete=ON")  # forget-me overwrites deleted rows instead of freeing them
        self._migrate_outbox()
        self._db.executescript(DEVICE_SCHEMA)
        self._lock = threading.RLock()

    def _migrate_outbox(self) -> None:
        """Stores written before receipts existed allow only pending/sent/acked: rebuild the table (same rows)."""
        row = self._db.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='outbox'").fetchone()
        if row is None or "'received'" in row[0]:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("ALTER TABLE outbox RENAME TO outbox_old")
            self._db.execute(OUTBOX_TABLE)
            self._db.execute("INSERT INTO outbox SELECT * FROM outbox_old")
            self._db.execute("DROP TABLE outbox_old")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DeviceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """What is written inside commits together or not at all. Why: an update in the outbox and the learning
        state that produced it (top-k's residual) must not part: a crash between the two would later re-send the
        update while the residual had moved on (or train again from a residual that the sent update had already
        used), and compression would no longer be unbiased. Holds the store's lock throughout: other threads wait."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _q(self, sql: str, args: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    # ------------------------------------------------------------------ samples

    def add_samples(self, rows: Iterable[tuple[float, float]], source: str = "") -> int:
        """Insert (ts, value) rows; a ts already stored is ignored. Returns how many were new."""
        now = time.time()
        data = [(float(ts), float(v), source, now) for ts, v in rows]
        if not data:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO samples (ts, value, source, ingested) VALUES (?, ?, ?, ?)",
                                 data)
            self._db.execute("COMMIT")
            return self._db.total_changes - before

    def n_samples(self) -> int:
        return int(self._q("SELECT COUNT(*) FROM samples")[0][0])

    def series(self, limit: int | None = None) -> np.ndarray:
        """Values in time order (the newest `limit` when given); NaN marks a missing reading."""
        if limit is None:
            rows = self._q("SELECT value FROM samples ORDER BY ts")
        else:
            rows = self._q("SELECT value FROM (SELECT ts, value FROM samples ORDER BY ts DESC LIMIT ?) ORDER BY ts",
                           (int(limit),))
        return np.array([np.nan if r[0] is None else r[0] for r in rows], dtype=np.float64)

    def sample_span(self) -> tuple[float, float] | None:
        lo, hi = self._q("SELECT MIN(ts), MAX(ts) FROM samples")[0]
        return None if lo is None else (float(lo), float(hi))

    def prune_samples(self, keep: int) -> int:
        """Retention: keep the newest `keep` readings, delete older ones; returns how many went."""
        with self._lock:
            return self._db.execute("DELETE FROM samples WHERE ts < (SELECT ts FROM samples ORDER BY ts DESC"
                                    " LIMIT 1 OFFSET ?)", (max(0, int(keep) - 1),)).rowcount

    def delete_samples(self) -> int:
        with self._lock:
            n = self.n_samples()
            self._db.execute("DELETE FROM samples")  # read positions stay: a tailed file is not re-read
            return n

    # ------------------------------------------------------------------ ingest positions

    def ingest_position(self, source: str) -> IngestPosition:
        rows = self._q("SELECT offset, inode, seq, good, bad FROM ingest WHERE source=?", (source,))
        return IngestPosition(*rows[0]) if rows else IngestPosition()

    def save_ingest_position(self, source: str, pos: IngestPosition) -> None:
        self._q("INSERT INTO ingest (source, offset, inode, seq, good, bad, updated) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(source) DO UPDATE SET offset=excluded.offset, inode=excluded.inode, seq=excluded.seq,"
                " good=excluded.good, bad=excluded.bad, updated=excluded.updated",
                (source, pos.offset, pos.inode, pos.seq, pos.good, pos.bad, time.time()))

    def ingest_counts(self) -> dict[str, tuple[int, int]]:
        """source -> (good lines, bad lines)."""
        return {s: (g, b) for s, g, b in self._q("SELECT source, good, bad FROM ingest ORDER BY source")}

    # ------------------------------------------------------------------ outbox

    def outbox_put(self, round_id: int, msg_id: str, topic: str, payload: bytes) -> None:
        """Record an update before it is published (idempotent for the same key)."""
        now = time.time()
        self._q("INSERT OR IGNORE INTO outbox (round_id, msg_id, topic, payload, state, created, updated)"
                " VALUES (?, ?, ?, ?, 'pending', ?, ?)", (int(round_id), msg_id, topic, bytes(payload), now, now))

    def outbox_mark(self, round_id: int, msg_id: str, state: OutboxState) -> None:
        """Move an entry forward (a re-send counts an attempt but never moves it back); settled entries stay."""
        bump = 1 if state == "sent" else 0
        rank = OUTBOX_STATES.index(state)
        with self._lock:
            self._db.execute("UPDATE outbox SET attempts=attempts+?, updated=? WHERE round_id=? AND msg_id=?"
                             " AND state NOT IN ('received', 'rejected')", (bump, time.time(), int(round_id), msg_id))
            earlier = ",".join("?" * rank)
            self._db.execute(f"UPDATE outbox SET state=? WHERE round_id=? AND msg_id=? AND state IN ({earlier})",
                             (state, int(round_id), msg_id, *OUTBOX_STATES[:rank]))

    def outbox_settle(self, msg_id: str, state: OutboxState) -> OutboxEntry | None:
        """The coordinator answered the update with this message id (Receipt: received, Reject: rejected)."""
        with self._lock:
            rows = self._q("SELECT round_id FROM outbox WHERE msg_id=?", (msg_id,))
            if not rows:
                return None
            self.outbox_mark(rows[0][0], msg_id, state)
            return self.outbox_for_round(rows[0][0])

    def outbox_for_round(self, round_id: int) -> OutboxEntry | None:
        rows = self._q("SELECT round_id, msg_id, topic, payload, state, attempts FROM outbox WHERE round_id=?"
                       " ORDER BY created DESC LIMIT 1", (int(round_id),))
        return OutboxEntry(*rows[0]) if rows else None

    def outbox_unsettled(self, older_than_s: float = 0.0) -> list[OutboxEntry]:
        """Entries the coordinator has not answered (no Receipt, no Reject), last touched at least `older_than_s` ago:
        what a reconnect or a restart publishes again."""
        rows = self._q("SELECT round_id, msg_id, topic, payload, state, attempts FROM outbox"
                       " WHERE state NOT IN ('received', 'rejected') AND updated <= ? ORDER BY created",
                       (time.time() - older_than_s,))
        return [OutboxEntry(*r) for r in rows]

    def outbox_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OUTBOX_STATES, 0)
        counts.update({s: n for s, n in self._q("SELECT state, COUNT(*) FROM outbox GROUP BY state")})
        return counts

    def outbox_prune(self, keep_settled: int = 16) -> None:
        """Drop old settled entries (received or rejected); unsettled ones are never dropped."""
        self._q("DELETE FROM outbox WHERE state IN ('received', 'rejected') AND round_id NOT IN"
                " (SELECT round_id FROM outbox WHERE state IN ('received', 'rejected') ORDER BY round_id DESC"
                " LIMIT ?)", (keep_settled,))

    def delete_outbox(self) -> int:
        with self._lock:
            n = int(self._q("SELECT COUNT(*) FROM outbox")[0][0])
            self._db.execute("DELETE FROM outbox")
            return n

    # ------------------------------------------------------------------ personal state and meta

    def save_personal(self, name: str, params: Mapping[str, np.ndarray]) -> None:
        self.save_personal_blob(name, params_to_blob(params))

    def load_personal(self, name: str) -> dict[str, np.ndarray] | None:
        blob = self.load_personal_blob(name)
        return None if blob is None else params_from_blob(blob)

    def save_personal_blob(self, name: str, blob: bytes) -> None:
        """A named personal entry as bytes its owner encodes (the learning state: edge_client.learning.state)."""
        self._q("INSERT OR REPLACE INTO personal (name, params, updated) VALUES (?, ?, ?)", (name, bytes(blob),
                                                                                            time.time()))

    def load_personal_blob(self, name: str) -> bytes | None:
        rows = self._q("SELECT params FROM personal WHERE name=?", (name,))
        return bytes(rows[0][0]) if rows else None

    def personal_names(self) -> list[str]:
        return [r[0] for r in self._q("SELECT name FROM personal ORDER BY name")]

    def delete_personal(self, name: str | None = None) -> list[str]:
        """Delete one named personal entry, or all of them; returns the names deleted."""
        with self._lock:
            names = [n for n in self.personal_names() if name is None or n == name]
            self._db.executemany("DELETE FROM personal WHERE name=?", [(n,) for n in names])
            return names

    def set_meta(self, key: str, value: Any) -> None:
        self._q("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def incr_meta(self, key: str, by: int = 1) -> int:
        with self._lock:
            value = int(self.get_meta(key, 0)) + by
            self.set_meta(key, value)
            return value

    def delete_meta(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._q("DELETE FROM meta WHERE key=?", (key,))

    def vacuum(self) -> None:
        """Rewrite the file so deleted personal data does not linger in free pages."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")
