"""The bundle download over MQTT: the signed manifest and then the chunks of a newer version, fed to the store."""

from __future__ import annotations

import logging
import threading
from typing import Any

from edge_client.bundles.manifest import BadChunk, BundleError, InvalidManifest
from edge_client.bundles.store import BundleStore
from edge_client.wire import BundleChunk, BundleManifest, ProtocolError, Topics, decode
from edge_client.wire.mqtt import guarded

log = logging.getLogger("fedge.bundle")

# --------------------------------------------------------------------------- MQTT glue


class BundleDownloader:
    """Feeds a :class:`BundleStore` from MQTT: subscribes to the signed manifest and, once a newer
    verified version is announced, to its chunks (published retained, so a device that reconnects
    or restarts gets every chunk again and keeps only the ones missing on disk)."""

    def __init__(self, client: Any, topics: Topics, store: BundleStore, task: str = "tsfm") -> None:
        self.client, self.topics, self.store, self.task = client, topics, store, task
        self.installed = threading.Event()
        self._wanted: int | None = None
        client.on_connect = guarded(self._on_connect, "bundle downloader on_connect")
        client.on_message = guarded(self._on_message, "bundle downloader on_message")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if not reason_code.is_failure:
            client.subscribe(self.topics.bundle(self.task), qos=1)

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        try:
            msg = decode(message.payload)
            if msg.fleet != self.topics.fleet or getattr(msg, "task", None) != self.task:
                raise BadChunk(f"{msg.type} for {msg.fleet}/{getattr(msg, 'task', None)} on {message.topic}")
            if isinstance(msg, BundleManifest):
                self._on_manifest(msg)
            elif isinstance(msg, BundleChunk):
                self._on_chunk(msg)
        except ProtocolError as err:
            self.store.rejected[err.reason] += 1
            log.warning("bundle message on %s rejected: %s: %s", message.topic, err.reason, err)
        except BundleError as err:
            self.store.reject(err, None)
        except Exception:  # a bug must not kill paho's network thread
            log.exception("error handling bundle message on %s", message.topic)

    def _on_manifest(self, msg: BundleManifest) -> None:
        m = self.store.offer_manifest(msg.manifest, msg.sig)
        if m is None:
            return
        if m.version != msg.version:
            raise InvalidManifest(f"envelope says v{msg.version}, signed manifest says v{m.version}")
        if m.task != self.task:
            raise InvalidManifest(f"the signed manifest is for task {m.task!r}, this device runs {self.task!r}")
        self._wanted = m.version
        if self.store.missing(m.version):
            self.client.subscribe(self.topics.all_chunks(self.task), qos=1)
        else:
            self._install(m.version)

    def _on_chunk(self, msg: BundleChunk) -> None:
        if msg.version != self._wanted:
            return
        if self.store.add_chunk(msg):
            self._install(msg.version)

    def _install(self, version: int) -> None:
        self.client.unsubscribe(self.topics.all_chunks(self.task))
        self._wanted = None
        if self.store.install(version):
            self.installed.set()
