"""`fedge-edge run` as a real process against real Mosquitto brokers: the broker restarted mid-round
(the update computed offline is delivered once), the daemon SIGKILLed between writing its outbox and
the PUBACK (restarted, the coordinator stores the update once, also when the ack was lost), SIGTERM
(exit 0, offline published), and the `status` / `forget-me` commands on the store."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coordinator.fleet.broker import free_port, start_mosquitto
from coordinator.fleet.server import FleetConfig, FleetCoordinator
from coordinator.fleet.state import FleetState
from edge_client import wire as P
from edge_client.daemon.cli import app
from edge_client.daemon.service import lock_state_dir
from edge_client.daemon.store import DB_NAME, DeviceStore
from edge_client.learning.head import slice_head
from edge_client.wire.mqtt import BrokerAddress, connect, make_client
from tests.waiting import db_rows, wait_for

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parent.parent
DEVICE = "meter-7"


def _device(tmp_path: Path, broker: BrokerAddress, fleet: str, backbone: Path, extra: str = "",
            faults: bool = False) -> Path:
    """A device config reading a CSV meter file of 600 hourly readings (a daily cycle plus noise); `faults`: the
    meter froze for 30 hours and spiked a few times in its second half."""
    rng = np.random.default_rng(0)
    t = np.arange(600)
    values = 10 + 3 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.3, t.size)
    if faults:
        values[330:360] = values[329]
        values[[380, 420, 455, 470]] += np.array([12.0, -12.0, 15.0, 12.0])
    csv = tmp_path / "meter.csv"
    csv.write_text("ts,kwh\n" + "".join(f"{1_700_000_000 + 3600 * i},{v:.4f}\n" for i, v in enumerate(values)))
    cfg = tmp_path / "device.toml"
    cfg.write_text(f"""device_id = "{DEVICE}"
fleet = "{fleet}"
broker = "{broker.host}:{broker.port}"
backbone = "{backbone}"
horizon = 24
state_dir = "{tmp_path / 'state'}"
heartbeat_s = 0.5
{extra}
[data]
kind = "csv"
path = "{csv}"
column = "kwh"
time_column = "ts"
poll_s = 0.2
""")
    return cfg


def _stop(daemon: subprocess.Popen, coord: FleetCoordinator) -> None:
    """Whatever a test's assertions did: the daemon never outlives it and the coordinator is stopped."""
    if daemon.poll() is None:
        daemon.kill()
    coord.stop()


def _start(cfg: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from edge_client.daemon.cli import app; app()", "run", "--config",
                             str(cfg), "--log-level", "info"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})


