"""Runs INSIDE the TFLite conversion virtualenv (litert-torch, CPU torch, ai-edge-litert), never in fedge's own.

It is a standalone script on purpose: litert-torch pins typing-extensions < 4.13 (so an old pydantic)
and pulls JAX, so it cannot share an environment with the coordinator, and this file imports nothing
from fedge. The parent (:mod:`export.tflite_export`) hands it a ``torch.export`` program of the
backbone (``.pt2``, same torch version on both sides), the spec and a sample batch; it writes:

* ``<out>`` -- the fp32 ``.tflite`` with one fixed-batch signature per batch size (litert-torch
  cannot lower the RevIN mean with a symbolic batch dimension), inputs ``context`` and outputs
  ``features``/``loc``/``scale`` named like the ONNX graph;
* optionally ``<int8_out>`` -- dynamic-range int8 (int8 weights, float activations) made with
  ai-edge-quantizer's ``dynamic_wi8_afp32`` recipe;
* the spec JSON embedded in each file as TFLite model metadata ``fedge.spec`` (the device reads it
  with a small flatbuffer reader, like the ONNX metadata);
* ``<result>`` (npz) -- each file's features/loc/scale on the sample, for the parity report.

    python _tflite_worker.py --program p.pt2 --spec spec.json --sample x.npz --out b.tflite \
        --result r.npz [--int8-out b.int8.tflite] [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

OUTPUTS = ("features", "loc", "scale")


def convert(program_path: Path, batches: list[int], width: int) -> bytes:
    import litert_torch
    import torch

    module = torch.export.load(str(program_path)).module()
    converter = None
    for b in batches:
        example = {"context": torch.zeros(b, width).normal_(generator=torch.Generator().manual_seed(b)).cumsum(1)}
        name = f"batch_{b}"
        converter = (litert_torch.signature(name, module, sample_kwargs=example) if converter is None
                     else converter.signature(name, module, sample_kwargs=example))
    return bytes(converter.convert().model_content())


def quantize_int8(model: bytes) -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(model, recipe.dynamic_wi8_afp32())
    return bytes(q.quantize().quantized_model)


def add_metadata(model: bytes, key: str, value: bytes) -> bytes:
    """Append (or replace) one named metadata buffer with the schema's object API, then re-pack into one
    self-contained flatbuffer."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    for b in m.buffers:  # ai-edge-quantizer appends large constants after the flatbuffer (offset/size):
        if b.offset > 1:  # re-packing would drop that tail, so pull them inside (fine below 2 GB)
            b.data = np.frombuffer(model, dtype=np.uint8, count=b.size, offset=b.offset)
            b.offset = b.size = 0
    buf = schema.BufferT()
    buf.data = np.frombuffer(value, dtype=np.uint8)
    m.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name = key
    entry.buffer = len(m.buffers) - 1
    m.metadata = [md for md in (m.metadata or []) if md.name not in (key, key.encode())] + [entry]
    builder = flatbuffers.Builder(len(model) + len(value) + 1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def run(model_path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of the converted file on x, one row at a time through the batch-1 signature and in
    full batches where x fits one: the parent compares both against torch."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model_path), num_threads=1)
    sigs = interp.get_signature_list()
    by_batch = {int(k.split("_")[1]): interp.get_signature_runner(k) for k in sigs}
    rows = [by_batch[1](context=x[i : i + 1]) for i in range(len(x))] if 1 in by_batch else []
    out = {f"b1_{k}": np.concatenate([r[k] for r in rows]) for k in OUTPUTS} if rows else {}
    if len(x) in by_batch:
        full = by_batch[len(x)](context=x)
        out.update({f"full_{k}": full[k] for k in OUTPUTS})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--program", type=Path, required=True)
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--sample", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--int8-out", type=Path)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--spec-key", required=True, help="the metadata key of the spec (edge_client.runtime.spec)")
    args = ap.parse_args()
    spec = json.loads(args.spec.read_text())
    x = np.load(args.sample)["x"].astype(np.float32)
    batches = sorted({int(b) for b in args.batches.split(",")})
    fp32 = convert(args.program, batches, int(spec["context"]))
    files = {"fp32": (args.out, fp32)}
    if args.int8_out:
        files["int8"] = (args.int8_out, quantize_int8(fp32))
    result = {}
    for fmt, (path, model) in files.items():
        meta = json.dumps({**spec, "format": f"tflite-{fmt}", "signature_batches": batches}, sort_keys=True)
        path.write_bytes(add_metadata(model, args.spec_key, meta.encode()))
        result.update({f"{fmt}_{k}": v for k, v in run(path, x).items()})
    np.savez(args.result, **result)
    print(json.dumps({"files": {fmt: str(p) for fmt, (p, _) in files.items()}}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
