"""``fedge demo --task rec``: continual federated recommendation over MQTT with a live table.

Every user is a device (:class:`edge_client.recsys.client.RecEdgeClient`: numpy + ONNX Runtime)
connected to a real broker -- Mosquitto when installed, else the embedded rumqttd -- and the
coordinator is the fleet's :class:`coordinator.fleet.server.FleetCoordinator` with the recommender's
prototype exchange (:mod:`coordinator.recsys.fleet`). FedAvg of adapters runs first, then FCUCR,
each as its own fleet. The table shows, per period, how many devices trained, what crossed the
broker, the next-period HR@10/NDCG@10 the devices measured on their own held-out items, and
FCUCR's forgetting so far. The in-process simulation (``benchmarks/recommender.py``) gives the
same numbers for the same seed; the demo shows that they survive the real transport.
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

DEMO_METHODS = ("fedavg", "fcucr")


def _table(rows: dict[int, dict[str, Any]], title: str) -> Table:
    t = Table(title=title, header_style="bold")
    for col in ("period", "devices trained", "KB up", "KB down", "FedAvg HR@10", "FedAvg NDCG@10",
                "FCUCR HR@10", "FCUCR NDCG@10", "FCUCR forgetting", "distill w"):
        t.add_column(col, justify="right")
    for period, r in sorted(rows.items()):
        t.add_row(str(period), *[str(r.get(k, "…")) for k in ("devices", "up", "down", "fa_hr", "fa_ndcg",
                                                             "fc_hr", "fc_ndcg", "forget", "w")])
    return t


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.3f}"  # NaN: the last period has no next period


def _forgetting(stages: list[StageLog]) -> float:
    last = stages[-1]
    drops = [st.scores[st.period][1] - last.scores[st.period][1] for st in stages[:-1]]
    return sum(drops) / len(drops) if drops else float("nan")


def run_rec_demo(
    console: Console | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    users: int | None = 300,
    periods: int = 4,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] = ".fedge/recommender-cache",
    pretrain_epochs: int = 30,
    broker: str = "auto",
    out_dir: str | os.PathLike[str] = "runs/demo",
) -> dict[str, MethodResult]:
    """Pretrain (or load) SASRec on period 0, export it, start a broker, then run FedAvg and FCUCR
    period by period with one MQTT device per user; writes ``rec.json`` to `out_dir`."""
    from coordinator.demo import start_demo_broker
    from coordinator.fleet.broker import raise_fd_limit
    from coordinator.models.recommender import SASRecConfig
    from coordinator.recsys.data import continual_split, load_ml100k, median_session_gap_days
    from coordinator.recsys.fleet import run_federated_mqtt
    from coordinator.recsys.simulation import RecSimConfig
    from coordinator.recsys.training import RecTrainSettings, pretrained_sasrec
    from edge_client.recsys.adapter import RecAdapterConfig
    from edge_client.recsys.encoder import load_encoder
    from export.recommender_export import export_recommender

    console = console or Console()
    console.rule("[bold]1. MovieLens-100K (read from the data directory, never copied) -> time periods")
    data = load_ml100k(data_dir)
    full = continual_split(data, n_periods=periods, pretrain_frac=0.5)  # the coordinator pretrains on all of period 0
    split = continual_split(data, n_periods=periods, pretrain_frac=0.5, users=users, seed=seed)  # the devices shown
    console.print(f"{len(split.logs)} users = {len(split.logs)} devices; {split.n_items} items; periods 1..{periods} "
                  f"active users: {[len(split.users(p)) for p in range(1, periods + 1)]}")
    console.rule("[bold]2. pretrain SASRec centrally on period 0 (cached) and export the encoder to ONNX")
    model, meta = pretrained_sasrec(full, SASRecConfig(n_items=split.n_items),
                                    RecTrainSettings(epochs=pretrain_epochs, seed=0), cache_dir=cache_dir,
                                    progress=True)
    exported = export_recommender(model, Path(cache_dir) / f"export-{meta['key']}")
    console.print(f"sequence_encoder.onnx + items.npy; parity max |Δh| {exported.parity.max_abs_err:.1e}")
    encoder, items = load_encoder(exported.out_dir)
    cfg = RecSimConfig(adapter=RecAdapterConfig(tau_days=median_session_gap_days(split)), seed=seed)

    console.rule("[bold]3. broker, coordinator and one device per user: FedAvg of adapters, then FCUCR")
    raise_fd_limit()  # a descriptor per device in this process (and the embedded broker, if used, lives here too)
    running, address, kind = start_demo_broker(broker)
    console.print(f"MQTT broker: {kind} on {address.host}:{address.port}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, Any]] = {p: {} for p in range(1, periods + 1)}
    status = Text("")
    title = "recommendation on devices over MQTT — next-period metrics measured by the devices (full ranking)"
    results: dict[str, MethodResult] = {}
    try:
        with Live(Group(_table(rows, title), status), console=console, refresh_per_second=4) as live:
            done: dict[str, list[StageLog]] = {name: [] for name in DEMO_METHODS}

            def on_stage(name: str, stage: StageLog) -> None:
                done[name].append(stage)
                hr, ndcg = stage.scores.get(stage.period + 1, (float("nan"), float("nan")))
                row = rows[stage.period]
                if name == "fedavg":
                    row.update(fa_hr=_fmt(hr), fa_ndcg=_fmt(ndcg))
                else:
                    row.update(devices=stage.trained_users, up=f"{stage.bytes_up / 1024:.0f}",
                               down=f"{stage.bytes_down / 1024:.0f}", fc_hr=_fmt(hr), fc_ndcg=_fmt(ndcg),
                               forget=_fmt(_forgetting(done[name])), w=f"{stage.mean_distill_weight:.3f}")
                live.update(Group(_table(rows, title), status))

            def on_round(name: str) -> Any:
                def report(kind: str, period: int, answered: int) -> None:
                    status.plain = f"{name}: {kind} round of period {period}: {answered} devices answered"
                    live.update(Group(_table(rows, title), status))
                return report

            for name in DEMO_METHODS:
                db = out / f"rec-{name}.sqlite"
                for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                    stale.unlink(missing_ok=True)
                status.plain = f"{name}: starting {len(split.logs)} devices"
                live.update(Group(_table(rows, title), status))
                results[name] = run_federated_mqtt(name, split, encoder, items, cfg, address, db,
                                                   fleet=f"rec-{name}-{os.getpid()}", on_stage=on_stage,
                                                   on_round=on_round(name))
            status.plain = ""
            live.update(Group(_table(rows, title), status))
    finally:
        if running is not None:
            running.stop()
    report = {"broker": kind, "users": len(split.logs), "periods": periods, "seed": seed,
              "summary": {name: res.summary() for name, res in results.items()},
              "stages": {name: [{"period": st.period, "scores": {str(s): list(v) for s, v in st.scores.items()},
                                 "trained": st.trained_users, "bytes_up": st.bytes_up, "bytes_down": st.bytes_down}
                                for st in res.stages] for name, res in results.items()}}
    (out / "rec.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, res in results.items():
        s = res.summary()
        console.print(f"{name}: next HR@10 {s['next_hr']:.4f} NDCG@10 {s['next_ndcg']:.4f}; final avg NDCG@10 "
                      f"{s['final_ndcg']:.4f}; forgetting {s['forget_ndcg']:+.4f}")
    console.print("Raw interactions never left a device: uploads were adapter deltas (U, V), metrics and one "
                  f"prototype per period. Results: {out / 'rec.json'}")
    return results
