"""Federated TSFM pretraining benchmark (issue 3): which pretraining strategy gives the best
backbone when every domain is a separate data silo?

    python benchmarks/pretrain.py [--config small|large] [--seeds 0 1 2] [--out docs/results]

Silos: energy (ETTh1 + electricity), finance (exchange rates), air_quality (Beijing PM2.5),
traffic (I-94), nature (sunspots) are clients; weather (daily temperatures) is held out of
pretraining for zero-shot and few-shot (head-only, 10 % of its training windows) evaluation.
Every method runs through the same round loop with the same number of gradient steps
(centralized: one client with mixed batches and K x the local steps). Test windows: at most
`test_windows` evenly spaced per dataset (all channels), identical for every method including the
seasonal-naive and AutoETS baselines. Metrics on scaled values; H96 = first 96 of the 192 steps.

small config: context 512, horizon 192, d_model 32, 2 layers (~0.1 M parameters), 10 rounds x
10 local steps x batch 64, 3 seeds for the six strategies; ablations with one seed. ~15 min on 2
shared CPU cores. large config (GPU): the tiny TSFM (d_model 64, 3 layers), 50 rounds x 50 steps.
Writes docs/results/pretrain.{md,json,png} and runs/pretrain/best.pt (the best exportable backbone).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.models.checkpoints import save_checkpoint
from coordinator.models.tsfm import TSFMConfig
from coordinator.pretrain.evaluate import (
    EvalSettings,
    autoets_model,
    baseline_scores,
    baseline_season,
    evaluate_model,
    scores_table,
    summarise,
)
from coordinator.pretrain.federated import FederatedSettings, run_federated, training_domains, validation_sets
from coordinator.pretrain.silos import DEFAULT_HOLDOUT, DOMAIN_SILOS, build_silos
from coordinator.pretrain.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "bilevel −GRL (λ=0)": ("bilevel", {"lam": 0.0}),
    "bilevel −proto (α=0)": ("bilevel", {"alpha": 0.0}),
    "bilevel −domain weights": ("bilevel", {"uniform": True}),
    "fedal −GBE": ("fedal", {"gbe": False}),
    "fedal −DBE (MR only)": ("fedal", {"dbe": False}),
    "fedpm −personal slots": ("fedpm", {"personal_slots": 0}),
}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    model: dict[str, Any]
    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    seeds: tuple[int, ...]
    ablation_seeds: tuple[int, ...]
    test_windows: int
    threads: int | None


SMALL = BenchConfig("small", dict(context=512, horizon=192, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                                  feature_dim=32), rounds=10, local_steps=10, batch_size=64, lr=2e-3,
                    seeds=(0, 1, 2), ablation_seeds=(0,), test_windows=128, threads=2)
LARGE = BenchConfig("large", dict(context=512, horizon=192), rounds=50, local_steps=50, batch_size=128, lr=1e-3,
                    seeds=(0, 1, 2), ablation_seeds=(0, 1, 2), test_windows=512, threads=None)


def run_method(label: str, strategy: str, hparams: dict[str, Any], seed: int, cfg: BenchConfig, mcfg: TSFMConfig,
               silos: list, val_sets: list, ev: EvalSettings, ckpt_dir: Path) -> dict[str, Any]:
    settings = FederatedSettings(strategy=strategy, rounds=cfg.rounds, local_steps=cfg.local_steps,
                                 batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                                 hparams=tuple(sorted(hparams.items())))
    result = run_federated(mcfg, settings, silos=silos, val_sets=val_sets, threads=cfg.threads)
    t_eval = time.perf_counter()
    scores = evaluate_model(result.eval_model, result.domains, DEFAULT_HOLDOUT, ev, seed=seed, threads=cfg.threads)
    path = save_checkpoint(result.model, ckpt_dir / f"{label.replace(' ', '_')}-seed{seed}.pt",
                           meta={"strategy": strategy, "hparams": hparams, "seed": seed, "val_mse": result.val_mse})
    return {"label": label, "strategy": strategy, "hparams": hparams, "seed": seed, "scores": scores,
            "val_mse": result.val_mse, "best_round": result.best_round, "train_s": result.wall_s,
            "eval_s": time.perf_counter() - t_eval, "history": result.history, "checkpoint": str(path),
            "exportable": result.strategy.exportable(),
            "server_weights": result.server["weights"].tolist() if "weights" in result.server else None}


def aggregate_runs(runs: list[dict[str, Any]], horizons: tuple[int, ...]) -> dict[str, dict[str, list[float]]]:
    """label -> flat metric -> [value per seed] (plus ETTh1 and train time)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        flat = summarise(r["scores"], horizons)
        etth1 = r["scores"]["in_domain"].get("etth1", {})
        for h in horizons:
            if f"H{h}" in etth1:
                flat[f"etth1/H{h}/mse"] = etth1[f"H{h}"]["mse"]
                flat[f"etth1/H{h}/mae"] = etth1[f"H{h}"]["mae"]
        flat["train_s"] = r["train_s"]
        for k, v in flat.items():
            out.setdefault(r["label"], {}).setdefault(k, []).append(v)
    return out


