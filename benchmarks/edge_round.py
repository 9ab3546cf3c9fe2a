"""Edge round benchmark: wall time, peak RSS and upload bytes of one device round.

Each measured device runs in its own child process pinned to one CPU core with one ONNX Runtime
thread (the pi4 profile's budget), importing only the device stack (numpy, onnxruntime, paho,
msgpack, pydantic; torch is blocked), so the peak RSS is what a device would pay.

    python benchmarks/edge_round.py [--devices 4] [--epochs 2] [--out docs/results]

Targets (DESIGN.md §8): round ≤ 2 s and RSS ≤ 150 MB on one core, upload ≤ 32 KB.
Writes ``edge_round.json`` and ``edge_round.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"round_s": 2.0, "peak_rss_mb": 150.0, "upload_kb": 32.0}

CHILD = r"""
import json, os, sys, time
from hardware.device_guard import block_imports
block_imports()
def peak_rss_mb():
    # VmHWM belongs to this process image; getrusage's ru_maxrss would carry over the (torch-sized)
    # parent's peak across fork+exec on Linux.
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
import numpy as np
from edge_client.learning.head import slice_head
from edge_client.daemon.config import DataSource
from edge_client.learning.learner import DeviceLearner, SplitConfig
from edge_client.wire import Update, encode
from edge_client.runtime.backbone import BackboneRunner
t_import = time.perf_counter() - t0
series, season, domain = DataSource(**args["source"]).load()
t1 = time.perf_counter()
runner = BackboneRunner(args["backbone"], threads=1)
t_load = time.perf_counter() - t1
t2 = time.perf_counter()
learner = DeviceLearner(runner, series, season=season, split=SplitConfig(horizon=args["horizon"]))
t_features = time.perf_counter() - t2
with np.load(args["head"]) as data:
    head = slice_head({k: data[k] for k in data.files}, args["horizon"])
times, upload = [], 0
for r in range(args["repeats"]):
    t3 = time.perf_counter()
    out = learner.run_round(head, epochs=args["epochs"], lr=3e-3, batch_size=64, seed=r)
    payload = encode(Update(fleet="bench", device_id="bench", round_id=r + 1, base_version=0,
                            n_samples=out.n_samples, delta=out.delta, metrics=out.metrics))
    times.append(time.perf_counter() - t3)
    upload = len(payload)
print(json.dumps({
    "domain": domain, "n_train": learner.n_train, "n_eval": learner.n_eval,
    "import_s": t_import, "load_s": t_load, "features_s": t_features,
    "round_s": float(np.median(times)), "first_round_s": t_features + times[0],
    "peak_rss_mb": peak_rss_mb(), "upload_kb": upload / 1024,
    "torch_loaded": "torch" in sys.modules, "metrics": out.metrics,
}))
"""


def default_model():  # type: ignore[no-untyped-def]
    """The pretrained tiny TSFM the demo uses (trained once, then cached in ~/.cache/fedge)."""
    from coordinator.demo import DEFAULT_CACHE
    from coordinator.models.tsfm import TSFMConfig
    from coordinator.pretrain.training import pretrained_tsfm

    return pretrained_tsfm(DEFAULT_CACHE, TSFMConfig.tiny(), progress=True)


def export_default_model(workdir: Path, model=None) -> tuple[Path, Path, dict]:  # type: ignore[no-untyped-def]
    from export.onnx_export import export_model

    model = default_model() if model is None else model
    result = export_model(model, workdir)
    return result.backbone, result.head_npz, {"model_id": model.model_id(), "n_params": model.n_params(),
                                              "backbone_kb": result.backbone.stat().st_size / 1024}


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from coordinator.fleet.simulation import carve_devices

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--horizon", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        backbone, head, model_info = export_default_model(Path(tmp))
        rows = []
        for dev in carve_devices(args.devices, seed=0):
            child_args = {"source": dev.source.model_dump(), "backbone": str(backbone), "head": str(head),
                          "horizon": args.horizon, "epochs": args.epochs, "repeats": args.repeats}
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(child_args)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"benchmark child failed for {dev.device_id}:\n{proc.stderr}")
            rows.append({"device": dev.device_id, **json.loads(proc.stdout.strip().splitlines()[-1])})

    table = Table(title=f"edge round, 1 core / 1 ORT thread, {args.epochs} local epochs, horizon {args.horizon}")
    for col in ("device", "domain", "train win", "features s", "round s", "first round s", "peak RSS MB",
                "upload KB", "global→personal MSE"):
        table.add_column(col, justify="left" if col in ("device", "domain") else "right")
    for r in rows:
        m = r["metrics"]
        table.add_row(r["device"], r["domain"], str(r["n_train"]), f"{r['features_s']:.2f}", f"{r['round_s']:.3f}",
                      f"{r['first_round_s']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['upload_kb']:.1f}",
                      f"{m['global_mse']:.3f}→{m['personal_mse']:.3f}")
    console.print(table)
    worst = {k: max(r[k] for r in rows) for k in ("round_s", "first_round_s", "peak_rss_mb", "upload_kb")}
    verdict = {k: worst[k] <= TARGETS[k] for k in TARGETS}
    console.print(f"worst case: {worst}; targets {TARGETS}; met: {verdict}")

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": model_info, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
              "targets": TARGETS, "worst": worst, "met": verdict, "devices": rows}
    (args.out / "edge_round.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Edge round benchmark\n\nModel `{model_info['model_id']}` ({model_info['n_params']:,} parameters, "
             f"backbone.onnx {model_info['backbone_kb']:.0f} KB). One CPU core, one ONNX Runtime thread, torch "
             f"blocked in the device process; {args.epochs} local epochs, horizon {args.horizon}, median of "
             f"{args.repeats} rounds. *round* = local training + evaluation + encoding the update, with backbone "
             "features cached (the backbone is frozen); *first round* adds computing those features.\n",
             "| device | domain | train windows | features s | round s | first round s | peak RSS MB | upload KB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['device']} | {r['domain']} | {r['n_train']} | {r['features_s']:.2f} | {r['round_s']:.3f} | "
              f"{r['first_round_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['upload_kb']:.1f} |" for r in rows]
    lines.append(f"\nTargets: round ≤ {TARGETS['round_s']} s, RSS ≤ {TARGETS['peak_rss_mb']:.0f} MB, upload ≤ "
                 f"{TARGETS['upload_kb']:.0f} KB. Worst case measured: round {worst['round_s']:.3f} s (first round "
                 f"{worst['first_round_s']:.2f} s), RSS {worst['peak_rss_mb']:.0f} MB, upload "
                 f"{worst['upload_kb']:.1f} KB.\n")
    (args.out / "edge_round.md").write_text("\n".join(lines))
    console.print(f"wrote {args.out / 'edge_round.json'} and {args.out / 'edge_round.md'}")


if __name__ == "__main__":
    main()
