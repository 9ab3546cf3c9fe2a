"""Fleet scale (issue 12): what one coordinator, one broker and N emulated devices cost on this machine, and how that
compares with Flower's simulation on the same head-only task.

    python benchmarks/fleet_scale.py [--sizes 100 1000 10000] [--secure 1000 10000] [--flower 10 100 1000]
                                     [--rounds 3] [--out docs/results]

Cells (each checkpointed under --work and skipped on a rerun unless --fresh; results rewritten after every cell):
* ``agg``: 10,000 real updates (float16 deltas of the fleet head, encoded as on the wire) aggregated by the
  coordinator's streaming path (decode, clip/weigh, add to the float64 running sum) and, for comparison, by the
  pre-streaming path (decode all, then the weighted mean) -- the 10,000-updates-in-1-s target.
* ``fedge-N``: `fedge loadtest` (coordinator.loadtest.harness) with N devices: a private Mosquitto sized for the
  run, `fedge serve` as its own process (SQLite), N emulated devices in a few processes; the largest size is also
  profiled (py-spy, every thread of the coordinator).
* ``fedge-secure-N``: the same with ``--secure`` (coordinator.loadtest.harness): N identities from the fleet CA
  (cached under --work), the broker with TLS, client certificates and the fleet's ACL, `fedge serve --fleet-dir`
  (signatures checked and made), devices connecting with their own certificates and signing; run right after
  ``fedge-N`` so both see about the same load. The table beside it is the cost of TLS + ACL + signatures at scale.
* ``flower-N``: benchmarks/flower_baseline.py, Flower's simulation (Ray) with N clients on the same slices, the same
  learner and FedAvg. Flower's first round (Ray start-up) is excluded from its round times; fedge's is not.

Everything shares 2 CPU cores with whatever else runs: each cell records the load average before it started.
Writes docs/results/fleet_scale.{json,md,png}; text below the marker line in the .md is kept on rewrite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.loadtest.harness import LoadConfig, prepare_model, result_dict, run_loadtest  # noqa: E402

MARKER = "<!-- analysis: everything below this line is written by hand and kept when the script rewrites the file -->"
TARGETS = {"round_1000_s": 5.0, "round_10000_s": 30.0, "aggregate_10000_s": 1.0, "flower_ratio_1000": 5.0}


def aggregation_cell(model_dir: Path, n: int = 10_000, seed: int = 0) -> dict:
    """Time the coordinator's aggregation of `n` updates, streaming and from storage."""
    from coordinator.fleet.aggregation import ClientUpdate, RunningSum
    from coordinator.fleet.strategies import fleet_strategy
    from edge_client.learning.head import HEAD_KEYS, slice_head
    from edge_client.wire import Update, decode, encode

    with np.load(model_dir / "head.npz") as data:
        base = slice_head({k: data[k] for k in HEAD_KEYS}, 24)
    rng = np.random.default_rng(seed)
    payloads = [encode(Update(fleet="bench", device_id=f"d{i}", round_id=1, base_version=0,
                              n_samples=int(rng.integers(50, 100)),
                              delta={k: (rng.normal(size=v.shape) * 1e-3).astype(np.float16) for k, v in base.items()},
                              metrics={"global_mse": 1.0, "personal_mse": 0.9})) for i in range(n)]
    out = {"updates": n, "update_bytes": len(payloads[0]), "params": int(sum(v.size for v in base.values()))}
    plain: dict = {}
    for name, clip in (("fedavg", None), ("fedavg_clip", 1.0)):
        strategy = fleet_strategy("fedavg", clip_norm=clip)
        t0, c0 = time.perf_counter(), time.process_time()
        msgs = [decode(p) for p in payloads]
        t1, c1 = time.perf_counter(), time.process_time()
        running = RunningSum()
        for m in msgs:
            running.add(*strategy.weigh(m))
        new = strategy.finish(base, running.mean()).global_params
        t2, c2 = time.perf_counter(), time.process_time()
        out[name] = {"decode_s": t1 - t0, "sum_s": t2 - t1, "total_s": t2 - t0,  # wall clock
                     "decode_cpu_s": c1 - c0, "sum_cpu_s": c2 - c1, "total_cpu_s": c2 - c0}
        plain = new if clip is None else plain
        del msgs
    t0 = time.perf_counter()
    ups = [ClientUpdate(m.device_id, m.n_samples, m.delta) for m in (decode(p) for p in payloads)]
    old = fleet_strategy("fedavg").aggregate(base, ups)
    out["from_storage"] = {"total_s": time.perf_counter() - t0}
    out["max_abs_diff_vs_storage_path"] = float(max(np.abs(old[k] - plain[k]).max() for k in base))
    for name in ("trimmed_mean",):
        t0 = time.perf_counter()
        fleet_strategy(name).aggregate_round(_inputs(base, ups))
        out[name] = {"total_s": time.perf_counter() - t0, "note": "needs every update at once (not streaming)"}
    return out


