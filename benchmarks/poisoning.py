"""Poisoning benchmark: one attacker among K honest devices (K = 5 and 9), global MSE of the honest devices.

The honest devices are the demo's (non-IID slices of ETTh1 and exchange rates, the demo's pretrained backbone in ONNX
Runtime, heads trained in numpy); each round every device trains from the global head. The attacker trains honestly
too and then sends -10^4 times its delta (float32: float16 would overflow and be refused at decoding), in two
variants: claiming its real sample count, or 10^6 samples. The server aggregates as fedge did before issue #11
(FedAvg, no bounds) and as it does now: the default bounds (delta clipped to 2x the round's median norm, sample count
capped at 2x the round's median) in front of FedAvg and of each robust strategy. An aggregate that is not finite in
float32 is refused now (the round fails, the head stays); before, it was committed (reported as inf).

    python benchmarks/poisoning.py [--rounds 3] [--out docs/results]

Writes poisoning.json and poisoning.md (hand-written notes below the marker line are kept). Cells are checkpointed
in the JSON and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from coordinator.fleet.aggregation import Bounds, ClientUpdate, NonFiniteModel, bound_updates
from coordinator.fleet.simulation import carve_devices
from coordinator.fleet.strategies import fleet_strategy
from coordinator.fleet.strategies.base import RoundInputs
from edge_client.learning.head import slice_head
from edge_client.learning.learner import DeviceLearner, SplitConfig
from edge_client.runtime.backbone import BackboneRunner

NOTES_MARKER = "<!-- hand-written notes below: kept when the benchmark rewrites the table above -->"
SCALE = -1e4
SERVERS = [  # label, strategy, bounds
    ("FedAvg, as before (no bounds)", "fedavg", None),
    ("FedAvg + default bounds (new default)", "fedavg", Bounds()),
    ("trimmed mean + bounds", "trimmed_mean", Bounds()),
    ("coordinate median + bounds", "median", Bounds()),
    ("multi-Krum + bounds", "krum", Bounds()),
]
ATTACKS = {"none": None, "-1e4 x delta": None, "-1e4 x delta, 10^6 samples": 1_000_000}


def learners(n: int, backbone: Path, horizon: int, seed: int) -> list[DeviceLearner]:
    out = []
    for dev in carve_devices(n, seed=seed):
        series, season, _ = dev.source.load()
        out.append(DeviceLearner(BackboneRunner(backbone, threads=1), series, season=season,
                                 split=SplitConfig(horizon=horizon)))
    return out


def run_cell(honest: list[DeviceLearner], attacker: DeviceLearner, initial: dict, strategy: str,
             bounds: Bounds | None, attack: str, rounds: int) -> float:
    params = {k: np.asarray(v, np.float32) for k, v in initial.items()}
    server = fleet_strategy(strategy)
    for r in range(rounds):
        ups = []
        for i, dev in enumerate(honest):
            out = dev.run_round(params, epochs=1, lr=3e-3, batch_size=64, seed=100 * r + i, upload_dtype="float32")
            ups.append(ClientUpdate(f"h{i}", out.n_samples, out.delta))
        if attack != "none":
            out = attacker.run_round(params, epochs=1, lr=3e-3, batch_size=64, seed=100 * r + 99,
                                     upload_dtype="float32")
            evil = {k: (SCALE * np.asarray(v, np.float64)).astype(np.float32) for k, v in out.delta.items()}
            ups.append(ClientUpdate("attacker", ATTACKS[attack] or out.n_samples, evil))
        if bounds is not None:
            ups = bound_updates(ups, bounds).updates
        try:
            params = server.aggregate_round(RoundInputs(params, ups, lambda: initial, lambda d: None)).global_params
        except NonFiniteModel:
            if bounds is None:  # before issue #11 nothing checked: the inf head was committed
                return math.inf
            continue  # now: refused, the round fails and the head stays
        if not all(np.isfinite(v).all() for v in params.values()):
            return math.inf
    return float(np.mean([dev.evaluate(params, "global")["global_mse"] for dev in honest]))


def markdown(cells: dict, rounds: int) -> str:
    lines = [f"Mean global MSE of the honest devices after {rounds} rounds (their own held-back windows, scaled "
             "units); one attacker sends -10^4 x its delta. Lower is better; *inf*: the head became inf.", ""]
    for k in sorted({c["honest"] for c in cells.values()}):
        lines += [f"### one attacker among {k} honest devices", "",
                  "| server | no attacker | " + " | ".join(a for a in ATTACKS if a != "none") + " |",
                  "|---|---:|" + "---:|" * (len(ATTACKS) - 1)]
        for label, _, _ in SERVERS:
            row = [cells.get(f"{k}|{label}|{a}", {}).get("mse") for a in ATTACKS]
            lines.append(f"| {label} | " + " | ".join("—" if v is None else ("inf" if v == math.inf else
                                                                             f"{v:.4g}") for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--honest", type=int, nargs="+", default=[5, 9])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    from coordinator.demo import DemoConfig, demo_backbone
    from export.onnx_export import export_model

    console = Console()
    out_json = args.out / "poisoning.json"
    state = json.loads(out_json.read_text()) if out_json.is_file() else {}
    cells = state.get("cells", {}) if state.get("rounds") == args.rounds else {}
    model, info = demo_backbone(DemoConfig())
    horizon = 24
    initial = slice_head(model.head_state(), horizon)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_model(model, Path(tmp))
        devices = learners(max(args.honest) + 1, exported.backbone, horizon, args.seed)
        attacker = devices[-1]
        for k in args.honest:
            for label, strategy, bounds in SERVERS:
                for attack in ATTACKS:
                    key = f"{k}|{label}|{attack}"
                    if key in cells:
                        continue
                    mse = run_cell(devices[:k], attacker, initial, strategy, bounds, attack, args.rounds)
                    cells[key] = {"honest": k, "server": label, "attack": attack, "mse": mse}
                    console.print(f"{k} honest, {label}, attack {attack}: MSE {mse:.4g}")
                    args.out.mkdir(parents=True, exist_ok=True)
                    out_json.write_text(json.dumps({"rounds": args.rounds, "backbone": info["description"],
                                                    "cells": cells}, indent=1, default=str))
    table = Table(title="global MSE of honest devices (one attacker)")
    for col in ("honest", "server", *ATTACKS):
        table.add_column(col)
    for k in args.honest:
        for label, _, _ in SERVERS:
            table.add_row(str(k), label, *[f"{cells[f'{k}|{label}|{a}']['mse']:.4g}" for a in ATTACKS])
    console.print(table)
    md = args.out / "poisoning.md"
    notes = md.read_text().partition(NOTES_MARKER)[2] if md.is_file() else ""
    md.write_text("# Poisoning: one attacker among honest devices\n\n" + f"Backbone: {info['description']}.\n\n"
                  + markdown(cells, args.rounds) + f"\n{NOTES_MARKER}" + (notes or "\n"))


if __name__ == "__main__":
    main()
