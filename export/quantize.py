"""int8 backbone for small devices, and the evidence that it still forecasts like the fp32 one.

:func:`quantize_backbone` applies ONNX Runtime's *dynamic* quantisation (int8 weights, activations
quantised per batch at run time). It needs no calibration data, so the coordinator can ship an int8
file for every export without holding any device's data, and it shrinks the MatMul-heavy backbone
~3x. The quantised file keeps the ``fedge.spec`` metadata: a device reads context, horizon and
quantiles from the file it runs, whatever its format.

:func:`formats_report` measures what each format costs, on real windows and through the device's own
runtime (ONNX Runtime or LiteRT, :class:`edge_client.runtime.backbone.BackboneRunner`): file size, how far the
features and forecasts move from torch (max/mean absolute error), the forecast MSE against the truth
with its change against ONNX fp32 (the number that says whether a format is safe to deploy), and the
backbone's time per window on one thread.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge_client.runtime.backbone import BackboneRunner
from edge_client.runtime.spec import SPEC_KEY
from export.onnx_export import numpy_head, read_spec, set_metadata

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
            # reduce_range: 7-bit weights. x86 CPUs without VNNI (AVX2 only, e.g. an AMD EPYC CI machine)
            # multiply u8 activations by s8 weights with vpmaddubsw, whose int16 pair sums saturate at
            # full-range weights: the tiny test backbone's forecast moved by up to 0.55 there (0.03 mean),
            # within 0.1 with it. ONNX Runtime's docs recommend it for U8S8 on x86; ARM is unaffected.
            quantize_dynamic(str(src), str(raw), weight_type=QuantType.QInt8, per_channel=per_channel,
                             reduce_range=True)
        finally:
            root.setLevel(level)
        proto = onnx.load(str(raw), load_external_data=True)
    set_metadata(proto, {SPEC_KEY: _spec_json({**spec, "format": "int8", "quantization": "dynamic-qint8"})})
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
    """One format's cost and accuracy. Errors are against torch on the same windows: the backbone
    features, and the de-normalised point forecast (device path: backbone runtime + numpy head)."""

    format: str
    size_kb: float
    max_abs_err: float  # point forecast vs torch
    mean_abs_err: float
    mse: float
    mse_change: float  # mse - fp32 mse
    mse_change_pct: float
    feat_max_abs_err: float = 0.0  # backbone features vs torch
    feat_mean_abs_err: float = 0.0
    runtime: str = "torch"
    ms_per_window: float = float("nan")  # backbone, one thread, batches of 32, this machine


def device_point_forecast(backbone_path: str | os.PathLike[str], head_state: dict[str, np.ndarray], x: np.ndarray,
                          ) -> tuple[np.ndarray, np.ndarray, BackboneRunner, float]:
    """(point forecasts (N, H), features (N, D), runner, seconds) the way a device computes them: its
    backbone runtime (ONNX Runtime or LiteRT, from the file) on one thread + numpy head + RevIN."""
    runner = BackboneRunner(backbone_path, threads=1)
    t0 = time.perf_counter()
    f = runner.features(x)
    seconds = time.perf_counter() - t0
    point_n, _ = numpy_head(head_state, f.feats)
    return point_n * f.scale + f.loc, f.feats, runner, seconds


def formats_report(model: Any, backbones: Mapping[str, str | os.PathLike[str]],
                   windows: tuple[np.ndarray, np.ndarray], baseline: str = "onnx-fp32") -> list[FormatRow]:
    """Rows for torch (reference) and each named backbone file on the same (x, y) windows; the MSE
    change is against `baseline` (torch when it is not among the backbones)."""
    import torch

    from coordinator.models.tsfm import forecast

    x, y = np.asarray(windows[0], np.float32), np.asarray(windows[1], np.float32)
    reference = forecast(model, x)[0]
    with torch.no_grad():
        feats_t = np.concatenate([model.features(torch.from_numpy(x[i : i + 1024]))[0].numpy()
                                  for i in range(0, len(x), 1024)]) if len(x) else np.zeros((0, 0), np.float32)
    state = model.head_state()
    rows = [("torch", reference, feats_t, float("nan"), "torch", float("nan"))]
    for name, path in backbones.items():
        fc, feats, runner, seconds = device_point_forecast(path, state, x)
        rows.append((name, fc, feats, Path(path).stat().st_size / 1024, runner.runtime_version,
                     1e3 * seconds / max(1, len(x))))
    mses = {name: float(np.mean((fc - y) ** 2)) for name, fc, *_ in rows}
    base = mses.get(baseline, mses["torch"])
    out = []
    for name, fc, feats, size, runtime, ms in rows:
        err, ferr = np.abs(fc - reference), np.abs(feats - feats_t)
        m = mses[name]
        out.append(FormatRow(name, size, float(err.max()), float(err.mean()), m, m - base,
                             100.0 * (m - base) / base if base else 0.0, float(ferr.max()), float(ferr.mean()),
                             runtime, ms))
    return out


def format_report(model: Any, fp32_path: str | os.PathLike[str], int8_path: str | os.PathLike[str],
                  windows: tuple[np.ndarray, np.ndarray]) -> list[FormatRow]:
    """Rows for torch (reference), fp32 ONNX and int8 ONNX on the same (x, y) windows."""
    return formats_report(model, {"onnx-fp32": fp32_path, "onnx-int8": int8_path}, windows)


def report_table(rows: list[FormatRow]) -> str:
    """Markdown table of :func:`format_report` rows."""
    lines = ["| format | runtime | size KB | features max / mean abs err | forecast max / mean abs err | "
             "forecast MSE | ΔMSE vs fp32 | ms/window |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = "–" if np.isnan(r.size_kb) else f"{r.size_kb:.0f}"
        ms = "–" if np.isnan(r.ms_per_window) else f"{r.ms_per_window:.3f}"
        lines.append(f"| {r.format} | {r.runtime} | {size} | {r.feat_max_abs_err:.1e} / {r.feat_mean_abs_err:.1e} | "
                     f"{r.max_abs_err:.1e} / {r.mean_abs_err:.1e} | {r.mse:.5f} | "
                     f"{r.mse_change:+.1e} ({r.mse_change_pct:+.3f} %) | {ms} |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[FormatRow]) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(r).items()} for r in rows]
