"""A private MQTT broker for the demo and the tests: Mosquitto when it is installed, else the
embedded rumqttd broker from the ``iotcore`` wheel, each on a free local port.

A private broker (rather than whatever listens on 1883) keeps the demo from mixing with other
fleets and lets it set what it needs: MQTT v5, persistent sessions, and a payload limit above
the size of a global model (rumqttd's default is 20 KB, too small for a head).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_client.wire.mqtt import BrokerAddress

log = logging.getLogger("fedge.broker")

MAX_PAYLOAD_BYTES = 1024 * 1024


def raise_fd_limit() -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (run in the broker's process before it starts): every
    connection is a file descriptor, and the common default of 1,024 would cap a broker near 1,000 devices."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not start listening on {host}:{port} within {timeout_s:.0f} s")


@dataclass
class RunningBroker:
    kind: str  # "mosquitto" or "iotcore"
    address: BrokerAddress
    _proc: subprocess.Popen | None = None
    _embedded: object | None = None
    _tmp: tempfile.TemporaryDirectory | None = None
    extra_config: list[str] = field(default_factory=list)

    @property
    def workdir(self) -> Path | None:
        """The folder with the broker's config, ACL, logs and pid file (a spawned Mosquitto only)."""
        return Path(self._tmp.name) if self._tmp is not None else None

    @property
    def pid(self) -> int | None:
        """The broker's process id (None for the embedded broker, which runs inside this process)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._embedded is not None:
            self._embedded.stop()  # type: ignore[attr-defined]
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RunningBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mosquitto_config(port: int, extra: list[str] | None = None) -> str:
    return "\n".join([
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        f"message_size_limit {MAX_PAYLOAD_BYTES}",
        "max_queued_messages 100000",
        *(extra or []),
        "",
    ])


def start_mosquitto(port: int | None = None, extra_config: list[str] | None = None) -> RunningBroker:
    port = port or free_port()
    tmp = tempfile.TemporaryDirectory(prefix="fedge-mosquitto-")
    conf = Path(tmp.name) / "mosquitto.conf"
    conf.write_text(mosquitto_config(port, extra_config))
    return _run_mosquitto(conf, port, tmp, BrokerAddress("127.0.0.1", port), extra_config)


def start_secure_mosquitto(fleet_dir: Path, devices: int = 64, extra_config: list[str] | None = None) -> RunningBroker:
    """Mosquitto on a free loopback port with the production configuration `fedge broker config` writes for the
    fleet in `fleet_dir` (TLS, client certificates, ACL, persistence); the address carries the fleet CA and the
    coordinator's certificate. Its config, ACL and pid file are in ``broker.workdir`` (``fedge fleet revoke
    --broker-pid``). `extra_config` lines are appended (Mosquitto 2.0: a later line overrides an earlier one); the
    load harness uses them to give the secure broker the same queue and inflight settings as its plain one."""
    from coordinator.fleet.broker_config import BrokerConfig, write_broker_config

    port = free_port()
    tmp = tempfile.TemporaryDirectory(prefix="fedge-mosquitto-tls-")
    work = Path(tmp.name)
    me = getpass.getuser()  # a private broker runs as whoever starts it (it must read the fleet's keys)
    conf = write_broker_config(fleet_dir, work, BrokerConfig(port=port, bind="127.0.0.1", devices=devices, run_as=me),
                               log_dest=f"file {work / 'mosquitto.log'}")
    if extra_config:
        conf.write_text(conf.read_text() + "\n".join([*extra_config, ""]))
    address = BrokerAddress("127.0.0.1", port).with_identity(fleet_dir / "ca.crt", fleet_dir / "coordinator.crt",
                                                             fleet_dir / "coordinator.key")
    return _run_mosquitto(conf, port, tmp, address, list(extra_config or []))


def start_fleet_broker(folder: Path, fleet: str, device_ids: list[str]) -> tuple[RunningBroker, dict[str, Path]]:
    """A fleet as it runs on a real network, made from scratch in `folder`: ``fedge fleet init``, ``fedge fleet
    enroll`` for every device, and the broker ``fedge broker config`` writes. Returns the running broker and each
    device's enrollment folder (its ``identity``). The demo's ``--secure`` and the hardware-in-loop harness use it."""
    import shutil as _shutil

    from coordinator.fleet.pki import FleetPKI

    _shutil.rmtree(folder, ignore_errors=True)
    pki = FleetPKI(folder)
    pki.init(fleet)
    bundles = {d: pki.enroll(d) for d in device_ids}
    return start_secure_mosquitto(folder, devices=len(device_ids) + 4), bundles


def _run_mosquitto(conf: Path, port: int, tmp: tempfile.TemporaryDirectory, address: BrokerAddress,
                   extra_config: list[str] | None) -> RunningBroker:
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        tmp.cleanup()
        raise FileNotFoundError("mosquitto is not installed")
    log_path = Path(tmp.name) / "mosquitto.stderr"
    with open(log_path, "wb") as log_file:  # a file, not a pipe: nobody reads a pipe, and a full one (a few
        # hundred connects and disconnects of log lines) blocks mosquitto's writes and so the whole broker
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log_file,
                                preexec_fn=raise_fd_limit)
    try:
        wait_for_port(port)
    except RuntimeError:
        proc.kill()
        proc.wait()
        err = log_path.read_text(errors="replace")
        tmp.cleanup()
        raise RuntimeError(f"mosquitto failed to start on port {port}: {err.strip()}") from None
    log.info("mosquitto listening on %s", address)
    return RunningBroker("mosquitto+tls" if address.tls else "mosquitto", address, _proc=proc, _tmp=tmp,
                         extra_config=list(extra_config or []))


RUMQTTD_CONFIG = """id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "fedge-v5"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload}
    max_inflight_count = 100
    dynamic_filters = true
