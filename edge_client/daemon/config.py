"""Device configuration (a TOML file for the daemon, or built in code by the simulator) and
loading of the device's own series from it.

Configs written before the daemon had a store stay valid: every newer table (``[resources]``,
``[bundle]``) and key (``state_dir``, ``heartbeat_s``, ...) has a default.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_client.daemon.resources import ResourceLimits
from edge_client.data.datasets import load_series
from edge_client.data.readings import read_column
from edge_client.wire import NAME_RE


class DataSource(BaseModel):
    """Where the device's history comes from: a named dataset slice (simulated devices), a CSV
    file the device appends to (a real meter or sensor; the daemon tails it), stdin, or a local
    UNIX socket (one ``timestamp,value`` or JSON reading per line; see edge_client.daemon.ingest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dataset", "csv", "stdin", "socket"] = "dataset"
    dataset: str = "etth1"
    column: str = "OT"
    time_column: str | None = None  # csv: the dedupe key for rows read twice (after a rotation)
    start: int = Field(default=0, ge=0)
    stop: int | None = Field(default=None, ge=1)
    path: str | None = None  # csv file or socket path
    season: int | None = Field(default=None, ge=1)  # seasonal-naive period; csv default 24
    data_dir: str | None = None
    poll_s: float = Field(default=1.0, gt=0)  # how often the daemon looks for new CSV rows

    @model_validator(mode="after")
    def _needs_path(self) -> DataSource:
        if self.kind in ("csv", "socket") and not self.path:
            raise ValueError(f"a {self.kind} data source needs 'path'")
        return self

    def load(self) -> tuple[np.ndarray, int, str]:
        """(series, season length, domain). NaN marks missing values."""
        if self.kind == "dataset":
            s = load_series(self.dataset, self.data_dir)
            values = s.column(self.column)[self.start : self.stop]
            return values.astype(np.float64), self.season or s.season_length, s.domain
        if self.kind != "csv" or not self.path:
            raise ValueError(f"a {self.kind} source has no history to load; the daemon ingests it into its store")
        return read_column(Path(self.path), self.column, self.time_column), self.season or 24, "csv"


class BundleConfig(BaseModel):
    """Signed model bundles over MQTT (edge_client.bundles): where versions are kept on disk and the
    coordinator key that must have signed them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: str
    public_key: str  # PEM file with the coordinator's ed25519 public key
    # Which of the bundle's backbones this device runs. Unset: what the device's profile says
    # (edge_client/runtime/profiles/<profile>.toml; onnxruntime + fp32 for a profile fedge does not ship). LiteRT
    # picks the .tflite file when the bundle ships one and ai-edge-litert (or tflite-runtime) is
    # installed; otherwise the device falls back to ONNX Runtime.
    preferred_format: Literal["fp32", "int8"] | None = None
    runtime: Literal["onnxruntime", "litert"] | None = None


class MetricsConfig(BaseModel):
    """The daemon's own Prometheus metrics (off unless this table is present; needs ``fedge[metrics]``):
    a node-exporter textfile rewritten every `interval_s`, and/or a local /metrics endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    textfile: str | None = None  # e.g. /var/lib/prometheus/node-exporter/fedge.prom
    listen: str | None = Field(default=None, pattern=r"^[^:]+:\d{1,5}$")  # host:port, e.g. 127.0.0.1:9465
    interval_s: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _somewhere(self) -> MetricsConfig:
        if self.textfile is None and self.listen is None:
            raise ValueError("[metrics] needs 'textfile' or 'listen'")
        return self


class DeviceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(pattern=NAME_RE.pattern)
    fleet: str = Field(default="demo", pattern=NAME_RE.pattern)
    broker: str = "127.0.0.1:1883"
    backbone: str | None = None  # path to backbone.onnx; optional when [bundle] provides one
    data: DataSource = DataSource()
    state_dir: str | None = None  # SQLite store; default $STATE_DIRECTORY (systemd) or ~/.local/state/fedge/...
    heartbeat_s: float = Field(default=60.0, gt=0)
    receipt_timeout_s: float = Field(default=300.0, gt=0)  # an update the coordinator never answered is re-sent
    rebuild_every: int | None = Field(default=None, ge=1)  # new samples before windows are rebuilt; None: horizon
    max_history: int = Field(default=50_000, ge=64)  # newest samples the learner uses (bounds memory)
    keep_readings: int = Field(default=500_000, ge=64)  # retention: older readings are deleted from the store
    resources: ResourceLimits = ResourceLimits()
    bundle: BundleConfig | None = None
    # the enrollment folder from `fedge fleet enroll` (<device_id>.key/.crt, ca.crt, coordinator.crt): TLS with a
    # client certificate to an mqtts:// broker, signed messages, and only the coordinator's signed messages obeyed
    identity: str | None = None
    metrics: MetricsConfig | None = None
    # [personalize]: device methods this device runs every round whatever the round asks (its keys win over the
    # round's), e.g. rank = 4, self_distill = 0.5, feature_distance = 0.1, gate = true, consistency = 0.1,
    # rules = true; see edge_client.daemon.client.FLEET_PERSONAL_OPTIONS
    personalize: dict[str, bool | int | float] = Field(default_factory=dict)
    # the hello carries this device's feature prototype (32 floats; what it reveals: docs/privacy.md), so a
    # `--strategy prototype` coordinator can give it the head of devices like it before it has trained
    announce_prototype: bool = False
    profile: str = "generic"
    threads: int = Field(default=1, ge=1, le=64)
    horizon: int = Field(default=24, ge=1)
    eval_fraction: float = Field(default=0.2, gt=0.0, lt=0.9)
    max_train_windows: int = Field(default=1024, ge=16)
    seed: int = 0

    @model_validator(mode="after")
    def _known_methods(self) -> DeviceConfig:
        if self.personalize:
            from edge_client.daemon.client import FLEET_PERSONAL_OPTIONS, personal_config
            from edge_client.wire import ProtocolError

            unknown = sorted(set(self.personalize) - FLEET_PERSONAL_OPTIONS)
            if unknown:
                raise ValueError(f"[personalize]: unknown option(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(sorted(FLEET_PERSONAL_OPTIONS))}")
            try:
                personal_config({}, self.personalize)
            except ProtocolError as exc:
                raise ValueError(f"[personalize]: {exc}") from None
        return self

    @model_validator(mode="after")
    def _needs_backbone(self) -> DeviceConfig:
        if self.backbone is None and self.bundle is None:
            raise ValueError("set 'backbone' (a backbone.onnx file) or a [bundle] table")
        return self

    def load_identity(self):  # type: ignore[no-untyped-def]
        """The device's Identity, or None without an ``identity`` folder (imports cryptography lazily)."""
        if not self.identity:
            return None
        from edge_client.identity import Identity

        return Identity.load(Path(self.identity).expanduser(), self.device_id)

    def broker_address(self):  # type: ignore[no-untyped-def]
        """The broker to connect to, with the identity's certificate for TLS when there is one."""
        from edge_client.wire.mqtt import BrokerAddress

        address = BrokerAddress.parse(self.broker)
        identity = self.load_identity()
        return address if identity is None else address.with_identity(identity.ca_file, identity.cert_file,
                                                                       identity.key_file)

    def state_path(self) -> Path:
        """Where the device's SQLite store lives (created by the store)."""
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        base = os.environ.get("STATE_DIRECTORY", "").split(":")[0]  # systemd StateDirectory=
        if base:
            return Path(base) / f"{self.fleet}-{self.device_id}"
        return Path("~/.local/state/fedge").expanduser() / f"{self.fleet}-{self.device_id}"

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
