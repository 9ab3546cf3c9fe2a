"""One network thread for many MQTT clients in one process (simulated fleets, load harnesses).

Why: paho's own loop (``loop_start``) gives every client a thread, a TCP loopback socket pair to
wake that thread, and ``select()``. Three file descriptors per client and ``select()``'s FD_SETSIZE
of 1024 mean a process cannot hold more than about 340 paho clients: the 341st connects, its socket
number passes 1023, its thread's ``select()`` fails, and the connection times out
(``fedge demo --task rec --users 943`` stopped there). Hundreds of threads that each wake once a
second also cost two small cores real time.

:class:`NetworkLoop` drives any number of clients through paho's external-loop API
(``loop_read``/``loop_write``/``loop_misc`` and the socket callbacks) from one thread with one
``selectors`` poller (epoll on Linux: no descriptor limit beyond the process's own ``RLIMIT_NOFILE``),
one wake-up pipe for all clients, one socket per client. It does what ``loop_start`` does for a
client: keep-alive pings, retransmission, and reconnecting with backoff after a lost connection.

Threading: only the loop thread touches the poller and reads or writes sockets. Other threads
publish as usual; paho then asks for write interest through ``on_socket_register_write``, which
queues the client and wakes the loop. paho's own "registered" flag can lose such a request in a
race with the loop thread, so every tick the loop also writes for any client that still has
packets queued (at most ``tick_s`` late, never lost).

A device of a real fleet (one client per process) keeps paho's own thread: see
:func:`edge_client.wire.mqtt.connect`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable

import paho.mqtt.client as mqtt

log = logging.getLogger("fedge.mqtt.loop")

RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0  # the backoff make_client gives paho's own loop


class NetworkLoop:
    """Drives paho clients (attached with :meth:`attach`) from one thread until :meth:`stop`."""

    def __init__(self, name: str = "fedge-mqtt-loop", tick_s: float = 0.25) -> None:
        self.tick_s = tick_s
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._commands: deque[Callable[[], None]] = deque()  # run on the loop thread
        self._clients: set[mqtt.Client] = set()
        self._names: dict[mqtt.Client, str] = {}
        self._closing: set[mqtt.Client] = set()  # detached on purpose: a socket close is not a loss
        self._retry_at: dict[mqtt.Client, float] = {}  # lost connections: when to try again
        self._backoff: dict[mqtt.Client, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)

    # ------------------------------------------------------------------ called from any thread

    def attach(self, client: mqtt.Client, name: str = "") -> None:
        """Take over `client`'s network I/O (call before ``connect``/``connect_async``); `name` is for logs."""
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        with self._lock:
            self._clients.add(client)
            self._closing.discard(client)
            self._names[client] = name or f"#{len(self._names)}"

    def connect_later(self, client: mqtt.Client) -> None:
        """Make the first connection from the loop thread (after ``connect_async``), retrying with
        backoff while the broker is unreachable: a daemon started before its broker."""
        self._call(lambda: self._retry_at.__setitem__(client, 0.0))

    def detach(self, client: mqtt.Client, *, clean: bool = True, timeout_s: float = 5.0) -> None:
        """Stop driving `client`. ``clean``: disconnect properly first (the DISCONNECT is written before
        the socket closes, so the broker drops the last will); otherwise the socket is just closed, as
        a crash or a power cut would (the will fires). Returns once the socket is closed, or after
        `timeout_s`."""
        with self._lock:
            if client not in self._clients:
                return
            self._closing.add(client)
        if clean and client.socket() is not None:
            client.disconnect()  # queues DISCONNECT; the loop writes it and paho closes the socket
            deadline = time.monotonic() + timeout_s
            while client.socket() is not None and time.monotonic() < deadline and self._thread.is_alive():
                time.sleep(0.01)
        done = threading.Event()

        def forget() -> None:
            self._forget(client, close=True)
            done.set()

        self._call(forget)
        done.wait(timeout_s)

    def stop(self) -> None:
        """Stop the thread; clients still attached lose their connections (their wills fire)."""
        self._stop.set()
        self._wake()
        self._thread.join(timeout=10)
        for client in list(self._clients):
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ paho's socket callbacks

    def _on_socket_open(self, client, userdata, sock) -> None:  # type: ignore[no-untyped-def]
        self._call(lambda: self._register(client, sock))

    def _on_socket_close(self, client, userdata, sock) -> None:  # type: ignore[no-untyped-def]
        self._call(lambda: self._closed(client, sock))

    def _on_register_write(self, client, userdata, sock) -> None:  # type: ignore[no-untyped-def]
        self._call(lambda: self._write(client))

    def _on_unregister_write(self, client, userdata, sock) -> None:  # type: ignore[no-untyped-def]
        self._call(lambda: self._interest(sock, write=False))

    # ------------------------------------------------------------------ the loop thread

    def _call(self, fn: Callable[[], None]) -> None:
        if threading.current_thread() is self._thread:
            fn()
            return
        self._commands.append(fn)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                events = self._selector.select(max(0.0, min(self.tick_s, next_tick - time.monotonic())))
            except (OSError, ValueError):
                if self._stop.is_set():
                    break
                raise
            for key, mask in events:
                if key.data is None:  # the wake-up pipe
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._wake_r, 65536)
                    continue
                client: mqtt.Client = key.data
                self._guard(client, lambda c=client, m=mask: self._io(c, m))
            while self._commands:
                self._guard(None, self._commands.popleft())
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self.tick_s
                self._tick()

    def _guard(self, client: mqtt.Client | None, fn: Callable[[], None]) -> None:
        """A bug in one client's callback must not stop the loop for every other client."""
        try:
            fn()
        except Exception:
            log.exception("network loop: error while serving client %s", self._names.get(client, "?"))

    def _io(self, client: mqtt.Client, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            client.loop_read()
            sock = client.socket()
            while sock is not None and getattr(sock, "pending", lambda: 0)() > 0:  # TLS: decrypted bytes the
                client.loop_read()  # kernel no longer reports as readable
                sock = client.socket()
        if client.socket() is not None and (mask & selectors.EVENT_WRITE or client.want_write()):
            client.loop_write()

    def _write(self, client: mqtt.Client) -> None:
        sock = client.socket()
        if sock is None:
            return
        client.loop_write()  # writes what the socket takes; paho re-registers write interest if more is left
        if client.want_write():
            self._interest(sock, write=True, client=client)

    def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            if client.socket() is not None:
                self._guard(client, client.loop_misc)  # keep-alive pings, a silent broker is a lost one
                if client.socket() is not None and client.want_write():
                    self._guard(client, lambda c=client: self._write(c))
            elif client in self._retry_at and now >= self._retry_at[client]:
                self._reconnect(client)

    def _closed(self, client: mqtt.Client, sock) -> None:  # type: ignore[no-untyped-def]
        """A socket closed (paho already said on_disconnect): forget its fd, and if nobody asked for
        it, try again after the backoff (1 s, doubling to 30 s; reset by a successful reconnect)."""
        self._unregister(sock)
        with self._lock:
            lost = client in self._clients and client not in self._closing and not self._stop.is_set()
        if lost:
            self._retry_later(client)

    def _retry_later(self, client: mqtt.Client) -> None:
        delay = self._backoff.get(client, RECONNECT_MIN_S)
        self._backoff[client] = min(delay * 2, RECONNECT_MAX_S)
        self._retry_at[client] = time.monotonic() + delay

    def _reconnect(self, client: mqtt.Client) -> None:
        """(Re)connect on the loop thread. A broker on another host that drops SYNs holds the loop for
        paho's connect timeout; for the local brokers of simulations a refused connect returns at once."""
        del self._retry_at[client]
        try:
            client.reconnect()  # on_socket_open registers the new socket; CONNECT goes out on the loop
            self._backoff.pop(client, None)
        except (OSError, ValueError) as exc:
            self._retry_later(client)
            log.debug("network loop: connecting %s failed (%s)", self._names.get(client, "?"), exc)
            if client.on_connect_fail is not None:
                self._guard(client, lambda: client.on_connect_fail(client, client.user_data_get()))

    def _register(self, client: mqtt.Client, sock) -> None:  # type: ignore[no-untyped-def]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        self._selector.register(sock, selectors.EVENT_READ, client)
        if client.want_write():
            self._write(client)

    def _unregister(self, sock) -> None:  # type: ignore[no-untyped-def]
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)

    def _interest(self, sock, *, write: bool, client: mqtt.Client | None = None) -> None:  # type: ignore[no-untyped-def]
        try:
            key = self._selector.get_key(sock)
        except (KeyError, ValueError):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        if key.events != events:
            self._selector.modify(sock, events, client or key.data)

    def _forget(self, client: mqtt.Client, close: bool = False) -> None:
        sock = client.socket()
        if sock is not None:
            self._unregister(sock)
            if close:
                with contextlib.suppress(OSError):
                    sock.close()  # no DISCONNECT: the broker sees a lost connection
        with self._lock:
            self._clients.discard(client)
            self._closing.discard(client)
            self._names.pop(client, None)
        self._retry_at.pop(client, None)
        self._backoff.pop(client, None)
