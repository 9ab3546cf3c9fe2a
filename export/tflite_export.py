"""torch TSFM backbone -> ``backbone.tflite`` (fp32) and ``backbone.int8.tflite`` (dynamic-range int8) for LiteRT.

Converter choice: **litert-torch** (0.10.0), straight from the torch module. It converts our backbone
with CPU torch 2.13 at parity ~1e-6 and needs no ONNX or TensorFlow detour (onnx2tf would add
TensorFlow, ~2 GB, and an ONNX->TF re-layout step for no gain here). Its one limitation for us: it
cannot lower the RevIN mean with a symbolic batch dimension, so the file gets one fixed-batch signature
per size in :data:`SIGNATURE_BATCHES` (weights shared; the device runtime splits rows across them).

Why a subprocess: litert-torch pins typing-extensions < 4.13 (so an old pydantic), pulls JAX, and an
unpinned install drags a CUDA torch (several GB). It therefore lives in its own virtualenv,
``$FEDGE_TFLITE_ENV`` or ``~/.cache/fedge/tflite-env``, created on demand by :func:`ensure_env` with the
pins in :data:`CONVERT_PINS` (torch==2.13.0: the CPU build; elsewhere point pip at a CPU wheel index
via ``PIP_EXTRA_INDEX_URL``). This process hands the worker (``export/_tflite_worker.py``, which imports
nothing from fedge) a ``torch.export`` program of the backbone (``.pt2``; same torch on both sides), the
spec and a sample; the worker converts, quantises, embeds the spec as TFLite metadata ``fedge.spec`` and
runs the files on the sample; this side measures parity against torch with the ONNX export's own code.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from coordinator.models.tsfm import TSFM
from edge_client.runtime.backbone import sha256_file
from edge_client.runtime.spec import SPEC_KEY
from export.onnx_export import (
    ParityReport,
    denormalised,
    file_spec,
    numpy_head,
    parity_sample,
    torch_reference,
)

log = logging.getLogger(__name__)

TFLITE_NAME = "backbone.tflite"
TFLITE_INT8_NAME = "backbone.int8.tflite"
SIGNATURE_BATCHES = (1, 8, 32)
# What the conversion env gets; bump together (tested combination). torch==2.13.0 is the CPU wheel here.
CONVERT_PINS = ("torch==2.13.0", "litert-torch==0.10.0", "ai-edge-litert==2.3.0", "ai-edge-quantizer==0.10.0")
WORKER = Path(__file__).with_name("_tflite_worker.py")
_PINS_FILE = "fedge-pins.txt"
_CONVERT_TIMEOUT_S = 1800


def default_env_dir() -> Path:
    """Where the conversion virtualenv lives: $FEDGE_TFLITE_ENV, else <fedge cache>/tflite-env."""
    if os.environ.get("FEDGE_TFLITE_ENV"):
        return Path(os.environ["FEDGE_TFLITE_ENV"])
    return Path(os.environ.get("FEDGE_CACHE", Path.home() / ".cache" / "fedge")) / "tflite-env"


def env_python(env_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The conversion env's interpreter if the env exists with the current pins, else None."""
    d = Path(env_dir) if env_dir is not None else default_env_dir()
    py = d / "bin" / "python"
    pins = d / _PINS_FILE
    if py.is_file() and pins.is_file() and pins.read_text().split() == list(CONVERT_PINS):
        return py
    return None


