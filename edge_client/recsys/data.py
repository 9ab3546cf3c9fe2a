"""MovieLens-100K as a continual, one-user-per-device stream, plus the ranking metrics.

numpy and the standard library only: a device reads and windows its own interaction log with the
same code the coordinator uses to build the simulation, and computes HR@10/NDCG@10 itself.

Why these choices:

* **Implicit feedback.** Every rating counts as an interaction (the SASRec convention); the rating
  value is kept but not used.
* **Time periods by global timestamp quantiles.** Period 0 (the first ``pretrain_frac`` of all
  interactions in time) is the coordinator's central pretraining set; the rest is cut into
  ``n_periods`` equal-count periods, the continual stream. Quantiles of *global* time make every
  period the same calendar slice for every user, like a real deployment.
* **One held-out item per user and period.** The last interaction of a user in period s ≥ 1 is that
  period's test item and is never a training target. This gives a test set per period that no
  later update trains on, so "performance on period s after the final update" measures forgetting
  without leakage. Its input is the user's whole history before it (the device has that history).
* **Position 0 is never a target**: with no history there is nothing for a sequence model to read.

The data's license forbids redistribution: it is read from the data directory
(``<data_dir>/ml-100k/u.data.gz``) and never copied into the project.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_client.data.datasets import DatasetNotFound, resolve_data_dir

ML100K_PATH = "ml-100k/u.data.gz"
PAD = 0  # item id 0 is padding; ML-100K item ids are 1..1682


@dataclass(frozen=True)
class Interactions:
    """All interactions, sorted by (user, time, file order)."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64, 1..n_items
    rating: np.ndarray  # int64
    ts: np.ndarray  # int64 unix seconds
    n_items: int

    def __len__(self) -> int:
        return len(self.user)


def ml100k_path(data_dir: str | os.PathLike[str] | None = None) -> Path:
    root = resolve_data_dir(data_dir)
    path = None if root is None else root / ML100K_PATH
    if path is None or not path.is_file():
        raise DatasetNotFound(
            f"MovieLens-100K not found ({path or ML100K_PATH}); pass --data-dir pointing at the folder that holds "
            "ml-100k/u.data.gz (its license forbids shipping it with fedge)")
    return path


def load_ml100k(data_dir: str | os.PathLike[str] | None = None) -> Interactions:
    """Read u.data.gz (user, item, rating, unix ts; tab-separated) without copying it anywhere."""
    with gzip.open(ml100k_path(data_dir), "rt") as fh:
        raw = np.loadtxt(fh, dtype=np.int64, ndmin=2)
    return interactions_from_array(raw)


def interactions_from_array(raw: np.ndarray) -> Interactions:
    """(N, 4) user, item, rating, ts -> Interactions (also used by tests on hand-made logs)."""
    raw = np.asarray(raw, dtype=np.int64)
    order = np.lexsort((np.arange(len(raw)), raw[:, 3], raw[:, 0]))
    raw = raw[order]
    return Interactions(raw[:, 0].copy(), raw[:, 1].copy(), raw[:, 2].copy(), raw[:, 3].copy(),
                        int(raw[:, 1].max()))


# ------------------------------------------------------------------------------ continual split


@dataclass
class UserLog:
    """One user's time-ordered history: what lives on that user's device."""

    user: int
    items: np.ndarray  # (n,) int64
    ts: np.ndarray  # (n,) int64
    period: np.ndarray  # (n,) int64, 0 = pretraining period
    is_test: np.ndarray  # (n,) bool, held-out last item of a period ≥ 1

    def train_positions(self, period: int) -> np.ndarray:
        """Positions j that are training targets of `period` (history items[:j] is the input)."""
        pos = np.flatnonzero((self.period == period) & ~self.is_test)
        return pos[pos > 0]

    def period_positions(self, period: int) -> np.ndarray:
        """Every position j > 0 of `period` (its training targets and its held-out item): what a prequential
        evaluation scores before the device trains on the period."""
        pos = np.flatnonzero(self.period == period)
        return pos[pos > 0]

    def test_position(self, period: int) -> int | None:
        pos = np.flatnonzero(self.is_test & (self.period == period))
        return int(pos[0]) if len(pos) else None

    def active(self, period: int) -> bool:
        return bool(np.any(self.period == period))


@dataclass
class ContinualSplit:
    """Period boundaries and per-user logs. Periods: 0 = central pretraining, 1..n_periods continual."""

    boundaries: np.ndarray  # (n_periods,) unix ts where periods 1..n_periods start
    logs: dict[int, UserLog]
    n_items: int
    n_periods: int
    skipped: dict[str, int] = field(default_factory=dict)

    def users(self, period: int) -> list[int]:
        return [u for u, log in self.logs.items() if log.active(period)]


def period_boundaries(ts: np.ndarray, n_periods: int, pretrain_frac: float) -> np.ndarray:
    """Start timestamps of periods 1..n_periods: global-time quantiles, pretrain_frac for period 0."""
    qs = pretrain_frac + (1.0 - pretrain_frac) * np.arange(n_periods) / n_periods
    return np.quantile(ts, qs, method="lower").astype(np.int64)


