"""What the Prometheus metrics and the fleet dashboard cost a coordinator, at 1,000 devices.

A fleet database is filled the way `fedge serve` fills it -- N devices, R rounds with one update per
device per round (payloads of the real 12.7 KB size, the metrics a device reports), the last round open
-- and then:

* metrics: a FleetMetrics on that state is scraped S times (prometheus_client's exposition); CPU time
  per scrape and the resident memory it adds to the process;
* dashboard: `fedge dashboard --db` runs as its own process and is asked for the page fragment the
  browser polls every 2 s, K times; its CPU time per refresh (psutil, the server process only) and its
  resident memory. "live" adds an update to the open round before each refresh, so every refresh
  recomputes that round (the worst case while a round fills); "steady" does not.

That part measures the observers on a state of that size with the coordinator itself idle. The cells
"load-plain" and "load-observed" then run the load harness of issue #12 (``fedge loadtest``: a private
broker, `fedge serve` and N emulated devices over MQTT) twice, without and with ``--metrics-bind … --ui``,
while a scraper reads ``/metrics`` every second and a viewer polls ``/fragment/overview`` every 2 s (what
an open dashboard page does); the difference in the coordinator's CPU and peak RSS is what observing a
busy fleet costs. Each cell is checkpointed (runs/observe_cost/cells) and kept on a rerun.
Results: docs/results/observe_cost.{json,md}.

    python benchmarks/observe_cost.py [--devices 1000] [--rounds 20] [--load-rounds 10] [--only load-observed]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.fleet.metrics import FleetMetrics  # noqa: E402
from coordinator.fleet.server import FleetConfig, FleetCoordinator  # noqa: E402
from coordinator.fleet.state import FleetState  # noqa: E402
from edge_client.wire.mqtt import BrokerAddress  # noqa: E402

OUT = ROOT / "docs" / "results"
WORK = ROOT / "runs" / "observe_cost"
NOTES_MARKER = "<!-- hand-written notes below: kept when the benchmark rewrites the table above -->"
PAYLOAD_BYTES = 13_000  # a float16 head delta of the forecasting head with its envelope (12.7 KB)


def build_fleet(path: Path, n_devices: int, n_rounds: int, seed: int = 0) -> None:
    """What `fedge serve` leaves in its database after n_rounds - 1 closed rounds and one open, full round."""
    rng = random.Random(seed)
    st = FleetState(path)
    head = {"w": np.zeros((64, 24), np.float32), "b": np.zeros(24, np.float32)}
    st.save_model("tsfm", head, {"backbone_sha256": "ab" * 32})
    devices = [f"meter-{i:05d}" for i in range(n_devices)]
    for i, d in enumerate(devices):
        st.upsert_device(d, domain="energy", profile=("pi4", "pi5", "jetson-orin-nano")[i % 3],
                         runtime="onnxruntime 1.22", n_train=400, state="offline" if i % 10 == 0 else "idle",
                         backbone_sha256="ab" * 32, bundle_version=3 if i % 5 else 2)
    payload = os.urandom(PAYLOAD_BYTES)
    for r in range(1, n_rounds + 1):
        st.open_round("tsfm", "train", r - 1, devices, n_devices // 2, time.time() + 3600, {})
        with _batch(st):
            for d in devices:
                g = 0.3 + 0.3 * rng.random()
                st.add_update(r, d, f"{r:04d}-{d}", 400, payload,
                              {"global_mse": g, "global_mae": g ** 0.5, "personal_mse": g * 0.9,
                               "personal_mae": (g * 0.9) ** 0.5, "naive_mse": 0.5, "naive_mae": 0.7})
        if r < n_rounds:
            st.close_round(r, head, "tsfm")
    st.close()


class _batch:
    """One transaction for a round's inserts (filling 20,000 rows one commit each takes minutes)."""

    def __init__(self, st: FleetState) -> None:
        self.db = st._b.db  # the benchmark's own bulk load, not a query the product makes

    def __enter__(self) -> None:
        self.db.execute("BEGIN")

    def __exit__(self, *exc: object) -> None:
        self.db.execute("COMMIT" if exc[0] is None else "ROLLBACK")


