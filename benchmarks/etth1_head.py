"""ETTh1 heads on the shipped backbone (issue 13's ≤ 0.370 target): can a TiDE-style linear residual of the
context beside the frozen features close the gap to NLinear?

    python benchmarks/etth1_head.py            # extract (cached), choose on validation, score test, write results
    python benchmarks/etth1_head.py ship       # regenerate the shipped head.etth1.npz, card.json, model card
    python benchmarks/etth1_head.py report     # rewrite the Markdown from the JSON

Heads compared on the standard protocol's windows (context 512, every channel, stride 1 over the whole test
split; scaled values), all fit in closed form (ridge) on ETTh1's *training* windows, in RevIN-normalised space
(the space the device head lives in: point = out * scale + loc):

* ``pretrained`` -- the shipped head.npz as it is (generic, zero-shot);
* ``features`` -- ridge on the 64 frozen backbone features (what head.etth1.npz was);
* ``lags`` -- ridge on the last k RevIN-normalised context values only (NLinear-like, no backbone);
* ``both`` -- one ridge on [features, last k lags] jointly, one ridge strength per block
  (TiDE / N-BEATS / DLinear hybrids: a linear look-back-to-horizon path beside the deep one).
* ``nlinear`` -- NLinear as the protocol module fits it (raw scaled values, last value subtracted), the
  reference on the same windows.

Every choice (k, the two ridge strengths) is made on ETTh1's validation windows (every stride-1 window); the test
split is scored once per head, at the chosen point. Backbone features are extracted once and cached in
``runs/etth1_head/features.npz`` (delete it after the backbone changes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.pretrain import shipped  # noqa: E402
from coordinator.pretrain.protocol import HORIZONS, nlinear_scores, protocol_windows, score_rows  # noqa: E402
from coordinator.pretrain.residual_head import FEATURE_GRID, LAG_RIDGE_GRID, block_penalty, ridge_solve  # noqa: E402
from coordinator.pretrain.windows import scaled_series, window_starts  # noqa: E402
from edge_client.learning.head import Features  # noqa: E402
from edge_client.learning.residual import LAG_KEY, normalised_lags, residual_forecast  # noqa: E402

RUNS = ROOT / "runs" / "etth1_head"
OUT = ROOT / "docs" / "results"
MARKER = "## Findings"
DATASET = "etth1"
LAG_GRID = (0, 16, 24, 48, 96, 168, 336, 512)
# Ridge grids: those of the shipped head's fit (the feature block's reaches far past 1, so "both" can fall back to
# lags only when validation says the features add nothing).
# A lag block a device can afford: the fleet head (24 steps, point + 3 quantiles, 64 features: 6,240 numbers) must
# upload in 32 KB as float16 and in 4 KB as top-20 % int8; last-k lags on the point head add 24k numbers.
COMPACT_K = 24
FLEET_H, FLEET_Q = 24, 3


def train_windows(context: int, min_horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Every stride-1 training window of every channel whose first `min_horizon` targets lie in the training split:
    contexts (N, L) and targets (N, max(HORIZONS)) with NaN past the split."""
    scaled, (train_end, _, _) = scaled_series(DATASET)
    hmax = max(HORIZONS)
    xs, ys = [], []
    for c in range(scaled.shape[1]):
        s = scaled[:train_end, c]
        starts = window_starts(s, context + min_horizon, 1, train_end)
        xs.append(s[starts[:, None] + np.arange(context)[None, :]])
        idx = starts[:, None] + context + np.arange(hmax)[None, :]
        ys.append(np.where(idx < train_end, s[np.minimum(idx, train_end - 1)], np.nan))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32)


