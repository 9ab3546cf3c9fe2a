"""Device configuration (a TOML file for the daemon, or built in code by the simulator) and
loading of the device's own series from it."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_client.datasets import load_series
from edge_client.protocol import NAME_RE


class DataSource(BaseModel):
    """Where the device's history comes from: a named dataset slice (simulated devices) or a
    CSV file the device writes to (a real meter or sensor)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dataset", "csv"] = "dataset"
    dataset: str = "etth1"
    column: str = "OT"
    start: int = Field(default=0, ge=0)
    stop: int | None = Field(default=None, ge=1)
    path: str | None = None  # csv
    season: int | None = Field(default=None, ge=1)  # seasonal-naive period; csv default 24
    data_dir: str | None = None

    def load(self) -> tuple[np.ndarray, int, str]:
        """(series, season length, domain). NaN marks missing values."""
        if self.kind == "dataset":
            s = load_series(self.dataset, self.data_dir)
            values = s.column(self.column)[self.start : self.stop]
            return values.astype(np.float64), self.season or s.season_length, s.domain
        if not self.path:
            raise ValueError("a csv data source needs 'path'")
        return read_csv_column(Path(self.path), self.column), self.season or 24, "csv"


def read_csv_column(path: Path, column: str) -> np.ndarray:
    """One numeric column of a CSV with a header; unparsable cells become NaN (a sensor that
    wrote garbage must not stop the device)."""
    if not path.is_file():
        raise FileNotFoundError(f"device data file {path} does not exist")
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        if column not in header:
            raise KeyError(f"{path} has no column {column!r}; columns: {header}")
        idx = header.index(column)
        out = []
        for row in reader:
            try:
                out.append(float(row[idx]))
            except (ValueError, IndexError):
                out.append(np.nan)
    return np.asarray(out, dtype=np.float64)


class DeviceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(pattern=NAME_RE.pattern)
    fleet: str = Field(default="demo", pattern=NAME_RE.pattern)
    broker: str = "127.0.0.1:1883"
    backbone: str  # path to backbone.onnx
    data: DataSource = DataSource()
    profile: str = "generic"
    threads: int = Field(default=1, ge=1, le=64)
    horizon: int = Field(default=24, ge=1)
    eval_fraction: float = Field(default=0.2, gt=0.0, lt=0.9)
    max_train_windows: int = Field(default=1024, ge=16)
    seed: int = 0

    @classmethod
    def from_toml(cls, path: str | Path) -> DeviceConfig:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"config file {path}: {exc}") from None
