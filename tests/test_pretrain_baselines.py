"""The AutoETS baseline follows the daily cycle of an hourly series instead of forecasting a flat
line: left to AICc ("ZZZ"), statsforecast drops the seasonal component on persistent load-like
series (the first benchmark run did so on most ETTh1 windows)."""

from __future__ import annotations

import numpy as np

from coordinator.pretrain.evaluate import autoets_forecast
from edge_client.learning.windows import mse


def test_autoets_keeps_the_daily_cycle_of_a_persistent_hourly_series() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(512 + 96)
    noise = np.zeros(len(t))
    for i in range(1, len(t)):  # AR(1), phi 0.95: the slow level drift of a load series
        noise[i] = 0.95 * noise[i - 1] + 0.3 * rng.standard_normal()
    cycle = np.sin(2 * np.pi * t / 24)
    series = cycle + noise
    x, y = series[:512].astype(np.float32), series[512:]
    point, quantiles = autoets_forecast(x, 96, 24)
    assert point.shape == (96,) and quantiles.shape == (3, 96)
    assert np.all(quantiles[0] <= quantiles[2])
    assert np.corrcoef(point, cycle[512:])[0, 1] > 0.9  # a flat forecast has no correlation at all
    assert mse(point, y) < mse(np.full(96, x[-1]), y)  # and it beats the naive (last value) forecast
