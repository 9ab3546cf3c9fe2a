"""Durable fleet state in SQLite: model versions, rounds, received updates, known devices.

Why SQLite: a coordinator that is killed mid-round must come back knowing which round was open,
which devices it asked, which updates it already has (stored as received, byte for byte) and
which global version is current. The (round, device) primary key makes a second copy of an update
a no-op, and closing a round writes the new model version and the round's state in one
transaction, so a round is aggregated exactly once even if the process dies in between.
"""

from __future__ import annotations

import contextlib
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
CREATE TABLE IF NOT EXISTS personal (
    device_id TEXT PRIMARY KEY, round_id INTEGER NOT NULL, params BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, domain TEXT, profile TEXT, runtime TEXT, n_train INTEGER,
    state TEXT NOT NULL DEFAULT 'unknown', last_seen REAL NOT NULL);
CREATE INDEX IF NOT EXISTS updates_by_device ON updates (device_id, round_id);
"""
# columns added after the first release: (table, column, type) -- old databases get them on open
ADDED_COLUMNS = (
    ("updates", "metrics", "TEXT NOT NULL DEFAULT '{}'"),  # the device's metrics, read without decoding payloads
    ("devices", "backbone_sha256", "TEXT NOT NULL DEFAULT ''"),  # what the device said it runs (Hello)
    ("devices", "bundle_version", "INTEGER"),
)


ONLINE_STATES = "('online', 'idle', 'training')"  # device states that mean "connected now"


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

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        """`readonly` (the dashboard): the file must exist and is never written; WAL lets it read while a
        coordinator writes."""
        self.path = Path(path)
        self._lock = threading.RLock()
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no fleet database at {self.path}")
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None, timeout=30)
            missing = [f"{t}.{c}" for t, c, _ in ADDED_COLUMNS
                       if c not in {r[1] for r in self._db.execute(f"PRAGMA table_info({t})")}]
            if missing:
                raise ValueError(f"{self.path} predates {', '.join(missing)}: open it once with `fedge serve`")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(FLEET_SCHEMA)
        for table, column, kind in ADDED_COLUMNS:
            if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

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

    def add_update(self, round_id: int, device_id: str, msg_id: str, n_samples: int, payload: bytes,
                   metrics: Mapping[str, float] | None = None) -> bool:
        """True if stored, False if this device already has an update in this round."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO updates (round_id, device_id, msg_id, n_samples, payload, received, metrics)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", (round_id, device_id, msg_id, n_samples, payload, time.time(),
                                                  json.dumps(dict(metrics or {}))))
            return cur.rowcount == 1

    def prune(self, keep_rounds: int, keep_models: int = 8) -> dict[str, int]:
        """Retention: the payloads (deltas) of updates of finished rounds older than the newest `keep_rounds` are
        dropped; their rows stay with the sample count and metrics (``updates.metrics``, filled from the payload
        first for a row stored before that column existed); model versions other than the initial one and the
        newest `keep_models` are deleted. Returns what was pruned."""
        from edge_client.wire import ProtocolError, decode

        with self._lock:
            (last,) = self._db.execute("SELECT COALESCE(MAX(round_id), 0) FROM rounds").fetchone()
            old = self._db.execute(
                "SELECT u.round_id, u.device_id, u.payload, u.metrics FROM updates u JOIN rounds r USING (round_id)"
                " WHERE r.state != 'open' AND u.round_id <= ? AND length(u.payload) > 0", (last - keep_rounds,)
            ).fetchall()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for round_id, device_id, payload, metrics in old:
                    if metrics == "{}":  # stored before updates had a metrics column
                        with contextlib.suppress(ProtocolError):
                            metrics = json.dumps(dict(getattr(decode(payload), "metrics", {})))
                    self._db.execute("UPDATE updates SET payload=x'', metrics=? WHERE round_id=? AND device_id=?",
                                     (metrics, round_id, device_id))
                models = self._db.execute(
                    "DELETE FROM models WHERE version != 0 AND version NOT IN (SELECT version FROM models ORDER BY"
                    " version DESC LIMIT ?) AND version NOT IN (SELECT base_version FROM rounds WHERE state='open')",
                    (keep_models,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return {"update_payloads": len(old), "models": models}

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
                      n_train: int = 0, state: str | None = None, backbone_sha256: str = "",
                      bundle_version: int | None = None) -> None:
        """Register or refresh a device's card; `state` None keeps the known state (a retained
        hello says what a device is, not whether it is still there)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO devices (device_id, domain, profile, runtime, n_train, state, last_seen, backbone_sha256,"
                " bundle_version) VALUES (?, ?, ?, ?, ?, COALESCE(?, 'unknown'), ?, ?, ?) ON CONFLICT(device_id) DO"
                " UPDATE SET domain=excluded.domain, profile=excluded.profile, runtime=excluded.runtime,"
                " n_train=excluded.n_train, state=COALESCE(?, devices.state), last_seen=excluded.last_seen,"
                " backbone_sha256=excluded.backbone_sha256, bundle_version=excluded.bundle_version",
                (device_id, domain, profile, runtime, n_train, state, time.time(), backbone_sha256, bundle_version,
                 state))

    def set_device_state(self, device_id: str, state: str) -> bool:
        """Presence of a known device; a status never registers a device (only a hello does). False: unknown."""
        with self._lock:
            return self._db.execute("UPDATE devices SET state=?, last_seen=? WHERE device_id=?",
                                    (state, time.time(), device_id)).rowcount == 1

    def devices(self, *, online_only: bool = False) -> dict[str, dict]:
        query = ("SELECT device_id, domain, profile, runtime, n_train, state, last_seen, backbone_sha256,"
                 " bundle_version FROM devices")
        if online_only:
            query += f" WHERE state IN {ONLINE_STATES}"
        with self._lock:
            rows = self._db.execute(query + " ORDER BY device_id").fetchall()
        keys = ("domain", "profile", "runtime", "n_train", "state", "last_seen", "backbone_sha256", "bundle_version")
        return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in rows}

    def has_device(self, device_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM devices WHERE device_id=?", (device_id,)).fetchone() is not None

    # ------------------------------------------------------------------ read-only views (dashboard, metrics)
    # Plain SQL that PostgreSQL runs as well; aggregation over the JSON metrics happens in Python so no
    # backend needs JSON functions.

    def device_counts(self) -> dict[str, int]:
        """Known devices per state ('online', 'idle', 'training', 'offline', 'unknown')."""
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM devices GROUP BY state").fetchall())

    def bundle_versions(self) -> dict[int | None, int]:
        """Known devices per installed bundle version (None: the device runs no bundle or did not say)."""
        with self._lock:
            return dict(self._db.execute("SELECT bundle_version, COUNT(*) FROM devices GROUP BY bundle_version"))

    def round_counts(self) -> dict[tuple[str, str], int]:
        """Rounds per (kind, state)."""
        with self._lock:
            rows = self._db.execute("SELECT kind, state, COUNT(*) FROM rounds GROUP BY kind, state").fetchall()
        return {(k, s): n for k, s, n in rows}

    def latest_model_meta(self, task: str) -> tuple[int, dict] | None:
        """(version, meta) of the current global model without loading its parameters. The meta carries
        the backbone pin, and ``dp_epsilon`` once differential privacy is on: the privacy spent so far."""
        with self._lock:
            row = self._db.execute("SELECT version, meta FROM models WHERE task=? ORDER BY version DESC LIMIT 1",
                                   (task,)).fetchone()
        return None if row is None else (row[0], json.loads(row[1]))

    def round_rows(self, limit: int = 100) -> list[RoundRow]:
        """The newest `limit` rounds, newest first (their update counts: :meth:`round_totals`)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT round_id, task, kind, state, base_version, new_version, selected, quorum, deadline, opened,"
                " closed FROM rounds ORDER BY round_id DESC LIMIT ?", (limit,)).fetchall()
        return [RoundRow(round_id=r[0], task=r[1], kind=r[2], state=r[3], base_version=r[4], new_version=r[5],
                         n_selected=len(json.loads(r[6])), quorum=r[7], deadline=r[8], opened=r[9], closed=r[10])
                for r in rows]

    def round_totals(self, round_ids: list[int]) -> dict[int, tuple[int, int]]:
        """round -> (updates stored, their bytes); rounds without an update are absent. Separate from
        :meth:`round_rows` so a reader can keep the totals of finished rounds instead of summing them again."""
        if not round_ids:
            return {}
        marks = ", ".join("?" * len(round_ids))
        with self._lock:
            rows = self._db.execute(f"SELECT round_id, COUNT(*), SUM(LENGTH(payload)) FROM updates WHERE round_id IN"
                                    f" ({marks}) GROUP BY round_id", tuple(round_ids)).fetchall()
        return {r: (n, b) for r, n, b in rows}

    def update_stamp(self) -> tuple[int, int | None]:
        """(updates stored, newest round with one): changes whenever an update is stored or deleted."""
        with self._lock:
            n, newest = self._db.execute("SELECT COUNT(*), MAX(round_id) FROM updates").fetchone()
        return n, newest

    def round_metrics(self, round_id: int) -> dict[str, dict[str, float]]:
        """device -> the metrics it reported in one round."""
        with self._lock:
            rows = self._db.execute("SELECT device_id, metrics FROM updates WHERE round_id=?", (round_id,)).fetchall()
        return {d: json.loads(m) for d, m in rows}

    def device_history(self, device_id: str, limit: int = 200) -> list[dict]:
        """The rounds a device reported in, newest first: round, kind, when, samples, bytes, metrics."""
        with self._lock:
            rows = self._db.execute(
                "SELECT u.round_id, r.kind, r.state, u.received, u.n_samples, LENGTH(u.payload), u.metrics"
                " FROM updates u JOIN rounds r ON r.round_id = u.round_id WHERE u.device_id=?"
                " ORDER BY u.round_id DESC LIMIT ?", (device_id, limit)).fetchall()
        keys = ("round_id", "kind", "round_state", "received", "n_samples", "bytes")
        return [{**dict(zip(keys, r[:6], strict=True)), "metrics": json.loads(r[6])} for r in rows]

    def latest_device_metrics(self) -> dict[str, dict[str, float]]:
        """device -> the metrics of its newest stored update (the fleet table's personal-vs-global gain)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT u.device_id, u.metrics FROM updates u JOIN (SELECT device_id, MAX(round_id) AS newest"
                " FROM updates GROUP BY device_id) n ON n.device_id = u.device_id AND n.newest = u.round_id"
            ).fetchall()
        return {d: json.loads(m) for d, m in rows}


@dataclass(frozen=True)
class RoundRow:
    """One round as the fleet views show it (no device list, no parameters)."""

    round_id: int
    task: str
    kind: str
    state: str
    base_version: int
    new_version: int | None
    n_selected: int
    quorum: int
    deadline: float
    opened: float
    closed: float | None
