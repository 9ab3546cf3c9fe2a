"""Issue #11: the attacks found against fedge, each run again against a real Mosquitto with TLS, client certificates
and the ACL `fedge broker config` writes (a private broker per test), with a coordinator holding the fleet's
registry. docs/security.md has the table of attacks with their results before and after."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from coordinator.fleet.broker import start_secure_mosquitto
from coordinator.fleet.pki import FleetPKI, coordinator_name
from coordinator.fleet.registry import DeviceRegistry
from coordinator.fleet.server import FleetConfig, FleetCoordinator
from coordinator.fleet.state import FleetState
from edge_client import wire as P
from edge_client.identity import Identity
from edge_client.wire.mqtt import BrokerAddress, connect, make_client, publish
from tests.waiting import wait_for

pytestmark = pytest.mark.broker
FLEET = "secure"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> FleetPKI:
    pki = FleetPKI(tmp_path_factory.mktemp("fleet"))
    pki.init(FLEET)
    for device in ("dev-1", "dev-2", "dev-3", "dev-4"):
        pki.enroll(device, max_samples=500)
    return pki


@pytest.fixture
def fleet(pki, tmp_path, request):
    """A secured broker and a coordinator; a test that asks for `fleet_db` gets its state there (both backends)."""
    db = request.getfixturevalue("fleet_db") if "fleet_db" in request.fixturenames else tmp_path / "fleet.sqlite"
    broker = start_secure_mosquitto(pki.root)
    coord = FleetCoordinator(FleetConfig(fleet=FLEET, deadline_s=20), broker.address,
                             FleetState(db), registry=DeviceRegistry(pki.root)).start()
    coord.ensure_model({"w": np.zeros(4, np.float32)})
    yield pki, broker, coord
    coord.stop()
    broker.stop()


class Raw:
    """A paho client with some fleet identity (or none), recording what it receives and its PUBACK codes."""

    def __init__(self, broker: BrokerAddress, pki: FleetPKI | None, name: str | None, client_id: str = "raw") -> None:
        self.inbox: list[tuple[str, bytes]] = []
        self.client = make_client(client_id)
        self.client.on_message = lambda c, u, m: self.inbox.append((m.topic, m.payload))
        address = BrokerAddress(broker.host, broker.port, tls=True, ca_file=str(pki.root / "ca.crt") if pki else None)
        if name is not None:
            d = pki.root / "enroll" / name
            address = address.with_identity(pki.root / "ca.crt", d / f"{name}.crt", d / f"{name}.key")
        connect(self.client, address, persistent=False)
        self.identity = Identity.load(pki.root / "enroll" / name, name) if name else None

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """The broker's PUBACK reason code (0 accepted, 135 not authorised)."""
        codes: list[int] = []
        done = threading.Event()

        def on_publish(c, u, mid, reason_code, props) -> None:
            codes.append(reason_code.value)
            done.set()

        self.client.on_publish = on_publish
        publish(self.client, topic, payload, retain=retain)
        assert done.wait(10), "no PUBACK"
        return codes[0]

    def signed(self, msg: P.Message) -> bytes:
        return P.encode(P.sign(msg, self.identity.key))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _hello(d: str) -> P.Hello:
    return P.Hello(fleet=FLEET, device_id=d, runtime="test", n_train=10, n_eval=2)


def test_no_certificate_no_connection(fleet) -> None:
    pki, broker, _ = fleet
    with pytest.raises(ConnectionError):  # TLS with the CA but no client certificate
        Raw(broker.address, pki, None)
    plain = make_client("anonymous")
    with pytest.raises(ConnectionError):  # no TLS at all
        connect(plain, BrokerAddress(broker.address.host, broker.address.port), persistent=False, timeout_s=3)


