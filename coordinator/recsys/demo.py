"""``fedge demo --task rec``: continual federated recommendation over MQTT with a live table.

Every user is a device (:class:`edge_client.recsys.client.RecEdgeClient`: numpy + ONNX Runtime)
connected to a real broker -- Mosquitto when installed, else the embedded rumqttd -- and the
coordinator is the fleet's :class:`coordinator.fleet.server.FleetCoordinator` with the recommender's
prototype exchange (:mod:`coordinator.recsys.fleet`). All devices of the demo live in this process on
one network thread (:mod:`edge_client.wire.mqtt_loop`), so all 943 MovieLens users fit.

SASRec is pretrained on period 0 until validation NDCG@10 stops improving (cached afterwards). Then
each method runs as its own fleet, with the configuration ``benchmarks/recommender.py`` chose on its
validation users (read from ``docs/results/recommender.json`` when present): by default FedAvg of the
user- and item-side adapters (the benchmark's best federated method) and FCUCR. The table shows, per
period, how many devices trained, what crossed the broker, and the NDCG@10 the devices measured on their
own data: *next* ranks every interaction of the period with the models from before it (test, then
train), *held-out* is the period's last item after training. The in-process simulation gives the same
numbers for the same seed (``benchmarks/rec_fleet.py`` checks it at full size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator.recsys.simulation import MethodResult, StageLog

DEMO_METHODS = ("fedavg+items", "fcucr")
BENCHMARK_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "recommender.json"


def _table(rows: dict[int, dict[str, Any]], title: str, methods: tuple[str, ...]) -> Table:
    t = Table(title=title, header_style="bold")
    for col in ("period", "devices trained", "KB up", "KB down"):
        t.add_column(col, justify="right")
    for m in methods:
        t.add_column(f"{m} next NDCG@10", justify="right")
        t.add_column(f"{m} held-out NDCG@10", justify="right")
    for period, r in sorted(rows.items()):
        cells = [str(r.get(k, "…")) for k in ("devices", "up", "down")]
        for m in methods:
            cells += [str(r.get((m, "next"), "…")), str(r.get((m, "held"), "…"))]
        t.add_row(str(period), *cells)
    return t


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.4f}"  # NaN: nothing to score


def run_rec_demo(
    console: Console | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    users: int | None = None,
    periods: int = 4,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] = ".fedge/recommender-cache",
    pretrain_epochs: int = 400,
    broker: str = "auto",
    out_dir: str | os.PathLike[str] = "runs/demo",
    methods: tuple[str, ...] = DEMO_METHODS,
    results: str | os.PathLike[str] = BENCHMARK_RESULTS,
) -> dict[str, MethodResult]:
    """Pretrain (or load) SASRec on period 0 with early stopping, export it, start a broker, then run each of
    `methods` period by period with one MQTT device per user (all users unless `users`); writes ``rec.json``."""
    from coordinator.demo import start_demo_broker
    from coordinator.fleet.broker import raise_fd_limit
    from coordinator.models.recommender import SASRecConfig
    from coordinator.recsys.data import continual_split, load_ml100k
    from coordinator.recsys.fleet import run_federated_mqtt
    from coordinator.recsys.simulation import RecSimConfig
    from coordinator.recsys.training import RecTrainSettings, pretrained_sasrec
    from edge_client.recsys.encoder import load_encoder
    from export.recommender_export import export_recommender

    console = console or Console()
    console.rule("[bold]1. MovieLens-100K (read from the data directory, never copied) -> time periods")
    data = load_ml100k(data_dir)
    full = continual_split(data, n_periods=periods, pretrain_frac=0.5)  # the coordinator pretrains on all of period 0
    split = full if users is None else continual_split(data, n_periods=periods, pretrain_frac=0.5, users=users,
                                                       seed=seed)  # the devices shown
    console.print(f"{len(split.logs)} users = {len(split.logs)} devices; {split.n_items} items; periods 1..{periods} "
                  f"active users: {[len(split.users(p)) for p in range(1, periods + 1)]}")
    console.rule("[bold]2. pretrain SASRec centrally on period 0 until validation stops improving (cached); "
                 "export the encoder to ONNX")
    settings = RecTrainSettings(epochs=pretrain_epochs, patience=20, seed=0, threads=1)
    model, meta = pretrained_sasrec(full, SASRecConfig(n_items=split.n_items), settings, cache_dir=cache_dir,
                                    progress=True)
    exported = export_recommender(model, Path(cache_dir) / f"export-{meta['key']}")
    console.print(f"best epoch {meta['best_epoch']} of {len(meta['losses'])} (validation NDCG@10 "
                  f"{max(meta['val_ndcg']):.4f}); sequence_encoder.onnx + items.npy; parity max |Δh| "
                  f"{exported.parity.max_abs_err:.1e}")
    encoder, items = load_encoder(exported.out_dir)
    configs = {m: RecSimConfig.chosen(results, m, seed=seed) for m in methods}

    console.rule(f"[bold]3. broker, coordinator and one device per user: {', '.join(methods)}")
    raise_fd_limit()  # a descriptor per device in this process (and the embedded broker, if used, lives here too)
    running, address, kind = start_demo_broker(broker)
    console.print(f"MQTT broker: {kind} on {address.host}:{address.port}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[Any, Any]] = {p: {} for p in range(1, periods + 1)}
    status = Text("")
    title = "recommendation on devices over MQTT — NDCG@10 measured by the devices on their own data (full ranking)"
    results_by_method: dict[str, MethodResult] = {}
    try:
        with Live(Group(_table(rows, title, methods), status), console=console, refresh_per_second=4) as live:

            def on_stage(name: str, stage: StageLog) -> None:
                row = rows[stage.period]
                row[(name, "next")] = _fmt(stage.preq.ndcg if stage.preq else float("nan"))
                row[(name, "held")] = _fmt(stage.scores.get(stage.period, (float("nan"),) * 2)[1])
                row.update(devices=stage.trained_users, up=f"{stage.bytes_up / 1024:.0f}",
                           down=f"{stage.bytes_down / 1024:.0f}")
                live.update(Group(_table(rows, title, methods), status))

            def on_round(name: str) -> Any:
                def report(kind: str, period: int, answered: int) -> None:
                    status.plain = f"{name}: {kind} round of period {period}: {answered} devices answered"
                    live.update(Group(_table(rows, title, methods), status))
                return report

            for name in methods:
                db = out / f"rec-{name}.sqlite"
                for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                    stale.unlink(missing_ok=True)
                status.plain = f"{name}: starting {len(split.logs)} devices"
                live.update(Group(_table(rows, title, methods), status))
                results_by_method[name] = run_federated_mqtt(
                    name, split, encoder, items, configs[name], address, db,
                    fleet=f"rec-{name.replace('+', '-')}-{os.getpid()}", on_stage=on_stage, on_round=on_round(name))
            status.plain = ""
            live.update(Group(_table(rows, title, methods), status))
    finally:
        if running is not None:
            running.stop()
    report = {"broker": kind, "users": len(split.logs), "periods": periods, "seed": seed,
              "pretrain": {k: meta[k] for k in ("best_epoch", "key")} | {"valid_ndcg": max(meta["val_ndcg"])},
              "stages": {name: [{"period": st.period,
                                 "next": [st.preq.n, st.preq.hr, st.preq.ndcg] if st.preq else None,
                                 "held_out": {str(s): list(v) for s, v in st.scores.items()},
                                 "trained": st.trained_users, "bytes_up": st.bytes_up, "bytes_down": st.bytes_down}
                                for st in res.stages] for name, res in results_by_method.items()}}
    (out / "rec.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, res in results_by_method.items():
        later = [st.preq for st in res.stages[1:] if st.preq and st.preq.n]
        n = sum(p.n for p in later)
        ndcg = sum(p.ndcg_sum for p in later) / n if n else float("nan")
        console.print(f"{name}: next-period NDCG@10 over {n:,} interactions of periods 2..{periods}: {ndcg:.4f}")
    console.print("Raw interactions never left a device: uploads were adapter deltas, metrics and (FCUCR) one "
                  f"prototype per period. Results: {out / 'rec.json'}")
    return results_by_method
