"""Model bundles: int8 export, signed manifests, chunked resumable download, verification and rollback."""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_client.bundles.download import BundleDownloader
from edge_client.bundles.manifest import BadSignature, UnsignedBundle, verify_manifest
from edge_client.bundles.store import BundleStore
from edge_client.runtime.profile import list_profiles, load_profile
from edge_client.runtime.spec import SPEC_KEY, ModelSpec
from edge_client.wire import BundleChunk, Topics, decode, encode
from edge_client.wire import mqtt as M
from export.bundle import (
    build_bundle,
    generate_key,
    iter_chunks,
    load_bundle,
    load_private_key,
    load_public_key,
    manifest_message,
    publish_bundle,
    save_keypair,
)
from export.onnx_export import read_spec
from export.quantize import format_report, quantize_backbone

FLEET = "bundles"
INT8_MAX_ABS_TOL = 0.1  # de-normalised (scaled ETTh1 units) point forecast vs torch
INT8_MSE_CHANGE_TOL = 0.05  # relative change of forecast MSE vs fp32


@pytest.fixture(scope="module")
def export_dir(tiny_export, tmp_path_factory) -> Path:
    """The tiny export plus its int8 backbone, in a directory of its own."""
    d = tmp_path_factory.mktemp("export-int8")
    for name in ("backbone.onnx", "head.onnx", "head.npz", "spec.json"):
        shutil.copyfile(tiny_export["dir"] / name, d / name)
    quantize_backbone(d / "backbone.onnx")
    return d


@pytest.fixture(scope="module")
def key():
    return generate_key()


def _feed(store: BundleStore, bundle, chunks=None) -> bool:
    """Deliver a bundle the way the downloader does (manifest, chunks, install), without MQTT."""
    if store.offer_manifest(bundle.manifest_bytes, bundle.signature) is None:
        return False
    for chunk in chunks if chunks is not None else iter_chunks(bundle, FLEET):
        store.add_chunk(chunk)
    return store.install(bundle.version)


def _download(address: M.BrokerAddress, topics: Topics, store: BundleStore, client_id: str) -> bool:
    """Connect a device's downloader to the broker; True once it installed a bundle (30 s at most)."""
    client = M.make_client(client_id)
    downloader = BundleDownloader(client, topics, store)
    M.connect(client, address)
    try:
        return downloader.installed.wait(30)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def store_v1(export_dir, key, tmp_path) -> tuple[BundleStore, Path]:
    """A device store with a good v1 installed."""
    store = BundleStore(tmp_path / "device", key.public_key())
    bundle = build_bundle(export_dir, tmp_path / "b1", 1, key, chunk_size=16 * 1024)
    assert _feed(store, bundle)
    assert store.current_version == 1
    return store, tmp_path


# --------------------------------------------------------------------------- int8 export


def test_int8_export_keeps_spec_and_parity(tiny_export, export_dir) -> None:
    from coordinator.pretrain.windows import split_windows

    fp32, int8 = read_spec(export_dir / "backbone.onnx"), read_spec(export_dir / "backbone.int8.onnx")
    assert int8["format"] == "int8"
    for k in ("context", "horizon", "feature_dim", "quantiles", "model_id"):
        assert int8[k] == fp32[k]
    cfg = tiny_export["config"]
    x, y = split_windows("etth1", "test", cfg.context, cfg.horizon, stride=48)
    rows = {r.format: r for r in format_report(tiny_export["model"], export_dir / "backbone.onnx",
                                               export_dir / "backbone.int8.onnx", (x, y))}
    assert rows["onnx-fp32"].max_abs_err < 1e-4
    assert rows["onnx-int8"].max_abs_err < INT8_MAX_ABS_TOL
    assert abs(rows["onnx-int8"].mse_change_pct) < 100 * INT8_MSE_CHANGE_TOL
    assert rows["onnx-int8"].size_kb < rows["onnx-fp32"].size_kb


# --------------------------------------------------------------------------- signing


