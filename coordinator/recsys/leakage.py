"""What a user prototype tells the coordinator: how well can it guess the user's favourite genres?

FCUCR's devices upload one prototype per period: p = the mean of the frozen encoder's states after the
user's last 20 prefixes (d = 64 floats, no item ids). The coordinator also holds what it shipped: the
encoder and the item table E. Two attacks use only that:

* **decode** -- rank all items by p · E_i (the prototype lives in the space the model scores items in),
  take the 50 best, and read their genres off the catalogue;
* **probe** -- train a multinomial logistic regression (scikit-learn) on prototypes the coordinator
  computes itself from its own period-0 data (it has the encoder, and the genres of those users), then
  apply it to the uploaded prototypes.

Both are scored against the user's actual genre profile over the items the encoder reads (the last
50 of the history when the prototype was computed): top-1 genre accuracy, whether the true top genre is
among the 3 guessed, and the overlap of the guessed and true top-3. The baseline guesses the population's
most frequent top genres for everyone: what the coordinator knows without any prototype. Users whose top
genre is not the population's favourite are reported apart: that is where a guess reveals something.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_client.data.datasets import resolve_data_dir
from edge_client.recsys.adapter import RecAdapterConfig
from edge_client.recsys.data import ContinualSplit
from edge_client.recsys.device import RecDevice
from edge_client.recsys.encoder import SequenceEncoder

GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
WINDOW = 50  # the encoder reads at most the last 50 items


def load_genres(data_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """(n_items + 1, 18) genre flags from ml-100k/u.item (the 'unknown' flag dropped; row 0 = padding)."""
    path = resolve_data_dir(data_dir) / "ml-100k" / "u.item"
    rows = [line.rstrip("\n").split("|") for line in path.read_text(encoding="latin-1").splitlines() if line]
    flags = np.zeros((max(int(r[0]) for r in rows) + 1, len(GENRES)), bool)
    for r in rows:
        flags[int(r[0])] = [c == "1" for c in r[6:24]]
    return flags


def genre_counts(items: np.ndarray, genres: np.ndarray) -> np.ndarray:
    return genres[np.asarray(items, np.int64)].sum(axis=0).astype(np.float64)


def top_k(counts: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest counts (ties broken by genre order, deterministically)."""
    return np.argsort(-counts, kind="stable")[:k]


@dataclass
class Uploads:
    """The prototypes devices upload in periods 1..P (one per active user and period) and the truth."""

    prototypes: np.ndarray  # (N, d)
    true_counts: np.ndarray  # (N, 18) genre counts over the last WINDOW items at upload time
    users: np.ndarray
    periods: np.ndarray


def _prototype_of(encoder: SequenceEncoder, items_table: np.ndarray, history: np.ndarray, ts: np.ndarray,
                  recent: int) -> np.ndarray:
    dev = RecDevice("probe", encoder, items_table, RecAdapterConfig(recent=recent), shared_keys=(), use_gate=False)
    dev.receive(history, ts)
    return dev.prototype()


def uploaded_prototypes(split: ContinualSplit, encoder: SequenceEncoder, items_table: np.ndarray,
                        genres: np.ndarray, recent: int = 20) -> Uploads:
    """Exactly what RecDevice.prototype() uploads after each period a user is active in (the device code)."""
    protos, counts, users, periods = [], [], [], []
    for uid, log in split.logs.items():
        for p in range(1, split.n_periods + 1):
            if not log.active(p):
                continue
            seen = log.period <= p
            hist, ts = log.items[seen], log.ts[seen]
            protos.append(_prototype_of(encoder, items_table, hist, ts, recent))
            counts.append(genre_counts(hist[-WINDOW:], genres))
            users.append(uid)
            periods.append(p)
    return Uploads(np.array(protos), np.array(counts), np.array(users), np.array(periods))


