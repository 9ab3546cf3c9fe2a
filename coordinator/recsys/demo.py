"""``fedge demo --task rec``: continual federated recommendation rounds with a live table.

In-process: each user is a :class:`edge_client.recsys.RecDevice` (numpy + ONNX Runtime, the device
code), the coordinator averages adapters and mixes prototypes between periods. The table shows,
per period, how many devices trained, the bytes each moved, next-period HR@10/NDCG@10 of the
shared model (FedAvg of adapters, everyone gets the same) and of FCUCR's personal models, and the
forgetting on earlier periods so far.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator.recsys.simulation import MethodResult, StageLog


def _table(rows: dict[int, dict[str, Any]], title: str) -> Table:
    t = Table(title=title, header_style="bold")
    for col in ("period", "devices", "B up/dev", "B down/dev", "FedAvg HR@10", "FedAvg NDCG@10",
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
) -> dict[str, MethodResult]:
    """Pretrain (or load) SASRec on period 0, export it, then run FedAvg and FCUCR period by period."""
    from coordinator.models.recommender import RecTrainSettings, SASRecConfig, pretrained_sasrec
    from coordinator.recsys.data import continual_split, load_ml100k, median_session_gap_days
    from coordinator.recsys.simulation import RecSimConfig, build_test_sets, run_federated
    from edge_client.recsys import RecAdapterConfig, load_bundle
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
    encoder, items = load_bundle(exported.out_dir)
    cfg = RecSimConfig(adapter=RecAdapterConfig(tau_days=median_session_gap_days(split)), seed=seed)
    tests = build_test_sets(split, encoder)

    console.rule("[bold]3. continual federated periods: FedAvg of adapters vs FCUCR personal models")
    rows: dict[int, dict[str, Any]] = {p: {} for p in range(1, periods + 1)}
    status = Text("")
    title = "recommendation on devices — next-period metrics (full ranking over all items)"
    with Live(Group(_table(rows, title), status), console=console, refresh_per_second=4) as live:
        done: dict[str, list[StageLog]] = {"fedavg": [], "fcucr": []}

        def on_stage(name: str, stage: StageLog) -> None:
            done[name].append(stage)
            hr, ndcg = stage.scores.get(stage.period + 1, (float("nan"), float("nan")))
            row = rows[stage.period]
            if name == "fedavg":
                row.update(fa_hr=_fmt(hr), fa_ndcg=_fmt(ndcg))
            else:
                n = max(stage.trained_users, 1)
                row.update(devices=stage.trained_users, up=stage.bytes_up // n, down=stage.bytes_down // n,
                           fc_hr=_fmt(hr), fc_ndcg=_fmt(ndcg), forget=_fmt(_forgetting(done[name])),
                           w=f"{stage.mean_distill_weight:.3f}")
            status.plain = f"{name}: period {stage.period} done in {stage.wall_s:.1f}s"
            live.update(Group(_table(rows, title), status))

        results = {name: run_federated(name, split, encoder, items, tests, cfg, on_stage) for name in done}
        status.plain = ""
        live.update(Group(_table(rows, title), status))
    for name, res in results.items():
        s = res.summary()
        console.print(f"{name}: next HR@10 {s['next_hr']:.4f} NDCG@10 {s['next_ndcg']:.4f}; final avg NDCG@10 "
                      f"{s['final_ndcg']:.4f}; forgetting {s['forget_ndcg']:+.4f}")
    console.print("Raw interactions never left a device: uploads were adapter deltas (U, V) and one prototype.")
    return results