def extract(threads: int) -> dict[str, np.ndarray]:
    """Features, RevIN stats, contexts and targets of the train / val / test windows (cached)."""
    path = RUNS / "features.npz"
    if path.is_file():
        with np.load(path) as f:
            return dict(f)
    import torch

    from coordinator.pretrain.protocol import frozen_features
    from coordinator.pretrain.training import torch_threads

    model, _ = shipped.load_shipped()
    ctx = model.config.context
    out: dict[str, np.ndarray] = {}
    val = protocol_windows(DATASET, ctx, split="val")
    test = protocol_windows(DATASET, ctx)
    tx, ty = train_windows(ctx, min(HORIZONS))
    for split, x, y in (("test", test.x, test.y), ("val", val.x, val.y), ("train", tx, ty)):
        t0 = time.time()
        with torch_threads(threads), torch.inference_mode():
            f, loc, scale = frozen_features(model, x)
        out.update({f"{split}_f": f.astype(np.float32), f"{split}_loc": loc.astype(np.float32),
                    f"{split}_scale": scale.astype(np.float32), f"{split}_x": x, f"{split}_y": y})
        print(f"features {split}: {len(x)} windows in {time.time() - t0:.0f} s", flush=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def design(d: dict[str, np.ndarray], split: str, k: int, use_features: bool) -> np.ndarray:
    """[features?, last k RevIN-normalised context values, 1] as float64."""
    parts = []
    if use_features:
        parts.append(d[f"{split}_f"].astype(np.float64))
    if k:
        parts.append(normalised_lags(d[f"{split}_x"], d[f"{split}_loc"], d[f"{split}_scale"], k).astype(np.float64))
    parts.append(np.ones((len(d[f"{split}_x"]), 1)))
    return np.hstack(parts)


class Gram:
    """Normal equations of one design for every horizon (targets of horizon H: the windows whose H targets fit)."""

    def __init__(self, a: np.ndarray, d: dict[str, np.ndarray], split: str) -> None:
        y = d[f"{split}_y"].astype(np.float64)
        yn = (y - d[f"{split}_loc"]) / d[f"{split}_scale"]
        self.by_h = {}
        for h in HORIZONS:
            ok = np.isfinite(y[:, :h]).all(axis=1)
            self.by_h[h] = (a[ok].T @ a[ok], a[ok].T @ yn[ok, :h])

    def solve(self, h: int, reg_diag: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
        gram, rhs = self.by_h[h]
        return ridge_solve(gram, rhs, reg_diag, None if prior is None else prior[:, :h])


_GRAMS: dict[tuple[int, bool], Gram] = {}


def gram_of(d: dict[str, np.ndarray], k: int, use_f: bool) -> Gram:
    """The training normal equations of one design, computed once per (k, features?)."""
    if (k, use_f) not in _GRAMS:
        _GRAMS[(k, use_f)] = Gram(design(d, "train", k, use_f), d, "train")
    return _GRAMS[(k, use_f)]


def block_reg(gram: np.ndarray, n_feat: int, k: int, lam_f: float, lam_l: float) -> np.ndarray:
    return block_penalty(gram, (n_feat, k), (lam_f, lam_l))


def predict(d: dict[str, np.ndarray], split: str, a: np.ndarray, sol: np.ndarray) -> np.ndarray:
    return (a @ sol) * d[f"{split}_scale"] + d[f"{split}_loc"]


def mse_on(d: dict[str, np.ndarray], split: str, pred: np.ndarray, h: int) -> float:
    y = d[f"{split}_y"]
    ok = np.isfinite(y[:, :h]).all(axis=1)
    return float(np.mean((pred[ok, :h].astype(np.float64) - y[ok, :h]) ** 2))


KINDS = ("features", "lags", "both", "tide", f"lags{COMPACT_K}", f"both{COMPACT_K}", f"tide{COMPACT_K}")


def kind_spec(kind: str) -> tuple[bool, bool, list[int]]:
    """(uses features, shrinks the feature block towards the pretrained head, lag counts to try) of a head kind.
    "tide": the pretrained head plus a lag path, fitted jointly with the feature weights shrunk towards the
    pretrained ones (so a large λ_f keeps the pretrained head and fits only the residual); a trailing number fixes
    k (the compact heads)."""
    base = kind.rstrip("0123456789")
    fixed = kind[len(base):]
    ks = [0] if base == "features" else [int(fixed)] if fixed else [k for k in LAG_GRID if k]
    return base in ("features", "both", "tide"), base == "tide", ks


def pretrained_prior(d: dict[str, np.ndarray], k: int) -> np.ndarray:
    """The pretrained point head as a solution of the [features, k lags, 1] design (lag rows 0)."""
    with np.load(shipped.artifact_dir() / "head.npz") as f:
        w, b = f["point_weight"].astype(np.float64), f["point_bias"].astype(np.float64)
    return np.vstack([w.T, np.zeros((k, len(b))), b[None, :]])


def choose(d: dict[str, np.ndarray], kind: str, h: int) -> dict[str, Any]:
    """The (k, λ_f, λ_l) of `kind` with the lowest validation MSE at horizon h, and the whole sweep. Kinds ending
    in a number fix k to it (the compact heads); the others choose k from LAG_GRID."""
    use_f, use_prior, ks = kind_spec(kind)
    n_feat = d["train_f"].shape[1] if use_f else 0
    sweep, best = [], None
    for k in ks:
        va = design(d, "val", k, use_f)
        g = gram_of(d, k, use_f)
        prior = pretrained_prior(d, k) if use_prior else None
        for lam_f in (FEATURE_GRID if use_f else (0.0,)):
            for lam_l in (LAG_RIDGE_GRID if k else (0.0,)):
                sol = g.solve(h, block_reg(g.by_h[h][0], n_feat, k, lam_f, lam_l), prior)
                val = mse_on(d, "val", predict(d, "val", va, sol), h)
                sweep.append({"k": k, "lam_f": lam_f, "lam_l": lam_l, "val_mse": val})
                if best is None or val < best["val_mse"]:
                    best = {"k": k, "lam_f": lam_f, "lam_l": lam_l, "val_mse": val}
    assert best is not None
    return {**best, "sweep": sweep}


def fit_and_score(d: dict[str, np.ndarray], kind: str, pick: dict[str, Any], h: int) -> dict[str, float]:
    use_f, use_prior, _ = kind_spec(kind)
    k = pick["k"]
    ta = design(d, "test", k, use_f)
    g = gram_of(d, k, use_f)
    n_feat = d["train_f"].shape[1] if use_f else 0
    prior = pretrained_prior(d, k) if use_prior else None
    sol = g.solve(h, block_reg(g.by_h[h][0], n_feat, k, pick["lam_f"], pick["lam_l"]), prior)
    pred = predict(d, "test", ta, sol)
    y = d["test_y"]
    ok = np.isfinite(y[:, :h]).all(axis=1)
    out = score_rows(pred[ok], None, y[ok], (), h)
    out["params"] = float(sol.size)
    out["k"] = float(k)
    return out


def fleet_numbers(n_feat: int, k: int) -> int:
    """Numbers a device would upload for this head as a fleet head (24 steps): point + 3 quantile heads on
    [features, 1] (the fleet head today: 24 x 4 x 65 = 6,240) plus one lag block shared by all four outputs, as
    in the shipped residual head (24 x k)."""
    return FLEET_H * ((1 + FLEET_Q) * (n_feat + 1) + k)


def shipped_head_scores(d: dict[str, np.ndarray], name: str) -> dict[str, dict[str, float]]:
    """A head file of the shipped folder (plain or residual) on the cached test features, every horizon."""
    with np.load(shipped.artifact_dir() / name) as f:
        params = {k: f[k] for k in f.files}
    feats = Features(d["test_f"], d["test_loc"], d["test_scale"])
    pred, _ = residual_forecast(params, feats, d["test_x"])
    y = d["test_y"]
    out = {}
    for h in HORIZONS:
        ok = np.isfinite(y[:, :h]).all(axis=1)
        out[f"H{h}"] = score_rows(pred[ok], None, y[ok], (), h)
    k = int(params[LAG_KEY].shape[1]) if LAG_KEY in params else 0
    out["H96"].update(k=float(k), params=float((d["test_f"].shape[1] + k + 1) * 96))
    return out


def ship(threads: int) -> None:
    """Regenerate the shipped head.etth1.npz (a residual head, chosen on validation) for the shipped backbone, its
    entries in spec.json and card.json, and docs/model-card.md -- the same call `foundation.py ship` makes when it
    builds the whole folder, without rebuilding the backbone files."""
    from benchmarks import foundation

    foundation.restore()  # the card's baseline columns come from the committed foundation results
    model, _ = shipped.load_shipped()
    card = shipped.card()
    info = shipped.add_etth1_head(card, model, shipped.ARTIFACT_DIR, threads=threads)
    (shipped.ARTIFACT_DIR / shipped.CARD_NAME).write_text(json.dumps(card, indent=1, default=float) + "\n")
    foundation.write_model_card(card)
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / "ship_sweep.json").write_text(json.dumps(info, indent=1) + "\n")
    sc = card["scores"]["etth1_head"]["scores"]
    print(f"head.etth1.npz: k={info['lags']} λf={info['ridge_features']:g} λl={info['ridge_lags']:g}, "
          + ", ".join(f"H{h} {sc[f'H{h}']['mse']:.4f}" for h in HORIZONS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", nargs="?", default="run", choices=("run", "ship", "report"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.command == "ship":
        ship(args.threads)
        return
    if args.command == "report":
        write_markdown(json.loads((OUT / "etth1_head.json").read_text()))
        return
    d = extract(args.threads)
    res: dict[str, Any] = {"windows": {s: len(d[f"{s}_x"]) for s in ("train", "val", "test")},
                           "feature_dim": int(d["train_f"].shape[1]), "heads": {}, "choices": {},
                           "machine": platform.platform()}
    res["heads"]["pretrained"] = shipped_head_scores(d, "head.npz")
    res["heads"]["shipped"] = shipped_head_scores(d, shipped.ETTH1_HEAD)
    if (RUNS / "ship_sweep.json").is_file():
        res["shipped_choice"] = json.loads((RUNS / "ship_sweep.json").read_text())
    nl = nlinear_scores(DATASET)
    res["heads"]["nlinear"] = {f"H{h}": nl[f"H{h}"] for h in HORIZONS}
    for kind in KINDS:
        res["heads"][kind], res["choices"][kind] = {}, {}
        for h in HORIZONS:
            pick = choose(d, kind, h)
            res["choices"][kind][f"H{h}"] = pick
            res["heads"][kind][f"H{h}"] = fit_and_score(d, kind, pick, h)
            print(f"{kind:9s} H{h}: k={pick['k']} λf={pick['lam_f']:g} λl={pick['lam_l']:g} "
                  f"val {pick['val_mse']:.4f} test {res['heads'][kind][f'H{h}']['mse']:.4f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "etth1_head.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res)


def write_markdown(res: dict[str, Any]) -> None:
    path = OUT / "etth1_head.md"
    old = path.read_text() if path.is_file() else ""
    at = old.find("\n" + MARKER + "\n")
    kept = old[at + 1:] if at >= 0 else f"{MARKER}\n\n*Hand-written; kept when the script rewrites the tables.*\n"
    lines = ["# ETTh1 heads on the shipped backbone", "",
             "Written by `python benchmarks/etth1_head.py`. Standard protocol (context 512, all 7 channels, stride-1 "
             f"windows over the whole test split, scaled values); backbone {shipped.VERSION}, frozen. Windows: "
             + ", ".join(f"{k} {v:,}" for k, v in res["windows"].items()) + ". Each head's lag count k and ridge "
             "strengths (per block) are chosen on every validation window; test scored once.", "",
             "| head | " + " | ".join(f"MSE H{h} | MAE H{h}" for h in HORIZONS) + " | k (H96) | point-head "
             "parameters H96 | fleet head numbers (24 steps) | float16 KB | top-20 % int8 KB |",
             "|---|" + "---|---|" * len(HORIZONS) + "---|---|---|---|---|"]
    names = {"nlinear": "NLinear (ETTh1 only)", "pretrained": "pretrained head (shipped head.npz)",
             "shipped": "shipped ETTh1 head (head.etth1.npz: features + lags, one 336-step head)",
             "features": "features only (ridge on 64 features)", "lags": "lags only (ridge on last k, RevIN space)",
             "both": "features + lags (joint ridge)",
             "tide": "pretrained head + lags (features shrunk to the pretrained head)",
             f"lags{COMPACT_K}": f"lags only, k = {COMPACT_K}",
             f"both{COMPACT_K}": f"features + lags, k = {COMPACT_K} (fleet-sized)",
             f"tide{COMPACT_K}": f"pretrained head + lags, k = {COMPACT_K} (fleet-sized)"}
    for kind in ("nlinear", "pretrained", "shipped", *KINDS):
        sc = res["heads"][kind]
        cells = " | ".join(f"{sc[f'H{h}']['mse']:.4f} | {sc[f'H{h}']['mae']:.4f}" for h in HORIZONS)
        h96 = sc["H96"]
        n_feat = res["feature_dim"] if kind != "nlinear" and not kind.startswith("lags") else 0
        fleet = fleet_numbers(n_feat, int(h96.get("k", 0)))
        extra = (f"{int(h96['k'])} | {int(h96['params']):,} | {fleet:,} | {2 * fleet / 1024:.1f} | "
                 f"{(3 * math.ceil(0.2 * fleet) + 16) / 1024:.1f}") if "params" in h96 else " | | | | "
        lines.append(f"| {names[kind]} | {cells} | {extra} |")
    lines += ["", "## Choices (validation)", "", "| head | horizon | k | λ features | λ lags | val MSE |",
              "|---|---|---|---|---|---|"]
    for kind, by_h in res["choices"].items():
        for h, p in by_h.items():
            lines.append(f"| {kind} | {h} | {p['k']} | {p['lam_f']:g} | {p['lam_l']:g} | {p['val_mse']:.4f} |")
    lines += ["", "Validation MSE of the best ridge pair per lag count k (H96):", "",
              "| k | lags only | features + lags | pretrained head + lags |", "|---|---|---|---|"]
    for k in [k for k in LAG_GRID if k]:
        row = []
        for kind in ("lags", "both", "tide"):
            pts = [p["val_mse"] for p in res["choices"][kind]["H96"]["sweep"] if p["k"] == k]
            row.append(f"{min(pts):.4f}" if pts else "")
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n\n" + kept)
    print("\n".join(lines[4:6 + 3 + len(KINDS)]))


if __name__ == "__main__":
    main()
