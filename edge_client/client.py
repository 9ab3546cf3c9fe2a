"""The device's MQTT side: announces itself, keeps the latest global head, runs round tasks
on a worker thread and publishes updates.

I/O stays here; the learning is in :mod:`edge_client.learner`. paho's network thread only decodes
and hands work over, so a long local training never stalls keep-alives. An update is computed
once per round and kept: if the coordinator asks again for the same round (it restarted, or the
first copy was lost) the identical message, same id, is re-sent, so the coordinator can count it
exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from edge_client import mqtt as M
from edge_client.adapters import Params, as_float32, head_shapes
from edge_client.learner import DeviceLearner
from edge_client.personalize import PersonalConfig
from edge_client.protocol import (
    GlobalModel,
    Hello,
    InvalidMessage,
    Message,
    ModelManifest,
    ModelMismatch,
    ProtocolError,
    Receiver,
    Reject,
    RoundTask,
    Status,
    Topics,
    Update,
    WrongShape,
    check_arrays,
    encode,
)

log = logging.getLogger("fedge.edge")


@dataclass
class EdgeStats:
    bytes_up: int = 0
    bytes_down: int = 0
    rounds: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)


# What a fleet round can switch on over MQTT. The gate, distortion consistency and rule guards
# live in edge_client.personalize / rules and are evaluated by benchmarks/personalization.py, but
# the fleet path does not run them yet, so asking for them is refused rather than ignored.
FLEET_PERSONAL_OPTIONS = frozenset({"rank", "self_distill", "sd_tau_days", "feature_distance", "prox_mu",
                                    "quantile_weight", "epochs", "lr", "batch_size"})


def personal_config(options: Mapping[str, object]) -> PersonalConfig | None:
    """Personalisation methods a round asks for (option ``personalize``), e.g. ``{"personalize": True,
    "rank": 4, "self_distill": 0.5, "feature_distance": 0.1}``; keys outside FLEET_PERSONAL_OPTIONS are
    ignored here (they belong to other parts of the task), wrong types are refused."""
    if not options.get("personalize"):
        return None
    names = FLEET_PERSONAL_OPTIONS & set(options)
    try:
        return PersonalConfig(**{k: type(getattr(PersonalConfig, k))(options[k]) for k in names})
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"bad personalisation options: {exc}") from None


class EdgeClient:
    """One device on the fleet. `learner` holds the device's data and the frozen backbone."""

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
    ) -> None:
        self.device_id = device_id
        self.fleet = fleet
        self.task = task
        self.learner = learner
        self.broker = broker
        self.profile = profile
        self.domain = domain
        self.seed = seed
        self.topics = Topics(fleet)
        self.receiver = Receiver(f"device {device_id}")
        self.stats = EdgeStats()
        self.globals: dict[int, Params] = {}
        self.personal: Params | None = None
        self.manifest: ModelManifest | None = None
        self._pending: dict[int, RoundTask] = {}
        self._sent: dict[int, bytes] = {}  # round id -> the update payload, for idempotent re-sends
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{device_id}")
        self.updates_sent = threading.Semaphore(0)  # released once per update the broker acknowledged
        self.ack_timeout_s = 30.0
        offline = encode(Status(fleet=fleet, device_id=device_id, state="offline", detail="connection lost"))
        self.client = M.make_client(f"fedge-{fleet}-dev-{device_id}", will=(self.topics.status(device_id), offline))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> EdgeClient:
        M.connect(self.client, self.broker, persistent=True)
        return self

    def stop(self, *, graceful: bool = True) -> None:
        """Graceful: finish the running task while still connected (so its PUBACK can arrive),
        announce offline, then disconnect."""
        self._worker.shutdown(wait=graceful, cancel_futures=True)
        if graceful:
            info = M.publish(self.client, self.topics.status(self.device_id), encode(
                Status(fleet=self.fleet, device_id=self.device_id, state="offline", detail="stopped")), retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # not connected: the last will says offline
                info.wait_for_publish(timeout=5)
            self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------ MQTT callbacks

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.error("device %s: broker refused connection: %s", self.device_id, reason_code)
            return
        client.subscribe([(self.topics.task(self.device_id), 1), (self.topics.global_model(self.task), 1),
                          (self.topics.manifest(self.task), 1)])
        current = max(self.globals) if self.globals else None
        self._publish(self.topics.hello(self.device_id), Hello(
            fleet=self.fleet, device_id=self.device_id, runtime=self.learner.backbone.runtime,
            profile=self.profile, domain=self.domain, n_train=self.learner.n_train, n_eval=self.learner.n_eval,
            model_version=current, capabilities=["train", "evaluate", "fedprox"]), retain=True)
        self._publish(self.topics.status(self.device_id),
                      Status(fleet=self.fleet, device_id=self.device_id, state="online"), retain=True)

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        self.stats.bytes_down += len(message.payload)
        try:
            msg = self.receiver.accept(message.topic, message.payload, self.topics)
            self._dispatch(msg)
        except ProtocolError:
            pass  # counted and logged by the receiver
        except Exception:  # a bug must not kill paho's network thread
            log.exception("device %s: error handling message on %s", self.device_id, message.topic)

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, GlobalModel):
            self._on_global(msg)
        elif isinstance(msg, RoundTask):
            with self._lock:
                ready = msg.model_version in self.globals
                if not ready:
                    self._pending[msg.model_version] = msg
            if ready:
                self._worker.submit(self._run_task, msg)
            else:
                log.info("device %s: task for round %d waits for global v%d", self.device_id, msg.round_id,
                         msg.model_version)
        elif isinstance(msg, ModelManifest):
            self._on_manifest(msg)
        elif isinstance(msg, Reject):
            log.warning("device %s: coordinator rejected %s: %s (%s)", self.device_id, msg.ref_msg_id, msg.reason,
                        msg.detail)

    def _on_manifest(self, msg: ModelManifest) -> None:
        wanted = {f.name: f.sha256 for f in msg.files}.get("backbone.onnx")
        self.manifest = msg
        if wanted and wanted != self.learner.backbone.sha256:
            self.receiver.reject(ModelMismatch(
                f"fleet runs backbone {wanted[:12]}… (manifest v{msg.version}), this device has "
                f"{self.learner.backbone.sha256[:12]}…; install the new backbone"), self.topics.manifest(self.task))

    def _on_global(self, msg: GlobalModel) -> None:
        spec = self.learner.backbone.spec
        horizon = len(msg.params.get("point_bias", ()))
        try:
            if msg.backbone_sha256 and msg.backbone_sha256 != self.learner.backbone.sha256:
                raise ModelMismatch(f"global head v{msg.version} was trained for backbone {msg.backbone_sha256[:12]}…,"
                                    f" this device runs {self.learner.backbone.sha256[:12]}…")
            if horizon != self.learner.split.horizon:
                raise WrongShape(f"global head horizon {horizon} != device horizon {self.learner.split.horizon}")
            check_arrays(msg.params, head_shapes(spec.feature_dim, horizon, len(spec.quantiles)), what="global")
        except ProtocolError as err:
            self.receiver.reject(err, self.topics.global_model(self.task))
            return
        with self._lock:
            self.globals[msg.version] = as_float32(msg.params)
            for old in sorted(self.globals)[:-2]:
                del self.globals[old]
            task = self._pending.pop(msg.version, None)
        log.info("device %s: global head v%d", self.device_id, msg.version)
        if task is not None:
            self._worker.submit(self._run_task, task)

    # ------------------------------------------------------------------ work

    def _run_task(self, task: RoundTask) -> None:
        try:
            if task.round_id in self._sent:
                log.info("device %s: re-sending update for round %d", self.device_id, task.round_id)
                self._send(task.round_id, self._sent[task.round_id])
                return
            if task.deadline_ts < time.time():
                log.warning("device %s: task for round %d is past its deadline, skipped", self.device_id, task.round_id)
                return
            self._publish(self.topics.status(self.device_id), Status(
                fleet=self.fleet, device_id=self.device_id, state="training", detail=f"round {task.round_id}"),
                retain=True)
            update = self._compute(task)
            payload = encode(update)
            self._sent[task.round_id] = payload
            for old in sorted(self._sent)[:-4]:
                del self._sent[old]
            self._send(task.round_id, payload)
            self._publish(self.topics.status(self.device_id),
                          Status(fleet=self.fleet, device_id=self.device_id, state="idle"), retain=True)
        except Exception:
            log.exception("device %s: round %d failed", self.device_id, task.round_id)

    def _compute(self, task: RoundTask) -> Update:
        global_params = self.globals[task.model_version]
        if task.params:  # bi-level personalised aggregation: train from this device's own aggregate
            spec = self.learner.backbone.spec
            check_arrays(task.params, head_shapes(spec.feature_dim, self.learner.split.horizon, len(spec.quantiles)),
                         what="task.params")
            global_params = as_float32(task.params)
        if task.kind == "evaluate":
            metrics = {**self.learner.evaluate(global_params, "global"), **self.learner.baseline_metrics()}
            if self.personal is not None:
                metrics.update(self.learner.evaluate(self.personal, "personal"))
            return Update(fleet=self.fleet, device_id=self.device_id, round_id=task.round_id, task=task.task,
                          kind="evaluate", base_version=task.model_version, n_samples=self.learner.n_eval,
                          metrics=metrics)
        outcome = self.learner.run_round(
            global_params, epochs=task.local_epochs, lr=task.lr, batch_size=task.batch_size, prox_mu=task.prox_mu,
            seed=self.seed * 100_003 + task.round_id, upload_dtype=str(task.options.get("upload_dtype", "float16")),
            personal=personal_config(task.options), now_day=task.ts / 86400.0)
        self.personal = outcome.personal
        self.stats.rounds += 1
        self.stats.last_metrics = outcome.metrics
        return Update(fleet=self.fleet, device_id=self.device_id, round_id=task.round_id, task=task.task,
                      base_version=task.model_version, n_samples=outcome.n_samples, delta=outcome.delta,
                      metrics=outcome.metrics, train_seconds=outcome.seconds)

    def _send(self, round_id: int, payload: bytes) -> None:
        """Publish and wait for the broker's PUBACK (on this worker thread, never paho's), so
        `updates_sent` only counts updates the broker has taken responsibility for."""
        info = M.publish(self.client, self.topics.update(round_id, self.device_id), payload)
        self.stats.bytes_up += len(payload)
        try:
            info.wait_for_publish(timeout=self.ack_timeout_s)
        except (RuntimeError, ValueError) as exc:
            log.warning("device %s: update for round %d not acknowledged: %s", self.device_id, round_id, exc)
            return
        if info.is_published():
            self.updates_sent.release()

    def _publish(self, topic: str, msg: Message, *, retain: bool = False) -> None:
        payload = encode(msg)
        self.stats.bytes_up += len(payload)
        M.publish(self.client, topic, payload, retain=retain)

