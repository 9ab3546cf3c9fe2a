"""What a device keeps about itself, read for ``fedge-edge status`` and deleted by ``forget-me``.

Both work on the store alone, without a broker: an owner must be able to see and erase what the
device holds even when the fleet is unreachable. The personal model never left the device, so
deleting it here deletes it everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from edge_client.daemon.config import DeviceConfig
from edge_client.daemon.store import DB_NAME, DeviceStore

# meta keys that describe this person's rounds (deleted by forget-me); 'device' and model facts stay
PERSONAL_META = ("last_round", "last_global_version", "rounds_trained", "last_deferred", "personal_backbone",
                 "personal_day")


def status_rows(cfg: DeviceConfig, when: Callable[[float | None], str]) -> Iterator[tuple[str, str]]:
    """(label, text) rows describing the store and the bundle directory."""
    state = cfg.state_path()
    if (state / DB_NAME).is_file():
        with DeviceStore(state) as store:
            yield from _store_rows(store, when)
    if cfg.bundle is not None:
        yield "bundles", _bundle_text(Path(cfg.bundle.dir))


def _store_rows(store: DeviceStore, when: Callable[[float | None], str]) -> Iterator[tuple[str, str]]:
    span = store.sample_span()
    if span and span[0] > 1e8:  # epoch timestamps
        yield "readings", f"{store.n_samples()} from {when(span[0])} to {when(span[1])}"
    else:
        yield "readings", f"{store.n_samples()}" + (f" (sequence {span[0]:g} … {span[1]:g})" if span else "")
    for source, (good, bad) in store.ingest_counts().items():
        yield f"  {source}", f"{good} lines stored, {bad} bad lines skipped"
    last = store.get_meta("last_round")
    yield "last round", (f"{last['round']} ({last['kind']}) at {when(last['ts'])}" if last else "-")
    yield "rounds trained", str(store.get_meta("rounds_trained", 0))
    yield "global version", str(store.get_meta("last_global_version", "-"))
    counts = store.outbox_counts()
    yield "outbox", (f"{counts['pending']} pending, {counts['sent']} sent (no ack), {counts['acked']} acked by the "
                     f"broker (no receipt yet), {counts['received']} received, {counts['rejected']} rejected")
    names = store.personal_names()
    yield "personal state", ", ".join(names) if names else "none"
    sha = store.get_meta("backbone_sha256")
    yield "backbone", f"sha256 {sha[:16]}…" if sha else "-"
    yield "bundle in use", f"v{store.get_meta('bundle_version')}" if store.get_meta("bundle_version") else "-"
    deferred = store.get_meta("last_deferred")
    if deferred:
        yield "last deferral", f"round {deferred['round']}: {deferred['reason']} at {when(deferred['ts'])}"
    yield "last heartbeat", when(store.get_meta("last_heartbeat"))


def _bundle_text(root: Path) -> str:
    """Installed versions from the bundle directory's pointers (no key needed to read them)."""
    def pointer(name: str) -> str:
        try:
            return (root / name).read_text().strip()
        except OSError:
            return "-"

    versions = sorted((d.name for d in (root / "versions").iterdir() if d.is_dir()), key=lambda v: int(v)) \
        if (root / "versions").is_dir() else []
    bad = [v for v in versions if (root / "versions" / v / "BAD").exists()]
    return (f"current v{pointer('current')}, previous v{pointer('previous')}; on disk {versions or '-'}"
            + (f", known bad {bad}" if bad else ""))


def forget(state_dir: Path, *, samples: bool = False) -> list[str]:
    """Delete the personal state in a store; returns one line per thing deleted."""
    out = []
    with DeviceStore(state_dir) as store:
        names = store.delete_personal()
        out.append(f"deleted personal state: {', '.join(names) if names else 'none stored'}")
        out.append(f"deleted {store.delete_outbox()} stored update(s) from the outbox")
        store.delete_meta(PERSONAL_META)
        out.append("deleted round history")
        if samples:
            out.append(f"deleted {store.delete_samples()} stored readings")
        store.vacuum()
    return out


def tell_coordinator(cfg: DeviceConfig, timeout_s: float = 10.0) -> str:
    """Ask the fleet's coordinator to delete what it stored from this device (``Forget``), and clear the
    device's retained hello and status on the broker, so a restarted coordinator does not register it
    again. Done once the broker acknowledges: the coordinator's persistent session receives the request
    even if it is down now. Raises ConnectionError when the broker cannot be reached."""
    from edge_client.wire import Forget, Topics, encode, sign
    from edge_client.wire import mqtt as M

    topics = Topics(cfg.fleet)
    broker = cfg.broker_address()
    client = M.make_client(f"fedge-{cfg.fleet}-forget-{cfg.device_id}", mqtt311=broker.mqtt311, persistent=False)
    M.connect(client, broker, persistent=False, timeout_s=timeout_s)
    identity = cfg.load_identity()
    try:
        forget = Forget(fleet=cfg.fleet, device_id=cfg.device_id)
        request = encode(sign(forget, identity.key) if identity is not None else forget)
        infos = [M.publish(client, topics.forget(cfg.device_id), request),
                 M.publish(client, topics.hello(cfg.device_id), b"", retain=True),
                 M.publish(client, topics.status(cfg.device_id), b"", retain=True)]
        try:
            done = M.acknowledged(infos, timeout_s)
        except RuntimeError as exc:  # paho could not queue it: the connection dropped
            raise ConnectionError(f"lost the connection to {cfg.broker}: {exc}") from None
        if not done:
            raise ConnectionError(f"the broker at {cfg.broker} did not acknowledge within {timeout_s:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()
    return (f"asked the coordinator of fleet {cfg.fleet} (via {cfg.broker}) to delete this device's updates, "
            "prototypes and registration, and cleared its retained hello and status")
