"""The device's MQTT side: announces itself, keeps the latest global head, runs round tasks
on a worker thread and publishes updates.

I/O stays here; the learning is in :mod:`edge_client.learning.learner`. paho's network thread only decodes
and hands work over, so a long local training never stalls keep-alives. An update is computed
once per round and written to an outbox *before* it is published: if the coordinator asks again
for the same round (it restarted, or the first copy was lost) the identical message, same id, is
re-sent, so the coordinator can count it exactly once. With a durable outbox
(:class:`edge_client.daemon.store.DeviceStore`) this also holds across a crash of the device: on every
(re)connect, entries without a PUBACK that this process has not handed to paho yet are published
again; paho itself retransmits the ones it already holds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from edge_client.daemon.outbox import MemoryOutbox, Outbox, OutboxEntry
from edge_client.daemon.secure import SecureSession
from edge_client.identity import Identity, load_certificate
from edge_client.learning.compress import compress
from edge_client.learning.dp import PROTOTYPE_DP_OPTIONS, privatize, privatize_prototype
from edge_client.learning.head import Params, as_float32, head_shapes
from edge_client.learning.learner import DeviceLearner, RoundOutcome
from edge_client.learning.personalize import PersonalConfig
from edge_client.learning.prototype import feature_prototype
from edge_client.runtime.backbone import backbone_mismatch
from edge_client.wire import (
    GlobalModel,
    Hello,
    InvalidMessage,
    Message,
    ModelMismatch,
    PackedArray,
    ProtocolError,
    Receipt,
    Receiver,
    Reject,
    RoundTask,
    Status,
    Topics,
    Update,
    WrongShape,
    check_arrays,
    decode,
    encode,
    sign,
)
from edge_client.wire import mqtt as M
from edge_client.wire.memory import ReplayMemory
from edge_client.wire.messages import SECAGG_FROM_COORDINATOR
from edge_client.wire.mqtt_loop import NetworkLoop
from edge_client.wire.signing import check_from_coordinator

log = logging.getLogger("fedge.edge")


@dataclass
class EdgeStats:
    bytes_up: int = 0
    bytes_down: int = 0
    rounds: int = 0
    receipts: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)


# What a fleet round (task options) or the device's own ``[personalize]`` table can switch on: every device
# method of edge_client.learning (adapter rank, time-aware self-distillation, FedOA feature distance, the FVG-PT
# gate, Meta-FC distortion consistency, learned rule guards, the track record and its forecast combination, sensor-
# fault repair, a Huber loss) and the personal training settings.
FLEET_PERSONAL_OPTIONS = frozenset({"rank", "self_distill", "sd_tau_days", "feature_distance", "prox_mu",
                                    "quantile_weight", "epochs", "lr", "batch_size", "gate", "gate_prior_count",
                                    "consistency", "meta", "distorted_task_weight", "rules",
                                    "naive_prior", "track_record", "track_margin", "track_combine", "repair",
                                    "huber"})


def personal_config(options: Mapping[str, object], local: Mapping[str, object] | None = None) -> PersonalConfig | None:
    """Personalisation methods a round asks for (option ``personalize``), e.g. ``{"personalize": True,
    "rank": 4, "self_distill": 0.5, "feature_distance": 0.1}``, merged with the device's own ``[personalize]``
    table (`local`), which has the last word: its owner knows what the hardware affords. A device with such a
    table personalises even when the round does not ask. Keys outside FLEET_PERSONAL_OPTIONS are ignored here
    (they belong to other parts of the task), wrong types are refused."""
    local = dict(local or {})
    if not options.get("personalize") and not local:
        return None
    merged = {k: options[k] for k in FLEET_PERSONAL_OPTIONS & set(options)} if options.get("personalize") else {}
    merged.update({k: v for k, v in local.items() if k in FLEET_PERSONAL_OPTIONS})
    try:
        return PersonalConfig(**{k: _option(k, v) for k, v in merged.items()})
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"bad personalisation options: {exc}") from None


def dp_options(options: Mapping[str, object]) -> tuple[float, float] | None:
    """(clip, noise std) when a round asks for differential privacy (options ``dp_clip``, ``dp_noise_std``: see
    :mod:`edge_client.learning.dp`), None otherwise; anything but positive finite numbers is refused."""
    if "dp_clip" not in options:
        return None
    try:
        clip, std = float(options["dp_clip"]), float(options.get("dp_noise_std", 0.0))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidMessage("dp_clip and dp_noise_std must be numbers") from None
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(std) and std >= 0):
        raise InvalidMessage(f"bad DP options: clip {clip}, noise std {std}")
    return clip, std


def prototype_dp_options(options: Mapping[str, object]) -> tuple[float, float] | None:
    """(clip C, noise multiplier σ) when a task asks for noised prototypes (options ``proto_clip``, ``proto_noise``:
    edge_client.learning.dp.privatize_prototype; a forecasting device's prototype in its update, a recommender
    device's in its evaluate update), None otherwise; anything but a positive finite clip and a finite σ >= 0 is
    refused."""
    clip_key, noise_key = PROTOTYPE_DP_OPTIONS
    if clip_key not in options:
        return None
    try:
        clip, sigma = float(options[clip_key]), float(options.get(noise_key, 0.0))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidMessage(f"{clip_key} and {noise_key} must be numbers") from None
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(sigma) and sigma >= 0):
        raise InvalidMessage(f"bad prototype DP options: clip {clip}, noise multiplier {sigma}")
    return clip, sigma


def _option(name: str, value: object) -> object:
    """One option as the PersonalConfig field's type; a bool field takes true/false or 0/1 only."""
    kind = type(getattr(PersonalConfig, name))
    if kind is bool:
        if value not in (0, 1, True, False):
            raise ValueError(f"{name} must be true/false or 0/1, not {value!r}")
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {value!r}")
    return kind(value)


# How a device sends its delta (task option ``upload_dtype``, `fedge serve --upload-dtype`): float16/float32, int8
# with one scale per tensor, or the top TOPK_FRACTION entries as int8 with positions and error feedback (what was
# not sent is added to the next round's delta; edge_client.learning.compress).
UPLOAD_DTYPES = ("float16", "float32", "int8", "topk")
TOPK_FRACTION = 0.2

MAX_PENDING_TASKS = 4  # tasks waiting for their global head; 400 forged tasks once grew this by 191 MB


def compute_update(learner: DeviceLearner, task: RoundTask, global_params: Params, personal: Params | None, *,
                   device_id: str, seed: int, local_personalize: Mapping[str, object] | None = None,
                   ) -> tuple[Update, RoundOutcome | None]:
    """What a device answers to a task (no I/O): train from the global head, or from its own aggregate when the
    task carries one, and report the delta and metrics; or only evaluate. The daemon and the fleet emulator
    (``fedge loadtest``) both answer through here. The outcome (None for evaluate) holds the personal head."""
    if task.params:  # task-vector personalised aggregation: train from this device's own aggregate
        spec = learner.backbone.spec
        check_arrays(task.params, head_shapes(spec.feature_dim, learner.split.horizon, len(spec.quantiles)),
                     what="task.params")
        global_params = as_float32(task.params)
    if task.kind == "evaluate":
        metrics = {**learner.evaluate(global_params, "global"), **learner.baseline_metrics()}
        if learner.served is not None:  # the gated, rule-guarded predictor of the last personalised round
            metrics.update(learner.evaluate(learner.served, "personal"))
        elif personal is not None:
            metrics.update(learner.evaluate(personal, "personal"))
        return Update(fleet=task.fleet, device_id=device_id, round_id=task.round_id, task=task.task,
                      kind="evaluate", base_version=task.model_version, n_samples=learner.n_eval,
                      metrics=metrics, round_opened=task.round_opened, prototype=_prototype(learner, task)), None
    upload = str(task.options.get("upload_dtype", "float16"))
    if upload not in UPLOAD_DTYPES:
        raise InvalidMessage(f"unknown upload_dtype {upload!r}; choose {', '.join(UPLOAD_DTYPES)}")
    outcome = learner.run_round(
        global_params, epochs=task.local_epochs, lr=task.lr, batch_size=task.batch_size, prox_mu=task.prox_mu,
        seed=seed * 100_003 + task.round_id, upload_dtype=upload if upload in ("float16", "float32") else "float32",
        personal=personal_config(task.options, local_personalize), now_day=task.ts / 86400.0)
    dp = dp_options(task.options)
    delta = outcome.delta if dp is None else privatize(outcome.delta, *dp)  # clipped (and noised) on the device
    packed = None
    if upload in ("int8", "topk"):  # compressed after DP: the noise is what gets compressed, never the raw delta
        parts, learner.upload_residual = compress(delta, upload, TOPK_FRACTION,
                                                  learner.upload_residual if upload == "topk" else None)
        packed = {k: PackedArray(values=c.values, scale=c.scale, shape=list(c.shape), index=c.index)
                  for k, c in parts.items()}
        delta = {}
    return Update(fleet=task.fleet, device_id=device_id, round_id=task.round_id, task=task.task,
                  base_version=task.model_version, n_samples=outcome.n_samples, delta=delta, packed=packed,
                  metrics=outcome.metrics, train_seconds=outcome.seconds, round_opened=task.round_opened,
                  prototype=_prototype(learner, task)), outcome


def _prototype(learner: DeviceLearner, task: RoundTask) -> np.ndarray | None:
    """The device's feature prototype when the round's strategy asks for one (task option ``prototype``), clipped
    and noised on the device when the task also says ``proto_clip`` (and ``proto_noise``)."""
    if not task.options.get("prototype"):
        return None
    p, dp = feature_prototype(learner.f_train.feats), prototype_dp_options(task.options)
    return p if dp is None else privatize_prototype(p, *dp)


# Fault injection for crash tests: FEDGE_FAILPOINT=after_outbox SIGKILLs the process right after an
# update is stored in the outbox (with the learning state that produced it) and before it is published (the window a
# power cut can hit).
FAILPOINT_ENV = "FEDGE_FAILPOINT"

# A round task waits while the device's resource check gives a reason not to train (low memory, high load).
ResourceCheck = Callable[[RoundTask], str | None]


class EdgeClient:
    """One device on the fleet. `learner` holds the device's data and the frozen backbone.

    Optional hooks, all called on the training worker thread (never paho's): ``resource_check(task)`` returns
    a reason not to train now (low memory, high load, battery) and is asked again every
    ``resource_poll_s`` until the task's deadline; ``before_task(task)`` may swap ``self.learner`` (new
    data, a new backbone) between rounds; ``after_update(task, update)`` persists what the round left
    (the personal head)."""

    def __init__(
        self,
        device_id: str,
        fleet: str,
        learner: DeviceLearner,
        broker: M.BrokerAddress,
        *,
        profile: str = "generic",
        domain: str = "",
        seed: int = 0,
        task: str = "tsfm",
        outbox: Outbox | None = None,
        resource_check: ResourceCheck | None = None,
        resource_poll_s: float = 5.0,
        before_task: Callable[[RoundTask], None] | None = None,
        after_update: Callable[[RoundTask, Update], None] | None = None,
        personal: Params | None = None,
        identity: Identity | None = None,
        replay: ReplayMemory | None = None,
        network: NetworkLoop | None = None,
        personalize: Mapping[str, object] | None = None,
        announce_prototype: bool = False,
        compute_slots: threading.Semaphore | None = None,
    ) -> None:
        self.device_id = device_id
        # simulated fleets: a semaphore shared by the devices of one process, so at most that many train at once (as
        # many as there are cores; OpenBLAS also corrupts its heap when more threads than it was built for call it at
        # once, which 200 simulated devices did). A real device trains alone: None.
        self.compute_slots = compute_slots
        self.personalize = dict(personalize or {})  # the device's own [personalize] table (device.toml)
        self.announce_prototype = announce_prototype  # the hello carries the feature prototype (placement)
        self.network = network  # one network thread shared by many simulated devices; None: paho's own thread
        self.fleet = fleet
        self.task = task
        self.learner = learner
        self.broker = broker
        self.profile = profile
        self.domain = domain
        self.seed = seed
        self.topics = Topics(fleet)
        # with an identity (an enrollment folder) everything this device sends is signed with its key and every
        # control message must carry the coordinator's signature; `replay` keeps replay memory across restarts
        self.identity = identity
        if identity is not None and identity.name != device_id:
            raise ValueError(f"the identity is {identity.name!r}'s, not {device_id!r}'s")
        self.receiver = Receiver(f"device {device_id}", memory=replay, authenticate=self._authenticate)
        # secure rounds (task option ``secagg``): the update leaves this device only masked (edge_client.secagg)
        self.secure = SecureSession(device_id, fleet, self._publish_secagg,
                                    identity_key=identity.key if identity is not None else None,
                                    ca=load_certificate(identity.ca_file) if identity is not None else None,
                                    refused=lambda err: self.receiver.reject(err, self.topics.task(device_id)))
        self.stats = EdgeStats()
        # the last two global models accepted (params as float32): what tasks train from, kept as messages
        # so they can be checked again after a backbone change
        self.global_models: dict[int, GlobalModel] = {}
        self.personal: Params | None = personal
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.resource_check, self.resource_poll_s = resource_check, resource_poll_s
        self.before_task, self.after_update = before_task, after_update
        self.state = "online"  # what heartbeats report: online | training | idle
        self.bundle_version: int | None = None  # the signed bundle the backbone came from (the daemon sets it)
        self.on_connect_hooks: list[Callable[..., None]] = []  # e.g. a bundle downloader sharing the connection
        self._pending: dict[int, RoundTask] = {}
        self._lock = threading.Lock()
        self._ack_lock = threading.Lock()  # never held across a paho call: paho calls on_publish under its own lock
        self._inflight: dict[int, tuple[int, str]] = {}  # mid -> (round id, msg id) of updates awaiting PUBACK
        self._early_acks: dict[int, float] = {}  # PUBACKs that beat the registration of their mid
        self._handed_to_paho: set[str] = set()  # msg ids this process published (paho retransmits those itself)
        self._stopping = threading.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{device_id}")
        self.updates_sent = threading.Semaphore(0)  # released once per update the broker acknowledged
        self.receipts = threading.Semaphore(0)  # released once per update the coordinator confirmed it stored
        self.ack_timeout_s = 30.0
        offline = encode(self._signed(Status(fleet=fleet, device_id=device_id, state="offline",
                                             detail="connection lost")))
        self.client = M.make_client(f"fedge-{fleet}-dev-{device_id}", will=(self.topics.status(device_id), offline),
                                    mqtt311=broker.mqtt311)
        for name in ("on_connect", "on_message", "on_publish", "on_disconnect", "on_connect_fail"):
            setattr(self.client, name, M.guarded(getattr(self, f"_{name}"), f"device {device_id} {name}",
                                                 self.receiver.callback_failed))

    def _signed(self, msg: Message) -> Message:
        return sign(msg, self.identity.key) if self.identity is not None else msg

    def _authenticate(self, msg: Message) -> None:
        """Only what a coordinator sends is accepted here, and with an identity only with the coordinator's
        signature (a broker without an ACL, or a forged publisher, cannot steer the device)."""
        check_from_coordinator(msg, self.identity.coordinator_key if self.identity is not None else None)

    @property
    def globals(self) -> dict[int, Params]:
        """Version -> global head (or adapter) this device holds."""
        with self._lock:
            return {v: m.params for v, m in self.global_models.items()}

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, wait: bool = True) -> EdgeClient:
        """Connect; ``wait=False`` returns at once and paho keeps trying with backoff (a daemon
        started while the broker is down)."""
        M.connect(self.client, self.broker, persistent=True, wait=wait, network=self.network)
        return self

    def stop(self, *, graceful: bool = True, ack_wait_s: float = 5.0) -> None:
        """Graceful: finish the running task while still connected, give its PUBACK up to
        `ack_wait_s` to arrive, announce offline, then disconnect. An update still unacknowledged
        stays in the outbox and is sent by the next start."""
        self._stopping.set()
        self._worker.shutdown(wait=graceful, cancel_futures=True)
        if graceful:
            deadline = time.time() + ack_wait_s
            while self.inflight() and time.time() < deadline and self.client.is_connected():
                time.sleep(0.05)
            info = M.publish(self.client, self.topics.status(self.device_id), encode(self._signed(
                Status(fleet=self.fleet, device_id=self.device_id, state="offline", detail="stopped"))),
                retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # not connected: the last will says offline
                info.wait_for_publish(timeout=5)
        M.close(self.client, self.network, clean=graceful)

    # ------------------------------------------------------------------ MQTT callbacks

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.error("device %s: broker refused connection: %s", self.device_id, reason_code)
            return
        client.subscribe([(self.topics.task(self.device_id), 1), (self.topics.global_model(self.task), 1)])
        log.info("device %s connected (session present: %s)", self.device_id, flags.session_present)
        self.announce()
        self.publish_status("online")
        self._flush_outbox()
        for hook in self.on_connect_hooks:
            try:
                hook(client, userdata, flags, reason_code, properties)
            except Exception:
                log.exception("device %s: on-connect hook failed", self.device_id)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if not self._stopping.is_set():
            log.warning("device %s: connection to %s:%d lost (%s); reconnecting with backoff", self.device_id,
                        self.broker.host, self.broker.port, reason_code)

    def _on_connect_fail(self, client, userdata) -> None:  # type: ignore[no-untyped-def]
        log.warning("device %s: cannot reach broker %s:%d; retrying with backoff", self.device_id,
                    self.broker.host, self.broker.port)

    def announce(self) -> None:
        """(Re-)publish the retained hello, e.g. after the learner was rebuilt on new data."""
        current = max(self.global_models) if self.global_models else None
        self._publish(self.topics.hello(self.device_id), Hello(
            fleet=self.fleet, device_id=self.device_id, runtime=self.learner.backbone.runtime_version,
            profile=self.profile, domain=self.domain, n_train=self.learner.n_train, n_eval=self.learner.n_eval,
            model_version=current, capabilities=["train", "evaluate", "fedprox"],
            backbone_sha256=self.learner.backbone.sha256, bundle_version=self.bundle_version,
            prototype=feature_prototype(self.learner.f_train.feats) if self.announce_prototype else None),
            retain=True)

    def publish_status(self, state: str | None = None, detail: str = "") -> None:
        """Retained presence; the daemon's heartbeat calls this with the current state."""
        if state is not None and state != "offline":
            self.state = state
        self._publish(self.topics.status(self.device_id), Status(
            fleet=self.fleet, device_id=self.device_id, state=state or self.state, detail=detail[:512]), retain=True)

    def _flush_outbox(self) -> None:
        """Publish outbox entries an earlier process left without the coordinator's answer (same bytes, same id);
        paho retransmits the ones this process handed it."""
        for entry in self.outbox.outbox_unsettled():
            if entry.msg_id not in self._handed_to_paho:
                log.info("device %s: sending stored update for round %d (%s, msg %s)", self.device_id,
                         entry.round_id, entry.state, entry.msg_id[:8])
                self._send(entry)

    def resend_unsettled(self, older_than_s: float = 120.0) -> int:
        """Publish again the updates the broker took but the coordinator never answered (no Receipt, no Reject)
        within `older_than_s`: the broker may have lost them, or the coordinator was away. The coordinator counts a
        re-sent update once and answers again. Returns how many were re-sent."""
        if not self.client.is_connected():
            return 0
        stale = [e for e in self.outbox.outbox_unsettled(older_than_s) if e.state == "acked"]
        for entry in stale:
            log.info("device %s: no receipt for round %d after %.0f s; sending it again", self.device_id,
                     entry.round_id, older_than_s)
            self._send(entry)
        return len(stale)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        with self._ack_lock:
            key = self._inflight.pop(mid, None)
            if key is None:
                now = time.time()
                self._early_acks[mid] = now
                for m in [m for m, t in self._early_acks.items() if now - t > 60]:
                    del self._early_acks[m]
                return
        self._acked(key, reason_code)

    def _acked(self, key: tuple[int, str], reason_code: object = None) -> None:
        round_id, msg_id = key
        if getattr(reason_code, "is_failure", False):
            log.error("device %s: broker refused update for round %d: %s", self.device_id, round_id, reason_code)
            return
        self.outbox.outbox_mark(round_id, msg_id, "acked")
        log.info("device %s: update for round %d acknowledged by the broker", self.device_id, round_id)
        self.updates_sent.release()

    def inflight(self) -> int:
        """Updates handed to MQTT whose PUBACK has not arrived."""
        with self._ack_lock:
            return len(self._inflight)

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        self.stats.bytes_down += len(message.payload)
        try:
            msg = self.receiver.accept(message.topic, message.payload, self.topics)
            self._dispatch(msg)
        except ProtocolError:
            pass  # counted and logged by the receiver
        except Exception as exc:  # a bug must not kill paho's network thread
            log.exception("device %s: error handling message on %s", self.device_id, message.topic)
            self.receiver.callback_failed(exc)

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, GlobalModel):
            self._on_global(msg)
        elif isinstance(msg, RoundTask):
            with self._lock:
                ready = msg.model_version in self.global_models
                if not ready:
                    self._pending[msg.model_version] = msg
                    for old in sorted(self._pending)[:-MAX_PENDING_TASKS]:  # bounded, whatever arrives
                        del self._pending[old]
            if ready:
                self._worker.submit(self._run_task, msg)
            else:
                log.info("device %s: task for round %d waits for global v%d", self.device_id, msg.round_id,
                         msg.model_version)
        elif isinstance(msg, Receipt):
            entry = self.outbox.outbox_settle(msg.ref_msg_id, "received")
            if entry is not None:
                self.stats.receipts += 1
                self.receipts.release()
                log.info("device %s: the coordinator stored the update for round %d", self.device_id, msg.round_id)
        elif isinstance(msg, SECAGG_FROM_COORDINATOR):
            self._worker.submit(self.secure.handle, msg)  # key agreement and masks: off paho's network thread
        elif isinstance(msg, Reject):
            entry = self.outbox.outbox_settle(msg.ref_msg_id, "rejected")
            log.warning("device %s: coordinator rejected %s%s: %s (%s)", self.device_id, msg.ref_msg_id,
                        f" (the update for round {entry.round_id})" if entry else "", msg.reason, msg.detail)

    def _backbone_identity(self) -> tuple[str, str]:
        """(model id, file sha256) of the backbone this device runs; the id is empty for backbones whose
        metadata has none (the recommender's encoder), and then the file hash decides."""
        backbone = self.learner.backbone
        return str(getattr(backbone.spec, "model_id", "") or ""), backbone.sha256

    def backbone_changed(self) -> None:
        """The device now runs another backbone: the personal head, trained on the old features, goes,
        and the global heads received so far are checked again against the new backbone (a new bundle of
        the same export keeps them; another export's head is refused and the device waits for the fleet's
        next one). Re-subscribing would not do: the broker's retained copy is a replay to the receiver."""
        with self._lock:
            received = [self.global_models[v] for v in sorted(self.global_models)]
            self.global_models.clear()
            self.personal = None
        for msg in received:
            self._on_global(msg)

    def _check_params(self, params: Params) -> None:
        """Raise a ProtocolError unless `params` fit this device's head (the recommender's client checks
        its adapter instead)."""
        spec = self.learner.backbone.spec
        horizon = len(params.get("point_bias", ()))
        if horizon != self.learner.split.horizon:
            raise WrongShape(f"global head horizon {horizon} != device horizon {self.learner.split.horizon}")
        check_arrays(params, head_shapes(spec.feature_dim, horizon, len(spec.quantiles)), what="global")

    def _on_global(self, msg: GlobalModel) -> None:
        try:
            if why := backbone_mismatch(*self._backbone_identity(), model_id=msg.backbone_id,
                                        sha256s=[msg.backbone_sha256]):
                raise ModelMismatch(f"global {self.task} model v{msg.version} was trained for {why}")
            self._check_params(msg.params)
        except ProtocolError as err:
            self.receiver.reject(err, self.topics.global_model(self.task))
            return
        self.receiver.advance(msg)
        with self._lock:
            self.global_models[msg.version] = msg.model_copy(update={"params": as_float32(msg.params)})
            for old in sorted(self.global_models)[:-2]:
                del self.global_models[old]
            task = self._pending.pop(msg.version, None)
        log.info("device %s: global head v%d", self.device_id, msg.version)
        if task is not None:
            self._worker.submit(self._run_task, task)

    # ------------------------------------------------------------------ work

    def _run_task(self, task: RoundTask) -> None:
        try:
            stored = self.outbox.outbox_for_round(task.round_id)
            if stored is not None and self._same_task(stored, task):
                log.info("device %s: re-sending update for round %d", self.device_id, task.round_id)
                self._send(stored)
                return
            if task.deadline_ts < time.time():
                log.warning("device %s: task for round %d is past its deadline, skipped", self.device_id, task.round_id)
                return
            if not self._wait_for_resources(task):
                return
            if self.before_task is not None:
                self.before_task(task)
                with self._lock:
                    if task.model_version not in self.global_models:  # backbone changed: wait for a head for it
                        self._pending[task.model_version] = task
                        log.info("device %s: round %d waits for global v%d for the new backbone", self.device_id,
                                 task.round_id, task.model_version)
                        return
            self.publish_status("training", f"round {task.round_id}")
            with self.compute_slots or contextlib.nullcontext():
                update = self._compute(task)
            if task.options.get("secagg") and task.kind == "train":  # masked, through the secure session
                if self.after_update is not None:  # the round's learning state is kept as in a plain round
                    with self.outbox.transaction():
                        self.after_update(task, update)
                self.secure.start(task, update)
                self.publish_status("idle")
                return
            payload = encode(self._signed(update))
            topic = self.topics.update(task.round_id, self.device_id)
            with self._ack_lock:  # a reconnect flushing the outbox right now must leave this one to us
                self._handed_to_paho.add(update.msg_id)
            with self.outbox.transaction():  # the update and the learning state that produced it, or neither
                self.outbox.outbox_put(task.round_id, update.msg_id, topic, payload)
                if self.after_update is not None:
                    self.after_update(task, update)
            if os.environ.get(FAILPOINT_ENV) == "after_outbox":
                os.kill(os.getpid(), signal.SIGKILL)
            self._send(OutboxEntry(task.round_id, update.msg_id, topic, payload, "pending", 0))
            self.publish_status("idle")
        except Exception:
            log.exception("device %s: round %d failed", self.device_id, task.round_id)

    @staticmethod
    def _same_task(entry: OutboxEntry, task: RoundTask) -> bool:
        """An outbox entry answers this task, not another fleet database's round with the same number (a
        coordinator whose database was reset numbers its rounds from 1 again, with new opening times)."""
        try:
            sent = decode(entry.payload)
        except ProtocolError:
            return False
        return (isinstance(sent, Update) and sent.base_version == task.model_version and sent.kind == task.kind
                and sent.round_opened == task.round_opened)

    def _wait_for_resources(self, task: RoundTask) -> bool:
        """Defer training while the resource check says no; give up at the deadline or when stopping."""
        if self.resource_check is None:
            return True
        announced = ""
        while not self._stopping.is_set():
            reason = self.resource_check(task)
            if reason is None:
                return True
            if reason != announced:
                log.info("device %s: round %d deferred: %s", self.device_id, task.round_id, reason)
                self.publish_status("idle", f"round {task.round_id} deferred: {reason}")
                announced = reason
            if time.time() + self.resource_poll_s >= task.deadline_ts:
                log.warning("device %s: round %d skipped, resources never allowed it: %s", self.device_id,
                            task.round_id, reason)
                return False
            self._stopping.wait(self.resource_poll_s)
        return False

    def _compute(self, task: RoundTask) -> Update:
        update, outcome = compute_update(self.learner, task, self.global_models[task.model_version].params,
                                         self.personal, device_id=self.device_id, seed=self.seed,
                                         local_personalize=self.personalize)
        if outcome is not None:
            self.personal = outcome.personal
            self.stats.rounds += 1
            self.stats.last_metrics = outcome.metrics
        return update

    def _send(self, entry: OutboxEntry) -> None:
        """Publish a stored update (never blocking: the PUBACK arrives in :meth:`_on_publish`, and
        `updates_sent` is released then, so it only counts updates the broker took responsibility
        for). Published while offline, paho queues it and sends it after reconnecting."""
        key = (entry.round_id, entry.msg_id)
        info = M.publish(self.client, entry.topic, entry.payload)
        self.stats.bytes_up += len(entry.payload)
        with self._ack_lock:
            self._handed_to_paho.add(entry.msg_id)
            early = self._early_acks.pop(info.mid, None) is not None
            if not early:
                self._inflight[info.mid] = key
        if self.client.is_connected():
            self.outbox.outbox_mark(entry.round_id, entry.msg_id, "sent")
        if early:
            self._acked(key)

    def _publish_secagg(self, msg: Message) -> None:
        self._publish(self.topics.secagg(msg.round_id or 0, self.device_id), msg)

    def _publish(self, topic: str, msg: Message, *, retain: bool = False) -> None:
        payload = encode(self._signed(msg))
        self.stats.bytes_up += len(payload)
        M.publish(self.client, topic, payload, retain=retain)

