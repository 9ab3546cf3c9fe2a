"""The one reader of readings in CSV form, with one set of rules for the daemon's tail of a growing file, for
`fedge-edge info` and simulated devices reading a whole file, and for the datasets fedge ships or finds.

Rules: a header names the columns; a row with another number of fields is refused; a value cell that is empty,
``NA`` or ``NaN`` is a missing reading (NaN, which the windowing skips); ``Inf`` and anything that is not a
number are refused; timestamps are epoch seconds or ISO 8601 (naive means UTC). A refused row is counted by the
caller, never fatal. With a time column, a timestamp read twice keeps its first row (as the daemon's store
does), and the series is in time order.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import numpy as np

MISSING = frozenset({"", "NA", "NAN"})  # upper-cased cells that mean "no reading"


class BadReading(ValueError):
    """A row, line or cell that is not a reading."""


def parse_timestamp(text: object) -> float:
    """Epoch seconds from a number or an ISO 8601 string (naive = UTC)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        ts = float(text)
    else:
        s = str(text).strip()
        try:
            ts = float(s)
        except ValueError:
            try:
                dt = datetime.fromisoformat(s)
            except ValueError:
                raise BadReading(f"bad timestamp {s[:40]!r}") from None
            ts = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(ts):
        raise BadReading(f"timestamp {text!r} is not finite")
    return ts


def parse_value(text: object) -> float:
    """A reading; empty, None, NA or NaN mean missing (NaN); Inf and non-numbers are refused."""
    if text is None or (isinstance(text, str) and text.strip().upper() in MISSING):
        return math.nan
    if isinstance(text, bool):
        raise BadReading(f"bad value {text!r}")
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BadReading(f"bad value {str(text)[:40]!r}") from None
    if math.isinf(value):
        raise BadReading(f"value {text!r} is infinite")
    return value


def open_text(path: str | Path, encoding: str = "utf-8") -> TextIO:
    """A CSV file as text, gzip-compressed or not; undecodable bytes never stop a reader."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, errors="replace", newline="")
    return open(path, encoding=encoding, errors="replace", newline="")


def rows(lines: Iterable[str]) -> Iterator[list[str]]:
    """CSV rows of some lines, blank lines skipped."""
    return (row for row in csv.reader(lines) if row)


@dataclass(frozen=True)
class Columns:
    """Where a value (and optionally a time) column sits in a header, and the rule for one row."""

    header: tuple[str, ...]
    value: int
    time: int | None = None

    @classmethod
    def of(cls, header: Iterable[str], column: str, time_column: str | None = None, where: str = "CSV") -> Columns:
        names = tuple(h.strip() for h in header)
        for col in (column, time_column):
            if col and col not in names:
                raise KeyError(f"{where} has no column {col!r}; columns: {list(names)}")
        return cls(names, names.index(column), names.index(time_column) if time_column else None)

    def reading(self, row: list[str]) -> tuple[float | None, float]:
        """(timestamp or None without a time column, value) of one row, or BadReading."""
        if len(row) != len(self.header):
            raise BadReading(f"{len(row)} fields, header has {len(self.header)}")
        value = parse_value(row[self.value])
        return (None if self.time is None else parse_timestamp(row[self.time])), value


def read_column(path: str | Path, column: str, time_column: str | None = None) -> np.ndarray:
    """One column of a whole CSV file as the daemon would store it (refused rows left out, duplicate timestamps
    kept once, time order with a time column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"device data file {path} does not exist")
    with open_text(path) as fh:
        it = rows(fh)
        cols = Columns.of(next(it, []), column, time_column, str(path))
        readings: dict[float, float] = {}
        for seq, row in enumerate(it, start=1):
            try:
                ts, value = cols.reading(row)
            except BadReading:
                continue
            readings.setdefault(float(seq) if ts is None else ts, value)
    return np.array([readings[t] for t in sorted(readings)], dtype=np.float64)
