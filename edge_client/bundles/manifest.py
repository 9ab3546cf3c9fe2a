"""The signed bundle manifest: what a bundle holds (model id, version, files with sha256 and size, the model spec,
compatible profiles), how it is signed (ed25519 over canonical JSON), and the typed refusals of the bundle layer.

The device trusts nothing but the signature: the manifest is verified on the exact bytes that were signed, and
every refusal is a :class:`BundleError` subclass with a stable ``reason``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_client.runtime.spec import ModelSpec, SpecError
from edge_client.wire import NAME_RE

log = logging.getLogger("fedge.bundle")


BUNDLE_FORMAT = "fedge.bundle/1"
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_CHUNK_BYTES = 256 * 1024
MAX_FILES = 32
CHUNK_DIGEST_HEX = 32  # per-chunk digests in the signed manifest: sha256 cut to 128 bits (a 64 KB manifest holds
#                        the digests of ~1,700 chunks)


# --------------------------------------------------------------------------- errors


class BundleError(Exception):
    """A bundle (or a piece of one) was refused; ``reason`` is a stable counter key."""

    reason: ClassVar[str] = "invalid_bundle"


class UnsignedBundle(BundleError):
    reason = "unsigned"


class BadSignature(BundleError):
    reason = "bad_signature"


class InvalidManifest(BundleError):
    reason = "invalid_manifest"


class IncompatibleBundle(BundleError):
    reason = "incompatible_profile"


class StaleBundle(BundleError):
    reason = "stale_version"


class BadChunk(BundleError):
    reason = "bad_chunk"


class TruncatedChunk(BadChunk):
    reason = "truncated_chunk"


class IncompleteBundle(BundleError):
    reason = "incomplete"


class NoSpace(BundleError):
    reason = "no_space"


class TamperedFile(BundleError):
    reason = "tampered_file"


class CorruptModel(BundleError):
    reason = "corrupt_model"


# --------------------------------------------------------------------------- keys and manifests


def canonical_json(obj: Any) -> bytes:
    """The one byte string a manifest is signed as: sorted keys, no whitespace, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def load_public_key(source: str | os.PathLike[str] | bytes) -> Ed25519PublicKey:
    """The coordinator's public key from a PEM file (or PEM bytes)."""
    pem = source if isinstance(source, bytes) else Path(source).read_bytes()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"expected an ed25519 public key, got {type(key).__name__}")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key, written into manifests and log lines."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class FileEntry:
    name: str
    sha256: str
    size: int
    role: str = ""
    chunks: tuple[str, ...] = ()  # signed per-chunk digests (manifests made before issue #11 have none)

    def n_chunks(self, chunk_size: int) -> int:
        return max(1, -(-self.size // chunk_size))

    def chunk_len(self, index: int, chunk_size: int) -> int:
        return min(chunk_size, self.size - index * chunk_size) if self.size else 0


@dataclass(frozen=True)
class Manifest:
    """A verified manifest. Built only by :meth:`parse`, which checks every field a device uses."""

    raw: bytes
    data: Mapping[str, Any]
    task: str
    model_id: str
    version: int
    chunk_size: int
    files: tuple[FileEntry, ...]
    backbones: Mapping[str, str]
    spec: ModelSpec
    profiles: tuple[str, ...]
    fleet: str | None = None  # the fleet the bundle is bound to (devices of a secure fleet require it)
    expires: float | None = None  # unix time after which devices refuse it

    def file(self, name: str) -> FileEntry | None:
        return next((f for f in self.files if f.name == name), None)

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
            return cls._from_dict(raw, data)
        except InvalidManifest:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidManifest(f"manifest is not a valid {BUNDLE_FORMAT} document: {exc}") from None

    @classmethod
    def _from_dict(cls, raw: bytes, data: dict[str, Any]) -> Manifest:
        if data.get("format") != BUNDLE_FORMAT:
            raise InvalidManifest(f"manifest format {data.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        chunk_size = int(data["chunk_size"])
        if not 1024 <= chunk_size <= MAX_CHUNK_BYTES:
            raise InvalidManifest(f"chunk size {chunk_size} outside [1024, {MAX_CHUNK_BYTES}]")
        if not isinstance(data["files"], list) or not 1 <= len(data["files"]) <= MAX_FILES:
            raise InvalidManifest(f"a manifest lists 1 to {MAX_FILES} files")
        files = tuple(FileEntry(str(f["name"]), str(f["sha256"]), int(f["size"]), str(f.get("role", "")),
                                tuple(str(c) for c in f.get("chunks", ()))) for f in data["files"])
        for f in files:
            if not NAME_RE.match(f.name) or len(f.sha256) != 64 or not 0 <= f.size <= MAX_FILE_BYTES:
                raise InvalidManifest(f"bad file entry {f.name!r}")
            if f.chunks and len(f.chunks) != f.n_chunks(chunk_size):
                raise InvalidManifest(f"{f.name}: {len(f.chunks)} chunk digests for {f.n_chunks(chunk_size)} chunks")
        names = {f.name for f in files}
        backbones = {str(k): str(v) for k, v in data["backbones"].items()}
        if "fp32" not in backbones or not set(backbones.values()) <= names:
            raise InvalidManifest(f"backbones {backbones} must name an fp32 backbone among the files {sorted(names)}")
        try:
            spec = ModelSpec.from_dict(data["spec"])
        except SpecError as exc:
            raise InvalidManifest(str(exc)) from None
        version = int(data["version"])
        if version < 0:
            raise InvalidManifest(f"negative version {version}")
        fleet = data.get("fleet")
        if fleet is not None and (not isinstance(fleet, str) or not NAME_RE.match(fleet)):
            raise InvalidManifest(f"bad fleet {fleet!r}")
        expires = data.get("expires")
        if expires is not None and (type(expires) not in (int, float) or not 0 < expires < 1e11):
            raise InvalidManifest(f"bad expiry {expires!r}")
        return cls(raw, data, str(data["task"]), str(data["model_id"]), version, chunk_size, files, backbones,
                   spec, tuple(str(p) for p in data.get("profiles", [])), fleet,
                   None if expires is None else float(expires))


def verify_manifest(manifest_bytes: bytes, signature: bytes | None, public_key: Ed25519PublicKey) -> Manifest:
    """Check the detached ed25519 signature on the exact manifest bytes, then parse them."""
    if not signature:
        raise UnsignedBundle("manifest carries no signature")
    try:
        public_key.verify(bytes(signature), bytes(manifest_bytes))
    except InvalidSignature:
        raise BadSignature(f"manifest signature does not verify with coordinator key {key_id(public_key)}") from None
    return Manifest.parse(bytes(manifest_bytes))

