"""Fit a residual head (:mod:`edge_client.learning.residual`: the feature head plus a linear map of the last k
context values) on one dataset's training split, in closed form, and score it on the standard protocol.

One joint ridge over [features, last k RevIN-normalised lags, 1] with one strength per block (each times its
block's mean energy; the bias is not shrunk); k and both strengths are chosen on every validation window by the
mean MSE over H 96/192/336 of the one 336-step head that ships (each horizon scores the head's first H steps).
The feature block's grid reaches far past 1 so the choice can fall back to "lags only" when validation says the
features add nothing. The quantile heads keep their pretrained offsets from the point head (as
:func:`coordinator.pretrain.protocol.fit_head` does) and share the lag path, so the bands follow the new point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from coordinator.pretrain.protocol import (
    HORIZONS,
    frozen_features,
    protocol_windows,
    score_forecasts,
    score_subset,
    split_subset,
)
from coordinator.pretrain.training import torch_threads
from edge_client.learning.head import Features
from edge_client.learning.residual import LAG_KEY, normalised_lags, residual_forecast

LAG_RIDGE_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FEATURE_GRID = (*LAG_RIDGE_GRID, 10.0, 100.0, 1000.0)
LAG_GRID = (48, 96, 168, 336, 512)


def block_penalty(gram: np.ndarray, sizes: Sequence[int], lams: Sequence[float]) -> np.ndarray:
    """Diagonal ridge penalty of a design laid out as consecutive blocks of `sizes` then a bias column: block i
    gets lams[i] x its mean diagonal energy, the bias nothing."""
    diag = np.diag(gram)
    reg = np.zeros(len(diag))
    at = 0
    for size, lam in zip(sizes, lams, strict=True):
        if size:
            reg[at:at + size] = lam * diag[at:at + size].mean()
        at += size
    return reg


def ridge_solve(gram: np.ndarray, rhs: np.ndarray, reg: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """argmin ||A s - y||² + (s - prior)ᵀ diag(reg) (s - prior) from AᵀA and Aᵀy (prior 0 if None)."""
    if prior is not None:
        rhs = rhs + reg[:, None] * prior
    return np.linalg.solve(gram + np.diag(reg), rhs)


def design(feats: np.ndarray, contexts: np.ndarray, loc: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    """[features, last k normalised lags, 1] as float64 (k = 0: features and bias only)."""
    parts = [feats.astype(np.float64)]
    if k:
        parts.append(normalised_lags(contexts, loc, scale, k).astype(np.float64))
    parts.append(np.ones((len(feats), 1)))
    return np.hstack(parts)


def _chunks(n: int, size: int = 8192) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def normal_equations(f: np.ndarray, x: np.ndarray, loc: np.ndarray, scale: np.ndarray, y: np.ndarray, k: int,
                     weight_by_scale: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AᵀWA, AᵀWy_n and Σ W y_n² per step, y_n the RevIN-normalised targets; W = scale² when `weight_by_scale`
    (then ||A s - y_n||²_W is the squared error in data units, so validation MSE needs no predictions)."""
    d = f.shape[1] + k + 1
    gram, rhs, yy = np.zeros((d, d)), np.zeros((d, y.shape[1])), np.zeros(y.shape[1])
    for s in _chunks(len(f)):
        a = design(f[s], x[s], loc[s], scale[s], k)
        yn = (y[s].astype(np.float64) - loc[s]) / scale[s]
        w = scale[s].astype(np.float64) ** 2 if weight_by_scale else np.ones((len(a), 1))
        gram += a.T @ (a * w)
        rhs += a.T @ (yn * w)
        yy += (yn**2 * w).sum(axis=0)
    return gram, rhs, yy


