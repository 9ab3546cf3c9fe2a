"""torch SASRec -> what a recommender device runs: a frozen ONNX sequence encoder plus the item table.

Files (:func:`export_recommender`):

* ``sequence_encoder.onnx`` -- "items" (batch, max_len) int64, left-padded with 0 -> "h" (batch, d),
  the representation after the whole history. Frozen on the device; the model spec rides along
  as ONNX metadata ("fedge.spec"), as for the TSFM backbone.
* ``items.npy`` -- the item embedding table (n_items + 1, d) float32, row 0 = padding. The device
  ranks *every* item as h' Eᵀ in numpy, so the candidate set and the ranking stay on the device;
  scoring as a matrix product (not an ONNX graph) is also what lets the device differentiate its
  adapter analytically through the scores.
* ``spec.json`` -- spec + sha256 of the files + parity numbers.

The graph helpers (dynamo export with a dynamic batch, legacy fallback, metadata, quiet loggers)
are reused from :mod:`export.onnx_export`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from coordinator.models.recommender import SASRec
from edge_client.runtime.backbone import ort_session
from export.onnx_export import EXPORT_BATCH, export_graph, exporter_of, sha256_file

ENCODER_FILE = "sequence_encoder.onnx"
ITEMS_FILE = "items.npy"


class _EncoderGraph(nn.Module):
    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.model.encode(items)


def recommender_spec(model: SASRec) -> dict[str, Any]:
    c = model.config
    return {"kind": "sasrec", "n_items": c.n_items, "d": c.d, "max_len": c.max_len, "pad": 0,
            "n_params": model.n_params(), "config": c.to_dict()}


def parity_batch(model: SASRec, n: int = 8, seed: int = 0) -> np.ndarray:
    """Histories of every length from 1 to max_len (left-padded), so padding is exercised."""
    rng = np.random.default_rng(seed)
    L = model.config.max_len
    x = np.zeros((n, L), np.int64)
    for i, length in enumerate(np.linspace(1, L, n).astype(int)):
        x[i, L - length :] = rng.integers(1, model.config.n_items + 1, length)
    return x


@dataclass
class RecParity:
    max_abs_err: float  # h: ONNX Runtime vs torch
    score_max_abs_err: float  # h Eᵀ in numpy (ONNX h, items.npy) vs torch scores
    batch_sizes: list[int] = field(default_factory=list)

    def ok(self, tol: float = 1e-4) -> bool:
        return max(self.max_abs_err, self.score_max_abs_err) < tol


@torch.no_grad()
def check_encoder_parity(model: SASRec, encoder_path: str | os.PathLike[str], items_path: str | os.PathLike[str],
                 x: np.ndarray) -> RecParity:
    model.eval()
    h_t = model.encode(torch.from_numpy(x)).numpy()
    s_t = model.scores(torch.from_numpy(h_t)).numpy()
    sess = ort_session(encoder_path, None)
    table = np.load(items_path)
    sizes = sorted({1, len(x)})
    errs, serrs = [], []
    for size in sizes:
        for i in range(0, len(x), size):
            (h,) = sess.run(None, {"items": x[i : i + size]})
            errs.append(np.abs(h - h_t[i : i + size]).max())
            serrs.append(np.abs(h @ table.T - s_t[i : i + size]).max())
    return RecParity(float(max(errs)), float(max(serrs)), sizes)


@dataclass
class RecExport:
    out_dir: Path
    encoder: Path
    items: Path
    spec_path: Path
    spec: dict[str, Any]
    parity: RecParity


def export_recommender(model: SASRec, out_dir: str | os.PathLike[str], tol: float = 1e-4) -> RecExport:
    """Write encoder + item table + spec; RuntimeError if the device would rank differently (parity)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    spec = {**recommender_spec(model), "graph": "sequence_encoder"}
    example = torch.from_numpy(parity_batch(model, max(EXPORT_BATCH, 2), seed=1))
    encoder = out / ENCODER_FILE
    export_graph(_EncoderGraph(model), example, encoder, "items", ["h"], spec)
    items = out / ITEMS_FILE
    np.save(items, model.item_table())
    parity = check_encoder_parity(model, encoder, items, parity_batch(model))
    if not parity.ok(tol):
        raise RuntimeError(f"recommender ONNX parity failed (tol {tol}): {parity}")
    full = {**spec, "exporter": exporter_of(encoder),
            "files": {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in (encoder, items)},
            "inputs": ["items"], "outputs": ["h"], "parity": asdict(parity)}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return RecExport(out, encoder, items, spec_path, full, parity)
