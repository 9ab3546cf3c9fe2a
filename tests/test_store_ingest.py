"""The device's SQLite store and its data sources: a growing CSV (incl. partial lines, truncation and
rotation), stdin and a UNIX socket, garbage lines counted and skipped; the outbox state machine;
the resource check. No broker, no model: these run in well under a second each."""

from __future__ import annotations

import json
import math
import os
import socket
import time

import numpy as np
import pytest

from edge_client.daemon import ingest as I
from edge_client.daemon import resources as R
from edge_client.daemon.config import DeviceConfig
from edge_client.daemon.store import DB_NAME, DeviceStore
from edge_client.data.readings import BadReading


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture
def store(tmp_path):
    s = DeviceStore(tmp_path / "state")
    yield s
    s.close()


# --------------------------------------------------------------------------- store


def test_samples_are_deduplicated_by_key_and_survive_reopening(tmp_path):
    with DeviceStore(tmp_path) as s:
        assert s.add_samples([(3.0, 30.0), (1.0, 10.0), (2.0, math.nan)], "a") == 3
        assert s.add_samples([(2.0, 99.0), (4.0, 40.0)], "a") == 1  # ts 2 already stored: ignored, not replaced
    with DeviceStore(tmp_path) as s:
        np.testing.assert_array_equal(s.series(), [10.0, np.nan, 30.0, 40.0])
        np.testing.assert_array_equal(s.series(limit=2), [30.0, 40.0])
        assert s.sample_span() == (1.0, 4.0)


def test_outbox_moves_forward_only_and_keeps_entries_until_the_coordinator_answers(store):
    store.outbox_put(1, "m1", "t/1", b"one")
    store.outbox_put(1, "m1", "t/1", b"other bytes")  # same key: the first write stays
    store.outbox_put(2, "m2", "t/2", b"two")
    assert [e.payload for e in store.outbox_unsettled()] == [b"one", b"two"]
    store.outbox_mark(1, "m1", "sent")
    store.outbox_mark(1, "m1", "acked")
    store.outbox_mark(1, "m1", "pending")  # never backwards
    assert store.outbox_for_round(1).state == "acked" and store.outbox_for_round(1).attempts == 1
    assert [e.round_id for e in store.outbox_unsettled()] == [1, 2]  # the broker's ack is not the coordinator's
    assert store.outbox_unsettled(older_than_s=3600) == []
    assert store.outbox_settle("m1", "received").state == "received"
    store.outbox_mark(1, "m1", "sent")  # a late re-send's bookkeeping does not reopen it
    assert store.outbox_for_round(1).state == "received" and store.outbox_settle("nope", "received") is None
    assert [e.round_id for e in store.outbox_unsettled()] == [2]
    for r in range(3, 30):
        store.outbox_put(r, f"m{r}", "t", b"x")
        store.outbox_settle(f"m{r}", "rejected" if r % 2 else "received")
    store.outbox_prune(keep_settled=4)
    assert store.outbox_counts() == {"pending": 1, "sent": 0, "acked": 0, "received": 2, "rejected": 2}
    assert store.outbox_for_round(2).state == "pending"


def test_an_outbox_written_before_receipts_existed_is_migrated(tmp_path):
    import sqlite3

    con = sqlite3.connect(tmp_path / DB_NAME)
    con.execute("CREATE TABLE outbox (round_id INTEGER NOT NULL, msg_id TEXT NOT NULL, topic TEXT NOT NULL, payload"
                " BLOB NOT NULL, state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'acked')), created REAL NOT"
                " NULL, updated REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (round_id, msg_id))")
    con.execute("INSERT INTO outbox VALUES (7, 'm7', 't', x'00', 'acked', 1, 1, 1)")
    con.commit()
    con.close()
    with DeviceStore(tmp_path) as s:
        assert s.outbox_settle("m7", "received").state == "received"


def test_personal_state_round_trips_and_is_deleted(store):
    head = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    store.save_personal("head", head)
    loaded = store.load_personal("head")
    assert set(loaded) == {"w", "b"} and loaded["w"].dtype == np.float32
    np.testing.assert_array_equal(loaded["w"], head["w"])
    assert store.delete_personal() == ["head"] and store.load_personal("head") is None


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("line, expected", [
    ("1700000000,1.5", (1700000000.0, 1.5)),
    ("2024-01-02T03:04:05Z,2", (1704164645.0, 2.0)),
    ("2024-01-02 03:04:05,2", (1704164645.0, 2.0)),  # naive is UTC
    ('{"ts": 5, "value": 7.25}', (5.0, 7.25)),
    ('{"timestamp": "1970-01-01T00:00:10+00:00", "value": null}', (10.0, math.nan)),
    ("6,", (6.0, math.nan)),  # empty value: a missing reading
    ("   ", None),
])
def test_parse_line_accepts_readings(line, expected):
    got = I.parse_line(line)
    if expected is None:
        assert got is None
    else:
        assert got[0] == expected[0] and (got[1] == expected[1] or (math.isnan(got[1]) and math.isnan(expected[1])))


