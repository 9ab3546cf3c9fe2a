"""Durable fleet state in SQLite: model versions, rounds, received updates, known devices.

Why SQLite: a coordinator that is killed mid-round must come back knowing which round was open,
which devices it asked, which updates it already has (stored as received, byte for byte) and
which global version is current. The (round, device) primary key makes a second copy of an update
a no-op, and closing a round writes the new model version and the round's state in one
transaction, so a round is aggregated exactly once even if the process dies in between.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.fleet.aggregation import check_finite
from edge_client.daemon.store import params_from_blob, params_to_blob  # one .npz blob format, shared with devices

FLEET_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY, task TEXT NOT NULL, created REAL NOT NULL,
    round_id INTEGER, params BLOB NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY, task TEXT NOT NULL, kind TEXT NOT NULL, base_version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'closed', 'failed')),
    selected TEXT NOT NULL, quorum INTEGER NOT NULL, deadline REAL NOT NULL,
    opened REAL NOT NULL, closed REAL, new_version INTEGER, config TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS updates (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, msg_id TEXT NOT NULL, n_samples INTEGER NOT NULL,
    payload BLOB NOT NULL, received REAL NOT NULL, PRIMARY KEY (round_id, device_id));
CREATE TABLE IF NOT EXISTS update_metrics (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, n_samples INTEGER NOT NULL, metrics TEXT NOT NULL,
    PRIMARY KEY (round_id, device_id));
CREATE TABLE IF NOT EXISTS personal (
    device_id TEXT PRIMARY KEY, round_id INTEGER NOT NULL, params BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, domain TEXT, profile TEXT, runtime TEXT, n_train INTEGER,
    state TEXT NOT NULL DEFAULT 'unknown', last_seen REAL NOT NULL);
"""


@dataclass(frozen=True)
class RoundRecord:
    round_id: int
    task: str
    kind: str
    base_version: int
    state: str
    selected: tuple[str, ...]
    quorum: int
    deadline: float
    opened: float
    closed: float | None
    new_version: int | None
    config: dict


