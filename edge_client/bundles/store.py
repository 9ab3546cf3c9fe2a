"""The on-disk bundle store of a device: assemble from chunks, verify, smoke-check, activate, roll back.

A bundle is a manifest (model id, version, files with sha256 and size, input/output spec, compatible
profiles) signed by the coordinator's ed25519 key, plus its files, which travel over MQTT in
fixed-size chunks. The device trusts nothing but the signature: the manifest is verified on the
exact bytes that were signed, and every assembled file must match the manifest's sha256 and size
before anything loads it.

:class:`BundleStore` keeps everything on disk so a download survives a disconnect or a restart::

    root/versions/<v>/manifest.json, manifest.sig   the signed manifest as received
    root/versions/<v>/chunks/<file>/<index>.part     chunks received so far (resume point)
    root/versions/<v>/files/<file>                   assembled, verified files
    root/versions/<v>/BAD                            a signed bundle that failed its smoke check
    root/current, root/previous                      version pointers (written atomically)

A version becomes ``current`` only after its files verify, its backbone loads and a smoke check
(finite features of the right shape on a synthetic batch) passes, so the good version is never
replaced by a broken one; if ``current`` later fails to load, :meth:`BundleStore.load_current`
rolls back to ``previous``. Every refusal is a :class:`BundleError` subclass with a stable
``reason``, counted and logged once with the version that stays active. Only numpy, the standard
library, cryptography and onnxruntime or LiteRT (through :class:`BackboneRunner`) are used: no torch.
A bundle may ship ONNX and TFLite backbones side by side (manifest ``backbones`` keys ``fp32``, ``int8``,
``tflite-fp32``, ``tflite-int8``); the store runs the one its profile's runtime and format name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_client.bundles.manifest import (
    CHUNK_DIGEST_HEX,
    BadChunk,
    BundleError,
    CorruptModel,
    FileEntry,
    IncompatibleBundle,
    IncompleteBundle,
    InvalidManifest,
    Manifest,
    NoSpace,
    StaleBundle,
    TamperedFile,
    TruncatedChunk,
    verify_manifest,
)
from edge_client.runtime.backbone import LITERT, ONNXRUNTIME, BackboneRunner, ModelLoadError, runtime_for, sha256_file
from edge_client.runtime.litert import litert_available
from edge_client.wire import BundleChunk

log = logging.getLogger("fedge.bundle")
FREE_DISK_MARGIN = 64 * 1024 * 1024  # a download must leave this much free on the device


# --------------------------------------------------------------------------- store


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def backbone_key(runtime: str, fmt: str) -> str:
    """The manifest's ``backbones`` key for a runtime and format: ONNX keys are the bare format
    ("fp32", "int8"), LiteRT keys are prefixed ("tflite-fp32", "tflite-int8")."""
    return fmt if runtime == ONNXRUNTIME else f"tflite-{fmt}"


def synthetic_contexts(context: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """Random walks with a level and a season: inputs in real units, like a device's data."""
    rng = np.random.default_rng(seed)
    t = np.arange(context)
    x = 10.0 + 5.0 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 1, (n, context)).cumsum(axis=1)
    return x.astype(np.float32)