def rss_mb(pid: int | None = None) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def measure_metrics(db: Path, scrapes: int) -> dict:
    from prometheus_client import generate_latest

    state = FleetState(db)
    coord = FleetCoordinator(FleetConfig(fleet="bench"), BrokerAddress("127.0.0.1", 1), state)
    coord._open = state.open_rounds("tsfm")[-1]  # the open round a running coordinator holds
    before = rss_mb()
    t0 = time.process_time()
    metrics = FleetMetrics(coord)
    setup_cpu = time.process_time() - t0
    text = generate_latest(metrics.registry)
    cpu, wall = [], []
    for _ in range(scrapes):
        c0, w0 = time.process_time(), time.perf_counter()
        text = generate_latest(metrics.registry)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    after = rss_mb()
    state.close()
    return {"scrapes": scrapes, "cpu_ms_median": 1000 * float(np.median(cpu)), "cpu_ms_p95": 1000 * float(
        np.percentile(cpu, 95)), "wall_ms_median": 1000 * float(np.median(wall)),
        "wall_ms_p95": 1000 * float(np.percentile(wall, 95)), "setup_cpu_ms": 1000 * setup_cpu,
        "exposition_bytes": len(text), "rss_added_mb": after - before,
        "cpu_share_at_15s_scrape": float(np.median(cpu)) / 15.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_dashboard(db: Path, refreshes: int) -> dict:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from coordinator.cli import app; app()", "dashboard", "--db",
                             str(db), "--bind", f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/static/dashboard.css", timeout=5).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("fedge dashboard did not start") from None
                time.sleep(0.2)
        server = psutil.Process(proc.pid)
        idle_rss = rss_mb(proc.pid)

        def cpu() -> float:
            return sum(server.cpu_times()[:2])

        c0, w0 = cpu(), time.perf_counter()  # cold: every round's means computed once
        page_bytes = len(urllib.request.urlopen(url + "/", timeout=120).read())
        first_cpu, first_wall = cpu() - c0, time.perf_counter() - w0
        writer = FleetState(db)
        open_round = writer.open_rounds("tsfm")[-1].round_id
        out = {"idle_rss_mb": idle_rss, "first_page_cpu_ms": 1000 * first_cpu, "first_page_wall_ms": 1000 * first_wall,
               "page_bytes": page_bytes}
        for mode in ("steady", "live"):
            wall, busy = [], 0.0  # the server's CPU time is counted in clock ticks: summed over all refreshes
            for i in range(refreshes):
                if mode == "live":  # a new update in the open round: its means are recomputed by this refresh
                    writer.add_update(open_round, f"late-{i:04d}", f"late-{i:04d}-x", 10, b"x" * PAYLOAD_BYTES,
                                      {"global_mse": 0.4, "personal_mse": 0.3, "naive_mse": 0.5})
                c0, w0 = cpu(), time.perf_counter()
                size = len(urllib.request.urlopen(url + "/fragment/overview", timeout=60).read())
                busy += cpu() - c0
                wall.append(time.perf_counter() - w0)
            out[mode] = {"refreshes": refreshes, "cpu_ms_mean": 1000 * busy / refreshes,
                         "wall_ms_median": 1000 * float(np.median(wall)),
                         "wall_ms_p95": 1000 * float(np.percentile(wall, 95)), "fragment_bytes": size,
                         "cpu_share_one_viewer": busy / refreshes / 2.0}
        writer.close()
        out["rss_after_mb"] = rss_mb(proc.pid)
        return out
    finally:
        proc.terminate()
        proc.wait(20)


def measure_ui_in_process(db: Path) -> dict:
    """What `fedge serve --ui` adds to the coordinator's own process: the web stack's imports, the app, a
    listening uvicorn thread with its read-only connection, and one page served."""
    before = rss_mb()
    from coordinator.dashboard.app import start_dashboard

    server = start_dashboard(db, "127.0.0.1", _free_port())
    try:
        urllib.request.urlopen(server.url, timeout=120).read()
        return {"rss_added_mb": rss_mb() - before}
    finally:
        server.stop()


class _Poller(threading.Thread):
    """GET a URL every `every_s` seconds until stopped, counting answers; refused connections (the coordinator not
    listening yet, or gone) are counted apart and never stop it."""

    def __init__(self, url: str, every_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s = url, every_s
        self.ok = self.failed = self.bytes = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                self.bytes += len(urllib.request.urlopen(self.url, timeout=30).read())
                self.ok += 1
            except OSError:
                self.failed += 1


def load_cell(observed: bool, devices: int, rounds: int, data_dir: str | None) -> dict:
    """One run of the load harness; `observed`: `fedge serve --metrics-bind … --ui` with a scraper and a viewer."""
    from coordinator.loadtest.harness import LoadConfig, result_dict, run_loadtest

    metrics_port, ui_port = _free_port(), _free_port()
    serve_args = ("--metrics-bind", f"127.0.0.1:{metrics_port}", "--ui", "--ui-bind", f"127.0.0.1:{ui_port}") \
        if observed else ()
    pollers = [_Poller(f"http://127.0.0.1:{metrics_port}/metrics", 1.0),
               _Poller(f"http://127.0.0.1:{ui_port}/fragment/overview", 2.0)] if observed else []
    load = os.getloadavg()
    for p in pollers:
        p.start()
    try:
        res = run_loadtest(LoadConfig(devices=devices, rounds=rounds, work_dir=WORK, data_dir=data_dir,
                                      serve_args=serve_args))
    finally:
        for p in pollers:
            p.done.set()
    cell = result_dict(res)
    cell["load_at_start"] = list(load)
    cell["observers"] = {name: {"ok": p.ok, "failed": p.failed, "bytes": p.bytes}
                         for name, p in zip(("metrics_scrapes", "dashboard_refreshes"), pollers, strict=False)}
    return cell


def load_markdown(cells: dict) -> str:
    plain, seen = cells.get("load-plain"), cells.get("load-observed")
    if not plain or not seen:
        return ""
    rows = []
    for name, c in (("without observers", plain), ("`--metrics-bind` + `--ui`, scraped 1/s, dashboard polled 1/2 s",
                                                    seen)):
        s = c["summary"]
        obs = c.get("observers", {})
        polls = (f"{obs['metrics_scrapes']['ok']} scrapes, {obs['dashboard_refreshes']['ok']} refreshes"
                 if obs else "—")
        rows.append(f"| {name} | {s['round_p50_s']:.2f} | {s['coordinator_cpu_s']:.1f} | "
                    f"{s['coordinator_cpu_s'] / max(1e-9, sum(c['round_s'])):.1%} | "
                    f"{s['coordinator_peak_rss_mb']:.0f} | {polls} | {c['load_at_start'][0]:.1f} |")
    sp, ss = plain["summary"], seen["summary"]
    return "\n".join([
        f"## Under the load harness: {sp['devices']:,} emulated devices over MQTT, {plain['rounds_done']} rounds\n",
        "`fedge serve` with a private broker and the emulated devices of issue #12 (`fedge loadtest`), run twice. "
        "Coordinator CPU: user + system seconds over the rounds (the dashboard and the metrics run inside it); "
        "share: of one core over the rounds' wall time.\n",
        "| coordinator | round p50 s | CPU s | CPU share | peak RSS MB | observer calls answered | load before |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Difference: {ss['coordinator_cpu_s'] - sp['coordinator_cpu_s']:+.1f} CPU-seconds "
        f"({(ss['coordinator_cpu_s'] - sp['coordinator_cpu_s']) / max(1e-9, sp['coordinator_cpu_s']):+.0%}), "
        f"{ss['coordinator_peak_rss_mb'] - sp['coordinator_peak_rss_mb']:+.0f} MB peak RSS.\n"])


def markdown(res: dict) -> str:
    m, d, ui = res["metrics"], res["dashboard"], res["ui_in_process"]
    lines = [f"# Cost of the metrics and the dashboard: {res['devices']} devices, {res['rounds']} rounds\n",
             f"Machine: {res['machine']}. Load average when measured: {res['load_avg']}. State: SQLite, "
             f"{res['db_mb']:.0f} MB. {res['method']}\n",
             "| what | CPU per call | wall median / p95 | memory | CPU share |",
             "|---|---:|---:|---:|---:|",
             f"| `/metrics` scrape ({m['exposition_bytes'] / 1024:.1f} KB) | {m['cpu_ms_median']:.1f} ms (p95 "
             f"{m['cpu_ms_p95']:.1f}) | {m['wall_ms_median']:.1f} / {m['wall_ms_p95']:.1f} ms | "
             f"+{m['rss_added_mb']:.1f} MB in the coordinator | {100 * m['cpu_share_at_15s_scrape']:.3f} % of a core "
             "at one scrape every 15 s |"]
    for mode, text in (("steady", "nothing new"), ("live", "an update arrived since the last")):
        x = d[mode]
        lines.append(f"| dashboard refresh, {text} ({x['fragment_bytes'] / 1024:.0f} KB) | {x['cpu_ms_mean']:.1f} ms "
                     f"(mean of {x['refreshes']}) | {x['wall_ms_median']:.0f} / {x['wall_ms_p95']:.0f} ms | | "
                     f"{100 * x['cpu_share_one_viewer']:.2f} % of a core per open page (2 s polling) |")
    lines += [f"| dashboard first page, cold cache ({d['page_bytes'] / 1024:.0f} KB) | {d['first_page_cpu_ms']:.0f} "
              f"ms | {d['first_page_wall_ms']:.0f} ms | | once per dashboard process |",
              "| `fedge serve --ui`: web stack + server thread in the coordinator | | | "
              f"+{ui['rss_added_mb']:.0f} MB | |",
              f"| `fedge dashboard` as its own process | | | {d['idle_rss_mb']:.0f} MB idle, "
              f"{d['rss_after_mb']:.0f} MB after the refreshes | |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--scrapes", type=int, default=30)
    ap.add_argument("--refreshes", type=int, default=30)
    ap.add_argument("--load-rounds", type=int, default=10, help="rounds of each load-harness cell")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="cells to (re)run: idle load-plain load-observed")
    args = ap.parse_args()
    console = Console()
    cells_dir = WORK / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    cells = {p.stem: json.loads(p.read_text()) for p in cells_dir.glob("*.json")}
    for name in ("idle", "load-plain", "load-observed"):
        if name in cells and (args.only is None or name not in args.only):
            console.print(f"[dim]{name}: done earlier, kept[/dim]")
            continue
        console.rule(f"{name} (load {os.getloadavg()[0]:.1f})")
        if name == "idle":
            cell = idle_cell(args, console)
        else:
            cell = load_cell(name == "load-observed", args.devices, args.load_rounds, args.data_dir)
        cells[name] = cell
        (cells_dir / f"{name}.json").write_text(json.dumps(cell, default=float))
        write(cells)
    write(cells)
    res = cells.get("idle")
    if res:
        t = Table(title=f"observers at {args.devices} devices")
        for col in ("what", "CPU ms per call", "wall ms (median)", "memory MB"):
            t.add_column(col)
        metrics, dashboard, ui = res["metrics"], res["dashboard"], res["ui_in_process"]
        t.add_row("/metrics scrape", f"{metrics['cpu_ms_median']:.1f}", f"{metrics['wall_ms_median']:.1f}",
                  f"+{metrics['rss_added_mb']:.1f}")
        for mode in ("steady", "live"):
            x = dashboard[mode]
            t.add_row(f"dashboard refresh ({mode})", f"{x['cpu_ms_mean']:.1f}", f"{x['wall_ms_median']:.1f}", "")
        t.add_row("--ui inside the coordinator", "", "", f"+{ui['rss_added_mb']:.0f}")
        console.print(t)
    console.print(load_markdown(cells))
    console.print(f"wrote {OUT / 'observe_cost.json'} and {OUT / 'observe_cost.md'}")


def idle_cell(args: argparse.Namespace, console: Console) -> dict:
    """The observers' per-call costs on a filled state, the coordinator idle."""
    with tempfile.TemporaryDirectory(prefix="fedge-observe-") as tmp:
        db = Path(tmp) / "fleet.sqlite"
        with console.status(f"filling a fleet database: {args.devices} devices x {args.rounds} rounds"):
            build_fleet(db, args.devices, args.rounds)
        db_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
        with console.status("scraping /metrics"):
            metrics = measure_metrics(db, args.scrapes)
        with console.status("refreshing the dashboard"):
            dashboard = measure_dashboard(db, args.refreshes)
        with console.status("the dashboard inside this process"):
            ui = measure_ui_in_process(db)
    return {"devices": args.devices, "rounds": args.rounds, "db_mb": db_mb, "metrics": metrics,
            "dashboard": dashboard, "ui_in_process": ui, "load_avg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
            "method": "Observers measured on a filled state with the coordinator idle (the per-call costs); the "
                      "section after the table measures them under the MQTT load harness. CPU time is the serving "
                      "process's own (process_time, or psutil for the dashboard process), so other load on the "
                      "machine inflates wall time, not CPU time."}


def write(cells: dict) -> None:
    """docs/results/observe_cost.{json,md} from the cells done so far (the notes below the marker are kept)."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "observe_cost.json").write_text(json.dumps(cells, indent=2, default=float) + "\n")
    md = OUT / "observe_cost.md"
    notes = md.read_text().partition(NOTES_MARKER)[2] if md.is_file() else ""
    body = (markdown(cells["idle"]) if "idle" in cells else "# Cost of the metrics and the dashboard (PARTIAL)\n")
    md.write_text(body + "\n" + load_markdown(cells) + f"\n{NOTES_MARKER}" + (notes or "\n"))


if __name__ == "__main__":
    main()