class FleetState:
    """Thread-safe wrapper around one SQLite file (paho's thread writes updates, the round loop reads)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(FLEET_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ models

    def latest_model(self, task: str) -> tuple[int, dict[str, np.ndarray], dict] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, params, meta FROM models WHERE task=? ORDER BY version DESC LIMIT 1", (task,)
            ).fetchone()
        return None if row is None else (row[0], params_from_blob(row[1]), json.loads(row[2]))

    def model(self, version: int) -> dict[str, np.ndarray]:
        with self._lock:
            row = self._db.execute("SELECT params FROM models WHERE version=?", (version,)).fetchone()
        if row is None:
            raise KeyError(f"no model version {version}")
        return params_from_blob(row[0])

    def save_model(self, task: str, params: Mapping[str, np.ndarray], meta: dict | None = None,
                   round_id: int | None = None) -> int:
        check_finite(params)  # a stored inf model would stop every restart that publishes it
        with self._lock:
            (current,) = self._db.execute("SELECT COALESCE(MAX(version), -1) FROM models").fetchone()
            version = current + 1
            self._db.execute(
                "INSERT INTO models (version, task, created, round_id, params, meta) VALUES (?, ?, ?, ?, ?, ?)",
                (version, task, time.time(), round_id, params_to_blob(params), json.dumps(meta or {})),
            )
        return version

    # ------------------------------------------------------------------ rounds

    def open_round(self, task: str, kind: str, base_version: int, selected: list[str], quorum: int,
                   deadline: float, config: dict) -> RoundRecord:
        with self._lock:
            last = self.next_round_id() - 1
            self._db.execute(
                "INSERT INTO rounds (round_id, task, kind, base_version, state, selected, quorum, deadline, opened,"
                " config) VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?, ?)",
                (last + 1, task, kind, base_version, json.dumps(selected), quorum, deadline, time.time(),
                 json.dumps(config)),
            )
            return self.round(last + 1)

    def next_round_id(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(round_id), 0) + 1 FROM rounds").fetchone()[0]

    def round(self, round_id: int) -> RoundRecord:
        with self._lock:
            row = self._db.execute(
                "SELECT round_id, task, kind, base_version, state, selected, quorum, deadline, opened, closed,"
                " new_version, config FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        if row is None:
            raise KeyError(f"no round {round_id}")
        return RoundRecord(row[0], row[1], row[2], row[3], row[4], tuple(json.loads(row[5])), row[6], row[7],
                           row[8], row[9], row[10], json.loads(row[11]))

    def open_rounds(self, task: str) -> list[RoundRecord]:
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT round_id FROM rounds WHERE task=? AND state='open' ORDER BY round_id", (task,))]
        return [self.round(i) for i in ids]

    def closed_rounds(self, task: str, kind: str) -> list[int]:
        """Ids of the closed rounds of one kind, oldest first (a restarted coordinator replays them)."""
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT round_id FROM rounds WHERE task=? AND kind=? AND state='closed' ORDER BY round_id",
                (task, kind))]

    def finished_rounds(self) -> int:
        """Rounds that are closed or failed (a resumed run counts what earlier runs finished)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM rounds WHERE state != 'open'").fetchone()[0]

    def extend_deadline(self, round_id: int, deadline: float) -> None:
        with self._lock:
            self._db.execute("UPDATE rounds SET deadline=? WHERE round_id=? AND state='open'", (deadline, round_id))

    def close_round(self, round_id: int, new_params: Mapping[str, np.ndarray] | None, task: str,
                    meta: dict | None = None,
                    personal: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> int | None:
        """Store the aggregate (and any per-device personalised heads) and close the round in one
        transaction; a second call is a no-op that returns the version the first call created. Raises
        NonFiniteModel (and stores nothing) for a model that is not finite in float32."""
        if new_params is not None:
            check_finite(new_params)
        for device_id, params in (personal or {}).items():
            check_finite(params, f"personal[{device_id}]")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                state, new_version = self._db.execute(
                    "SELECT state, new_version FROM rounds WHERE round_id=?", (round_id,)).fetchone()
                if state != "open":
                    self._db.execute("ROLLBACK")
                    return new_version
                version = None
                if new_params is not None:
                    (current,) = self._db.execute("SELECT COALESCE(MAX(version), -1) FROM models").fetchone()
                    version = current + 1
                    self._db.execute(
                        "INSERT INTO models (version, task, created, round_id, params, meta) VALUES (?, ?, ?, ?, ?, ?)",
                        (version, task, time.time(), round_id, params_to_blob(new_params), json.dumps(meta or {})))
                for device_id, params in (personal or {}).items():
                    self._db.execute("INSERT OR REPLACE INTO personal (device_id, round_id, params) VALUES (?, ?, ?)",
                                     (device_id, round_id, params_to_blob(params)))
                self._db.execute("UPDATE rounds SET state='closed', closed=?, new_version=? WHERE round_id=?",
                                 (time.time(), version, round_id))
                self._db.execute("COMMIT")
                return version
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def personal(self, device_id: str) -> dict[str, np.ndarray] | None:
        """The personalised head the coordinator last computed for a device (task-vector strategy)."""
        with self._lock:
            row = self._db.execute("SELECT params FROM personal WHERE device_id=?", (device_id,)).fetchone()
        return None if row is None else params_from_blob(row[0])

    def fail_round(self, round_id: int) -> None:
        with self._lock:
            self._db.execute("UPDATE rounds SET state='failed', closed=? WHERE round_id=? AND state='open'",
                             (time.time(), round_id))

    # ------------------------------------------------------------------ updates

    def add_update(self, round_id: int, device_id: str, msg_id: str, n_samples: int, payload: bytes) -> bool:
        """True if stored, False if this device already has an update in this round."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO updates (round_id, device_id, msg_id, n_samples, payload, received)"
                " VALUES (?, ?, ?, ?, ?, ?)", (round_id, device_id, msg_id, n_samples, payload, time.time()))
            return cur.rowcount == 1

    def prune(self, keep_rounds: int, keep_models: int = 8) -> dict[str, int]:
        """Retention: the payloads (deltas) of updates of finished rounds older than the newest `keep_rounds` are
        dropped, their metrics and sample counts kept in ``update_metrics``; model versions other than the initial
        one and the newest `keep_models` are deleted. Returns what was pruned."""
        from edge_client.wire import ProtocolError, decode

        with self._lock:
            (last,) = self._db.execute("SELECT COALESCE(MAX(round_id), 0) FROM rounds").fetchone()
            old = self._db.execute(
                "SELECT u.round_id, u.device_id, u.n_samples, u.payload FROM updates u JOIN rounds r USING (round_id)"
                " WHERE r.state != 'open' AND u.round_id <= ? AND length(u.payload) > 0", (last - keep_rounds,)
            ).fetchall()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for round_id, device_id, n_samples, payload in old:
                    try:
                        metrics = dict(getattr(decode(payload), "metrics", {}))
                    except ProtocolError:
                        metrics = {}
                    self._db.execute("INSERT OR REPLACE INTO update_metrics (round_id, device_id, n_samples, metrics)"
                                     " VALUES (?, ?, ?, ?)", (round_id, device_id, n_samples, json.dumps(metrics)))
                    self._db.execute("UPDATE updates SET payload=x'' WHERE round_id=? AND device_id=?",
                                     (round_id, device_id))
                models = self._db.execute(
                    "DELETE FROM models WHERE version != 0 AND version NOT IN (SELECT version FROM models ORDER BY"
                    " version DESC LIMIT ?) AND version NOT IN (SELECT base_version FROM rounds WHERE state='open')",
                    (keep_models,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return {"update_payloads": len(old), "models": models}

    def update_metrics(self, round_id: int) -> dict[str, dict[str, float]]:
        """Metrics of a round's updates whose payloads retention dropped (device -> metrics)."""
        with self._lock:
            rows = self._db.execute("SELECT device_id, metrics FROM update_metrics WHERE round_id=?",
                                    (round_id,)).fetchall()
        return {d: json.loads(m) for d, m in rows}

    def update_msg_id(self, round_id: int, device_id: str) -> str | None:
        """The message id of the update stored for (round, device), if any."""
        with self._lock:
            row = self._db.execute("SELECT msg_id FROM updates WHERE round_id=? AND device_id=?",
                                   (round_id, device_id)).fetchone()
        return None if row is None else row[0]

    def updates(self, round_id: int) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self._db.execute(
                "SELECT device_id, payload FROM updates WHERE round_id=? ORDER BY device_id", (round_id,)))

    def reported(self, round_id: int) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT device_id FROM updates WHERE round_id=?", (round_id,))}

    # ------------------------------------------------------------------ devices

    def forget_device(self, device_id: str) -> dict[str, int]:
        """Delete every per-device record in one transaction (rows deleted per table). An open round
        simply no longer counts the device's update; aggregated models stay as they are."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                deleted = {table: self._db.execute(f"DELETE FROM {table} WHERE device_id = ?", (device_id,)).rowcount
                           for table in ("updates", "personal", "devices")}
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return deleted

    def upsert_device(self, device_id: str, *, domain: str = "", profile: str = "", runtime: str = "",
                      n_train: int = 0, state: str | None = None) -> None:
        """Register or refresh a device's card; `state` None keeps the known state (a retained
        hello says what a device is, not whether it is still there)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO devices (device_id, domain, profile, runtime, n_train, state, last_seen)"
                " VALUES (?, ?, ?, ?, ?, COALESCE(?, 'unknown'), ?) ON CONFLICT(device_id) DO UPDATE SET"
                " domain=excluded.domain, profile=excluded.profile, runtime=excluded.runtime,"
                " n_train=excluded.n_train, state=COALESCE(?, devices.state), last_seen=excluded.last_seen",
                (device_id, domain, profile, runtime, n_train, state, time.time(), state))

    def set_device_state(self, device_id: str, state: str) -> bool:
        """Presence of a known device; a status never registers a device (only a hello does). False: unknown."""
        with self._lock:
            return self._db.execute("UPDATE devices SET state=?, last_seen=? WHERE device_id=?",
                                    (state, time.time(), device_id)).rowcount == 1

    def devices(self, *, online_only: bool = False) -> dict[str, dict]:
        query = "SELECT device_id, domain, profile, runtime, n_train, state, last_seen FROM devices"
        if online_only:
            query += " WHERE state IN ('online', 'idle', 'training')"
        with self._lock:
            rows = self._db.execute(query + " ORDER BY device_id").fetchall()
        keys = ("domain", "profile", "runtime", "n_train", "state", "last_seen")
        return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in rows}

    def has_device(self, device_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM devices WHERE device_id=?", (device_id,)).fetchone() is not None
