"""Sensor distortions of forecast contexts, and the missing-value handling every device needs.

Why: a device's history is not the clean benchmark series the backbone was pretrained on. Sensors
add noise, emit spikes, drop readings, drift out of calibration or freeze. Meta-FC (ALGORITHMS.md
§8) trains on a pool of distortions and evaluates on one held out of training, so the model is
measured on a fault it never saw. Every function here is seeded (a ``numpy.random.Generator``) so
every method in a benchmark sees the very same corrupted inputs.

Contexts are (N, L) arrays in the device's scaled units; amplitudes are relative to each window's
own standard deviation, so a distortion is equally strong on a flat and on a volatile window.
``missing`` writes NaN: the backbone cannot take NaN, so :func:`fill_missing` forward-fills
(what a sensor gateway reports when a reading is lost: the last value) and returns the missing
rate, which the gate in :mod:`edge_client.learning.personalize` uses as a reliability cue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DISTORTIONS: tuple[str, ...] = ("noise", "spikes", "missing", "drift", "stuck")
HELD_OUT_DEFAULT = "stuck"  # a frozen sensor: the fault least like the other four (no added energy)


def _window_std(x: np.ndarray) -> np.ndarray:
    std = np.nanstd(x, axis=1, keepdims=True)
    return np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, intensity: float = 1.0) -> np.ndarray:
    """Additive white noise, σ = 0.1·std·intensity (cheap sensor / quantisation noise)."""
    return x + rng.normal(0.0, 1.0, x.shape) * 0.1 * intensity * _window_std(x)


def spikes(x: np.ndarray, rng: np.random.Generator, intensity: float = 1.0) -> np.ndarray:
    """Isolated outliers: 1 % of steps (at least one per window) jump by ±(3–5)·std·intensity."""
    n, length = x.shape
    hit = rng.random(x.shape) < 0.01
    hit[np.arange(n), rng.integers(0, length, n)] = True
    amp = rng.uniform(3.0, 5.0, x.shape) * rng.choice([-1.0, 1.0], x.shape) * intensity
    return np.where(hit, x + amp * _window_std(x), x)


def missing(x: np.ndarray, rng: np.random.Generator, intensity: float = 1.0) -> np.ndarray:
    """Dropped readings: 10–30 %·intensity of the steps become NaN (fill with :func:`fill_missing`)."""
    rate = np.clip(rng.uniform(0.1, 0.3, (len(x), 1)) * intensity, 0.0, 0.95)
    return np.where(rng.random(x.shape) < rate, np.nan, x)


def drift(x: np.ndarray, rng: np.random.Generator, intensity: float = 1.0) -> np.ndarray:
    """Calibration drift: a linear ramp from 0 to ±(0.25–0.5)·std·intensity at the newest step."""
    n, length = x.shape
    end = rng.uniform(0.25, 0.5, (n, 1)) * rng.choice([-1.0, 1.0], (n, 1)) * intensity
    return x + end * np.linspace(0.0, 1.0, length)[None, :] * _window_std(x)


def stuck(x: np.ndarray, rng: np.random.Generator, intensity: float = 1.0) -> np.ndarray:
    """Frozen sensor: a random 10–30 %·intensity segment repeats the value read just before it."""
    out = x.copy()
    n, length = x.shape
    seg = np.clip((rng.uniform(0.1, 0.3, n) * intensity * length).astype(int), 1, length - 1)
    start = rng.integers(1, length - seg + 1)
    for i in range(n):
        out[i, start[i] : start[i] + seg[i]] = x[i, start[i] - 1]
    return out


_FUNCS: dict[str, Callable[[np.ndarray, np.random.Generator, float], np.ndarray]] = {
    "noise": gaussian_noise,
    "spikes": spikes,
    "missing": missing,
    "drift": drift,
    "stuck": stuck,
}


def distort(x: np.ndarray, kind: str, seed: int | np.random.Generator = 0, intensity: float = 1.0) -> np.ndarray:
    """One distortion of a batch of contexts (N, L) → (N, L) float32; may contain NaN for ``missing``."""
    if kind not in _FUNCS:
        raise ValueError(f"unknown distortion {kind!r}; choose from {', '.join(DISTORTIONS)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    return _FUNCS[kind](x, rng, intensity).astype(np.float32)


def fill_missing(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward-fill NaN/Inf along each row (leading gaps back-filled, all-missing rows → 0).

    Returns the filled (N, L) float32 array and the per-row missing rate (N,). Never raises on NaN:
    a device with gaps must still forecast.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    bad = ~np.isfinite(x)
    rate = bad.mean(axis=1) if x.shape[1] else np.zeros(len(x))
    if not bad.any():
        return x.astype(np.float32), rate
    n, length = x.shape
    idx = np.where(bad, 0, np.arange(length)[None, :])
    np.maximum.accumulate(idx, axis=1, out=idx)
    filled = x[np.arange(n)[:, None], idx]
    first_ok = np.argmax(~bad, axis=1)
    lead = np.isnan(filled) | ~np.isfinite(filled)
    first_val = np.where(bad.all(axis=1), 0.0, x[np.arange(n), first_ok])
    filled = np.where(lead, first_val[:, None], filled)
    return filled.astype(np.float32), rate


def training_distortions(held_out: str | None = HELD_OUT_DEFAULT) -> tuple[str, ...]:
    """The distortions a device may train on: all but the held-out one (Meta-FC's unseen fault)."""
    if held_out is not None and held_out not in DISTORTIONS:
        raise ValueError(f"unknown held-out distortion {held_out!r}")
    return tuple(d for d in DISTORTIONS if d != held_out)


def distorted_views(
    x: np.ndarray, kinds: Sequence[str], seed: int = 0, intensity: float = 1.0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each distortion of `x`, filled and ready for the backbone: kind → (filled contexts, missing rate).
    Each kind gets its own child seed, so adding a kind does not change the others."""
    seeds = np.random.SeedSequence(seed).spawn(len(DISTORTIONS))
    out = {}
    for kind in kinds:
        rng = np.random.default_rng(seeds[DISTORTIONS.index(kind)])
        out[kind] = fill_missing(distort(x, kind, rng, intensity))
    return out