def ensure_env(env_dir: str | os.PathLike[str] | None = None) -> Path:
    """Create (or repair) the conversion virtualenv with :data:`CONVERT_PINS`; returns its python.
    Costs ~2 GB and a few minutes once; the pins file marks a finished install."""
    d = Path(env_dir) if env_dir is not None else default_env_dir()
    py = env_python(d)
    if py is not None:
        return py
    log.warning("creating the TFLite conversion env %s (litert-torch, CPU torch, JAX: ~2 GB, a few minutes)", d)
    venv.EnvBuilder(with_pip=True, clear=(d / "bin" / "python").exists()).create(d)
    cmd = [str(d / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *CONVERT_PINS]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"installing the conversion env failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    (d / _PINS_FILE).write_text("\n".join(CONVERT_PINS) + "\n")
    return d / "bin" / "python"


class _NamedBackbone(nn.Module):
    """The backbone with named outputs: litert-torch names a signature's outputs after dict keys, so
    the .tflite file says features/loc/scale like the ONNX graph does."""

    def __init__(self, model: TSFM) -> None:
        super().__init__()
        self.backbone = model.backbone

    def forward(self, context: torch.Tensor) -> dict[str, torch.Tensor]:
        features, loc, scale = self.backbone(context)
        return {"features": features, "loc": loc, "scale": scale}


@dataclass
class TFLiteExport:
    """Files written by :func:`export_tflite` and their parity against torch (same fields as ONNX)."""

    paths: dict[str, Path]  # "fp32" / "int8" -> file
    parity: dict[str, ParityReport]
    convert_s: float
    spec: dict[str, Any]


def _parity(model: TSFM, x: np.ndarray, results: dict[str, np.ndarray], fmt: str) -> ParityReport:
    """Features of the converted file (per row and as one batch) and the device forecast built from
    them (numpy head + RevIN) against torch, like :func:`export.onnx_export.check_parity`."""
    feats_t, forecast_t, loc_t, scale_t = torch_reference(model, x)
    state = model.head_state()
    feat_err, fc_err, fc_scaled, sizes = [], [], [], []
    for prefix, size in (("b1", 1), ("full", len(x))):
        if f"{fmt}_{prefix}_features" not in results:
            continue
        f, loc, scale = (results[f"{fmt}_{prefix}_{k}"] for k in ("features", "loc", "scale"))
        forecast = denormalised(*numpy_head(state, f), loc, scale)
        feat_err.append(np.abs(f - feats_t).ravel())
        err = np.abs(forecast - forecast_t)
        fc_err.append(err.ravel())
        fc_scaled.append((err / scale_t).ravel())
        sizes.append(size)
    if not sizes:
        raise RuntimeError(f"the conversion worker returned no outputs for {fmt}")
    np_err = np.abs(denormalised(*numpy_head(state, feats_t), loc_t, scale_t) - forecast_t)
    feat_all, fc_all = np.concatenate(feat_err), np.concatenate(fc_err)
    return ParityReport(float(feat_all.max()), float(feat_all.mean()), float(fc_all.max()), float(fc_all.mean()),
                        float(np_err.max()), float(np.concatenate(fc_scaled).max()), sorted(set(sizes)))


def export_tflite(
    model: TSFM, out_dir: str | os.PathLike[str], *, int8: bool = True, python: str | os.PathLike[str] | None = None,
    sample: np.ndarray | None = None, tol: float = 1e-4, create_env: bool = True,
) -> TFLiteExport:
    """Write ``backbone.tflite`` (and ``backbone.int8.tflite``) into `out_dir` and check parity.

    Raises RuntimeError when the fp32 file's parity is worse than `tol` (as the ONNX export does);
    the int8 file is reported, not gated (its error is the quantisation's, see benchmarks/formats.py).
    If `out_dir` holds the ONNX export's spec.json, the TFLite files and parity are added to it.
    """
    py = Path(python) if python is not None else (ensure_env() if create_env else env_python())
    if py is None:
        raise RuntimeError(f"no TFLite conversion env at {default_env_dir()}; call export.tflite_export.ensure_env()")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = np.ascontiguousarray(parity_sample(model) if sample is None else sample, dtype=np.float32)
    spec = file_spec(model, graph="backbone", exporter="litert-torch", inputs=["context"],
                     outputs=["features", "loc", "scale"])
    paths = {"fp32": out / TFLITE_NAME, **({"int8": out / TFLITE_INT8_NAME} if int8 else {})}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        with torch.no_grad():
            program = torch.export.export(_NamedBackbone(model), (), kwargs={"context": torch.from_numpy(x)},
                                          dynamic_shapes={"context": {0: batch}})
        torch.export.save(program, str(t / "backbone.pt2"))
        (t / "spec.json").write_text(json.dumps(spec))
        np.savez(t / "sample.npz", x=x)
        cmd = [str(py), str(WORKER), "--program", str(t / "backbone.pt2"), "--spec", str(t / "spec.json"),
               "--sample", str(t / "sample.npz"), "--spec-key", SPEC_KEY, "--out", str(paths["fp32"]),
               "--result", str(t / "result.npz"),
               "--batches", ",".join(str(b) for b in SIGNATURE_BATCHES)]
        if int8:
            cmd += ["--int8-out", str(paths["int8"])]
        t0 = time.perf_counter()
        # a clean environment for the other venv: no PYTHONPATH/PYTHONHOME leaking fedge's packages in
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=_CONVERT_TIMEOUT_S, check=False)
        convert_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"TFLite conversion failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with np.load(t / "result.npz") as data:
            results = {k: data[k] for k in data.files}
    parity = {fmt: _parity(model, x, results, fmt) for fmt in paths}
    if not parity["fp32"].ok(tol):
        raise RuntimeError(f"TFLite parity check failed (tol {tol}): {parity['fp32']}")
    log.info("exported %s in %.1f s: parity %s", ", ".join(p.name for p in paths.values()), convert_s, parity)
    _update_spec_json(out / "spec.json", paths, parity)
    return TFLiteExport(paths, parity, convert_s, spec)


def _update_spec_json(spec_path: Path, paths: dict[str, Path], parity: dict[str, ParityReport]) -> None:
    """Record the TFLite files (sha256, bytes) and parity beside the ONNX ones, if an export is there."""
    if not spec_path.is_file():
        return
    spec = json.loads(spec_path.read_text())
    spec.setdefault("files", {}).update(
        {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in paths.values()})
    spec["parity_tflite"] = {fmt: asdict(r) for fmt, r in parity.items()}
    spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def main() -> int:
    """``python -m export.tflite_export --ensure-env``: build the conversion env ahead of time."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--ensure-env", action="store_true", help="create the conversion virtualenv")
    ap.add_argument("--env-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.ensure_env:
        print(ensure_env(args.env_dir))
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
