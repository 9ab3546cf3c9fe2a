"""Federated rounds over MQTT: select devices, publish the task, collect updates until everyone
answered or the deadline passed, aggregate once, publish the new global head.

The coordinator keeps a persistent MQTT session under a fixed client id, so updates published
while it is down are queued by the broker and delivered when it returns; every round and every
update is in SQLite (:mod:`coordinator.fleet.state`), so a restarted coordinator resumes the open
round where it stopped, re-asks only the devices that have not answered, and counts each update
once. Everything a device sends is validated (:class:`edge_client.wire.Receiver` plus the
round-level checks here); a refusal is logged, counted and answered with a ``Reject``.

At scale (thousands of devices) the network thread only validates: every write goes through a
:class:`~coordinator.fleet.ingest.BatchWriter` (one transaction per batch), a message is acknowledged to
the broker only after its batch committed (paho's manual acks), and FedAvg-like strategies add each
update to a running float64 sum as it is stored; the round's adaptive bounds are worked in exactly at the
close from each update's norm and sample count (:func:`~coordinator.fleet.aggregation.bounded_streamed_mean`),
so closing a round decodes only the few updates the bounds change and holds one head in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature

from coordinator.fleet.aggregation import (
    Bounds,
    NonFiniteModel,
    bound_updates,
    bounded_streamed_mean,
    global_norm,
    plan_bounds,
    summable,
)
from coordinator.fleet.checks import check_update
from coordinator.fleet.ingest import BatchWriter
from coordinator.fleet.pki import coordinator_name
from coordinator.fleet.privacy import Charge, DPConfig, PrivacyBudgetSpent, dp_sum, epsilon, next_clip
from coordinator.fleet.registry import DeviceRegistry
from coordinator.fleet.replay import FleetReplay
from coordinator.fleet.secagg import SecAggAbort, SecureRound
from coordinator.fleet.state import (
    CONFLICT,
    DUPLICATE,
    NOT_OPEN,
    STORED,
    FleetState,
    PrivacyRow,
    RoundRecord,
    StatusRow,
    UpdateRow,
)
from coordinator.fleet.strategies import Aggregate, FleetStrategy, RoundInputs, fleet_strategy
from edge_client.learning.prototype import PROTOTYPE_DIM
from edge_client.secagg.masking import from_vector
from edge_client.wire import (
    DuplicateUpdate,
    Forget,
    GlobalModel,
    Hello,
    IdentityMismatch,
    InternalError,
    Message,
    ProtocolError,
    Receipt,
    Receiver,
    Reject,
    RoundClosed,
    RoundTask,
    SecAggRefused,
    SignatureMismatch,
    Status,
    Topics,
    UnknownDevice,
    Update,
    WrongShape,
    decode,
    encode,
    sign,
    verify,
)
from edge_client.wire import mqtt as M
from edge_client.wire.messages import SECAGG_FROM_DEVICE
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
    shared_ingest: bool = False  # updates are stored by `fedge ingest` workers (MQTT v5 shared subscription)
    personalize: tuple[tuple[str, float], ...] = ()  # device-side methods, e.g. (("self_distill", 0.5),)
    dp: DPConfig | None = None  # user-level DP-FedAvg (coordinator.fleet.privacy): clip, noise, accountant, budget
    # secure aggregation (coordinator.fleet.secagg, SecAgg+): the coordinator learns only the sum of a round's updates
    secagg: bool = False
    secagg_range: float = 0.5  # per-coordinate range of the fixed-point encoding (deltas are clipped to ±this)
    secagg_stage_s: float = 30.0  # how long each stage after the keys waits for the devices still in the round


def check_private_strategy(cfg: FleetConfig, strategy: FleetStrategy | None = None) -> None:
    """DP and secure aggregation need a strategy that only sums (fedavg, fedprox): robust and personalised
    aggregators read single updates, which neither the accountant nor SecAgg+ covers. ValueError otherwise."""
    strategy = strategy if strategy is not None else fleet_strategy(cfg.strategy)
    if (cfg.dp is not None or cfg.secagg) and not (strategy.streaming and not strategy.personalised):
        raise ValueError(f"differential privacy and secure aggregation run with fedavg or fedprox, not "
                         f"{cfg.strategy!r}: robust and personalised aggregators read single updates")


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
    epsilon: float | None = None  # the fleet's ε once this round is counted (differential privacy on)


class RoundInterrupted(Exception):
    """The owner asked the coordinator to stop while a round was collecting updates. The round stays open in the
    fleet state (its updates are committed): the next start resumes it."""

    def __init__(self, round_id: int) -> None:
        super().__init__(f"round {round_id} left open: it resumes when the coordinator starts again")
        self.round_id = round_id


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
        check_private_strategy(cfg, self.strategy)
        self._secure: SecureRound | None = None
        self.dp_rng: np.random.Generator | None = None  # DP noise: OS entropy unless a test or simulation seeds it
        self.traffic = _Traffic()
        self.duplicates = 0
        self._changed = threading.Condition()
        # set from a signal handler (no lock taken there): the round loop and the device wait poll it. Why not let
        # SIGINT raise KeyboardInterrupt: an exception at an arbitrary bytecode can leave a lock held (a `with`
        # entered but not yet protected), and the writer then waits on it for ever at shutdown
        self._stop_requested = threading.Event()
        self._open: RoundRecord | None = None
        self._expected_shapes: dict[str, tuple[int, ...]] = {}
        self._reference_norm = 0.0  # the open round's base head norm: a far larger delta never enters the raw sum
        # What the rounds use, decoded once and held here (SQLite stays the durable copy): global heads by version
        # (the initial one, the current one and a round's base), the backbone pin, each device's personal head,
        # and the updates of the open round as they arrived.
        self._models: dict[int, dict[str, np.ndarray]] = {}
        self._current: int | None = None
        self._pin: dict[str, str] | None = None
        self._personal: dict[str, dict[str, np.ndarray] | None] = {}
        self._announced: dict[str, np.ndarray] = {}  # feature prototypes from hellos (a prototype strategy places)
        self._received: dict[int, dict[str, Update]] = {}
        self._closing: set[int] = set()  # rounds whose updates are being aggregated: later ones get a Reject
        self._early_status: dict[str, str] = {}  # statuses of devices not registered (yet): a status registers nobody
        self._known: set[str] = set()  # devices SQLite has registered, as paho's thread found them (forget removes)
        self._published: int | None = None  # the global version this process last published (retained)
        self._batches = 0  # batches the writer committed: the round loop counts updates again only after one
        self.writer = BatchWriter(state, on_batch=self._notify)
        # replay memory in the fleet database (either backend), written with the writer's batches: a Forget replayed
        # after a restart is still a replay
        self.receiver = Receiver("coordinator", memory=FleetReplay(state, self.writer.submit),
                                 authenticate=self._authenticate, max_age_s=REPLAY_WINDOW_S)
        self.client = M.make_client(client_id or coordinator_name(cfg.fleet), manual_ack=True, mqtt311=broker.mqtt311)
        # one task per selected device is queued at once: 10,000 tasks must not hit paho's queue cap (10,000 by
        # default in make_client). The inflight window stays small: paho walks the in-flight messages on every PUBACK
        # to find the next queued one (7 % of the coordinator's samples at 10,000 devices with a window of 1,000),
        # and on loopback or a LAN 100 unacknowledged messages keep the link busy
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(100)
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
        self.writer.flush()  # commits (and acknowledges) what is queued while the session can still PUBACK
        self.client.disconnect()
        self.client.loop_stop()
        self.writer.stop()  # anything paho delivered while disconnecting is committed, never acknowledged

    def _notify(self) -> None:
        with self._changed:
            self._batches += 1
            self._changed.notify_all()

    @property
    def open_round(self) -> RoundRecord | None:
        """The round in progress, if any (read by metrics and the dashboard)."""
        return self._open

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.error("coordinator: broker refused connection: %s", reason_code)
            return
        subs = [(self.topics.all_hellos, 1), (self.topics.all_statuses, 1), (self.topics.all_forgets, 1)]
        if not self.cfg.shared_ingest:  # else `fedge ingest` workers take the updates (coordinator.fleet.ingest_worker)
            subs.append((self.topics.all_updates, 1))
        if self.cfg.secagg:
            subs.append((self.topics.all_secagg, 1))
        client.subscribe(subs)
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
        size = self._send(self.topics.global_model(self.cfg.task), msg, retain=True)
        self._published = version
        return size

    # ------------------------------------------------------------------ devices

    def request_stop(self) -> None:
        """Ask the round loop to return soon (safe from a signal handler: it only sets an event). A round that is
        collecting updates raises :class:`RoundInterrupted` within half a second and stays open for resume."""
        self._stop_requested.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def wait_for_devices(self, n: int, timeout_s: float) -> list[str]:
        deadline = time.time() + timeout_s
        with self._changed:
            while self.state.count_online() < n and time.time() < deadline and not self.stop_requested:
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
                     self.state.count_updates(rec.round_id), len(rec.selected))
        else:
            version = self.current_model()[0]
            selected = sorted(devices) if devices is not None else self._select(self.state.next_round_id())
            if not selected:
                raise ValueError("a round needs at least one device")
            quorum = max(1, math.ceil(self.cfg.quorum_fraction * len(selected)))
            charge = self._privacy_charge(len(selected)) if kind == "train" and self.cfg.dp is not None else None
            if charge is not None:
                options = {**(options or {}), **self._dp_options(charge)}
            if self.cfg.secagg and kind == "train":
                options = {**(options or {}), "secagg": True, "secagg_range": self.cfg.secagg_range}
            rec = self.state.open_round(self.cfg.task, kind, version, selected, quorum, t0 + self.cfg.deadline_s,
                                        {**self._round_config(), "options": dict(options or {})})
            if charge is not None:
                self.state.charge_privacy(dataclasses.replace(charge, round_id=rec.round_id))
        if rec.kind == "train" and self.cfg.dp is not None and not self._ledger_row(rec.round_id):
            # opened by a process that died before charging it (or before DP was switched on): charged now
            charge = self._privacy_charge(len(rec.selected), check_budget=False)
            self.state.charge_privacy(dataclasses.replace(charge, round_id=rec.round_id))
        self._set_open(rec)
        with self._changed:  # forgetting a device holds this lock too: the set stays exact
            self._known.update(self.state.known_devices(rec.selected))  # not one query per first update
        base = self._model(rec.base_version)
        secure = self.cfg.secagg and rec.kind == "train"
        if secure and resumed:  # the devices' round secrets died with the old process: fail it, open a new one
            log.warning("round %d: a secure round cannot be resumed after a restart; it fails", rec.round_id)
            self.state.fail_round(rec.round_id)
            self._set_open(None)
            return RoundResult(rec.round_id, rec.kind, rec.base_version, None, rec.selected, {}, {}, 0, 0,
                               time.time() - t0, True, "failed")
        if secure:
            self._secure = SecureRound(self.cfg.fleet, rec.round_id, rec.selected,
                                       sum(v.size for v in base.values()), self.cfg.secagg_range,
                                       lambda device, msg, r=rec.round_id: self._send_secagg(r, device, msg),
                                       self.state, seed=self.cfg.seed, check_keys=self._check_secagg_keys,
                                       cert_of=self.registry.certificate_der if self.registry is not None else None)
        # the round's base is published (retained) once: by the close of the round that made it, or here by the
        # first round of this process. Every subscribed device already has it (a device that connects later gets
        # the retained copy), so sending it again would only double what the broker fans out (25 KB x devices)
        global_bytes = 0
        if self._published != rec.base_version:
            global_bytes = self.publish_global(rec.base_version, base, rec.round_id)
        pending = [d for d in rec.selected if d not in self.state.reported(rec.round_id)]
        self.traffic.down[rec.round_id] += global_bytes * len(pending)
        for device_id in pending:
            self._send_task(rec, device_id)
        if secure:
            return self._secure_close(rec, base, t0)

        poll = 0.1 if self.cfg.shared_ingest else 0.5  # other processes store updates: nobody notifies
        while True:
            with self._changed:
                seen = self._batches
            counted = time.monotonic()
            n_reported = self.state.count_updates(rec.round_id)
            if on_progress:
                on_progress(n_reported, len(rec.selected))  # outside the lock: a slow callback must not block paho
            if n_reported >= len(rec.selected) or time.time() >= rec.deadline:
                break
            if self.stop_requested:
                raise RoundInterrupted(rec.round_id)
            with self._changed:  # until a batch committed since the count (or the poll interval passed)
                self._changed.wait_for(lambda s=seen: self._batches != s,
                                       min(poll, max(0.01, rec.deadline - time.time())))
            # counting takes the database lock the writer commits under: at most 20 counts a second, not one per batch
            time.sleep(max(0.0, 0.05 - (time.monotonic() - counted)))
        result = self._close(rec, base, t0, resumed)
        return self._observed(result)

    def _observed(self, result: RoundResult) -> RoundResult:
        """Hand a finished round to every observer (metrics, dashboards); one that raises is logged, not fatal."""
        for observe in self.round_observers:
            try:
                observe(result)
            except Exception:
                log.exception("round observer %r failed", observe)
        return result

    # ------------------------------------------------------------------ secure aggregation

    def _send_secagg(self, round_id: int, device_id: str, msg: Message) -> None:
        self.traffic.down[round_id] += self._send(self.topics.task(device_id), msg, expiry_s=3600)

    def _check_secagg_keys(self, device_id: str, signed: bytes, sig: bytes) -> None:
        """With a registry, a device's round keys must carry its identity key's signature (no key substitution by
        anyone on the path); without one, devices are known by their hello and keys are taken as sent."""
        if self.registry is None:
            return
        try:
            self.registry.device(device_id).public_key.verify(sig, signed)
        except (InvalidSignature, ValueError):
            raise SignatureMismatch(f"device {device_id}'s secure-aggregation keys are not signed by it") from None

    def _on_secagg(self, msg: Message, payload: bytes) -> None:
        secure = self._secure
        if secure is None:
            raise SecAggRefused(f"{msg.type} for round {msg.round_id}: no secure round is open")
        secure.on_message(msg, payload)

    def _secure_close(self, rec: RoundRecord, base: dict[str, np.ndarray], t0: float) -> RoundResult:
        """Run the secure round's stages and close it from the unmasked sum alone: the mean over the survivors, or
        under differential privacy over the devices asked, with the central noise added to the sum here."""
        secure = self._secure
        assert secure is not None
        new_version, state, agg_s = None, "failed", 0.0
        survivors: list[str] = []
        row = self._ledger_row(rec.round_id) if self.cfg.dp is not None else None  # charged when the round opened
        try:
            total, survivors = secure.run(rec.deadline, self.cfg.secagg_stage_s)
            t_agg = time.time()
            sums = from_vector(total, base)
            denom = float(len(survivors))
            if self.cfg.dp is not None and row is not None:
                denom = float(row.n_expected)
                if self.cfg.dp.placement == "central":
                    sums, _ = dp_sum([sums], None, self.cfg.dp.delta_noise(row.n_expected) * row.clip, self.dp_rng)
            agg = self.strategy.finish(base, {k: v / denom for k, v in sums.items()})  # type: ignore[attr-defined]
            new_version = self.state.close_round(rec.round_id, agg.global_params, rec.task, meta=self._dp_meta(row))
            if new_version is not None:
                self._adopt(new_version, agg.global_params, {})
                self.publish_global(new_version, self._model(new_version), rec.round_id)
                state = "closed"
            agg_s = time.time() - t_agg
        except (SecAggAbort, NonFiniteModel) as exc:
            log.error("round %d: secure aggregation aborted, global unchanged: %s", rec.round_id, exc)
            self.receiver.rejected["secagg_abort"] += 1
            self.state.fail_round(rec.round_id)
        finally:
            self._secure = None
            self._set_open(None)
        self.traffic.up[rec.round_id] += sum(secure.bytes_up.values())
        self.state.prune(self.cfg.keep_rounds)
        result = RoundResult(rec.round_id, rec.kind, rec.base_version, new_version, rec.selected,
                             {d: {} for d in survivors}, {}, self.traffic.up[rec.round_id],
                             self.traffic.down[rec.round_id], time.time() - t0, False, state, agg_s,
                             row.epsilon if row else None)
        return self._observed(result)

    # ------------------------------------------------------------------ differential privacy

    def _dp_meta(self, row: PrivacyRow | None) -> dict[str, Any]:
        """A new version's meta; under DP it records the privacy spent (the dashboard and Prometheus'
        fedge_privacy_epsilon read it there)."""
        return self._model_meta() | ({"dp_epsilon": row.epsilon, "dp_delta": row.delta} if row is not None else {})

    def _ledger_row(self, round_id: int) -> PrivacyRow | None:
        return next((r for r in self.state.privacy_ledger(self.cfg.task) if r.round_id == round_id), None)

    def privacy_spent(self) -> float | None:
        """The fleet's ε so far (None: nothing charged yet, or DP off)."""
        ledger = self.state.privacy_ledger(self.cfg.task)
        return ledger[-1].epsilon if ledger else None

    def _privacy_charge(self, n_selected: int, check_budget: bool = True) -> PrivacyRow:
        """What the next round costs and the ε it takes the fleet to; raises PrivacyBudgetSpent (and opens nothing)
        when that is above the budget. Sampling rate: asked / known devices; δ: the configured one or 1/known."""
        dp = self.cfg.dp
        assert dp is not None
        known = max(len(self.state.devices()), n_selected)
        delta = dp.delta if dp.delta is not None else 1.0 / max(known, 2)
        ledger = self.state.privacy_ledger(self.cfg.task)
        clip = ledger[-1].next_clip if ledger and ledger[-1].next_clip is not None else dp.clip
        q = n_selected / known
        charges = [Charge(r.sampling_rate, r.noise_multiplier) for r in ledger]
        eps = epsilon([*charges, Charge(q, dp.noise_multiplier)], delta)
        if check_budget and dp.epsilon_budget is not None and eps > dp.epsilon_budget:
            spent = epsilon(charges, delta) if charges else 0.0
            raise PrivacyBudgetSpent(f"privacy budget spent: ε = {spent:.3g} after {len(ledger)} rounds, one more "
                                     f"would make it {eps:.3g} > {dp.epsilon_budget:g} (δ = {delta:.3g})")
        return PrivacyRow(0, self.cfg.task, dp.placement, dp.noise_multiplier, q, clip, n_selected, delta, eps)

    def _dp_options(self, charge: PrivacyRow) -> dict[str, float]:
        """What devices are told: clip to C; under distributed noise also add N(0, (z_Δ·C)²/n) each."""
        dp = self.cfg.dp
        assert dp is not None
        std = (dp.delta_noise(charge.n_expected) * charge.clip / math.sqrt(charge.n_expected)
               if dp.placement == "distributed" else 0.0)
        return {"dp_clip": charge.clip, "dp_noise_std": std}

    def _dp_aggregate(self, rec: RoundRecord, base: dict[str, np.ndarray]) -> tuple[int | None, Aggregate]:
        """DP-FedAvg's server side: every delta clipped to the round's C and counted once (sample counts ignored),
        Gaussian noise added once (central) or already in the deltas (distributed), divided by the devices asked."""
        dp, row = self.cfg.dp, self._ledger_row(rec.round_id)
        assert dp is not None and row is not None
        deltas = [u.delta for u in self._round_updates(rec.round_id)]
        central = dp.placement == "central"
        noise = dp.delta_noise(row.n_expected) * row.clip if central else 0.0
        sums, norms = dp_sum(deltas, row.clip if central else None, noise, self.dp_rng)
        agg = self.strategy.finish(base, {k: v / row.n_expected for k, v in sums.items()})  # type: ignore[attr-defined]
        version = self.state.close_round(rec.round_id, agg.global_params, rec.task, meta=self._dp_meta(row))
        if dp.adaptive:
            self.state.set_next_clip(rec.round_id, next_clip(row.clip, norms, dp, row.n_expected, self.dp_rng))
        log.info("round %d: DP-FedAvg (%s) of %d updates, clip %.3g, noise std %.3g; ε = %.3g at δ = %.2g",
                 rec.round_id, dp.placement, len(deltas), row.clip, noise, row.epsilon, row.delta)
        return version, agg

    def _round_config(self) -> dict:
        c = self.cfg
        return {"local_epochs": c.local_epochs, "lr": c.lr, "batch_size": c.batch_size, "prox_mu": c.prox_mu,
                "strategy": c.strategy, "clip_norm": c.clip_norm, "tv_temperature": c.tv_temperature,
                "bounds": dataclasses.asdict(c.bounds),
                "upload_dtype": c.upload_dtype, "personalize": dict(c.personalize),
                "dp": dataclasses.asdict(c.dp) if c.dp is not None else None}

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
                                                        **getattr(self.strategy, "task_options", {}),
                                                        **c.get("options", {})})
        if self.strategy.personalised and rec.kind == "train":
            own = self._personal_head(device_id)
            place = getattr(self.strategy, "place_head", None)
            if own is None and place is not None and device_id in self._announced:  # a new device, placed
                own = place(self._announced[device_id])
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
        self.writer.flush()  # every update accepted before the round started closing is committed (and summed)
        reports = self.state.reports(rec.round_id)
        metrics = {d: m for d, (_, m) in reports.items()}
        n_samples = {d: n for d, (n, _) in reports.items()}
        new_version, state, t_agg = None, "closed", time.time()
        if rec.kind == "train":
            if len(reports) >= rec.quorum:
                try:
                    new_version, agg = self._aggregate(rec, base)
                except NonFiniteModel as exc:
                    log.error("round %d: aggregate refused, global unchanged: %s", rec.round_id, exc)
                    self.receiver.rejected["non_finite_aggregate"] += 1
                    self.state.fail_round(rec.round_id)
                    state = "failed"
                if new_version is not None:
                    self._adopt(new_version, agg.global_params, agg.personal)
                    size = self.publish_global(new_version, self._model(new_version), rec.round_id)
                    # every device gets the new head now (retained), and not again when the next round opens
                    self.traffic.down[rec.round_id] += size * len(rec.selected)
            else:
                log.warning("round %d: %d of %d updates by the deadline, quorum %d not met; global unchanged",
                            rec.round_id, len(reports), len(rec.selected), rec.quorum)
                self.state.fail_round(rec.round_id)
                state = "failed"
        else:
            self.state.close_round(rec.round_id, None, rec.task)
        aggregation_s = time.time() - t_agg
        w = self.writer
        log.info("round %d: writer so far %d batches, %d items, %.1f s in transactions", rec.round_id, w.batches,
                 w.items, w.busy_s)
        self._set_open(None)
        pruned = self.state.prune(self.cfg.keep_rounds)
        if any(pruned.values()):
            log.info("retention: dropped %d old update payloads (metrics kept) and %d old model versions",
                     pruned["update_payloads"], pruned["models"])
        charged = self._ledger_row(rec.round_id) if self.cfg.dp is not None else None
        return RoundResult(rec.round_id, rec.kind, rec.base_version, new_version, rec.selected, metrics, n_samples,
                           self.traffic.up[rec.round_id], self.traffic.down[rec.round_id], time.time() - t0,
                           resumed, state, aggregation_s, charged.epsilon if charged else None)

    def _aggregate(self, rec: RoundRecord, base: dict[str, np.ndarray]) -> tuple[int | None, Aggregate]:
        """Aggregate a training round and close it. A streaming strategy closes from the round's running sums and
        each update's norm and sample count (one transaction; only the updates the bounds change are decoded);
        any other strategy -- or a round whose sums no longer cover its stored updates -- gets every stored
        update, bounded, at once."""
        if self.cfg.dp is not None:
            return self._dp_aggregate(rec, base)
        if self.strategy.streaming:
            made: list[Aggregate] = []

            def finish(running, rows, fetch):  # type: ignore[no-untyped-def]
                plan = plan_bounds([r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows],
                                   self.cfg.bounds, self.sample_cap)
                if plan.clipped or plan.capped:
                    log.info("round %d: norm bound %.3g clipped %d updates; sample counts capped for %d",
                             rec.round_id, plan.norm_bound or 0.0, len(plan.clipped), len(plan.capped))
                step = bounded_streamed_mean(running, rows, plan, self.strategy.clip_norm,
                                             lambda devices: {d: decode(p).delta for d, p in fetch(devices).items()})
                made.append(self.strategy.finish(base, step))
                return made[-1].global_params

            done, version = self.state.close_streaming_round(rec.round_id, rec.task, finish, meta=self._model_meta())
            if done:
                return version, made[-1] if made else Aggregate(self._model(version) if version is not None else {})
            log.info("round %d: running sums do not cover the stored updates; aggregating from storage",
                     rec.round_id)
        updates = self._round_updates(rec.round_id)
        bounded = bound_updates([u for u in updates if u.n_samples > 0], self.cfg.bounds, self.sample_cap)
        if bounded.clipped or bounded.capped:
            log.info("round %d: norm bound %.3g clipped %s; sample counts capped for %s", rec.round_id,
                     bounded.norm_bound or 0.0, list(bounded.clipped) or "none", list(bounded.capped) or "none")
        agg = self.strategy.aggregate_round(RoundInputs(base, bounded.updates, initial=lambda: self._model(0),
                                                        personal=self._personal_head))
        return self.state.close_round(rec.round_id, agg.global_params, rec.task, meta=self._model_meta(),
                                      personal=agg.personal), agg

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
                base = self._model(rec.base_version)
                self._expected_shapes = {k: tuple(v.shape) for k, v in base.items()}
                self._reference_norm = global_norm(base)

    # ------------------------------------------------------------------ incoming

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        """Validate on paho's thread; writes go to the batch writer, which acknowledges the message (PUBACK) once
        its batch is committed. Everything refused or ignored is acknowledged at once."""
        mid, qos = getattr(message, "mid", 0), getattr(message, "qos", 0)
        deferred = False
        try:
            deferred = self._handle(message, lambda _result=None: client.ack(mid, qos))
        finally:
            if not deferred:
                client.ack(mid, qos)

    def _handle(self, message: Any, ack: Callable[..., object]) -> bool:
        """True when `ack` was handed to the writer (called after the commit)."""
        device = self.topics.device_of(message.topic)
        if not message.payload and message.topic.rsplit("/", 1)[-1] in ("hello", "status"):
            return False  # a device cleared its retained hello/status (forget-me): nothing to decode
        try:
            msg = self.receiver.accept(message.topic, message.payload, self.topics)  # counts its own refusals
        except ProtocolError as err:
            self._send_reject(device, err, "-")
            return False
        try:
            if isinstance(msg, Update):
                return self._on_update(msg, message.payload, ack)
            if isinstance(msg, SECAGG_FROM_DEVICE):
                self._on_secagg(msg, message.payload)
                return False
            if isinstance(msg, Hello):
                return self._on_hello(msg, retained=bool(message.retain), ack=ack)
            if isinstance(msg, Forget):
                self._on_forget(msg.device_id)
            elif isinstance(msg, Status):
                def applied(known: object, device_id: str = msg.device_id, state: str = msg.state) -> None:
                    if not known:  # a retained status can arrive before the device's retained hello: applied by it
                        self._early_status[device_id] = state
                        while len(self._early_status) > 10_000:
                            self._early_status.pop(next(iter(self._early_status)))
                    ack()

                self.writer.submit(StatusRow(msg.device_id, msg.state), applied)
                return True
        except ProtocolError as err:
            self.receiver.reject(err, message.topic, len(message.payload))
            self._send_reject(device, err, msg.msg_id, msg.round_id)
        except Exception as exc:  # a bug, or input no check foresaw: answered and counted, never silent or fatal
            log.exception("coordinator: error handling %s on %s", msg.type, message.topic)
            self.receiver.callback_failed(exc)
            self._send_reject(device, InternalError(f"{type(exc).__name__} while handling {msg.type}"), msg.msg_id,
                              msg.round_id)
        return False

    def _on_hello(self, msg: Hello, retained: bool, ack: Callable[..., object]) -> bool:
        """Hellos are retained, so a coordinator that starts after its devices still learns of
        them; only a live hello proves the device is connected now."""
        if self.cfg.allowlist is not None and msg.device_id not in self.cfg.allowlist:
            raise UnknownDevice(f"device {msg.device_id!r} is not on the fleet allowlist")
        early = self._early_status.pop(msg.device_id, None)
        if msg.prototype is not None:  # kept in memory only: a device announces it again on every connect
            if msg.prototype.shape != (PROTOTYPE_DIM,):
                raise WrongShape(f"hello prototype: expected {PROTOTYPE_DIM} numbers, got {msg.prototype.shape}")
            self._announced[msg.device_id] = np.asarray(msg.prototype, np.float64)
        self.writer.submit(lambda st: st.upsert_device(msg.device_id, domain=msg.domain, profile=msg.profile,
                                                       runtime=msg.runtime, n_train=msg.n_train,
                                                       state=early if retained else "online",
                                                       backbone_sha256=msg.backbone_sha256,
                                                       bundle_version=msg.bundle_version), ack)
        log.debug("device %s joined (%s, %s, %d windows)", msg.device_id, msg.domain, msg.runtime, msg.n_train)
        return True

    def _on_forget(self, device_id: str) -> None:
        """Delete what this coordinator stored from the device (subclasses also drop what they derived
        from it, e.g. the recommender's prototypes)."""
        self.writer.flush()  # what the device sent before it asked is stored first, then deleted
        with self._changed:
            deleted = self.state.forget_device(device_id)
            self._known.discard(device_id)
            self._personal.pop(device_id, None)
            for held in self._received.values():
                held.pop(device_id, None)
            self._changed.notify_all()
        log.info("device %s asked to be forgotten: deleted %s", device_id,
                 ", ".join(f"{n} {table}" for table, n in deleted.items()))

    def _on_update(self, msg: Update, payload: bytes, ack: Callable[..., object]) -> bool:
        """Store an update once and answer it: a Receipt when it is stored (or was already, byte for byte: the device
        re-sends until it has one), a Reject otherwise. Checked and handed to the writer under the lock that closing
        a round takes, and the close waits for the writer: an update is either in the aggregate or refused, never
        stored and left out. Returns True (the message is acknowledged after its commit)."""
        live = self._open is not None and msg.round_id == self._open.round_id and msg.round_id not in self._closing
        # a copy for the open round is told apart by the writer (DUPLICATE: a receipt again); one for any other round
        # (closed, or closing) is looked up here, so a device that missed its receipt still gets it
        if not live and self.state.update_msg_id(msg.round_id, msg.device_id) == msg.msg_id:
            self.duplicates += 1
            log.info("round %d: duplicate update from %s; receipt sent again", msg.round_id, msg.device_id)
            self._send_receipt(msg)
            return False
        with self._changed:
            rec = self._check_update(msg)
            norm = global_norm(msg.delta) if rec.kind == "train" else None
            weighted = None
            if (rec.kind == "train" and self.strategy.streaming
                    and summable(msg.n_samples, norm or 0.0, self.cfg.bounds, self._reference_norm)):
                weighted = self.strategy.weigh(msg)
            row = UpdateRow(msg.round_id, msg.device_id, msg.msg_id, msg.n_samples, bytes(payload), msg.metrics,
                            weighted, norm)

            def stored(result: object) -> None:
                if result == STORED:
                    self.traffic.up[msg.round_id] += len(payload)
                    if not self.strategy.streaming:  # it needs every update at the close: keep this one decoded
                        with self._changed:
                            self._received.setdefault(msg.round_id, {})[msg.device_id] = msg
                if result in (STORED, DUPLICATE):
                    self.duplicates += result == DUPLICATE
                    self._send_receipt(msg)
                elif result == CONFLICT:
                    self._refuse(msg, DuplicateUpdate(f"device {msg.device_id} already sent another update for round "
                                                      f"{msg.round_id}"))
                elif result == NOT_OPEN:
                    self._refuse(msg, RoundClosed(f"round {msg.round_id} closed before this update was stored"))
                ack()

            self.writer.submit(row, stored)
        return True

    def _send_receipt(self, msg: Update) -> None:
        self._send(self.topics.task(msg.device_id), Receipt(fleet=self.cfg.fleet, device_id=msg.device_id,
                                                          round_id=msg.round_id, ref_msg_id=msg.msg_id), expiry_s=3600)

    def _refuse(self, msg: Update, err: ProtocolError) -> None:
        self.receiver.reject(err, self.topics.update(msg.round_id, msg.device_id))
        self._send_reject(msg.device_id, err, msg.msg_id, msg.round_id)

    def _registered(self, device_id: str) -> bool:
        """Whether SQLite knows the device, asked once per device rather than once per update (only this process's
        paho thread forgets devices, and it drops them from the set as it does)."""
        if device_id not in self._known and self.state.has_device(device_id):
            self._known.add(device_id)
        return device_id in self._known

    def _check_update(self, msg: Update) -> RoundRecord:
        return check_update(msg, self._open, registered=self._registered(msg.device_id),
                            expected_shapes=self._expected_shapes, closing=self._closing)

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
