"""The standard long-horizon protocol (Informer/Autoformer/PatchTST convention) and the classical
baselines scored on exactly its windows.

* Windows: context L = 512, horizons 96/192/336, every channel, stride 1 over the *whole* test split
  (a context may reach back L rows before the split boundary); values standardised with statistics
  of the training rows; MSE and MAE on the scaled values, averaged over every window, step and
  channel; CRPS from the quantile head (2 x mean pinball / Σ|y|, GluonTS convention).
* One forward pass serves the three horizons: the H = 96 windows are every window start whose
  first 96 targets lie in the test split; horizon H keeps the starts whose first H targets do (a
  subset), and scores the first H steps of a forecast of max(H) steps.
* Baselines on the same windows: seasonal naive (season = the data's period, naive when the period
  exceeds the context); NLinear (Zeng et al. 2023: subtract the last value, one linear map from
  context to horizon shared by all channels) fit by ridge least squares on the dataset's *own*
  training windows -- a full-shot baseline, not zero-shot; AutoETS (statsforecast) on an evenly
  strided subset of the windows (one ETS fit per window is ~0.1 s), with every other method also
  scored on that subset so the comparison stays like for like.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from coordinator.models.tsfm import forecast as predict
from coordinator.pretrain.training import torch_threads
from coordinator.pretrain.windows import scaled_series
from edge_client.data.datasets import load_series
from edge_client.learning.windows import crps_from_quantiles, seasonal_window_average

HORIZONS = (96, 192, 336)
ETS_MAX_WINDOWS = 800  # AutoETS fits per dataset (the subset is every k-th window start per channel)


@dataclass(frozen=True)
class ProtocolWindows:
    """Every stride-1 test window of one dataset, with targets out to max(horizons) (NaN past the end)."""

    name: str
    x: np.ndarray  # (N, L) float32
    y: np.ndarray  # (N, Hmax) float32, NaN where the target lies past the test split or in a gap
    channel: np.ndarray  # (N,) channel index
    offset: np.ndarray  # (N,) window start relative to the first start of its channel
    ets_stride: int

    def rows(self, horizon: int, subset: bool = False) -> np.ndarray:
        """Indices of the windows scored at `horizon` (all targets finite); `subset`: the AutoETS subset."""
        ok = np.isfinite(self.y[:, :horizon]).all(axis=1)
        if subset:
            ok &= self.offset % self.ets_stride == 0
        return np.flatnonzero(ok)


@lru_cache(maxsize=16)
def protocol_windows(name: str, context: int = 512, max_horizon: int = max(HORIZONS), min_horizon: int = min(HORIZONS),
                 data_dir: str | None = None, split: str = "test") -> ProtocolWindows:
    scaled, (train_end, val_end, test_end) = scaled_series(name, data_dir)
    lo, hi = {"test": (val_end, test_end), "val": (train_end, val_end)}[split]
    xs, ys, chans, offs = [], [], [], []
    for c in range(scaled.shape[1]):
        series = scaled[:hi, c]
        starts = np.arange(lo - context, hi - context - min_horizon + 1)
        starts = starts[starts >= 0]
        ctx = series[starts[:, None] + np.arange(context)[None, :]]
        tgt_idx = starts[:, None] + context + np.arange(max_horizon)[None, :]
        tgt = np.where(tgt_idx < hi, series[np.minimum(tgt_idx, hi - 1)], np.nan)
        keep = np.isfinite(ctx).all(axis=1) & np.isfinite(tgt[:, :min_horizon]).all(axis=1)
        xs.append(ctx[keep])
        ys.append(tgt[keep])
        chans.append(np.full(int(keep.sum()), c))
        offs.append((starts - starts[0])[keep] if len(starts) else starts)
    x = np.ascontiguousarray(np.concatenate(xs), np.float32)
    per_channel = max(1, len(x) // max(1, scaled.shape[1]))
    stride = max(1, math.ceil(per_channel * scaled.shape[1] / ETS_MAX_WINDOWS))
    return ProtocolWindows(name, x, np.concatenate(ys).astype(np.float32), np.concatenate(chans),
                       np.concatenate(offs), stride)


def score_rows(point: np.ndarray, quantiles: np.ndarray | None, y: np.ndarray, levels: tuple[float, ...],
               horizon: int) -> dict[str, float]:
    p, t = point[:, :horizon].astype(np.float64), y[:, :horizon].astype(np.float64)
    out = {"mse": float(np.mean((p - t) ** 2)), "mae": float(np.mean(np.abs(p - t))), "n": float(len(t))}
    if quantiles is not None:
        q = np.transpose(quantiles[:, :, :horizon], (1, 0, 2))
        out["crps"] = float(crps_from_quantiles(q, t, np.asarray(levels)))
    return out


def score_forecasts(tw: ProtocolWindows, point: np.ndarray, quantiles: np.ndarray | None, levels: tuple[float, ...],
                    horizons: tuple[int, ...] = HORIZONS, subset_only: bool = False) -> dict[str, dict[str, float]]:
    """{"H96": {...}, ..., "ets/H96": {...}}: every window, and the AutoETS subset."""
    out: dict[str, dict[str, float]] = {}
    for h in horizons:
        for subset in (False, True):
            if subset_only and not subset:
                continue
            r = tw.rows(h, subset)
            q = None if quantiles is None else quantiles[r]
            out[("ets/" if subset else "") + f"H{h}"] = score_rows(point[r], q, tw.y[r], levels, h)
    return out


def model_forecasts(model: torch.nn.Module, tw: ProtocolWindows, threads: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    with torch_threads(threads):
        return predict(model, tw.x)


def model_protocol_scores(model: torch.nn.Module, names: list[str], data_dir: str | None = None,
                          threads: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for name in names:
        tw = protocol_windows(name, model.config.context, data_dir=data_dir)
        point, quantiles = model_forecasts(model, tw, threads)
        out[name] = score_forecasts(tw, point, quantiles, model.config.quantiles)
    return out


# ------------------------------------------------------------------------------------- baselines


def season_of(name: str, context: int, data_dir: str | None = None) -> int:
    s = load_series(name, data_dir).season_length
    return s if s <= context else 1


def seasonal_naive_scores(name: str, context: int = 512, data_dir: str | None = None,
                          levels: tuple[float, ...] = (0.1, 0.5, 0.9), window: int = 1) -> dict[str, dict[str, float]]:
    """The mean profile of the last `window` seasons, repeated (1: seasonal naive). Point forecasts stand in for
    every quantile (its CRPS is then ~MAE/Σ|y|)."""
    tw = protocol_windows(name, context, data_dir=data_dir)
    point = seasonal_window_average(tw.x, max(HORIZONS), season_of(name, context, data_dir), window)
    return score_forecasts(tw, point, np.repeat(point[:, None], len(levels), 1), levels)


SEASONAL_WINDOW = 7  # seasons averaged by the seasonal window average: a week of days for hourly data


def seasonal_average_scores(name: str, context: int = 512, data_dir: str | None = None,
                            levels: tuple[float, ...] = (0.1, 0.5, 0.9)) -> dict[str, dict[str, float]]:
    """The last SEASONAL_WINDOW seasons' mean profile, repeated. Why it is here: on ETTh1 this one-liner beats
    AutoETS, so "below AutoETS" alone is a weak bar for a foundation model."""
    return seasonal_naive_scores(name, context, data_dir, levels, SEASONAL_WINDOW)


def _nlinear_normal_equations(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AᵀA and Aᵀ(y - x_last) of NLinear's design A = [x - x_last, 1], in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    last = x[:, -1:]
    a = np.hstack([x - last, np.ones((len(x), 1))])
    return a.T @ a, a.T @ (y - last)


def _nlinear_solve(xtx: np.ndarray, xty: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the ridge solution; the strength is relative to the mean diagonal and the bias is not shrunk."""
    d = len(xtx)
    reg = ridge * np.trace(xtx) / d * np.eye(d)
    reg[-1, -1] = 0.0
    sol = np.linalg.solve(xtx + reg, xty)
    return sol[:-1].astype(np.float32), sol[-1].astype(np.float32)


