"""Durable fleet state: model versions, rounds, received updates, known devices, and the running sums of
streaming aggregation. SQLite (one file, the embedded default) or PostgreSQL (``postgresql://…``, for
coordinators whose ingestion runs in several processes or on several hosts).

Why a database: a coordinator that is killed mid-round must come back knowing which round was open,
which devices it asked, which updates it already has (stored as received, byte for byte) and
which global version is current. The (round, device) primary key makes a second copy of an update
a no-op, and closing a round writes the new model version and the round's state in one
transaction, so a round is aggregated exactly once even if the process dies in between.

At scale (10,000 devices) one transaction per message is what limits a coordinator: each commit is
an fsync. Writers therefore batch (:meth:`FleetState.transaction`, :meth:`FleetState.add_updates`):
hundreds of updates and presence changes commit at once, and the streaming sum of a batch's new
updates (:class:`~coordinator.fleet.aggregation.RunningSum`) is written in the same transaction as
the updates themselves, one row per ingesting process. The stored sums therefore always equal the sum
over the stored updates, whichever process dies when.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from coordinator.fleet.aggregation import RunningSum, check_finite
from edge_client.daemon.store import params_from_blob, params_to_blob  # one .npz blob format, shared with devices
from edge_client.wire.memory import SCHEMA as REPLAY_SCHEMA  # the replay memory's tables (coordinator.fleet.replay)

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
CREATE TABLE IF NOT EXISTS ingesters (
    name TEXT PRIMARY KEY, subscribed REAL NOT NULL);
CREATE TABLE IF NOT EXISTS round_sums (
    round_id INTEGER NOT NULL, ingester TEXT NOT NULL, count INTEGER NOT NULL, weight REAL NOT NULL,
    sums BLOB NOT NULL, PRIMARY KEY (round_id, ingester));
CREATE TABLE IF NOT EXISTS privacy (
    round_id INTEGER PRIMARY KEY, task TEXT NOT NULL, placement TEXT NOT NULL, noise_multiplier REAL NOT NULL,
    sampling_rate REAL NOT NULL, clip REAL NOT NULL, n_expected INTEGER NOT NULL, delta REAL NOT NULL,
    epsilon REAL NOT NULL, next_clip REAL);
"""
# columns added after the first release: (table, column, type) -- old databases get them on open
ADDED_COLUMNS = (
    ("updates", "metrics", "TEXT NOT NULL DEFAULT '{}'"),  # the device's metrics, read without decoding payloads
    ("devices", "backbone_sha256", "TEXT NOT NULL DEFAULT ''"),  # what the device said it runs (Hello)
    ("devices", "bundle_version", "INTEGER"),
    ("updates", "norm", "REAL"),  # the delta's L2 norm: a streamed round's bounds are planned from these
    ("updates", "summed", "INTEGER NOT NULL DEFAULT 0"),  # whether the update is in the round's running sum
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

    @functools.cached_property
    def selected_set(self) -> frozenset[str]:
        """`selected` as a set: a membership test per update must not scan 10,000 ids (the profile at 10,000 devices
        found one fifth of the coordinator's time there)."""
        return frozenset(self.selected)


@dataclass(frozen=True)
class StatusRow:
    """A device's presence (a Status message) on its way into the database; consecutive ones are written together
    (:meth:`FleetState.set_device_states`)."""

    device_id: str
    state: str


@dataclass(frozen=True)
class UpdateRow:
    """One validated update on its way into the database. ``weighted`` is what it adds to the round's
    streaming sum (the strategy's (f(Δ), w)), or None for rounds aggregated from stored updates."""

    round_id: int
    device_id: str
    msg_id: str
    n_samples: int
    payload: bytes
    metrics: Mapping[str, float]
    weighted: tuple[Mapping[str, np.ndarray], float] | None = None
    norm: float | None = None  # L2 norm of the delta: the round's adaptive bounds are computed from these at the close


@dataclass(frozen=True)
class PrivacyRow:
    """One round's entry in the privacy ledger (coordinator.fleet.privacy): its accountant event (sampling rate,
    noise multiplier), the clip and denominator it used, and the fleet's ε at `delta` once it is counted."""

    round_id: int
    task: str
    placement: str
    noise_multiplier: float
    sampling_rate: float
    clip: float
    n_expected: int
    delta: float
    epsilon: float
    next_clip: float | None = None  # the clip the next round starts from (adaptive clipping)


# what storing an update did: stored; the same message again (DUPLICATE: answer it with a receipt again); another
# message for a (round, device) that already has one (CONFLICT); the round is not open (NOT_OPEN)
STORED, DUPLICATE, CONFLICT, NOT_OPEN = "stored", "duplicate", "conflict", "not_open"


SUMS_MAGIC = b"fedge-sums-1\n"
_F64 = np.dtype("<f8")


def sums_to_blob(sums: Mapping[str, np.ndarray]) -> bytes:
    """A running sum as stored with every batch: msgpack of {name: [shape, little-endian float64 bytes]} behind a
    magic line (exact). Not an .npz: writing a zip archive per batch was 13 % of the batch writer's time at 10,000
    devices."""
    return SUMS_MAGIC + msgpack.packb({k: [list(np.shape(v)), np.ascontiguousarray(v, _F64).tobytes()]
                                       for k, v in sums.items()}, use_bin_type=True)


def sums_from_blob(blob: bytes) -> dict[str, np.ndarray]:
    """Either format: sums_to_blob's, or the .npz of rows written before it (a round left open across an upgrade)."""
    if not blob.startswith(SUMS_MAGIC):
        return params_from_blob(blob)
    return {k: np.frombuffer(raw, _F64).astype(np.float64).reshape(shape)
            for k, (shape, raw) in msgpack.unpackb(blob[len(SUMS_MAGIC):], raw=False).items()}


def is_postgres(url: str | Path) -> bool:
    return str(url).startswith(("postgresql://", "postgres://"))


class _Sqlite:
    name = "sqlite"
    begin = "BEGIN IMMEDIATE"  # take the write lock now: the round row read next cannot change under us
    lock_round = ""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        if readonly:
            if not path.is_file():
                raise FileNotFoundError(f"no fleet database at {path}")
            self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                      isolation_level=None, timeout=30)
            missing = [f"{t}.{c}" for t, c, _ in ADDED_COLUMNS
                       if c not in {r[1] for r in self.db.execute(f"PRAGMA table_info({t})")}]
            if missing:
                raise ValueError(f"{path} predates {', '.join(missing)}: open it once with `fedge serve`")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(FLEET_SCHEMA + REPLAY_SCHEMA)
        cols = {t: {r[1] for r in self.db.execute(f"PRAGMA table_info({t})")} for t, _, _ in ADDED_COLUMNS}
        for table, column, kind in ADDED_COLUMNS:
            if column not in cols[table]:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.db.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.db.executemany(sql, rows)

    def close(self) -> None:
        self.db.close()