def test_sign_verify_and_key_files(export_dir, key, tmp_path) -> None:
    pub_path = save_keypair(key, tmp_path / "keys" / "coordinator.pem")
    assert (tmp_path / "keys" / "coordinator.pem").stat().st_mode & 0o777 == 0o600
    loaded, pub = load_private_key(tmp_path / "keys" / "coordinator.pem"), load_public_key(pub_path)
    bundle = build_bundle(export_dir, tmp_path / "b", 3, loaded, profiles=["pi4"])
    m = verify_manifest(bundle.manifest_bytes, bundle.signature, pub)
    assert (m.version, m.profiles, set(m.backbones)) == (3, ("pi4",), {"fp32", "int8"})
    assert {f.name for f in m.files} == {"backbone.onnx", "backbone.int8.onnx", "head.onnx", "head.npz", "spec.json"}
    assert m.spec == ModelSpec.from_metadata({SPEC_KEY: (export_dir / "spec.json").read_text()})
    assert load_bundle(tmp_path / "b", pub).manifest.raw == bundle.manifest_bytes
    with pytest.raises(BadSignature):
        verify_manifest(bundle.manifest_bytes.replace(b'"version":3', b'"version":4'), bundle.signature, pub)
    with pytest.raises(BadSignature):
        verify_manifest(bundle.manifest_bytes, bundle.signature, generate_key().public_key())
    with pytest.raises(UnsignedBundle):
        verify_manifest(bundle.manifest_bytes, None, pub)
    with pytest.raises(ValueError, match="unknown device profile"):
        build_bundle(export_dir, tmp_path / "x", 1, key, profiles=["pi3"])


def test_manifest_message_roundtrip(export_dir, key, tmp_path) -> None:
    bundle = build_bundle(export_dir, tmp_path / "b", 2, key)
    msg = decode(encode(manifest_message(bundle, FLEET)))
    assert msg.manifest == bundle.manifest_bytes and msg.sig == bundle.signature
    chunk = next(iter_chunks(bundle, FLEET))
    assert decode(encode(chunk)) == chunk


# --------------------------------------------------------------------------- rejections keep current


@pytest.mark.parametrize("attack", ["tampered_manifest", "wrong_key", "unsigned"])
def test_bad_manifests_rejected(store_v1, export_dir, key, attack, caplog) -> None:
    store, tmp = store_v1
    signer = generate_key() if attack == "wrong_key" else key
    bundle = build_bundle(export_dir, tmp / "b2", 2, signer)
    raw, sig = bundle.manifest_bytes, bundle.signature
    if attack == "tampered_manifest":
        raw = raw.replace(b'"profiles":["pi4"', b'"profiles":["pi5"')
    if attack == "unsigned":
        sig = None
    with caplog.at_level(logging.WARNING, "fedge.bundle"):
        assert store.offer_manifest(raw, sig) is None
    reason = {"unsigned": "unsigned"}.get(attack, "bad_signature")
    assert store.rejected[reason] == 1
    assert f"rejected: {reason}" in caplog.text and "keeping current v1" in caplog.text
    assert store.current_version == 1 and store.load_current().spec.context == 96


def test_tampered_file_rejected(store_v1, export_dir, key, caplog) -> None:
    store, tmp = store_v1
    bundle = build_bundle(export_dir, tmp / "b2", 2, key, chunk_size=16 * 1024)
    path = bundle.path("head.npz")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))  # after signing: chunk envelopes are self-consistent, the signed digests are not
    with caplog.at_level(logging.WARNING, "fedge.bundle"):
        assert not _feed(store, bundle)
    # the signed per-chunk digest refuses the tampered chunk on arrival (before issue #11: only the assembled file)
    assert store.rejected["bad_chunk"] == 1 and "head.npz" in caplog.text
    assert store.current_version == 1
    last = bundle.manifest.file("head.npz").n_chunks(16 * 1024) - 1
    assert store.missing(2) == [("head.npz", last)]  # still wanted: the genuine chunk can come


