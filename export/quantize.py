"""int8 backbone for small devices, and the evidence that it still forecasts like the fp32 one.

:func:`quantize_backbone` applies ONNX Runtime's *dynamic* quantisation (int8 weights, activations
quantised per batch at run time). It needs no calibration data, so the coordinator can ship an int8
file for every export without holding any device's data, and it shrinks the MatMul-heavy backbone
~3x. The quantised file keeps the ``fedge.spec`` metadata: a device reads context, horizon and
quantiles from the file it runs, whatever its format.

:func:`format_report` measures what the shrink costs, per format, on real windows: file size, how
far the forecasts move from torch (max/mean absolute error) and the forecast MSE against the truth,
with its change against fp32 (the number that says whether int8 is safe to deploy).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export.onnx_export import SPEC_KEY, _session, _set_metadata, numpy_head, read_spec

log = logging.getLogger(__name__)

INT8_NAME = "backbone.int8.onnx"


def quantize_backbone(fp32_path: str | os.PathLike[str], int8_path: str | os.PathLike[str] | None = None,
                      *, per_channel: bool = False) -> Path:
    """Write an int8 (dynamic, QInt8 weights) copy of an exported backbone next to it (or at
    `int8_path`) and return its path. The spec metadata is copied and marked ``"format": "int8"``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = Path(fp32_path)
    dst = Path(int8_path) if int8_path is not None else src.with_name(INT8_NAME)
    spec = read_spec(src)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "q.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT's "consider pre-processing" hint goes to the root logger every call
        try:
            quantize_dynamic(str(src), str(raw), weight_type=QuantType.QInt8, per_channel=per_channel)
        finally:
            root.setLevel(level)
        proto = onnx.load(str(raw), load_external_data=True)
    _set_metadata(proto, {SPEC_KEY: _spec_json({**spec, "format": "int8", "quantization": "dynamic-qint8"})})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst), save_as_external_data=False)
    log.info("quantized %s (%.0f KB) -> %s (%.0f KB)", src.name, src.stat().st_size / 1024, dst.name,
             dst.stat().st_size / 1024)
    return dst


def _spec_json(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


# ------------------------------------------------------------------------------------ report


@dataclass
class FormatRow:
    """One format's cost and accuracy. Errors are on the de-normalised point forecast vs torch."""

    format: str
    size_kb: float
    max_abs_err: float
    mean_abs_err: float
    mse: float
    mse_change: float  # mse - fp32 mse
    mse_change_pct: float


def onnx_point_forecast(backbone_path: str | os.PathLike[str], head_state: dict[str, np.ndarray], x: np.ndarray,
                        batch_size: int = 512) -> np.ndarray:
    """Point forecasts (N, H) the way a device computes them: ORT backbone + numpy head + RevIN."""
    sess = _session(backbone_path)
    out = []
    for i in range(0, len(x), batch_size):
        feats, loc, scale = sess.run(None, {"context": np.ascontiguousarray(x[i : i + batch_size], np.float32)})
        point_n, _ = numpy_head(head_state, feats)
        out.append(point_n * scale + loc)
    return np.concatenate(out) if out else np.zeros((0, len(head_state["point_bias"])), np.float32)


def format_report(model: Any, fp32_path: str | os.PathLike[str], int8_path: str | os.PathLike[str],
                  windows: tuple[np.ndarray, np.ndarray]) -> list[FormatRow]:
    """Rows for torch (reference), fp32 ONNX and int8 ONNX on the same (x, y) windows."""
    from coordinator.pretrain.central import predict

    x, y = np.asarray(windows[0], np.float32), np.asarray(windows[1], np.float32)
    reference = predict(model, x)[0]
    state = model.head_state()
    forecasts = {"torch": reference}
    sizes = {"torch": float("nan")}
    for name, path in (("onnx-fp32", fp32_path), ("onnx-int8", int8_path)):
        forecasts[name] = onnx_point_forecast(path, state, x)
        sizes[name] = Path(path).stat().st_size / 1024
    base = float(np.mean((forecasts["onnx-fp32"] - y) ** 2))
    rows = []
    for name, fc in forecasts.items():
        err = np.abs(fc - reference)
        m = float(np.mean((fc - y) ** 2))
        rows.append(FormatRow(name, sizes[name], float(err.max()), float(err.mean()), m, m - base,
                              100.0 * (m - base) / base if base else 0.0))
    return rows


def report_table(rows: list[FormatRow]) -> str:
    """Markdown table of :func:`format_report` rows."""
    lines = ["| format | size KB | max abs err vs torch | mean abs err vs torch | forecast MSE | ΔMSE vs fp32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = "–" if np.isnan(r.size_kb) else f"{r.size_kb:.0f}"
        lines.append(f"| {r.format} | {size} | {r.max_abs_err:.2e} | {r.mean_abs_err:.2e} | {r.mse:.5f} | "
                     f"{r.mse_change:+.1e} ({r.mse_change_pct:+.3f} %) |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[FormatRow]) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(r).items()} for r in rows]
