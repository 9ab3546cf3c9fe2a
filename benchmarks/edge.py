"""Edge benchmark per device profile and model format, through the hardware-in-loop harness.

Every row is one full federated round (``hardware.hil.run_hil``): a private Mosquitto, ``fedge serve``
and the real ``fedge-edge run`` daemon pinned to the profile's cores (capped by this host), with the
profile's ORT thread count, under a memory cgroup of the profile's RAM, torch blocked. Rows run
natively on this host and, where ``hardware/qemu/make-rootfs.sh`` has been run, on an aarch64 CPython
under qemu user-mode emulation (emulated timings are not hardware timings: labelled so).

    python benchmarks/edge.py [--profiles pi4,pi5,jetson-orin-nano] [--formats onnx,int8,tflite,tflite-int8]
                              [--emulate native,qemu] [--repeats 3] [--model-dir DIR] [--out docs/results]

Writes ``edge.json`` and ``edge.md``. Columns: *ready* = daemon start to round opened (imports, model
load, backbone features for every local window, hello); *round* = the coordinator's round (task sent,
local training, update received, aggregated); *peak RSS* = the daemon's VmHWM (under qemu: the
emulator process, its translation cache included); *upload* = the stored update message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_round import ROOT, TARGETS, default_model, export_default_model

from edge_client.runtime.profile import list_profiles, load_profile
from hardware.emulation import EmulationUnavailable, host_arch, qemu_python
from hardware.hil import HIL_FORMATS, HilResult, exit_on_sigterm, model_files, run_hil


def prepare_formats(model, model_dir: Path, formats: list[str]) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Make the export directory hold every asked format; returns {format: why it is missing}."""
    missing = {}
    if any(f.startswith("tflite") for f in formats) and not (model_dir / HIL_FORMATS["tflite"]).is_file():
        try:
            if model is None:
                raise RuntimeError(f"{model_dir} has no {HIL_FORMATS['tflite']} and no torch model to convert")
            from export.tflite_export import export_tflite

            export_tflite(model, model_dir, create_env=False)
        except (ImportError, RuntimeError, OSError) as exc:
            for f in formats:
                if f.startswith("tflite"):
                    missing[f] = f"no TFLite export: {exc}"
    for f in formats:
        if f not in missing:
            try:
                model_files(model_dir, f)  # makes the int8 ONNX file on demand
            except (FileNotFoundError, ValueError) as exc:
                missing[f] = str(exc)
    return missing


def one_row(profile: str, model_dir: Path, fmt: str, emulate: str, repeats: int, local_epochs: int) -> dict:
    """Median timings over `repeats` rounds (each a fresh coordinator + daemon), worst memory."""
    runs: list[HilResult] = []
    for _ in range(repeats):
        res = run_hil(profile, model_dir, fmt=fmt, emulate=emulate, local_epochs=local_epochs)
        runs.append(res)
        if not res.ok:
            break
    last = runs[-1]
    ok = [r for r in runs if r.ok]
    row = {k: v for k, v in last.as_dict().items() if not k.endswith("_log_tail")}
    row["repeats"] = len(ok)
    if len(ok) == len(runs):
        row["ready_s"] = statistics.median(r.ready_s for r in ok)
        row["round_s"] = statistics.median(r.round_s for r in ok)
        row["peak_rss_mb"] = max(r.peak_rss_mb for r in ok)
        peaks = [r.cgroup_peak_mb for r in ok if r.cgroup_peak_mb is not None]
        row["cgroup_peak_mb"] = max(peaks) if peaks else None
    else:
        row["device_log_tail"] = last.daemon_log_tail
    return row