def test_truncated_chunk_rejected(store_v1, export_dir, key) -> None:
    store, tmp = store_v1
    bundle = build_bundle(export_dir, tmp / "b2", 2, key, chunk_size=16 * 1024)
    chunks = list(iter_chunks(bundle, FLEET))
    short = chunks[0].data[:-10]
    chunks[0] = chunks[0].model_copy(update={"data": short, "sha256": hashlib.sha256(short).hexdigest()})
    assert not _feed(store, bundle, chunks)
    assert store.rejected["truncated_chunk"] == 1 and store.rejected["incomplete"] == 1
    assert store.missing(2) == [(chunks[0].file, 0)]
    assert store.current_version == 1
    store.add_chunk(next(iter_chunks(bundle, FLEET)))  # the good chunk arrives later: the bundle completes
    assert store.install(2) and store.current_version == 2 and store.previous_version == 1


def test_downgrade_and_wrong_profile_rejected(store_v1, export_dir, key) -> None:
    store, tmp = store_v1
    old = build_bundle(export_dir, tmp / "b0", 0, key)
    assert store.offer_manifest(old.manifest_bytes, old.signature) is None
    assert store.rejected["stale_version"] == 1
    store.profile = "pi4"
    other = build_bundle(export_dir, tmp / "b2", 2, key, profiles=["jetson-orin-nano"])
    assert store.offer_manifest(other.manifest_bytes, other.signature) is None
    assert store.rejected["incompatible_profile"] == 1 and store.current_version == 1


