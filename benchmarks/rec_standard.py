"""The recommender's standard-protocol anchor: SASRec vs most-popular, item-kNN and matrix factorisation
on MovieLens-100K, leave-one-out, full ranking over all items (issue 15).

    python benchmarks/rec_standard.py [--data-dir DIR] [--seeds 0 1 2] [--out docs/results]

Every user's last interaction is the test target, the second-to-last the validation target
(:mod:`coordinator.recsys.loo`). Hyper-parameters of every model are chosen on validation NDCG@10 with
seed 0 (the grids are in the JSON); the chosen configuration then runs with every seed. SASRec is
trained with full-softmax cross-entropy ("SASRec+", Klenitskiy & Vasilev 2023) until validation
NDCG@10 has not improved for `patience` epochs, keeping the best epoch. Reported: HR@10, NDCG@10 and
MRR on the test targets, mean ± std over seeds, plus SASRec's HR@10 under the *sampled* protocol of
the original SASRec paper (100 random unseen negatives), to show why such numbers are not comparable.

Each cell (model × configuration × seed) is stored under --cache as it finishes and skipped on a rerun,
so an interrupted run resumes. Writes rec_standard.{md,json,png} under --out.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # implicit and numpy: one BLAS thread each on a shared 2-core machine

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from coordinator.recsys.baselines import ItemKNNConfig, MFConfig, fit_item_knn, fit_mf, fit_most_popular  # noqa: E402
from coordinator.recsys.loo import (  # noqa: E402
    LeaveOneOut,
    Scorer,
    evaluate,
    sampled_metrics,
    sasrec_scorer,
    training_data,
)
from edge_client.recsys.data import load_ml100k  # noqa: E402

NOTES_MARKER = "<!-- hand-written notes below: kept when the benchmark rewrites the table above -->"

KNN_GRID = [ItemKNNConfig(k, s) for k in (20, 50, 100, 200, 1682) for s in (0.0, 10.0, 50.0)]
ALS_GRID = [MFConfig("als", f, r, a) for f in (32, 64, 128) for r in (0.1, 1.0, 10.0) for a in (1.0, 5.0, 10.0)]
BPR_GRID = [MFConfig("bpr", f, 0.01, iterations=it, learning_rate=lr) for f in (32, 64, 128)
            for lr in (0.003, 0.01, 0.03) for it in (50, 100, 200)]
SASREC_GRID = [{"max_len": 50, "dropout": d, "lr": 2e-3, "batch_size": 64} for d in (0.2, 0.5)]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-epochs", type=int, default=300)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--cache", default=".fedge/rec-standard")  # git-ignored
    return ap.parse_args(argv)


class Cells:
    """One JSON file per finished cell; a rerun reads them instead of recomputing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        if path.is_file():
            return json.loads(path.read_text())
        cell = {"key": key, **compute()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cell) + "\n")
        tmp.replace(path)
        return cell


def scored(score: Scorer, loo: LeaveOneOut, t0: float) -> dict[str, Any]:
    valid, _ = evaluate(score, loo, "valid")
    test, ranks = evaluate(score, loo, "test")
    return {"valid": valid, "test": test, "test_ranks": ranks.tolist(), "wall_s": time.perf_counter() - t0}


def run_sasrec(loo: LeaveOneOut, hp: dict[str, Any], seed: int, args: argparse.Namespace,
               console: Console) -> dict[str, Any]:
    import torch

    from coordinator.models.recommender import SASRec, SASRecConfig
    from coordinator.recsys.training import RecTrainSettings, train_sasrec

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(n_items=loo.n_items, max_len=hp["max_len"], dropout=hp["dropout"]))
    x, y = training_data(loo, hp["max_len"])

    def validate(m) -> float:  # type: ignore[no-untyped-def]
        return evaluate(sasrec_scorer(m), loo, "valid")[0]["ndcg"]

    def on_epoch(epoch: int, loss: float, val: float | None) -> None:
        if epoch % 10 == 0:
            console.log(f"SASRec {hp} seed {seed}: epoch {epoch} CE {loss:.3f} valid NDCG@10 {val:.4f}")

    settings = RecTrainSettings(epochs=args.max_epochs, seed=seed, threads=args.threads, patience=args.patience,
                                lr=hp["lr"], batch_size=hp["batch_size"])
    hist = train_sasrec(model, x, y, settings, on_epoch, validate)
    out = scored(sasrec_scorer(model), loo, t0)
    out.update(history={"loss": hist.losses, "val_ndcg": hist.val}, best_epoch=hist.best_epoch,
               stopped_early=hist.stopped_early, sampled_test=sampled_metrics(sasrec_scorer(model), loo, seed=seed),
               n_params=model.n_params())
    return out


