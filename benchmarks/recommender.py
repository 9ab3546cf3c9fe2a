"""Federated continual recommendation on MovieLens-100K: FCUCR vs baselines in one table.

    python benchmarks/recommender.py [--data-dir DIR] [--seeds 0 1 2] [--users N] [--out docs/results]

For every seed: pretrains SASRec centrally on period 0 with that seed (cached under --cache), exports
the encoder to ONNX (parity checked), simulates one device per user through the continual periods for
every method (device seeds: adapter init, sampled distillation negatives), and then reports mean ± std
over the seeds in a rich table and in recommender.{md,json,png}. A seed therefore covers the whole
pipeline, not only the device side: the spread of the central pretraining is part of what the
on-device methods are compared against. ``--shared-encoder`` pretrains once (seed 0) and varies only the
devices. The JSON is rewritten after every seed, so an interrupted run keeps the seeds it finished.
All 943 users, 4 periods, 3 seeds: 24 min on 2 CPU cores shared with other jobs (pretraining 1–5 min a seed).
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

from coordinator.models.recommender import SASRecConfig  # noqa: E402
from coordinator.recsys.data import continual_split, load_ml100k, median_session_gap_days  # noqa: E402
from coordinator.recsys.simulation import BASELINES, METHODS, RecSimConfig, run_all  # noqa: E402
from coordinator.recsys.training import RecTrainSettings, pretrained_sasrec  # noqa: E402
from edge_client.recsys.adapter import RecAdapterConfig  # noqa: E402
from edge_client.recsys.encoder import load_encoder  # noqa: E402
from export.recommender_export import export_recommender  # noqa: E402

NOTES_MARKER = "<!-- hand-written notes below: kept when the benchmark rewrites the table above -->"
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
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shared-encoder", action="store_true", help="pretrain once (seed 0) for every seed")
    ap.add_argument("--users", type=int, default=None, help="random subset of users (default: all 943)")
    ap.add_argument("--periods", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--steps", type=int, default=RecAdapterConfig.steps)
    ap.add_argument("--lr", type=float, default=RecAdapterConfig.lr)
    ap.add_argument("--methods", nargs="+", default=[*BASELINES, *METHODS])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--cache", default=".fedge/recommender-cache")  # git-ignored
    return ap.parse_args(argv)


def aggregate_summaries(runs: list[dict[str, dict[str, float]]], how=np.mean) -> dict[str, dict[str, float]]:
    """Per method and metric, `how` (mean or sample std) over the seeds' summaries."""
    if how is np.std:
        return {m: {k: float(np.std([r[m][k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in runs[0][m]}
                for m in runs[0]}
    return {m: {k: float(how([r[m][k] for r in runs])) for k in runs[0][m]} for m in runs[0]}


def _cell(key: str, mean: float, std: float | None) -> str:
    if key.startswith("bytes"):
        return f"{mean:.0f}"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def table(summary: dict[str, dict[str, float]], std: dict[str, dict[str, float]] | None, title: str) -> Table:
    t = Table(title=title, header_style="bold")
    t.add_column("method")
    for _, label in COLUMNS:
        t.add_column(label, justify="right")
    t.add_column("what")
    for name, row in summary.items():
        t.add_row(name, *[_cell(k, row[k], std[name][k] if std else None) for k, _ in COLUMNS], NOTES.get(name, ""))
    return t


def markdown(summary: dict[str, dict[str, float]], std: dict[str, dict[str, float]] | None) -> str:
    head = "| method | " + " | ".join(label for _, label in COLUMNS) + " | what |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, row in summary.items():
        cells = [_cell(k, row[k], std[name][k] if std else None) for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {NOTES.get(name, '')} |")
    return "\n".join(lines) + "\n"


def next_ndcg_curves(stages: list[dict[str, list[dict]]]) -> dict[str, tuple[list[int], np.ndarray]]:
    """Per method: periods t and an array (seeds, t) of NDCG@10 on period t+1 after training on t."""
    out = {}
    for name in stages[0]:
        periods = [st["period"] for st in stages[0][name] if f"A[{st['period']}][{st['period'] + 1}]" in st]
        vals = np.array([[st[f"A[{st['period']}][{st['period'] + 1}]"][1] for st in seed[name]
                          if st["period"] in periods] for seed in stages])
        out[name] = (periods, vals)
    return out


def plot(curves: dict[str, tuple[list[int], np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, (periods, vals)) in enumerate(curves.items()):
        x = np.array(periods) + (i - len(curves) / 2) * 0.03  # small offsets so error bars do not overlap
        err = vals.std(axis=0, ddof=1) if len(vals) > 1 else None
        ax.errorbar(x, vals.mean(axis=0), yerr=err, marker="o", capsize=2, label=name)
    ax.set_xticks(sorted({p for periods, _ in curves.values() for p in periods}))
    ax.set_xlabel("after training on period t")
    ax.set_ylabel("NDCG@10 on period t+1 (mean ± std)")
    ax.set_title("MovieLens-100K, federated continual recommendation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pretrained_bundle(split, args: argparse.Namespace, seed: int, console: Console):
    """SASRec pretrained on period 0 with `seed` (cached), its ONNX export, and the device-side bundle."""
    mcfg = SASRecConfig(n_items=split.n_items)
    model, pmeta = pretrained_sasrec(split, mcfg, RecTrainSettings(epochs=args.pretrain_epochs, seed=seed),
                                     cache_dir=args.cache, progress=True)
    exported = export_recommender(model, Path(args.cache) / f"export-{pmeta['key']}")
    console.print(f"seed {seed}: SASRec {model.n_params():,} params, pretrain CE {pmeta['losses'][-1]:.3f}; ONNX "
                  f"({exported.spec['exporter']}) parity max |Δh| {exported.parity.max_abs_err:.1e}")
    encoder, items = load_encoder(exported.out_dir)
    return model, pmeta, exported, encoder, items


def stage_rows(results: dict) -> dict[str, list[dict]]:
    return {m: [{"period": st.period, **{f"A[{st.period}][{s}]": list(v) for s, v in st.scores.items()},
                 "trained_users": st.trained_users, "skipped_users": st.skipped_users, "bytes_up": st.bytes_up,
                 "bytes_down": st.bytes_down, "mean_distill_weight": st.mean_distill_weight}
                for st in r.stages] for m, r in results.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    console = Console()
    start = time.perf_counter()
    data = load_ml100k(args.data_dir)
    split = continual_split(data, n_periods=args.periods, pretrain_frac=0.5, users=args.users, seed=0)
    tau = median_session_gap_days(split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, per_seed_stages, pretrain_meta, parity = [], [], [], []
    title = ""
    for seed in args.seeds:
        model, pmeta, exported, encoder, items = pretrained_bundle(split, args, 0 if args.shared_encoder else seed,
                                                                   console)
        pretrain_meta.append({"seed": 0 if args.shared_encoder else seed,
                              **{k: v for k, v in pmeta.items() if k != "losses"}, "final_ce": pmeta["losses"][-1]})
        parity.append(asdict(exported.parity))
        cfg = RecSimConfig(adapter=RecAdapterConfig(tau_days=tau, steps=args.steps, lr=args.lr), seed=seed)

        def progress(name: str, stage, seed=seed) -> None:
            hr, ndcg = stage.scores.get(stage.period + 1, (float("nan"), float("nan")))
            console.log(f"seed {seed} {name:17s} period {stage.period}: trained {stage.trained_users:3d} users, "
                        f"next HR@10 {hr:.3f} NDCG@10 {ndcg:.3f} ({stage.wall_s:.1f}s)")

        results = run_all(split, model, encoder, items, cfg, tuple(args.methods), progress)
        runs.append({m: r.summary() for m, r in results.items()})
        per_seed_stages.append(stage_rows(results))
        done = args.seeds[: len(runs)]
        summary, std = aggregate_summaries(runs), aggregate_summaries(runs, np.std)
        title = (f"MovieLens-100K, {len(split.logs)} users (1 device each), {args.periods} continual periods, "
                 f"mean ± std over seeds {done}")
        meta = {"users": len(split.logs), "periods": args.periods, "seeds": done,
                "shared_encoder": args.shared_encoder, "tau_days": tau, "pretrain": pretrain_meta,
                "model": SASRecConfig(n_items=split.n_items).to_dict(),
                "adapter": asdict(RecAdapterConfig(tau_days=tau, steps=args.steps, lr=args.lr)),
                "boundaries": split.boundaries.tolist(), "skipped": split.skipped, "parity": parity,
                "wall_s": time.perf_counter() - start}
        report = {"meta": meta, "summary": summary, "summary_std": std, "per_seed": runs, "stages": per_seed_stages}
        (out / "recommender.json").write_text(json.dumps(report, indent=2) + "\n")  # after every seed
    console.print(table(summary, std, title))
    md = out / "recommender.md"
    notes = md.read_text().partition(NOTES_MARKER)[2] if md.is_file() else ""
    md.write_text(f"# {title}\n\n" + markdown(summary, std) + f"\n{NOTES_MARKER}" + (notes or "\n"))
    plot(next_ndcg_curves(per_seed_stages), out / "recommender.png")
    console.print(f"wrote {out}/recommender.{{md,json,png}} in {meta['wall_s']:.0f}s")
    return report


if __name__ == "__main__":
    main()
