"""Coordinator side of model bundles: sign an export and publish it over MQTT in chunks.

:func:`build_bundle` turns an export directory (``export_model`` output, optionally with the int8
backbone of :mod:`export.quantize`) into a bundle directory::

    out_dir/manifest.json   canonical JSON (edge_client.bundles.manifest.canonical_json): the signed bytes
    out_dir/manifest.sig    raw 64-byte ed25519 signature over manifest.json
    out_dir/files/<name>    the files the manifest lists

:func:`publish_bundle` sends the files as retained :class:`BundleChunk` messages on
``models/{task}/chunks/{n}`` and then the signed manifest, retained, on ``models/{task}/bundle``.
Retained chunks are what make downloads resumable without a request channel: a device that
reconnects (or restarts) subscribes again, receives every chunk and keeps the ones it lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_client.bundles.manifest import (
    BUNDLE_FORMAT,
    CHUNK_DIGEST_HEX,
    Manifest,
    canonical_json,
    key_id,
    load_public_key,
    verify_manifest,
)
from edge_client.identity import load_private_key, write_private_key
from edge_client.runtime.backbone import sha256_file
from edge_client.runtime.profile import load_profile
from edge_client.runtime.spec import ModelSpec
from edge_client.wire import BundleChunk, BundleManifest, Topics, encode
from edge_client.wire import mqtt as M
from export.quantize import INT8_NAME
from export.tflite_export import TFLITE_INT8_NAME, TFLITE_NAME

__all__ = ["Bundle", "build_bundle", "generate_key", "iter_chunks", "load_bundle", "load_private_key",
           "load_public_key", "publish_bundle", "save_keypair"]

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_PROFILES = ("pi4", "pi5", "jetson-orin-nano")
# file name -> role; only these leave the coordinator (no stray files from the export directory)
BUNDLE_FILES = {"backbone.onnx": "backbone", INT8_NAME: "backbone", TFLITE_NAME: "backbone",
                TFLITE_INT8_NAME: "backbone", "head.onnx": "head", "head.npz": "head", "spec.json": "spec"}
# manifest "backbones" key -> file (edge_client.bundles.store.backbone_key names the keys a device looks for)
BACKBONE_KEYS = {"fp32": "backbone.onnx", "int8": INT8_NAME, "tflite-fp32": TFLITE_NAME,
                 "tflite-int8": TFLITE_INT8_NAME}


# --------------------------------------------------------------------------- keys


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_keypair(key: Ed25519PrivateKey, private_path: str | os.PathLike[str],
                 public_path: str | os.PathLike[str] | None = None) -> Path:
    """Write the private key (PKCS8 PEM, mode 0600) and the public key devices are given
    (defaults to ``<private>.pub``); returns the public key's path."""
    priv = Path(private_path)
    pub = Path(public_path) if public_path is not None else priv.with_name(priv.name + ".pub")
    write_private_key(priv, key)  # encrypted when $FEDGE_KEY_PASSPHRASE is set
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class Bundle:
    """A built bundle on disk: the signed bytes, the signature and where the files are."""

    dir: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes

    @property
    def version(self) -> int:
        return self.manifest.version

    def path(self, name: str) -> Path:
        return self.dir / "files" / name


def chunk_digests(path: Path, chunk_size: int) -> list[str]:
    """The signed digest of every chunk of a file (sha256, first 128 bits), so a device checks each chunk on arrival
    against what the coordinator signed, not against a hash the chunk's own unsigned envelope carries."""
    data = path.read_bytes()
    return [hashlib.sha256(data[i : i + chunk_size]).hexdigest()[:CHUNK_DIGEST_HEX]
            for i in range(0, max(len(data), 1), chunk_size)]