def _inputs(base: dict, ups: list):  # type: ignore[no-untyped-def]
    from coordinator.fleet.strategies import RoundInputs

    return RoundInputs(base, ups, initial=lambda: base, personal=lambda _d: None)


def flower_cell(clients: int, rounds: int, model_dir: Path, bank_dir: Path, work: Path) -> dict:
    out = work / f"flower-{clients}.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flower_baseline.py"), "--clients", str(clients),
                           "--rounds", str(rounds + 1), "--model", str(model_dir), "--bank", str(bank_dir),
                           "--out", str(out)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not out.exists():
        return {"clients": clients, "error": proc.stderr[-2000:] or proc.stdout[-2000:]}
    res = json.loads(out.read_text())
    steady = res["round_s"][1:]  # the first round starts Ray's workers
    return {**res, "first_round_s": res["round_s"][0], "steady_round_s": steady,
            "round_p50_s": float(np.median(steady)) if steady else float("nan"), "cell_s": time.perf_counter() - t0}


def profile_summary(path: Path, top: int = 20) -> dict:
    """py-spy raw output (collapsed stacks: 'frame;frame;... count') -> where the coordinator's samples are."""
    if not path.exists():
        return {}
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0].split(": ", 1)[-1]] += n  # "thread (tid): name" -> name
        own[_short(frames[-1])] += n
        for f in {_short(f) for f in frames[1:]}:
            inclusive[f] += n
    idle = ("wait", "select", "poll", "get (queue", "_run (coordinator/fleet/ingest.py:8", "acquire")
    busy = {f: c for f, c in own.items() if not any(k in f for k in idle)}
    return {"samples": total, "threads": dict(threads.most_common(8)),
            "own": dict(Counter(busy).most_common(top)), "inclusive": dict(inclusive.most_common(top))}


def _short(frame: str) -> str:
    return frame.replace(str(ROOT) + "/", "").replace(sys.prefix + "/lib/python3.11/site-packages/", "")


# ---------------------------------------------------------------------------------------------- report


def summarise(cells: dict) -> dict:
    fedge = {int(k.split("-")[1]): v for k, v in cells.items()
             if k.startswith("fedge-") and not k.startswith("fedge-secure-") and "summary" in v}
    secure = {int(k.split("-")[2]): v for k, v in cells.items() if k.startswith("fedge-secure-") and "summary" in v}
    flower = {int(k.split("-")[1]): v for k, v in cells.items() if k.startswith("flower-") and "round_p50_s" in v}
    ratio = {n: flower[n]["round_p50_s"] / fedge[n]["summary"]["round_p50_s"] for n in fedge if n in flower}
    agg = cells.get("agg", {})
    checks = {
        "1,000 devices <= 5 s per round (p50)": _check(fedge.get(1000), lambda s: s["round_p50_s"], 5.0),
        "10,000 devices <= 30 s per round (p50)": _check(fedge.get(10000), lambda s: s["round_p50_s"], 30.0),
        "10,000 updates aggregated <= 1 s (decode + streaming sum, CPU seconds)":
            (agg["fedavg"]["total_cpu_s"], agg["fedavg"]["total_cpu_s"] <= 1.0) if agg else None,
        "0 lost, 0 duplicated (every size, plain and secure)":
            (sum(v["summary"]["lost"] + v["summary"]["duplicated"] for v in [*fedge.values(), *secure.values()]),
             all(v["summary"]["lost"] == 0 == v["summary"]["duplicated"] for v in [*fedge.values(), *secure.values()]))
            if fedge else None,
        ">= 5x faster per round than Flower at 1,000": (ratio[1000], ratio[1000] >= 5.0) if 1000 in ratio else None,
    }
    return {"fedge": {n: v["summary"] for n, v in sorted(fedge.items())},
            "secure": {n: v["summary"] for n, v in sorted(secure.items())},
            "flower": {n: v["round_p50_s"] for n, v in sorted(flower.items())},
            "ratio_flower_over_fedge": dict(sorted(ratio.items())), "checks": checks}


