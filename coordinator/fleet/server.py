"""Federated rounds over MQTT: select devices, publish the task, collect updates until everyone
answered or the deadline passed, aggregate once, publish the new global head.

The coordinator keeps a persistent MQTT session under a fixed client id, so updates published
while it is down are queued by the broker and delivered when it returns; every round and every
update is in SQLite (:mod:`coordinator.fleet.state`), so a restarted coordinator resumes the open
round where it stopped, re-asks only the devices that have not answered, and counts each update
once. Everything a device sends is validated (:class:`edge_client.wire.Receiver` plus the
round-level checks here); a refusal is logged, counted and answered with a ``Reject``.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from coordinator.fleet.aggregation import Bounds, NonFiniteModel, bound_updates
from coordinator.fleet.pki import coordinator_name
from coordinator.fleet.registry import DeviceRegistry
from coordinator.fleet.state import FleetState, RoundRecord
from coordinator.fleet.strategies import RoundInputs, fleet_strategy
from edge_client.wire import (
    DuplicateUpdate,
    Forget,
    GlobalModel,
    Hello,
    IdentityMismatch,
    InternalError,
    InvalidMessage,
    Message,
    ProtocolError,
    Receipt,
    Receiver,
    Reject,
    RoundClosed,
    RoundTask,
    StaleRound,
    Status,
    Topics,
    UnknownDevice,
    Update,
    check_arrays,
    decode,
    encode,
    sign,
    verify,
)
from edge_client.wire import mqtt as M
from edge_client.wire.memory import SqliteReplay
from edge_client.wire.signing import SIGNED_BY_DEVICE

log = logging.getLogger("fedge.coordinator")

REPLAY_WINDOW_S = 30 * 86400.0  # act-once messages older than this are refused; their ids are kept that long


@dataclass(frozen=True)
class FleetConfig:
    fleet: str = "demo"
    task: str = "tsfm"
    fraction: float = 1.0  # share of online devices asked each round
    min_devices: int = 1
    quorum_fraction: float = 0.5  # share of the asked devices needed to aggregate at the deadline
    deadline_s: float = 120.0
    resume_grace_s: float = 30.0  # extra time a resumed round gets if its deadline passed while we were down
    local_epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 64
    prox_mu: float = 0.0
    strategy: str = "fedavg"  # fedavg | fedprox | trimmed_mean | median | krum | task_vector (personalised)
    tv_temperature: float = 0.1  # task_vector: softmax temperature over cosine similarities
    clip_norm: float | None = None  # an absolute norm bound on top of the adaptive one (fedavg, trimmed_mean)
    # bounds every update gets before any strategy sees it (coordinator.fleet.aggregation.Bounds): on by default
    bounds: Bounds = field(default_factory=Bounds)
    # retention: update payloads (deltas) of the newest this many finished rounds are kept, metrics always
    keep_rounds: int = 1000
    upload_dtype: str = "float16"
    seed: int = 0
    allowlist: frozenset[str] | None = None  # None: any device that says hello may join
    personalize: tuple[tuple[str, float], ...] = ()  # device-side methods, e.g. (("self_distill", 0.5),)


@dataclass
class RoundResult:
    round_id: int
    kind: str
    base_version: int
    new_version: int | None
    selected: tuple[str, ...]
    metrics: dict[str, dict[str, float]]  # device -> metrics
    n_samples: dict[str, int]
    bytes_up: int
    bytes_down: int
    seconds: float
    resumed: bool = False
    state: str = "closed"
    aggregation_s: float = 0.0  # time spent aggregating and storing the new version


@dataclass
class _Traffic:
    up: Counter[int] = field(default_factory=Counter)  # round id -> bytes
    down: Counter[int] = field(default_factory=Counter)


class FleetCoordinator:
    def __init__(self, cfg: FleetConfig, broker: M.BrokerAddress, state: FleetState,
                 client_id: str | None = None, registry: DeviceRegistry | None = None) -> None:
        """`registry` (a fleet folder from `fedge fleet init`): only enrolled devices take part, every message they
        send must carry their signature, and everything this coordinator sends carries its own. Without one (the
        loopback demo) devices are known by their hello and nothing is signed."""
        self.cfg = cfg
        self.broker = broker
        self.state = state
        self.registry = registry
        self.signing_key = registry.coordinator_key() if registry is not None else None
        if registry is not None and registry.fleet != cfg.fleet:
            raise ValueError(f"the fleet folder is for fleet {registry.fleet!r}, not {cfg.fleet!r}")
        self.topics = Topics(cfg.fleet)
        self.strategy = fleet_strategy(cfg.strategy, clip_norm=cfg.clip_norm, tv_temperature=cfg.tv_temperature)
        # replay memory in the fleet database: a Forget replayed after a restart is still a replay
        self.receiver = Receiver("coordinator", memory=SqliteReplay(state.path), authenticate=self._authenticate,
                                 max_age_s=REPLAY_WINDOW_S)
        self.traffic = _Traffic()
        self.duplicates = 0
        self._changed = threading.Condition()
        self._open: RoundRecord | None = None
        self._expected_shapes: dict[str, tuple[int, ...]] = {}
        # What the rounds use, decoded once and held here (SQLite stays the durable copy): global heads by version
        # (the initial one, the current one and a round's base), the backbone pin, each device's personal head,
        # and the updates of the open round as they arrived.
        self._models: dict[int, dict[str, np.ndarray]] = {}
        self._current: int | None = None
        self._pin: dict[str, str] | None = None
        self._personal: dict[str, dict[str, np.ndarray] | None] = {}
        self._received: dict[int, dict[str, Update]] = {}
        self._closing: set[int] = set()  # rounds whose updates are being aggregated: later ones get a Reject
        self._early_status: dict[str, str] = {}  # statuses of devices not registered (yet): a status registers nobody
        self.client = M.make_client(client_id or coordinator_name(cfg.fleet))
        self.client.on_connect = M.guarded(self._on_connect, "coordinator on_connect", self.receiver.callback_failed)
        self.client.on_message = M.guarded(self._on_message, "coordinator on_message", self.receiver.callback_failed)
        # called with every finished round (metrics, dashboards); an observer that raises is logged, not fatal
        self.round_observers: list[Callable[[RoundResult], None]] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FleetCoordinator:
        resumed = self.state.open_rounds(self.cfg.task)
        if resumed:
            self._set_open(resumed[-1])
        M.connect(self.client, self.broker, persistent=True)
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def open_round(self) -> RoundRecord | None:
        """The round in progress, if any (read by metrics and the dashboard)."""
        return self._open

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.error("coordinator: broker refused connection: %s", reason_code)
            return
        client.subscribe([(self.topics.all_updates, 1), (self.topics.all_hellos, 1), (self.topics.all_statuses, 1),
                          (self.topics.all_forgets, 1)])
        log.info("coordinator connected to %s:%d (session present: %s)", self.broker.host, self.broker.port,
                 flags.session_present)

    # ------------------------------------------------------------------ model

    def ensure_model(self, initial: Mapping[str, np.ndarray], meta: dict | None = None) -> int:
        """Register the initial global head unless a model already exists (a restart keeps its own)."""
        if self._load_current() is None:
            self.state.save_model(self.cfg.task, initial, meta)
        version = self._load_current()
        assert version is not None
        return version

    def current_model(self) -> tuple[int, dict[str, np.ndarray]]:
        version = self._current if self._current is not None else self._load_current()
        if version is None:
            raise RuntimeError("no global model registered; call ensure_model first")
        return version, self._model(version)

    def _load_current(self) -> int | None:
        """Read the latest model and its backbone pin from SQLite once (at start, or after ensure_model)."""
        latest = self.state.latest_model(self.cfg.task)
        if latest is None:
            return None
        version, params, meta = latest
        self._models[version] = params
        self._current = version
        self._pin = {k: str(meta.get(k, "")) for k in ("backbone_sha256", "backbone_id")}
        return version

    def _model(self, version: int) -> dict[str, np.ndarray]:
        """A global head by version, decoded from SQLite the first time only; old versions are dropped, keeping
        the initial head (task vectors are measured from it) and the current one."""
        if version not in self._models:
            self._models[version] = self.state.model(version)
        for old in [v for v in self._models if v not in (0, version, self._current)]:
            del self._models[old]
        return self._models[version]

    def _personal_head(self, device_id: str) -> dict[str, np.ndarray] | None:
        if device_id not in self._personal:
            self._personal[device_id] = self.state.personal(device_id)
        return self._personal[device_id]

    def publish_global(self, version: int, params: Mapping[str, np.ndarray], round_id: int | None = None) -> int:
        msg = GlobalModel(fleet=self.cfg.fleet, task=self.cfg.task, version=version, round_id=round_id,
                          params={k: np.asarray(v, np.float32) for k, v in params.items()}, **self._model_meta())
        return self._send(self.topics.global_model(self.cfg.task), msg, retain=True)

    # ------------------------------------------------------------------ devices

    def wait_for_devices(self, n: int, timeout_s: float) -> list[str]:
        deadline = time.time() + timeout_s
        with self._changed:
            while len(self.state.devices(online_only=True)) < n and time.time() < deadline:
                self._changed.wait(0.2)
        return list(self.state.devices(online_only=True))

    def _select(self, round_seed: int) -> list[str]:
        online = sorted(self.state.devices(online_only=True))
        if len(online) < self.cfg.min_devices:
            raise RuntimeError(f"{len(online)} devices online, round needs at least {self.cfg.min_devices}")
        k = max(self.cfg.min_devices, math.ceil(self.cfg.fraction * len(online)))
        return sorted(random.Random(self.cfg.seed * 7919 + round_seed).sample(online, min(k, len(online))))

    # ------------------------------------------------------------------ rounds

    def run_round(self, kind: str = "train", on_progress: Callable[[int, int], None] | None = None, *,
                  devices: Sequence[str] | None = None,
                  options: Mapping[str, float | int | str | bool] | None = None) -> RoundResult:
        """Run one round to the end, or finish the round a previous process left open.

        `devices` replaces the seeded random selection (a task that knows who has new data, e.g. the
        recommender's continual periods); `options` go into every device's task and are stored with
        the round, so a resumed round asks the same."""
        t0 = time.time()
        resumed = self._open is not None and self._open.kind == kind
        if resumed:
            rec = self._open
            assert rec is not None
            if rec.deadline < time.time() + self.cfg.resume_grace_s:
                self.state.extend_deadline(rec.round_id, time.time() + self.cfg.resume_grace_s)
                rec = self.state.round(rec.round_id)
            log.info("resuming round %d (%d/%d updates already stored)", rec.round_id,
                     len(self.state.reported(rec.round_id)), len(rec.selected))
        else:
            version = self.current_model()[0]
            selected = sorted(devices) if devices is not None else self._select(self.state.next_round_id())
            if not selected:
                raise ValueError("a round needs at least one device")
            quorum = max(1, math.ceil(self.cfg.quorum_fraction * len(selected)))
            rec = self.state.open_round(self.cfg.task, kind, version, selected, quorum, t0 + self.cfg.deadline_s,
                                        {**self._round_config(), "options": dict(options or {})})
        self._set_open(rec)
        base = self._model(rec.base_version)
        global_bytes = self.publish_global(rec.base_version, base, rec.round_id)
        pending = [d for d in rec.selected if d not in self.state.reported(rec.round_id)]
        self.traffic.down[rec.round_id] += global_bytes * len(pending)
        for device_id in pending:
            self._send_task(rec, device_id)

        while True:
            n_reported = len(self.state.reported(rec.round_id))
            if on_progress:
                on_progress(n_reported, len(rec.selected))  # outside the lock: a slow callback must not block paho
            if n_reported >= len(rec.selected) or time.time() >= rec.deadline:
                break
            with self._changed:
                if len(self.state.reported(rec.round_id)) == n_reported:
                    self._changed.wait(min(0.5, max(0.01, rec.deadline - time.time())))
        result = self._close(rec, base, t0, resumed)
        for observe in self.round_observers:
            try:
                observe(result)
            except Exception:
                log.exception("round observer %r failed", observe)
        return result

    def _round_config(self) -> dict:
        c = self.cfg
        return {"local_epochs": c.local_epochs, "lr": c.lr, "batch_size": c.batch_size, "prox_mu": c.prox_mu,
                "strategy": c.strategy, "upload_dtype": c.upload_dtype, "personalize": dict(c.personalize)}

    def build_task(self, rec: RoundRecord, device_id: str) -> RoundTask:
        """The task one device gets in a round (a subclass adds what its task needs, e.g. a prototype)."""
        c = rec.config
        task = RoundTask(fleet=self.cfg.fleet, device_id=device_id, round_id=rec.round_id, task=rec.task,
                         kind=rec.kind, model_version=rec.base_version, deadline_ts=rec.deadline,
                         round_opened=rec.opened,
                         local_epochs=c["local_epochs"], lr=c["lr"], batch_size=c["batch_size"],
                         prox_mu=c["prox_mu"], options={"upload_dtype": c["upload_dtype"],
                                                        **({"personalize": True, **c["personalize"]}
                                                           if c.get("personalize") else {}),
                                                        **c.get("options", {})})
        if self.strategy.personalised and rec.kind == "train":
            own = self._personal_head(device_id)
            if own is not None:
                task = task.model_copy(update={"params": {k: np.asarray(v, np.float32) for k, v in own.items()}})
        return task

    def _send_task(self, rec: RoundRecord, device_id: str) -> None:
        size = self._send(self.topics.task(device_id), self.build_task(rec, device_id),
                          expiry_s=max(1, int(rec.deadline - time.time())))
        self.traffic.down[rec.round_id] += size

    def _close(self, rec: RoundRecord, base: dict[str, np.ndarray], t0: float, resumed: bool) -> RoundResult:
        with self._changed:  # from here on an update for this round is refused, never stored and left out
            self._closing.add(rec.round_id)
        try:
            return self._aggregate_and_close(rec, base, t0, resumed)
        finally:
            with self._changed:
                self._closing.discard(rec.round_id)

    def _aggregate_and_close(self, rec: RoundRecord, base: dict[str, np.ndarray], t0: float,
                             resumed: bool) -> RoundResult:
        updates = self._round_updates(rec.round_id)
        metrics = {u.device_id: dict(u.metrics) for u in updates}
        n_samples = {u.device_id: u.n_samples for u in updates}
        new_version, state, t_agg = None, "closed", time.time()
        if rec.kind == "train":
            if len(updates) >= rec.quorum:
                bounded = bound_updates([u for u in updates if u.n_samples > 0], self.cfg.bounds, self.sample_cap)
                if bounded.clipped or bounded.capped:
                    log.info("round %d: norm bound %.3g clipped %s; sample counts capped for %s", rec.round_id,
                             bounded.norm_bound or 0.0, list(bounded.clipped) or "none", list(bounded.capped) or "none")
                try:
                    agg = self.strategy.aggregate_round(RoundInputs(base, bounded.updates,
                                                                    initial=lambda: self._model(0),
                                                                    personal=self._personal_head))
                    new_version = self.state.close_round(rec.round_id, agg.global_params, rec.task,
                                                         meta=self._model_meta(), personal=agg.personal)
                except NonFiniteModel as exc:
                    log.error("round %d: aggregate refused, global unchanged: %s", rec.round_id, exc)
                    self.receiver.rejected["non_finite_aggregate"] += 1
                    self.state.fail_round(rec.round_id)
                    state = "failed"
                if new_version is not None:
                    self._adopt(new_version, agg.global_params, agg.personal)
                    self.publish_global(new_version, self._model(new_version), rec.round_id)
            else:
                log.warning("round %d: %d of %d updates by the deadline, quorum %d not met; global unchanged",
                            rec.round_id, len(updates), len(rec.selected), rec.quorum)
                self.state.fail_round(rec.round_id)
                state = "failed"
        else:
            self.state.close_round(rec.round_id, None, rec.task)
        aggregation_s = time.time() - t_agg
        self._set_open(None)
        pruned = self.state.prune(self.cfg.keep_rounds)
        if any(pruned.values()):
            log.info("retention: dropped %d old update payloads (metrics kept) and %d old model versions",
                     pruned["update_payloads"], pruned["models"])
        return RoundResult(rec.round_id, rec.kind, rec.base_version, new_version, rec.selected, metrics, n_samples,
                           self.traffic.up[rec.round_id], self.traffic.down[rec.round_id], time.time() - t0,
                           resumed, state, aggregation_s)

    def _adopt(self, version: int, params: Mapping[str, np.ndarray], personal: Mapping[str, dict]) -> None:
        """Hold a version this process just stored as the current model (the same arrays SQLite now holds)."""
        if self._current is None or version > self._current:
            self._models[version] = {k: np.array(v) for k, v in params.items()}
            self._current = version
            self._personal.update({d: {k: np.array(v) for k, v in p.items()} for d, p in personal.items()})
        else:  # the round was already closed: what SQLite holds wins
            self._personal.clear()

    def _round_updates(self, round_id: int) -> list[Update]:
        """The round's stored updates (SQLite decides which count), decoded on arrival; only updates stored
        before a restart are decoded here, and one that no longer decodes (stored under older rules) is logged,
        counted and left out rather than stopping the round."""
        with self._changed:
            held = self._received.pop(round_id, {})
        return self.stored_updates(round_id, held)

    def stored_updates(self, round_id: int, held: Mapping[str, Update] | None = None) -> list[Update]:
        """The updates SQLite holds for a round, in device order (`held`: ones already decoded)."""
        out = []
        for device_id, payload in self.state.updates(round_id):
            if held and device_id in held:
                out.append(held[device_id])
                continue
            try:
                msg = decode(payload)
            except ProtocolError as err:
                self.receiver.reject(err, f"stored update of {device_id} in round {round_id}", len(payload))
                continue
            if isinstance(msg, Update):
                out.append(msg)
        return out

    def sample_cap(self, device_id: str) -> int | None:
        """The most samples a device's update may count for (what it declared when it was enrolled), None: no own
        cap (the fleet's bounds still apply)."""
        if self.registry is None:
            return None
        try:
            return self.registry.device(device_id).max_samples
        except ProtocolError:
            return 0  # revoked since it sent the update: it counts for nothing

    def _authenticate(self, msg: Message) -> None:
        """Only what devices send is accepted here, and with a registry only from enrolled, unrevoked devices whose
        signature checks out; without one, the allowlist (if any) applies to every message, not only hellos."""
        if msg.type not in SIGNED_BY_DEVICE or not msg.device_id:
            raise IdentityMismatch(f"a device does not send {msg.type} messages")
        if self.registry is not None:
            verify(msg, self.registry.device(msg.device_id).public_key, f"device {msg.device_id}'s")
        elif self.cfg.allowlist is not None and msg.device_id not in self.cfg.allowlist:
            raise UnknownDevice(f"device {msg.device_id!r} is not on the fleet allowlist")

    def _model_meta(self) -> dict[str, str]:
        """The backbone pin of the model: carried into each new version and each GlobalModel."""
        if self._pin is None and self._load_current() is None:
            return {"backbone_sha256": "", "backbone_id": ""}
        assert self._pin is not None
        return dict(self._pin)

    def _set_open(self, rec: RoundRecord | None) -> None:
        with self._changed:
            self._open = rec
            for stale in [r for r in self._received if rec is None or r != rec.round_id]:
                del self._received[stale]  # late arrivals for a round that is closed: SQLite has them
            if rec is not None and rec.kind == "train":
                shapes = {k: tuple(v.shape) for k, v in self._model(rec.base_version).items()}
                self._expected_shapes = shapes

    # ------------------------------------------------------------------ incoming

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        device = self.topics.device_of(message.topic)
        if not message.payload and message.topic.rsplit("/", 1)[-1] in ("hello", "status"):
            return  # a device cleared its retained hello/status (forget-me): nothing to decode
        try:
            msg = self.receiver.accept(message.topic, message.payload, self.topics)  # counts its own refusals
        except ProtocolError as err:
            self._send_reject(device, err, "-")
            return
        try:
            if isinstance(msg, Update):
                self._on_update(msg, message.payload)
            elif isinstance(msg, Hello):
                self._on_hello(msg, retained=bool(message.retain))
            elif isinstance(msg, Forget):
                self._on_forget(msg.device_id)
            elif isinstance(msg, Status):
                if not self.state.set_device_state(msg.device_id, msg.state):
                    # a retained status can arrive before the device's retained hello: applied by that hello
                    self._early_status[msg.device_id] = msg.state
                    while len(self._early_status) > 10_000:
                        self._early_status.pop(next(iter(self._early_status)))
                with self._changed:
                    self._changed.notify_all()
        except ProtocolError as err:
            self.receiver.reject(err, message.topic, len(message.payload))
            self._send_reject(device, err, msg.msg_id, msg.round_id)
        except Exception as exc:  # a bug, or input no check foresaw: answered and counted, never silent or fatal
            log.exception("coordinator: error handling %s on %s", msg.type, message.topic)
            self.receiver.callback_failed(exc)
            self._send_reject(device, InternalError(f"{type(exc).__name__} while handling {msg.type}"), msg.msg_id,
                              msg.round_id)

    def _on_hello(self, msg: Hello, retained: bool) -> None:
        """Hellos are retained, so a coordinator that starts after its devices still learns of
        them; only a live hello proves the device is connected now."""
        if self.cfg.allowlist is not None and msg.device_id not in self.cfg.allowlist:
            raise UnknownDevice(f"device {msg.device_id!r} is not on the fleet allowlist")
        early = self._early_status.pop(msg.device_id, None)
        self.state.upsert_device(msg.device_id, domain=msg.domain, profile=msg.profile, runtime=msg.runtime,
                                 n_train=msg.n_train, state=early if retained else "online",
                                 backbone_sha256=msg.backbone_sha256, bundle_version=msg.bundle_version)
        log.info("device %s joined (%s, %s, %d windows)", msg.device_id, msg.domain, msg.runtime, msg.n_train)
        with self._changed:
            self._changed.notify_all()

    def _on_forget(self, device_id: str) -> None:
        """Delete what this coordinator stored from the device (subclasses also drop what they derived
        from it, e.g. the recommender's prototypes)."""
        with self._changed:
            deleted = self.state.forget_device(device_id)
            self._personal.pop(device_id, None)
            for held in self._received.values():
                held.pop(device_id, None)
            self._changed.notify_all()
        log.info("device %s asked to be forgotten: deleted %s", device_id,
                 ", ".join(f"{n} {table}" for table, n in deleted.items()))

    def _on_update(self, msg: Update, payload: bytes) -> None:
        """Store an update once and answer it: a Receipt when it is stored (or was already, byte for byte: the device
        re-sends until it has one), a Reject otherwise. Checked and stored under the lock that closing a round takes,
        so an update is either in the aggregate or refused, never stored and left out."""
        with self._changed:
            if self.state.update_msg_id(msg.round_id, msg.device_id) == msg.msg_id:
                self.duplicates += 1
                log.info("round %d: duplicate update from %s; receipt sent again", msg.round_id, msg.device_id)
            else:
                self._check_update(msg)
                if not self.state.add_update(msg.round_id, msg.device_id, msg.msg_id, msg.n_samples, bytes(payload),
                                             msg.metrics):
                    raise DuplicateUpdate(f"device {msg.device_id} already sent another update for round "
                                          f"{msg.round_id}")
                self.traffic.up[msg.round_id] += len(payload)
                self._received.setdefault(msg.round_id, {})[msg.device_id] = msg
            self._changed.notify_all()
        self._send(self.topics.task(msg.device_id), Receipt(fleet=self.cfg.fleet, device_id=msg.device_id,
                                                          round_id=msg.round_id, ref_msg_id=msg.msg_id), expiry_s=3600)

    def _check_update(self, msg: Update) -> None:
        rec = self._open
        if not self.state.has_device(msg.device_id):
            raise UnknownDevice(f"update from unregistered device {msg.device_id!r}")
        if msg.round_id in self._closing:
            raise RoundClosed(f"round {msg.round_id} is closing; its aggregate is being computed without this update")
        if rec is None or msg.round_id != rec.round_id:
            raise StaleRound(f"update for round {msg.round_id}, open round is {rec.round_id if rec else 'none'}")
        if msg.device_id not in rec.selected:
            raise StaleRound(f"device {msg.device_id} was not selected for round {rec.round_id}")
        if msg.base_version != rec.base_version:
            raise StaleRound(f"update built on v{msg.base_version}, round {rec.round_id} uses v{rec.base_version}")
        if msg.kind != rec.kind:
            raise InvalidMessage(f"{msg.kind} update for a {rec.kind} round")
        if rec.kind == "train":
            if msg.n_samples <= 0:
                raise InvalidMessage("a training update needs n_samples > 0")
            check_arrays(msg.delta, self._expected_shapes, what="delta")

    def _send_reject(self, device_id: str | None, err: ProtocolError, ref_msg_id: str,
                     round_id: int | None = None) -> None:
        """Tell the device why; a reject to an id that cannot be a topic level is not sent."""
        if not device_id:
            return
        try:
            reject = Reject(fleet=self.cfg.fleet, device_id=device_id, round_id=round_id, ref_msg_id=ref_msg_id,
                            reason=err.reason, detail=str(err)[:1000])
            self._send(self.topics.task(device_id), reject, expiry_s=3600)
        except (ValueError, ProtocolError):
            log.debug("cannot address a reject to %r", device_id)

    def _send(self, topic: str, msg: Message, *, retain: bool = False, expiry_s: int | None = None) -> int:
        """Publish one control message, signed with the coordinator's key when it has one; returns its size."""
        payload = encode(sign(msg, self.signing_key) if self.signing_key is not None else msg)
        M.publish(self.client, topic, payload, retain=retain, expiry_s=expiry_s)
        return len(payload)