def _terminate(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def _daemon_rounds(cfg: Path, coord: FleetCoordinator, rounds: int) -> list:
    """Start the daemon, run `rounds` training rounds with it (each must close), stop it with SIGTERM (exit 0);
    the coordinator is stopped and the daemon never outlives the test."""
    daemon = _start(cfg)
    try:
        assert coord.wait_for_devices(1, 60) == [DEVICE]
        results = [coord.run_round("train") for _ in range(rounds)]
        assert [r.state for r in results] == ["closed"] * rounds
        rc, out = _terminate(daemon)
        assert rc == 0, out
    finally:
        _stop(daemon, coord)
    return results


def _coordinator(broker: BrokerAddress, fleet: str, tmp_path: Path, tiny_export, **config) -> FleetCoordinator:
    coord = FleetCoordinator(FleetConfig(fleet=fleet, deadline_s=60, local_epochs=1, min_devices=1, **config), broker,
                             FleetState(tmp_path / "fleet.sqlite")).start()
    coord.ensure_model(slice_head(tiny_export["model"].head_state(), 24))
    return coord


class _Round(threading.Thread):
    """coord.run_round in the background, result or exception kept."""

    def __init__(self, coord: FleetCoordinator) -> None:
        super().__init__(daemon=True)
        self.coord, self.result, self.error = coord, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.coord.run_round("train")
        except Exception as exc:  # surfaced by the test
            self.error = exc


class _StatusWatcher:
    """Every Status message the device publishes (retained ones included)."""

    def __init__(self, broker: BrokerAddress, fleet: str) -> None:
        self.seen: list[P.Status] = []
        self.client = make_client(f"watch-{fleet}-{os.getpid()}")
        self.client.on_connect = lambda c, *a: c.subscribe(P.Topics(fleet).status(DEVICE), qos=1)
        self.client.on_message = lambda c, u, m: self.seen.append(P.decode(m.payload))
        connect(self.client, broker, persistent=False)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_broker_restart_mid_round_update_computed_offline_is_delivered_once(tiny_export, tmp_path):
    fleet, port = "brk", free_port()
    # mosquitto started as root writes its database as the 'mosquitto' user, which cannot enter
    # pytest's private tmp_path: the database lives in a world-writable directory of its own
    persist = Path(tempfile.mkdtemp(prefix="fedge-mosquitto-db-"))
    persist.chmod(0o777)
    conf = ["persistence true", f"persistence_location {persist}/"]
    broker = start_mosquitto(port, conf)
    pause = tmp_path / "pause"
    pause.touch()  # the device defers training while this file exists (an operator's switch)
    cfg = _device(tmp_path, broker.address, fleet, tiny_export["backbone"],
                  f'[resources]\npause_file = "{pause}"\npoll_s = 0.1\n')
    coord = _coordinator(broker.address, fleet, tmp_path, tiny_export)
    daemon = _start(cfg)
    state_db = tmp_path / "state" / DB_NAME
    try:
        assert coord.wait_for_devices(1, 60) == [DEVICE]
        rnd = _Round(coord)
        wait_for(lambda: db_rows(state_db, "SELECT value FROM meta WHERE key='last_deferred'"), 30, "the deferral")
        broker.stop()  # the broker goes away while the round is open
        pause.unlink()  # now the device may train: it does so offline
        wait_for(lambda: db_rows(state_db, "SELECT state FROM outbox") == [("pending",)], 30, "an update in the outbox")
        broker = start_mosquitto(port, conf)  # back, with its persisted sessions
        rnd.join(60)
        assert rnd.error is None and rnd.result is not None
        wait_for(lambda: db_rows(state_db, "SELECT state FROM outbox") == [("received",)], 30, "the receipt")
        watcher = _StatusWatcher(broker.address, fleet)
        wait_for(lambda: any("heartbeat" in s.detail for s in watcher.seen), 10, "a heartbeat")
        rc, out = _terminate(daemon)
        wait_for(lambda: watcher.seen and watcher.seen[-1].state == "offline", 10, "the offline status")
        watcher.stop()
    finally:
        _stop(daemon, coord)
        broker.stop()
        shutil.rmtree(persist, ignore_errors=True)
    assert rc == 0, out
    assert "deferred: paused" in out and "acknowledged" in out
    assert rnd.result.state == "closed" and rnd.result.new_version == 1
    stored = db_rows(tmp_path / "fleet.sqlite", "SELECT device_id, msg_id FROM updates")
    outbox = db_rows(state_db, "SELECT msg_id FROM outbox")
    assert stored == [(DEVICE, outbox[0][0])] and coord.duplicates == 0
    assert watcher.seen[-1].detail == "stopped"


def test_daemon_killed_after_writing_its_outbox_delivers_the_update_once_after_restart(mosquitto, tiny_export,
                                                                                      tmp_path):
    fleet = "crash"
    cfg = _device(tmp_path, mosquitto.address, fleet, tiny_export["backbone"])
    coord = _coordinator(mosquitto.address, fleet, tmp_path, tiny_export)
    state_db, fleet_db = tmp_path / "state" / DB_NAME, tmp_path / "fleet.sqlite"
    daemon = _start(cfg, FEDGE_FAILPOINT="after_outbox")
    try:
        assert coord.wait_for_devices(1, 60) == [DEVICE]
        rnd = _Round(coord)
        out, _ = daemon.communicate(timeout=60)
        assert daemon.returncode == -signal.SIGKILL, out
        assert db_rows(state_db, "SELECT round_id, state FROM outbox") == [(1, "pending")]
        assert db_rows(fleet_db, "SELECT 1 FROM updates") == []

        daemon = _start(cfg)  # restarted without the failpoint: sends the stored update on connect
        rnd.join(60)
        assert rnd.error is None and rnd.result.state == "closed" and rnd.result.new_version == 1
        wait_for(lambda: db_rows(state_db, "SELECT state FROM outbox") == [("received",)], 30, "the receipt")
        rc, out = _terminate(daemon)
        assert rc == 0, out

        # The receipt was lost this time (killed after the broker took it, before the store said so): the
        # restarted daemon sends it again, the coordinator still has exactly one copy and answers it again.
        con = sqlite3.connect(state_db)
        con.execute("UPDATE outbox SET state='sent'")
        con.commit()
        con.close()
        daemon = _start(cfg)
        wait_for(lambda: coord.duplicates == 1, 60, "the duplicate to be recognised")
        wait_for(lambda: db_rows(state_db, "SELECT state FROM outbox") == [("received",)], 30, "the second receipt")
        rc, out = _terminate(daemon)
        assert rc == 0, out
    finally:
        _stop(daemon, coord)
    stored = db_rows(fleet_db, "SELECT round_id, device_id, msg_id FROM updates")
    assert stored == [(1, DEVICE, db_rows(state_db, "SELECT msg_id FROM outbox")[0][0])]
    assert coord.duplicates == 1 and coord.receiver.rejected["replay"] == 0  # answered with a receipt again
    assert [v for (v,) in db_rows(fleet_db, "SELECT version FROM models ORDER BY version")] == [0, 1]


def _filled_store(tmp_path: Path, broker: str = "127.0.0.1:1", fleet: str = "demo") -> Path:
    """A stopped device's store with readings, an acked and a pending update and a personal head; the
    broker defaults to a port nobody listens on."""
    cfg = tmp_path / "device.toml"
    cfg.write_text(f'device_id = "{DEVICE}"\nfleet = "{fleet}"\nbroker = "{broker}"\nbackbone = "b.onnx"\n'
                   f'state_dir = "{tmp_path / "state"}"\n')
    with DeviceStore(tmp_path / "state") as s:
        s.add_samples([(1_700_000_000 + 3600 * i, float(i)) for i in range(50)], "csv:x")
        s.save_ingest_position("csv:x", s.ingest_position("csv:x").__class__(good=50, bad=3))
        s.outbox_put(4, "aaaaaaaa", "t", b"u4")
        s.outbox_mark(4, "aaaaaaaa", "acked")
        s.outbox_put(5, "bbbbbbbb", "t", b"secret-update-5")
        s.save_personal("head", {"w": np.ones(3, np.float32)})
        s.set_meta("last_round", {"round": 5, "kind": "train", "ts": time.time()})
        s.set_meta("rounds_trained", 5)
    return cfg


def test_status_reads_the_store_without_connecting(tmp_path):
    cfg = _filled_store(tmp_path)
    result = CliRunner().invoke(app, ["status", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "50 from" in out and "50 lines stored, 3 bad lines skipped" in out
    assert "1 pending, 0 sent (no ack), 1 acked" in out
    assert "personal state" in out and "head" in out and "no daemon running" in out
    assert "5 (train)" in out


def test_forget_me_asks_refuses_while_running_and_deletes_personal_state(tmp_path):
    cfg = _filled_store(tmp_path)
    runner = CliRunner()
    declined = runner.invoke(app, ["forget-me", "--config", str(cfg)], input="n\n")
    assert declined.exit_code == 1 and "nothing deleted" in declined.output
    held = lock_state_dir(tmp_path / "state")  # a daemon is running
    busy = runner.invoke(app, ["forget-me", "--config", str(cfg), "--yes"])
    held.close()
    assert busy.exit_code == 2 and "stop it first" in busy.output
    with DeviceStore(tmp_path / "state") as s:
        assert s.personal_names() == ["head"] and s.outbox_counts()["pending"] == 1

    done = runner.invoke(app, ["forget-me", "--config", str(cfg), "--yes", "--local-only"])
    assert done.exit_code == 0, done.output
    assert "deleted personal state: head" in done.output and "deleted 2 stored update(s)" in done.output
    with DeviceStore(tmp_path / "state") as s:
        assert s.personal_names() == [] and not any(s.outbox_counts().values())
        assert s.get_meta("last_round") is None and s.n_samples() == 50  # readings stay without --samples
    again = runner.invoke(app, ["forget-me", "--config", str(cfg), "--yes", "--samples"])  # no broker to tell
    assert again.exit_code == 1 and "deleted 50 stored readings" in again.output
    assert "the coordinator was not told" in again.output
    with DeviceStore(tmp_path / "state") as s:
        assert s.n_samples() == 0
    raw = (tmp_path / "state" / DB_NAME).read_bytes()
    assert b"secret-update-5" not in raw  # secure_delete + VACUUM: the deleted update is not left in free pages


def test_run_reports_a_busy_state_dir_and_a_bad_broker_address(tmp_path, tiny_export):
    cfg = _device(tmp_path, BrokerAddress("127.0.0.1", 1), "x", tiny_export["backbone"])
    held = lock_state_dir(tmp_path / "state")
    try:
        busy = CliRunner().invoke(app, ["run", "--config", str(cfg)])
    finally:
        held.close()
    assert busy.exit_code == 2 and "another fedge-edge daemon" in busy.output
    cfg.write_text(cfg.read_text().replace('broker = "127.0.0.1:1"', 'broker = "host:notaport"'))
    bad = CliRunner().invoke(app, ["run", "--config", str(cfg)])
    assert bad.exit_code == 2 and "bad broker address" in bad.output


def test_daemon_fetches_its_backbone_as_a_signed_bundle_and_switches_versions_between_rounds(
        mosquitto, tiny_export, tmp_path):
    from export.bundle import build_bundle, generate_key, publish_bundle, save_keypair

    fleet, topics = "bnd", P.Topics("bnd")
    key, forger = generate_key(), generate_key()
    pub = save_keypair(key, tmp_path / "keys" / "coordinator.key")
    publisher = make_client("bundle-publisher")
    connect(publisher, mosquitto.address)
    publish_bundle(publisher, topics, build_bundle(tiny_export["dir"], tmp_path / "b1", 1, key))
    cfg = _device(tmp_path, mosquitto.address, fleet, tiny_export["backbone"],
                  f'profile = "pi4"\n[bundle]\ndir = "{tmp_path / "bundles"}"\npublic_key = "{pub}"\n')
    cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if not line.startswith("backbone =")))
    coord = _coordinator(mosquitto.address, fleet, tmp_path, tiny_export)
    daemon = _start(cfg)  # no backbone file: it must wait for the signed bundle
    state_db, current = tmp_path / "state" / DB_NAME, tmp_path / "bundles" / "current"
    try:
        assert coord.wait_for_devices(1, 60) == [DEVICE]
        assert coord.run_round("train").state == "closed"
        assert db_rows(state_db, "SELECT value FROM meta WHERE key='bundle_version'") == [("1",)]

        publish_bundle(publisher, topics, build_bundle(tiny_export["dir"], tmp_path / "b2", 2, key))
        wait_for(lambda: current.exists() and current.read_text().strip() == "2", 30, "bundle v2 installed")
        assert coord.run_round("train").state == "closed"  # the device switched before training
        assert db_rows(state_db, "SELECT value FROM meta WHERE key='bundle_version'") == [("2",)]

        publish_bundle(publisher, topics, build_bundle(tiny_export["dir"], tmp_path / "b3", 3, forger))
        time.sleep(1.0)  # give the forged manifest time to arrive (and be refused)
        rc, out = _terminate(daemon)
    finally:
        _stop(daemon, coord)
        publisher.disconnect()
        publisher.loop_stop()
    assert rc == 0, out
    assert "switching to bundle v2" in out and "rejected: bad_signature" in out
    assert current.read_text().strip() == "2" and not (tmp_path / "bundles" / "versions" / "3").exists()
    status = CliRunner().invoke(app, ["status", "--config", str(cfg)])
    assert "current v2, previous v1" in status.output


def test_forget_me_reaches_the_coordinator_which_deletes_the_devices_records(mosquitto, tiny_export, tmp_path):
    """Over a real broker: the coordinator deletes the device's stored updates and registration, an open
    round stops counting it, the retained hello is cleared, and other devices' records stay."""
    fleet = "forget"
    coord = _coordinator(mosquitto.address, fleet, tmp_path, tiny_export)
    try:
        for dev in (DEVICE, "meter-8"):
            coord.state.upsert_device(dev, domain="energy", profile="pi4", runtime="onnxruntime", n_train=10)
            coord.state.add_update(1, dev, f"id-{dev}", 10, b"payload")
        pub = make_client("hello-publisher")
        connect(pub, mosquitto.address, persistent=False)
        hello = P.Hello(fleet=fleet, device_id=DEVICE, runtime="onnxruntime", n_train=10, n_eval=2)
        pub.publish(P.Topics(fleet).hello(DEVICE), P.encode(hello), qos=1, retain=True).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        cfg = _filled_store(tmp_path, f"{mosquitto.address.host}:{mosquitto.address.port}", fleet)
        done = CliRunner().invoke(app, ["forget-me", "--config", str(cfg), "--yes"])
        assert done.exit_code == 0, done.output
        assert "asked the coordinator of fleet forget" in done.output
        wait_for(lambda: not coord.state.has_device(DEVICE), 10, "the coordinator to forget the device")
        assert coord.state.reported(1) == {"meter-8"} and coord.state.has_device("meter-8")
        assert coord.receiver.rejected.total() == 0  # the cleared retained hello is not a bad message
    finally:
        coord.stop()
    retained: list[bytes] = []
    sub = make_client("retained-reader")
    sub.on_message = lambda c, u, m: retained.append(m.payload)
    connect(sub, mosquitto.address, persistent=False)
    sub.subscribe(P.Topics(fleet).hello(DEVICE), 1)
    time.sleep(0.5)
    sub.disconnect()
    sub.loop_stop()
    assert retained == []  # nothing retained any more for this device


def test_device_toml_personalize_table_runs_gate_consistency_and_rules_in_the_daemon(mosquitto, tiny_export,
                                                                                     tmp_path):
    """A `[personalize]` table in device.toml switches the device methods on in the daemon even when the round
    does not ask; the round's metrics show the gate, the rule guards and the fallback decision."""
    fleet = "ptable"
    cfg = _device(tmp_path, mosquitto.address, fleet, tiny_export["backbone"],
                  extra="[personalize]\nrank = 2\ngate = true\nrules = true\nconsistency = 0.1\nepochs = 2\n")
    coord = _coordinator(mosquitto.address, fleet, tmp_path, tiny_export)
    (result,) = _daemon_rounds(cfg, coord, 1)
    m = result.metrics[DEVICE]
    assert {"gate_c", "rule_hit_rate", "personal_fallback", "personal_mse"} <= set(m), m
    assert m["personal_fallback"] == 1.0 or m["val_personal_mse"] < m["val_global_mse"]


def test_device_toml_repair_and_track_combination_run_in_the_daemon_on_a_faulty_meter(mosquitto, tiny_export,
                                                                                      tmp_path):
    """`repair`, the track record's combination and the Huber loss from device.toml run in the daemon over the real
    broker: the learner is rebuilt from the repaired record (the stuck run and the spikes imputed), and the second
    round reports the combination's weights."""
    fleet = "repair"
    cfg = _device(tmp_path, mosquitto.address, fleet, tiny_export["backbone"], faults=True,
                  extra="[personalize]\nrank = 2\nrepair = true\ntrack_record = 0.5\ntrack_combine = true\n"
                        "naive_prior = true\nhuber = 0.5\nepochs = 2\n")
    coord = _coordinator(mosquitto.address, fleet, tmp_path, tiny_export)
    _, second = _daemon_rounds(cfg, coord, 2)
    m = second.metrics[DEVICE]
    assert m["repair_imputed"] > 0, m  # contexts holding the frozen stretch or a spike were repaired
    weights = {k: v for k, v in m.items() if k.startswith("track_w_")}
    assert set(weights) <= {"track_w_global", "track_w_prior", "track_w_personal", "track_w_naive"}
    assert sum(weights.values()) == pytest.approx(1.0) and np.isfinite(m["personal_mse"])


def test_device_toml_refuses_unknown_or_mistyped_personalize_options(tmp_path):
    from edge_client.daemon.config import DeviceConfig

    for table, why in (("telepathy = 1", "unknown option"), ("gate = 0.5", "gate must be true/false")):
        cfg = _device(tmp_path, BrokerAddress.parse("127.0.0.1:1"), "bad", tmp_path / "b.onnx",
                      extra=f"[personalize]\n{table}\n")
        with pytest.raises(ValueError, match=why):
            DeviceConfig.from_toml(cfg)


def test_personal_model_survives_a_daemon_restart_on_the_same_backbone_only(mosquitto, tiny_export, tmp_path):
    """The personal model (next round's self-distillation teacher, and the head the device forecasts with) is
    stored once, in the learning state, after a personalised round and comes back after a restart; on another
    backbone it is not reused."""
    from edge_client.daemon.config import DeviceConfig
    from edge_client.daemon.service import PERSONAL_STATE, DeviceService
    from edge_client.learning import state as LS

    fleet = "personal"
    cfg = _device(tmp_path, mosquitto.address, fleet, tiny_export["backbone"])
    coord = _coordinator(mosquitto.address, fleet, tmp_path, tiny_export,
                         personalize=(("rank", 2.0), ("self_distill", 0.5)))
    _daemon_rounds(cfg, coord, 1)
    with DeviceStore(tmp_path / "state") as store:
        assert store.personal_names() == [PERSONAL_STATE]  # the head is the model's: not stored twice

    device = DeviceConfig.from_toml(cfg)
    service = DeviceService(device, BrokerAddress.parse(device.broker))  # the daemon, restarted
    try:
        service.runner = service.load_backbone()
        blob = service.store.load_personal_blob(PERSONAL_STATE)
        saved = LS.decode_learner_state(blob, service.head_spec()).personal_model
        assert saved is not None and saved.trained_at_day is not None
        service.learner = service.build_learner()
        teacher = service.learner.personal_model
        assert teacher is not None and set(teacher.params) == set(saved.params)
        assert teacher.trained_at_day == saved.trained_at_day
        for k, v in saved.params.items():
            np.testing.assert_array_equal(teacher.params[k], v)
        head = service.personal_head_from_store()
        assert head is not None and all(np.array_equal(head[k], v) for k, v in saved.params.items())
        service.learner = None
        service.runner = type(service.runner)(tiny_export["backbone"])
        service.runner.sha256 = "0" * 64  # as if another backbone had been installed
        assert service.build_learner().personal_model is None
    finally:
        service.close()


def _twin(tmp_path: Path, broker: BrokerAddress, fleet: str, backbone: Path, name: str, extra: str) -> Path:
    """A device config like _device's (same readings) with its own id and state directory."""
    (tmp_path / name).mkdir()
    cfg = _device(tmp_path / name, broker, fleet, backbone, extra)
    cfg.write_text(cfg.read_text().replace(f'device_id = "{DEVICE}"', f'device_id = "{name}"'))
    return cfg


def _sent(state_dir: Path, round_id: int) -> P.Update:
    with DeviceStore(state_dir) as store:
        entry = store.outbox_for_round(round_id)
    assert entry is not None, f"no update for round {round_id} in {state_dir}"
    return P.decode(entry.payload)


def test_learning_state_survives_a_daemon_restart_mid_fleet(mosquitto, tiny_export, tmp_path):
    """Two devices with the same readings and settings (gate, rule guards, track record, top-k uploads with error
    feedback) answer two rounds; one is restarted; the third round's uploads and metrics are still identical, so the
    restarted one came back with the same prior, served predictor, track record and top-k residual. Before the
    learning state was stored, the restart dropped all of them (the residual alone changes the upload)."""
    from edge_client.daemon.service import PERSONAL_STATE
    from edge_client.learning import state as LS

    fleet, table = "restart", "[personalize]\nrank = 2\ngate = true\nrules = true\ntrack_record = 0.5\n"
    cfgs = {n: _twin(tmp_path, mosquitto.address, fleet, tiny_export["backbone"], n, table) for n in ("dev-a", "dev-b")}
    coord = _coordinator(mosquitto.address, fleet, tmp_path, tiny_export, upload_dtype="topk")
    procs = {n: _start(c) for n, c in cfgs.items()}
    try:
        assert sorted(coord.wait_for_devices(2, 60)) == sorted(cfgs)
        for _ in range(2):
            assert coord.run_round("train", devices=sorted(cfgs)).state == "closed"
        rc, out = _terminate(procs["dev-b"])
        assert rc == 0, out

        def state(name: str) -> LS.LearnerState:  # the stored learning state (dev-a's daemon still runs)
            from edge_client.runtime.backbone import BackboneRunner

            runner = BackboneRunner(tiny_export["backbone"])
            spec = LS.HeadSpec(runner.sha256, runner.spec.feature_dim, 24, len(runner.spec.quantiles))
            with DeviceStore(tmp_path / name / "state") as store:
                return LS.decode_learner_state(store.load_personal_blob(PERSONAL_STATE), spec)

        a, b = state("dev-a"), state("dev-b")
        assert a.served is not None and a.served.gate is not None and a.served.guard is not None
        assert a.track is not None and a.track.counts and a.upload_residual is not None and a.prior is not None
        assert (a.track.scores, a.track.counts) == (b.track.scores, b.track.counts)
        pairs = ((a.upload_residual, b.upload_residual), (a.prior, b.prior), (a.served.personal, b.served.personal))
        for x, y in pairs:
            assert all(np.array_equal(x[k], y[k]) for k in x)
        procs["dev-b"] = _start(cfgs["dev-b"])  # the restart
        assert coord.run_round("train", devices=sorted(cfgs)).state == "closed"
        for n in cfgs:
            rc, out = _terminate(procs[n])
            assert rc == 0, out
            if n == "dev-b":
                assert "learning state restored: personal_model, prior, served, last_served, track, upload_residual" \
                    in out, out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        coord.stop()
    ua, ub = _sent(tmp_path / "dev-a" / "state", 3), _sent(tmp_path / "dev-b" / "state", 3)
    assert ua.metrics == ub.metrics and ua.packed is not None and ub.packed is not None
    for k, pa in ua.packed.items():
        pb = ub.packed[k]
        assert pa.scale == pb.scale and np.array_equal(pa.values, pb.values) and np.array_equal(pa.index, pb.index)
    a, b = state("dev-a"), state("dev-b")
    assert all(np.array_equal(a.upload_residual[k], b.upload_residual[k]) for k in a.upload_residual)


def test_a_corrupt_learning_state_is_refused_and_the_device_starts_fresh_with_its_outbox(tiny_export, tmp_path,
                                                                                          caplog):
    """A damaged learning state (bits flipped on the SD card, a store from a future version) is refused with a log
    line saying why; the device starts with a fresh state and its unsent update stays in the outbox."""
    from edge_client.daemon.config import DeviceConfig
    from edge_client.daemon.service import PERSONAL_STATE, DeviceService

    cfg = DeviceConfig.from_toml(_device(tmp_path, BrokerAddress.parse("127.0.0.1:1"), "corrupt",
                                         tiny_export["backbone"]))
    with DeviceStore(tmp_path / "state") as store:
        store.outbox_put(4, "m-4", "fedge/corrupt/updates/4/meter-7", b"stored update")
        store.save_personal_blob(PERSONAL_STATE, b"PK\x03\x04 not really a zip")
    service = DeviceService(cfg, BrokerAddress.parse(cfg.broker))
    try:
        service.runner = service.load_backbone()
        service.start_ingest()
        with caplog.at_level("ERROR", logger="fedge.service"):
            learner = service.build_learner()
        assert learner is not None and learner.personal_model is None and learner.upload_residual is None
        assert learner.track is None and learner.prior is None and learner.served is None
        assert "stored learning state refused, starting fresh" in caplog.text and "not a readable" in caplog.text
        assert [(e.round_id, e.payload) for e in service.store.outbox_unsettled()] == [(4, b"stored update")]
        caplog.clear()
        with caplog.at_level("INFO", logger="fedge.service"):
            for _ in range(3):  # a device waiting for data rereads the same state at every build attempt
                service.stored_state()
        assert "stored learning state refused" not in caplog.text  # said once per stored state, not per attempt
    finally:
        service.close()
