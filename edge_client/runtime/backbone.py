"""Runs the frozen backbone on the device with ONNX Runtime or LiteRT (TFLite).

The backbone is exported once by the coordinator (``export/``) with its spec in the file's own metadata
(:mod:`edge_client.runtime.spec`), so the device learns context length, feature size and quantile levels from
the file it runs, not from a second config that could disagree. :class:`BackboneRunner` picks the runtime from
the file (``.tflite`` or the TFLite identifier -> LiteRT, see :mod:`edge_client.runtime.litert`; anything else ->
ONNX Runtime); a bundle and a device profile choose *which* file (:mod:`edge_client.bundles.store`). Both paths
give the same features API, spec and batching. Loading failures (missing, truncated or corrupt files, a file whose
hash does not match the manifest, a LiteRT file on a device without a LiteRT interpreter) raise
:class:`ModelLoadError` with a message naming the file, never a runtime's own traceback.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_client.learning.head import Features
from edge_client.runtime.spec import ModelSpec, SpecError

if TYPE_CHECKING:
    from edge_client.runtime.litert import LiteRTBackbone

log = logging.getLogger("fedge.runtime")


class ModelLoadError(RuntimeError):
    """The backbone cannot be used: missing, corrupt, mismatched or of an unexpected shape."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


ONNXRUNTIME, LITERT = "onnxruntime", "litert"
RUNTIMES = (ONNXRUNTIME, LITERT)


def runtime_for(path: str | Path) -> str:
    """The runtime a backbone file needs: LiteRT for TFLite flatbuffers, ONNX Runtime otherwise."""
    from edge_client.runtime.litert import is_tflite

    return LITERT if Path(path).suffix == ".tflite" or is_tflite(path) else ONNXRUNTIME


def ort_session(path: str | Path, threads: int | None = 1) -> Any:
    """A quiet CPU ONNX Runtime session; `threads` bounds intra-op threads (one inter-op thread), None
    leaves both to ONNX Runtime (the coordinator's parity checks may use every core)."""
    import onnxruntime as ort  # imported here so protocol-only users never load it

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class _OrtBackbone:
    """ONNX Runtime session with the same small interface as :class:`edge_client.runtime.litert.LiteRTBackbone`."""

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:  # a LiteRT-only install (fedge[tflite] / fedge[litert]) has no ONNX Runtime
            raise ModelLoadError(f"{path} is an ONNX backbone but ONNX Runtime is not installed: "
                                 "pip install 'fedge[onnx]', or use a .tflite backbone") from None

        self.session = ort_session(path, threads)
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.version = f"onnxruntime {ort.__version__}"
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs[:3] != ["features", "loc", "scale"]:
            raise ModelLoadError(f"backbone {path} outputs {outputs}, expected features, loc, scale")

    def run(self, x: np.ndarray, batch_size: int) -> list[list[np.ndarray]]:
        return [self.session.run(None, {"context": x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]


def backbone_mismatch(mine_id: str, mine_sha256: str, *, model_id: str = "",
                      sha256s: Collection[str] = ()) -> str | None:
    """Why a head or manifest made for another backbone must be refused, or None when it fits.

    Every format of one export (ONNX fp32/int8, TFLite fp32/int8) carries the same model id (a content
    hash of the torch weights) in its metadata but has a file hash of its own, so a fleet can mix formats:
    the id decides when both sides know it, and the file hashes only for messages or files without one."""
    if model_id and mine_id:
        return None if model_id == mine_id else f"backbone {model_id}, this device runs {mine_id}"
    wanted = [s for s in sha256s if s]
    if wanted and mine_sha256 not in wanted:
        return f"backbone {wanted[0][:12]}…, this device runs {mine_sha256[:12]}…"
    return None


class BackboneRunner:
    """The backbone on this device: raw contexts (N, L) -> features, loc, scale.

    ``runtime`` is "onnxruntime" or "litert" (auto-detected from the file unless given);
    ``runtime_version`` names the package that runs it, e.g. "ai-edge-litert 2.3.0"."""

    def __init__(self, path: str | Path, *, threads: int = 1, expected_sha256: str | None = None,
                 runtime: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"backbone file {self.path} does not exist")
        self.sha256 = sha256_file(self.path)
        if expected_sha256 and self.sha256 != expected_sha256:
            raise ModelLoadError(
                f"backbone {self.path} has sha256 {self.sha256[:12]}…, manifest says {expected_sha256[:12]}…"
            )
        self.runtime = runtime or runtime_for(self.path)
        if self.runtime not in RUNTIMES:
            raise ModelLoadError(f"unknown runtime {self.runtime!r} for {self.path}; known: {', '.join(RUNTIMES)}")
        self._backend = self._open(threads)
        self.runtime_version: str = self._backend.version
        try:
            self.spec = ModelSpec.from_metadata(self._backend.metadata)
        except SpecError as exc:
            raise ModelLoadError(f"backbone {self.path}: {exc}") from None
        log.info("loaded backbone %s (%s, context %d, %d features)", self.path.name, self.runtime_version,
                 self.spec.context, self.spec.feature_dim)

    def _open(self, threads: int) -> _OrtBackbone | LiteRTBackbone:
        try:
            if self.runtime == LITERT:
                from edge_client.runtime.litert import LiteRTBackbone

                return LiteRTBackbone(self.path, threads)
            return _OrtBackbone(self.path, threads)
        except ModelLoadError:
            raise
        except ImportError as exc:
            raise ModelLoadError(f"cannot load backbone {self.path}: {exc}") from None
        except Exception as exc:  # each runtime raises its own exception types for corrupt files
            raise ModelLoadError(f"cannot load {self.runtime} backbone {self.path}: {type(exc).__name__}: {exc}") \
                from None

    def features(self, contexts: np.ndarray, batch_size: int = 32) -> Features:
        """Backbone features of raw contexts; small batches bound the activation memory that ORT's
        arena keeps for the session's life (peak RSS of a device round: ~390 MB at batch 256, ~130 MB
        at 32; turning the arena off made it worse, ~155 MB). LiteRT runs the file's fixed-batch
        signatures of at most `batch_size` rows."""
        x = np.asarray(contexts, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.context:
            raise ValueError(f"contexts must be (N, {self.spec.context}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("contexts contain NaN/Inf; fill or drop those windows first")
        parts = self._backend.run(x, batch_size)
        if not parts:
            d = self.spec.feature_dim
            return Features(np.zeros((0, d), np.float32), np.zeros((0, 1), np.float32), np.ones((0, 1), np.float32))
        feats, loc, scale = (np.concatenate([p[i] for p in parts]) for i in range(3))
        return Features(feats, loc, scale)
