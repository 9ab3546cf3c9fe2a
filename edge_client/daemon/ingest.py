"""Getting the device's readings into its store: a CSV file that grows, stdin, or a local UNIX socket.

A sensor process writes readings however it likes; the daemon only appends them to
:class:`edge_client.daemon.store.DeviceStore`. Stream sources (stdin, socket) take one reading per line,
either ``timestamp,value`` or JSON ``{"ts": ..., "value": ...}``; timestamps are epoch seconds or
ISO 8601 (naive means UTC). A CSV file is tailed by byte offset (kept in the store, so a restart
does not read it twice); when the file shrinks or its inode changes (truncated, rotated) it is read
from the start again, and a time column, if named, makes re-read rows duplicates that the store
ignores. A line that cannot be parsed is logged and counted, never fatal; an empty value is a
missing reading (NaN), which the windowing skips.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from edge_client.daemon.store import DeviceStore, IngestPosition
from edge_client.data.readings import BadReading, Columns, parse_timestamp, parse_value, rows

log = logging.getLogger("fedge.ingest")

MAX_LINE_BYTES = 4096  # a reading is a short line; anything longer is garbage (or an attack)
LOG_EVERY_BAD = 100  # log the first bad line of a source and then every 100th, not every one


def parse_line(line: str) -> tuple[float, float] | None:
    """(ts, value) of one stream line; None for a blank line; BadReading for anything else."""
    line = line.strip()
    if not line:
        return None
    if len(line) > MAX_LINE_BYTES:
        raise BadReading(f"line of {len(line)} characters")
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadReading(f"bad JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise BadReading("JSON reading must be an object")
        ts = next((obj[k] for k in ("ts", "timestamp", "time") if k in obj), None)
        if ts is None or "value" not in obj:
            raise BadReading("JSON reading needs 'ts' (or 'timestamp') and 'value'")
        return parse_timestamp(ts), parse_value(obj["value"])
    parts = line.split(",")
    if len(parts) != 2:
        raise BadReading(f"expected 'timestamp,value', got {len(parts)} fields")
    return parse_timestamp(parts[0]), parse_value(parts[1])


class _Counter:
    """Good/bad line counts of one source, persisted with its read position."""

    def __init__(self, store: DeviceStore, source: str) -> None:
        self.store, self.source = store, source
        self.pos = store.ingest_position(source)

    def bad(self, what: str, err: Exception) -> None:
        self.pos = replace(self.pos, bad=self.pos.bad + 1)
        if self.pos.bad == 1 or self.pos.bad % LOG_EVERY_BAD == 0:
            log.warning("ingest %s: bad line %s (%d bad so far): %s", self.source, what, self.pos.bad, err)

    def save(self, **changes: int) -> None:
        self.pos = replace(self.pos, **changes)
        self.store.save_ingest_position(self.source, self.pos)


def ingest_lines(store: DeviceStore, lines: Iterable[str], counter: _Counter) -> int:
    """Parse and store stream lines; returns how many new samples were stored."""
    rows, good = [], 0
    for line in lines:
        try:
            row = parse_line(line)
        except BadReading as err:
            counter.bad(repr(line[:60]), err)
            continue
        if row is not None:
            rows.append(row)
            good += 1
    new = store.add_samples(rows, counter.source)
    counter.save(good=counter.pos.good + good)
    return new


# --------------------------------------------------------------------------- CSV file that grows


class CsvTail:
    """Reads the rows appended to a CSV file since the last call (header on the first line).

    Without ``time_column`` each row gets the next sequence number as its key (kept in the store),
    so only the byte offset prevents double reads; with it, the row's timestamp is the key."""

    def __init__(self, store: DeviceStore, path: str | Path, column: str, time_column: str | None = None) -> None:
        self.store, self.path, self.column, self.time_column = store, Path(path), column, time_column
        self.counter = _Counter(store, f"csv:{self.path}")
        self._header: Columns | None = None

    def poll(self) -> int:
        """Ingest what was appended; returns the number of new samples (0 if the file is absent)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        pos = self.counter.pos
        if st.st_ino != pos.inode or st.st_size < pos.offset:
            if pos.inode:
                log.info("ingest %s: file was rotated or truncated; reading it from the start", self.path)
            self._header = None
            self.counter.save(offset=0, inode=st.st_ino)
            pos = self.counter.pos
        if st.st_size == pos.offset:
            return 0
        with open(self.path, "rb") as fh:
            fh.seek(pos.offset)
            data = fh.read(st.st_size - pos.offset)
        end = data.rfind(b"\n")
        if end < 0:
            return 0  # a partial line: wait until the writer finishes it
        chunk, offset = data[: end + 1], pos.offset + end + 1
        lines = chunk.decode("utf-8", errors="replace").splitlines()
        if pos.offset == 0 or self._header is None:
            self._header = self._read_header(lines if pos.offset == 0 else None)
            if pos.offset == 0:
                lines = lines[1:]
        new = self._ingest_rows(lines)
        self.counter.save(offset=offset)
        return new

    def _read_header(self, lines: list[str] | None) -> Columns:
        if lines is None:  # resumed mid-file after a restart: the header is the file's first line
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                lines = [fh.readline()]
        return Columns.of(next(rows(lines[:1]), []), self.column, self.time_column, str(self.path))

    def _ingest_rows(self, lines: list[str]) -> int:
        assert self._header is not None
        readings, seq, good = [], self.counter.pos.seq, 0
        for row in rows(lines):
            try:
                ts, value = self._header.reading(row)
            except BadReading as err:
                self.counter.bad(repr(",".join(row)[:60]), err)
                continue
            if ts is None:
                seq += 1
                ts = float(seq)
            readings.append((ts, value))
            good += 1
        new = self.store.add_samples(readings, self.counter.source)
        self.counter.save(seq=seq, good=self.counter.pos.good + good)
        return new


# --------------------------------------------------------------------------- streams


class LineSource:
    """Ingests newline-delimited readings from a byte stream (stdin, a socket connection). Each read
    is stored in one transaction, so a burst of lines costs one commit, a trickle one per reading."""

    def __init__(self, store: DeviceStore, source: str) -> None:
        self.store = store
        self.counter = _Counter(store, source)
        self._lock = threading.Lock()  # several socket connections share one counter

    def consume(self, read: Callable[[], bytes]) -> int:
        """Call `read` (b'' at EOF) until EOF; returns the number of new samples."""
        new, buf, dropping = 0, b"", False
        while chunk := read():
            if dropping:  # the rest of a line already dropped as too long is part of that bad line, not a new one
                start = chunk.find(b"\n")
                if start < 0:
                    continue
                chunk, dropping = chunk[start + 1 :], False
            buf += chunk
            end = buf.rfind(b"\n")
            if end < 0:
                if len(buf) > MAX_LINE_BYTES:  # no newline in sight: drop it as one bad line
                    with self._lock:
                        self.counter.bad(repr(buf[:60]), BadReading(f"line longer than {MAX_LINE_BYTES} bytes"))
                    buf, dropping = b"", True
                continue
            new += self._store(buf[: end + 1])
            buf = buf[end + 1 :]
        return new + self._store(buf)  # a last line without newline at EOF

    def _store(self, data: bytes) -> int:
        if not data:
            return 0
        lines = data.decode("utf-8", errors="replace").splitlines()
        with self._lock:
            return ingest_lines(self.store, lines, self.counter)


def start_stdin(store: DeviceStore, fd: int = 0) -> threading.Thread:
    """Ingest a file descriptor (stdin by default) on a daemon thread until EOF."""
    source = LineSource(store, "stdin")
    t = threading.Thread(target=source.consume, args=(lambda: os.read(fd, 65536),), name="ingest-stdin",
                         daemon=True)
    t.start()
    return t


class SocketSource:
    """A local UNIX stream socket; every connection may send readings, one per line."""

    def __init__(self, store: DeviceStore, path: str | Path, mode: int = 0o660) -> None:
        self.path = Path(path)
        self.source = LineSource(store, f"socket:{self.path}")
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()  # left over by a killed daemon
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, mode)
        self.sock.listen(8)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="ingest-socket", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="ingest-conn", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.source.consume(lambda: conn.recv(65536))
            except OSError as exc:
                log.warning("ingest %s: connection dropped: %s", self.path, exc)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def import_series(store: DeviceStore, source: str, values: Iterable[float]) -> int:
    """Store a whole series once (a dataset slice for simulated devices), keyed by position."""
    pos = store.ingest_position(source)
    if pos.seq:
        return 0
    rows = [(float(i + 1), float(v)) for i, v in enumerate(values)]
    new = store.add_samples(rows, source)
    store.save_ingest_position(source, IngestPosition(seq=len(rows), good=len(rows)))
    return new