def baseline_flat(base: dict[str, Any], seen: list[str], unseen: list[str], horizons: tuple[int, ...]) -> dict:
    """Baselines do not train: their zero-shot and few-shot scores are the same numbers."""
    out = {}
    for method, scores in base.items():
        res = {"in_domain": {n: scores[n] for n in seen}, "zero_shot": {n: scores[n] for n in unseen},
               "few_shot": {n: scores[n] for n in unseen}}
        flat = summarise(res, horizons)
        for h in horizons:
            flat[f"etth1/H{h}/mse"] = scores["etth1"][f"H{h}"]["mse"]
            flat[f"etth1/H{h}/mae"] = scores["etth1"][f"H{h}"]["mae"]
        out[method] = {k: [v] for k, v in flat.items()}
    return out


def fmt(values: list[float]) -> str:
    if not values or any(math.isnan(v) for v in values):
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


COLUMNS = [("in-domain MSE H96", "in_domain/H96/mse"), ("in-domain MSE H192", "in_domain/H192/mse"),
           ("in-domain MAE H96", "in_domain/H96/mae"), ("in-domain CRPS H96", "in_domain/H96/crps"),
           ("ETTh1 MSE H96", "etth1/H96/mse"), ("ETTh1 MSE H192", "etth1/H192/mse"),
           ("zero-shot MSE H96", "zero_shot/H96/mse"), ("zero-shot MSE H192", "zero_shot/H192/mse"),
           ("zero-shot CRPS H96", "zero_shot/H96/crps"), ("few-shot MSE H96", "few_shot/H96/mse"),
           ("few-shot MSE H192", "few_shot/H192/mse"), ("train s", "train_s")]