def test_a_device_reads_only_its_own_tasks_and_the_fleets_models(fleet) -> None:
    pki, broker, coord = fleet
    spy = Raw(broker.address, pki, "dev-2", "spy")
    spy.client.subscribe(f"fedge/v1/{FLEET}/#", qos=1)
    dev1 = Raw(broker.address, pki, "dev-1", "dev-1")
    assert dev1.publish(P.Topics(FLEET).hello("dev-1"), dev1.signed(_hello("dev-1"))) == 0
    wait_for(lambda: coord.state.has_device("dev-1"))
    coord.publish_global(0, {"w": np.zeros(4, np.float32)})
    coord._send(P.Topics(FLEET).task("dev-1"), P.Reject(fleet=FLEET, device_id="dev-1", ref_msg_id="x" * 8,
                                                         reason="test"))
    time.sleep(1.0)
    topics = {t for t, _ in spy.inbox}
    assert topics == {P.Topics(FLEET).global_model("tsfm")}, topics  # not dev-1's hello, not dev-1's task
    spy.stop()
    dev1.stop()


def test_a_device_cannot_publish_as_another_device(fleet) -> None:
    pki, broker, _ = fleet
    evil = Raw(broker.address, pki, "dev-2", "dev-2")
    topics = P.Topics(FLEET)
    forged = P.Update(fleet=FLEET, device_id="dev-1", round_id=1, base_version=0, n_samples=1 << 30,
                      delta={"w": np.ones(4, np.float16)})
    assert evil.publish(topics.update(1, "dev-1"), evil.signed(forged)) == 135  # the ACL says no
    assert evil.publish(topics.forget("dev-1"), evil.signed(P.Forget(fleet=FLEET, device_id="dev-1"))) == 135
    assert evil.publish(topics.status("dev-1"), b"x") == 135
    assert evil.publish(topics.global_model("tsfm"), b"x", retain=True) == 135
    assert evil.publish(topics.task("dev-1"), b"x") == 135
    evil.stop()


def test_nobody_else_can_take_the_coordinators_client_id(fleet) -> None:
    pki, broker, coord = fleet
    drops: list[object] = []
    coord.client.on_disconnect = lambda *args: drops.append(args)
    thief = Raw(broker.address, pki, "dev-3", coordinator_name(FLEET))  # the broker names it dev-3 instead
    time.sleep(1.5)
    assert drops == [] and coord.client.is_connected()  # a takeover would have cut the coordinator's connection
    thief.stop()


def test_messages_need_the_senders_signature_even_on_its_own_topic(fleet) -> None:
    """Defence in depth: what the broker lets dev-1 publish, the coordinator still checks is signed by dev-1."""
    pki, broker, coord = fleet
    dev1 = Raw(broker.address, pki, "dev-1", "dev-1")
    topics = P.Topics(FLEET)
    assert dev1.publish(topics.hello("dev-1"), P.encode(_hello("dev-1"))) == 0  # unsigned
    other = Identity.load(pki.root / "enroll" / "dev-2", "dev-2")
    assert dev1.publish(topics.hello("dev-1"), P.encode(P.sign(_hello("dev-1"), other.key))) == 0  # dev-2's key
    wait_for(lambda: coord.receiver.rejected["unsigned"] == 1 and coord.receiver.rejected["bad_signature"] == 1)
    assert not coord.state.has_device("dev-1")
    status = P.Status(fleet=FLEET, device_id="dev-1", state="online")
    assert dev1.publish(topics.status("dev-1"), dev1.signed(status)) == 0  # a status alone registers nobody
    time.sleep(0.5)
    assert not coord.state.has_device("dev-1")
    dev1.stop()