class _Postgres:
    """psycopg 3 in autocommit mode; transactions are explicit BEGIN/COMMIT like SQLite's, and a batch or a close
    locks its round's row (FOR UPDATE), so ingestion workers and the aggregator serialise on the round."""

    name = "postgres"
    begin = "BEGIN"
    lock_round = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        import psycopg  # the postgres extra; imported only when a postgres URL is given

        self.db = psycopg.connect(url, autocommit=True)
        schema = (FLEET_SCHEMA + REPLAY_SCHEMA).replace("BLOB", "BYTEA").replace("REAL", "DOUBLE PRECISION")
        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(7919)")  # two processes creating the schema at once
            for stmt in filter(str.strip, schema.split(";")):
                self.db.execute(stmt)
            for table, column, kind in ADDED_COLUMNS:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.db.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.db.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    def close(self) -> None:
        self.db.close()


class FleetState:
    """Thread-safe access to the fleet database (paho's thread and the batch writer write, the round loop reads).

    ``FleetState("runs/fleet.sqlite")`` opens (or creates) a SQLite file; ``FleetState("postgresql://…")`` a
    PostgreSQL database that several coordinator processes may share."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        """`readonly` (the dashboard, SQLite): the file must exist and is never written; WAL lets it read while a
        coordinator writes."""
        self.url = str(path)
        self.path: Path | None = None if is_postgres(path) else Path(path)  # the SQLite file (replay memory beside)
        self._b: _Sqlite | _Postgres = _Postgres(self.url) if is_postgres(path) else _Sqlite(Path(path), readonly)
        self.backend = self._b.name
        self._lock = threading.RLock()
        self._depth = 0
        # (round, ingester) -> that ingester's running sum as this process last wrote it: a batch adds to it without
        # reading and decoding the stored blob again (valid while the row's count and weight still match)
        self._sums: dict[tuple[int, str], RunningSum] = {}

    def close(self) -> None:
        with self._lock:
            self._b.close()

    def _q(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._b.execute(sql, params)

    def _in(self, sql: str, prefix: Sequence[Any], keys: Sequence[Any], chunk: int = 500) -> list[tuple]:
        """Rows of `sql` with its `IN ({})` filled by `keys`, in chunks (one statement per 500 keys, not per key)."""
        out: list[tuple] = []
        for i in range(0, len(keys), chunk):
            part = keys[i:i + chunk]
            out.extend(self._q(sql.format(", ".join("?" * len(part))), (*prefix, *part)).fetchall())
        return out

    @contextlib.contextmanager
    def transaction(self) -> Iterator[FleetState]:
        """One transaction around everything inside (re-entrant: inner ones join the outer one). Writers
        batch through this: one commit, so one fsync, for hundreds of changes."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._q(self._b.begin)
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._depth = 0
                self._q("ROLLBACK")
                raise
            self._depth = 0
            self._q("COMMIT")

    # ------------------------------------------------------------------ models

    def latest_model(self, task: str) -> tuple[int, dict[str, np.ndarray], dict] | None:
        with self._lock:
            row = self._q("SELECT version, params, meta FROM models WHERE task=? ORDER BY version DESC LIMIT 1",
                          (task,)).fetchone()
        return None if row is None else (row[0], params_from_blob(bytes(row[1])), json.loads(row[2]))

    def model(self, version: int) -> dict[str, np.ndarray]:
        with self._lock:
            row = self._q("SELECT params FROM models WHERE version=?", (version,)).fetchone()
        if row is None:
            raise KeyError(f"no model version {version}")
        return params_from_blob(bytes(row[0]))

    def save_model(self, task: str, params: Mapping[str, np.ndarray], meta: dict | None = None,
                   round_id: int | None = None) -> int:
        check_finite(params)  # a stored inf model would stop every restart that publishes it
        with self.transaction():
            return self._insert_model(task, params, meta, round_id)

    def _insert_model(self, task: str, params: Mapping[str, np.ndarray], meta: dict | None,
                      round_id: int | None) -> int:
        (current,) = self._q("SELECT COALESCE(MAX(version), -1) FROM models").fetchone()
        version = current + 1
        self._q("INSERT INTO models (version, task, created, round_id, params, meta) VALUES (?, ?, ?, ?, ?, ?)",
                (version, task, time.time(), round_id, params_to_blob(params), json.dumps(meta or {})))
        return version

    # ------------------------------------------------------------------ rounds

    def open_round(self, task: str, kind: str, base_version: int, selected: list[str], quorum: int,
                   deadline: float, config: dict) -> RoundRecord:
        with self.transaction():
            round_id = self.next_round_id()
            self._q("INSERT INTO rounds (round_id, task, kind, base_version, state, selected, quorum, deadline, opened,"
                    " config) VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?, ?)",
                    (round_id, task, kind, base_version, json.dumps(selected), quorum, deadline, time.time(),
                     json.dumps(config)))
        return self.round(round_id)

    def next_round_id(self) -> int:
        with self._lock:
            return self._q("SELECT COALESCE(MAX(round_id), 0) + 1 FROM rounds").fetchone()[0]

    def round(self, round_id: int) -> RoundRecord:
        with self._lock:
            row = self._q("SELECT round_id, task, kind, base_version, state, selected, quorum, deadline, opened,"
                          " closed, new_version, config FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        if row is None:
            raise KeyError(f"no round {round_id}")
        return RoundRecord(row[0], row[1], row[2], row[3], row[4], tuple(json.loads(row[5])), row[6], row[7],
                           row[8], row[9], row[10], json.loads(row[11]))

    def open_rounds(self, task: str | None = None) -> list[RoundRecord]:
        with self._lock:
            if task is None:
                ids = [r[0] for r in self._q("SELECT round_id FROM rounds WHERE state='open' ORDER BY round_id")]
            else:
                ids = [r[0] for r in self._q(
                    "SELECT round_id FROM rounds WHERE task=? AND state='open' ORDER BY round_id", (task,))]
        return [self.round(i) for i in ids]

    def closed_rounds(self, task: str, kind: str) -> list[int]:
        """Ids of the closed rounds of one kind, oldest first (a restarted coordinator replays them)."""
        with self._lock:
            return [r[0] for r in self._q(
                "SELECT round_id FROM rounds WHERE task=? AND kind=? AND state='closed' ORDER BY round_id",
                (task, kind))]

    def finished_rounds(self) -> int:
        """Rounds that are closed or failed (a resumed run counts what earlier runs finished)."""
        with self._lock:
            return self._q("SELECT COUNT(*) FROM rounds WHERE state != 'open'").fetchone()[0]

    def extend_deadline(self, round_id: int, deadline: float) -> None:
        with self.transaction():
            self._q("UPDATE rounds SET deadline=? WHERE round_id=? AND state='open'", (deadline, round_id))

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
        with self.transaction():
            row = self._q(f"SELECT state, new_version FROM rounds WHERE round_id=?{self._b.lock_round}",
                          (round_id,)).fetchone()
            if row[0] != "open":
                return row[1]
            return self._close(round_id, new_params, task, meta, personal)

    def close_streaming_round(self, round_id: int, task: str, finish: Any, meta: dict | None = None,
                              ) -> tuple[bool, int | None]:
        """Close a round from its stored running sums, in the transaction that reads them (no ingestion
        process can add an update in between). ``finish(running, rows, fetch) -> params`` makes the new head from
        the running sum, each stored update's (device, n_samples, norm, whether it is in the sum), and
        ``fetch(device_ids)``, which returns
        the stored payloads of the few updates the round's bounds change. Returns (done, new version); done is
        False, and nothing changes, when the sums do not cover exactly the stored updates (a device was forgotten
        mid-round, or the round predates streaming): the caller then aggregates from the stored updates instead.
        Raises NonFiniteModel (and stores nothing) for a head that is not finite in float32."""
        with self.transaction():
            row = self._q(f"SELECT state, new_version FROM rounds WHERE round_id=?{self._b.lock_round}",
                          (round_id,)).fetchone()
            if row[0] != "open":
                return True, row[1]
            running = self._round_sum(round_id)
            rows = self._q("SELECT device_id, n_samples, norm, summed FROM updates WHERE round_id=? ORDER BY device_id",
                           (round_id,)).fetchall()
            if not rows or running.count != sum(r[3] for r in rows) or any(r[2] is None for r in rows):
                return False, None

            def fetch(devices: Sequence[str]) -> dict[str, bytes]:
                return {d: bytes(p) for d in devices for (p,) in self._q(
                    "SELECT payload FROM updates WHERE round_id=? AND device_id=?", (round_id, d)).fetchall()}

            params = finish(running, [(d, n, float(norm), bool(summed)) for d, n, norm, summed in rows], fetch)
            check_finite(params)
            return True, self._close(round_id, params, task, meta, None)

    def _close(self, round_id: int, new_params: Mapping[str, np.ndarray] | None, task: str, meta: dict | None,
               personal: Mapping[str, Mapping[str, np.ndarray]] | None) -> int | None:
        version = None if new_params is None else self._insert_model(task, new_params, meta, round_id)
        for device_id, params in (personal or {}).items():
            self._q("INSERT INTO personal (device_id, round_id, params) VALUES (?, ?, ?) ON CONFLICT (device_id)"
                    " DO UPDATE SET round_id=excluded.round_id, params=excluded.params",
                    (device_id, round_id, params_to_blob(params)))
        self._q("UPDATE rounds SET state='closed', closed=?, new_version=? WHERE round_id=?",
                (time.time(), version, round_id))
        return version

    def personal(self, device_id: str) -> dict[str, np.ndarray] | None:
        """The personalised head the coordinator last computed for a device (task-vector strategy)."""
        with self._lock:
            row = self._q("SELECT params FROM personal WHERE device_id=?", (device_id,)).fetchone()
        return None if row is None else params_from_blob(bytes(row[0]))

    def fail_round(self, round_id: int) -> None:
        with self.transaction():
            self._q("UPDATE rounds SET state='failed', closed=? WHERE round_id=? AND state='open'",
                    (time.time(), round_id))

    # ------------------------------------------------------------------ updates

    def add_update(self, round_id: int, device_id: str, msg_id: str, n_samples: int, payload: bytes,
                   metrics: Mapping[str, float] | None = None) -> bool:
        """True if stored, False if this device already has an update in this round (any round state)."""
        with self.transaction():
            cur = self._q("INSERT INTO updates (round_id, device_id, msg_id, n_samples, payload, received, metrics)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                          (round_id, device_id, msg_id, n_samples, payload, time.time(),
                           json.dumps(dict(metrics or {}))))
            return cur.rowcount == 1

    def prune(self, keep_rounds: int, keep_models: int = 8) -> dict[str, int]:
        """Retention: the payloads (deltas) of updates of finished rounds older than the newest `keep_rounds` are
        dropped; their rows stay with the sample count and metrics (``updates.metrics``, filled from the payload
        first for a row stored before that column existed); model versions other than the initial one and the
        newest `keep_models` are deleted. Returns what was pruned."""
        from edge_client.wire import ProtocolError, decode

        with self.transaction():
            (last,) = self._q("SELECT COALESCE(MAX(round_id), 0) FROM rounds").fetchone()
            old = self._q(
                "SELECT u.round_id, u.device_id, u.payload, u.metrics FROM updates u JOIN rounds r USING (round_id)"
                " WHERE r.state != 'open' AND u.round_id <= ? AND length(u.payload) > 0", (last - keep_rounds,)
            ).fetchall()
            for round_id, device_id, payload, metrics in old:
                if metrics == "{}":  # stored before updates had a metrics column
                    with contextlib.suppress(ProtocolError):
                        metrics = json.dumps(dict(getattr(decode(bytes(payload)), "metrics", {})))
                self._q("UPDATE updates SET payload=?, metrics=? WHERE round_id=? AND device_id=?",
                        (b"", metrics, round_id, device_id))
            models = self._q(
                "DELETE FROM models WHERE version != 0 AND version NOT IN (SELECT version FROM models ORDER BY"
                " version DESC LIMIT ?) AND version NOT IN (SELECT base_version FROM rounds WHERE state='open')",
                (keep_models,)).rowcount
        return {"update_payloads": len(old), "models": models}

    def update_msg_id(self, round_id: int, device_id: str) -> str | None:
        """The message id of the update stored for (round, device), if any."""
        with self._lock:
            row = self._q("SELECT msg_id FROM updates WHERE round_id=? AND device_id=?",
                          (round_id, device_id)).fetchone()
        return None if row is None else row[0]

    def add_updates(self, rows: Sequence[UpdateRow], ingester: str = "coordinator") -> list[str]:
        """Store a batch of updates for open rounds in one transaction: per row STORED, DUPLICATE (this message is
        stored already), CONFLICT (this device has another update in the round) or NOT_OPEN (the round closed or
        never existed). The new rows' weighted deltas are added to this ingester's running sum of their round,
        written in the same transaction.

        Three statements per round in the batch, whatever its size: the round's state (locked on PostgreSQL), the
        message ids already stored for the batch's devices, and one ``executemany`` insert of the new rows. Exact
        because the transaction holds the write lock (SQLite's BEGIN IMMEDIATE, PostgreSQL's row lock on the round)
        from the first read to the commit: no other writer can store an update of these rounds in between; and a
        plain INSERT (no ON CONFLICT) turns any disagreement into an error that rolls the batch back."""
        with self.transaction():
            rounds = sorted({r.round_id for r in rows})
            state = {rid: (self._q(f"SELECT state FROM rounds WHERE round_id=?{self._b.lock_round}", (rid,))
                           .fetchone() or ("missing",))[0] for rid in rounds}
            have: dict[tuple[int, str], str] = {}
            for rid in rounds:
                if state[rid] == "open":
                    devices = sorted({r.device_id for r in rows if r.round_id == rid})
                    have.update(((rid, d), m) for d, m in self._in(
                        "SELECT device_id, msg_id FROM updates WHERE round_id=? AND device_id IN ({})", (rid,),
                        devices))
            added: dict[int, RunningSum] = {}
            new: list[tuple] = []
            out = []
            now = time.time()
            for r in rows:
                if state[r.round_id] != "open":
                    out.append(NOT_OPEN)
                    continue
                known = have.get((r.round_id, r.device_id))
                if known is not None:
                    out.append(DUPLICATE if known == r.msg_id else CONFLICT)
                    continue
                have[(r.round_id, r.device_id)] = r.msg_id  # a second copy later in this batch is a duplicate
                new.append((r.round_id, r.device_id, r.msg_id, r.n_samples, r.payload, now,
                            json.dumps(dict(r.metrics)), r.norm, int(r.weighted is not None)))
                out.append(STORED)
                if r.weighted is not None:
                    added.setdefault(r.round_id, RunningSum()).add(*r.weighted)
            if new:
                self._b.executemany("INSERT INTO updates (round_id, device_id, msg_id, n_samples, payload, received,"
                                    " metrics, norm, summed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", new)
            for rid, part in added.items():
                total = self._ingester_sum(rid, ingester).merge(part)
                self._q("INSERT INTO round_sums (round_id, ingester, count, weight, sums) VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT (round_id, ingester) DO UPDATE SET count=excluded.count,"
                        " weight=excluded.weight, sums=excluded.sums",
                        (rid, ingester, total.count, total.weight, sums_to_blob(total.sums)))
                for old in [k for k in self._sums if k[1] == ingester and k[0] != rid]:
                    del self._sums[old]
                self._sums[(rid, ingester)] = total
            return out

    def _ingester_sum(self, round_id: int, ingester: str) -> RunningSum:
        """This ingester's stored running sum of a round. The copy this process wrote last is used when the row still
        has its count and weight (no rollback, no forget in between: both change them); otherwise the blob is read."""
        row = self._q("SELECT count, weight FROM round_sums WHERE round_id=? AND ingester=?",
                      (round_id, ingester)).fetchone()
        if row is None:
            return RunningSum()
        held = self._sums.get((round_id, ingester))
        if held is not None and (held.count, held.weight) == (row[0], row[1]):
            return held
        (blob,) = self._q("SELECT sums FROM round_sums WHERE round_id=? AND ingester=?",
                          (round_id, ingester)).fetchone()
        return RunningSum(sums_from_blob(bytes(blob)), row[1], row[0])

    def _round_sum(self, round_id: int) -> RunningSum:
        total = RunningSum()
        for count, weight, blob in self._q("SELECT count, weight, sums FROM round_sums WHERE round_id=?"
                                           " ORDER BY ingester", (round_id,)).fetchall():
            total = total.merge(RunningSum(sums_from_blob(bytes(blob)), weight, count))
        return total

    def round_sum(self, round_id: int) -> RunningSum:
        """The round's running sum over every ingester (what a streaming close aggregates)."""
        with self._lock:
            return self._round_sum(round_id)

    def updates(self, round_id: int) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(d, bytes(p)) for d, p in self._q(
                "SELECT device_id, payload FROM updates WHERE round_id=? ORDER BY device_id", (round_id,))]

    def reports(self, round_id: int) -> dict[str, tuple[int, dict[str, float]]]:
        """device -> (n_samples, metrics) of the round's stored updates, without decoding their payloads."""
        with self._lock:
            rows = self._q("SELECT device_id, n_samples, metrics FROM updates WHERE round_id=? ORDER BY device_id",
                           (round_id,)).fetchall()
        return {d: (n, json.loads(m or "{}")) for d, n, m in rows}

    def reported(self, round_id: int) -> set[str]:
        with self._lock:
            return {r[0] for r in self._q("SELECT device_id FROM updates WHERE round_id=?", (round_id,))}

    def count_updates(self, round_id: int) -> int:
        with self._lock:
            return self._q("SELECT COUNT(*) FROM updates WHERE round_id=?", (round_id,)).fetchone()[0]

    def mark_subscribed(self, ingester: str) -> None:
        """An ingest worker's shared subscription is in place (the coordinator waits for its workers)."""
        with self.transaction():
            self._q("INSERT INTO ingesters (name, subscribed) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET"
                    " subscribed=excluded.subscribed", (ingester, time.time()))

    def subscribed_since(self, since: float) -> set[str]:
        with self._lock:
            return {r[0] for r in self._q("SELECT name FROM ingesters WHERE subscribed >= ?", (since,))}

    # ------------------------------------------------------------------ privacy

    def charge_privacy(self, row: PrivacyRow) -> bool:
        """Record what a round costs (idempotent: a round is charged once, whoever asks again). True if new."""
        with self.transaction():
            cur = self._q("INSERT INTO privacy (round_id, task, placement, noise_multiplier, sampling_rate, clip,"
                          " n_expected, delta, epsilon, next_clip) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                          " ON CONFLICT DO NOTHING", dataclasses.astuple(row))
            return cur.rowcount == 1

    def set_next_clip(self, round_id: int, clip: float) -> None:
        with self.transaction():
            self._q("UPDATE privacy SET next_clip=? WHERE round_id=?", (clip, round_id))

    def privacy_ledger(self, task: str | None = None) -> list[PrivacyRow]:
        """Every charged round, oldest first: what each cost and the fleet's ε after it."""
        with self._lock:
            rows = self._q("SELECT round_id, task, placement, noise_multiplier, sampling_rate, clip, n_expected,"
                           " delta, epsilon, next_clip FROM privacy" + (" WHERE task=?" if task else "")
                           + " ORDER BY round_id", (task,) if task else ()).fetchall()
        return [PrivacyRow(*r) for r in rows]

    # ------------------------------------------------------------------ replay memory (coordinator.fleet.replay)

    def replay_seen(self, msg_id: str) -> bool:
        with self._lock:
            return self._q("SELECT 1 FROM replay_seen WHERE msg_id=?", (msg_id,)).fetchone() is not None

    def remember_replay(self, msg_id: str, received: float, prune: tuple[float, int] | None = None) -> None:
        """Remember an act-once message id; `prune` (older than, most kept) drops old ids in the same transaction."""
        with self.transaction():
            self._q("INSERT INTO replay_seen (msg_id, received) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (msg_id, received))
            if prune is not None:
                self._q("DELETE FROM replay_seen WHERE received < ? OR msg_id IN (SELECT msg_id FROM replay_seen"
                        " ORDER BY received DESC LIMIT -1 OFFSET ?)" if self.backend == "sqlite" else
                        "DELETE FROM replay_seen WHERE received < ? OR msg_id IN (SELECT msg_id FROM replay_seen"
                        " ORDER BY received DESC OFFSET ?)", prune)

    def replay_last(self, key: str) -> float | None:
        with self._lock:
            row = self._q("SELECT value FROM replay_last WHERE key=?", (key,)).fetchone()
        return None if row is None else float(row[0])

    def advance_replay(self, key: str, value: float) -> None:
        with self.transaction():
            self._q("INSERT INTO replay_last (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET"
                    " value=GREATEST(replay_last.value, excluded.value)" if self.backend == "postgres" else
                    "INSERT INTO replay_last (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET"
                    " value=MAX(value, excluded.value)", (key, value))

    # ------------------------------------------------------------------ devices

    def forget_device(self, device_id: str) -> dict[str, int]:
        """Delete every per-device record in one transaction (rows deleted per table). An open round
        simply no longer counts the device's update (its running sums are dropped, so the round is then
        aggregated from the stored updates); aggregated models stay as they are."""
        with self.transaction():
            self._q("DELETE FROM round_sums WHERE round_id IN (SELECT u.round_id FROM updates u JOIN rounds r"
                    " ON r.round_id = u.round_id WHERE u.device_id = ? AND r.state = 'open')", (device_id,))
            return {table: self._q(f"DELETE FROM {table} WHERE device_id = ?", (device_id,)).rowcount
                    for table in ("updates", "personal", "devices")}

    def upsert_device(self, device_id: str, *, domain: str = "", profile: str = "", runtime: str = "",
                      n_train: int = 0, state: str | None = None, backbone_sha256: str = "",
                      bundle_version: int | None = None) -> None:
        """Register or refresh a device's card; `state` None keeps the known state (a retained
        hello says what a device is, not whether it is still there)."""
        with self.transaction():
            self._q("INSERT INTO devices (device_id, domain, profile, runtime, n_train, state, last_seen,"
                    " backbone_sha256, bundle_version) VALUES (?, ?, ?, ?, ?, COALESCE(?, 'unknown'), ?, ?, ?)"
                    " ON CONFLICT(device_id) DO UPDATE SET domain=excluded.domain, profile=excluded.profile,"
                    " runtime=excluded.runtime, n_train=excluded.n_train, state=COALESCE(?, devices.state),"
                    " last_seen=excluded.last_seen, backbone_sha256=excluded.backbone_sha256,"
                    " bundle_version=excluded.bundle_version",
                    (device_id, domain, profile, runtime, n_train, state, time.time(), backbone_sha256,
                     bundle_version, state))

    def set_device_state(self, device_id: str, state: str) -> bool:
        """Presence of a known device; a status never registers a device (only a hello does). False: unknown."""
        return self.set_device_states([(device_id, state)])[0]

    def set_device_states(self, changes: Sequence[tuple[str, str]]) -> list[bool]:
        """Presence of many devices at once, in order ((device, state) each; a later change of a device wins), in one
        transaction of two statements: which devices are known, and one ``executemany`` update. Per change: whether
        the device is known (a status never registers one)."""
        with self.transaction():
            devices = sorted({d for d, _ in changes})
            known = {r[0] for r in self._in("SELECT device_id FROM devices WHERE device_id IN ({})", (), devices)}
            now = time.time()
            rows = [(state, now, d) for d, state in changes if d in known]
            if rows:
                self._b.executemany("UPDATE devices SET state=?, last_seen=? WHERE device_id=?", rows)
            return [d in known for d, _ in changes]

    def devices(self, *, online_only: bool = False) -> dict[str, dict]:
        query = ("SELECT device_id, domain, profile, runtime, n_train, state, last_seen, backbone_sha256,"
                 " bundle_version FROM devices")
        if online_only:
            query += f" WHERE state IN {ONLINE_STATES}"
        with self._lock:
            rows = self._q(query + " ORDER BY device_id").fetchall()
        keys = ("domain", "profile", "runtime", "n_train", "state", "last_seen", "backbone_sha256", "bundle_version")
        return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in rows}

    def count_online(self) -> int:
        with self._lock:
            return self._q("SELECT COUNT(*) FROM devices WHERE state IN ('online', 'idle', 'training')").fetchone()[0]

    def known_devices(self, device_ids: Sequence[str]) -> set[str]:
        """Which of these devices are registered (one query per 500 ids)."""
        with self._lock:
            return {r[0] for r in self._in("SELECT device_id FROM devices WHERE device_id IN ({})", (),
                                           sorted(set(device_ids)))}

    def has_device(self, device_id: str) -> bool:
        with self._lock:
            return self._q("SELECT 1 FROM devices WHERE device_id=?", (device_id,)).fetchone() is not None

    # ------------------------------------------------------------------ read-only views (dashboard, metrics)
    # Plain SQL that PostgreSQL runs as well; aggregation over the JSON metrics happens in Python so no
    # backend needs JSON functions.

    def device_counts(self) -> dict[str, int]:
        """Known devices per state ('online', 'idle', 'training', 'offline', 'unknown')."""
        with self._lock:
            return dict(self._q("SELECT state, COUNT(*) FROM devices GROUP BY state").fetchall())

    def bundle_versions(self) -> dict[int | None, int]:
        """Known devices per installed bundle version (None: the device runs no bundle or did not say)."""
        with self._lock:
            return dict(self._q("SELECT bundle_version, COUNT(*) FROM devices GROUP BY bundle_version"))

    def round_counts(self) -> dict[tuple[str, str], int]:
        """Rounds per (kind, state)."""
        with self._lock:
            rows = self._q("SELECT kind, state, COUNT(*) FROM rounds GROUP BY kind, state").fetchall()
        return {(k, s): n for k, s, n in rows}

    def latest_model_meta(self, task: str) -> tuple[int, dict] | None:
        """(version, meta) of the current global model without loading its parameters. The meta carries
        the backbone pin, and ``dp_epsilon`` once differential privacy is on: the privacy spent so far."""
        with self._lock:
            row = self._q("SELECT version, meta FROM models WHERE task=? ORDER BY version DESC LIMIT 1",
                                   (task,)).fetchone()
        return None if row is None else (row[0], json.loads(row[1]))

    def round_rows(self, limit: int = 100) -> list[RoundRow]:
        """The newest `limit` rounds, newest first (their update counts: :meth:`round_totals`)."""
        with self._lock:
            rows = self._q(
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
            rows = self._q(f"SELECT round_id, COUNT(*), SUM(LENGTH(payload)) FROM updates WHERE round_id IN"
                                    f" ({marks}) GROUP BY round_id", tuple(round_ids)).fetchall()
        return {r: (n, b) for r, n, b in rows}

    def update_stamp(self) -> tuple[int, int | None]:
        """(updates stored, newest round with one): changes whenever an update is stored or deleted."""
        with self._lock:
            n, newest = self._q("SELECT COUNT(*), MAX(round_id) FROM updates").fetchone()
        return n, newest

    def round_metrics(self, round_id: int) -> dict[str, dict[str, float]]:
        """device -> the metrics it reported in one round."""
        with self._lock:
            rows = self._q("SELECT device_id, metrics FROM updates WHERE round_id=?", (round_id,)).fetchall()
        return {d: json.loads(m) for d, m in rows}

    def device_history(self, device_id: str, limit: int = 200) -> list[dict]:
        """The rounds a device reported in, newest first: round, kind, when, samples, bytes, metrics."""
        with self._lock:
            rows = self._q(
                "SELECT u.round_id, r.kind, r.state, u.received, u.n_samples, LENGTH(u.payload), u.metrics"
                " FROM updates u JOIN rounds r ON r.round_id = u.round_id WHERE u.device_id=?"
                " ORDER BY u.round_id DESC LIMIT ?", (device_id, limit)).fetchall()
        keys = ("round_id", "kind", "round_state", "received", "n_samples", "bytes")
        return [{**dict(zip(keys, r[:6], strict=True)), "metrics": json.loads(r[6])} for r in rows]

    def latest_device_metrics(self) -> dict[str, dict[str, float]]:
        """device -> the metrics of its newest stored update (the fleet table's personal-vs-global gain)."""
        with self._lock:
            rows = self._q(
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
