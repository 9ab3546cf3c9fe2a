"""The recommender over the real fleet path at full size: every MovieLens-100K user as an MQTT device, through a
private Mosquitto and the fleet coordinator, against the in-process simulation of the same method (issue 15).

    python benchmarks/rec_fleet.py [--data-dir DIR] [--methods fedavg+items fcucr] [--periods 4] [--out docs/results]

Uses the converged period-0 SASRec of benchmarks/recommender.py (seed 0; the same cache) and, when that
benchmark has run, the configuration its sweep chose for each method. For each method: wall time of the
in-process simulation and of the MQTT run (devices, coordinator and broker on this machine, all devices in
one process on one network thread), bytes through the broker, and whether the two agree exactly: every
device's rank of every held-out item after every period, and the final shared adapter bit for bit.
Writes rec_fleet.{md,json}.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from coordinator.fleet.broker import raise_fd_limit, start_mosquitto  # noqa: E402
from coordinator.models.recommender import SASRecConfig  # noqa: E402
from coordinator.recsys.data import continual_split, load_ml100k  # noqa: E402
from coordinator.recsys.fleet import run_federated_mqtt  # noqa: E402
from coordinator.recsys.simulation import RecSimConfig, build_test_sets, run_federated_rec  # noqa: E402
from coordinator.recsys.training import RecTrainSettings, pretrained_sasrec  # noqa: E402
from edge_client.recsys.encoder import load_encoder  # noqa: E402
from export.recommender_export import export_recommender  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--methods", nargs="+", default=["fedavg+items", "fcucr"])
    ap.add_argument("--periods", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=400)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--results", default="docs/results/recommender.json", help="the sweep's chosen configurations")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--cache", default=".fedge/recommender-cache")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    console = Console()
    split = continual_split(load_ml100k(args.data_dir), n_periods=args.periods, pretrain_frac=0.5)
    settings = RecTrainSettings(epochs=args.pretrain_epochs, patience=args.patience, seed=0, threads=1)
    model, meta = pretrained_sasrec(split, SASRecConfig(n_items=split.n_items), settings, cache_dir=args.cache,
                                    progress=True)
    exported = export_recommender(model, Path(args.cache) / f"export-{meta['key']}")
    encoder, items = load_encoder(exported.out_dir)
    tests = build_test_sets(split, encoder)
    raise_fd_limit()
    rows: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        cfg = RecSimConfig.chosen(args.results, method)
        t0 = time.perf_counter()
        local = run_federated_rec(method, split, encoder, items, tests, cfg)
        sim_s = time.perf_counter() - t0
        with start_mosquitto() as broker, tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            wire = run_federated_mqtt(method, split, encoder, items, cfg, broker.address, Path(tmp) / "fleet.sqlite",
                                      fleet=f"bench-{method.replace('+', '-')}", deadline_s=1800)
            mqtt_s = time.perf_counter() - t0
        same_ranks = all(set(a.ranks) == set(b.ranks) and all(np.array_equal(a.ranks[s], b.ranks[s])
                                                                      for s in a.ranks)
                         for a, b in zip(local.stages, wire.stages, strict=True))
        same_global = set(local.final_global) == set(wire.final_global) and all(
            np.array_equal(local.final_global[k], wire.final_global[k]) for k in local.final_global)
        rows[method] = {"config": asdict(cfg.adapter), "devices": len(split.logs), "periods": args.periods,
                        "devices_trained": [st.trained_users for st in wire.stages],
                        "simulation_s": sim_s, "mqtt_s": mqtt_s, "ranks_identical": same_ranks,
                        "final_adapter_identical": same_global,
                        "mqtt_bytes_up": int(sum(st.bytes_up for st in wire.stages)),
                        "mqtt_bytes_down": int(sum(st.bytes_down for st in wire.stages)),
                        "next_ndcg": wire.summary()["next_ndcg"]}
        console.log(f"{method}: simulation {sim_s:.0f}s, MQTT {mqtt_s:.0f}s, identical ranks {same_ranks}, "
                    f"identical adapter {same_global}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": {"pretrain_key": meta["key"], "cpu_count": os.cpu_count(),
                       "load_avg_at_end": os.getloadavg()}, "rows": rows}
    (out / "rec_fleet.json").write_text(json.dumps(report, indent=2) + "\n")
    title = (f"MovieLens-100K over MQTT: {len(split.logs)} devices, {args.periods} periods, Mosquitto + fleet "
             "coordinator vs in-process simulation")
    table = Table(title=title, header_style="bold")
    cols = ("method", "devices trained / period", "simulation s", "MQTT s", "identical ranks", "identical adapter",
            "MB up", "MB down")
    for c in cols:
        table.add_column(c)
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m, r in rows.items():
        cells = [m, str(r["devices_trained"]), f"{r['simulation_s']:.0f}", f"{r['mqtt_s']:.0f}",
                 str(r["ranks_identical"]), str(r["final_adapter_identical"]), f"{r['mqtt_bytes_up'] / 1e6:.1f}",
                 f"{r['mqtt_bytes_down'] / 1e6:.1f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    lines += ["", f"{os.cpu_count()} CPU cores shared with other jobs (1-min load average at the end: "
              f"{os.getloadavg()[0]:.1f}); every device of one run lives in this one process on one network thread "
              "(edge_client/wire/mqtt_loop.py) and trains on its own worker thread."]
    (out / "rec_fleet.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
