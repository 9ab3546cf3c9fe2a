"""Thousands of emulated devices in one process: one paho client (own MQTT session, own client id, own last
will) per device, all driven from one ``selectors`` loop instead of a network thread per device.

Why paho and a selector rather than an asyncio MQTT library: paho is already the device's MQTT client (the
emulated devices then send byte-for-byte what ``fedge-edge`` sends, through the same ``edge_client.wire``
codec and topics), and it has a documented external-loop API (``on_socket_open``/``register_write`` callbacks,
``loop_read``/``loop_write``/``loop_misc``) that lets one thread serve any number of connections. aiomqtt wraps
the same paho client in asyncio and would add an event-loop layer but no capacity; gmqtt is a second MQTT
implementation whose packets would no longer be the device's. A paho client costs ~4 KB and no thread.

Each device is the real protocol: persistent session, retained hello and status, last will, a task answered by
training its head with :func:`edge_client.daemon.client.compute_update` on its own slice of real data (features
from the shared :mod:`~coordinator.loadtest.bank`), the update kept in an outbox and re-sent with the same
message id when the coordinator asks again, status ``training``/``idle`` around the work. What is shared per
process, because it is the same for every device: the backbone file's spec and the decoding of identical
global-model payloads (validated once per distinct payload, then each device checks it fits its head).

Secure mode (``WorkerSpec.identities``, the ``enroll`` folder of a fleet from :mod:`coordinator.loadtest.identities`):
each device loads its own enrollment bundle, connects over TLS with its own client certificate (the broker's ACL
username), signs its hello, statuses, last will and updates with its key, and refuses any task, reject or global
model without the coordinator's signature, as ``fedge-edge`` does (a global model's signature is checked once per
distinct payload, like its decoding). The TLS handshake is paho's, blocking, one device at a time per process.

The process reports to its parent over a pipe: connections, every update the broker acknowledged (round,
device, message id: what the harness checks for loss and duplication), bytes per round, training time.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import ssl
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from coordinator.fleet.broker import raise_fd_limit
from coordinator.loadtest.bank import DeviceSlice, FeatureBank
from edge_client.daemon.client import compute_update
from edge_client.identity import Identity
from edge_client.learning.head import as_float32, head_shapes
from edge_client.learning.learner import DeviceLearner, SplitConfig
from edge_client.runtime.backbone import BackboneRunner
from edge_client.wire import (
    GlobalModel,
    Hello,
    Message,
    ProtocolError,
    Receiver,
    Reject,
    RoundTask,
    Status,
    Topics,
    check_arrays,
    decode,
    encode,
    sign,
    verify,
)
from edge_client.wire import mqtt as M
from edge_client.wire.signing import check_from_coordinator

log = logging.getLogger("fedge.loadtest")


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    device_ids: tuple[str, ...]
    slices: tuple[DeviceSlice, ...]
    bank_dir: str
    backbone: str
    brokers: tuple[M.BrokerAddress, ...]  # device i connects to brokers[i % len]: spread over a broker cluster
    fleet: str
    horizon: int
    task: str = "tsfm"
    connects_per_s: float = 2000.0  # pacing, so the broker's listen backlog never overflows
    seed: int = 0
    work_slice_s: float = 0.05  # training per loop turn before the sockets are served again
    report_every_s: float = 0.5
    identities: str = ""  # secure mode: a fleet's enroll folder (<id>/<id>.key, .crt, ca.crt, coordinator.crt)


@dataclass
class _Stats:
    connected: int = 0
    connects: int = 0
    disconnects: int = 0
    updates_sent: int = 0
    resent: int = 0
    train_s: float = 0.0
    acked: list[tuple[int, str, str]] = field(default_factory=list)  # since the last report
    bytes_up: Counter[int] = field(default_factory=Counter)  # round -> payload bytes devices published
    bytes_down: Counter[int] = field(default_factory=Counter)  # round -> payload bytes devices received
    other_up: int = 0  # hellos and statuses (no round)
    rejected: Counter[str] = field(default_factory=Counter)


class _Device:
    """One emulated device: its MQTT client, learner, outbox and the globals it received."""

    def __init__(self, proc: _Process, device_id: str, learner: DeviceLearner, seed: int,
                 broker: M.BrokerAddress, identity: Identity | None = None) -> None:
        self.proc, self.device_id, self.learner, self.seed, self.broker = proc, device_id, learner, seed, broker
        self.identity = identity
        if identity is not None:  # TLS with its own certificate: the broker's ACL knows it by its common name
            self.broker = broker.with_identity(identity.ca_file, identity.cert_file, identity.key_file)
        topics = proc.topics
        self.receiver = Receiver(f"device {device_id}", authenticate=self._authenticate)
        self.versions: set[int] = set()
        self.pending: dict[int, RoundTask] = {}
        self.outbox: dict[int, tuple[str, str, bytes, int, float]] = {}  # round -> msg id, topic, payload, base, op
        self.inflight: dict[int, tuple[int, str]] = {}  # mid -> (round, msg id)
        self.personal = None
        self.connected = False
        self.retry_at = 0.0
        offline = encode(self._signed(Status(fleet=proc.spec.fleet, device_id=device_id, state="offline",
                                             detail="connection lost")))
        c = self.client = M.make_client(f"fedge-{proc.spec.fleet}-dev-{device_id}",
                                        will=(topics.status(device_id), offline),
                                        mqtt311=self.broker.mqtt311)
        c.on_connect, c.on_message, c.on_publish, c.on_disconnect = (self._on_connect, self._on_message,
                                                                       self._on_publish, self._on_disconnect)
        sel = proc.selector
        c.on_socket_open = lambda _c, _u, sock: sel.register(sock, selectors.EVENT_READ, self)
        c.on_socket_close = lambda _c, _u, sock: _unregister(sel, sock)
        c.on_socket_register_write = lambda _c, _u, sock: sel.modify(
            sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)
        c.on_socket_unregister_write = lambda _c, _u, sock: _modify_read(sel, sock, self)

    # ------------------------------------------------------------------ identity

    def _signed(self, msg: Message) -> Message:
        return sign(msg, self.identity.key) if self.identity is not None else msg

    def _authenticate(self, msg: Message) -> None:
        """What `fedge-edge` checks (edge_client.daemon.client): the same function."""
        check_from_coordinator(msg, self.identity.coordinator_key if self.identity is not None else None)

    # ------------------------------------------------------------------ MQTT

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.warning("device %s refused: %s", self.device_id, reason_code)
            return
        self.connected = True
        st, t = self.proc.stats, self.proc.topics
        st.connected += 1
        client.subscribe([(t.task(self.device_id), 1), (t.global_model(self.proc.spec.task), 1)])
        self._publish(t.hello(self.device_id), encode(self._signed(Hello(
            fleet=self.proc.spec.fleet, device_id=self.device_id, runtime=self.learner.backbone.runtime_version,
            profile="emulated", domain=self.proc.domains[self.device_id], n_train=self.learner.n_train,
            n_eval=self.learner.n_eval, capabilities=["train", "evaluate", "fedprox"]))), retain=True)
        self._status("online")
        for round_id, (msg_id, topic, payload, _, _) in self.outbox.items():  # what a lost connection left unacked
            if (round_id, msg_id) not in self.inflight.values():
                self._send_update(round_id, msg_id, topic, payload)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if self.connected:
            self.proc.stats.connected -= 1
        self.connected = False
        self.proc.stats.disconnects += 1
        if not self.proc.stopping:
            self.retry_at = time.monotonic() + 1 + random.random() * 4
            self.proc.reconnect.append(self)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        key = self.inflight.pop(mid, None)
        if key is not None and not getattr(reason_code, "is_failure", False):
            self.proc.stats.acked.append((key[0], self.device_id, key[1]))

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        try:
            if message.topic == self.proc.global_topic:
                self._on_global(message.payload)
                return
            msg = self.receiver.accept(message.topic, message.payload, self.proc.topics)
            if msg.round_id is not None:
                self.proc.stats.bytes_down[msg.round_id] += len(message.payload)
            if isinstance(msg, RoundTask):
                if msg.model_version in self.versions:
                    self.proc.work.append((self, msg))
                else:
                    self.pending[msg.model_version] = msg
            elif isinstance(msg, Reject):
                self.proc.stats.rejected[msg.reason] += 1
        except ProtocolError as err:
            self.proc.stats.rejected[f"device:{err.reason}"] += 1
        except Exception:  # a bug must not stop the loop that serves every other device
            log.exception("device %s: error handling %s", self.device_id, message.topic)

    def _on_global(self, payload: bytes) -> None:
        msg = self.proc.global_model(payload)
        if msg is None:
            return
        if msg.round_id is not None:
            self.proc.stats.bytes_down[msg.round_id] += len(payload)
        self.versions.add(msg.version)
        for old in sorted(self.versions)[:-2]:
            self.versions.discard(old)
        task = self.pending.pop(msg.version, None)
        if task is not None:
            self.proc.work.append((self, task))

    # ------------------------------------------------------------------ work

    def run_task(self, task: RoundTask) -> None:
        stored = self.outbox.get(task.round_id)
        if stored is not None and stored[3] == task.model_version and stored[4] == task.round_opened:
            self.proc.stats.resent += 1
            self._send_update(task.round_id, stored[0], stored[1], stored[2])
            return
        if task.deadline_ts < time.time():
            return
        self._status("training", f"round {task.round_id}")
        t0 = time.perf_counter()
        update, outcome = compute_update(self.learner, task, self.proc.globals[task.model_version], self.personal,
                                         device_id=self.device_id, seed=self.seed)
        if outcome is not None:
            self.personal = outcome.personal
        payload = encode(self._signed(update))
        self.proc.stats.train_s += time.perf_counter() - t0
        topic = self.proc.topics.update(task.round_id, self.device_id)
        self.outbox[task.round_id] = (update.msg_id, topic, payload, task.model_version, task.round_opened)
        for old in sorted(self.outbox)[:-2]:
            del self.outbox[old]
        self._send_update(task.round_id, update.msg_id, topic, payload)
        self.proc.stats.updates_sent += 1
        self._status("idle")

    def _send_update(self, round_id: int, msg_id: str, topic: str, payload: bytes) -> None:
        info = M.publish(self.client, topic, payload)
        self.inflight[info.mid] = (round_id, msg_id)
        self.proc.stats.bytes_up[round_id] += len(payload)

    def _status(self, state: str, detail: str = "") -> None:
        self._publish(self.proc.topics.status(self.device_id), encode(self._signed(Status(
            fleet=self.proc.spec.fleet, device_id=self.device_id, state=state, detail=detail))), retain=True)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        M.publish(self.client, topic, payload, retain=retain)
        self.proc.stats.other_up += len(payload)


def _drain_tls(client: Any) -> None:
    """Read what TLS already decrypted: those bytes are in the SSL object, not the socket, so the selector would not
    report them (paho's own loop checks ``pending()`` the same way)."""
    sock = client.socket()
    while isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
        if client.loop_read() != 0:
            return
        sock = client.socket()


def _unregister(sel: selectors.BaseSelector, sock: Any) -> None:
    with contextlib.suppress(KeyError, ValueError):
        sel.unregister(sock)


def _modify_read(sel: selectors.BaseSelector, sock: Any, dev: _Device) -> None:
    with contextlib.suppress(KeyError, ValueError):
        sel.modify(sock, selectors.EVENT_READ, dev)


class _Process:
    """The devices of one worker process and the loop that serves them."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.topics = Topics(spec.fleet)
        self.global_topic = self.topics.global_model(spec.task)
        self.selector = selectors.DefaultSelector()
        self.stats = _Stats()
        self.work: deque[tuple[_Device, RoundTask]] = deque()
        self.reconnect: list[_Device] = []
        self.stopping = False
        self.globals: dict[int, dict] = {}
        self._decoded: dict[int, GlobalModel | None] = {}  # hash(payload) -> validated message (or refused)
        bank = FeatureBank.load(spec.bank_dir)
        self.backbone = BackboneRunner(spec.backbone, threads=1)  # spec and runtime name; features: the bank
        b = self.backbone.spec
        self.head_shapes = head_shapes(b.feature_dim, spec.horizon, len(b.quantiles))
        split = SplitConfig(horizon=spec.horizon)
        self.domains = {}
        self.devices = []
        self.coordinator_key = None  # secure mode: what global models must be signed with
        for i, (dev_id, sl) in enumerate(zip(spec.device_ids, spec.slices, strict=True)):
            data = bank.device_data(sl)
            self.domains[dev_id] = bank.series[sl.series].domain
            learner = DeviceLearner.from_features(self.backbone, split=split, **data)
            identity = Identity.load(f"{spec.identities}/{dev_id}", dev_id) if spec.identities else None
            if identity is not None:
                self.coordinator_key = identity.coordinator_key
            self.devices.append(_Device(self, dev_id, learner, spec.seed + spec.index * 1_000_003 + i,
                                        spec.brokers[i % len(spec.brokers)], identity))

    def global_model(self, payload: bytes) -> GlobalModel | None:
        """Decode and check a global head once per distinct payload (every device receives the same bytes)."""
        key = hash(payload)
        if key not in self._decoded:
            try:
                msg = decode(payload)
                if not isinstance(msg, GlobalModel):
                    raise ProtocolError(f"{msg.type} on the global model topic")
                if self.coordinator_key is not None:
                    verify(msg, self.coordinator_key, "the coordinator's")
                check_arrays(msg.params, self.head_shapes, what="global")
                if msg.backbone_id and self.backbone.spec.model_id and msg.backbone_id != self.backbone.spec.model_id:
                    raise ProtocolError(f"global head for backbone {msg.backbone_id}")
                self.globals[msg.version] = as_float32(msg.params)
                for old in sorted(self.globals)[:-3]:
                    del self.globals[old]
                self._decoded[key] = msg
            except ProtocolError as err:
                self.stats.rejected[f"global:{err.reason}"] += 1
                self._decoded[key] = None
        return self._decoded[key]

    def run(self, conn: Any) -> None:
        waiting = deque(self.devices)
        interval = 1.0 / max(self.spec.connects_per_s, 1.0)
        next_connect = next_misc = next_report = time.monotonic()
        while True:
            now = time.monotonic()
            while waiting and now >= next_connect:
                self._connect(waiting.popleft())
                next_connect += interval
            if now >= next_misc:
                for dev in self.devices:
                    if dev.connected:
                        dev.client.loop_misc()
                next_misc = now + 1.0
                self._retry(now)
            for key, mask in self.selector.select(0 if self.work else 0.02):
                dev = key.data
                if mask & selectors.EVENT_READ:
                    dev.client.loop_read()
                    _drain_tls(dev.client)
                if mask & selectors.EVENT_WRITE:
                    dev.client.loop_write()
            until = time.perf_counter() + self.spec.work_slice_s
            while self.work and time.perf_counter() < until:
                dev, task = self.work.popleft()
                try:
                    dev.run_task(task)
                except Exception:
                    log.exception("device %s: round %d failed", dev.device_id, task.round_id)
            if now >= next_report:
                self._report(conn)
                next_report = now + self.spec.report_every_s
                if conn.poll() and conn.recv() == "stop":
                    break
        self.stopping = True
        for dev in self.devices:
            with contextlib.suppress(Exception):
                dev.client.disconnect()
                dev.client.loop_write()
        self._report(conn, final=True)

    def _connect(self, dev: _Device) -> None:
        self.stats.connects += 1
        try:
            M.open_connection(dev.client, dev.broker)
        except OSError as exc:
            log.warning("device %s: cannot connect: %s", dev.device_id, exc)
            dev.retry_at = time.monotonic() + 1 + random.random() * 4
            self.reconnect.append(dev)

    def _retry(self, now: float) -> None:
        due = [d for d in self.reconnect if d.retry_at <= now]
        self.reconnect = [d for d in self.reconnect if d.retry_at > now]
        for dev in due:
            self.stats.connects += 1
            try:
                dev.client.reconnect()
            except OSError:
                dev.retry_at = now + 1 + random.random() * 4
                self.reconnect.append(dev)

    def _report(self, conn: Any, final: bool = False) -> None:
        st = self.stats
        conn.send({"worker": self.spec.index, "final": final, "connected": st.connected, "connects": st.connects,
                   "disconnects": st.disconnects, "updates_sent": st.updates_sent, "resent": st.resent,
                   "train_s": st.train_s, "acked": st.acked, "bytes_up": dict(st.bytes_up),
                   "bytes_down": dict(st.bytes_down), "other_up": st.other_up, "rejected": dict(st.rejected),
                   "queued_work": len(self.work)})
        st.acked = []


def worker_main(spec: WorkerSpec, conn: Any) -> None:
    """Entry point of one device process (multiprocessing, spawn): build the devices, serve them until told to
    stop. One BLAS thread: the process is one of several sharing the cores."""
    from threadpoolctl import threadpool_limits

    logging.basicConfig(level=logging.WARNING, format=f"worker {spec.index}: %(name)s: %(message)s")
    raise_fd_limit()  # one socket per emulated device
    with threadpool_limits(1):
        try:
            proc = _Process(spec)
            conn.send({"worker": spec.index, "ready": len(proc.devices)})
            if conn.recv() == "go":  # the harness starts the clock (time until all devices are online)
                proc.run(conn)
        except Exception as exc:
            log.exception("worker %d failed", spec.index)
            conn.send({"worker": spec.index, "error": f"{type(exc).__name__}: {exc}"})
