"""One network thread for many MQTT clients (edge_client.wire.mqtt_loop): past paho's ~340-clients-per-process
wall (a thread, three descriptors and select() per client), lossless under concurrent publishers, reconnecting
after a broker restart, and ending a client cleanly (no last will) or as a crash would (the will fires)."""

from __future__ import annotations

import resource
import threading
import time

import pytest

from coordinator.fleet.broker import raise_fd_limit, start_mosquitto
from edge_client.wire import mqtt as M
from edge_client.wire.mqtt_loop import NetworkLoop
from tests.waiting import wait_for

pytestmark = pytest.mark.broker


def _clients(n: int, prefix: str) -> list:
    return [M.make_client(f"{prefix}-{i}") for i in range(n)]


def test_more_clients_than_select_can_watch_in_one_process() -> None:
    n = 1100  # every socket number above 1023 is beyond select(): paho's own loop times out near 340 clients
    raise_fd_limit()
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * n + 200:
        pytest.skip("the hard RLIMIT_NOFILE is too low for this many sockets here")
    received = [0] * n
    network = NetworkLoop()
    clients = _clients(n, "many")
    with start_mosquitto() as broker:  # started after raising the limit: it inherits it
        try:
            for i, c in enumerate(clients):
                c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("fedge/v1/loop/all", 1)
                c.on_message = lambda cl, u, m, i=i: received.__setitem__(i, received[i] + 1)
                M.connect(c, broker.address, persistent=False, network=network)
            assert max(s.fileno() for s in (c.socket() for c in clients)) > 1023
            assert threading.active_count() < 10  # one network thread, not one per client
            wait_for(lambda: all(c.is_connected() for c in clients), 10, "every client connected")
            time.sleep(0.3)  # subscriptions settle
            M.publish(clients[0], "fedge/v1/loop/all", b"x" * 4096)
            wait_for(lambda: all(r == 1 for r in received), 20, "the fan-out to every client")
            infos = [M.publish(c, f"fedge/v1/loop/up/{i}", b"y" * 1024) for i, c in enumerate(clients)]
            assert M.acknowledged(infos, 20)
        finally:
            for c in clients:
                M.close(c, network)
            network.stop()
    assert len(network) == 0


def test_concurrent_publishers_lose_nothing(mosquitto) -> None:
    """Many threads publish through clients the loop thread is writing for (paho's register-write flag can
    drop a wake-up in that race; the loop's tick must still send everything)."""
    network = NetworkLoop(tick_s=0.1)
    clients = _clients(20, "busy")
    got = set()
    sub = M.make_client("busy-sub")
    sub.on_message = lambda c, u, m: got.add(bytes(m.payload))
    M.connect(sub, mosquitto.address, persistent=False)
    sub.subscribe("fedge/v1/loop/busy/#", 1)
    try:
        for c in clients:
            M.connect(c, mosquitto.address, persistent=False, network=network)
        time.sleep(0.3)
        infos: list = []
        lock = threading.Lock()

        def spam(k: int) -> None:
            for j in range(100):
                info = M.publish(clients[(k + j) % len(clients)], f"fedge/v1/loop/busy/{k}", f"{k}-{j}".encode())
                with lock:
                    infos.append(info)

        threads = [threading.Thread(target=spam, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert M.acknowledged(infos, 20)
        wait_for(lambda: len(got) == 800, 10, "all 800 messages delivered")
    finally:
        for c in clients:
            M.close(c, network)
        network.stop()
        M.close(sub)


def test_clients_reconnect_after_the_broker_restarts() -> None:
    network = NetworkLoop()
    clients = _clients(5, "back")
    connects = [0] * len(clients)
    broker = start_mosquitto()
    port = broker.address.port
    try:
        for i, c in enumerate(clients):
            c.on_connect = lambda cl, u, f, rc, p, i=i: connects.__setitem__(i, connects[i] + 1)
            M.connect(c, broker.address, persistent=False, network=network)
        assert connects == [1] * len(clients)
        broker.stop()
        wait_for(lambda: not any(c.is_connected() for c in clients), 10, "the clients to notice the broker is gone")
        broker = start_mosquitto(port)
        wait_for(lambda: connects == [2] * len(clients), 20, "every client reconnected")
        info = M.publish(clients[0], "fedge/v1/loop/after", b"ok")
        assert M.acknowledged([info], 5)
    finally:
        for c in clients:
            M.close(c, network)
        network.stop()
        broker.stop()


@pytest.mark.parametrize("clean", [True, False])
def test_close_is_clean_or_a_crash(mosquitto, clean: bool) -> None:
    """A clean close sends DISCONNECT (the broker drops the will); an unclean one ends the connection the way
    a crash does, and the broker publishes the last will."""
    wills: list[bytes] = []
    watcher = M.make_client(f"watcher-{clean}")
    watcher.on_message = lambda c, u, m: wills.append(bytes(m.payload))
    M.connect(watcher, mosquitto.address, persistent=False)
    watcher.subscribe("fedge/v1/loop/will", 1)
    network = NetworkLoop()
    client = M.make_client(f"mortal-{clean}", will=("fedge/v1/loop/will", b"gone"))
    try:
        M.connect(client, mosquitto.address, persistent=False, network=network)
        time.sleep(0.3)
        M.close(client, network, clean=clean)
        if clean:
            time.sleep(1.0)
            assert wills == []
        else:
            wait_for(lambda: wills == [b"gone"], 10, "the last will")
        assert len(network) == 0
    finally:
        network.stop()
        M.close(watcher)