def fit_residual_head(model: torch.nn.Module, name: str | Sequence[str], data_dir: str | None = None,
                      lag_grid: Sequence[int] = LAG_GRID, threads: int | None = None, fraction: float = 1.0,
                      n_train: int | None = None, n_val: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The residual head of `model`'s frozen backbone for dataset `name` (see the module docstring): its arrays
    (the keys of head.npz plus ``lag_weight``) and what was chosen, with the validation sweep. `fraction`: fit
    on that share of the training windows, evenly spaced (few-shot); `n_train` / `n_val`: that many evenly
    spaced windows per dataset instead.

    Several names fit one *corpus* head: every dataset's normal equations are divided by its window count, so
    each counts alike in the fit and in the validation score (their mean MSE), as in the pretraining validation
    score. Fit on the pretraining corpus, it is a zero-shot head for a dataset outside it: the lag block is a
    linear map of the look-back learnt from every training series (a global NLinear beside the features)."""
    cfg = model.config
    names = [name] if isinstance(name, str) else list(name)
    parts = []  # per dataset: (train normal equations per k, validation ones per k)
    windows = val_windows = 0
    used: list[str] = []  # the datasets with a training and a validation window
    for n in names:
        x, y = split_subset(n, "train", cfg.context, cfg.horizon, n=n_train, fraction=None if n_train else fraction,
                            data_dir=data_dir)
        vx, vy = split_subset(n, "val", cfg.context, cfg.horizon, n=n_val, fraction=None if n_val else 1.0,
                              data_dir=data_dir)
        if not len(x) or not len(vx):  # a split too short for one window: the dataset cannot count
            continue
        with torch_threads(threads):
            f, loc, scale = frozen_features(model, x)
            vf, vloc, vscale = frozen_features(model, vx)
        parts.append({k: ([v / len(x) for v in normal_equations(f, x, loc, scale, y, k)[:2]],
                          [v / len(vx) for v in normal_equations(vf, vx, vloc, vscale, vy, k, weight_by_scale=True)])
                      for k in lag_grid})
        n_feat, windows, val_windows = f.shape[1], windows + len(x), val_windows + len(vx)
        used.append(n)
    if not parts:
        raise ValueError(f"no dataset of {names} has a training and a validation window")
    sweep, best = [], None
    for k in lag_grid:
        gram, rhs = (sum(p[k][0][i] for p in parts) / len(parts) for i in range(2))
        for lam_f in FEATURE_GRID:
            for lam_l in LAG_RIDGE_GRID:
                sol = ridge_solve(gram, rhs, block_penalty(gram, (n_feat, k), (lam_f, lam_l)))
                sq = np.mean([np.einsum("dh,dh->h", sol, vgram @ sol) - 2 * np.einsum("dh,dh->h", sol, vrhs) + vyy
                              for vgram, vrhs, vyy in (p[k][1] for p in parts)], axis=0)
                val = {f"H{h}": float(sq[:h].sum() / h) for h in HORIZONS}
                point = {"k": k, "lam_f": lam_f, "lam_l": lam_l, "val_mse": val,
                         "val_mean": float(np.mean(list(val.values())))}
                sweep.append(point)
                if best is None or point["val_mean"] < best[0]["val_mean"]:
                    best = (point, sol)
    assert best is not None
    chosen, sol = best
    k = chosen["k"]
    pre = model.head_state()
    w_new, b_new = sol[:n_feat].T.astype(np.float32), sol[-1].astype(np.float32)
    params = {
        "point_weight": w_new,
        "point_bias": b_new,
        "quantile_weight": (pre["quantile_weight"] + (w_new - pre["point_weight"])[None]).astype(np.float32),
        "quantile_bias": (pre["quantile_bias"] + (b_new - pre["point_bias"])[None]).astype(np.float32),
        LAG_KEY: sol[n_feat:n_feat + k].T.astype(np.float32),
    }
    info = {"kind": "residual", "lags": k, "ridge_features": chosen["lam_f"], "ridge_lags": chosen["lam_l"],
            "val_mse": chosen["val_mse"], "datasets": used,
            "train_windows": windows, "val_windows": val_windows,
            "parameters": int(sum(v.size for v in params.values())), "sweep": sweep}
    return params, info


class ResidualHeadModel(torch.nn.Module):
    """A TSFM's frozen backbone under a residual head, callable like the TSFM (raw windows in, point and quantile
    forecasts out), so protocol scoring and forecast averaging take it as they take the model. The head is the
    device's numpy code (:func:`edge_client.learning.residual.residual_forecast`), not a torch copy of it."""

    def __init__(self, model: torch.nn.Module, params: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.model, self.params, self.config = model, params, model.config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, loc, scale = (t.detach().numpy().astype(np.float32) for t in self.model.features(x))
        point, quant = residual_forecast(self.params, Features(f, loc, scale), x.detach().numpy())
        return torch.from_numpy(np.ascontiguousarray(point)), torch.from_numpy(np.ascontiguousarray(quant))


def residual_protocol_scores(model: torch.nn.Module, params: dict[str, np.ndarray], name: str,
                             data_dir: str | None = None, threads: int | None = None, subset_only: bool = False,
                             ) -> dict[str, dict[str, float]]:
    """Standard-protocol scores of `model`'s backbone under a residual head (torch features, the numpy head);
    `subset_only`: only the AutoETS subset windows are forecast and scored."""
    tw = protocol_windows(name, model.config.context, data_dir=data_dir)
    rows = tw.rows(min(HORIZONS), subset=True) if subset_only else np.arange(len(tw.x))
    with torch_threads(threads):
        f, loc, scale = frozen_features(model, tw.x[rows])
    feats = Features(f.astype(np.float32), loc.astype(np.float32), scale.astype(np.float32))
    point, quant = residual_forecast(params, feats, tw.x[rows])
    if subset_only:
        return score_subset(tw, rows, point, quant, model.config.quantiles)
    return score_forecasts(tw, point, quant, model.config.quantiles)