def targets_met(row: dict) -> bool | None:
    """DESIGN.md §8 targets for one row; None when the round failed (nothing to compare)."""
    if not row["ok"]:
        return None
    return (row["round_s"] <= TARGETS["round_s"] and row["peak_rss_mb"] <= TARGETS["peak_rss_mb"]
            and row["upload_bytes"] / 1024 <= TARGETS["upload_kb"])


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    m = report["model"]
    lines = [
        "# Edge benchmark per device profile and format (hardware-in-loop)\n",
        f"Model `{m['model_id']}` ({m['n_params']:,} parameters). Each row: one full federated round through "
        "`hardware/hil.py` — private Mosquitto, `fedge serve` subprocess, the real `fedge-edge run` daemon "
        "(torch blocked) pinned to the profile's cores (capped by this host's "
        f"{report['machine']['host_cpus']} CPUs), the profile's ORT threads, under a memory cgroup of the "
        f"profile's RAM; {report['settings']['local_epochs']} local epochs, horizon 24, median of "
        f"{report['settings']['repeats']} rounds (emulated rows: 1 round, profiles "
        f"{', '.join(report['settings']['qemu_profiles'])}). Host: {report['machine']['cpu']}, "
        f"Python {report['machine']['python']}.\n",
        "**Emulated rows are not hardware timings**: an aarch64 CPython and the aarch64 wheels under qemu "
        "user-mode emulation on an x86-64 host; they show that the device stack runs on aarch64 and how its "
        "memory behaves, not how fast a Pi or a Jetson is. Native rows are this x86-64 host held to the "
        "profile's core count and memory; a real Cortex-A72 (pi4) is several times slower per core.\n",
        "| profile | format | runtime | run | CPUs | ORT threads | memory limit | model KB | ready s | round s | "
        "peak RSS MB | cgroup peak MB | upload KB | result |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        run = f"emulated {r['arch']}" if r["emulated"] else f"native {r['arch']}"
        result = "ok" if r["ok"] else f"**failed**: {r['error']}"
        lines.append(
            f"| {r['profile']} | {r['format']} | {r['runtime'] or '–'} | {run} | {len(r['cpus'])} | {r['threads']} | "
            f"{r['memory_limit_mb']} MB ({r['memory_mode']}) | {r['model_bytes'] / 1024:.0f} | "
            f"{_fmt(r['ready_s'], '.2f')} | {_fmt(r['round_s'], '.3f')} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{_fmt(r['cgroup_peak_mb'], '.0f')} | "
            f"{_fmt(r['upload_bytes'] / 1024 if r['upload_bytes'] else None, '.1f')} | {result} |")
    for fmt, why in report["missing_formats"].items():
        lines.append(f"| all | {fmt} | – | – | – | – | – | – | – | – | – | – | – | **missing**: {why} |")
    if report["emulation_skipped"]:
        lines.append(f"\nEmulated rows skipped: {report['emulation_skipped']}\n")
    lines.append(
        f"\nDESIGN.md §8 targets for the pi4 profile: round ≤ {TARGETS['round_s']} s, peak RSS ≤ "
        f"{TARGETS['peak_rss_mb']:.0f} MB, upload ≤ {TARGETS['upload_kb']:.0f} KB. pi4 native rows: "
        + "; ".join(f"{fmt}: {'round failed' if ok is None else 'met' if ok else 'NOT met'}"
                    for fmt, ok in report["pi4_native_targets_met"].items())
        + ".\n\nThe memory cgroup (v1 on this host) charges anonymous memory and page cache the daemon brings in; "
        "shared library pages already cached by other processes count in RSS but not in the cgroup, so "
        "*cgroup peak* can be below *peak RSS*. Under qemu, peak RSS includes the emulator and its translation "
        "cache.\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", default=",".join(list_profiles()))
    ap.add_argument("--formats", default=",".join(HIL_FORMATS))
    ap.add_argument("--emulate", default="native,qemu", help="native, qemu or both (comma-separated)")
    ap.add_argument("--qemu-profiles", default="pi4", help="profiles for emulated rows (each takes minutes: the "
                    "backbone features of every local window are computed under emulation)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per native row (emulated rows: 1)")
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--model-dir", type=Path, default=None, help="an export directory (default: export the demo "
                    "model; TFLite needs it too, so only with --formats onnx,int8)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()
    exit_on_sigterm()
    profiles, formats = args.profiles.split(","), args.formats.split(",")
    for p in profiles:
        load_profile(p)
    modes = args.emulate.split(",")
    emulation_skipped = ""
    if "qemu" in modes:
        try:
            qemu_python()
        except EmulationUnavailable as exc:
            emulation_skipped = str(exc)
            modes.remove("qemu")

    with tempfile.TemporaryDirectory(prefix="fedge-edge-bench-") as tmp:
        model_dir = args.model_dir or Path(tmp)
        needs_tflite = any(f.startswith("tflite") and not (model_dir / HIL_FORMATS[f]).is_file() for f in formats)
        model = default_model() if args.model_dir is None or needs_tflite else None
        if args.model_dir is None:
            _, _, model_info = export_default_model(model_dir, model)
        else:
            spec_path = model_dir / "spec.json"
            spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
            model_info = {"model_id": spec.get("model_id", model_dir.name), "n_params": spec.get("n_params", 0)}
        missing = prepare_formats(model, model_dir, formats)
        rows = []
        qemu_profiles = args.qemu_profiles.split(",")
        for mode in modes:
            for profile in profiles if mode == "native" else [p for p in profiles if p in qemu_profiles]:
                for fmt in formats:
                    if fmt in missing:
                        continue
                    row = one_row(profile, model_dir, fmt, mode, args.repeats if mode == "native" else 1,
                                  args.local_epochs)
                    print(f"{profile:18s} {fmt:12s} {mode:7s} ok={row['ok']} ready {_fmt(row['ready_s'], '.2f')} s "
                          f"round {_fmt(row['round_s'], '.3f')} s RSS {_fmt(row['peak_rss_mb'], '.0f')} MB "
                          f"{row['error']}", flush=True)
                    rows.append(row)

    pi4 = {r["format"]: targets_met(r) for r in rows if r["profile"] == "pi4" and not r["emulated"]}
    report = {"model": model_info, "settings": {"repeats": args.repeats, "local_epochs": args.local_epochs,
                                                "profiles": profiles, "formats": formats, "emulate": modes,
                                                "qemu_profiles": args.qemu_profiles.split(",")},
              "machine": {"python": platform.python_version(), "cpu": platform.processor() or host_arch(),
                          "host_cpus": len(os.sched_getaffinity(0))},
              "targets": TARGETS, "pi4_native_targets_met": pi4, "missing_formats": missing,
              "emulation_skipped": emulation_skipped, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "edge.json").write_text(json.dumps(report, indent=2))
    (args.out / "edge.md").write_text(markdown(report))
    print(f"wrote {args.out / 'edge.json'} and {args.out / 'edge.md'}")


if __name__ == "__main__":
    main()
