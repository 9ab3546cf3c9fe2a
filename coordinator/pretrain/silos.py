"""Domain silos for federated TSFM pretraining: each domain is one client that holds only its own
training windows, the way separate data owners (a utility, a bank, a weather service) would.

A silo's windows carry a *sub-dataset id* (which of the silo's datasets a window comes from): the
intra-domain heterogeneity that the bi-level strategy's domain classifier works on. Dataset, not
channel: a channel's identity (oil temperature vs load, one household vs another) is what the
forecast needs, so invariance to it fights the task; the paper's sub-datasets are datasets. One
domain is held out of pretraining so that zero-shot and few-shot transfer can be measured on data
no client ever saw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from coordinator.pretrain.windows import WindowPool, scaled_series, split_windows, window_starts
from edge_client.data.datasets import DatasetNotFound

DOMAIN_SILOS: dict[str, tuple[str, ...]] = {
    "energy": ("etth1", "electricity"),
    "finance": ("exchange_rate",),
    "air_quality": ("pollution",),
    "traffic": ("traffic",),
    "weather": ("temperature",),
    "nature": ("sunspots",),
}
DEFAULT_HOLDOUT = ("weather",)


@dataclass
class Silo:
    """One client: its domain, its datasets and an index over its training windows."""

    domain: str
    datasets: tuple[str, ...]
    pool: WindowPool
    sub_ids: np.ndarray  # (N,) int64, index into `datasets` of each window's dataset
    n_sub: int
    cdf: np.ndarray | None = None  # cumulative sampling probabilities of the windows; None: every window alike

    @property
    def n_samples(self) -> int:
        return len(self.pool.starts)

    def sample(self, rng: np.random.Generator, batch_size: int, context: int) -> tuple[torch.Tensor, ...]:
        """A random mini-batch (x, y, sub-dataset id); sampling with replacement keeps a step's
        cost independent of the silo size and makes the stream a pure function of `rng`."""
        if self.cdf is None:
            idx = rng.integers(0, self.n_samples, size=batch_size)
        else:
            idx = np.minimum(np.searchsorted(self.cdf, rng.random(batch_size), side="right"), self.n_samples - 1)
        x, y = self.pool.batch(idx, context)
        return x, y, torch.from_numpy(self.sub_ids[idx])


def _dataset_loads(name: str, data_dir: str | os.PathLike[str] | None) -> bool:
    try:
        scaled_series(name, data_dir)
    except (DatasetNotFound, FileNotFoundError, KeyError):
        return False
    return True


def available_domains(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Domains whose every dataset can be read here ("use every real dataset that fits")."""
    return [d for d, names in DOMAIN_SILOS.items() if all(_dataset_loads(n, data_dir) for n in names)]


def build_silo(
    domain: str, span: int, *, data_dir: str | os.PathLike[str] | None = None,
    window_stride: int = 1, train_rows: int | None = None,
) -> Silo:
    """Training windows (targets inside the train split) of all channels of a domain's datasets."""
    chunks, starts, subs, offset = [], [], [], 0
    for sub, name in enumerate(DOMAIN_SILOS[domain]):
        scaled, (train_end, _, _) = scaled_series(name, data_dir)
        if train_rows is not None:
            train_end = min(train_end, train_rows)
        for channel in scaled.T:
            part = np.ascontiguousarray(channel[:train_end])
            s = window_starts(part, span, window_stride, len(part))
            starts.append(s + offset)
            subs.append(np.full(len(s), sub, np.int64))
            chunks.append(part)
            offset += len(part)
    pool = WindowPool(np.concatenate(chunks), np.concatenate(starts), span)
    if len(pool.starts) == 0:
        raise ValueError(f"domain {domain}: no training window of {span} rows")
    return Silo(domain, DOMAIN_SILOS[domain], pool, np.concatenate(subs), len(DOMAIN_SILOS[domain]))


def build_silos(
    domains: tuple[str, ...] | list[str], span: int, *, data_dir: str | os.PathLike[str] | None = None,
    window_stride: int = 1, train_rows: int | None = None,
) -> list[Silo]:
    return [build_silo(d, span, data_dir=data_dir, window_stride=window_stride, train_rows=train_rows)
            for d in domains]


def merge_silos(silos: list[Silo], balanced: bool = False) -> Silo:
    """All silos' windows in one pool: the centralized mixed-batch baseline's "client". `balanced`: every silo
    is drawn equally often (a window of silo k with probability 1 / (K n_k)) instead of by its windows."""
    flats, starts, subs, offset, sub = [], [], [], 0, 0
    for s in silos:
        flats.append(s.pool.flat)
        starts.append(s.pool.starts + offset)
        subs.append(s.sub_ids + sub)
        offset += len(s.pool.flat)
        sub += s.n_sub
    pool = WindowPool(np.concatenate(flats), np.concatenate(starts), silos[0].pool.span)
    names = tuple(n for s in silos for n in s.datasets)
    cdf = None
    if balanced:
        probs = np.concatenate([np.full(s.n_samples, 1.0 / (len(silos) * s.n_samples)) for s in silos])
        cdf = np.cumsum(probs)
        cdf /= cdf[-1]
    return Silo("all", names, pool, np.concatenate(subs), sub, cdf)


def evenly(n: int, k: int) -> np.ndarray:
    """k evenly spaced indices out of n (all when k >= n): a deterministic, time-spread subsample."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def split_sample(
    name: str, split: str, context: int, horizon: int, max_windows: int,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_windows` evenly spaced windows of a split (all channels). The stride is widened
    first so large test splits (pollution, traffic) are never materialised in full."""
    scaled, (train_end, val_end, test_end) = scaled_series(name, data_dir)
    rows = {"train": train_end, "val": val_end - train_end, "test": test_end - val_end}[split]
    stride = max(1, (rows * scaled.shape[1]) // (4 * max_windows))
    x, y = split_windows(name, split, context, horizon, stride, data_dir)
    keep = evenly(len(x), max_windows)
    return x[keep], y[keep]
