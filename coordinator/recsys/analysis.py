"""Whom the continual numbers are about: validation vs test users, and breakdowns per user group.

* **Validation and test users.** A fixed, seeded quarter of the users are validation users: every
  method's hyper-parameters are chosen on their held-out items only, and every reported number is on
  the other users. Both groups take part in training (they are devices of the same federation); only
  the scoring is split, so choosing a configuration never looks at a reported test item.
* **Views of the continual stream**, pooled over periods: *next* -- prequential ("test, then train"):
  every interaction of periods 2..P ranked by the models as they were when the period began, before any
  training on it (the deployment lag, and ~35k test cases instead of one per user and period; period 1
  is left out because there every on-device model still equals the frozen one); *current* -- the model
  after period t's round, scored on period t's held-out item (the device has trained on the user's
  earlier period-t interactions; the held-out item is the user's last one of the period and never a
  target); *final* -- the models after the last period on every period's held-out item; *forgetting* --
  per user, the drop on a period's held-out item from right after that period to the end.
* **Groups.** Light / medium / heavy: tertiles of the history length before the held-out item (one pair
  of thresholds for every method and seed); new / returning: whether the user had any interaction
  before the period of the held-out item. On-device adaptation should help most where a user brings many
  of their own interactions and where their taste differs from the crowd the encoder was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from coordinator.recsys.simulation import K, MethodResult, TestSet

VIEWS = ("current", "next", "final")
GROUPS = ("all", "light", "medium", "heavy", "new", "returning")


def user_roles(users: Iterable[str], valid_fraction: float = 0.25, seed: int = 0) -> dict[str, str]:
    """'valid' or 'test' per user: a seeded random `valid_fraction`, independent of the model seed, so
    every seed and method is scored on the same users."""
    users = sorted(users, key=lambda u: (len(u), u))
    order = np.random.default_rng(seed).permutation(len(users))
    n_valid = round(valid_fraction * len(users))
    return {users[i]: ("valid" if rank < n_valid else "test") for rank, i in enumerate(order)}


@dataclass(frozen=True)
class Cases:
    """Held-out items of one view, pooled over periods: one entry per (user, period)."""

    ranks: np.ndarray
    users: np.ndarray  # str
    period: np.ndarray  # period of the held-out item
    history_len: np.ndarray
    returning: np.ndarray

    def select(self, mask: np.ndarray) -> Cases:
        return Cases(self.ranks[mask], self.users[mask], self.period[mask], self.history_len[mask],
                     self.returning[mask])

    def __len__(self) -> int:
        return len(self.ranks)


def cases(result: MethodResult, tests: dict[int, TestSet], view: str) -> Cases:
    """The cases of `view` (see the module docstring), pooled over periods."""
    stages = {st.period: st for st in result.stages}
    last = max(stages)
    if view == "next":
        preqs = [(t, stages[t].preq) for t in sorted(stages)[1:]]
        preqs = [(t, p) for t, p in preqs if p is not None and p.ranks is not None]
        if not preqs:
            return Cases(*(np.zeros(0, dt) for dt in (np.int64, str, np.int64, np.int64, bool)))
        return Cases(np.concatenate([p.ranks for _, p in preqs]), np.concatenate([p.users for _, p in preqs]),
                     np.concatenate([np.full(p.n, t) for t, p in preqs]),
                     np.concatenate([p.positions for _, p in preqs]), np.concatenate([p.returning for _, p in preqs]))
    pairs = {"current": [(t, t) for t in stages],
             "final": [(last, s) for s in sorted(stages[last].ranks)]}[view]
    parts = [(stages[t].ranks[s], tests[s], s) for t, s in pairs if s in stages[t].ranks]
    if not parts:
        return Cases(*(np.zeros(0, dt) for dt in (np.int64, str, np.int64, np.int64, bool)))
    return Cases(np.concatenate([r for r, _, _ in parts]),
                 np.concatenate([np.array(ts.users, dtype=str) for _, ts, _ in parts]),
                 np.concatenate([np.full(len(ts.users), s) for _, ts, s in parts]),
                 np.concatenate([ts.history_len for _, ts, _ in parts]),
                 np.concatenate([ts.returning for _, ts, _ in parts]))


def activity_thresholds(tests: dict[int, TestSet]) -> tuple[float, float]:
    """Tertile boundaries of the history length over every held-out item (light < lo ≤ medium < hi ≤ heavy)."""
    lengths = np.concatenate([ts.history_len for ts in tests.values()])
    lo, hi = np.quantile(lengths, [1 / 3, 2 / 3])
    return float(lo), float(hi)


def group_mask(c: Cases, group: str, thresholds: tuple[float, float]) -> np.ndarray:
    lo, hi = thresholds
    return {"all": np.ones(len(c), bool), "light": c.history_len < lo,
            "medium": (c.history_len >= lo) & (c.history_len < hi), "heavy": c.history_len >= hi,
            "new": ~c.returning, "returning": c.returning}[group]


def hr_ndcg(ranks: np.ndarray, k: int = K) -> dict[str, float]:
    r = np.asarray(ranks, np.float64)
    if len(r) == 0:
        return {"hr": float("nan"), "ndcg": float("nan"), "n": 0}
    hit = r <= k
    return {"hr": float(hit.mean()), "ndcg": float(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0).mean()), "n": len(r)}


def forgetting(result: MethodResult, tests: dict[int, TestSet], users: set[str]) -> float:
    """Mean over the users' held-out items of periods s < last: NDCG@10 right after period s minus
    NDCG@10 after the last period (positive = later updates made the model worse on period s)."""
    stages = {st.period: st for st in result.stages}
    last = max(stages)
    drops = []
    for s in sorted(stages):
        if s == last or s not in stages[s].ranks:
            continue
        keep = np.array([u in users for u in tests[s].users], bool)
        now, end = stages[s].ranks[s][keep], stages[last].ranks[s][keep]
        drops.append(_ndcg(now) - _ndcg(end))
    return float(np.mean(np.concatenate(drops))) if drops else float("nan")


def _ndcg(ranks: np.ndarray, k: int = K) -> np.ndarray:
    r = np.asarray(ranks, np.float64)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


def summarise(result: MethodResult, tests: dict[int, TestSet], roles: dict[str, str], role: str,
              thresholds: tuple[float, float]) -> dict[str, dict[str, dict[str, float]]]:
    """{view: {group: {hr, ndcg, n}}} on the users of `role`, plus {"forgetting": {"all": {"ndcg": ...}}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for view in VIEWS:
        c = cases(result, tests, view)
        c = c.select(np.array([roles.get(u) == role for u in c.users], bool))
        out[view] = {g: hr_ndcg(c.ranks[group_mask(c, g, thresholds)]) for g in GROUPS}
    users = {u for u, r in roles.items() if r == role}
    out["forgetting"] = {"all": {"ndcg": forgetting(result, tests, users)}}
    return out
