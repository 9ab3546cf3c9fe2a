"""Non-sequential baselines for the leave-one-out anchor: most-popular, item-kNN and implicit-feedback
matrix factorisation (iALS and BPR-MF from the maintained ``implicit`` library).

Each ``fit_*`` returns a scorer ``histories -> (N, n_items + 1)`` scores, so the anchor benchmark
ranks every model with one evaluation routine. The histories a scorer gets at test time include the
validation item (as SASRec's input does); the models are fitted on the training part only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.recsys.loo import LeaveOneOut, Scorer


def _profile(histories: list[np.ndarray], n_cols: int):  # scipy.sparse.csr_matrix
    from scipy import sparse

    rows = np.concatenate([np.full(len(h), i) for i, h in enumerate(histories)])
    cols = np.concatenate(histories)
    return sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(histories), n_cols))


def fit_most_popular(loo: LeaveOneOut) -> Scorer:
    """Interaction counts over the training part: the same ranking for everyone (seen items are
    filtered by the evaluation)."""
    counts = np.asarray(loo.train_matrix().sum(axis=0)).ravel().astype(np.float64)
    return lambda idx, hist: np.tile(counts, (len(hist), 1))


@dataclass(frozen=True)
class ItemKNNConfig:
    neighbours: int = 100  # top-k most similar items kept per item
    shrink: float = 10.0  # cosine with shrinkage: a·b / (|a||b| + shrink), damps pairs seen by few users


def fit_item_knn(loo: LeaveOneOut, cfg: ItemKNNConfig) -> Scorer:
    """Item-based kNN (Sarwar et al. 2001; Deshpande & Karypis 2004): cosine similarity between item
    columns of the training matrix, top-k neighbours per item, score = sum of similarities to the
    items in the user's history."""
    from scipy import sparse

    x = loo.train_matrix().tocsc()
    co = (x.T @ x).toarray().astype(np.float64)  # co-occurrence counts
    norms = np.sqrt(np.diag(co))
    sim = co / (np.outer(norms, norms) + cfg.shrink + 1e-12)
    np.fill_diagonal(sim, 0.0)
    if cfg.neighbours < sim.shape[0]:
        cut = np.argpartition(-sim, cfg.neighbours - 1, axis=0)[cfg.neighbours - 1]  # k-th largest per column
        kth = sim[cut, np.arange(sim.shape[1])]
        sim = np.where(sim >= kth[None, :], sim, 0.0)
    sim_sparse = sparse.csr_matrix(sim)
    return lambda idx, hist: np.asarray((_profile(hist, sim.shape[0]) @ sim_sparse).todense())


@dataclass(frozen=True)
class MFConfig:
    kind: str = "als"  # "als" (iALS, Hu, Koren & Volinsky 2008) or "bpr" (BPR-MF, Rendle et al. 2009)
    factors: int = 64
    regularization: float = 0.1
    alpha: float = 10.0  # iALS confidence 1 + alpha·r
    iterations: int = 15
    learning_rate: float = 0.01  # BPR only
    seed: int = 0


def fit_mf(loo: LeaveOneOut, cfg: MFConfig) -> Scorer:
    """iALS or BPR-MF from ``implicit`` (one thread). At scoring time iALS re-solves the user factors
    from the given history (so the validation item counts at test time, as it does for SASRec's
    input); BPR has no such solve and scores with the user factors it learned on the training part."""
    from threadpoolctl import threadpool_limits

    if cfg.kind not in ("als", "bpr"):
        raise ValueError(f"unknown MF kind {cfg.kind!r}")
    train = loo.train_matrix()
    with threadpool_limits(limits=1):  # implicit warns about (and is slowed by) a threaded BLAS
        if cfg.kind == "als":
            from implicit.cpu.als import AlternatingLeastSquares

            model = AlternatingLeastSquares(factors=cfg.factors, regularization=cfg.regularization, alpha=cfg.alpha,
                                            iterations=cfg.iterations, random_state=cfg.seed, num_threads=1)
        else:
            from implicit.cpu.bpr import BayesianPersonalizedRanking

            model = BayesianPersonalizedRanking(factors=cfg.factors, learning_rate=cfg.learning_rate,
                                                regularization=cfg.regularization, iterations=cfg.iterations,
                                                random_state=cfg.seed, num_threads=1)
        model.fit(train, show_progress=False)
    items = np.asarray(model.item_factors)

    def score(idx: np.ndarray, hist: list[np.ndarray]) -> np.ndarray:
        if cfg.kind == "als":
            with threadpool_limits(limits=1):
                users = np.asarray(model.recalculate_user(np.arange(len(hist)), _profile(hist, train.shape[1])))
        else:
            users = np.asarray(model.user_factors)[idx]
        return users @ items.T

    return score