def nlinear_fit(name: str, context: int, horizon: int, data_dir: str | None = None, ridge: float = 1e-3,
                stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """NLinear by ridge least squares on the training windows of `name` (all channels, one shared
    map): (W (L, H), b (H,)) for  ŷ = (x - x_last) @ W + b + x_last."""
    scaled, (train_end, _, _) = scaled_series(name, data_dir)
    d = context + 1
    xtx, xty = np.zeros((d, d)), np.zeros((d, horizon))
    for c in range(scaled.shape[1]):  # one channel at a time: the normal equations are summed, not the windows
        s = scaled[:train_end, c]
        starts = np.arange(0, train_end - context - horizon + 1, stride)
        win = s[starts[:, None] + np.arange(context + horizon)[None, :]].astype(np.float64)
        win = win[np.isfinite(win).all(axis=1)]
        gram, rhs = _nlinear_normal_equations(win[:, :context], win[:, context:])
        xtx += gram
        xty += rhs
    return _nlinear_solve(xtx, xty, ridge)


def nlinear_fit_windows(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """NLinear by ridge least squares on given windows (contexts `x`, targets `y`): the linear model a
    few-shot comparison trains from scratch on exactly the windows the pretrained model adapts on."""
    return _nlinear_solve(*_nlinear_normal_equations(x, y), ridge)


def nlinear_forecast(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ŷ = (x - x_last) @ W + b + x_last."""
    last = x[:, -1:]
    return (x - last) @ w + b + last


def score_subset(tw: ProtocolWindows, rows: np.ndarray, point: np.ndarray, quantiles: np.ndarray | None,
                 levels: tuple[float, ...]) -> dict[str, dict[str, float]]:
    """Scores on the AutoETS subset only, from forecasts of `rows` (``tw.rows(min(HORIZONS), subset=True)``):
    the forecasts are placed among NaN rows so every horizon scores the same windows as a full forecast would."""
    full_point = np.full((len(tw.x), point.shape[1]), np.nan, np.float32)
    full_point[rows] = point
    full_quantiles = None
    if quantiles is not None:
        full_quantiles = np.full((len(tw.x), *quantiles.shape[1:]), np.nan, np.float32)
        full_quantiles[rows] = quantiles
    return score_forecasts(tw, full_point, full_quantiles, levels, subset_only=True)


def nlinear_scores(name: str, context: int = 512, data_dir: str | None = None) -> dict[str, dict[str, float]]:
    """One least-squares fit per horizon (each on the training windows whose H targets fit)."""
    tw = protocol_windows(name, context, data_dir=data_dir)
    out: dict[str, dict[str, float]] = {}
    for h in HORIZONS:
        pred = nlinear_forecast(tw.x, *nlinear_fit(name, context, h, data_dir))
        pred = np.concatenate([pred, np.full((len(pred), max(HORIZONS) - h), np.nan, np.float32)], axis=1)
        for subset in (False, True):
            r = tw.rows(h, subset)
            out[("ets/" if subset else "") + f"H{h}"] = score_rows(pred[r], None, tw.y[r], (), h)
    return out


def autoets_scores(name: str, context: int = 512, data_dir: str | None = None,
                   levels: tuple[float, ...] = (0.1, 0.5, 0.9)) -> dict[str, dict[str, float]]:
    """AutoETS on the subset windows (see the module docstring); failed fits fall back to naive."""
    from coordinator.pretrain.evaluate import autoets_forecast, baseline_season

    tw = protocol_windows(name, context, data_dir=data_dir)
    rows = tw.rows(min(HORIZONS), subset=True)
    season = baseline_season(name, 24, data_dir)
    h = max(HORIZONS)
    point = np.full((len(tw.x), h), np.nan, np.float32)
    quant = np.full((len(tw.x), 3, h), np.nan, np.float32)
    failed = 0
    for i in rows:
        try:
            point[i], quant[i] = autoets_forecast(tw.x[i], h, season)
        except Exception:  # statsforecast raises assorted errors on degenerate windows
            failed += 1
            point[i] = tw.x[i, -1]
            quant[i] = tw.x[i, -1]
    out = score_forecasts(tw, point, quant, levels, subset_only=True)
    out["failed_fits"] = {"n": float(failed), "windows": float(len(rows)), "stride": float(tw.ets_stride)}
    return out


# ------------------------------------------------------------------------------ dataset heads


RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@torch.inference_mode()
def frozen_features(model: torch.nn.Module, x: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, ...]:
    model.eval()
    parts = [model.features(torch.from_numpy(np.ascontiguousarray(x[i: i + batch]))) for i in range(0, len(x), batch)]
    return tuple(np.concatenate([p[j].numpy() for p in parts]).astype(np.float64) for j in range(3))


def split_subset(name: str, split: str, context: int, horizon: int, n: int | None = None, fraction: float | None = None,
                 data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Evenly spaced windows (over channels and time) of a split, out of all its stride-1 windows:
    `n` of them, or `fraction` of them (few-shot). Only the chosen windows are materialised."""
    from coordinator.pretrain.silos import evenly
    from coordinator.pretrain.windows import window_starts

    scaled, (train_end, val_end, _) = scaled_series(name, data_dir)
    lo, hi = {"train": (0, train_end), "val": (train_end - context, val_end)}[split]
    span = context + horizon
    pairs = [(c, s + lo) for c in range(scaled.shape[1])
             for s in window_starts(scaled[lo:hi, c], span, 1, hi - lo)]
    total = len(pairs)
    if not total:  # a split shorter than one window (a monthly series' validation years)
        return np.zeros((0, context), np.float32), np.zeros((0, horizon), np.float32)
    k = n if n is not None else max(16, math.ceil((fraction or 1.0) * total))
    picked = [pairs[i] for i in evenly(total, k)]
    win = np.stack([scaled[s: s + span, c] for c, s in picked]).astype(np.float32)
    return np.ascontiguousarray(win[:, :context]), np.ascontiguousarray(win[:, context:])


def fit_head(model: torch.nn.Module, name: str, data_dir: str | None = None, n_train: int | None = 20000,
             fraction: float | None = None, threads: int | None = None) -> tuple[torch.nn.Module, dict]:
    """A copy of `model` whose point head is refit in closed form (ridge) on the frozen backbone's
    features of `name`'s training windows -- the head a device could train, and nothing else.

    Ridge strength: chosen on `name`'s validation windows from :data:`RIDGE_GRID` (times the mean
    feature energy). The quantile head keeps its pretrained offsets from the point forecast
    (W_q ← W_new + (W_q - W_p)), so the bands follow the new point forecast. Training windows:
    `n_train` evenly spaced ones, or `fraction` of all of them (few-shot)."""
    cfg = model.config
    if fraction is not None:
        n_train = None
    x, y = split_subset(name, "train", cfg.context, cfg.horizon, n=n_train, fraction=fraction, data_dir=data_dir)
    vx, vy = split_subset(name, "val", cfg.context, cfg.horizon, n=4000, data_dir=data_dir)
    with torch_threads(threads):
        f, loc, scale = frozen_features(model, x)
        vf, vloc, vscale = frozen_features(model, vx)
    a = np.hstack([f, np.ones((len(f), 1))])
    target = (y - loc) / scale
    gram, rhs = a.T @ a, a.T @ target
    energy = np.trace(gram[:-1, :-1]) / (a.shape[1] - 1)
    best: tuple[float, float, np.ndarray] | None = None
    va = np.hstack([vf, np.ones((len(vf), 1))])
    for lam in RIDGE_GRID:
        reg = lam * energy * np.eye(a.shape[1])
        reg[-1, -1] = 0.0
        sol = np.linalg.solve(gram + reg, rhs)
        val = float(np.mean((va @ sol * vscale + vloc - vy) ** 2))
        if best is None or val < best[1]:
            best = (lam, val, sol)
    lam, val, sol = best
    tuned = copy.deepcopy(model).eval()
    head = tuned.head
    with torch.no_grad():
        w_new = torch.from_numpy(sol[:-1].T.astype(np.float32))
        b_new = torch.from_numpy(sol[-1].astype(np.float32))
        head.quantile_weight += (w_new - head.point.weight).unsqueeze(0)
        head.quantile_bias += (b_new - head.point.bias).unsqueeze(0)
        head.point.weight.copy_(w_new)
        head.point.bias.copy_(b_new)
    return tuned, {"ridge": lam, "val_mse": val, "train_windows": len(x)}


FINE_TUNE_LRS = (1e-4, 3e-4, 1e-3)


def fine_tune(model: torch.nn.Module | None, config, name: str, fraction: float, data_dir: str | None = None, *,
              steps: int = 200, batch_size: int = 64, lrs: tuple[float, ...] = FINE_TUNE_LRS, seed: int = 0,
              val_every: int = 50, threads: int | None = None) -> tuple[torch.nn.Module, dict]:
    """Full fine-tuning of every weight of `model` (or training a fresh TSFM from scratch when
    `model` is None) on `fraction` of `name`'s training windows, AdamW, `steps` mini-batches, at each
    lr of `lrs`, keeping the best state (over lrs and checkpoints every `val_every` steps) on `name`'s
    validation windows. The same data, steps, lr grid and selection for both, so the comparison
    isolates the pretraining. Give `model` with its head already refit to `name` (:func:`fit_head`)
    for LP-FT (Kumar et al. 2022): fine-tuning from a head that fits the target keeps the early,
    large gradients of a mismatched head from distorting the pretrained features."""
    x, y = split_subset(name, "train", config.context, config.horizon, fraction=fraction, data_dir=data_dir)
    vx, vy = split_subset(name, "val", config.context, config.horizon, n=1000, data_dir=data_dir)
    best: tuple[float, dict, int, float] | None = None
    sweep = {}
    for lr in lrs:
        net, val, step = _fine_tune_at(model, config, x, y, vx, vy, steps, batch_size, lr, seed, val_every, threads)
        sweep[str(lr)] = val
        if best is None or val < best[0]:
            best = (val, copy.deepcopy(net.state_dict()), step, lr)
    assert best is not None
    net.load_state_dict(best[1])
    net.eval()
    return net, {"train_windows": len(x), "val_mse": best[0], "best_step": best[2], "lr": best[3],
                 "lr_sweep": sweep}


def _fine_tune_at(model: torch.nn.Module | None, config, x: np.ndarray, y: np.ndarray, vx: np.ndarray,
                  vy: np.ndarray, steps: int, batch_size: int, lr: float, seed: int, val_every: int,
                  threads: int | None) -> tuple[torch.nn.Module, float, int]:
    from coordinator.models.tsfm import TSFM
    from coordinator.pretrain.training import forecast_loss

    torch.manual_seed(seed)
    net = copy.deepcopy(model) if model is not None else TSFM(config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    levels = torch.tensor(config.quantiles, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def val() -> float:
        return float(np.mean((predict(net, vx)[0] - vy) ** 2))

    with torch_threads(threads):
        best_val, best_state, best_step = val(), copy.deepcopy(net.state_dict()), 0
        for step in range(1, steps + 1):
            net.train()
            idx = torch.from_numpy(rng.integers(0, len(xt), size=batch_size))
            point, quantiles = net(xt[idx])
            loss = forecast_loss(point, quantiles, yt[idx], levels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if step % val_every == 0 or step == steps:
                v = val()
                if v < best_val:
                    best_val, best_state, best_step = v, copy.deepcopy(net.state_dict()), step
    net.load_state_dict(best_state)
    net.eval()
    return net, best_val, best_step
