"""The synthetic silo: KernelSynth series and TSMixup mixtures, in the manner of Chronos
(Ansari et al., "Chronos: Learning the Language of Time Series", 2024, §4).

Why: the real corpus here is seven public series. A small TSFM pretrained on them alone sees few
kinds of shape (daily cycles, level shifts, one 11-year cycle); Chronos showed that Gaussian-process
samples and convex mixtures of real series widen that set cheaply and improve zero-shot transfer.

* **KernelSynth** -- a GP prior sample whose kernel is a random composition (``+`` or ``*``) of
  1..`max_kernels` kernels drawn with replacement from a bank of scikit-learn kernels: periodic
  (``ExpSineSquared``, periods of hourly/daily/weekly/monthly/yearly data), ``RBF``,
  ``RationalQuadratic``, linear (``DotProduct``), ``WhiteKernel`` and ``ConstantKernel``. The
  inputs are ``linspace(0, 1, length)``, so a period of ``p`` steps is ``p / length``.
* **TSMixup** -- a convex combination (Dirichlet(α) weights) of 1..`mixup_max_series` windows of
  real training series, each first divided by its mean absolute value (Chronos' mean scaling).
  Sources are the *training splits* of the training domains only, never a held-out domain.

Each synthetic series is `length` steps long; training windows start every `window_stride` steps
inside it. How many series are made follows from `share`: the synthetic silo holds `share` of all
training windows (real + synthetic), so in centralized mixed batches a window is synthetic with
probability `share`, and FedAvg weighs the silo by the same share. Everything is a pure function of
the settings and the real corpus (seeded numpy generator), cached on disk as float32 ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KERNELSYNTH, TSMIXUP = 0, 1  # sub-dataset ids inside the synthetic silo
SYNTHETIC_DOMAIN = "synthetic"
# GP sampling is slow (~0.3 s a series): generated series are kept here and reused by every run.
SYNTHETIC_CACHE = Path(os.environ.get("FEDGE_CACHE", Path.home() / ".cache" / "fedge")) / "synthetic"
# Periods (in steps) of the periodic kernels: hourly (day, 2 days, week, 2 weeks), daily (week, month,
# quarter, year), monthly (year, 11-year solar cycle ~132), minute-ish short cycles.
PERIODS = (4, 6, 7, 12, 14, 24, 30, 48, 52, 90, 96, 132, 168, 336, 365)


@dataclass(frozen=True)
class SyntheticSettings:
    """Everything that determines the synthetic silo (part of the run settings and of its cache key)."""

    share: float = 0.2  # fraction of all training windows that are synthetic; 0 = real corpus only
    kernelsynth_fraction: float = 0.5  # of the synthetic series: KernelSynth, the rest TSMixup
    length: int = 1024
    window_stride: int = 8
    max_kernels: int = 5
    mixup_max_series: int = 3
    mixup_alpha: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"synthetic share must be in [0, 1), not {self.share}")
        if not 0.0 <= self.kernelsynth_fraction <= 1.0:
            raise ValueError("kernelsynth_fraction must be in [0, 1]")
        if min(self.length, self.window_stride, self.max_kernels, self.mixup_max_series) < 1:
            raise ValueError("length, window_stride, max_kernels and mixup_max_series must be positive")


def kernel_bank(length: int) -> list:
    """The scikit-learn kernels KernelSynth composes (Chronos' bank, periods scaled to [0, 1] inputs)."""
    from sklearn.gaussian_process.kernels import (
        RBF,
        ConstantKernel,
        DotProduct,
        ExpSineSquared,
        RationalQuadratic,
        WhiteKernel,
    )

    bank: list = [ExpSineSquared(length_scale=1.0, periodicity=p / length) for p in PERIODS]
    bank += [DotProduct(sigma_0=s) for s in (0.0, 1.0, 10.0)]
    bank += [RBF(length_scale=s) for s in (0.1, 1.0, 10.0)]
    bank += [RationalQuadratic(alpha=a) for a in (0.1, 1.0, 10.0)]
    bank += [WhiteKernel(noise_level=n) for n in (0.1, 1.0)]
    bank += [ConstantKernel()]
    return bank


def random_kernel(rng: np.random.Generator, bank: list, max_kernels: int):
    """1..max_kernels kernels from the bank (with replacement), joined left to right by a random + or *."""
    picks = [bank[i] for i in rng.integers(0, len(bank), size=int(rng.integers(1, max_kernels + 1)))]
    kernel = picks[0]
    for k in picks[1:]:
        kernel = kernel + k if rng.random() < 0.5 else kernel * k
    return kernel


def gp_sample(kernel, length: int, rng: np.random.Generator) -> np.ndarray:
    """One draw from GP(0, kernel) on linspace(0, 1, length). Cholesky with growing jitter; the
    eigen-decomposition when the covariance is too ill-conditioned even then (e.g. pure periodic)."""
    x = np.linspace(0.0, 1.0, length)[:, None]
    cov = np.asarray(kernel(x), np.float64)
    z = rng.standard_normal(length)
    for jitter in (1e-6, 1e-4, 1e-2):
        try:
            return np.linalg.cholesky(cov + jitter * np.eye(length)) @ z
        except np.linalg.LinAlgError:
            continue
    w, v = np.linalg.eigh(cov)
    return v @ (np.sqrt(np.clip(w, 0.0, None)) * z)


def kernelsynth(n: int, settings: SyntheticSettings, start: int = 0) -> np.ndarray:
    """(n, length) KernelSynth series number start..start+n-1. Series i is drawn from its own
    generator seeded by (seed, i), so any prefix of the sequence is the same whatever n is (the
    cache extends instead of regenerating); a rare non-finite or constant draw is redrawn."""
    bank = kernel_bank(settings.length)
    out = np.empty((n, settings.length), np.float32)
    for i in range(n):
        rng = np.random.default_rng([settings.seed, 1, start + i])
        while True:
            y = gp_sample(random_kernel(rng, bank, settings.max_kernels), settings.length, rng)
            if np.all(np.isfinite(y)) and np.std(y) > 1e-6:
                out[i] = y
                break
    return out


def tsmixup(n: int, sources: list[np.ndarray], settings: SyntheticSettings, rng: np.random.Generator) -> np.ndarray:
    """(n, length) convex mixtures of mean-scaled random windows of the `sources` (1-D training
    series); each source series is equally likely, whatever its length."""
    usable = [s for s in sources if _finite_starts(s, settings.length).size]
    if not usable:
        raise ValueError(f"TSMixup: no real training series has a gap-free stretch of {settings.length} steps")
    starts = [_finite_starts(s, settings.length) for s in usable]
    out = np.empty((n, settings.length), np.float32)
    for i in range(n):
        k = int(rng.integers(1, settings.mixup_max_series + 1))
        weights = rng.dirichlet(np.full(k, settings.mixup_alpha))
        mix = np.zeros(settings.length)
        for w in weights:
            j = int(rng.integers(len(usable)))
            s = int(rng.choice(starts[j]))
            piece = usable[j][s: s + settings.length].astype(np.float64)
            mix += w * piece / (np.mean(np.abs(piece)) + 1e-8)
        out[i] = mix
    return out


def _finite_starts(x: np.ndarray, length: int) -> np.ndarray:
    from coordinator.pretrain.windows import window_starts

    return window_starts(x, length, 1, len(x))


def series_count(settings: SyntheticSettings, n_real_windows: int, span: int) -> int:
    """Series needed so the synthetic windows are `share` of real + synthetic."""
    if settings.share <= 0:
        return 0
    per_series = (settings.length - span) // settings.window_stride + 1
    if per_series < 1:
        raise ValueError(f"synthetic series of {settings.length} steps hold no window of {span}")
    wanted = settings.share / (1.0 - settings.share) * n_real_windows
    return max(1, math.ceil(wanted / per_series))


def training_sources(datasets: tuple[str, ...], data_dir: str | os.PathLike[str] | None) -> list[np.ndarray]:
    """Every channel of every dataset's training split, standardised like the silos (TSMixup input)."""
    from coordinator.pretrain.windows import scaled_series

    out = []
    for name in datasets:
        scaled, (train_end, _, _) = scaled_series(name, data_dir)
        out += [np.ascontiguousarray(c[:train_end]) for c in scaled.T]
    return out


def _cached(path: Path | None) -> dict[str, np.ndarray] | None:
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable synthetic cache %s: %s", path, exc)
        return None


def _store(path: Path | None, **arrays: np.ndarray) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _key(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def generate(settings: SyntheticSettings, n_series: int, datasets: tuple[str, ...],
             data_dir: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(series (n, length) float32, kind (n,) int64: KERNELSYNTH or TSMIXUP). KernelSynth series do
    not depend on the data, so one growing cache file serves every run (GP sampling is the slow
    part, ~0.3 s a series); TSMixup series are cached by settings, count and source datasets."""
    n_ks = round(settings.kernelsynth_fraction * n_series)
    n_mix = n_series - n_ks
    root = Path(cache_dir) if cache_dir else None
    ks_path = root / f"kernelsynth-{_key({'l': settings.length, 'k': settings.max_kernels, 's': settings.seed})}.npz" \
        if root else None
    ks = (_cached(ks_path) or {}).get("series", np.zeros((0, settings.length), np.float32))
    if len(ks) < n_ks:
        ks = np.concatenate([ks, kernelsynth(n_ks - len(ks), settings, start=len(ks))])
        _store(ks_path, series=ks)
    mix_path = root / f"tsmixup-{_key({'s': asdict(settings), 'n': n_mix, 'd': sorted(datasets)})}.npz" \
        if root else None
    mix = (_cached(mix_path) or {}).get("series")
    if mix is None:
        rng = np.random.default_rng([settings.seed, 2])
        mix = tsmixup(n_mix, training_sources(datasets, data_dir), settings, rng) if n_mix else \
            np.zeros((0, settings.length), np.float32)
        _store(mix_path, series=mix)
    kind = np.array([KERNELSYNTH] * n_ks + [TSMIXUP] * n_mix, np.int64)
    return np.concatenate([ks[:n_ks], mix]).astype(np.float32), kind


def synthetic_silo(settings: SyntheticSettings, real_silos: list, span: int,
                   data_dir: str | os.PathLike[str] | None = None,
                   cache_dir: str | os.PathLike[str] | None = None):
    """The synthetic client: KernelSynth + TSMixup series (mixing only the `real_silos`' datasets),
    sized to `share` of all windows; its sub-dataset ids are KERNELSYNTH / TSMIXUP. None at share 0."""
    from coordinator.pretrain.silos import Silo
    from coordinator.pretrain.windows import WindowPool

    n_real = sum(s.n_samples for s in real_silos)
    n = series_count(settings, n_real, span)
    if n == 0:
        return None
    datasets = tuple(name for s in real_silos for name in s.datasets)
    series, kind = generate(settings, n, datasets, data_dir, cache_dir)
    # Each series standardised on its own (the real silos are standardised per channel too).
    series = (series - series.mean(1, keepdims=True)) / (series.std(1, keepdims=True) + 1e-6)
    local = np.arange(0, settings.length - span + 1, settings.window_stride)
    starts = (np.arange(n)[:, None] * settings.length + local[None, :]).ravel()
    subs = np.repeat(kind, len(local))
    pool = WindowPool(series.astype(np.float32).ravel(), starts.astype(np.int64), span)
    return Silo(SYNTHETIC_DOMAIN, ("kernelsynth", "tsmixup"), pool, subs, 2)