@pytest.mark.parametrize("line", ["garbage", "1,2,3", "x,1", "1,abc", "1,inf", "{not json", "[1, 2]",
                                  '{"value": 1}', '{"ts": 1}', "nan,1", "1," + "9" * 5000])
def test_parse_line_refuses_garbage(line):
    with pytest.raises(BadReading):
        I.parse_line(line)


# --------------------------------------------------------------------------- CSV tail


def test_csv_tail_reads_appends_waits_for_partial_lines_and_counts_garbage(store, tmp_path):
    path = tmp_path / "meter.csv"
    path.write_text("date,kwh\n2024-01-01T00:00,1.0\n2024-01-01T01:00,2.0\n")
    tail = I.CsvTail(store, path, "kwh")
    assert tail.poll() == 2
    with open(path, "a") as fh:
        fh.write("2024-01-01T02:00,oops\nonly-one-field\n2024-01-01T03:00,4.0\n2024-01-01T04:0")  # last: partial
    assert tail.poll() == 1
    assert store.ingest_counts()[f"csv:{path}"] == (3, 2)
    with open(path, "a") as fh:
        fh.write("0,5.0\n")
    assert tail.poll() == 1
    np.testing.assert_array_equal(store.series(), [1.0, 2.0, 4.0, 5.0])
    assert I.CsvTail(store, path, "kwh").poll() == 0  # a restarted daemon resumes at the stored offset


def test_csv_tail_with_time_column_survives_truncation_and_rotation(store, tmp_path):
    path = tmp_path / "meter.csv"
    path.write_text("ts,v\n1,10\n2,20\n3,30\n")
    tail = I.CsvTail(store, path, "v", time_column="ts")
    assert tail.poll() == 3
    path.write_text("ts,v\n3,30\n4,40\n")  # truncated and rewritten: row 3 again is a duplicate
    assert tail.poll() == 1
    path.rename(tmp_path / "meter.csv.1")  # rotated: a new file with a new inode
    path.write_text("ts,v\n5,50\n6,60\n")
    assert tail.poll() == 2
    np.testing.assert_array_equal(store.series(), [10, 20, 30, 40, 50, 60])
    assert store.ingest_counts()[f"csv:{path}"][1] == 0


@pytest.mark.parametrize("time_column", [None, "ts"])
def test_info_reads_a_csv_as_the_daemon_stores_it(store, tmp_path, time_column):
    """`fedge-edge info` (DataSource.load) and the daemon's tail read one CSV reader: the same rows are refused
    (wrong field count, garbage, Inf), NA and empty cells are missing, a repeated timestamp counts once."""
    path = tmp_path / "m.csv"
    path.write_text("ts,v\n1,1.5\n2,oops\n3,\n4,NA\n5,inf\n5,2.5\n6,3.5,extra\n2,9\n7,4.5\n")
    I.CsvTail(store, path, "v", time_column=time_column).poll()
    source = DeviceConfig.model_validate({"device_id": "d", "fleet": "f", "backbone": "b.onnx", "data": {
        "kind": "csv", "path": str(path), "column": "v", "time_column": time_column}}).data
    read, _, _ = source.load()
    np.testing.assert_array_equal(read, store.series())
    expected = [1.5, np.nan, np.nan, 2.5, 9.0, 4.5] if time_column is None else [1.5, 9.0, np.nan, np.nan, 2.5, 4.5]
    np.testing.assert_array_equal(read, expected)


def test_csv_tail_refuses_a_file_without_the_column(store, tmp_path):
    path = tmp_path / "meter.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(KeyError, match="no column 'kwh'"):
        I.CsvTail(store, path, "kwh").poll()
    assert I.CsvTail(store, tmp_path / "absent.csv", "kwh").poll() == 0


# --------------------------------------------------------------------------- streams


