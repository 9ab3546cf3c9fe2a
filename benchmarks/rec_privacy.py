"""What the recommender's prototypes reveal (issue 15): can the coordinator guess a user's top genres from the
one 64-float prototype an FCUCR device uploads per period? And what Gaussian noise on the prototype (issue 14:
edge_client.learning.dp.privatize_prototype) buys against that guess and costs in NDCG.

    nice -n 10 python benchmarks/rec_privacy.py [--data-dir DIR] [--seeds 0 1 2] [--epsilons 32 8 3 1]

Uses the converged period-0 SASRec of benchmarks/recommender.py (seed 0, the same cache). Attacks and scores:
coordinator/recsys/leakage.py. Noise cells (cell x seed, checkpointed in rec_privacy.json, skipped on rerun): every
prototype a device uploads is clipped to C (the median norm of the coordinator's own period-0 prototypes: public
calibration, no user data) and noised with std σ·C, σ calibrated so that a user's 4 releases (one per period) spend
ε at δ = 1/users (coordinator.fleet.privacy.prototype_epsilon, RDP accountant); the attacks read the noised uploads
(the probe trained on the coordinator's own prototypes through the same mechanism), and FCUCR runs its 4 periods
with noised prototypes in the prototype server (coordinator.recsys.simulation, the devices' code). Reference rows:
exact prototypes, clipping alone, and FCUCR without prototypes (fcucr-no-proto: nothing of the kind leaves).
Writes rec_privacy.{md,json}; hand-written notes below the marker line of rec_privacy.md are kept.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from coordinator.fleet.privacy import calibrate_prototype_noise, prototype_epsilon  # noqa: E402
from coordinator.models.recommender import SASRecConfig  # noqa: E402
from coordinator.recsys.data import continual_split, load_ml100k  # noqa: E402
from coordinator.recsys.demo import BENCHMARK_RESULTS  # noqa: E402
from coordinator.recsys.leakage import (  # noqa: E402
    attack,
    coordinator_training_set,
    load_genres,
    noised,
    uploaded_prototypes,
)
from coordinator.recsys.simulation import RecSimConfig, build_test_sets, run_federated_rec  # noqa: E402
from coordinator.recsys.training import RecTrainSettings, pretrained_sasrec  # noqa: E402
from edge_client.recsys.encoder import load_encoder  # noqa: E402
from export.recommender_export import export_recommender  # noqa: E402

COLUMNS = [("top1_accuracy", "top-1 genre right"), ("true_top1_in_guessed_top3", "true top-1 among 3 guessed"),
           ("top3_overlap", "top-3 overlap")]
NOTES_MARKER = "<!-- hand-written notes below: kept when the benchmark rewrites the table above -->"
PROBE = "probe (logistic regression on period-0 prototypes)"
DECODE = "decode (p·E, top-50 items)"
ALL, DISTINCT = "all", "top genre not the crowd's"


def cell_labels(epsilons: list[float]) -> list[str]:
    return ["exact", "clip", *[f"eps={e:g}" for e in epsilons], "no-proto"]


# cells whose devices clip prototypes are computed again when how they do it changes (2: p̃ bounded on arrival)
CELL_VERSION = 2


def fresh(cell: dict[str, Any]) -> bool:
    """A stored cell still describes what the code does (exact and no-prototype cells never changed)."""
    return cell["sigma"] is None or cell.get("version") == CELL_VERSION


def noise_of(label: str, delta: float, releases: int) -> float | None:
    """σ of a cell (None: exact prototypes)."""
    if label in ("exact", "no-proto"):
        return None
    return 0.0 if label == "clip" else calibrate_prototype_noise(float(label[4:]), delta, releases)


def run_cell(label: str, seed: int, world: dict[str, Any], clip: float) -> dict[str, Any]:
    split, n = world["split"], len(world["split"].logs)
    releases, delta = split.n_periods, 1.0 / n
    sigma = noise_of(label, delta, releases)
    out: dict[str, Any] = {"label": label, "seed": seed, "sigma": sigma, "clip": None if sigma is None else clip,
                           "version": CELL_VERSION,
                           "epsilon_release": math.inf if not sigma else prototype_epsilon(sigma, 1, delta),
                           "epsilon_total": math.inf if not sigma else prototype_epsilon(sigma, releases, delta)}
    if label == "no-proto":  # nothing released
        out.update(epsilon_release=0.0, epsilon_total=0.0)
    if label != "no-proto":  # no-proto: nothing uploaded, nothing to attack
        up, x0 = world["uploads"], world["x0"]
        if sigma is not None:
            up, x0 = noised(up, x0, clip, sigma, seed)
        res = attack(up, x0, world["y0"], world["items"], world["genres"])
        out["attack"] = {a: {g: res[a][g]["top1_accuracy"] for g in (ALL, DISTINCT)} for a in (PROBE, DECODE)}
    cfg = replace(world["config"], seed=seed)
    cfg = cfg if sigma is None else replace(cfg, proto_clip=clip, proto_noise=sigma)
    t0 = time.perf_counter()
    summary = run_federated_rec("fcucr-no-proto" if label == "no-proto" else "fcucr", split, world["encoder"],
                                world["items"], world["tests"], cfg).summary()
    out.update(next_ndcg=summary["next_ndcg"], final_ndcg=summary["final_ndcg"], wall_s=time.perf_counter() - t0)
    return out


def _ms(xs: list[float]) -> str:
    a = np.array(xs, dtype=np.float64)
    return f"{a.mean():.4f} ± {a.std():.4f}"


def markdown(result: dict[str, Any], cells: dict[str, Any], labels: list[str], notes: str) -> str:
    info = result["meta"]
    title = (f"What an FCUCR prototype reveals: guessing a user's top genres from {info['uploads']} uploaded "
             f"prototypes (MovieLens-100K, 18 genres)")
    lines = [f"# {title}", "", "| attack | users | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for name, by_group in result.items():
        if name == "meta":
            continue
        for group, s in by_group.items():
            lines.append("| " + " | ".join([name, f"{group} (n={s['n']})", *[f"{s[k]:.3f}" for k, _ in COLUMNS]])
                         + " |")
    lines += ["", f"Baseline = the population's three most frequent top genres ({', '.join(info['crowd_top3'])}) "
              f"for everyone. The probe is trained on {info['probe_training_prototypes']} prototypes the coordinator "
              "computes from its own period-0 data; truth = genre counts over the last "
              f"{info['window']} items a device holds when it uploads (prototype = mean encoder state of the last "
              f"{info['recent']} prefixes)."]
    if cells:
        seeds = sorted({c["seed"] for c in cells.values()})
        lines += ["", f"## Noised prototypes: what the Gaussian mechanism buys against the attacks and costs FCUCR "
                  f"({len(seeds)} seeds)", "",
                  f"Each uploaded prototype clipped to C = {info['clip']:.3g} (median norm of the coordinator's own "
                  "period-0 prototypes) plus N(0, (σC)²) per coordinate on the device; ε at δ = 1/users from the RDP "
                  f"accountant, replace-one adjacency (sensitivity 2C), per release and over a user's "
                  f"{info['releases']} releases. Attack columns: top-1 genre right (crowd guess: "
                  f"{info['crowd_all']:.3f} all, 0 for users whose top genre is not the crowd's); the probe is "
                  "trained on the coordinator's prototypes through the same mechanism. NDCG@10: FCUCR through the 4 "
                  "periods with these prototypes in the prototype server (*next* = next period's test items, "
                  "*final* = the last model on every period's). Mean ± std over seeds (noise draws, adapter "
                  "initialisation, local shuffles).", "",
                  "| prototypes | σ | ε per release | ε, all releases | probe top-1: all | probe: not the crowd's | "
                  "decode top-1: all | next NDCG@10 | final NDCG@10 | seeds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        names = {"exact": "exact (no clip, no noise)", "clip": "clipped, no noise",
                 "no-proto": "none sent (fcucr-no-proto)"}
        for label in labels:
            rows = [c for c in cells.values() if c["label"] == label]
            if not rows:
                continue
            c = rows[0]
            att = [r["attack"] for r in rows if "attack" in r]

            def col(a: str, g: str, att: list = att) -> str:
                return _ms([x[a][g] for x in att]) if att else "—"

            sigma = "—" if c["sigma"] is None else f"{c['sigma']:.3g}"
            lines.append(f"| {names.get(label, f'noised, target ε = {label[4:]}')} | {sigma} | "
                         f"{c['epsilon_release']:.3g} | {c['epsilon_total']:.3g} | {col(PROBE, ALL)} | "
                         f"{col(PROBE, DISTINCT)} | {col(DECODE, ALL)} | {_ms([r['next_ndcg'] for r in rows])} | "
                         f"{_ms([r['final_ndcg'] for r in rows])} | {len(rows)} |")
    return "\n".join(lines) + "\n\n" + NOTES_MARKER + "\n" + notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--periods", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=400)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="noise cells' seeds (none: skip them)")
    ap.add_argument("--epsilons", type=float, nargs="*", default=[32.0, 8.0, 3.0, 1.0])
    ap.add_argument("--cells", nargs="*", default=None, help="run only these cell labels (e.g. exact eps=3)")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--cache", default=".fedge/recommender-cache")
    args = ap.parse_args(argv)
    console = Console()
    split = continual_split(load_ml100k(args.data_dir), n_periods=args.periods, pretrain_frac=0.5)
    settings = RecTrainSettings(epochs=args.pretrain_epochs, patience=args.patience, seed=0, threads=1)
    model, meta = pretrained_sasrec(split, SASRecConfig(n_items=split.n_items), settings, cache_dir=args.cache,
                                    progress=True)
    encoder, items = load_encoder(export_recommender(model, Path(args.cache) / f"export-{meta['key']}").out_dir)
    genres = load_genres(args.data_dir)
    up = uploaded_prototypes(split, encoder, items, genres)
    x0, y0 = coordinator_training_set(split, encoder, items, genres, seed=0)
    result = attack(up, x0, y0, items, genres)
    clip = float(np.median(np.linalg.norm(x0, axis=1)))
    result["meta"].update(clip=clip, releases=split.n_periods,
                          crowd_all=result["baseline (population's top genres)"][ALL]["top1_accuracy"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, md = out / "rec_privacy.json", out / "rec_privacy.md"
    old = json.loads(path.read_text()) if path.is_file() else {}
    cells: dict[str, Any] = {k: c for k, c in old.get("noise", {}).items() if fresh(c)} \
        if old.get("meta", {}).get("clip") == clip else {}
    notes = md.read_text().split(NOTES_MARKER, 1)[1].lstrip("\n") if md.is_file() and NOTES_MARKER in \
        md.read_text() else ""
    labels = cell_labels(args.epsilons)
    world = {"split": split, "encoder": encoder, "items": items, "genres": genres, "uploads": up, "x0": x0, "y0": y0,
             "tests": build_test_sets(split, encoder),
             "config": replace(RecSimConfig.chosen(BENCHMARK_RESULTS, "fcucr"), seed=0)}

    def save() -> None:
        """Cells other workers (--cells) wrote meanwhile are kept: the file is merged under a lock, not replaced."""
        with open(Path(args.cache) / "rec_privacy.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            theirs = json.loads(path.read_text()) if path.is_file() else {}
            if theirs.get("meta", {}).get("clip") == clip:
                cells.update({k: v for k, v in theirs.get("noise", {}).items() if k not in cells and fresh(v)})
            path.write_text(json.dumps({**result, "noise": cells}, indent=2) + "\n")
            md.write_text(markdown(result, cells, labels, notes))

    save()
    for seed in args.seeds:
        for label in labels:
            key = f"{label}|{seed}"
            if key in cells or (args.cells and label not in args.cells):
                continue
            save()  # picks up what other workers finished
            if key in cells:
                continue
            cells[key] = run_cell(label, seed, world, clip)
            c = cells[key]
            console.print(f"{key}: σ {c['sigma']}, ε {c['epsilon_total']:.3g}, next {c['next_ndcg']:.4f}, final "
                          f"{c['final_ndcg']:.4f}, probe {c.get('attack', {}).get(PROBE, {}).get(ALL, '—')} "
                          f"({c['wall_s']:.0f} s)")
            save()
    table = Table(title="rec_privacy", header_style="bold")
    for col in ("cell", "σ", "ε total", "probe top-1", "next NDCG@10", "final NDCG@10"):
        table.add_column(col)
    for key, c in cells.items():
        table.add_row(key, "—" if c["sigma"] is None else f"{c['sigma']:.3g}", f"{c['epsilon_total']:.3g}",
                      f"{c['attack'][PROBE][ALL]:.3f}" if "attack" in c else "—", f"{c['next_ndcg']:.4f}",
                      f"{c['final_ndcg']:.4f}")
    console.print(table)
    return {**result, "noise": cells}


if __name__ == "__main__":
    main()
