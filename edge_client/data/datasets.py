"""Readers for the real time-series datasets fedge trains and simulates devices on.

numpy and the standard library only, so a device (and the device simulator) can read its own
data without pandas or torch. Every reader returns the file's values unchanged (no resampling,
no normalisation): cleaning that the data needs (I-94 duplicate hours, gaps, `NA` cells) is done
here explicitly and documented, so the same series comes out on every machine.

Where the files come from: ``--data-dir`` / ``FEDGE_DATA_DIR`` / a ``shared/data`` folder next to
the checkout. ETTh1 is also shipped inside this package (CC BY-ND 4.0 allows unchanged
redistribution with attribution, see ``data/ETTh1.LICENSE``), so the demo runs on a machine that
has nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edge_client.data.readings import open_text, parse_value, rows

PACKAGED_DATA = Path(__file__).parent
DATA_DIR_ENV = "FEDGE_DATA_DIR"


class DatasetNotFound(FileNotFoundError):
    """The dataset file is not in the data directory (and not shipped with the package)."""


@dataclass(frozen=True)
class Series:
    """A multichannel series on a regular time grid; NaN marks a missing value."""

    name: str
    domain: str
    freq: str  # pandas-style alias: "h" hourly, "D" daily, "MS" monthly
    season_length: int  # period used by seasonal-naive baselines
    columns: tuple[str, ...]
    values: np.ndarray  # (T, C) float64
    start: str = ""  # ISO timestamp of the first row, "" when the file has none
    notes: tuple[str, ...] = field(default_factory=tuple)

    def column(self, name: str) -> np.ndarray:
        try:
            return self.values[:, self.columns.index(name)]
        except ValueError:
            raise KeyError(f"{self.name} has no column {name!r}; columns: {', '.join(self.columns)}") from None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    path: str  # relative to the data directory
    domain: str
    license: str


DATASETS: dict[str, DatasetInfo] = {
    "etth1": DatasetInfo("etth1", "ett/ETTh1.csv.gz", "energy", "CC BY-ND 4.0 (Zhou et al., Informer, AAAI 2021)"),
    "exchange_rate": DatasetInfo(
        "exchange_rate", "exchange_rate.txt.gz", "finance", "research use, cite Lai et al. 2018 (LSTNet)"
    ),
    "electricity": DatasetInfo(
        "electricity", "ts/electricity_ECL_col0_OT.csv.gz", "energy", "CC BY 4.0 (UCI ElectricityLoadDiagrams)"
    ),
    "pollution": DatasetInfo("pollution", "ts/pollution.csv.gz", "air_quality", "CC BY 4.0 (UCI Beijing PM2.5)"),
    "traffic": DatasetInfo(
        "traffic", "ts/Metro_Interstate_Traffic_Volume.csv.gz", "traffic", "CC BY 4.0 (UCI Metro Interstate)"
    ),
    "temperature": DatasetInfo(
        "temperature", "ts/daily-min-temperatures.csv.gz", "weather", "research use (Time Series Data Library)"
    ),
    "sunspots": DatasetInfo(
        "sunspots", "ts/monthly-sunspots.csv.gz", "nature", "research use (Time Series Data Library)"
    ),
}


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Where the shared datasets live: the explicit option, then $FEDGE_DATA_DIR, then a
    ``shared/data`` folder beside the current directory or beside this checkout. None when
    nothing is found (only the packaged ETTh1 is then available)."""
    if data_dir:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DatasetNotFound(f"data directory {path} does not exist")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return resolve_data_dir(env)
    checkout = Path(__file__).resolve().parent.parent
    for candidate in (Path.cwd().parent / "shared" / "data", checkout.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def available(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the datasets that can be loaded from here."""
    root = resolve_data_dir(data_dir)
    names = [n for n, info in DATASETS.items() if root is not None and (root / info.path).is_file()]
    if "etth1" not in names:
        names.insert(0, "etth1")  # packaged copy
    return names


def _locate(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    root = resolve_data_dir(data_dir)
    if root is not None and (root / DATASETS[name].path).is_file():
        return root / DATASETS[name].path
    if name == "etth1":
        return PACKAGED_DATA / "ETTh1.csv.gz"
    where = root if root is not None else "no data directory (set --data-dir or $FEDGE_DATA_DIR)"
    raise DatasetNotFound(f"dataset {name!r} ({DATASETS[name].path}) not found in {where}")


def _read_table(path: Path, skip_header: bool = True) -> tuple[list[str], list[list[str]]]:
    with open_text(path, encoding="latin-1") as fh:
        it = rows(fh)
        header = next(it) if skip_header else []
        return header, list(it)


def _etth1(path: Path) -> Series:
    header, rows = _read_table(path)
    values = np.array([[float(c) for c in r[1:]] for r in rows])
    return Series("etth1", "energy", "h", 24, tuple(header[1:]), values, start=rows[0][0])


def _exchange_rate(path: Path) -> Series:
    _, rows = _read_table(path, skip_header=False)
    values = np.array([[float(c) for c in r] for r in rows])
    cols = ("AUD", "GBP", "CAD", "CHF", "CNY", "JPY", "NZD", "SGD")
    # Daily rates behave like random walks: the strongest simple baseline is "tomorrow = today".
    return Series("exchange_rate", "finance", "D", 1, cols, values, start="1990-01-01")


def _electricity(path: Path) -> Series:
    _, rows = _read_table(path)
    values = np.array([[float(c) for c in r[1:]] for r in rows])
    return Series("electricity", "energy", "h", 24, ("client_0", "client_OT"), values, start="2016-07-01 02:00:00")


def _pollution(path: Path) -> Series:
    header, rows = _read_table(path)
    keep = ["pm2.5", "DEWP", "TEMP", "PRES", "Iws"]
    idx = [header.index(k) for k in keep]
    values = np.array([[parse_value(r[i]) for i in idx] for r in rows])
    return Series(
        "pollution", "air_quality", "h", 24, tuple(keep), values, start="2010-01-01 00:00:00",
        notes=("pm2.5 'NA' cells are NaN (2,067 rows)",),
    )


def _traffic(path: Path) -> Series:
    """I-94 volume: the file repeats an hour once per weather description and has gaps (the
    longest ~308 days). Keep the first row of each hour and put NaN in the missing hours, so the
    series sits on a true hourly grid; consumers pick contiguous stretches with :func:`longest_finite_run`."""
    header, rows = _read_table(path)
    t_idx, v_idx, temp_idx = header.index("date_time"), header.index("traffic_volume"), header.index("temp")
    by_hour: dict[int, tuple[float, float]] = {}
    for r in rows:
        hour = int(datetime.fromisoformat(r[t_idx]).replace(tzinfo=UTC).timestamp()) // 3600
        by_hour.setdefault(hour, (float(r[v_idx]), float(r[temp_idx])))
    first, last = min(by_hour), max(by_hour)
    values = np.full((last - first + 1, 2), np.nan)
    for hour, pair in by_hour.items():
        values[hour - first] = pair
    start = datetime.fromtimestamp(first * 3600, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return Series(
        "traffic", "traffic", "h", 24, ("traffic_volume", "temp"), values, start=start,
        notes=("deduplicated by date_time (first row kept)", "missing hours are NaN"),
    )


def _two_column(name: str, domain: str, freq: str, season: int, col: str) -> callable:
    def read(path: Path) -> Series:
        _, rows = _read_table(path)
        values = np.array([[float(r[1])] for r in rows])
        return Series(name, domain, freq, season, (col,), values, start=rows[0][0])

    return read


_READERS = {
    "etth1": _etth1,
    "exchange_rate": _exchange_rate,
    "electricity": _electricity,
    "pollution": _pollution,
    "traffic": _traffic,
    # Melbourne has no leap days (3,650 rows for 10 years): a yearly season of 365 rows is exact.
    "temperature": _two_column("temperature", "weather", "D", 365, "temp"),
    "sunspots": _two_column("sunspots", "nature", "MS", 132, "sunspots"),  # ~11-year cycle
}

_CACHE: dict[Path, Series] = {}


def load_series(name: str, data_dir: str | os.PathLike[str] | None = None) -> Series:
    """Load one dataset by name (see :data:`DATASETS`). Parsed files are cached per process."""
    path = _locate(name, data_dir)
    if path not in _CACHE:
        _CACHE[path] = _READERS[name](path)
    return _CACHE[path]


def longest_finite_run(x: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the longest stretch without NaN in a 1-D series."""
    finite = np.isfinite(x)
    best, start = (0, 0), None
    for i, ok in enumerate(np.append(finite, False)):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best