def continual_split(
    data: Interactions, n_periods: int = 4, pretrain_frac: float = 0.5, users: int | None = None, seed: int = 0
) -> ContinualSplit:
    """Cut the stream into periods and mark the held-out item of every user and period ≥ 1.

    `users` keeps a seeded random subset (tests, quick runs). A test item needs at least one earlier
    interaction; users whose period has a single interaction and no history are counted in `skipped`.
    """
    bounds = period_boundaries(data.ts, n_periods, pretrain_frac)
    all_users = np.unique(data.user)
    if users is not None and users < len(all_users):
        all_users = np.sort(np.random.default_rng(seed).choice(all_users, users, replace=False))
    keep = set(all_users.tolist())
    starts = np.flatnonzero(np.r_[True, data.user[1:] != data.user[:-1]])
    ends = np.r_[starts[1:], len(data)]
    logs: dict[int, UserLog] = {}
    no_history = 0
    for a, b in zip(starts, ends, strict=True):
        uid = int(data.user[a])
        if uid not in keep:
            continue
        ts = data.ts[a:b]
        period = np.searchsorted(bounds, ts, side="right").astype(np.int64)
        is_test = np.zeros(b - a, dtype=bool)
        for p in range(1, n_periods + 1):
            pos = np.flatnonzero(period == p)
            if len(pos) and pos[-1] > 0:
                is_test[pos[-1]] = True
            elif len(pos):
                no_history += 1
        logs[uid] = UserLog(uid, data.item[a:b].copy(), ts.copy(), period, is_test)
    return ContinualSplit(bounds, logs, data.n_items, n_periods, {"period_without_history": no_history})


# ------------------------------------------------------------------------------ sequence input


def prefix_batch(items: np.ndarray, positions: np.ndarray, max_len: int) -> np.ndarray:
    """(N, max_len) int64: for each position j, items[j-max_len:j] left-padded with PAD.
    The encoder's last position reads this and represents "what comes after items[:j]"."""
    out = np.full((len(positions), max_len), PAD, dtype=np.int64)
    for row, j in enumerate(np.asarray(positions, dtype=np.int64)):
        seq = items[max(0, j - max_len) : j]
        if len(seq):
            out[row, max_len - len(seq) :] = seq
    return out


def training_windows(
    items: np.ndarray, target_mask: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """SASRec training windows of one sequence: inputs (W, L) and targets (W, L), PAD where a
    position is not a training target. Windows are cut from the end of the sequence backwards,
    each predicting up to max_len consecutive targets from the tokens just before them; windows
    without any target are dropped."""
    n = len(items)
    xs, ys = [], []
    end = n
    while end > 1:
        start = max(1, end - max_len)
        tgt = np.where(target_mask[start:end], items[start:end], PAD)
        if np.any(tgt != PAD):
            x = np.full(max_len, PAD, np.int64)
            y = np.full(max_len, PAD, np.int64)
            x[max_len - (end - start) :] = items[start - 1 : end - 1]
            y[max_len - (end - start) :] = tgt
            xs.append(x)
            ys.append(y)
        end = start
    if not xs:
        return np.zeros((0, max_len), np.int64), np.zeros((0, max_len), np.int64)
    return np.stack(xs), np.stack(ys)


# ------------------------------------------------------------------------------ metrics


def ranks(scores: np.ndarray, targets: np.ndarray, exclude: list[np.ndarray] | None = None) -> np.ndarray:
    """1-based rank of each target in full ranking over all items.

    scores: (N, n_items + 1), column PAD is ignored. `exclude[i]` are items removed from the
    candidates of row i (we exclude the user's history before the target: re-consumption is not
    the task here, and every ML-100K item is rated at most once per user). Ties count against
    the target (rank = 1 + #items scoring ≥ it, other than itself), so a constant scorer gets no
    lucky hits.
    """
    s = np.array(scores, dtype=np.float64, copy=True)
    s[:, PAD] = -np.inf
    if exclude is not None:
        for i, ex in enumerate(exclude):
            ex = ex[ex != targets[i]]
            s[i, ex] = -np.inf
    t = s[np.arange(len(s)), targets]
    return np.sum(s >= t[:, None], axis=1)  # the target itself counts once: rank 1 = nothing ties or beats it


def prequential_totals(rank: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(hits@k, sum of NDCG@k) of some ranks: sums, so that what devices report adds up across devices."""
    rank = np.asarray(rank, np.float64)
    hit = rank <= k
    return float(hit.sum()), float(np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0).sum())


def hit_ndcg(rank: np.ndarray, k: int = 10) -> tuple[float, float]:
    """HR@k = mean 1[rank ≤ k]; NDCG@k = mean 1/log2(rank+1) if rank ≤ k (one relevant item)."""
    rank = np.asarray(rank, dtype=np.float64)
    if len(rank) == 0:
        return float("nan"), float("nan")
    hit = rank <= k
    return float(hit.mean()), float(np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0).mean())
