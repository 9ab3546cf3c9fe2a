"""Coordinator-side view of the recommendation data.

The loader, the continual split and the metrics live in :mod:`edge_client.recsys.data` (numpy only)
because a device windows its own log and scores itself with the same code; this module re-exports
them and adds what only the coordinator computes from its own (period-0) data.
"""

from __future__ import annotations

import numpy as np

from edge_client.recsys.data import (
    PAD,
    ContinualSplit,
    Interactions,
    UserLog,
    continual_split,
    hit_ndcg,
    load_ml100k,
    prefix_batch,
    ranks,
    training_windows,
)

__all__ = [
    "PAD",
    "ContinualSplit",
    "Interactions",
    "UserLog",
    "continual_split",
    "hit_ndcg",
    "load_ml100k",
    "median_session_gap_days",
    "prefix_batch",
    "ranks",
    "training_windows",
]


def median_session_gap_days(split: ContinualSplit, period: int = 0, session_break_s: int = 3600) -> float:
    """τ of FCUCR's w(Δt) = exp(−Δt/τ): the median gap between a user's sessions (interactions more
    than `session_break_s` apart start a new session), measured on the coordinator's own period-0
    data, so the decay is "one typical break between sessions" rather than a magic number."""
    gaps = []
    for log in split.logs.values():
        ts = log.ts[log.period == period]
        d = np.diff(ts)
        gaps.extend(d[d > session_break_s].tolist())
    return float(np.median(gaps) / 86400.0) if gaps else 7.0


def returning_gaps_days(split: ContinualSplit, users: set[str] | None = None) -> np.ndarray:
    """The gaps FCUCR's time-aware distillation actually meets: for every user active in a period t ≥ 2 and
    in an earlier continual period, the days between their last interaction of that earlier period (when
    the device's snapshot was trained) and their first interaction of period t. `users` restricts it to
    some users (the validation users, so that τ is chosen without looking at test users)."""
    gaps = []
    for uid, log in split.logs.items():
        if users is not None and str(uid) not in users:
            continue
        last_ts = None
        for p in range(1, split.n_periods + 1):
            sel = log.period == p
            if not sel.any():
                continue
            if last_ts is not None:
                gaps.append((log.ts[sel].min() - last_ts) / 86400.0)
            if len(log.train_positions(p)):
                last_ts = log.ts[log.train_positions(p)].max()
    return np.array(gaps, np.float64)
