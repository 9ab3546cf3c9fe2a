"""Federated continual recommendation on MovieLens-100K with a converged SASRec (issue 15).

    python benchmarks/recommender.py [--data-dir DIR] [--seeds 0 1 2] [--out docs/results]

Protocol (coordinator/recsys/analysis.py has the definitions): period 0 (the first half of all
interactions in time) pretrains SASRec centrally until validation NDCG@10 on each user's held-out last
period-0 item stops improving; periods 1-4 run on the devices, one device per user (numpy + ONNX Runtime,
the code a phone runs). A fixed quarter of the users are validation users: every hyper-parameter below is
chosen on their interactions only (the sweep is in the report), and every reported number is on the
other users. Views: *next* (prequential: every interaction of periods 2..4 ranked by the models as they
were when its period began, before training on it), *held-out* (after period t, on t's held-out last item),
*final*, *forgetting*; per group: light / medium / heavy (history-length tertiles), new / returning.

For every seed: SASRec is pretrained with that seed (cached under --cache) and exported to ONNX; the
devices use the seed for their adapter initialisation and distillation negatives. The sweep runs with
seed 0. Each cell (method x configuration x seed) is stored under --cache as soon as it finishes and read
back on a rerun, so an interrupted run resumes where it stopped. Writes recommender.{md,json,png}.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # many small BLAS calls: threads only contend (10x slower on 2 cores)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from coordinator.models.recommender import SASRecConfig  # noqa: E402
from coordinator.recsys.analysis import GROUPS, activity_thresholds, summarise, user_roles  # noqa: E402
from coordinator.recsys.data import continual_split, load_ml100k, returning_gaps_days  # noqa: E402
from coordinator.recsys.simulation import (  # noqa: E402
    MethodResult,
    Prequential,
    RecSimConfig,
    StageLog,
    build_test_sets,
    run_central_finetune,
    run_central_frozen,
    run_federated_rec,
    run_most_popular,
)
from coordinator.recsys.training import RecTrainSettings, pretrained_sasrec  # noqa: E402
from edge_client.recsys.adapter import RecAdapterConfig  # noqa: E402
from edge_client.recsys.device import METHODS  # noqa: E402
from edge_client.recsys.encoder import load_encoder  # noqa: E402
from export.recommender_export import export_recommender  # noqa: E402

NOTES_MARKER = "<!-- hand-written notes below: kept when the benchmark rewrites the table above -->"
NOTES = {
    "most-popular": "item counts up to period t, not personal",
    "central-sasrec": "converged SASRec from period 0, frozen (the encoder every device runs)",
    "central-finetune": "whole SASRec fine-tuned each period on pooled raw data (not private)",
    "local-only": "personal adapter (U, V, u), no federation",
    "fedavg": "FedAvg of the user-side adapter (U, V, u)",
    "fedavg+items": "FedAvg of user-side + item-side adapter (item bias, rank-8 item-table correction)",
    "fcucr": "FCUCR: FedAvg(U, V, item adapter) + personal u, gate, time-aware distillation, prototypes",
    "fcucr-no-distill": "FCUCR without self-distillation",
    "fcucr-no-proto": "FCUCR without prototype transfer (and gate)",
    "fcucr-no-items": "FCUCR without the item-side adapter",
}
FEDERATED = ("local-only", "fedavg", "fedavg+items", "fcucr")
ABLATIONS = ("fcucr-no-distill", "fcucr-no-proto", "fcucr-no-items")
# the sweep: every on-device method gets the same learning-rate x steps grid; FCUCR's own knobs on top
DEVICE_DEFAULTS = {"steps": 30, "lr": 1e-3, "lambda_sd": 0.5, "tau_x": 1.0, "top_m": 10, "proto_temperature": 0.1}
# Adam moves a parameter by at most ~lr per step, so 30 steps at 1e-3 leave every adapter entry within 0.03 of its
# start (the adapter is then the frozen model); the grid spans a decade to give the adapters a real chance
DEVICE_GRID = [{"steps": 30, "lr": 1e-3}, {"steps": 30, "lr": 1e-2}]
FCUCR_GRID = [{"lambda_sd": 0.5}, {"lambda_sd": 2.0}]  # on top of FCUCR's best steps and lr
FINETUNE_GRID = [{"epochs": 1, "lr": 1e-3}, {"epochs": 3, "lr": 1e-3}, {"epochs": 1, "lr": 3e-3}]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--periods", type=int, default=4)
    ap.add_argument("--valid-fraction", type=float, default=0.25)
    ap.add_argument("--pretrain-epochs", type=int, default=400, help="most epochs; early stopping decides")
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true", help="use the defaults instead of sweeping on validation")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--cache", default=".fedge/recommender-cache")  # git-ignored
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------ cells


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _preq_json(p: Prequential | None) -> dict[str, Any] | None:
    if p is None:
        return None
    arrays = {k: getattr(p, k).tolist() for k in ("users", "positions", "ranks", "returning")
              if getattr(p, k) is not None}
    return {"n": p.n, "hits": p.hits, "ndcg_sum": p.ndcg_sum, **arrays}


def _to_json(result: MethodResult) -> dict[str, Any]:
    return {"name": result.name, "stages": [
        {"period": st.period, "ranks": {str(s): r.tolist() for s, r in st.ranks.items()},
         "trained_users": st.trained_users, "skipped_users": st.skipped_users, "bytes_up": st.bytes_up,
         "bytes_down": st.bytes_down, "wall_s": st.wall_s, "mean_distill_weight": st.mean_distill_weight,
         "preq": _preq_json(st.preq)}
        for st in result.stages]}


def _from_json(blob: dict[str, Any]) -> MethodResult:
    result = MethodResult(blob["name"])
    for st in blob["stages"]:
        stage = StageLog(st["period"], st["trained_users"], st["skipped_users"], st["bytes_up"], st["bytes_down"],
                         st["wall_s"], st["mean_distill_weight"])
        for s, r in st["ranks"].items():
            stage.score(int(s), np.array(r, np.int64))
        p = st.get("preq")
        if p is not None:
            stage.preq = Prequential(p["n"], p["hits"], p["ndcg_sum"], np.array(p["users"], dtype=str),
                                     np.array(p["positions"], np.int64), np.array(p["ranks"], np.int64),
                                     np.array(p["returning"], bool))
        result.stages.append(stage)
    return result


class Cells:
    """One JSON per finished (method, configuration, seed); a rerun reads it instead of recomputing."""

    def __init__(self, root: Path) -> None:
        self.root = root / "cells"
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, run: Callable[[], MethodResult]) -> MethodResult:
        path = self.root / f"{key}.json"
        if path.is_file():
            return _from_json(json.loads(path.read_text()))
        result = run()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_to_json(result)) + "\n")
        tmp.replace(path)
        return result


# ------------------------------------------------------------------------------ one seed's world


class World:
    """Everything one seed's cells share: the pretrained model, its ONNX bundle, the test sets."""

    def __init__(self, split, args: argparse.Namespace, seed: int, console: Console) -> None:  # type: ignore[no-untyped-def]
        self.seed = seed
        settings = RecTrainSettings(epochs=args.pretrain_epochs, patience=args.patience, seed=seed, threads=1)
        self.model, self.meta = pretrained_sasrec(split, SASRecConfig(n_items=split.n_items), settings,
                                                  cache_dir=args.cache, progress=True)
        exported = export_recommender(self.model, Path(args.cache) / f"export-{self.meta['key']}")
        self.parity = exported.parity.max_abs_err
        self.encoder, self.items = load_encoder(exported.out_dir)
        self.tests = build_test_sets(split, self.encoder)
        console.print(f"seed {seed}: SASRec {self.model.n_params():,} params, best epoch {self.meta['best_epoch']} of "
                      f"{len(self.meta['losses'])} (valid NDCG@10 {max(self.meta['val_ndcg']):.4f}, CE "
                      f"{self.meta['losses'][self.meta['best_epoch'] - 1]:.3f}); ONNX parity {self.parity:.1e}")