def markdown_table(rows: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| method | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, flat in rows.items():
        lines.append(f"| {label} | " + " | ".join(fmt(flat.get(k, [])) for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def per_dataset_table(runs: list[dict[str, Any]], base: dict[str, Any], names: list[str], h: str) -> str:
    labels = list(dict.fromkeys(r["label"] for r in runs))
    lines = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for method, scores in base.items():
        lines.append(f"| {method} | " + " | ".join(f"{scores[n][h]['mse']:.3f}" for n in names) + " |")
    for label in labels:
        cells = []
        for n in names:
            seen = any(n in r["scores"]["in_domain"] for r in runs if r["label"] == label)
            part = "in_domain" if seen else "zero_shot"
            cells.append(fmt([r["scores"][part][n][h]["mse"] for r in runs if r["label"] == label]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("in-domain MSE H96", "in_domain/H96/mse"), ("zero-shot MSE H96 (weather)", "zero_shot/H96/mse"),
            ("few-shot MSE H96 (weather)", "few_shot/H96/mse"), ("in-domain CRPS H96", "in_domain/H96/crps")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 5))
    labels = list(rows)
    for ax, (title, key) in zip(axes, keys, strict=True):
        means = [np.mean(rows[m].get(key, [np.nan])) for m in labels]
        stds = [np.std(rows[m][key], ddof=1) if len(rows[m].get(key, [])) > 1 else 0 for m in labels]
        ax.barh(labels, means, xerr=stds, color=["#999" if m in ("seasonal_naive", "autoets") else "#4a7"
                                                  for m in labels])
        ax.set_title(title)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_exportable(rows: dict[str, dict[str, list[float]]], runs: list[dict[str, Any]]) -> str:
    """Lowest mean of in-domain and zero-shot H96 MSE among the six strategies whose global model is
    a plain TSFM (FeDPM's quantised model is not what the ONNX backbone computes)."""
    ok = [r["label"] for r in runs if r["exportable"] and r["label"] in STRATEGIES]
    return min(dict.fromkeys(ok), key=lambda m: np.mean(rows[m]["in_domain/H96/mse"]) + np.mean(
        rows[m]["zero_shot/H96/mse"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("small", "large"), default="small")
    ap.add_argument("--seeds", type=int, nargs="*")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "pretrain")
    ap.add_argument("--baselines-only", action="store_true",
                    help="recompute only the seasonal-naive and AutoETS rows of --out/pretrain.json on the same "
                         "test windows and rewrite its tables, keeping the strategies' runs and the Findings")
    args = ap.parse_args()
    if args.baselines_only:
        rewrite_baselines(args)
        return
    cfg = SMALL if args.config == "small" else LARGE
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    if args.rounds:
        cfg = replace(cfg, rounds=args.rounds)
    if args.local_steps:
        cfg = replace(cfg, local_steps=args.local_steps)
    from rich.console import Console

    console = Console(width=240)
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    mcfg = TSFMConfig(**cfg.model)
    ev = EvalSettings(test_windows=cfg.test_windows)
    probe = FederatedSettings(seed=0)
    domains = training_domains(probe, None)
    silos = build_silos(domains, mcfg.context + mcfg.horizon)
    val_sets = validation_sets(mcfg, domains, probe, None)
    seen = [n for d in domains for n in DOMAIN_SILOS[d]]
    unseen = [n for d in DEFAULT_HOLDOUT for n in DOMAIN_SILOS[d]]
    console.print(f"silos: {[(s.domain, s.n_samples, s.n_sub) for s in silos]}; held out: {DEFAULT_HOLDOUT}")
    tb = time.perf_counter()
    base = baseline_scores(seen + unseen, mcfg.context, ev)
    console.print(f"baselines in {time.perf_counter() - tb:.0f} s")
    jobs = [(s, s, {}, seed) for seed in cfg.seeds for s in STRATEGIES]
    if not args.no_ablations:
        jobs += [(label, s, hp, seed) for seed in cfg.ablation_seeds for label, (s, hp) in ABLATIONS.items()]
    runs: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (label, strategy, hp, seed) in enumerate(jobs, 1):
        run = run_method(label, strategy, hp, seed, cfg, mcfg, silos, val_sets, ev, args.runs / "bench")
        runs.append(run)
        flat = summarise(run["scores"], ev.horizons)
        console.print(f"[{i}/{len(jobs)}] {label} seed {seed}: in-domain H96 {flat['in_domain/H96/mse']:.4f}, "
                      f"zero-shot H96 {flat['zero_shot/H96/mse']:.4f}, few-shot H96 {flat['few_shot/H96/mse']:.4f}"
                      f" ({run['train_s']:.0f}+{run['eval_s']:.0f} s; total {time.perf_counter() - t0:.0f} s)")
        write(args, cfg, mcfg, ev, base, runs, seen, unseen, t0, console, final=i == len(jobs))


def rewrite_baselines(args: argparse.Namespace) -> None:
    """Baseline rows only: the learned models' scores are read back from the JSON (no retraining), the
    baselines are recomputed on the same test windows (same model config and EvalSettings), and
    everything from "## Findings" on in the Markdown (hand-written) is kept."""
    from rich.console import Console

    t0 = time.perf_counter()
    old = json.loads((args.out / "pretrain.json").read_text())
    meta = old["meta"]
    tup = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    cfg = BenchConfig(**tup)
    mcfg = TSFMConfig.from_dict(meta["model"])
    ev = EvalSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["eval"].items()})
    seen, unseen = meta["in_domain_datasets"], meta["zero_shot_datasets"]
    base = baseline_scores(seen + unseen, mcfg.context, ev)
    md_path = args.out / "pretrain.md"
    text = md_path.read_text() if md_path.is_file() else ""
    findings = text[text.index("## Findings"):] if "## Findings" in text else ""
    extra = {"wall_s": meta["wall_s"], "machine": meta["machine"], "torch": meta["torch"],
             "baselines_recomputed_s": time.perf_counter() - t0}
    write(args, cfg, mcfg, ev, base, old["runs"], seen, unseen, t0, Console(width=240), final=meta["complete"],
          meta_extra=extra, save_best=False)
    if findings:
        md_path.write_text(md_path.read_text() + findings)


def write(args: argparse.Namespace, cfg: BenchConfig, mcfg: TSFMConfig, ev: EvalSettings, base: dict, runs: list,
          seen: list[str], unseen: list[str], t0: float, console: Any, final: bool,
          meta_extra: dict[str, Any] | None = None, save_best: bool = True) -> None:
    """Rewritten after every run, so an interrupted benchmark still leaves real partial numbers."""
    rows = {**baseline_flat(base, seen, unseen, ev.horizons), **aggregate_runs(runs, ev.horizons)}
    best = best_exportable(rows, runs) if any(r["label"] in STRATEGIES for r in runs) else None
    meta = {"config": asdict(cfg), "model": mcfg.to_dict(), "eval": asdict(ev), "held_out": list(DEFAULT_HOLDOUT),
            "in_domain_datasets": seen, "zero_shot_datasets": unseen, "wall_s": time.perf_counter() - t0,
            "complete": final, "machine": f"{platform.machine()} {platform.processor()}", "torch": torch.__version__,
            "best_exportable": best,
            "autoets_model": {n: autoets_model(baseline_season(n, 24, None)) for n in seen + unseen},
            **(meta_extra or {})}
    (args.out / "pretrain.json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "baselines": base,
         "runs": [{k: v for k, v in r.items()} for r in runs]}, indent=1, default=float))
    md = [f"# Federated TSFM pretraining ({cfg.name} config{'' if final else ', PARTIAL'})", "",
          f"Model: {mcfg.to_dict()} ; {cfg.rounds} rounds x {cfg.local_steps} local steps x batch {cfg.batch_size}, "
          f"lr {cfg.lr}; seeds {list(cfg.seeds)} (ablations: {list(cfg.ablation_seeds)}). "
          f"Held-out domain: {list(DEFAULT_HOLDOUT)} ({', '.join(unseen)}). Test windows: ≤{ev.test_windows} evenly "
          f"spaced per dataset, the same for every method. Values: mean ± std over seeds (scaled units). "
          f"Wall time {meta['wall_s']:.0f} s. AutoETS (statsforecast) model per dataset: "
          + ", ".join(f"{n} {m}" for n, m in meta["autoets_model"].items()) + ".", "", markdown_table(rows), "",
          "## Per dataset, MSE H96", "", per_dataset_table(runs, base, seen + unseen, "H96"), ""]
    if best:
        md += [f"Best exportable strategy (mean of in-domain and zero-shot H96 MSE): **{best}**", ""]
    (args.out / "pretrain.md").write_text("\n".join(md))
    plot(rows, args.out / "pretrain.png")
    if final and best and save_best:
        src = next(r for r in runs if r["label"] == best and r["seed"] == cfg.seeds[0])
        from coordinator.models.checkpoints import load_checkpoint

        save_checkpoint(load_checkpoint(src["checkpoint"]), args.runs / "best.pt",
                        meta={"strategy": best, "seed": src["seed"], "from": src["checkpoint"]})
        console.print(scores_table({r["label"]: r["scores"] for r in runs if r["seed"] == cfg.seeds[0]},
                                   ev.horizons, title=f"pretraining ({cfg.name}), seed {cfg.seeds[0]}"))
        console.print(f"best exportable: {best} -> {args.runs / 'best.pt'}")


if __name__ == "__main__":
    main()