"""


def start_embedded(port: int | None = None) -> RunningBroker:
    """rumqttd via iotcore, configured by TOML: its keyword options only describe an MQTT 3.1.1
    listener, and fedge speaks MQTT v5."""
    try:
        from iotcore import Broker
    except ImportError:
        raise RuntimeError("no mosquitto on PATH and the embedded broker (pip install iotcore) is missing") from None
    port = port or free_port()
    tmp = tempfile.TemporaryDirectory(prefix="fedge-rumqttd-")
    conf = Path(tmp.name) / "rumqttd.toml"
    conf.write_text(RUMQTTD_CONFIG.format(port=port, max_payload=MAX_PAYLOAD_BYTES))
    broker = Broker(config_path=str(conf)).start()
    log.info("embedded rumqttd broker (iotcore) listening on 127.0.0.1:%d", port)
    return RunningBroker("iotcore", BrokerAddress("127.0.0.1", port), _embedded=broker, _tmp=tmp)


def start_broker(prefer: str = "auto") -> RunningBroker:
    """Mosquitto if installed (or asked for), else the embedded broker."""
    if prefer in ("auto", "mosquitto"):
        try:
            return start_mosquitto()
        except FileNotFoundError:
            if prefer == "mosquitto":
                raise
            log.info("mosquitto not found; starting the embedded broker")
    return start_embedded()


NATS_NODE_CONFIG = """server_name: {name}
listen: 127.0.0.1:{client_port}
max_payload: {max_payload}
jetstream {{ store_dir: "{store}" }}
cluster {{
  name: fedge
  listen: 127.0.0.1:{cluster_port}
  routes: [{routes}]
}}
mqtt {{ listen: 127.0.0.1:{mqtt_port} }}
"""


@dataclass
class RunningCluster:
    """A NATS cluster on loopback ports (each node also an MQTT 3.1.1 server, with JetStream)."""

    nodes: list[BrokerAddress]  # the nodes' MQTT listeners (mqtt311)
    procs: list[subprocess.Popen]
    _tmp: tempfile.TemporaryDirectory

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self._tmp.cleanup()

    def __enter__(self) -> RunningCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_nats_cluster(n: int = 3, timeout_s: float = 60.0) -> RunningCluster:
    """`n` nats-server nodes routed to each other, each with JetStream and an MQTT listener; returns once every
    node accepts an MQTT session (JetStream's meta leader is elected and the MQTT streams exist)."""
    binary = shutil.which("nats-server") or next((p for p in ("/usr/sbin/nats-server",) if Path(p).exists()), None)
    if binary is None:
        raise FileNotFoundError("nats-server is not installed")
    tmp = tempfile.TemporaryDirectory(prefix="fedge-nats-")
    ports = [(free_port(), free_port(), free_port()) for _ in range(n)]  # client, cluster, mqtt
    procs = []
    for i, (client_port, cluster_port, mqtt_port) in enumerate(ports):
        routes = ", ".join(f"nats-route://127.0.0.1:{c}" for j, (_, c, _) in enumerate(ports) if j != i)
        conf = Path(tmp.name) / f"n{i}.conf"
        conf.write_text(NATS_NODE_CONFIG.format(name=f"n{i}", client_port=client_port, cluster_port=cluster_port,
                                                mqtt_port=mqtt_port, routes=routes, store=Path(tmp.name) / f"js{i}",
                                                max_payload=MAX_PAYLOAD_BYTES))
        with open(Path(tmp.name) / f"n{i}.log", "wb") as log_file:
            procs.append(subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log_file,
                                          preexec_fn=raise_fd_limit))
    cluster = RunningCluster([BrokerAddress("127.0.0.1", m, mqtt311=True) for _, _, m in ports], procs, tmp)
    try:
        for node in cluster.nodes:
            _wait_for_mqtt(node, timeout_s)
    except RuntimeError:
        logs = "\n".join((Path(tmp.name) / f"n{i}.log").read_text(errors="replace")[-800:] for i in range(n))
        cluster.stop()
        raise RuntimeError(f"NATS cluster did not come up within {timeout_s:.0f} s:\n{logs}") from None
    log.info("NATS cluster: MQTT on %s", ", ".join(str(a.port) for a in cluster.nodes))
    return cluster


def _wait_for_mqtt(address: BrokerAddress, timeout_s: float) -> None:
    from edge_client.wire.mqtt import connect, make_client

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        client = make_client(f"fedge-probe-{address.port}", mqtt311=address.mqtt311, persistent=False)
        try:
            connect(client, address, persistent=False, timeout_s=5)
        except ConnectionError:
            time.sleep(0.5)
            continue
        client.disconnect()
        client.loop_stop()
        return
    raise RuntimeError(f"no MQTT session on {address.host}:{address.port}")