def adapter_config(tau_days: float, hp: dict[str, Any]) -> RecAdapterConfig:
    fields = {k: v for k, v in hp.items() if k in RecAdapterConfig.__dataclass_fields__}
    return RecAdapterConfig(tau_days=tau_days * hp.get("tau_x", 1.0), **fields)


def run_method(name: str, hp: dict[str, Any], world: World, split, tau_days: float,  # type: ignore[no-untyped-def]
               cells: Cells, console: Console) -> MethodResult:
    if name in METHODS:
        hp = {**DEVICE_DEFAULTS, **hp}  # one cell per effective configuration, however it was spelled
    key = _key(name, hp, world.seed, world.meta["key"], tau_days)

    def run() -> MethodResult:
        t0 = time.perf_counter()
        if name == "most-popular":
            res = run_most_popular(split, world.tests)
        elif name == "central-sasrec":
            res = run_central_frozen(split, world.encoder, world.items, world.tests)
        elif name == "central-finetune":
            ft = RecTrainSettings(epochs=hp["epochs"], lr=hp["lr"], threads=1)
            res = run_central_finetune(split, world.model, world.tests, RecSimConfig(finetune=ft, seed=world.seed))
        else:
            cfg = RecSimConfig(adapter=adapter_config(tau_days, hp), top_m=hp.get("top_m", 10),
                               proto_temperature=hp.get("proto_temperature", 0.1), seed=world.seed)
            res = run_federated_rec(name, split, world.encoder, world.items, world.tests, cfg)
        console.log(f"seed {world.seed} {name} {hp}: {time.perf_counter() - t0:.0f}s")
        return res

    return cells.get(key, run)


