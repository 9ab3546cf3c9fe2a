"""The long-running device: store, ingestion, learner, MQTT client and (optionally) model bundles
put together for ``fedge-edge run``.

What it adds to :class:`edge_client.daemon.client.EdgeClient`: the device's readings come from its SQLite
store (fed by edge_client.daemon.ingest), so training uses everything ingested so far, and windows are
rebuilt between rounds once enough new readings arrived; updates go through the durable outbox; the
personal head survives restarts; a resource check defers rounds; a heartbeat refreshes the retained
status; signed bundles are downloaded in the background on the same MQTT connection and a newly
verified backbone is switched to between rounds. Only one daemon may use a state directory at a
time (an flock on ``daemon.lock``), which is also how ``forget-me`` knows it is safe to delete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from edge_client.daemon import ingest
from edge_client.daemon import resources as R
from edge_client.daemon.client import EdgeClient
from edge_client.daemon.config import DeviceConfig
from edge_client.daemon.store import DeviceStore
from edge_client.learning import personalize as PZ
from edge_client.learning import state as LS
from edge_client.learning.learner import DeviceLearner, SplitConfig
from edge_client.runtime.backbone import BackboneRunner, ModelLoadError
from edge_client.wire import RoundTask, Topics, Update
from edge_client.wire import mqtt as M
from edge_client.wire.memory import SqliteReplay

log = logging.getLogger("fedge.service")

LOCK_NAME = "daemon.lock"
# Personal state is stored once: the learning state (edge_client.learning.state: the personal model -- adapter + head,
# what a personalised device forecasts with and next round's self-distillation teacher -- the gate's prior, the served
# predictor with its gate and rule guards, the track record and top-k's residual) under "learner"; the head the
# device forecasts with under "head" only when it is not the personal model's (a round without personalisation after
# personalised ones, a fallback to the global head). Stores of earlier versions kept the personal model alone under
# "model": read once, then replaced by "learner".
PERSONAL_HEAD = "head"
PERSONAL_STATE = "learner"
LEGACY_PERSONAL_MODEL = "model"


class StateDirBusy(RuntimeError):
    """Another daemon holds this state directory."""


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the state directory for the life of the returned file."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fh = open(state_dir / LOCK_NAME, "a+")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise StateDirBusy(f"another fedge-edge daemon is using {state_dir}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def state_dir_busy(state_dir: Path) -> bool:
    try:
        lock_state_dir(state_dir).close()
    except StateDirBusy:
        return True
    return False


class _SharedConnection:
    """The device's paho client as :class:`edge_client.bundles.download.BundleDownloader` sees it: subscribe
    and unsubscribe go through; the callbacks it installs are called by the device client (one
    connection per device, one last will)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.on_connect: Callable[..., None] | None = None
        self.on_message: Callable[..., None] | None = None

    def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.subscribe(*args, **kwargs)

    def unsubscribe(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.unsubscribe(*args, **kwargs)


def profile_choice(profile: str) -> tuple[str, str]:
    """(runtime, format) the device's profile prefers for bundled backbones; ONNX Runtime fp32 for a
    profile fedge does not ship (the default "generic")."""
    from edge_client.runtime.profile import load_profile

    try:
        p = load_profile(profile)
    except (ValueError, OSError):
        return "onnxruntime", "fp32"
    return p.runtime, p.preferred_format


def bundle_store(cfg: DeviceConfig):  # type: ignore[no-untyped-def]
    """The device's BundleStore, or None without a [bundle] table (imports cryptography lazily)."""
    if cfg.bundle is None:
        return None
    from edge_client.bundles.manifest import load_public_key
    from edge_client.bundles.store import BundleStore

    b = cfg.bundle
    runtime, fmt = profile_choice(cfg.profile)
    return BundleStore(Path(b.dir), load_public_key(b.public_key), profile=cfg.profile,
                       fleet=cfg.fleet if cfg.identity else None,
                       preferred_format=b.preferred_format or fmt, runtime=b.runtime or runtime, threads=cfg.threads)


def device_backbone(cfg: DeviceConfig, bundles) -> tuple[BackboneRunner | None, int | None]:  # type: ignore[no-untyped-def]
    """The one rule for which backbone a device runs, for the daemon and for `fedge-edge info`: the current
    bundle's (rolled back by the BundleStore if it fails to load), else the file named in the config; with its
    bundle version (None for the configured file, or when there is neither yet)."""
    if bundles is not None and bundles.current_version is not None:
        try:
            runner = bundles.load_current()
            return runner, bundles.current_version
        except ModelLoadError as exc:
            log.error("no usable bundle: %s", exc)
    if cfg.backbone:
        return BackboneRunner(cfg.backbone, threads=cfg.threads), None
    return None, None


class DeviceService:
    """One device daemon. :meth:`run` blocks until `stop` is set (SIGTERM) or `max_rounds` updates."""

    def __init__(self, cfg: DeviceConfig, broker: M.BrokerAddress) -> None:
        self.cfg, self.broker = cfg, broker
        self.state_dir = cfg.state_path()
        self._lock_file = lock_state_dir(self.state_dir)
        self.store = DeviceStore(self.state_dir)
        self.split = SplitConfig(horizon=cfg.horizon, eval_fraction=cfg.eval_fraction,
                                 max_train_windows=cfg.max_train_windows)
        self.rebuild_every = cfg.rebuild_every or cfg.horizon
        self.season, self.domain = cfg.data.season or 24, cfg.data.kind
        self.bundles = bundle_store(cfg)
        self.identity = cfg.load_identity()
        self.bundle_version: int | None = None
        self.runner: BackboneRunner | None = None
        self.learner: DeviceLearner | None = None
        self.client: EdgeClient | None = None
        self._built_at = -1  # readings the current learner was built on
        self._tried_at = -1  # readings at the last build attempt (do not retry without new data)
        self._state_logged: bytes | None = None  # digest of the stored learning state last logged (a device
        # waiting for data rereads it at every build attempt: say so once per state)
        self._csv: ingest.CsvTail | None = None
        self._csv_lock = threading.Lock()
        self._socket: ingest.SocketSource | None = None
        self.store.set_meta("device", {"device_id": cfg.device_id, "fleet": cfg.fleet, "profile": cfg.profile})
        self.metrics = None
        if cfg.metrics is not None:  # off by default; prometheus_client only when asked for
            from edge_client.daemon.metrics import DeviceMetrics

            self.metrics = DeviceMetrics(cfg.metrics, self.store, cfg.device_id, lambda: self.bundle_version)

    # ------------------------------------------------------------------ data

    def start_ingest(self) -> None:
        d = self.cfg.data
        if d.kind == "dataset":
            values, self.season, self.domain = d.load()
            new = ingest.import_series(self.store, f"dataset:{d.dataset}:{d.column}:{d.start}:{d.stop}", values)
            if new:
                log.info("imported %d readings of %s/%s into the store", new, d.dataset, d.column)
        elif d.kind == "csv":
            assert d.path is not None
            self._csv = ingest.CsvTail(self.store, d.path, d.column, d.time_column)
            self.poll_csv()
        elif d.kind == "stdin":
            ingest.start_stdin(self.store)
        elif d.kind == "socket":
            assert d.path is not None
            self._socket = ingest.SocketSource(self.store, d.path)
            log.info("listening for readings on %s", d.path)

    def poll_csv(self) -> None:
        if self._csv is None:
            return
        with self._csv_lock:
            try:
                new = self._csv.poll()
            except (KeyError, OSError) as exc:  # a rewritten header, an unreadable file: log, keep running
                log.error("ingest %s: %s", self._csv.path, exc)
                return
        if new:
            log.debug("ingested %d new readings from %s", new, self._csv.path)

    # ------------------------------------------------------------------ model

    def load_backbone(self) -> BackboneRunner | None:
        """The backbone :func:`device_backbone` picks; None when there is none yet (wait for the first bundle)."""
        runner, version = device_backbone(self.cfg, self.bundles)
        if version is not None:
            self.bundle_version = version
            self.store.set_meta("bundle_version", version)
        return runner

    def _check_horizon(self, runner: BackboneRunner) -> None:
        if self.cfg.horizon > runner.spec.horizon:
            raise ValueError(f"horizon {self.cfg.horizon} exceeds the model's {runner.spec.horizon}")

    def build_learner(self) -> DeviceLearner | None:
        """Windows and features from the stored series; None while there is too little data."""
        assert self.runner is not None
        n = self._tried_at = self.store.n_samples()
        if self.learner is not None and self.learner.backbone is self.runner:  # new readings: the state stays
            state = LS.LearnerState.of(self.learner)
        else:  # a restart (or another backbone, whose state was dropped): the state comes back from the store
            state = self.stored_state()
        try:  # a device that repairs faults builds its windows with the detector it learned first
            learner = DeviceLearner(self.runner, self.store.series(self.cfg.max_history), season=self.season,
                                    split=self.split, repair=state.repair)
        except ValueError as exc:
            log.info("waiting for data: %d readings stored (%s)", n, exc)
            return None
        state.apply(learner)
        self._built_at = n
        self.store.set_meta("backbone_sha256", self.runner.sha256)
        log.info("learner built on %d readings: %d train windows, %d held back", n, learner.n_train, learner.n_eval)
        return learner

    def refresh(self, task: RoundTask | None = None) -> None:
        """Between rounds (on the training worker): switch to a newly installed bundle, rebuild
        windows when `rebuild_every` new readings arrived."""
        self.poll_csv()
        switched = False
        if self.bundles is not None and self.bundles.current_version not in (None, self.bundle_version):
            runner = self.load_backbone()
            if runner is not None and runner is not self.runner:
                self._check_horizon(runner)
                log.info("switching to bundle v%s (backbone %s…)", self.bundle_version, runner.sha256[:12])
                self.runner, switched = runner, True
                dropped = self.store.delete_personal()  # trained on the old backbone's features
                if self.client is not None:
                    self.client.backbone_changed()
                log.info("dropped the global and personal heads of the old backbone (%s)", ", ".join(dropped) or "-")
        n = self.store.n_samples()
        if switched or (n - self._built_at >= self.rebuild_every and n != self._tried_at):
            learner = self.build_learner()
            if learner is not None:
                self.learner = learner
                if self.client is not None:
                    self.client.learner = learner
                    self.client.bundle_version = self.bundle_version
                    self.client.announce()

    # ------------------------------------------------------------------ hooks for EdgeClient

    def resource_check(self, task: RoundTask) -> str | None:
        reason = R.check(self.cfg.resources)
        if reason is not None:
            self.store.set_meta("last_deferred", {"round": task.round_id, "reason": reason, "ts": time.time()})
        return reason

    def head_spec(self) -> LS.HeadSpec:
        """What a stored learning state must fit: this backbone and this device's head."""
        assert self.runner is not None
        spec = self.runner.spec
        return LS.HeadSpec(self.runner.sha256, spec.feature_dim, self.cfg.horizon, len(spec.quantiles))

    def stored_state(self) -> LS.LearnerState:
        """The learning state the store holds for this backbone; an empty one (a fresh start, logged with the reason)
        when there is none or it is refused: corrupt, another format version, backbone or head. Never raises: a bad
        state file must not keep a device out of its fleet, and the outbox is another table, untouched."""
        blob = self.store.load_personal_blob(PERSONAL_STATE)
        if blob is None:
            return self._legacy_state()
        digest = hashlib.sha256(blob).digest()
        first = digest != self._state_logged
        self._state_logged = digest
        try:
            state = LS.decode_learner_state(blob, self.head_spec())
        except LS.StateRefused as exc:
            log.log(logging.ERROR if first else logging.DEBUG, "stored learning state refused, starting fresh "
                    "(personal model, gate, rule guards, track record and top-k residual reset; the outbox is kept): "
                    "%s", exc)
            return LS.LearnerState()
        log.log(logging.INFO if first else logging.DEBUG, "learning state restored: %s",
                ", ".join(k for k, v in vars(state).items() if v is not None) or "-")
        return state

    def _legacy_state(self) -> LS.LearnerState:
        """A store written before the learning state existed: its personal model alone, when it fits the backbone."""
        params = self.store.load_personal(LEGACY_PERSONAL_MODEL) if self._personal_fits() else None
        if params is None:
            return LS.LearnerState()
        return LS.LearnerState(PZ.PersonalModel(params, PZ.PersonalConfig(),
                                                trained_at_day=self.store.get_meta("personal_day")))

    def _personal_fits(self) -> bool:
        """Personal state is only reused on the backbone whose features it was trained on."""
        return self.runner is not None and self.store.get_meta("personal_backbone") == self.runner.sha256

    def personal_head_from_store(self) -> dict | None:
        """What this device forecast with before a restart: its stored head, else its (restored) personal model."""
        if not self._personal_fits():
            return None
        head = self.store.load_personal(PERSONAL_HEAD)
        model = self.learner.personal_model if self.learner is not None else None
        return head if head is not None else (model.params if model is not None else None)

    def after_update(self, task: RoundTask, update: Update) -> None:
        """What the round left, written (by the client) in the transaction that stores the update in the outbox."""
        assert self.client is not None and self.runner is not None
        model = self.learner.personal_model if self.learner is not None else None
        if self.learner is not None:  # the personal model's config is the next round's: it is not stored
            self.store.save_personal_blob(PERSONAL_STATE, LS.encode_learner_state(LS.LearnerState.of(self.learner),
                                                                    self.head_spec()))
            self.store.delete_personal(LEGACY_PERSONAL_MODEL)
        if self.client.personal is not None:
            if model is not None and self.client.personal is model.params:
                self.store.delete_personal(PERSONAL_HEAD)  # the model above is the head: not stored twice
            else:
                self.store.save_personal(PERSONAL_HEAD, self.client.personal)
            self.store.set_meta("personal_backbone", self.runner.sha256)
        self.store.set_meta("last_round", {"round": task.round_id, "kind": task.kind, "ts": time.time(),
                                           "metrics": dict(update.metrics)})
        self.store.set_meta("last_global_version", task.model_version)
        if task.kind == "train":
            self.store.incr_meta("rounds_trained")
        if self.metrics is not None:
            self.metrics.observe_round(task.kind, update.train_seconds, dict(update.metrics))
        self.store.outbox_prune()

    # ------------------------------------------------------------------ lifecycle

    def wait_for(self, what: str, ready: Callable[[], bool], stop: threading.Event, poll_s: float) -> bool:
        """Block until ready() or stop; True when ready."""
        while not stop.is_set():
            if ready():
                return True
            log.debug("waiting for %s", what)
            stop.wait(poll_s)
        return False

    def _first_bundle(self, stop: threading.Event) -> bool:
        """No backbone anywhere yet: fetch the first bundle over a short-lived connection."""
        from edge_client.bundles.download import BundleDownloader

        assert self.bundles is not None
        client = M.make_client(f"fedge-{self.cfg.fleet}-dev-{self.cfg.device_id}-bootstrap",
                               mqtt311=self.broker.mqtt311, persistent=False)
        downloader = BundleDownloader(client, Topics(self.cfg.fleet), self.bundles)
        M.connect(client, self.broker, persistent=False, wait=False)
        log.info("no backbone yet: waiting for a signed bundle on %s", Topics(self.cfg.fleet).bundle("tsfm"))
        try:
            return self.wait_for("the first bundle", downloader.installed.is_set, stop, 0.2)
        finally:
            client.disconnect()
            client.loop_stop()

    def run(self, stop: threading.Event, max_rounds: int = 0) -> int:
        """Join the fleet and answer rounds; returns the number of acknowledged updates."""
        cfg = self.cfg
        self.start_ingest()
        if self.metrics is not None:
            self.metrics.start()
        self.runner = self.load_backbone()
        if self.runner is None and not (self.bundles is not None and self._first_bundle(stop)):
            return 0
        self.runner = self.runner or self.load_backbone()
        if self.runner is None:
            raise ModelLoadError("no backbone: set 'backbone' or install a bundle")
        self._check_horizon(self.runner)

        def ready() -> bool:
            self.poll_csv()
            if self.store.n_samples() != self._tried_at:
                self.learner = self.build_learner()
            return self.learner is not None

        if not self.wait_for("enough readings", ready, stop, cfg.data.poll_s):
            return 0
        assert self.learner is not None
        self.client = EdgeClient(cfg.device_id, cfg.fleet, self.learner, self.broker, profile=cfg.profile,
                                 domain=self.domain, seed=cfg.seed, outbox=self.store,
                                 resource_check=self.resource_check, resource_poll_s=cfg.resources.poll_s,
                                 before_task=self.refresh, after_update=self.after_update,
                                 personal=self.personal_head_from_store(), identity=self.identity,
                                 replay=SqliteReplay(self.store.path), personalize=cfg.personalize,
                                 announce_prototype=cfg.announce_prototype)
        self.client.bundle_version = self.bundle_version
        self._attach_bundles(self.client)
        unsettled = self.store.outbox_unsettled()
        if unsettled:
            log.info("%d stored update(s) wait for the coordinator's receipt: rounds %s", len(unsettled),
                     [e.round_id for e in unsettled])
        self.client.start(wait=False)
        log.info("device %s running (fleet %s, broker %s:%d, state %s)", cfg.device_id, cfg.fleet,
                 self.broker.host, self.broker.port, self.state_dir)
        return self._loop(stop, max_rounds)

    def _attach_bundles(self, client: EdgeClient) -> None:
        if self.bundles is None:
            return
        from edge_client.bundles.download import BundleDownloader

        shared = _SharedConnection(client.client)
        BundleDownloader(shared, client.topics, self.bundles, client.task)
        client.on_connect_hooks.append(lambda *a: shared.on_connect(*a) if shared.on_connect else None)
        for topic in (client.topics.bundle(client.task), client.topics.all_chunks(client.task)):
            client.client.message_callback_add(topic, lambda c, u, m: shared.on_message(c, u, m)
                                               if shared.on_message else None)

    def _loop(self, stop: threading.Event, max_rounds: int) -> int:
        assert self.client is not None
        sent, next_beat, next_poll, next_metrics = 0, time.time() + self.cfg.heartbeat_s, 0.0, 0.0
        while not stop.is_set():
            if self.client.updates_sent.acquire(timeout=0.2):
                sent += 1
                if max_rounds and sent >= max_rounds:
                    break
            now = time.time()
            if now >= next_poll:
                self.poll_csv()
                next_poll = now + self.cfg.data.poll_s
            if self.metrics is not None and now >= next_metrics:
                self.metrics.write()
                next_metrics = now + self.metrics.cfg.interval_s
            if now >= next_beat:
                next_beat = now + self.cfg.heartbeat_s
                if self.client.client.is_connected():
                    self.client.publish_status(None, self.heartbeat_detail())
                    self.store.set_meta("last_heartbeat", now)
                    self.client.resend_unsettled(self.cfg.receipt_timeout_s)
                pruned = self.store.prune_samples(max(self.cfg.keep_readings, self.cfg.max_history))
                if pruned:
                    log.info("retention: deleted %d readings older than the newest %d", pruned,
                             self.cfg.keep_readings)
        return sent

    def heartbeat_detail(self) -> str:
        counts = self.store.outbox_counts()
        waiting = counts["pending"] + counts["sent"] + counts["acked"]
        return (f"heartbeat: {self.store.n_samples()} readings, outbox {waiting} unanswered, "
                f"bundle v{self.bundle_version}")

    def close(self) -> None:
        """Finish or persist the in-flight update, say offline, close the store."""
        if self.client is not None:
            self.client.stop(graceful=True)
        if self._socket is not None:
            self._socket.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.store.close()
        with contextlib.suppress(OSError):
            self._lock_file.close()
