"""The model spec: what a device must know to use an exported backbone, defined once.

Export writes it into every model file's own metadata under :data:`SPEC_KEY` (ONNX metadata, TFLite model
metadata) and into the export's spec.json; the signed bundle manifest carries it; the device runtime reads it
from the file it runs (so context length, feature size and quantile levels come from the file, not from a
second config that could disagree). A file may add facts about itself beside the spec (the exporter, its
format, the full torch config); readers ignore what they do not know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SPEC_KEY = "fedge.spec"  # the metadata key of the spec in every exported model file


class SpecError(ValueError):
    """A spec is missing, not JSON, or lacks a field a device needs."""


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and identity of an exported TSFM. ``model_id`` is a content hash of the torch weights, shared by
    every format of one export (ONNX fp32/int8, TFLite fp32/int8)."""

    context: int
    feature_dim: int
    horizon: int
    quantiles: tuple[float, ...]
    model_id: str = ""
    kind: str = "tsfm"
    patch_len: int = 0
    stride: int = 0
    n_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "context": self.context, "horizon": self.horizon, "feature_dim": self.feature_dim,
                "quantiles": list(self.quantiles), "patch_len": self.patch_len, "stride": self.stride,
                "n_params": self.n_params, "model_id": self.model_id}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelSpec:
        """Parse a spec (extra keys are file facts and ignored); SpecError names what is wrong."""
        try:
            return cls(context=int(raw["context"]), feature_dim=int(raw["feature_dim"]), horizon=int(raw["horizon"]),
                       quantiles=tuple(float(q) for q in raw["quantiles"]), model_id=str(raw.get("model_id", "")),
                       kind=str(raw.get("kind", "tsfm")), patch_len=int(raw.get("patch_len", 0)),
                       stride=int(raw.get("stride", 0)), n_params=int(raw.get("n_params", 0)))
        except (KeyError, ValueError, TypeError) as exc:
            raise SpecError(f"model spec is missing or invalid: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str | bytes]) -> ModelSpec:
        """The spec stored in a model file's metadata (ONNX custom metadata or TFLite metadata buffers)."""
        if SPEC_KEY not in meta:
            raise SpecError(f"model metadata has no {SPEC_KEY!r}")
        try:
            raw = json.loads(meta[SPEC_KEY])
        except ValueError as exc:
            raise SpecError(f"model metadata {SPEC_KEY!r} is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SpecError(f"model metadata {SPEC_KEY!r} is not a JSON object")
        return cls.from_dict(raw)

    def metadata(self, **file_facts: Any) -> dict[str, str]:
        """The metadata entry a model file carries: this spec plus facts about the file itself."""
        return {SPEC_KEY: json.dumps({**self.to_dict(), **file_facts}, sort_keys=True)}