def _manifest_dict(export_dir: Path, names: list[str], version: int, task: str, chunk_size: int,
                   profiles: Sequence[str], public_key: Ed25519PublicKey, fleet: str | None = None,
                   expires: float | None = None) -> dict[str, Any]:
    spec = json.loads((export_dir / "spec.json").read_text())
    files = [{"name": n, "sha256": sha256_file(export_dir / n), "size": (export_dir / n).stat().st_size,
              "role": BUNDLE_FILES[n], "chunks": chunk_digests(export_dir / n, chunk_size)} for n in names]
    backbones = {key: name for key, name in BACKBONE_KEYS.items() if name in names}
    return {
        "format": BUNDLE_FORMAT, "task": task, "model_id": str(spec.get("model_id", "")), "version": int(version),
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "chunk_size": chunk_size, "files": files,
        "backbones": backbones, "spec": ModelSpec.from_dict(spec).to_dict(),
        "profiles": list(profiles), "signer": key_id(public_key),
        # bound to one fleet and valid until a time: an old signed bundle cannot be re-published to freeze devices
        **({"fleet": fleet} if fleet else {}), **({"expires": int(expires)} if expires else {}),
    }


def build_bundle(export_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], version: int,
                 key: Ed25519PrivateKey, profiles: Sequence[str] = DEFAULT_PROFILES, *, task: str = "tsfm",
                 chunk_size: int = DEFAULT_CHUNK_SIZE, fleet: str | None = None,
                 valid_days: float | None = None) -> Bundle:
    """Copy the export's files into `out_dir`, write the canonical manifest and sign it. Profiles are checked
    against the shipped device profiles (edge_client/runtime/profiles) so a typo cannot make every device
    refuse the bundle."""
    src = Path(export_dir)
    if not (src / "backbone.onnx").is_file() or not (src / "spec.json").is_file():
        raise FileNotFoundError(f"{src} is not an export directory (needs backbone.onnx and spec.json)")
    for name in profiles:
        load_profile(name)  # ValueError on an unknown profile
    names = [n for n in BUNDLE_FILES if (src / n).is_file()]
    expires = datetime.now(UTC).timestamp() + valid_days * 86400 if valid_days else None
    manifest = _manifest_dict(src, names, version, task, chunk_size, profiles, key.public_key(), fleet, expires)
    raw = canonical_json(manifest)
    out = Path(out_dir)
    (out / "files").mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(src / n, out / "files" / n)
    (out / "manifest.json").write_bytes(raw)
    signature = key.sign(raw)
    (out / "manifest.sig").write_bytes(signature)
    return Bundle(out, verify_manifest(raw, signature, key.public_key()), raw, signature)


def load_bundle(bundle_dir: str | os.PathLike[str], public_key: Ed25519PublicKey) -> Bundle:
    """Re-open a built bundle (e.g. to publish it again after a coordinator restart)."""
    d = Path(bundle_dir)
    raw, sig = (d / "manifest.json").read_bytes(), (d / "manifest.sig").read_bytes()
    return Bundle(d, verify_manifest(raw, sig, public_key), raw, sig)


# --------------------------------------------------------------------------- publish


def iter_chunks(bundle: Bundle, fleet: str) -> Iterator[BundleChunk]:
    """Every chunk of every file, in manifest order (the order of the ``chunks/{n}`` topics)."""
    m = bundle.manifest
    for entry in m.files:
        data = bundle.path(entry.name).read_bytes()
        total = entry.n_chunks(m.chunk_size)
        for i in range(total):
            piece = data[i * m.chunk_size : (i + 1) * m.chunk_size]
            yield BundleChunk(fleet=fleet, task=m.task, version=m.version, file=entry.name, index=i, total=total,
                              sha256=hashlib.sha256(piece).hexdigest(), data=piece)


def manifest_message(bundle: Bundle, fleet: str) -> BundleManifest:
    return BundleManifest(fleet=fleet, task=bundle.manifest.task, version=bundle.version,
                          manifest=bundle.manifest_bytes, sig=bundle.signature)


def publish_bundle(client: Any, topics: Topics, bundle: Bundle, *, timeout_s: float = 60.0) -> int:
    """Publish the chunks (retained, QoS 1), then the signed manifest (retained), and wait until
    the broker has acknowledged them all. Returns the number of chunks."""
    task = bundle.manifest.task
    infos = [M.publish(client, topics.chunk(task, n), encode(chunk), retain=True)
             for n, chunk in enumerate(iter_chunks(bundle, topics.fleet))]
    infos.append(M.publish(client, topics.bundle(task), encode(manifest_message(bundle, topics.fleet)), retain=True))
    if not M.acknowledged(infos, timeout_s):
        raise TimeoutError(f"broker did not acknowledge bundle v{bundle.version} within {timeout_s:.0f} s")
    return len(infos) - 1
