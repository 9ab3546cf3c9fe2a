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


def test_seasonal_window_average_is_statsforecasts_and_averages_the_noise_out() -> None:
    """The vectorised baseline equals statsforecast's SeasonalWindowAverage window by window (7 seasons, and
    fewer when the context holds fewer), and on a noisy fixed daily profile it beats seasonal naive, whose
    forecast repeats one day's noise."""
    from statsforecast.models import SeasonalWindowAverage

    from edge_client.learning.windows import seasonal_naive, seasonal_window_average

    rng = np.random.default_rng(1)
    profile = np.sin(2 * np.pi * np.arange(24) / 24)
    series = np.tile(profile, 30) + 0.5 * rng.standard_normal(24 * 30)
    x = np.stack([series[i: i + 512] for i in range(0, 96, 7)])
    y = np.stack([series[i + 512: i + 608] for i in range(0, 96, 7)])
    ours = seasonal_window_average(x, 96, 24, 7)
    for row, ctx in zip(ours, x, strict=True):
        np.testing.assert_allclose(row, SeasonalWindowAverage(24, 7).forecast(ctx.astype(np.float64), 96)["mean"],
                                   rtol=1e-5, atol=1e-6)
    short = seasonal_window_average(x[:, -60:], 30, 24, 7)  # 2 whole seasons in 60 values
    np.testing.assert_allclose(short[0], SeasonalWindowAverage(24, 2).forecast(x[0, -48:].astype(np.float64),
                                                                               30)["mean"], rtol=1e-5, atol=1e-6)
    assert mse(ours, y) < 0.6 * mse(seasonal_naive(x, 96, 24), y)