def _check(cell: dict | None, get, limit: float):  # type: ignore[no-untyped-def]
    if not cell:
        return None
    value = get(cell["summary"])
    return value, value <= limit


def write(cells: dict, out: Path, meta: dict) -> None:
    summary = summarise(cells)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet_scale.json").write_text(json.dumps({"meta": meta, "summary": summary, "cells": cells}, indent=1,
                                                     default=float))
    md = [f"# Fleet scale: fedge vs. Flower simulation{'' if meta['complete'] else ' (PARTIAL)'}", "",
          "One machine, 2 shared CPU cores: broker, `fedge serve` and every emulated device run here "
          "(`python benchmarks/fleet_scale.py`). Each device: its own MQTT session and identity, its own slice "
          "of a real series (96 training + 8 held-back windows; features of the shared bank), trains the "
          "fleet head (4 x 24 x 64 parameters, float16 delta) for 1 epoch and sends a real update. Round = "
          "opened -> closed on the coordinator. CPU columns: user + system seconds over all rounds, from /proc "
          "(devices: all device processes together). Flower: the same learner and slices in its Ray simulation, "
          "first round (Ray start-up) excluded.", "",
          "| devices | online s | round p50 s | p95 s | max s | updates/s | coord CPU s | broker CPU s | "
          "devices CPU s | coord peak RSS MB | broker peak RSS MB | MB/round | lost | dup | slice overlap | "
          "load before |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, s in summary["fedge"].items():
        cell = cells[f"fedge-{n}"]
        md.append(f"| {n:,} | {s['online_s']:.1f} | {s['round_p50_s']:.2f} | {s['round_p95_s']:.2f} | "
                  f"{s['round_max_s']:.2f} | {s['ingest_per_s']:.0f} | {s['coordinator_cpu_s']:.1f} | "
                  f"{_cpu(s.get('broker_cpu_s'))} | {_cpu(s.get('devices_cpu_s'))} | "
                  f"{s['coordinator_peak_rss_mb']:.0f} | {s['broker_peak_rss_mb']:.0f} | "
                  f"{s['bytes_per_round'] / 2**20:.1f} | {s['lost']} | {s['duplicated']} | "
                  f"{cell['slice_overlap']:.2f} | {cell['load_before'][0]:.1f} |")
    md += ["", "| clients | Flower round p50 s | fedge round p50 s | Flower / fedge |", "|---:|---:|---:|---:|"]
    for n, f in summary["flower"].items():
        mine = summary["fedge"].get(n, {}).get("round_p50_s")
        ratio = summary["ratio_flower_over_fedge"].get(n)
        md.append(f"| {n:,} | {f:.2f} | {'—' if mine is None else f'{mine:.2f}'} | "
                  f"{'—' if ratio is None else f'{ratio:.1f}x'} |")
    if summary["secure"]:
        md += ["", "Cost of a secure fleet (`fedge loadtest --secure`: TLS 1.2 with a client certificate per device "
               "from "
               "the fleet CA, ed25519 keys, the broker's `require_certificate` and `%u` ACL, every device message "
               "signed and checked by the coordinator's registry, every control message signed and checked by the "
               "devices), each secure cell run right after the plain one of the same size. Wire KB/round: bytes the "
               "broker read and wrote (sockets, so TLS records included), per round.", "",
               "| devices | mode | online s | round p50 s | p95 s | coord CPU s | broker CPU s | devices CPU s | "
               "coord RSS MB | broker RSS MB | devices RSS MB | payload KB/round | wire KB/round | lost | dup | load |",
               "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, sec in summary["secure"].items():
            for mode, s, cell in (("plain", summary["fedge"].get(n), cells.get(f"fedge-{n}")),
                                  ("secure", sec, cells[f"fedge-secure-{n}"])):
                if s is None:
                    continue
                md.append(f"| {n:,} | {mode} | {s['online_s']:.1f} | {s['round_p50_s']:.2f} | "
                          f"{s['round_p95_s']:.2f} | {s['coordinator_cpu_s']:.1f} | {_cpu(s.get('broker_cpu_s'))} | "
                          f"{_cpu(s.get('devices_cpu_s'))} | {s['coordinator_peak_rss_mb']:.0f} | "
                          f"{s['broker_peak_rss_mb']:.0f} | {_cpu(s.get('devices_peak_rss_mb'))} | "
                          f"{s['bytes_per_round'] / 1024:.0f} | {_kb(s.get('broker_wire_bytes_per_round'))} | "
                          f"{s['lost']} | {s['duplicated']} | {cell['load_before'][0]:.1f} |")
    agg = cells.get("agg")
    if agg:
        md += ["", f"Aggregation of {agg['updates']:,} updates ({agg['params']:,} parameters, {agg['update_bytes']:,} "
               f"bytes each on the wire), CPU time: decode and validate {agg['fedavg']['decode_cpu_s']:.2f} s + "
               f"streaming sum {agg['fedavg']['sum_cpu_s']:.2f} s = **{agg['fedavg']['total_cpu_s']:.2f} s** "
               f"(wall {agg['fedavg']['total_s']:.2f} s at load {agg['load_at_start'][0]:.1f}; norm-clipped: "
               f"{agg['fedavg_clip']['total_cpu_s']:.2f} s CPU); wall times: the pre-streaming path (decode all, "
               "then average) "
               f"{agg['from_storage']['total_s']:.2f} s; trimmed mean (needs all updates at once) "
               f"{agg['trimmed_mean']['total_s']:.2f} s. In a round the sum is spread over the arrivals: closing a "
               "streaming round reads one running sum per ingester and decodes nothing."]
    md += ["", "| target | measured | met |", "|---|---:|:---:|"]
    for name, value in summary["checks"].items():
        md.append(f"| {name} | {'not run' if value is None else f'{value[0]:.2f}'} | "
                  f"{'—' if value is None else ('yes' if value[1] else '**no**')} |")
    profiled = sorted((int(k.split("-")[1]), k) for k in cells
                      if k.startswith("fedge-") and not k.startswith("fedge-secure-") and cells[k].get("profile"))
    prof = cells[profiled[-1][1]]["profile"] if profiled else None
    if prof:
        md += ["", f"Coordinator profile at the largest size ({prof['samples']:,} py-spy samples at 50 Hz, all "
               "threads, idle waits left out): own time by function", "", "| function | samples |", "|---|---:|"]
        md += [f"| `{f}` | {c} |" for f, c in list(prof["own"].items())[:15]]
    md += ["", f"Machine: {meta['machine']}; run {meta['started']} ({meta['wall_s']:.0f} s).", "", MARKER, ""]
    path = out / "fleet_scale.md"
    kept = path.read_text().split(MARKER, 1)[1].lstrip("\n") if path.exists() and MARKER in path.read_text() else ""
    path.write_text("\n".join(md) + kept)
    plot(summary, out / "fleet_scale.png")


def _kb(value: float | None) -> str:
    return "—" if not value else f"{value / 1024:.0f}"


def _cpu(value: float | None) -> str:
    """CPU seconds, or a dash for a cell measured before the harness sampled that process."""
    return "—" if value is None or value != value else f"{value:.1f}"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if summary["fedge"]:
        n = list(summary["fedge"])
        ax.plot(n, [summary["fedge"][k]["round_p50_s"] for k in n], "o-", label="fedge (broker + serve + devices)")
    if summary["flower"]:
        n = list(summary["flower"])
        ax.plot(n, [summary["flower"][k] for k in n], "s--", label="Flower simulation (Ray, no network)")
    ax.axhline(5, color="grey", lw=0.8, ls=":")
    ax.axhline(30, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("devices / clients")
    ax.set_ylabel("seconds per round (p50)")
    ax.set_title("Round time on 2 shared CPU cores")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 10000])
    ap.add_argument("--secure", type=int, nargs="*", default=[1000, 10000],
                    help="sizes also run as a secure fleet (fedge-secure-N, right after fedge-N)")
    ap.add_argument("--flower", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "fleet_scale")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--fresh", action="store_true", help="recompute every cell")
    ap.add_argument("--only", nargs="*", default=None, help="cells to (re)run, e.g. fedge-1000 flower-1000 agg")
    args = ap.parse_args()

    from rich.console import Console

    console = Console()
    cells_dir = args.work / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "started": time.strftime("%Y-%m-%d %H:%M"),
            "rounds": args.rounds, "complete": False, "wall_s": 0.0}
    cfg = LoadConfig(rounds=args.rounds, work_dir=args.work, data_dir=args.data_dir)
    model_dir = prepare_model(cfg)
    from coordinator.loadtest.bank import build_bank

    bank_dir = build_bank(model_dir / "backbone.onnx", cfg.horizon, cfg.cache_dir, cfg.data_dir)
    small = [n for n in args.sizes if n <= 1000]  # the compared sizes first, close in time to Flower's cells
    def fedge_cells(sizes: list[int]) -> list[str]:
        return [c for n in sizes for c in (f"fedge-{n}", *([f"fedge-secure-{n}"] if n in args.secure else []))]

    plan = ["agg", *fedge_cells(small), *[f"flower-{n}" for n in args.flower],
            *fedge_cells([n for n in args.sizes if n > 1000])]
    cells = {p.stem: json.loads(p.read_text()) for p in cells_dir.glob("*.json")}
    for name in plan:
        if name in cells and not args.fresh and (args.only is None or name not in args.only):
            console.print(f"[dim]{name}: done earlier, kept[/dim]")
            continue
        if args.only is not None and name not in args.only and name in cells:
            continue
        load = os.getloadavg()
        console.rule(f"{name} (load {load[0]:.1f})")
        if name == "agg":
            cell = aggregation_cell(model_dir)
        elif name.startswith("fedge-"):
            n = int(name.split("-")[-1])
            secure = name.startswith("fedge-secure-")
            biggest = n == max(args.sizes)  # profiled, plain and secure alike (py-spy's cost is in both)
            # a deadline no round reaches here: an update the broker acknowledged and the coordinator did not
            # store then counts as lost, never as merely late
            res = run_loadtest(LoadConfig(devices=n, rounds=args.rounds, work_dir=args.work, data_dir=args.data_dir,
                                          profile=biggest, secure=secure, deadline_s=max(300.0, 0.2 * n),
                                          online_timeout_s=max(600.0, 0.1 * n)),
                               progress=lambda text: console.print(f"[dim]{text}[/dim]"))
            cell = result_dict(res)
            if biggest:
                cell["profile"] = profile_summary(args.work / f"profile-{n}.txt")
        else:
            cell = flower_cell(int(name.split("-")[1]), args.rounds, model_dir, bank_dir, args.work)
        cell["load_at_start"] = list(load)
        cells[name] = cell
        (cells_dir / f"{name}.json").write_text(json.dumps(cell, default=float))
        meta["wall_s"] = time.perf_counter() - t0
        write(cells, args.out, meta)
        console.print(json.dumps(cell.get("summary", {k: v for k, v in cell.items() if k != "profile"}),
                                 default=float)[:600])
    meta["complete"] = all(p in cells for p in plan)
    meta["wall_s"] = time.perf_counter() - t0
    write(cells, args.out, meta)
    console.print(f"wrote {args.out / 'fleet_scale.md'}")


if __name__ == "__main__":
    main()
