"""paho-mqtt set-up shared by devices and coordinator: MQTT v5, QoS 1, persistent sessions.

Persistent sessions (clean_start=False plus a session expiry) are what make restarts lossless:
while a subscriber is away the broker keeps its subscriptions and queues QoS 1 messages for it,
and delivers them when the same client id reconnects.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

if TYPE_CHECKING:
    from edge_client.wire.mqtt_loop import NetworkLoop

log = logging.getLogger("fedge.mqtt")


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to prove who we are to it: ``mqtt://`` plain (a loopback demo), ``mqtts://`` TLS
    with the fleet CA, and with a client certificate and key (``with_identity``) the broker's ACL knows us by the
    certificate's common name. ``user:pass@`` credentials are kept for brokers that use passwords."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mqtt311: bool = False  # speak MQTT 3.1.1 (brokers without v5, e.g. NATS); docs/scale.md says what is lost

    @classmethod
    def parse(cls, text: str) -> BrokerAddress:
        """'host', 'host:port', 'mqtt://[user:pass@]host:port', 'mqtts://…' (TLS, default port 8883) or 'mqtt3://…'
        (MQTT 3.1.1 instead of v5)."""
        tls, mqtt311 = text.startswith("mqtts://"), text.startswith("mqtt3://")
        rest = text.removeprefix("mqtts://").removeprefix("mqtt://").removeprefix("mqtt3://")
        creds, _, hostport = rest.rpartition("@")
        user, _, password = creds.partition(":")
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "8883" if tls else "1883")
        try:
            return cls(host or "127.0.0.1", int(port), user or None, password or None, tls=tls, mqtt311=mqtt311)
        except ValueError:
            raise ValueError(f"bad broker address {text!r}; expected [mqtt[s]://][user:pass@]host:port") from None

    def with_identity(self, ca_file: str | Path, cert_file: str | Path, key_file: str | Path) -> BrokerAddress:
        """TLS with the fleet CA and this client certificate (the broker's ACL username)."""
        return replace(self, tls=True, ca_file=str(ca_file), cert_file=str(cert_file), key_file=str(key_file))

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt3' if self.mqtt311 else 'mqtt'}://{self.host}:{self.port}"


def _apply_auth(client: mqtt.Client, broker: BrokerAddress) -> None:
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        secret = os.environ.get("FEDGE_KEY_PASSPHRASE")
        client.tls_set(ca_certs=broker.ca_file, certfile=broker.cert_file, keyfile=broker.key_file,
                       keyfile_password=secret or None)


def guarded(callback: Callable[..., Any], what: str,
            on_error: Callable[[BaseException], None] | None = None) -> Callable[..., None]:
    """A paho callback that can never raise: an exception (a bug, or input no check foresaw) is logged with its
    traceback and reported to `on_error` (a counter), and paho's network thread lives on. Every callback of both
    sides is installed through this; :func:`make_client` also sets paho's own ``suppress_exceptions`` as the
    last net."""

    @functools.wraps(callback)
    def call(*args: Any, **kwargs: Any) -> None:
        try:
            callback(*args, **kwargs)
        except Exception as exc:
            log.exception("%s failed; the connection stays up", what)
            if on_error is not None:
                try:
                    on_error(exc)
                except Exception:
                    log.exception("%s: the error counter failed too", what)

    return call


def make_client(
    client_id: str,
    *,
    will: tuple[str, bytes] | None = None,
    manual_ack: bool = False,
    mqtt311: bool = False,
    persistent: bool = True,
) -> mqtt.Client:
    """``manual_ack``: the caller acknowledges each QoS 1 message itself (``client.ack(mid, qos)``), e.g. only
    after it is committed to storage, so the broker re-delivers what a crash lost. ``mqtt311``: MQTT 3.1.1, whose
    session persistence is fixed here (``persistent``), not at connect time as in v5."""
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311 if mqtt311 else mqtt.MQTTv5,
        manual_ack=manual_ack,
        **({"clean_session": not persistent} if mqtt311 else {}),
    )
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.suppress_exceptions = True  # a callback that raises anyway is logged by paho, not re-raised
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_queued_messages_set(10_000)
    return client


