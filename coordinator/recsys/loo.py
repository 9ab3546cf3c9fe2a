"""The standard sequential-recommendation protocol: leave-one-out with full ranking.

Why this protocol (the one SASRec, BERT4Rec, "SASRec+" and gSASRec report on): every user's
interactions in time order; the last item is the test target, the second-to-last the validation
target, everything before it is training data. A model sees the validation item only as *input*
when it predicts the test item (never as a training target), so early stopping and
hyper-parameters are chosen on validation without touching the test items.

Metrics are computed over the **full catalogue** (every item is a candidate, not 100 sampled
negatives: sampled metrics inflate HR@10 and can reorder models, Krichene & Rendle, KDD 2020),
with the user's earlier items removed from the candidates (``filter_seen``, as in the gSASRec and
"SASRec+" code; every ML-100K item is rated at most once per user, so a seen item is never the
target). Ties count against the target (:func:`edge_client.recsys.data.ranks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_client.recsys.client import K  # HR/NDCG cut-off: the same K as the devices and the continual runs
from edge_client.recsys.data import PAD, Interactions, ranks


@dataclass(frozen=True)
class LeaveOneOut:
    """Per-user time-ordered item sequences (users with at least 3 interactions)."""

    users: np.ndarray  # (U,) user ids
    sequences: list[np.ndarray]  # (n_u,) item ids in time order
    n_items: int

    @classmethod
    def from_interactions(cls, data: Interactions) -> LeaveOneOut:
        starts = np.flatnonzero(np.r_[True, data.user[1:] != data.user[:-1]])
        ends = np.r_[starts[1:], len(data)]
        users, seqs = [], []
        for a, b in zip(starts, ends, strict=True):
            if b - a >= 3:  # a training item, a validation item and a test item
                users.append(int(data.user[a]))
                seqs.append(data.item[a:b].copy())
        return cls(np.array(users, np.int64), seqs, data.n_items)

    def history(self, stage: str) -> list[np.ndarray]:
        """What a model reads before predicting `stage`'s target: train items (for "valid"), train +
        validation item (for "test"), or train items only (for "train", what a model is fitted on)."""
        cut = {"train": 2, "valid": 2, "test": 1}[stage]
        return [s[:-cut] for s in self.sequences]

    def targets(self, stage: str) -> np.ndarray:
        if stage not in ("valid", "test"):
            raise ValueError(f"no targets for stage {stage!r}")
        return np.array([s[-2] if stage == "valid" else s[-1] for s in self.sequences], np.int64)

    def train_matrix(self, stage: str = "train"):  # scipy.sparse.csr_matrix (users x items+1)
        """Binary user x item matrix of the histories of `stage` (column PAD empty)."""
        from scipy import sparse

        hist = self.history(stage)
        rows = np.concatenate([np.full(len(h), i) for i, h in enumerate(hist)])
        cols = np.concatenate(hist)
        return sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                                 shape=(len(hist), self.n_items + 1))


# (user indices into LeaveOneOut.users, their histories) -> (N, n_items + 1) scores; sequence models read
# only the histories, matrix factorisation looks its user factors up by index
Scorer = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]


def ranking_metrics(rank: np.ndarray, k: int = K) -> dict[str, float]:
    """HR@k, NDCG@k and MRR (over the full ranking) of one relevant item per user."""
    rank = np.asarray(rank, np.float64)
    hit = rank <= k
    return {"hr": float(hit.mean()), "ndcg": float(np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0).mean()),
            "mrr": float((1.0 / rank).mean())}


def rank_targets(score: Scorer, histories: list[np.ndarray], targets: np.ndarray, batch: int = 256) -> np.ndarray:
    """1-based full-ranking rank of each target after its history (earlier items filtered, ties count
    against the target)."""
    out = []
    for i in range(0, len(histories), batch):
        s = np.asarray(score(np.arange(i, min(i + batch, len(histories))), histories[i : i + batch]), np.float64)
        s[:, PAD] = -np.inf
        out.append(ranks(s, targets[i : i + batch], histories[i : i + batch]))
    return np.concatenate(out) if out else np.zeros(0)


def evaluate(score: Scorer, loo: LeaveOneOut, stage: str, batch: int = 256) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of `score` on `stage` ("valid" or "test") and the per-user ranks (for paired tests)."""
    r = rank_targets(score, loo.history(stage), loo.targets(stage), batch)
    return ranking_metrics(r), r


def sampled_metrics(score: Scorer, loo: LeaveOneOut, stage: str = "test", n_negatives: int = 100,
                    seed: int = 0) -> dict[str, float]:
    """The *sampled* protocol of the original SASRec paper (the target against 100 random items the
    user has not seen), computed only to show how far such numbers are from full-ranking ones."""
    rng = np.random.default_rng(seed)
    hist, tgt = loo.history(stage), loo.targets(stage)
    s = np.asarray(score(np.arange(len(hist)), hist), np.float64)
    rank = np.empty(len(hist))
    for i, h in enumerate(hist):
        seen = np.zeros(loo.n_items + 1, bool)
        seen[h] = True
        seen[tgt[i]] = seen[PAD] = True
        negs = rng.choice(np.flatnonzero(~seen), n_negatives, replace=False)
        rank[i] = 1 + np.sum(s[i, negs] >= s[i, tgt[i]])
    return ranking_metrics(rank)


def training_data(loo: LeaveOneOut, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """SASRec windows over every user's training part (each position after the first is a target)."""
    from edge_client.recsys.data import training_windows

    xs, ys = [], []
    for seq in loo.history("train"):
        x, y = training_windows(seq, np.ones(len(seq), bool), max_len)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def sasrec_scorer(model) -> Scorer:  # model: coordinator.models.recommender.SASRec
    """Scores of every item after each history: h (the encoder's last position) · item table."""
    import torch

    from edge_client.recsys.data import prefix_batch

    def score(idx: np.ndarray, hist: list[np.ndarray]) -> np.ndarray:
        x = np.concatenate([prefix_batch(h, np.array([len(h)]), model.config.max_len) for h in hist])
        with torch.no_grad():
            return model.scores(model.encode(torch.from_numpy(x))).numpy()

    return score
