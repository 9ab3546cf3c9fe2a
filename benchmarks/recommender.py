"""Federated continual recommendation on MovieLens-100K: FCUCR vs baselines in one table.

    python benchmarks/recommender.py [--data-dir DIR] [--seeds 0] [--users N] [--out docs/results]

Pretrains SASRec centrally on period 0 (cached under --cache), exports the encoder to ONNX (parity
checked), simulates one device per user through the continual periods for every method, prints a
rich table and writes recommender.{md,json,png}. The default quick config (all 943 users, 4
continual periods, 1 seed) takes a few minutes on 2 CPU cores; more seeds average the device-side
randomness (adapter init, sampled distillation negatives) over one pretrained encoder.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # many small BLAS calls: threads only contend (10x slower on 2 cores)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from coordinator.models.recommender import RecTrainSettings, SASRecConfig, pretrained_sasrec  # noqa: E402
from coordinator.recsys.data import continual_split, load_ml100k, median_session_gap_days  # noqa: E402
from coordinator.recsys.simulation import BASELINES, METHODS, RecSimConfig, run_all  # noqa: E402
from edge_client.recsys import RecAdapterConfig, load_bundle  # noqa: E402
from export.recommender_export import export_recommender  # noqa: E402

COLUMNS = [("next_hr", "next HR@10"), ("next_ndcg", "next NDCG@10"), ("final_hr", "final avg HR@10"),
           ("final_ndcg", "final avg NDCG@10"), ("forget_ndcg", "forgetting NDCG@10"),
           ("bytes_up_per_device", "up B/dev/period")]
NOTES = {
    "most-popular": "item counts, not personal",
    "central-sasrec": "pretrained on period 0, frozen",
    "central-finetune": "whole model fine-tuned on pooled raw data (not private)",
    "local-only": "personal adapter, no federation",
    "fedavg": "FedAvg of the whole adapter",
    "fcucr": "FedAvg(U,V) + personal u, gate + distill + prototypes",
    "fcucr-no-distill": "FCUCR without self-distillation",
    "fcucr-no-proto": "FCUCR without prototype transfer",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--users", type=int, default=None, help="random subset of users (default: all 943)")
    ap.add_argument("--periods", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--steps", type=int, default=RecAdapterConfig.steps)
    ap.add_argument("--lr", type=float, default=RecAdapterConfig.lr)
    ap.add_argument("--methods", nargs="+", default=[*BASELINES, *METHODS])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--cache", default=".fedge/recommender-cache")  # git-ignored
    return ap.parse_args(argv)


def mean_summaries(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {m: {k: float(np.mean([r[m][k] for r in runs])) for k in runs[0][m]} for m in runs[0]}


def table(summary: dict[str, dict[str, float]], title: str) -> Table:
    t = Table(title=title, header_style="bold")
    t.add_column("method")
    for _, label in COLUMNS:
        t.add_column(label, justify="right")
    t.add_column("what")
    for name, row in summary.items():
        t.add_row(name, *[f"{row[k]:.0f}" if k.startswith("bytes") else f"{row[k]:.4f}" for k, _ in COLUMNS],
                  NOTES.get(name, ""))
    return t


def markdown(summary: dict[str, dict[str, float]], meta: dict) -> str:
    head = "| method | " + " | ".join(label for _, label in COLUMNS) + " | what |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, row in summary.items():
        cells = [f"{row[k]:.0f}" if k.startswith("bytes") else f"{row[k]:.4f}" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {NOTES.get(name, '')} |")
    return "\n".join(lines) + "\n"


def plot(per_stage: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in per_stage.items():
        ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xlabel("after training on period t")
    ax.set_ylabel("NDCG@10 on period t+1 (next)")
    ax.set_title("MovieLens-100K, federated continual recommendation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    console = Console()
    start = time.perf_counter()
    data = load_ml100k(args.data_dir)
    split = continual_split(data, n_periods=args.periods, pretrain_frac=0.5, users=args.users, seed=0)
    mcfg = SASRecConfig(n_items=split.n_items)
    model, pmeta = pretrained_sasrec(split, mcfg, RecTrainSettings(epochs=args.pretrain_epochs, seed=0),
                                     cache_dir=args.cache, progress=True)
    exported = export_recommender(model, Path(args.cache) / f"export-{pmeta['key']}")
    console.print(f"SASRec {model.n_params():,} params, pretrain CE {pmeta['losses'][-1]:.3f}; ONNX "
                  f"({exported.spec['exporter']}) parity max |Δh| {exported.parity.max_abs_err:.1e}")
    encoder, items = load_bundle(exported.out_dir)
    tau = median_session_gap_days(split)
    runs, per_seed_stages = [], []
    for seed in args.seeds:
        cfg = RecSimConfig(adapter=RecAdapterConfig(tau_days=tau, steps=args.steps, lr=args.lr), seed=seed)

        def progress(name: str, stage, seed=seed) -> None:
            hr, ndcg = stage.scores.get(stage.period + 1, (float("nan"), float("nan")))
            console.log(f"seed {seed} {name:17s} period {stage.period}: trained {stage.trained_users:3d} users, "
                        f"next HR@10 {hr:.3f} NDCG@10 {ndcg:.3f} ({stage.wall_s:.1f}s)")

        results = run_all(split, model, encoder, items, cfg, tuple(args.methods), progress)
        runs.append({m: r.summary() for m, r in results.items()})
        per_seed_stages.append({m: [{"period": st.period, **{f"A[{st.period}][{s}]": list(v)
                                                              for s, v in st.scores.items()},
                                     "trained_users": st.trained_users, "skipped_users": st.skipped_users,
                                     "bytes_up": st.bytes_up, "bytes_down": st.bytes_down,
                                     "mean_distill_weight": st.mean_distill_weight}
                                    for st in r.stages] for m, r in results.items()})
    summary = mean_summaries(runs)
    title = (f"MovieLens-100K, {len(split.logs)} users (1 device each), {args.periods} continual periods, "
             f"mean over seeds {args.seeds}")
    console.print(table(summary, title))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"users": len(split.logs), "periods": args.periods, "seeds": args.seeds, "tau_days": tau,
            "pretrain": {k: v for k, v in pmeta.items() if k != "losses"}, "model": mcfg.to_dict(),
            "adapter": asdict(RecAdapterConfig(tau_days=tau, steps=args.steps, lr=args.lr)),
            "boundaries": split.boundaries.tolist(), "skipped": split.skipped,
            "parity": asdict(exported.parity), "wall_s": time.perf_counter() - start}
    report = {"meta": meta, "summary": summary, "per_seed": runs, "stages": per_seed_stages}
    (out / "recommender.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "recommender.md").write_text(f"# {title}\n\n" + markdown(summary, meta))
    first = per_seed_stages[0]
    plot({m: [(st["period"], st[f"A[{st['period']}][{st['period'] + 1}]"][1]) for st in stages
              if f"A[{st['period']}][{st['period'] + 1}]" in st] for m, stages in first.items()},
         out / "recommender.png")
    console.print(f"wrote {out}/recommender.{{md,json,png}} in {meta['wall_s']:.0f}s")
    return report


if __name__ == "__main__":
    main()