def dedupe_sweep(sweep: list[dict[str, Any]], chosen: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, configuration), marked chosen by the final choice: FCUCR's second sweep starts from
    its first sweep's winner, which would otherwise be listed twice."""
    seen, rows = set(), []
    for row in sweep:
        key = (row["method"], json.dumps(row["hp"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            rows.append({**row, "chosen": row["hp"] == chosen.get(row["method"])})
    return rows


def valid_score(summary: dict[str, Any]) -> float:
    """What the sweep maximises on validation users: next-period (prequential) NDCG@10 -- thousands of cases,
    where the held-out items give a few hundred."""
    return summary["next"]["all"]["ndcg"]


# ------------------------------------------------------------------------------ tables


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _ms(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.4f} ± {pair[1]:.4f}"


MAIN_COLUMNS = [("next", "hr", "next HR@10"), ("next", "ndcg", "next NDCG@10"), ("current", "hr", "held-out HR@10"),
                ("current", "ndcg", "held-out NDCG@10"), ("final", "ndcg", "final NDCG@10")]


def main_rows(per_seed: dict[str, list[dict[str, Any]]], frozen: list[dict[str, Any]],
              up: dict[str, float]) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, runs in per_seed.items():
        row: dict[str, Any] = {}
        for view, metric, label in MAIN_COLUMNS:
            row[label] = mean_std([r[view]["all"][metric] for r in runs])
        row["forgetting NDCG@10"] = mean_std([r["forgetting"]["all"]["ndcg"] for r in runs])
        row["Δ next NDCG@10 vs frozen"] = mean_std([r["next"]["all"]["ndcg"] - f["next"]["all"]["ndcg"]
                                                    for r, f in zip(runs, frozen, strict=True)])
        row["up B/dev/period"] = up.get(name, 0.0)
        rows[name] = row
    return rows


def markdown_main(rows: dict[str, dict[str, Any]]) -> str:
    cols = [label for _, _, label in MAIN_COLUMNS] + ["forgetting NDCG@10", "Δ next NDCG@10 vs frozen"]
    lines = ["| method | " + " | ".join(cols) + " | up B/dev/period | what |", "|" + "---|" * (len(cols) + 3)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_ms(row[c]) for c in cols)
                     + f" | {row['up B/dev/period']:.0f} | {NOTES.get(name, '')} |")
    return "\n".join(lines) + "\n"


def markdown_groups(per_seed: dict[str, list[dict[str, Any]]], view: str) -> str:
    n = {g: per_seed["central-sasrec"][0][view][g]["n"] for g in GROUPS}
    lines = ["| method | " + " | ".join(f"{g} (n={n[g]})" for g in GROUPS) + " |", "|" + "---|" * (len(GROUPS) + 1)]
    for name, runs in per_seed.items():
        lines.append(f"| {name} | " + " | ".join(_ms(mean_std([r[view][g]["ndcg"] for r in runs])) for g in GROUPS)
                     + " |")
    return "\n".join(lines) + "\n"


def markdown_sweep(sweep: list[dict[str, Any]]) -> str:
    lines = ["| method | configuration | valid next NDCG@10 | valid held-out NDCG@10 | chosen |",
             "|---|---|---|---|---|"]
    for row in sweep:
        lines.append(f"| {row['method']} | {json.dumps(row['hp'])} | {row['next']:.4f} | {row['current']:.4f} | "
                     f"{'**yes**' if row['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def plot(per_seed: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    names = list(per_seed)
    for ax, view in zip(axes, ("next", "current"), strict=True):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = np.array([[r[view][g]["ndcg"] for g in GROUPS] for r in per_seed[name]])
            err = vals.std(axis=0, ddof=1) if len(vals) > 1 else None
            ax.bar(np.arange(len(GROUPS)) + i * width, vals.mean(axis=0), width, yerr=err, capsize=2, label=name)
        ax.set_xticks(np.arange(len(GROUPS)) + 0.4 - width / 2)
        ax.set_xticklabels(GROUPS)
        ax.set_title(f"{view}: NDCG@10 on test users, mean ± std over seeds")
    axes[0].set_ylabel("NDCG@10")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    console = Console()
    start = time.perf_counter()
    split = continual_split(load_ml100k(args.data_dir), n_periods=args.periods, pretrain_frac=0.5)
    roles = user_roles([str(u) for u in split.logs], args.valid_fraction)
    valid_users = {u for u, r in roles.items() if r == "valid"}
    tau_days = float(np.median(returning_gaps_days(split, valid_users)))
    cells = Cells(Path(args.cache))
    console.print(f"MovieLens-100K: {len(split.logs)} users ({len(valid_users)} for validation), periods "
                  f"1..{args.periods} active users {[len(split.users(p)) for p in range(1, args.periods + 1)]}; "
                  f"τ = {tau_days:.1f} days (median gap a returning validation user's snapshot meets)")
    worlds = {args.seeds[0]: World(split, args, args.seeds[0], console)}
    w0 = worlds[args.seeds[0]]
    thresholds = activity_thresholds(w0.tests)

    def evaluate(res: MethodResult, world: World, role: str) -> dict[str, Any]:
        return summarise(res, world.tests, roles, role, thresholds)

    # --- the sweep (seed 0, validation users)
    chosen: dict[str, dict[str, Any]] = {"most-popular": {}, "central-sasrec": {}}
    sweep: list[dict[str, Any]] = []

    def pick(name: str, grid: list[dict[str, Any]]) -> dict[str, Any]:
        scored = []
        for hp in grid:
            s = evaluate(run_method(name, hp, w0, split, tau_days, cells, console), w0, "valid")
            scored.append((valid_score(s), hp, s))
        best = max(scored, key=lambda x: x[0])[1]
        sweep.extend({"method": name, "hp": hp, "current": s["current"]["all"]["ndcg"],
                      "next": s["next"]["all"]["ndcg"], "chosen": hp is best} for _, hp, s in scored)
        return best

    if args.no_sweep:
        chosen["central-finetune"] = FINETUNE_GRID[0]
        chosen.update({m: dict(DEVICE_DEFAULTS) for m in (*FEDERATED, *ABLATIONS)})
    else:
        chosen["central-finetune"] = pick("central-finetune", FINETUNE_GRID)
        for name in FEDERATED:
            chosen[name] = pick(name, [{**DEVICE_DEFAULTS, **hp} for hp in DEVICE_GRID])
        chosen["fcucr"] = pick("fcucr", [{**chosen["fcucr"], **hp} for hp in FCUCR_GRID])
        for name in ABLATIONS:
            chosen[name] = {k: v for k, v in chosen["fcucr"].items()}
        sweep[:] = dedupe_sweep(sweep, chosen)
    # --- every seed with the chosen configurations, scored on test users: the main methods for every seed
    # first, then the FCUCR ablations (an interrupted run has the main table complete first)
    main_methods = ["most-popular", "central-sasrec", "central-finetune", *FEDERATED]
    per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in (*main_methods, *ABLATIONS)}
    stage_info: dict[str, list[dict[str, Any]]] = {m: [] for m in per_seed}
    pretrain = []
    for methods in (main_methods, ABLATIONS):
        for seed in args.seeds:
            if seed not in worlds:
                worlds[seed] = World(split, args, seed, console)
            world = worlds[seed]
            if methods is main_methods:
                pretrain.append({"seed": seed, **{k: world.meta[k] for k in ("best_epoch", "stopped_early", "key")},
                                 "valid_ndcg": max(world.meta["val_ndcg"]), "epochs_run": len(world.meta["losses"]),
                                 "parity_max_abs_err": world.parity})
            for name in methods:
                res = run_method(name, chosen[name], world, split, tau_days, cells, console)
                per_seed[name].append(evaluate(res, world, "test"))
                stage_info[name].append({"trained": [st.trained_users for st in res.stages],
                                         "bytes_up": [st.bytes_up for st in res.stages],
                                         "distill_weight": [st.mean_distill_weight for st in res.stages]})
            done = {m: r for m, r in per_seed.items() if len(r) == len(per_seed["central-sasrec"])}
            write_report(args, done, {m: stage_info[m] for m in done}, chosen, sweep, pretrain, tau_days, thresholds,
                         roles, start, console)
    return {"per_seed": per_seed, "chosen": chosen}


def write_report(args, per_seed, stage_info, chosen, sweep, pretrain, tau_days, thresholds, roles, start,  # type: ignore[no-untyped-def]
                 console: Console) -> None:
    seeds = [p["seed"] for p in pretrain]
    up = {m: float(np.mean([b / max(t, 1) for info in infos for b, t in zip(info["bytes_up"], info["trained"],
                                                                                strict=True)]))
          for m, infos in stage_info.items()}
    rows = main_rows(per_seed, per_seed["central-sasrec"], up)
    n_test = sum(1 for r in roles.values() if r == "test")
    title = (f"MovieLens-100K, {len(roles)} users = devices ({n_test} test users reported), {args.periods} continual "
             f"periods, mean ± std over seeds {seeds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": {"seeds": seeds, "periods": args.periods, "tau_days": tau_days, "thresholds": thresholds,
                       "valid_fraction": args.valid_fraction, "pretrain": pretrain, "chosen": chosen,
                       "grids": {"device": DEVICE_GRID, "fcucr": FCUCR_GRID, "finetune": FINETUNE_GRID},
                       "wall_s": time.perf_counter() - start},
              "main": {m: {k: list(v) if isinstance(v, tuple) else v for k, v in row.items()}
                       for m, row in rows.items()},
              "per_seed": per_seed, "stages": stage_info, "sweep": sweep}
    (out / "recommender.json").write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title=title, header_style="bold")
    for col in ("method", "next NDCG@10", "Δ next vs frozen", "held-out NDCG@10", "final NDCG@10"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, row in rows.items():
        table.add_row(name, _ms(row["next NDCG@10"]), _ms(row["Δ next NDCG@10 vs frozen"]),
                      _ms(row["held-out NDCG@10"]), _ms(row["final NDCG@10"]))
    console.print(table)
    weights = {m: float(np.mean([w for info in stage_info[m] for w in info["distill_weight"]]))
               for m in stage_info if METHODS.get(m) and METHODS[m].distill}
    text = (f"# {title}\n\n## All test users\n\n" + markdown_main(rows)
            + f"\n## Per user group, next view (NDCG@10; light < {thresholds[0]:.0f} ≤ medium < {thresholds[1]:.0f}"
              " ≤ heavy interactions before the predicted one)\n\n" + markdown_groups(per_seed, "next")
            + "\n## Per user group, held-out view (NDCG@10)\n\n" + markdown_groups(per_seed, "current")
            + "\n## Sweep (seed 0, validation users only; chosen = best next NDCG@10)\n\n"
            + markdown_sweep(sweep)
            + f"\nτ = {tau_days:.1f} days; mean distillation weight λ·exp(−Δt/τ): "
            + ", ".join(f"{m} {w:.3f}" for m, w in weights.items())
            + "\n\nPretraining (period 0, early stopping on validation NDCG@10): "
            + "; ".join(f"seed {p['seed']}: best epoch {p['best_epoch']} of {p['epochs_run']}, valid NDCG@10 "
                        f"{p['valid_ndcg']:.4f}" for p in pretrain) + "\n")
    md = out / "recommender.md"
    notes = md.read_text().partition(NOTES_MARKER)[2] if md.is_file() else ""
    md.write_text(text + f"\n{NOTES_MARKER}" + (notes or "\n"))
    plot(per_seed, out / "recommender.png")
    console.print(f"wrote {out}/recommender.{{md,json,png}} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
