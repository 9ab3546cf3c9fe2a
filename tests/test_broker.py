"""The demo's brokers: a private Mosquitto, and the embedded rumqttd fallback speaking MQTT v5
with payloads far above its 20 KB default."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.fleet.broker import start_embedded, start_mosquitto
from edge_client.wire.mqtt import BrokerAddress, connect, make_client, publish


def _echo_through(address: BrokerAddress, payload: bytes) -> bytes:
    got: list[bytes] = []
    done = threading.Event()
    sub = make_client("echo-sub")
    sub.on_message = lambda c, u, m: (got.append(m.payload), done.set())
    connect(sub, address, persistent=False)
    sub.subscribe("fedge/v1/echo/x", qos=1)
    pub = make_client("echo-pub")
    connect(pub, address, persistent=False)
    time.sleep(0.3)
    publish(pub, "fedge/v1/echo/x", payload).wait_for_publish(10)
    assert done.wait(10), "message not delivered"
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()
    return got[0]


@pytest.mark.broker
def test_private_mosquitto_carries_large_payloads() -> None:
    with start_mosquitto() as broker:
        payload = bytes(range(256)) * 800  # 200 KB
        assert _echo_through(broker.address, payload) == payload


@pytest.mark.broker
def test_embedded_broker_speaks_v5_with_large_payloads() -> None:
    pytest.importorskip("iotcore", reason="the embedded broker wheel is part of the coordinator extra")
    with start_embedded() as broker:
        assert broker.kind == "iotcore"
        payload = b"\x01" * 200_000
        assert _echo_through(broker.address, payload) == payload


def test_unreachable_broker_gives_a_clear_error() -> None:
    from coordinator.fleet.broker import free_port

    with pytest.raises(ConnectionError, match="cannot reach MQTT broker"):
        connect(make_client("nobody"), BrokerAddress("127.0.0.1", free_port()), timeout_s=2)


def test_broker_address_parsing() -> None:
    assert BrokerAddress.parse("mqtt://10.0.0.2:1884") == BrokerAddress("10.0.0.2", 1884)
    assert BrokerAddress.parse("broker.local").port == 1883
    with pytest.raises(ValueError, match="bad broker address"):
        BrokerAddress.parse("host:notaport")


@pytest.mark.broker
def test_mqtt311_address_and_a_persistent_311_session_gets_what_was_published_while_away(mosquitto) -> None:
    """MQTT 3.1.1 mode (`mqtt3://`): the session is persistent (clean session off, set when the client is made),
    so a QoS 1 message published while the subscriber is away is delivered when it returns; the v5-only message
    expiry is left out of the publish instead of failing it."""
    addr = BrokerAddress.parse(f"mqtt3://127.0.0.1:{mosquitto.address.port}")
    assert addr.mqtt311 and str(addr) == f"mqtt3://127.0.0.1:{mosquitto.address.port}"
    got = threading.Event()
    sub = make_client("sub-311", mqtt311=True)
    sub.on_message = lambda c, u, m: got.set() if m.payload == b"while-away" else None
    connect(sub, addr)
    sub.subscribe("fedge/t311", qos=1)
    time.sleep(0.5)  # the SUBACK
    sub.disconnect()
    sub.loop_stop()
    pub = make_client("pub-311", mqtt311=True, persistent=False)
    connect(pub, addr, persistent=False)
    publish(pub, "fedge/t311", b"while-away", expiry_s=60).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    sub2 = make_client("sub-311", mqtt311=True)
    sub2.on_message = sub.on_message
    connect(sub2, addr)
    try:
        assert got.wait(10), "the persistent 3.1.1 session did not deliver the queued message"
    finally:
        sub2.disconnect()
        sub2.loop_stop()
