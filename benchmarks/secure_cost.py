"""What TLS, client certificates, the broker ACL and signed messages cost a device: one hardware-in-loop round on a
device profile (``hardware.hil.run_hil``), plain vs secure, alternating, median of the repeats.

Plain: an anonymous Mosquitto on loopback, unsigned messages. Secure: ``fedge fleet init`` + ``enroll`` + the
Mosquitto configuration ``fedge broker config`` writes (TLS, client certificate, ACL, persistence), ``fedge serve
--fleet-dir``, the daemon with its ``identity`` folder (every message signed and verified). Same model, data,
profile limits (cores, ORT threads, memory cgroup) and torch-free daemon as benchmarks/edge.py.

    python benchmarks/secure_cost.py [--profile pi4] [--format onnx] [--repeats 3] [--out docs/results]

Writes security_cost.json and security_cost.md. *ready* = daemon start to round opened (includes the TLS handshake
and the identity checks), *round* = the coordinator's round (task, training, update, receipt, aggregation), *peak
RSS* = the daemon's VmHWM, *upload* = the stored update message (the signature adds 64 bytes plus framing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hardware.hil import exit_on_sigterm, run_hil

NOTES_MARKER = "<!-- hand-written notes below: kept when the benchmark rewrites the table above -->"
COLUMNS = ("ready_s", "round_s", "peak_rss_mb", "cgroup_peak_mb", "upload_bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="pi4")
    ap.add_argument("--format", default="onnx")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", type=Path, default=None, help="an export (default: the demo's backbone)")
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    args = ap.parse_args()
    if args.render:
        saved = json.loads((args.out / "security_cost.json").read_text())
        write_markdown(args.out, saved["profile"], saved["format"], saved["summary"], len(saved["runs"]["plain"]))
        return
    exit_on_sigterm()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    runs: dict[str, list[dict]] = {"plain": [], "secure": []}
    with tempfile.TemporaryDirectory(prefix="fedge-secure-cost-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from coordinator.demo import DemoConfig, demo_backbone
            from export.onnx_export import export_model

            model, _ = demo_backbone(DemoConfig())
            model_dir = Path(tmp) / "model"
            export_model(model, model_dir)
        for i in range(args.repeats):
            for mode in ("plain", "secure"):
                res = run_hil(args.profile, model_dir, fmt=args.format, emulate="native", secure=mode == "secure")
                console.print(f"{mode} #{i + 1}: {'ok' if res.ok else res.error}; round {res.round_s} s, ready "
                              f"{res.ready_s} s, RSS {res.peak_rss_mb} MB, upload {res.upload_bytes} B")
                if not res.ok:
                    console.print(res.daemon_log_tail, res.coordinator_log_tail)
                runs[mode].append(res.as_dict())
    summary = {}
    for mode, rows in runs.items():
        ok = [r for r in rows if r["ok"]]
        summary[mode] = {c: statistics.median([r[c] for r in ok if r[c] is not None]) if ok else None for c in COLUMNS}
        summary[mode]["ok"] = f"{len(ok)}/{len(rows)}"
    table = Table(title=f"cost of TLS + certificates + ACL + signatures, {args.profile} {args.format} (median)")
    for c in ("mode", "ok", *COLUMNS):
        table.add_column(c, justify="right")
    for mode, s in summary.items():
        table.add_row(mode, s["ok"], *[("—" if s[c] is None else f"{s[c]:.3g}") for c in COLUMNS])
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "security_cost.json").write_text(json.dumps({"profile": args.profile, "format": args.format,
                                                             "summary": summary, "runs": runs}, indent=1) + "\n")
    write_markdown(args.out, args.profile, args.format, summary, args.repeats)


def _cell(column: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if column == "upload_bytes" else f"{value:.3g}"


def write_markdown(out: Path, profile: str, fmt: str, summary: dict, repeats: int) -> None:
    lines = [f"# Cost of TLS, client certificates, the broker ACL and signed messages ({profile}, {fmt})",
             "", f"One hardware-in-loop round per run (`hardware/hil.py`, native on this host, held to the "
             f"{profile} profile's cores, ORT threads and memory), plain and secure alternating, median of "
             f"{repeats}. `python benchmarks/secure_cost.py`.", "",
             "| mode | runs ok | ready s | round s | peak RSS MB | cgroup peak MB | upload bytes |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, s in summary.items():
        lines.append(f"| {mode} | {s['ok']} | " + " | ".join(_cell(c, s[c]) for c in COLUMNS) + " |")
    md = out / "security_cost.md"
    notes = md.read_text().partition(NOTES_MARKER)[2] if md.is_file() else ""
    md.write_text("\n".join(lines) + f"\n\n{NOTES_MARKER}" + (notes or "\n"))


if __name__ == "__main__":
    main()
