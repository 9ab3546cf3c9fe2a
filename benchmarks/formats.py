"""fp32 vs int8 backbone: file size, forecast error against torch and forecast MSE on ETTh1 test.

Exports the default pretrained TSFM (``TSFMConfig.tiny()``, cached in ``$FEDGE_CACHE`` or
``~/.cache/fedge``) to a temporary directory, quantises the backbone (ONNX Runtime dynamic, QInt8
weights) and compares torch, ONNX fp32 and ONNX int8 point forecasts on the ETTh1 test windows
(standard scaling, all 7 channels). Errors are in scaled units.

    python benchmarks/formats.py [--stride 4] [--out docs/results]

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


def measure(stride: int) -> dict:
    from coordinator.demo import DEFAULT_CACHE
    from coordinator.models.tsfm import TSFMConfig
    from coordinator.pretrain.central import pretrained_tsfm, split_windows
    from export.onnx_export import export_model
    from export.quantize import format_report, quantize_backbone, rows_as_dicts

    model = pretrained_tsfm(DEFAULT_CACHE, TSFMConfig.tiny(), progress=True)
    x, y = split_windows("etth1", "test", model.config.context, model.config.horizon, stride=stride)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_model(model, tmp)
        t0 = time.perf_counter()
        int8 = quantize_backbone(exported.backbone)
        quantize_s = time.perf_counter() - t0
        rows = format_report(model, exported.backbone, int8, (x, y))
    return {"model_id": model.model_id(), "n_params": model.n_params(), "windows": len(x), "stride": stride,
            "context": model.config.context, "horizon": model.config.horizon, "quantize_s": quantize_s,
            "platform": platform.platform(), "rows": rows_as_dicts(rows), "_rows": rows}


def markdown(result: dict) -> str:
    from export.quantize import report_table

    return "\n".join([
        "# Backbone formats: fp32 vs int8",
        "",
        f"Model `{result['model_id']}` ({result['n_params']:,} parameters, context {result['context']}, horizon "
        f"{result['horizon']}). {result['windows']} ETTh1 test windows (stride {result['stride']}, all channels, "
        "standard-scaled). Errors are of the point forecast against torch, in scaled units; MSE is against the "
        "truth. int8 = ONNX Runtime dynamic quantisation, QInt8 weights, activations quantised at run time.",
        "",
        report_table(result["_rows"]),
        "",
        "Produced by `python benchmarks/formats.py`.",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stride", type=int, default=4, help="window stride over the test split")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    result = measure(args.stride)
    md = markdown(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "formats.md").write_text(md)
    (args.out / "formats.json").write_text(json.dumps({k: v for k, v in result.items() if k != "_rows"}, indent=2)
                                           + "\n")


if __name__ == "__main__":
    main()