def test_stdin_lines_are_stored_and_garbage_counted(store):
    r, w = os.pipe()
    thread = I.start_stdin(store, fd=r)
    lines = [f"{i},{i * 0.5}" for i in range(100)] + ["nonsense", '{"ts": 100, "value": 1}', "\xff\xfe,1"]
    os.write(w, ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    os.close(w)
    thread.join(10)
    os.close(r)
    assert not thread.is_alive()
    assert store.n_samples() == 101
    assert store.ingest_counts()["stdin"] == (101, 2)


def test_socket_source_takes_several_connections_and_survives_garbage(store, tmp_path):
    path = tmp_path / "in.sock"
    src = I.SocketSource(store, path)
    try:
        for chunk in (b"1,1.0\n2,2.0\nrubbish\n", json.dumps({"ts": 3, "value": 3.0}).encode() + b"\n",
                      b"x" * (I.MAX_LINE_BYTES + 10), b"4,4.0"):  # an endless line, a last line without newline
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                s.sendall(chunk)
        _wait(lambda: store.n_samples() == 4 and store.ingest_counts().get(f"socket:{path}", (0, 0))[1] == 2)
        np.testing.assert_array_equal(store.series(), [1.0, 2.0, 3.0, 4.0])
    finally:
        src.close()
    assert not path.exists()


def test_import_series_happens_once(store):
    assert I.import_series(store, "dataset:x", [1.0, 2.0, 3.0]) == 3
    assert I.import_series(store, "dataset:x", [1.0, 2.0, 3.0, 4.0]) == 0
    assert store.n_samples() == 3


# --------------------------------------------------------------------------- resources and config


def test_resource_check_reasons(tmp_path):
    ok = R.Snapshot(free_mb=2000, load_per_core=0.1, battery_pct=50, on_battery=True)
    assert R.check(R.ResourceLimits(), ok) is None
    assert "free memory" in R.check(R.ResourceLimits(min_free_mb=4000), ok)
    assert "load" in R.check(R.ResourceLimits(max_load=0.05), ok)
    assert "battery" in R.check(R.ResourceLimits(min_battery_pct=80), ok)
    charging = R.Snapshot(free_mb=2000, load_per_core=0.1, battery_pct=50, on_battery=False)
    assert R.check(R.ResourceLimits(min_battery_pct=80), charging) is None
    pause = tmp_path / "pause"
    pause.touch()
    assert "paused" in R.check(R.ResourceLimits(pause_file=str(pause)), ok)
    assert R.free_memory_mb() is None or R.free_memory_mb() > 0  # real /proc/meminfo parses


def test_fake_battery_is_read_from_sysfs_layout(tmp_path):
    bat = tmp_path / "BAT0"
    bat.mkdir()
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("17\n")
    (bat / "status").write_text("Discharging\n")
    (tmp_path / "AC").mkdir()
    (tmp_path / "AC" / "type").write_text("Mains\n")
    assert R.battery(tmp_path) == (17.0, True)
    assert R.battery(tmp_path / "absent") == (None, False)


def test_old_configs_stay_valid_and_new_tables_are_checked(tmp_path):
    old = DeviceConfig.model_validate({"device_id": "m", "backbone": "b.onnx",
                                       "data": {"kind": "csv", "path": "x.csv", "column": "kwh"}})
    assert old.state_dir is None and old.resources == R.ResourceLimits() and old.bundle is None
    os.environ.pop("STATE_DIRECTORY", None)
    assert old.state_path().name == "demo-m"
    with pytest.raises(ValueError, match="needs 'path'"):
        DeviceConfig.model_validate({"device_id": "m", "backbone": "b", "data": {"kind": "socket"}})
    with pytest.raises(ValueError, match="backbone"):
        DeviceConfig.model_validate({"device_id": "m"})
    with pytest.raises(ValueError, match="extra"):
        DeviceConfig.model_validate({"device_id": "m", "backbone": "b", "resources": {"min_free": 1}})


def test_a_stored_update_answers_only_the_round_it_was_computed_for():
    """A resumed round (same opening time) gets the stored update again; a reset coordinator's round with the
    same number, base version and kind but another opening time does not."""
    from edge_client.daemon.client import EdgeClient
    from edge_client.daemon.outbox import OutboxEntry
    from edge_client.wire import RoundTask, Update, encode

    sent = Update(fleet="f", device_id="d", round_id=3, base_version=2, n_samples=5, round_opened=1_700_000_000.5)
    entry = OutboxEntry(3, sent.msg_id, "t", encode(sent), "acked", 1)
    task = RoundTask(fleet="f", device_id="d", round_id=3, model_version=2, deadline_ts=2e9,
                     round_opened=1_700_000_000.5)
    assert EdgeClient._same_task(entry, task)
    assert not EdgeClient._same_task(entry, task.model_copy(update={"round_opened": 1_800_000_000.0}))
    assert not EdgeClient._same_task(entry, task.model_copy(update={"model_version": 1}))
    assert not EdgeClient._same_task(OutboxEntry(3, "x", "t", b"\x00garbage", "acked", 1), task)


def test_retention_keeps_the_newest_readings(store):
    store.add_samples([(float(t), float(t)) for t in range(100)])
    assert store.prune_samples(30) == 70
    assert store.n_samples() == 30 and store.sample_span() == (70.0, 99.0)
    assert store.prune_samples(30) == 0


def test_the_tail_of_a_dropped_long_line_is_not_read_as_a_line(store):
    """However the stream is cut into reads, an over-long line counts once as bad and nothing of it is stored:
    its tail, after the drop, used to come back as a second bad line (or, ending like a reading, as data)."""
    reads = iter([b"x" * (I.MAX_LINE_BYTES + 1), b"x" * 5, b"5,5.0\n7,7.0\n", b"8,8.0"])
    src = I.LineSource(store, "reads")
    assert src.consume(lambda: next(reads, b"")) == 2
    assert store.n_samples() == 2 and store.ingest_counts()["reads"][1] == 1
