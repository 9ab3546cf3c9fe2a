"""The frozen sequence encoder on a device: the recommender's ONNX encoder (a history -> h) and the shipped item
table, loaded from an export folder and checked against its spec.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.runtime.backbone import ModelLoadError, ort_session, sha256_file
from edge_client.runtime.spec import SPEC_KEY


class SequenceEncoder:
    """ONNX Runtime session for ``sequence_encoder.onnx``: items (N, L) int64 -> h (N, d)."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 1, expected_sha256: str | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"encoder file {self.path} does not exist")
        self.sha256 = sha256_file(self.path)  # what global models and manifests are checked against
        if expected_sha256 and self.sha256 != expected_sha256:
            raise ModelLoadError(f"encoder {self.path} does not match the manifest's sha256")
        self.runtime = "onnxruntime"  # the same names BackboneRunner uses, read by EdgeClient's hello
        self.runtime_version = f"onnxruntime {ort.__version__}"
        self.session = ort_session(self.path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.spec: dict[str, Any] = json.loads(meta.get(SPEC_KEY, "{}"))
        self.max_len = int(self.spec.get("max_len", self.session.get_inputs()[0].shape[1]))
        self.d = int(self.spec.get("d", self.session.get_outputs()[0].shape[1]))

    def encode(self, ids: np.ndarray, batch_size: int = 512) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        parts = [self.session.run(None, {"items": ids[i : i + batch_size]})[0] for i in range(0, len(ids), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.d), np.float32)


def load_encoder(out_dir: str | os.PathLike[str], threads: int = 1) -> tuple[SequenceEncoder, np.ndarray]:
    """The encoder session and item table from an export folder (checked against spec.json)."""
    out = Path(out_dir)
    spec = json.loads((out / "spec.json").read_text())
    files = spec.get("files", {})
    encoder = SequenceEncoder(out / "sequence_encoder.onnx", threads=threads,
                              expected_sha256=files.get("sequence_encoder.onnx", {}).get("sha256"))
    items_path = out / "items.npy"
    want = files.get("items.npy", {}).get("sha256")
    if want and sha256_file(items_path) != want:
        raise ModelLoadError(f"{items_path} does not match the manifest's sha256")
    return encoder, np.load(items_path).astype(np.float32)