def choose(cells: list[dict[str, Any]]) -> dict[str, Any]:
    return max(cells, key=lambda c: c["valid"]["ndcg"])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in ("valid", "test"):
        for m in ("hr", "ndcg", "mrr"):
            vals = [r[split][m] for r in runs]
            out[f"{split}_{m}"] = float(np.mean(vals))
            out[f"{split}_{m}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    out["seeds"] = len(runs)
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, k: int = 10, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of HR@k(a) − HR@k(b) over users resampled with replacement (same users, paired)."""
    rng = np.random.default_rng(seed)
    ha, hb = (a <= k).astype(float), (b <= k).astype(float)
    idx = rng.integers(0, len(a), (n, len(a)))
    diffs = ha[idx].mean(axis=1) - hb[idx].mean(axis=1)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


COLUMNS = [("test_hr", "HR@10"), ("test_ndcg", "NDCG@10"), ("test_mrr", "MRR"), ("valid_ndcg", "valid NDCG@10")]


def _fmt(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.4f} ± {row[key + '_std']:.4f}" if row["seeds"] > 1 else f"{row[key]:.4f}"


def markdown(rows: dict[str, dict[str, Any]], title: str) -> str:
    head = ("| model | " + " | ".join(label for _, label in COLUMNS)
            + " | × most-popular HR@10 | seeds | chosen on validation |")
    lines = [f"# {title}", "", head, "|" + "---|" * (len(COLUMNS) + 4)]
    pop = rows["most-popular"]["test_hr"]
    for name, row in rows.items():
        cells = [_fmt(row, k) for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['test_hr'] / pop:.2f} | {row['seeds']} | "
                     f"{row['config']} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[int, list[float]], baselines: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed, vals in curves.items():
        ax.plot(np.arange(1, len(vals) + 1), vals, label=f"SASRec seed {seed}")
    for i, (name, v) in enumerate(baselines.items()):
        ax.axhline(v, ls="--", color=f"C{i + 3}", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10 (full ranking)")
    ax.set_title("MovieLens-100K leave-one-out: SASRec until validation stops improving")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    console = Console()
    start = time.perf_counter()
    loo = LeaveOneOut.from_interactions(load_ml100k(args.data_dir))
    cells = Cells(Path(args.cache))
    console.print(f"MovieLens-100K: {len(loo.users)} users, {loo.n_items} items, "
                  f"{sum(len(s) for s in loo.sequences):,} interactions; leave-one-out, full ranking")
    rows: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}

    def simple(name: str, key: str, fit: Callable[[], Scorer]) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            t0 = time.perf_counter()
            return scored(fit(), loo, t0)
        return cells.get(key, compute)

    pop = simple("most-popular", "most-popular", lambda: fit_most_popular(loo))
    rows["most-popular"] = {**summarise([pop]), "config": "training counts"}
    details["most-popular"] = {"runs": [pop]}

    knn = [simple("item-knn", f"item-knn {asdict(c)}", lambda c=c: fit_item_knn(loo, c)) for c in KNN_GRID]
    best_knn = choose(knn)
    rows["item-knn"] = {**summarise([best_knn]), "config": best_knn["key"].removeprefix("item-knn ")}
    details["item-knn"] = {"grid": [{"key": c["key"], "valid": c["valid"]} for c in knn], "runs": [best_knn]}

    for name, grid in (("iALS (implicit)", ALS_GRID), ("BPR-MF (implicit)", BPR_GRID)):
        tried = [simple(name, f"{name} {asdict(c)}", lambda c=c: fit_mf(loo, c)) for c in grid]
        best_cfg = grid[tried.index(choose(tried))]
        runs = [simple(name, f"{name} {asdict(replace(best_cfg, seed=s))}",
                       lambda s=s, c=best_cfg: fit_mf(loo, replace(c, seed=s))) for s in args.seeds]
        rows[name] = {**summarise(runs), "config": {k: v for k, v in asdict(best_cfg).items() if k != "seed"}}
        details[name] = {"grid": [{"key": c["key"], "valid": c["valid"]} for c in tried], "runs": runs}
        console.log(f"{name}: chose {rows[name]['config']}; test HR@10 {rows[name]['test_hr']:.4f}")

    seed0 = args.seeds[0]
    tried = [cells.get(f"sasrec {hp} seed {seed0} patience {args.patience} max {args.max_epochs}",
                       lambda hp=hp: run_sasrec(loo, hp, seed0, args, console)) for hp in SASREC_GRID]
    best_hp = SASREC_GRID[tried.index(choose(tried))]
    runs = [cells.get(f"sasrec {best_hp} seed {s} patience {args.patience} max {args.max_epochs}",
                      lambda s=s: run_sasrec(loo, best_hp, s, args, console)) for s in args.seeds]
    sas = {**summarise(runs), "config": {**best_hp, "d": 64, "blocks": 2, "heads": 1, "loss": "full-softmax CE",
                                         "patience": args.patience}}
    sas["best_epochs"] = [r["best_epoch"] for r in runs]
    sas["sampled_test_hr"] = float(np.mean([r["sampled_test"]["hr"] for r in runs]))
    sas["sampled_test_ndcg"] = float(np.mean([r["sampled_test"]["ndcg"] for r in runs]))
    rows["SASRec (full CE)"] = sas
    details["SASRec (full CE)"] = {"grid": [{"key": c["key"], "valid": c["valid"], "best_epoch": c["best_epoch"]}
                                            for c in tried],
                                   "runs": [{k: v for k, v in r.items() if k != "test_ranks"} for r in runs]}

    sas_ranks = np.array(runs[0]["test_ranks"])
    mf_name = max(("iALS (implicit)", "BPR-MF (implicit)"), key=lambda n: rows[n]["test_hr"])
    mf_ranks = np.array(details[mf_name]["runs"][0]["test_ranks"])
    ci = paired_bootstrap(sas_ranks, mf_ranks)
    for d in details.values():
        for r in d["runs"]:
            r.pop("test_ranks", None)

    title = (f"MovieLens-100K, leave-one-out, full ranking over {loo.n_items} items ({len(loo.users)} users), "
             f"mean ± std over seeds {args.seeds}")
    report = {"meta": {"users": len(loo.users), "items": loo.n_items, "seeds": args.seeds,
                       "patience": args.patience, "max_epochs": args.max_epochs, "filter_seen": True,
                       "wall_s": time.perf_counter() - start,
                       "sasrec_minus_best_mf_hr10_ci95_seed0": ci, "best_mf": mf_name},
              "summary": rows, "details": details}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rec_standard.json").write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title=title, header_style="bold")
    for col in ("model", *[label for _, label in COLUMNS], "× pop HR@10"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, row in rows.items():
        ratio = row["test_hr"] / rows["most-popular"]["test_hr"]
        table.add_row(name, *[_fmt(row, k) for k, _ in COLUMNS], f"{ratio:.2f}")
    console.print(table)
    extra = (f"\nSASRec under the sampled protocol of the SASRec paper (target vs 100 random unseen items): "
             f"HR@10 {sas['sampled_test_hr']:.4f}, NDCG@10 {sas['sampled_test_ndcg']:.4f} (full ranking: "
             f"{sas['test_hr']:.4f} / {sas['test_ndcg']:.4f}). SASRec − {mf_name} test HR@10, seed {seed0}, paired "
             f"bootstrap over users, 95 %: [{ci[0]:+.4f}, {ci[1]:+.4f}]. Best epochs: {sas['best_epochs']}.\n")
    md = out / "rec_standard.md"
    notes = md.read_text().partition(NOTES_MARKER)[2] if md.is_file() else ""
    md.write_text(markdown(rows, title) + extra + f"\n{NOTES_MARKER}" + (notes or "\n"))
    plot({s: r["history"]["val_ndcg"] for s, r in zip(args.seeds, details["SASRec (full CE)"]["runs"], strict=True)},
         {n: rows[n]["valid_ndcg"] for n in ("most-popular", "item-knn", mf_name)}, out / "rec_standard.png")
    console.print(f"wrote {out}/rec_standard.{{md,json,png}} in {time.perf_counter() - start:.0f}s")
    return report


if __name__ == "__main__":
    main()
