"""`fedge loadtest`: N emulated devices against a real broker and a real `fedge serve`, measured.

The harness starts (or is pointed at) an MQTT broker sized for the run, starts ``fedge serve`` as its own
process with a fresh fleet database, starts a few device processes (:mod:`coordinator.loadtest.emulator`),
lets the coordinator run its rounds, and reads what happened from the places that know: round open/close
times and stored updates from the fleet database, acknowledged updates and bytes from the devices, CPU and
memory of the coordinator and the broker from /proc. Lost updates (acknowledged by the broker to a device,
never stored) and duplicated ones (counted twice in an aggregate) must both be 0.

Secure mode (``LoadConfig.secure``, ``fedge loadtest --secure``): the fleet as it runs on a real network. N device
identities enrolled with a fleet CA (cached in the work folder, :mod:`coordinator.loadtest.identities`), the broker
with the configuration ``fedge broker config`` writes (TLS listener, ``require_certificate``, the certificate's
name as username and client id, the fleet's ``%u`` ACL, its CRL) plus the same queue and inflight settings as the
plain run, ``fedge serve --fleet-dir`` (the registry: every device message's signature checked, every control
message signed), and devices that connect with their own certificates and sign what devices sign. Persistence is
left off as in the plain run, so the difference between the two is TLS, the ACL and the signatures.

Usable as a library (:func:`run_loadtest`, :class:`LoadConfig`) so benchmarks and other features (TLS and
ACLs, metrics exporters) can measure their cost at scale with the same harness.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.demo import DEFAULT_CACHE
from coordinator.fleet.broker import RunningBroker, raise_fd_limit, start_mosquitto, start_secure_mosquitto
from coordinator.fleet.state import is_postgres
from coordinator.loadtest.bank import FeatureBank, build_bank
from coordinator.loadtest.emulator import WorkerSpec, worker_main
from coordinator.loadtest.identities import enrolled_fleet
from edge_client.wire.mqtt import BrokerAddress

log = logging.getLogger("fedge.loadtest")

LOADTEST_CACHE = DEFAULT_CACHE / "loadtest"


@dataclass(frozen=True)
class LoadConfig:
    devices: int = 100
    rounds: int = 3
    procs: int = 0  # device processes; 0: one per 2,500 devices, at least 2
    horizon: int = 24
    n_train: int = 96  # training windows per device (its own slice of a real series)
    n_eval: int = 8  # held-back evaluation windows per device
    local_epochs: int = 1
    lr: float = 3e-3
    deadline_s: float = 300.0
    broker: str = "mosquitto"  # "mosquitto": a private one sized for the run | "host:port[,host:port...]": existing
    # broker(s), e.g. the nodes of a cluster (devices are spread over them, the coordinator uses the first);
    # "mqtt3://host:port" speaks MQTT 3.1.1
    state: str = ""  # fleet database: "" a SQLite file in the work dir | a postgresql:// URL
    fleet: str = "load"
    work_dir: Path = Path("runs/loadtest")
    cache_dir: Path = LOADTEST_CACHE
    data_dir: str | None = None
    backbone_steps: int = 60  # pretraining steps of the tiny backbone (the load test measures the system)
    model_dir: Path | None = None  # an export folder to use instead (backbone.onnx, head.npz)
    bank_windows: int = 6000  # windows per series in the feature bank
    connects_per_s: float = 2000.0
    online_timeout_s: float = 600.0
    serve_args: tuple[str, ...] = ()  # extra `fedge serve` options (e.g. TLS or ACL settings of a later release)
    profile: bool = False  # sample the coordinator with py-spy (all threads) into the work folder
    secure: bool = False  # TLS + client certificates + the fleet's ACL + signed messages (a private mosquitto only)
    seed: int = 0


@dataclass
class LoadResult:
    devices: int
    rounds_done: int
    online_s: float  # from the first connect until the coordinator saw all N devices online
    round_s: list[float]  # per round, opened -> closed (coordinator's clock)
    updates: list[int]  # stored updates per round
    ingest_per_s: list[float]  # stored updates / (last stored - round opened), per round
    lost: int
    duplicated: int
    bytes_up: list[int]  # per round: payload bytes devices published (updates)
    bytes_down: list[int]  # per round: payload bytes devices received (global heads, tasks)
    coordinator_cpu_s: float  # user+system CPU of `fedge serve` during the rounds
    coordinator_peak_rss_mb: float
    broker_peak_rss_mb: float
    broker: str
    state_backend: str
    procs: int
    slice_overlap: float  # windows handed out / distinct windows in the bank
    device_train_s: float  # total seconds (wall, per task) the emulated devices spent training and encoding
    broker_cpu_s: float = float("nan")  # user+system CPU of the private broker during the rounds
    devices_cpu_s: float = float("nan")  # user+system CPU of all device processes during the rounds
    devices_peak_rss_mb: float = float("nan")  # sum over the device processes of each one's peak RSS
    broker_io_bytes: int = 0  # bytes the broker read and wrote (sockets: on the wire, TLS included) in the rounds
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rejected: dict[str, int] = field(default_factory=dict)
    fd_limit: int = 0
    secure: bool = False
    enrolled_now: int = 0  # secure mode: identities enrolled by this run (0: all came from the cache)
    enrol_s: float = 0.0  # secure mode: seconds spent enrolling them (not part of any other measure)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        rs = np.asarray(self.round_s) if self.round_s else np.asarray([np.nan])
        return {"devices": self.devices, "online_s": self.online_s, "round_p50_s": float(np.percentile(rs, 50)),
                "round_p95_s": float(np.percentile(rs, 95)), "round_max_s": float(rs.max()),
                "ingest_per_s": float(np.median(self.ingest_per_s)) if self.ingest_per_s else 0.0,
                "coordinator_cpu_s": self.coordinator_cpu_s, "coordinator_peak_rss_mb": self.coordinator_peak_rss_mb,
                "broker_peak_rss_mb": self.broker_peak_rss_mb, "broker_cpu_s": self.broker_cpu_s,
                "devices_cpu_s": self.devices_cpu_s, "devices_peak_rss_mb": self.devices_peak_rss_mb,
                "broker_wire_bytes_per_round": self.broker_io_bytes / max(1, len(self.round_s)),
                "bytes_per_round": int(np.mean([u + d for u, d in zip(self.bytes_up, self.bytes_down, strict=True)]))
                if self.bytes_up else 0, "lost": self.lost, "duplicated": self.duplicated}


# ---------------------------------------------------------------------------------------------- preparation


def prepare_model(cfg: LoadConfig) -> Path:
    """A tiny TSFM (the default size class), briefly pretrained on ETTh1 and exported; cached."""
    from coordinator.models.tsfm import TSFMConfig

    mcfg = TSFMConfig.tiny()
    key = hashlib.sha256(f"{json.dumps(mcfg.to_dict(), sort_keys=True)}:{cfg.backbone_steps}:{cfg.seed}".encode())
    folder = Path(cfg.cache_dir) / f"model-{key.hexdigest()[:16]}"
    if (folder / "spec.json").is_file():
        return folder
    from coordinator.pretrain.training import train_tsfm
    from export.onnx_export import export_model

    result = train_tsfm(mcfg, steps=cfg.backbone_steps, data_dir=cfg.data_dir, seed=cfg.seed, progress=False)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_model(result.model, tmp)
    tmp.rename(folder)
    return folder


def load_broker_config(devices: int) -> list[str]:
    """Mosquitto settings that matter at thousands of connections (docs/scale.md explains each)."""
    return ["max_connections -1", "set_tcp_nodelay true", "max_inflight_messages 1000",
            f"max_queued_messages {max(1000, 4 * devices)}", "max_queued_bytes 0", "retain_available true"]


# ---------------------------------------------------------------------------------------------- measurement


class _ProcWatch:
    """Peak RSS (VmHWM), CPU time and bytes through read/write calls (sockets included: for the broker, what went
    over the wire, TLS records and all) of a process, sampled from /proc while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_kb = 0
        self.cpu_s = 0.0
        self.io_bytes = 0

    def sample(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            self.cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            io = dict(line.split(": ") for line in Path(f"/proc/{self.pid}/io").read_text().splitlines())
            self.io_bytes = int(io["rchar"]) + int(io["wchar"])


class _Db:
    """Read-only queries on the fleet database `fedge serve` writes (SQLite file or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def rows(self, sql: str) -> list[tuple]:
        if is_postgres(self.url):
            import psycopg

            try:
                with psycopg.connect(self.url, autocommit=True) as con:
                    return con.execute(sql).fetchall()
            except psycopg.Error:
                return []
        if not Path(self.url).exists():
            return []
        con = sqlite3.connect(f"file:{self.url}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    def scalar(self, sql: str) -> Any:
        rows = self.rows(sql)
        return rows[0][0] if rows else None


def _serve_command() -> list[str]:
    script = Path(sys.executable).with_name("fedge")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from coordinator.cli import app; app()"]


# ---------------------------------------------------------------------------------------------- the run


def run_loadtest(cfg: LoadConfig, progress: Callable[[str], None] | None = None) -> LoadResult:
    say = progress or (lambda text: log.info("%s", text))
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    say("preparing the backbone and the feature bank (cached after the first run)")
    model_dir = Path(cfg.model_dir) if cfg.model_dir else prepare_model(cfg)
    bank_dir = build_bank(model_dir / "backbone.onnx", cfg.horizon, cfg.cache_dir, cfg.data_dir,
                          max_windows=cfg.bank_windows)
    bank = FeatureBank.load(bank_dir)
    slices, overlap = bank.plan(cfg.devices, cfg.n_train, cfg.n_eval)
    procs = cfg.procs or max(2, -(-cfg.devices // 2500))
    ids = [f"emu-{i:05d}" for i in range(cfg.devices)]
    fleet_dir: Path | None = None
    enrolled_now, enrol_s = 0, 0.0
    if cfg.secure:
        if cfg.broker != "mosquitto":
            raise ValueError("secure mode starts its own broker (TLS, certificates, ACL): use broker='mosquitto'")
        say(f"enrolling {cfg.devices} device identities with the fleet CA (cached in the work folder)")
        t0 = time.perf_counter()
        pki, enrolled_now = enrolled_fleet(work / f"fleet-{cfg.fleet}", cfg.fleet, ids)
        enrol_s, fleet_dir = time.perf_counter() - t0, pki.root.resolve()
    load_before = os.getloadavg()

    broker: RunningBroker | None = None
    if cfg.broker == "mosquitto" and fleet_dir is not None:
        broker = start_secure_mosquitto(fleet_dir, cfg.devices,
                                        extra_config=[*load_broker_config(cfg.devices), "persistence false"])
        address, broker_label = broker.address, "mosquitto (private, TLS + certificates + ACL)"
        nodes = [BrokerAddress(address.host, address.port, tls=True, ca_file=str(fleet_dir / "ca.crt"))]
    elif cfg.broker == "mosquitto":
        broker = start_mosquitto(extra_config=load_broker_config(cfg.devices))
        address, broker_label = broker.address, "mosquitto (private)"
        nodes = [address]
    else:
        nodes = [BrokerAddress.parse(b.strip()) for b in cfg.broker.split(",") if b.strip()]
        broker_label = f"external {cfg.broker}"
    nodes = [dataclasses.replace(n, keepalive=120) for n in nodes]
    address = dataclasses.replace(address, keepalive=120) if broker is not None else nodes[0]
    state_url = cfg.state or str(work / f"fleet-{cfg.devices}.sqlite")
    if not is_postgres(state_url):
        for stale in Path(state_url).parent.glob(Path(state_url).name + "*"):
            stale.unlink()
    db = _Db(state_url)
    serve = None
    workers: list[tuple[Any, Any]] = []
    watch_b = _ProcWatch(broker.pid) if broker is not None and broker.pid is not None else None
    try:
        ctx = mp.get_context("spawn")
        per = -(-cfg.devices // procs)
        for w in range(procs):
            part = slice(w * per, min(cfg.devices, (w + 1) * per))
            spec = WorkerSpec(w, tuple(ids[part]), tuple(slices[part]), str(bank_dir), str(model_dir / "backbone.onnx"),
                              tuple(nodes), cfg.fleet, cfg.horizon, connects_per_s=cfg.connects_per_s / procs,
                              seed=cfg.seed, identities=str(fleet_dir / "enroll") if fleet_dir else "")
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(spec, child), daemon=True)
            p.start()
            workers.append((p, parent))
        say(f"{procs} device processes building {cfg.devices} learners")
        for _, conn in workers:
            msg = conn.recv()
            if "error" in msg:
                raise RuntimeError(f"device process {msg['worker']} failed: {msg['error']}")

        log_file = open(work / f"serve-{cfg.devices}.log", "wb")  # noqa: SIM115 - closed in finally
        cmd = [*_serve_command(), "serve", "--init-head", str(model_dir / "head.npz"), "--db", state_url,
               "--broker", str(address), "--fleet", cfg.fleet, "--rounds", str(cfg.rounds),
               "--min-devices", str(cfg.devices), "--deadline", str(cfg.deadline_s), "--horizon", str(cfg.horizon),
               "--local-epochs", str(cfg.local_epochs), "--lr", str(cfg.lr), "--wait-devices",
               str(cfg.online_timeout_s), *(["--fleet-dir", str(fleet_dir)] if fleet_dir else []), *cfg.serve_args]
        serve = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit)
        watch_c = _ProcWatch(serve.pid)
        if cfg.profile:
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(serve.pid),
                                    "--rate", "50", "--threads", "--format", "raw", "--nonblocking",
                                    "-o", str(work / f"profile-{cfg.devices}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        t_connect = time.time()
        for _, conn in workers:
            conn.send("go")
        say(f"connecting {cfg.devices} devices")
        reports = _Reports(len(workers))
        online_s = float("nan")
        cpu_at_first_round = None
        watch_w = [_ProcWatch(p.pid) for p, _ in workers]
        others_at_first_round: list[float] | None = None  # broker, then each device process
        broker_io_at_first_round = 0
        last_say = 0.0
        while serve.poll() is None:
            watch_c.sample()
            for w in ([watch_b] if watch_b else []) + watch_w:
                w.sample()
            for _, conn in workers:
                while conn.poll():
                    reports.add(conn.recv())
            if online_s != online_s and (db.scalar("SELECT COUNT(*) FROM devices WHERE state IN "
                                                   "('online','idle','training')") or 0) >= cfg.devices:
                online_s = time.time() - t_connect
                say(f"all {cfg.devices} devices online after {online_s:.1f} s")
            if cpu_at_first_round is None and db.scalar("SELECT COUNT(*) FROM rounds"):
                cpu_at_first_round = watch_c.cpu_s
                others_at_first_round = [w.cpu_s for w in ([watch_b] if watch_b else []) + watch_w]
                broker_io_at_first_round = watch_b.io_bytes if watch_b else 0
            if time.time() - last_say > 5:
                done = db.scalar("SELECT COUNT(*) FROM rounds WHERE state != 'open'") or 0
                say(f"{reports.connected()} connected, {done}/{cfg.rounds} rounds closed, "
                    f"{reports.updates_sent()} updates sent")
                last_say = time.time()
            if time.time() - t_connect > cfg.online_timeout_s + cfg.rounds * cfg.deadline_s + 120:
                raise RuntimeError("the load test ran past its time budget")
            time.sleep(0.25)
        for w in ([watch_b] if watch_b else []) + watch_w:
            w.sample()  # the rounds are over: CPU until here (not the devices' shutdown)
        if cfg.profile:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)  # py-spy writes its file when the process it samples exits
        for _, conn in workers:
            conn.send("stop")
        for _, conn in workers:
            reports.drain(conn)
        if serve.returncode != 0:
            tail = (work / f"serve-{cfg.devices}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"fedge serve exited with {serve.returncode}:\n{tail}")
        result = _collect(cfg, db, reports, online_s, watch_c, watch_b, cpu_at_first_round or 0.0)
        if others_at_first_round is not None:
            if watch_b:
                result.broker_cpu_s = watch_b.cpu_s - others_at_first_round[0]
                result.broker_io_bytes = watch_b.io_bytes - broker_io_at_first_round
            start = others_at_first_round[1:] if watch_b else others_at_first_round
            result.devices_cpu_s = sum(w.cpu_s - s0 for w, s0 in zip(watch_w, start, strict=True))
        result.broker, result.procs, result.slice_overlap = broker_label, procs, overlap
        result.load_before, result.fd_limit = load_before, fd_limit
        result.devices_peak_rss_mb = sum(w.peak_rss_kb for w in watch_w) / 1024
        result.secure, result.enrolled_now, result.enrol_s = cfg.secure, enrolled_now, enrol_s
        result.state_backend = "postgres" if is_postgres(state_url) else "sqlite"
        return result
    finally:
        if serve is not None and serve.poll() is None:
            serve.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                serve.wait(10)
        for p, conn in workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send("stop")
            p.join(15)
            if p.is_alive():
                p.terminate()
        if broker is not None:
            broker.stop()


class _Reports:
    """What the device processes reported, merged."""

    def __init__(self, n: int) -> None:
        self.latest: dict[int, dict] = {}
        self.acked: list[tuple[int, str, str]] = []
        self.final = 0
        self.n = n

    def add(self, msg: dict) -> None:
        if "ready" in msg:
            return
        if "error" in msg:
            raise RuntimeError(f"device process {msg['worker']} failed: {msg['error']}")
        self.acked.extend(tuple(a) for a in msg["acked"])
        self.latest[msg["worker"]] = msg
        self.final += bool(msg.get("final"))

    def drain(self, conn: Any, timeout_s: float = 30.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if conn.poll(0.2):
                msg = conn.recv()
                self.add(msg)
                if msg.get("final"):
                    return

    def connected(self) -> int:
        return sum(m["connected"] for m in self.latest.values())

    def updates_sent(self) -> int:
        return sum(m["updates_sent"] for m in self.latest.values())

    def per_round(self, key: str) -> Counter[int]:
        total: Counter[int] = Counter()
        for m in self.latest.values():
            total.update({int(k): v for k, v in m[key].items()})
        return total


def _collect(cfg: LoadConfig, db: _Db, reports: _Reports, online_s: float, watch_c: _ProcWatch,
             watch_b: _ProcWatch | None, cpu_at_first_round: float) -> LoadResult:
    rounds = db.rows("SELECT round_id, opened, closed, state FROM rounds ORDER BY round_id")
    stored = {(r, d): m for r, d, m in db.rows("SELECT round_id, device_id, msg_id FROM updates")}
    received = {r: (n, last) for r, n, last in db.rows(
        "SELECT round_id, COUNT(*), MAX(received) FROM updates GROUP BY round_id")}
    summed = {r: c for r, c in db.rows("SELECT round_id, SUM(count) FROM round_sums GROUP BY round_id")}
    acked = {(r, d): m for r, d, m in reports.acked}
    lost = sum(1 for key, m in acked.items() if stored.get(key) != m)
    duplicated = sum(max(0, (summed.get(r) or 0) - received.get(r, (0, 0))[0]) for r, *_ in rounds)
    up, down = reports.per_round("bytes_up"), reports.per_round("bytes_down")
    rejected: Counter[str] = Counter()
    for m in reports.latest.values():
        rejected.update(m["rejected"])
    return LoadResult(
        devices=cfg.devices, rounds_done=sum(1 for r in rounds if r[3] != "open"), online_s=online_s,
        round_s=[c - o for _, o, c, s in rounds if c is not None],
        updates=[received.get(r, (0, 0))[0] for r, *_ in rounds],
        ingest_per_s=[n / max(last - o, 1e-6) for r, o, _, _ in rounds for n, last in [received.get(r, (0, o))] if n],
        lost=lost, duplicated=duplicated, bytes_up=[up[r] for r, *_ in rounds],
        bytes_down=[down[r] for r, *_ in rounds],
        coordinator_cpu_s=watch_c.cpu_s - cpu_at_first_round, coordinator_peak_rss_mb=watch_c.peak_rss_kb / 1024,
        broker_peak_rss_mb=(watch_b.peak_rss_kb / 1024) if watch_b else float("nan"), broker="", state_backend="",
        procs=0, slice_overlap=0.0, device_train_s=sum(m["train_s"] for m in reports.latest.values()),
        rejected=dict(rejected))


def result_dict(result: LoadResult) -> dict:
    return {**asdict(result), "summary": result.summary()}