def test_corrupt_backbone_fails_smoke_check_and_rolls_back(store_v1, export_dir, key, caplog) -> None:
    store, tmp = store_v1
    broken = tmp / "broken-export"
    shutil.copytree(export_dir, broken)
    data = (broken / "backbone.onnx").read_bytes()
    (broken / "backbone.onnx").write_bytes(data[: len(data) // 2])  # signed correctly, but not a model
    bundle = build_bundle(broken, tmp / "b2", 2, key, chunk_size=16 * 1024)
    with caplog.at_level(logging.WARNING, "fedge.bundle"):
        assert not _feed(store, bundle)
    assert store.rejected["corrupt_model"] == 1 and "rolled back to v1" in caplog.text
    assert store.current_version == 1 and store.is_bad(2)
    assert store.offer_manifest(bundle.manifest_bytes, bundle.signature) is None  # never retried
    assert np.isfinite(store.load_current().features(np.ones((2, 96), np.float32)).feats).all()


def test_current_that_stops_loading_rolls_back(store_v1, export_dir, key) -> None:
    store, tmp = store_v1
    assert _feed(store, build_bundle(export_dir, tmp / "b2", 2, key))
    assert (store.current_version, store.previous_version) == (2, 1)
    store.backbone_path(2).write_bytes(b"disk damage")
    runner = store.load_current()
    assert store.current_version == 1 and runner.path == store.backbone_path(1)


def test_int8_profile_runs_int8_backbone(store_v1) -> None:
    store, _ = store_v1
    store.preferred_format = load_profile("pi4").preferred_format
    assert store.load_current().path.name == "backbone.int8.onnx"


# --------------------------------------------------------------------------- over MQTT


@pytest.mark.broker
def test_chunked_transfer_resumes_after_disconnect(mosquitto, export_dir, key, tmp_path) -> None:
    topics = Topics(FLEET)
    bundle = build_bundle(export_dir, tmp_path / "b1", 1, key, chunk_size=8 * 1024)
    total = sum(f.n_chunks(bundle.manifest.chunk_size) for f in bundle.manifest.files)
    assert total > 10
    coordinator = M.make_client("coordinator")
    M.connect(coordinator, mosquitto.address)
    try:
        assert publish_bundle(coordinator, topics, bundle) == total
    finally:
        coordinator.disconnect()
        coordinator.loop_stop()

    root = tmp_path / "device"
    first = BundleStore(root, key.public_key())
    dropped = threading.Event()
    client = M.make_client("device-1")
    add = first.add_chunk

    def flaky_add(chunk: BundleChunk) -> bool:  # the link drops after 5 chunks
        if first.chunks_written >= 5:
            if not dropped.is_set():
                dropped.set()
                client.disconnect()
            return False
        return add(chunk)

    first.add_chunk = flaky_add  # type: ignore[method-assign]
    BundleDownloader(client, topics, first)
    M.connect(client, mosquitto.address)
    assert dropped.wait(20)
    client.loop_stop()
    missing = first.missing(1)
    assert first.chunks_written == 5 and len(missing) == total - 5 and first.current_version is None

    second = BundleStore(root, key.public_key())  # the device process restarts: state comes from disk
    assert _download(mosquitto.address, topics, second, "device-1"), \
        f"rejected: {second.rejected}, missing {len(second.missing(1))}"
    assert second.chunks_written == total - 5  # only the missing chunks were stored again
    assert second.current_version == 1 and not second.rejected
    assert second.load_current().spec.context == 96


@pytest.mark.broker
def test_downloader_rejects_unsigned_bundle_over_mqtt(mosquitto, export_dir, key, tmp_path, caplog) -> None:
    topics = Topics(FLEET)
    bundle = build_bundle(export_dir, tmp_path / "b1", 1, key)
    coordinator = M.make_client("coordinator")
    M.connect(coordinator, mosquitto.address)
    unsigned = manifest_message(bundle, FLEET).model_copy(update={"sig": None})
    M.publish(coordinator, topics.bundle("tsfm"), encode(unsigned), retain=True).wait_for_publish(5)
    coordinator.disconnect()
    coordinator.loop_stop()
    store = BundleStore(tmp_path / "device", key.public_key())
    client = M.make_client("device-1")
    BundleDownloader(client, topics, store)
    with caplog.at_level(logging.WARNING, "fedge.bundle"):
        M.connect(client, mosquitto.address)
        deadline = time.monotonic() + 10
        while not store.rejected and time.monotonic() < deadline:
            time.sleep(0.05)
        client.disconnect()
        client.loop_stop()
    assert store.rejected["unsigned"] == 1 and store.current_version is None
    assert "rejected: unsigned" in caplog.text


# --------------------------------------------------------------------------- profiles


def test_profiles_load() -> None:
    assert list_profiles() == ["jetson-orin-nano", "pi4", "pi5"]
    for name in list_profiles():
        p = load_profile(name)
        assert p.name == name and p.runtime in ("onnxruntime", "litert") and 1 <= p.threads <= p.cores
        assert p.memory_mb > 0
        assert p.preferred_format in ("fp32", "int8")
    assert load_profile("pi4").preferred_format == "int8"
    with pytest.raises(ValueError, match="unknown device profile"):
        load_profile("pi3")


# --------------------------------------------------------------------------- command line


@pytest.mark.broker
def test_fedge_bundle_keygen_and_publish_reach_a_device(mosquitto, export_dir, tmp_path) -> None:
    """The operator's path: `fedge bundle keygen`, then `fedge bundle publish`; a device holding only
    the .pub file downloads, verifies and installs it. Bad arguments exit 2 without touching keys."""
    from typer.testing import CliRunner

    from coordinator.cli import app

    runner = CliRunner()
    keyfile = tmp_path / "keys" / "coordinator.key"
    assert runner.invoke(app, ["bundle", "keygen", "--key", str(keyfile)]).exit_code == 0
    pem = keyfile.read_bytes()
    again = runner.invoke(app, ["bundle", "keygen", "--key", str(keyfile)])
    assert again.exit_code == 2 and "refusing to replace" in again.output and keyfile.read_bytes() == pem
    broker = f"{mosquitto.address.host}:{mosquitto.address.port}"
    common = ["--fleet", FLEET, "--broker", broker, "--out", str(tmp_path / "signed")]
    for args, message in [(["--key", str(tmp_path / "nope.key"), "--version", "1"], "nope.key"),
                          (["--key", str(export_dir / "spec.json"), "--version", "1"], "error:"),
                          (["--key", str(keyfile), "--version", "1", "--profile", "pi9"], "pi9")]:
        bad = runner.invoke(app, ["bundle", "publish", str(export_dir), *args, *common])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    ok = runner.invoke(app, ["bundle", "publish", str(export_dir), "--key", str(keyfile), "--version", "3", *common])
    assert ok.exit_code == 0, ok.output

    store = BundleStore(tmp_path / "device", load_public_key(keyfile.with_name("coordinator.key.pub")),
                        profile="pi4")
    assert _download(mosquitto.address, Topics(FLEET), store, "device-cli"), f"rejected: {store.rejected}"
    assert store.current_version == 3 and not store.rejected


# --------------------------------------------------------------------------- issue #11


def test_expired_or_other_fleets_bundles_are_refused(export_dir, key, tmp_path) -> None:
    store = BundleStore(tmp_path / "device", key.public_key(), fleet="plant-7")
    unbound = build_bundle(export_dir, tmp_path / "b1", 1, key)
    assert store.offer_manifest(unbound.manifest_bytes, unbound.signature) is None
    other = build_bundle(export_dir, tmp_path / "b2", 2, key, fleet="plant-8")
    assert store.offer_manifest(other.manifest_bytes, other.signature) is None
    expired = build_bundle(export_dir, tmp_path / "b3", 3, key, fleet="plant-7", valid_days=-1)
    assert store.offer_manifest(expired.manifest_bytes, expired.signature) is None
    assert store.rejected == {"incompatible_profile": 2, "stale_version": 1}
    good = build_bundle(export_dir, tmp_path / "b4", 4, key, fleet="plant-7", valid_days=30)
    assert _feed(store, good) and store.current_version == 4


def test_old_versions_are_pruned_and_bookkeeping_is_linear(store_v1, export_dir, key, monkeypatch) -> None:
    store, tmp = store_v1
    for v in (2, 3):
        assert _feed(store, build_bundle(export_dir, tmp / f"b{v}", v, key, chunk_size=16 * 1024))
    on_disk = sorted(int(d.name) for d in (store.root / "versions").iterdir())
    assert on_disk == [2, 3] and (store.current_version, store.previous_version) == (3, 2)
    calls = []
    original = store._file_ok
    monkeypatch.setattr(store, "_file_ok", lambda v, e: calls.append(e) or original(v, e))
    bundle = build_bundle(export_dir, tmp / "b4", 4, key, chunk_size=1024)
    n_chunks = sum(e.n_chunks(1024) for e in bundle.manifest.files)
    assert _feed(store, bundle) and n_chunks > 100
    assert len(calls) < 4 * len(bundle.manifest.files)  # not once per chunk


def test_a_download_that_would_not_fit_is_refused(store_v1, export_dir, key, monkeypatch) -> None:
    import collections

    store, tmp = store_v1
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("edge_client.bundles.store.shutil.disk_usage", lambda p: usage(10**9, 10**9, 10**6))
    bundle = build_bundle(export_dir, tmp / "b2", 2, key)
    assert store.offer_manifest(bundle.manifest_bytes, bundle.signature) is None and store.rejected["no_space"] == 1


def test_a_chunk_must_be_the_one_the_signed_manifest_names(export_dir, key, tmp_path) -> None:
    """Chunk envelopes are not signed: a garbage chunk with a self-consistent hash is refused on arrival."""
    store = BundleStore(tmp_path / "device", key.public_key())
    bundle = build_bundle(export_dir, tmp_path / "b1", 1, key, chunk_size=16 * 1024)
    assert all(len(e.chunks) == e.n_chunks(16 * 1024) for e in bundle.manifest.files)
    assert store.offer_manifest(bundle.manifest_bytes, bundle.signature) is not None
    real = next(iter_chunks(bundle, FLEET))
    fake = bytes(len(real.data))
    forged = real.model_copy(update={"data": fake, "sha256": hashlib.sha256(fake).hexdigest()})
    assert store.add_chunk(forged) is False and store.rejected["bad_chunk"] == 1
    assert (real.file, real.index) in store.missing(1)  # still wanted: the genuine chunk can come