@dataclass
class BundleStore:
    """On-disk bundle versions with a ``current`` pointer that only ever points at a verified,
    smoke-checked version. Thread-safe: paho's network thread feeds it."""

    root: Path
    public_key: Ed25519PublicKey
    profile: str | None = None
    preferred_format: str = "fp32"
    threads: int = 1
    runtime: str = ONNXRUNTIME  # the profile's runtime; "litert" runs the bundle's .tflite backbone when shipped
    fleet: str | None = None  # set: only bundles signed for this fleet are accepted (a secure fleet's devices)
    rejected: Counter[str] = field(default_factory=Counter)
    chunks_written: int = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._manifests: dict[int, Manifest] = {}
        self._missing: dict[int, set[tuple[str, int]]] = {}  # per version, computed once: linear bookkeeping

    # -------------------------------------------------------------- pointers

    def _pointer(self, name: str) -> int | None:
        try:
            return int((self.root / name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    @property
    def current_version(self) -> int | None:
        return self._pointer("current")

    @property
    def previous_version(self) -> int | None:
        return self._pointer("previous")

    def version_dir(self, version: int) -> Path:
        return self.root / "versions" / str(int(version))

    def is_bad(self, version: int) -> bool:
        return (self.version_dir(version) / "BAD").is_file()

    def manifest(self, version: int) -> Manifest | None:
        """A manifest accepted earlier (memory, else re-verified from disk after a restart)."""
        if version in self._manifests:
            return self._manifests[version]
        d = self.version_dir(version)
        try:
            m = verify_manifest((d / "manifest.json").read_bytes(), (d / "manifest.sig").read_bytes(), self.public_key)
        except (FileNotFoundError, BundleError):
            return None
        self._manifests[version] = m
        return m

    def backbone_path(self, version: int | None = None) -> Path:
        """The backbone file this device runs: its profile's runtime and preferred format when the bundle
        ships it, else that runtime's fp32, else the ONNX file of the preferred format, else ONNX fp32
        (also when the profile says LiteRT but no LiteRT interpreter is installed)."""
        version = self.current_version if version is None else version
        if version is None:
            raise ModelLoadError(f"no bundle installed in {self.root}")
        m = self.manifest(version)
        if m is None:
            raise ModelLoadError(f"bundle v{version} has no valid signed manifest in {self.root}")
        runtimes = [self.runtime] if self.runtime == ONNXRUNTIME or litert_available() else []
        keys = [backbone_key(r, f) for r in [*runtimes, ONNXRUNTIME] for f in (self.preferred_format, "fp32")]
        name = next(m.backbones[k] for k in keys if k in m.backbones)
        return self.version_dir(version) / "files" / name

    # -------------------------------------------------------------- rejections

    def reject(self, err: BundleError, version: int | None) -> None:
        """Count and log a refusal (the downloader reports its own through here too)."""
        self.rejected[err.reason] += 1
        where = f"v{version}" if version is not None else "bundle"
        log.warning("bundle %s rejected: %s: %s; keeping current v%s", where, err.reason, err, self.current_version)

    # -------------------------------------------------------------- manifest and chunks

    def offer_manifest(self, manifest_bytes: bytes, signature: bytes | None) -> Manifest | None:
        """Accept a signed manifest for a newer version; None when it is refused or needs nothing."""
        try:
            m = verify_manifest(manifest_bytes, signature, self.public_key)
        except BundleError as err:
            self.reject(err, None)
            return None
        current = self.current_version
        try:
            if current is not None and m.version < current:
                raise StaleBundle(f"version {m.version} is older than the installed v{current} (downgrade refused)")
            if m.expires is not None and m.expires < time.time():
                raise StaleBundle(f"v{m.version} expired at {m.expires:.0f} (an old bundle re-published?)")
            if self.fleet is not None and m.fleet != self.fleet:
                raise IncompatibleBundle(f"v{m.version} is signed for fleet {m.fleet!r}, this device is in "
                                         f"{self.fleet!r}")
            if self.profile and m.profiles and self.profile not in m.profiles:
                raise IncompatibleBundle(f"profile {self.profile!r} is not among {list(m.profiles)}")
            if m.version != current and not self.is_bad(m.version):
                need = 2 * sum(f.size for f in m.files) + FREE_DISK_MARGIN  # chunks and assembled files
                free = shutil.disk_usage(self.root).free
                if free < need:
                    raise NoSpace(f"v{m.version} needs {need / 1e6:.0f} MB free, {free / 1e6:.0f} MB are")
        except BundleError as err:
            self.reject(err, m.version)
            return None
        if m.version == current or self.is_bad(m.version):
            log.info("bundle v%d is %s; nothing to do", m.version, "installed" if m.version == current else "known bad")
            return None
        with self._lock:
            d = self.version_dir(m.version)
            d.mkdir(parents=True, exist_ok=True)
            _atomic_write(d / "manifest.json", m.raw)
            _atomic_write(d / "manifest.sig", bytes(signature or b""))
            self._manifests[m.version] = m
        log.info("bundle v%d (%s) announced: %d files, %d chunks missing", m.version, m.model_id, len(m.files),
                 len(self.missing(m.version)))
        return m

    def _chunk_path(self, version: int, name: str, index: int) -> Path:
        return self.version_dir(version) / "chunks" / name / f"{index:06d}.part"

    def missing(self, version: int) -> list[tuple[str, int]]:
        """(file, chunk index) pairs still to receive: what a resumed download must fetch. Read from disk once
        per version and then kept up to date chunk by chunk (1,024 chunks once took 21 s re-reading it per chunk)."""
        with self._lock:
            if version not in self._missing:
                m = self.manifest(version)
                if m is None:
                    return []
                out: set[tuple[str, int]] = set()
                for f in m.files:
                    if self._file_ok(version, f):
                        continue
                    out.update((f.name, i) for i in range(f.n_chunks(m.chunk_size))
                               if not self._chunk_path(version, f.name, i).is_file())
                self._missing[version] = out
            return sorted(self._missing[version])

    def add_chunk(self, chunk: BundleChunk) -> bool:
        """Store one chunk (idempotent). True when the bundle just became complete."""
        try:
            return self._add_chunk(chunk)
        except BundleError as err:
            self.reject(err, chunk.version)
            return False

    def _add_chunk(self, chunk: BundleChunk) -> bool:
        m = self.manifest(chunk.version)
        if m is None or self.is_bad(chunk.version):
            log.debug("ignoring chunk of bundle v%d: no signed manifest for it", chunk.version)
            return False
        entry = m.file(chunk.file)
        if entry is None:
            raise BadChunk(f"chunk for {chunk.file!r}, which the signed manifest does not list")
        total = entry.n_chunks(m.chunk_size)
        if chunk.total != total or chunk.index >= total:
            raise BadChunk(f"{chunk.file} chunk {chunk.index}/{chunk.total}, manifest implies {total} chunks")
        want = entry.chunk_len(chunk.index, m.chunk_size)
        if len(chunk.data) != want:
            raise TruncatedChunk(f"{chunk.file} chunk {chunk.index} has {len(chunk.data)} bytes, expected {want}")
        digest = hashlib.sha256(chunk.data).hexdigest()
        if digest != chunk.sha256:
            raise BadChunk(f"{chunk.file} chunk {chunk.index} does not match its sha256")
        if entry.chunks and digest[:CHUNK_DIGEST_HEX] != entry.chunks[chunk.index]:
            raise BadChunk(f"{chunk.file} chunk {chunk.index} is not the chunk the signed manifest names")
        with self._lock:
            self.missing(chunk.version)  # loads the set once
            wanted = self._missing[chunk.version]
            if (chunk.file, chunk.index) not in wanted:
                return False
            path = self._chunk_path(chunk.version, chunk.file, chunk.index)
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, chunk.data)
            self.chunks_written += 1
            wanted.discard((chunk.file, chunk.index))
            return not wanted

    # -------------------------------------------------------------- assembly and activation

    def _file_ok(self, version: int, entry: FileEntry) -> bool:
        path = self.version_dir(version) / "files" / entry.name
        return path.is_file() and path.stat().st_size == entry.size and sha256_file(path) == entry.sha256

    def _assemble(self, version: int, m: Manifest) -> None:
        """Concatenate each file's chunks and check it against the signed manifest. A file that does
        not match loses its chunks, so a corrected re-publication can be fetched again."""
        files = self.version_dir(version) / "files"
        files.mkdir(parents=True, exist_ok=True)
        for entry in m.files:
            if self._file_ok(version, entry):
                continue
            parts = [self._chunk_path(version, entry.name, i) for i in range(entry.n_chunks(m.chunk_size))]
            absent = [p.name for p in parts if not p.is_file()]
            if absent:
                raise IncompleteBundle(f"{entry.name}: {len(absent)} of {len(parts)} chunks missing")
            tmp = files / (entry.name + ".tmp")
            with open(tmp, "wb") as out:
                for p in parts:
                    out.write(p.read_bytes())
            size, digest = tmp.stat().st_size, sha256_file(tmp)
            if size != entry.size or digest != entry.sha256:
                tmp.unlink()
                shutil.rmtree(self.version_dir(version) / "chunks" / entry.name, ignore_errors=True)
                self._missing.pop(version, None)  # fetch them again
                raise TamperedFile(f"{entry.name}: assembled {size} bytes with sha256 {digest[:12]}…, signed manifest "
                                   f"says {entry.size} bytes, {entry.sha256[:12]}…")
            os.replace(tmp, files / entry.name)
        shutil.rmtree(self.version_dir(version) / "chunks", ignore_errors=True)

    def smoke_check(self, version: int) -> None:
        """Every shipped backbone must load, match the manifest's spec and give finite features of
        the right shape on a synthetic batch; the head arrays must be finite. Raises CorruptModel."""
        m = self.manifest(version)
        if m is None:
            raise CorruptModel(f"no manifest for v{version}")
        d = self.version_dir(version) / "files"
        can_litert = litert_available()
        for fmt, name in m.backbones.items():
            if runtime_for(d / name) == LITERT and not can_litert:
                log.info("bundle v%d: not checking %s backbone %s (no LiteRT interpreter on this device)",
                         version, fmt, name)
                continue
            entry = m.file(name)
            try:
                runner = BackboneRunner(d / name, threads=self.threads, expected_sha256=entry.sha256 if entry else None)
                self._check_features(runner, m, f"{fmt} backbone {name}")
            except ModelLoadError as exc:
                raise CorruptModel(str(exc)) from None
        head = d / "head.npz"
        if head.is_file():
            try:
                with np.load(head) as data:
                    bad = [k for k in data.files if not np.isfinite(data[k]).all()]
            except Exception as exc:  # numpy raises several types for a corrupt archive
                raise CorruptModel(f"head.npz is unreadable: {type(exc).__name__}: {exc}") from None
            if bad:
                raise CorruptModel(f"head.npz has non-finite arrays {bad}")

    @staticmethod
    def _check_features(runner: BackboneRunner, m: Manifest, what: str) -> None:
        for key in ("context", "feature_dim"):
            if getattr(m.spec, key) != getattr(runner.spec, key):
                raise CorruptModel(f"{what}: {key} {getattr(runner.spec, key)}, manifest says {getattr(m.spec, key)}")
        try:
            feats = runner.features(synthetic_contexts(runner.spec.context))
        except Exception as exc:  # onnxruntime errors at run time (bad graph) are a corrupt model too
            raise CorruptModel(f"{what} fails on a synthetic batch: {type(exc).__name__}: {exc}") from None
        arrays = (feats.feats, feats.loc, feats.scale)
        if feats.feats.shape != (4, runner.spec.feature_dim) or not all(np.isfinite(a).all() for a in arrays):
            raise CorruptModel(f"{what}: features {feats.feats.shape} not finite or of the wrong shape")

    def install(self, version: int) -> bool:
        """Assemble, verify and smoke-check a downloaded version, then make it current. On any
        failure the current version stays; a signed-but-broken model is marked bad for good."""
        with self._lock:
            m = self.manifest(version)
            try:
                if m is None:
                    raise InvalidManifest(f"no verified manifest for v{version}")
                self._assemble(version, m)
                self.smoke_check(version)
            except BundleError as err:
                if isinstance(err, CorruptModel):
                    _atomic_write(self.version_dir(version) / "BAD", f"{err.reason}: {err}\n".encode())
                    log.warning("bundle v%d failed its smoke check; rolled back to v%s", version, self.current_version)
                self.reject(err, version)
                return False
            self._activate(version)
            return True

    def _activate(self, version: int) -> None:
        current = self.current_version
        if current is not None and current != version:
            _atomic_write(self.root / "previous", f"{current}\n".encode())
        _atomic_write(self.root / "current", f"{version}\n".encode())
        log.info("bundle v%d is now current (previous v%s)", version, current)
        self.prune()

    def prune(self) -> list[int]:
        """Delete every version on disk but the current, the previous (the roll-back target) and ones still being
        downloaded (newer than current); returns the versions deleted."""
        keep = {self.current_version, self.previous_version}
        gone = []
        for d in (self.root / "versions").iterdir():
            if not d.name.isdigit() or int(d.name) in keep or int(d.name) > (self.current_version or -1):
                continue
            shutil.rmtree(d, ignore_errors=True)
            self._manifests.pop(int(d.name), None)
            self._missing.pop(int(d.name), None)
            gone.append(int(d.name))
        if gone:
            log.info("bundles: deleted old versions %s", sorted(gone))
        return sorted(gone)

    def load_current(self) -> BackboneRunner:
        """The current backbone, re-verified on load; if it fails (disk damage, a file deleted),
        roll back to the previous good version and make that current again."""
        with self._lock:
            tried = []
            for version in (self.current_version, self.previous_version):
                if version is None or version in tried:
                    continue
                tried.append(version)
                try:
                    runner = self._load(version)
                except (BundleError, ModelLoadError) as exc:
                    err = exc if isinstance(exc, BundleError) else CorruptModel(str(exc))
                    self.reject(err, version)
                    continue
                if version != self.current_version:
                    log.warning("rolled back from v%s to v%d", self.current_version, version)
                    _atomic_write(self.root / "current", f"{version}\n".encode())
                return runner
            raise ModelLoadError(f"no loadable bundle in {self.root} (tried {tried})")

    def _load(self, version: int) -> BackboneRunner:
        m = self.manifest(version)
        if m is None:
            raise InvalidManifest(f"v{version} has no valid signed manifest on disk")
        path = self.backbone_path(version)
        entry = m.file(path.name)
        return BackboneRunner(path, threads=self.threads, expected_sha256=entry.sha256 if entry else None)

