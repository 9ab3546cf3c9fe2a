"""Backbone formats (ONNX fp32/int8, TFLite fp32/int8): size, error against torch, forecast MSE on ETTh1 test.

Exports the default pretrained TSFM (``TSFMConfig.tiny()``, cached in ``$FEDGE_CACHE`` or
``~/.cache/fedge``) to a temporary directory, quantises the backbone (ONNX Runtime dynamic, QInt8
weights), converts it to TFLite (litert-torch in its conversion env; fp32 and dynamic-range int8) and
runs every file through the device's own runtime (ONNX Runtime or LiteRT) on the ETTh1 test windows
(standard scaling, all 7 channels), against torch. Errors are in scaled units. Without the conversion
env (``python -m export.tflite_export --ensure-env``) the TFLite rows are left out, and the report says so.

    python benchmarks/formats.py [--stride 4] [--no-tflite] [--out docs/results]

Writes ``formats.json`` and ``formats.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(stride: int, tflite: bool) -> dict:
    from coordinator.demo import DEFAULT_CACHE
    from coordinator.models.tsfm import TSFMConfig
    from coordinator.pretrain.training import pretrained_tsfm
    from coordinator.pretrain.windows import split_windows
    from export.onnx_export import export_model
    from export.quantize import formats_report, quantize_backbone, rows_as_dicts
    from export.tflite_export import CONVERT_PINS, env_python, export_tflite

    model = pretrained_tsfm(DEFAULT_CACHE, TSFMConfig.tiny(), progress=True)
    x, y = split_windows("etth1", "test", model.config.context, model.config.horizon, stride=stride)
    tflite_note = None
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_model(model, tmp)
        t0 = time.perf_counter()
        int8 = quantize_backbone(exported.backbone)
        quantize_s = time.perf_counter() - t0
        files = {"onnx-fp32": exported.backbone, "onnx-int8": int8}
        convert_s = None
        if tflite and env_python() is not None:
            converted = export_tflite(model, tmp, create_env=False)
            files.update({f"tflite-{fmt}": path for fmt, path in converted.paths.items()})
            convert_s = converted.convert_s
        else:
            tflite_note = "TFLite rows left out: " + ("--no-tflite" if not tflite else "no conversion env")
        rows = formats_report(model, files, (x, y))
    return {"model_id": model.model_id(), "n_params": model.n_params(), "windows": len(x), "stride": stride,
            "context": model.config.context, "horizon": model.config.horizon, "quantize_s": quantize_s,
            "tflite_convert_s": convert_s, "tflite_pins": list(CONVERT_PINS), "tflite_note": tflite_note,
            "platform": platform.platform(), "rows": rows_as_dicts(rows), "_rows": rows}


def markdown(result: dict) -> str:
    from export.quantize import report_table

    lines = [
        "# Backbone formats: ONNX and TFLite, fp32 and int8",
        "",
        f"Model `{result['model_id']}` ({result['n_params']:,} parameters, context {result['context']}, horizon "
        f"{result['horizon']}). {result['windows']} ETTh1 test windows (stride {result['stride']}, all channels, "
        "standard-scaled). Every file runs through the device's own runtime (`BackboneRunner`: ONNX Runtime or "
        "LiteRT) with the numpy head. Errors are against torch: backbone features, and the point forecast in "
        "scaled units; MSE is against the truth. onnx-int8 = ONNX Runtime dynamic quantisation (QInt8 weights, "
        "activations quantised at run time); tflite-fp32 = litert-torch conversion (fixed-batch signatures 1/8/32); "
        "tflite-int8 = ai-edge-quantizer dynamic range (int8 weights, float activations). ms/window: backbone only, "
        "one thread, batches of 32, on a 2-core x86 machine shared with other jobs: indicative only (device "
        "timings are the edge benchmarks' job).",
        "",
        report_table(result["_rows"]),
        "",
    ]
    if result.get("tflite_note"):
        lines += [f"{result['tflite_note']}.", ""]
    if result.get("tflite_convert_s") is not None:
        lines += [f"TFLite conversion (subprocess in its own env: {', '.join(result['tflite_pins'])}) took "
                  f"{result['tflite_convert_s']:.0f} s.", ""]
    return "\n".join([*lines, "Produced by `python benchmarks/formats.py`.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stride", type=int, default=4, help="window stride over the test split")
    ap.add_argument("--no-tflite", action="store_true", help="skip the TFLite conversion and rows")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    result = measure(args.stride, tflite=not args.no_tflite)
    md = markdown(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "formats.md").write_text(md)
    (args.out / "formats.json").write_text(json.dumps({k: v for k, v in result.items() if k != "_rows"}, indent=2)
                                           + "\n")


if __name__ == "__main__":
    main()