def coordinator_training_set(split: ContinualSplit, encoder: SequenceEncoder, items_table: np.ndarray,
                             genres: np.ndarray, recent: int = 20, points: int = 4,
                             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """What the coordinator can label on its own: prototypes of its period-0 users' histories, cut at up to
    `points` random lengths each, labelled with the top genre of the last WINDOW items."""
    rng = np.random.default_rng(seed)
    x, y = [], []
    for log in split.logs.values():
        p0 = log.period == 0
        hist, ts = log.items[p0], log.ts[p0]
        if len(hist) < 5:
            continue
        for n in sorted(set(rng.integers(5, len(hist) + 1, points).tolist())):
            x.append(_prototype_of(encoder, items_table, hist[:n], ts[:n], recent))
            y.append(top_k(genre_counts(hist[:n][-WINDOW:], genres), 1)[0])
    return np.array(x), np.array(y)


def _scores(pred3: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """pred3: (N, 3) guessed genres, best first; counts: (N, 18) true genre counts."""
    true1 = np.array([top_k(c, 1)[0] for c in counts])
    true3 = np.array([top_k(c, 3) for c in counts])
    return {"top1_accuracy": float(np.mean(pred3[:, 0] == true1)),
            "true_top1_in_guessed_top3": float(np.mean([t in p for t, p in zip(true1, pred3, strict=True)])),
            "top3_overlap": float(np.mean([len(set(p) & set(t)) / 3 for p, t in zip(pred3, true3, strict=True)])),
            "n": len(counts)}


def measure(split: ContinualSplit, encoder: SequenceEncoder, items_table: np.ndarray, genres: np.ndarray,
            recent: int = 20, seed: int = 0) -> dict[str, Any]:
    """{attack: {"all" | "not the crowd's favourite": scores}} for baseline, decode and probe."""
    up = uploaded_prototypes(split, encoder, items_table, genres, recent)
    x0, y0 = coordinator_training_set(split, encoder, items_table, genres, recent, seed=seed)
    return attack(up, x0, y0, items_table, genres, recent)


def noised(up: Uploads, x0: np.ndarray, clip: float, noise_multiplier: float, seed: int
           ) -> tuple[Uploads, np.ndarray]:
    """The uploads as devices with prototype DP send them (edge_client.learning.dp.privatize_prototype, the device
    code), and the coordinator's own prototypes passed through the same public mechanism: an attacker who knows C and
    σ trains its probe on inputs as noisy as the ones it will read (the stronger attacker)."""
    from edge_client.learning.dp import privatize_prototype

    rng = np.random.default_rng(seed)
    protos = np.array([privatize_prototype(p, clip, noise_multiplier, rng) for p in up.prototypes])
    own = np.array([privatize_prototype(p, clip, noise_multiplier, rng) for p in x0])
    return Uploads(protos, up.true_counts, up.users, up.periods), own


def attack(up: Uploads, x0: np.ndarray, y0: np.ndarray, items_table: np.ndarray, genres: np.ndarray,
           recent: int = 20) -> dict[str, Any]:
    """The three guesses (baseline, decode, probe) of every uploaded prototype, scored against the truth."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    prior = np.bincount(y0, minlength=len(GENRES)).astype(np.float64)
    crowd3 = np.tile(top_k(prior, 3), (len(up.prototypes), 1))  # the baseline: the population's favourites

    scores = up.prototypes @ np.asarray(items_table, np.float64)[1:].T  # p · E_i for items 1..n
    best = np.argsort(-scores, axis=1)[:, :50] + 1
    decode3 = np.array([top_k(genre_counts(b, genres), 3) for b in best])

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    probe.fit(x0, y0)
    proba = probe.predict_proba(up.prototypes)
    probe3 = np.asarray(probe.classes_)[np.argsort(-proba, axis=1, kind="stable")[:, :3]]

    true1 = np.array([top_k(c, 1)[0] for c in up.true_counts])
    distinct = true1 != crowd3[0, 0]
    out: dict[str, Any] = {}
    for name, pred in (("baseline (population's top genres)", crowd3), ("decode (p·E, top-50 items)", decode3),
                       ("probe (logistic regression on period-0 prototypes)", probe3)):
        out[name] = {"all": _scores(pred, up.true_counts),
                     "top genre not the crowd's": _scores(pred[distinct], up.true_counts[distinct])}
    out["meta"] = {"uploads": len(up.prototypes), "probe_training_prototypes": len(x0),
                   "crowd_top3": [GENRES[g] for g in crowd3[0]], "recent": recent, "window": WINDOW}
    return out
