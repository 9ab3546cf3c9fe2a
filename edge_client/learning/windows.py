"""Windowing, scaling, metrics and the seasonal-naive baseline, shared by device and coordinator.

numpy only. Conventions follow the long-horizon forecasting literature (Informer/PatchTST):
a StandardScaler fit on the training part only, metrics on scaled values, sliding windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ETT's 12/4/4-month split in rows (30-day months, hourly): train [0, 8640), val [8640, 11520),
# test [11520, 14400); val/test windows may start `context` rows before their boundary.
ETT_TRAIN_END = 12 * 30 * 24
ETT_VAL_END = ETT_TRAIN_END + 4 * 30 * 24
ETT_TEST_END = ETT_VAL_END + 4 * 30 * 24


@dataclass(frozen=True)
class Scaler:
    """Per-channel standardisation, fit on training rows only (NaN ignored)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Scaler:
        x = np.asarray(x, dtype=np.float64)
        mean = np.nanmean(x, axis=0)
        std = np.nanstd(x, axis=0)
        return cls(mean, np.where(std > 1e-8, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean


def make_windows(
    series: np.ndarray, context: int, horizon: int, stride: int = 1, start: int = 0, stop: int | None = None,
    *, with_index: bool = False,
) -> tuple[np.ndarray, ...]:
    """Sliding (context, horizon) windows of a 1-D series whose targets fall in [start, stop).

    Returns X (N, context) and Y (N, horizon) as float32. Windows that contain NaN anywhere
    are dropped: the backbone needs complete contexts and metrics need complete targets.
    ``with_index`` also returns each kept window's first target index (N,): rule guards need the
    seasonal phase of a forecast.
    """
    series = np.asarray(series, dtype=np.float32)
    stop = len(series) if stop is None else min(stop, len(series))
    first_target = max(start, context)
    starts = np.arange(first_target - context, stop - horizon - context + 1, stride)
    if len(starts) == 0:
        empty = (np.zeros((0, context), np.float32), np.zeros((0, horizon), np.float32))
        return (*empty, np.zeros(0, np.int64)) if with_index else empty
    idx = starts[:, None] + np.arange(context + horizon)[None, :]
    win = series[idx]
    keep = np.isfinite(win).all(axis=1)
    win = win[keep]
    out = np.ascontiguousarray(win[:, :context]), np.ascontiguousarray(win[:, context:])
    return (*out, starts[keep] + context) if with_index else out


def seasonal_naive(x: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """Repeat the last `season` values of each context over the horizon (season 1 = naive): the seasonal window
    average of one season."""
    return seasonal_window_average(x, horizon, season, 1)


def seasonal_window_average(x: np.ndarray, horizon: int, season: int, window: int) -> np.ndarray:
    """Each position of the season forecast by its mean over the last `window` seasons (as many as the context
    holds): seasonal naive with its noise averaged out (statsforecast's SeasonalWindowAverage, vectorised)."""
    x = np.asarray(x)
    season = max(1, min(season, x.shape[-1]))
    window = max(1, min(window, x.shape[-1] // season))
    profile = x[..., x.shape[-1] - window * season:].reshape(*x.shape[:-1], window, season).mean(axis=-2)
    return np.tile(profile, -(-horizon // season))[..., :horizon]


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((np.asarray(pred, np.float64) - target) ** 2))


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - target)))


def pinball(pred_q: np.ndarray, target: np.ndarray, quantiles: np.ndarray) -> float:
    """Mean pinball loss; pred_q is (Q, N, H) for quantile levels `quantiles` (Q,)."""
    q = np.asarray(quantiles, np.float64)[:, None, None]
    diff = target[None] - pred_q
    return float(np.mean(np.maximum(q * diff, (q - 1.0) * diff)))


def crps_from_quantiles(pred_q: np.ndarray, target: np.ndarray, quantiles: np.ndarray) -> float:
    """CRPS approximated by twice the mean pinball loss over the quantile grid, scaled by
    sum |y| (GluonTS' weighted quantile loss)."""
    q = np.asarray(quantiles, np.float64)[:, None, None]
    diff = target[None] - pred_q
    loss = np.maximum(q * diff, (q - 1.0) * diff).sum(axis=(1, 2))
    return float(2.0 * loss.mean() / max(np.abs(target).sum(), 1e-12))