def _connect_props(persistent: bool, session_expiry_s: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s if persistent else 0
    return props


def _is_v5(client: mqtt.Client) -> bool:
    return client.protocol == mqtt.MQTTv5


def _connect_args(client: mqtt.Client, persistent: bool, session_expiry_s: int) -> dict:
    """v5: clean start and session expiry per connection; 3.1.1: nothing (the client was made with its session
    persistence, and a 3.1.1 session never expires on its own)."""
    if not _is_v5(client):
        return {}
    return {"clean_start": not persistent, "properties": _connect_props(persistent, session_expiry_s)}


def open_connection(client: mqtt.Client, broker: BrokerAddress, *, persistent: bool = True,
                    session_expiry_s: int = 24 * 3600) -> None:
    """Open the TCP connection and send CONNECT without starting paho's network thread: for callers that
    drive many clients from their own event loop (``loop_read``/``loop_write``/``loop_misc``), as the fleet
    emulator does. Raises OSError when the broker cannot be reached."""
    _apply_auth(client, broker)
    client.connect(broker.host, broker.port, keepalive=broker.keepalive,
                   **_connect_args(client, persistent, session_expiry_s))


def connect(
    client: mqtt.Client,
    broker: BrokerAddress,
    *,
    persistent: bool = True,
    session_expiry_s: int = 24 * 3600,
    timeout_s: float = 10.0,
    wait: bool = True,
    network: NetworkLoop | None = None,
) -> None:
    """Connect and start paho's network thread; raise ConnectionError if the broker does not
    accept us within `timeout_s`. paho keeps reconnecting on its own after that (exponential
    backoff, see make_client). ``wait=False`` (a daemon that must outlive a broker that is down
    at boot) returns at once and lets paho's thread retry the first connection too.

    `network`: a shared :class:`edge_client.wire.mqtt_loop.NetworkLoop` drives the client instead of a
    thread of its own (many simulated devices in one process); end such a client with :func:`close`."""
    _apply_auth(client, broker)
    if network is not None:
        network.attach(client)
    if not wait:
        client.connect_async(broker.host, broker.port, keepalive=broker.keepalive,
                             **_connect_args(client, persistent, session_expiry_s))
        if network is not None:
            network.connect_later(client)
        else:
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
    try:
        client.connect(broker.host, broker.port, keepalive=broker.keepalive,
                       **_connect_args(client, persistent, session_expiry_s))
    except OSError as exc:  # ssl.SSLError is one: a refused certificate, an unknown CA
        if network is not None:
            network.detach(client, clean=False)
        raise ConnectionError(f"cannot reach MQTT broker at {broker}: {exc}") from None
    if network is None:
        client.loop_start()
    if not connected.wait(timeout_s) or failure:
        close(client, network, clean=False)
        raise ConnectionError(f"MQTT broker {broker.host}:{broker.port} refused or timed out: {failure or 'timeout'}")


def close(client: mqtt.Client, network: NetworkLoop | None = None, *, clean: bool = True) -> None:
    """End the client's connection and its network I/O. ``clean``: send DISCONNECT first (the broker
    drops the last will); otherwise the connection just ends, as in a crash (the will fires)."""
    if network is not None:
        network.detach(client, clean=clean)
        return
    if clean:
        client.disconnect()
    client.loop_stop()


@functools.lru_cache(maxsize=512)
def _expiry_properties(expiry_s: int) -> Properties:
    """One PUBLISH properties object per expiry value, shared (paho only reads it): building one per message was
    ~6 % of a coordinator's time when it sends a task and a receipt to each of 10,000 devices."""
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = expiry_s
    return props


def publish(
    client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False, expiry_s: int | None = None
) -> mqtt.MQTTMessageInfo:
    """QoS 1 publish; message expiry keeps stale tasks from reaching a device days later. While
    disconnected, paho queues the message and sends it after reconnecting."""
    props = None
    if expiry_s is not None and _is_v5(client):  # 3.1.1 has no message expiry: receivers check deadlines
        props = _expiry_properties(int(expiry_s))
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
