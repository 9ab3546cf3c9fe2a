"""paho-mqtt set-up shared by devices and coordinator: MQTT v5, QoS 1, persistent sessions.

Persistent sessions (clean_start=False plus a session expiry) are what make restarts lossless:
while a subscriber is away the broker keeps its subscriptions and queues QoS 1 messages for it,
and delivers them when the same client id reconnects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("fedge.mqtt")


@dataclass(frozen=True)
class BrokerAddress:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    keepalive: int = 30

    @classmethod
    def parse(cls, text: str) -> BrokerAddress:
        """'host', 'host:port' or 'mqtt://host:port'."""
        text = text.removeprefix("mqtt://")
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
        try:
            return cls(host or "127.0.0.1", int(port))
        except ValueError:
            raise ValueError(f"bad broker address {text!r}; expected host:port") from None


def make_client(
    client_id: str,
    *,
    will: tuple[str, bytes] | None = None,
) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_queued_messages_set(10_000)
    return client


def _connect_props(persistent: bool, session_expiry_s: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s if persistent else 0
    return props


def connect(
    client: mqtt.Client,
    broker: BrokerAddress,
    *,
    persistent: bool = True,
    session_expiry_s: int = 24 * 3600,
    timeout_s: float = 10.0,
    wait: bool = True,
) -> None:
    """Connect and start paho's network thread; raise ConnectionError if the broker does not
    accept us within `timeout_s`. paho keeps reconnecting on its own after that (exponential
    backoff, see make_client). ``wait=False`` (a daemon that must outlive a broker that is down
    at boot) returns at once and lets paho's thread retry the first connection too."""
    if not wait:
        if broker.username:
            client.username_pw_set(broker.username, broker.password)
        client.connect_async(broker.host, broker.port, keepalive=broker.keepalive, clean_start=not persistent,
                             properties=_connect_props(persistent, session_expiry_s))
        client.loop_start()
        return
    connected = threading.Event()
    failure: list[str] = []
    user_on_connect = client.on_connect

    def on_connect(c, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            failure.append(str(reason_code))
        connected.set()
        if user_on_connect is not None:
            user_on_connect(c, userdata, flags, reason_code, properties)

    client.on_connect = on_connect
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    try:
        client.connect(broker.host, broker.port, keepalive=broker.keepalive, clean_start=not persistent,
                       properties=_connect_props(persistent, session_expiry_s))
    except OSError as exc:
        raise ConnectionError(f"cannot reach MQTT broker at {broker.host}:{broker.port}: {exc}") from None
    client.loop_start()
    if not connected.wait(timeout_s) or failure:
        client.loop_stop()
        raise ConnectionError(f"MQTT broker {broker.host}:{broker.port} refused or timed out: {failure or 'timeout'}")


def publish(
    client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False, expiry_s: int | None = None
) -> mqtt.MQTTMessageInfo:
    """QoS 1 publish; message expiry keeps stale tasks from reaching a device days later. While
    disconnected, paho queues the message and sends it after reconnecting."""
    props = None
    if expiry_s is not None:
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = int(expiry_s)
    info = client.publish(topic, payload, qos=1, retain=retain, properties=props)
    if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
        log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
    return info


def acknowledged(infos: Iterable[mqtt.MQTTMessageInfo], timeout_s: float) -> bool:
    """Wait, within one deadline for all of them, until the broker has acknowledged every QoS 1
    message; False if one is still unacknowledged then (paho raises RuntimeError for a message it
    could not queue)."""
    deadline = time.monotonic() + timeout_s
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        if not info.is_published():
            return False
    return True