def test_a_replayed_forget_is_refused_even_after_a_coordinator_restart(fleet_db, fleet) -> None:
    """The replay memory is in the fleet database, SQLite or PostgreSQL, not in the process."""
    pki, broker, coord = fleet
    dev1 = Raw(broker.address, pki, "dev-1", "dev-1")
    topics = P.Topics(FLEET)
    dev1.publish(topics.hello("dev-1"), dev1.signed(_hello("dev-1")))
    wait_for(lambda: coord.state.has_device("dev-1"))
    forget = dev1.signed(P.Forget(fleet=FLEET, device_id="dev-1"))
    dev1.publish(topics.forget("dev-1"), forget)
    wait_for(lambda: not coord.state.has_device("dev-1"))
    coord.stop()
    coord.state.close()
    again = FleetCoordinator(FleetConfig(fleet=FLEET), broker.address, FleetState(fleet_db),
                             registry=DeviceRegistry(pki.root)).start()
    try:
        dev1.publish(topics.hello("dev-1"), dev1.signed(_hello("dev-1")))
        wait_for(lambda: again.state.has_device("dev-1"))
        dev1.publish(topics.forget("dev-1"), forget)  # the same bytes
        wait_for(lambda: again.receiver.rejected["replay"] == 1)
        assert again.state.has_device("dev-1")
    finally:
        again.stop()
        coord.start = lambda: None  # the fixture stops `coord` again: harmless
    dev1.stop()


def test_an_inflated_sample_count_is_capped_at_what_the_device_declared(fleet) -> None:
    _, _, coord = fleet
    assert coord.sample_cap("dev-1") == 500


def test_revocation_reaches_the_broker_and_the_coordinator_without_a_restart(fleet) -> None:
    pki, broker, coord = fleet
    dev4 = Raw(broker.address, pki, "dev-4", "dev-4")
    topics = P.Topics(FLEET)
    assert dev4.publish(topics.hello("dev-4"), dev4.signed(_hello("dev-4"))) == 0
    wait_for(lambda: coord.state.has_device("dev-4"))
    assert pki.revoke("dev-4", broker.workdir / "mosquitto.pid")  # CRL + ACL rewritten, broker told (SIGHUP)
    time.sleep(1.0)
    assert dev4.publish(topics.hello("dev-4"), dev4.signed(_hello("dev-4"))) == 135  # its open connection
    dev4.stop()
    with pytest.raises(ConnectionError):  # and any new one
        Raw(broker.address, pki, "dev-4", "dev-4")
    with pytest.raises(P.Revoked):  # the coordinator reads the folder again: no restart either
        coord.registry.device("dev-4")


def test_a_device_obeys_only_the_coordinators_signature(fleet, tiny_export) -> None:
    """Unsigned or foreign-signed global models and tasks are refused, and a flood of tasks waiting for a global
    head cannot grow the device's memory."""
    from coordinator.fleet.simulation import carve_devices, start_devices

    pki, broker, coord = fleet
    sim = carve_devices(1, seed=3)[0]
    identity = Identity.load(pki.root / "enroll" / "dev-1", "dev-1")
    address = broker.address.with_identity(identity.ca_file, identity.cert_file, identity.key_file)
    sim = type(sim)("dev-1", sim.source, sim.domain)
    (client,) = start_devices([sim], tiny_export["backbone"], address, FLEET, horizon=24, identities=[identity])
    try:
        wait_for(lambda: coord.state.has_device("dev-1"))
        forged_model = P.GlobalModel(fleet=FLEET, version=(1 << 53) - 1, params={"w": np.zeros(4, np.float32)})
        coord.client.publish(P.Topics(FLEET).global_model("tsfm"), P.encode(forged_model), qos=1)  # unsigned
        for v in range(400):
            task = P.RoundTask(fleet=FLEET, device_id="dev-1", round_id=v + 1, model_version=10_000 + v,
                               deadline_ts=time.time() + 60)
            coord.client.publish(P.Topics(FLEET).task("dev-1"), P.encode(task), qos=1)
        wait_for(lambda: client.receiver.rejected["unsigned"] >= 401, 30, "every forged message to be refused")
        assert not client.global_models and not client._pending
        signed_tasks = [P.RoundTask(fleet=FLEET, device_id="dev-1", round_id=v + 1, model_version=10_000 + v,
                                    deadline_ts=time.time() + 60, round_opened=float(v)) for v in range(50)]
        for task in signed_tasks:  # even genuine ones waiting for a head are bounded
            coord._send(P.Topics(FLEET).task("dev-1"), task)
        wait_for(lambda: client.receiver.accepted["task"] == 50, 30, "the signed tasks")
        assert len(client._pending) <= 4
    finally:
        client.stop()


def test_fleet_and_broker_commands_write_what_a_deployment_needs(tmp_path) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app

    run = CliRunner()
    d = tmp_path / "fleet"
    assert run.invoke(app, ["fleet", "init", "--fleet", "plant-7", "--dir", str(d), "--host", "mqtt.example"]
                      ).exit_code == 0
    assert run.invoke(app, ["fleet", "init", "--fleet", "plant-7", "--dir", str(d)]).exit_code == 2  # never twice
    assert run.invoke(app, ["fleet", "enroll", "meter-17", "--dir", str(d), "--max-samples", "800"]).exit_code == 0
    assert run.invoke(app, ["fleet", "enroll", "../evil", "--dir", str(d)]).exit_code == 2
    identity = Identity.load(d / "enroll" / "meter-17", "meter-17")
    assert DeviceRegistry(d).device("meter-17").max_samples == 800
    assert identity.coordinator_key.public_bytes_raw() == DeviceRegistry(d).coordinator_key().public_key() \
        .public_bytes_raw()
    result = run.invoke(app, ["broker", "config", "--dir", str(d), "--out", str(tmp_path / "broker"), "--devices",
                              "200"])
    assert result.exit_code == 0, result.output
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false", "persistence true", "max_queued_messages 1600"):
        assert line in conf
    assert "pattern write fedge/v1/plant-7/rounds/+/updates/%u" in (tmp_path / "broker" / "acl").read_text()
    assert run.invoke(app, ["fleet", "revoke", "meter-17", "--dir", str(d), "--broker-pid",
                            str(tmp_path / "broker" / "mosquitto.pid")]).exit_code == 0
    assert "user meter-17\ntopic deny #" in (tmp_path / "broker" / "acl").read_text()
    with pytest.raises(P.Revoked):
        DeviceRegistry(d).device("meter-17")


def test_a_secure_round_in_a_fleet_with_identities_signs_checks_and_sums(pki, tiny_export, tmp_path) -> None:
    """SecAgg+ behind TLS, the broker's ACL and signed messages: devices publish on their own secagg topics, the
    coordinator checks each device's key signature against the registry, each device checks its neighbours' keys
    against their certificates, and the round closes with the mean of what the devices masked."""
    import dataclasses

    from coordinator.fleet.simulation import carve_devices, start_devices
    from edge_client.learning.head import slice_head
    from edge_client.secagg.masking import to_vector

    names = ["dev-1", "dev-2", "dev-3"]
    broker = start_secure_mosquitto(pki.root)
    coord = FleetCoordinator(FleetConfig(fleet=FLEET, deadline_s=60, local_epochs=1, min_devices=3, secagg=True,
                                         secagg_stage_s=10), broker.address, FleetState(tmp_path / "f.sqlite"),
                             registry=DeviceRegistry(pki.root)).start()
    sims = [dataclasses.replace(s, device_id=n) for s, n in zip(carve_devices(3, seed=3), names, strict=True)]
    clients = []
    try:
        coord.ensure_model(slice_head(tiny_export["model"].head_state(), 24))
        clients = start_devices(sims, tiny_export["backbone"], broker.address, FLEET, horizon=24,
                                identities=[Identity.load(pki.root / "enroll" / n, n) for n in names])
        sent = {}
        for c in clients:
            start = c.secure.start
            c.secure.start = lambda task, update, start=start, d=c.device_id: (
                sent.__setitem__(d, to_vector(update.delta)), start(task, update))
        assert len(coord.wait_for_devices(3, 20)) == 3
        _, base = coord.current_model()
        res = coord.run_round("train")
        assert res.state == "closed" and sorted(res.metrics) == names
        assert not any(c.receiver.rejected for c in clients) and not coord.receiver.rejected
        _, new = coord.current_model()
        mean = sum(np.clip(v, -0.5, 0.5) for v in sent.values()) / 3
        np.testing.assert_allclose(to_vector(new) - to_vector(base), mean, atol=1e-6)
    finally:
        for c in clients:
            c.stop()
        coord.stop()
        broker.stop()
