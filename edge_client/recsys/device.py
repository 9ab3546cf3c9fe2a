"""The recommender on a device: frozen ONNX sequence encoder, personal adapter, FCUCR, full ranking.

numpy + ONNX Runtime only (no torch). One device = one user; the interaction history lives here
and nowhere else.

Model on the device (h = encoder(history), frozen; E = shipped item table, frozen)::

    h'  = h + U (V h) + u                       low-rank adapter (r = 8) + user vector
    z   = h' + g ⊙ p̃,  g = σ(W_g [h'; p̃] + b_g)   FCUCR prototype gate (only when p̃ is known)
    s_i = z · (E_i + A_i B) + b_i               scores of *all* items: ranking stays on the device;
                                                A, B, b: the item-side adapter (optional)

Why this split: the encoder and E are what the coordinator can pretrain on its own data and ship
once; the adapter is small (2·d·r + d numbers) so it can be averaged across users (FedAvg) or kept
personal; the gate decides how much of the neighbours' prototype p̃ to let in, per dimension and
per history, and it never leaves the device (the user's own "decision logic", ALGORITHMS.md §4).
The item-side adapter -- a bias per item b and a rank-r correction A B of the frozen item table --
is what lets a federation follow the catalogue after pretraining: items that became popular later,
or were never seen in the coordinator's period-0 data, have stale rows in E that no user-side
adapter can fix (FCUCR shares the item embeddings for the same reason). It stays on the device side
of training like everything else: the device differentiates the scores, the table E never changes.

Training (full softmax CE over all items, exact gradients; the encoder is frozen so h for each
prefix of the user's history is computed once with ONNX Runtime and cached) adds FCUCR's
time-aware self-distillation: λ·w(Δt)·KL(softmax(s_old/T) ‖ softmax(s_new/T)) on a candidate set
(recent history items + sampled negatives), s_old from the frozen snapshot of the user's previous
model, w(Δt) = exp(−Δt/τ): the longer ago the snapshot, the less it binds (old tastes fade).
The T² factor of Hinton's KD is left out: λ already sets the scale, and the gradient stays O(1/T).

What the device sends (:meth:`RecDevice.upload`): the change of the shared adapter part (floats,
fixed shapes), the number of training targets, and a d-float prototype (mean of recent h) --
no item ids, no timestamps, no scores. The user can take their state with them
(:meth:`RecDevice.export_state`) and erase it (:meth:`RecDevice.forget_me`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.learning.dp import privatize_prototype
from edge_client.learning.head import Adam, Params
from edge_client.recsys.adapter import (
    REC_ADAPTER_KEYS,
    REC_GATE_KEYS,
    REC_ITEM_KEYS,
    RecAdapterConfig,
    Teacher,
    adapter_loss_and_grad,
    candidate_scores,
    full_scores,
    init_adapter,
    represent,
)
from edge_client.recsys.data import prefix_batch, ranks
from edge_client.recsys.encoder import SequenceEncoder

STATE_FORMAT = "fedge.recsys.personal-state/1"
SECONDS_PER_DAY = 86400.0


# ------------------------------------------------------------------------------ methods


@dataclass(frozen=True)
class MethodSpec:
    """Which adapter parts the federation averages, and which FCUCR mechanisms are on. Device and
    coordinator both read it: the device builds its model from it, the coordinator its rounds."""

    shared: tuple[str, ...]
    gate: bool = False
    distill: bool = False
    prototypes: bool = False
    item_adapter: bool = False  # the item-side adapter (REC_ITEM_KEYS) is trained too

    @property
    def federated(self) -> bool:
        return bool(self.shared)


METHODS: dict[str, MethodSpec] = {
    "local-only": MethodSpec(shared=()),
    "fedavg": MethodSpec(shared=("U", "V", "u")),
    "fedavg+items": MethodSpec(shared=("U", "V", "u", *REC_ITEM_KEYS), item_adapter=True),
    "fcucr": MethodSpec(shared=("U", "V", *REC_ITEM_KEYS), gate=True, distill=True, prototypes=True,
                        item_adapter=True),
    "fcucr-no-distill": MethodSpec(shared=("U", "V", *REC_ITEM_KEYS), gate=True, prototypes=True,
                                   item_adapter=True),
    "fcucr-no-proto": MethodSpec(shared=("U", "V", *REC_ITEM_KEYS), distill=True, item_adapter=True),
    "fcucr-no-items": MethodSpec(shared=("U", "V"), gate=True, distill=True, prototypes=True),
}


# ------------------------------------------------------------------------------ device


@dataclass
class DistillSnapshot:
    """The user's model at the end of their last training period: FCUCR's distillation teacher."""

    params: Params
    p_tilde: np.ndarray | None
    ts: int  # time of the last interaction it was trained on


@dataclass
class TrainStats:
    n_targets: int
    loss_first: float
    loss_last: float
    distill_weight: float = 0.0
    gap_days: float = float("nan")


@dataclass
class RecDevice:
    """One user's device. `shared_keys` are the adapter parts the federation averages (they are
    replaced by the global copy on download); every other adapter part is personal.

    Strategies use it as: local-only ``shared_keys=()``; FedAvg ``("U", "V", "u")`` (no personal
    part); FCUCR ``("U", "V")`` with the user vector and the gate personal."""

    user_id: str
    encoder: SequenceEncoder
    items: np.ndarray  # (n_items + 1, d) float32 item table
    cfg: RecAdapterConfig = field(default_factory=RecAdapterConfig)
    shared_keys: tuple[str, ...] = ("U", "V")
    use_gate: bool = True
    seed: int = 0
    item_adapter: bool = False
    proto_dp: tuple[float, float] | None = None  # (clip C, noise multiplier σ) of uploaded prototypes; None: exact
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    history_ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    personal: Params = field(default_factory=dict)
    shared: Params = field(default_factory=dict)
    p_tilde: np.ndarray | None = None
    snapshot: DistillSnapshot | None = None
    _h: np.ndarray | None = None  # cached h of prefix j (row j); NaN rows not computed yet
    _upload_base: Params = field(default_factory=dict)
    _n_trained: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.personal = self._initial_personal()

    def _initial_personal(self) -> Params:
        keys = (REC_ADAPTER_KEYS + (REC_GATE_KEYS if self.use_gate else ())
                + (REC_ITEM_KEYS if self.item_adapter else ()))
        init = init_adapter(self.items.shape[1], self.cfg, np.random.default_rng(self.seed),
                            n_items=len(self.items) - 1 if self.item_adapter else 0)
        return {k: init[k] for k in keys if k not in self.shared_keys}

    # ------------------------------------------------------------------ local data
    def receive(self, items: np.ndarray, ts: np.ndarray) -> None:
        """New interactions observed on the device (they stay here)."""
        self.history = np.concatenate([self.history, np.asarray(items, np.int64)])
        self.history_ts = np.concatenate([self.history_ts, np.asarray(ts, np.int64)])

    def reprs(self, positions: np.ndarray) -> np.ndarray:
        """h of the prefixes history[:j]; each prefix is encoded once (the encoder is frozen)."""
        positions = np.asarray(positions, np.int64)
        n, d = len(self.history) + 1, self.items.shape[1]
        if self._h is None or len(self._h) < n:
            grown = np.full((n, d), np.nan, np.float32)
            if self._h is not None:
                grown[: len(self._h)] = self._h
            self._h = grown
        todo = np.unique(positions[np.isnan(self._h[positions, 0])])
        if len(todo):
            self._h[todo] = self.encoder.encode(prefix_batch(self.history, todo, self.encoder.max_len))
        return self._h[positions]

    # ------------------------------------------------------------------ model
    def params(self) -> Params:
        return {**self.shared, **self.personal}

    def set_shared(self, shared: Mapping[str, np.ndarray]) -> None:
        """Download: the federation's current shared adapter replaces the local copy."""
        self.shared = {k: np.asarray(v, np.float64).copy() for k, v in shared.items() if k in self.shared_keys}

    def scores(self, positions: np.ndarray) -> np.ndarray:
        """Scores of every item after each prefix history[:j] (full ranking, on the device)."""
        params = self.params()
        return full_scores(represent(params, self.reprs(positions), self.p_tilde), self.items, params)

    def rank_history(self, positions: np.ndarray) -> np.ndarray:
        """Full-ranking rank of each history[j] after its prefix history[:j] (the earlier items excluded):
        how well the current model would have predicted those interactions. Scored before the model trains
        on them, it is the prequential ("test, then train") measure of a continual stream."""
        positions = np.asarray(positions, np.int64)
        return ranks(self.scores(positions), self.history[positions], [self.history[:j] for j in positions])

    def recommend(self, k: int = 10) -> np.ndarray:
        """Top-k items to show next, never one already in the history."""
        s = self.scores(np.array([len(self.history)]))[0]
        s[self.history] = -np.inf
        return np.argsort(-s, kind="stable")[:k]

    def prototype(self) -> np.ndarray:
        """p_k: mean of the representations of the most recent prefixes (d floats)."""
        n = len(self.history)
        pos = np.arange(max(1, n - self.cfg.recent + 1), n + 1)
        return self.reprs(pos).astype(np.float64).mean(axis=0) if len(pos) else np.zeros(self.items.shape[1])

    def upload_prototype(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """The prototype as it leaves the device (float32): with ``proto_dp`` = (C, σ) clipped to L2 norm C and
        noised with std σ·C (edge_client.learning.dp.privatize_prototype; OS entropy unless a generator is given,
        as simulations do), else exact. The prototype used on the device itself is never noised."""
        p = self.prototype()
        return p.astype(np.float32) if self.proto_dp is None else privatize_prototype(p, *self.proto_dp, rng=rng)

    def set_p_tilde(self, p_tilde: np.ndarray) -> None:
        """Take the neighbours' prototype mix from the coordinator. With ``proto_dp`` the fleet's prototypes are
        noised, and a mix of 10 noised prototypes keeps most of their noise: its norm grows with σ far beyond any
        prototype's (σ = 4.6: ~5x the clip), and added to the representation it swamped the scores (FCUCR's final
        NDCG@10 fell from 0.050 to 0.022 at ε = 3). It is therefore clipped to the same public bound C on arrival:
        post-processing, no privacy cost, and exact mixes (no ``proto_dp``) are untouched."""
        p = np.asarray(p_tilde, np.float32)
        if self.proto_dp is not None:
            norm = float(np.linalg.norm(p))
            p = p * np.float32(min(1.0, self.proto_dp[0] / norm)) if norm > 0 else p
        self.p_tilde = p

    def _teacher(self, h: np.ndarray, positions: np.ndarray) -> Teacher | None:
        if self.snapshot is None or self.cfg.lambda_sd <= 0:
            return None
        gap_days = max(0.0, (float(self.history_ts[positions].min()) - self.snapshot.ts) / SECONDS_PER_DAY)
        weight = self.cfg.lambda_sd * float(np.exp(-gap_days / self.cfg.tau_days))
        recent = self.history[max(0, positions.min() - self.cfg.recent) : positions.min()]
        negatives = self.rng.integers(1, len(self.items), self.cfg.n_negatives)
        cand = np.unique(np.concatenate([recent, negatives]))
        z_old = represent(self.snapshot.params, h, self.snapshot.p_tilde)
        return Teacher(cand, candidate_scores(self.snapshot.params, z_old, self.items, cand), weight, gap_days)

    def train(self, positions: np.ndarray, *, distill: bool = False) -> TrainStats:
        """One period of local training on the targets history[j], j in positions."""
        positions = np.asarray(positions, np.int64)
        params = {k: v.copy() for k, v in self.params().items()}
        self._upload_base = {k: params[k].copy() for k in self.shared_keys if k in params}
        h = self.reprs(positions)
        targets = self.history[positions]
        teacher = self._teacher(h, positions) if distill else None
        opt = Adam(lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        losses = []
        for _ in range(self.cfg.steps):
            loss, grads = adapter_loss_and_grad(params, h, targets, self.items, self.p_tilde, teacher,
                                                self.cfg.temperature)
            losses.append(loss)
            opt.step(params, grads)
        self.snapshot = DistillSnapshot({k: v.copy() for k, v in params.items()}, self.p_tilde,
                                 int(self.history_ts[positions].max()))
        self.personal = {k: v for k, v in params.items() if k not in self.shared_keys}
        self.shared = {k: v for k, v in params.items() if k in self.shared_keys}
        self._n_trained = len(positions)
        if teacher is None:
            return TrainStats(len(positions), losses[0], losses[-1])
        return TrainStats(len(positions), losses[0], losses[-1], teacher.weight, teacher.gap_days)

    def upload(self, with_prototype: bool = True) -> dict[str, Any]:
        """What leaves the device after a period: shared-adapter delta, target count, prototype."""
        msg: dict[str, Any] = {
            "n_samples": int(self._n_trained),
            "delta": {k: (self.shared[k] - self._upload_base[k]).astype(np.float32) for k in self._upload_base},
        }
        if with_prototype:
            msg["prototype"] = self.upload_prototype()
        return msg

    # ------------------------------------------------------------------ the user's control
    def export_state(self, path: str | os.PathLike[str]) -> Path:
        """Everything personal this device holds about the user, in one .npz the user owns:
        history, personal adapter, gate, neighbour prototype, distillation snapshot."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"history_items": self.history, "history_ts": self.history_ts}
        arrays.update({f"personal/{k}": v for k, v in self.personal.items()})
        arrays.update({f"shared/{k}": v for k, v in self.shared.items()})
        if self.p_tilde is not None:
            arrays["p_tilde"] = np.asarray(self.p_tilde)
        if self.snapshot is not None:
            arrays.update({f"snapshot/{k}": v for k, v in self.snapshot.params.items()})
            arrays["snapshot_ts"] = np.array(self.snapshot.ts)
        meta = {"format": STATE_FORMAT, "user_id": self.user_id, "shared_keys": list(self.shared_keys)}
        arrays["meta"] = np.array(json.dumps(meta))
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    def import_state(self, path: str | os.PathLike[str]) -> None:
        """Restore an exported state (the user moves to a new device)."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{path} is not a fedge recommender state")
            self.history, self.history_ts = z["history_items"].astype(np.int64), z["history_ts"].astype(np.int64)
            self.personal = {k.split("/", 1)[1]: z[k].astype(np.float64) for k in z.files if k.startswith("personal/")}
            self.shared = {k.split("/", 1)[1]: z[k].astype(np.float64) for k in z.files if k.startswith("shared/")}
            self.p_tilde = z["p_tilde"] if "p_tilde" in z.files else None
            snap = {k.split("/", 1)[1]: z[k].astype(np.float64) for k in z.files if k.startswith("snapshot/")}
            self.snapshot = DistillSnapshot(snap, self.p_tilde, int(z["snapshot_ts"])) if snap else None
        self._h = None

    def forget_me(self, exported: str | os.PathLike[str] | None = None) -> dict[str, int]:
        """Erase the user's history and personal model from this device (and an exported file if
        given); the device falls back to the shared model. Returns what was deleted."""
        deleted = {"interactions": len(self.history), "personal_params": sum(v.size for v in self.personal.values()),
                   "snapshot": int(self.snapshot is not None), "file": 0}
        self.history, self.history_ts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._h, self.snapshot, self.p_tilde = None, None, None
        self.personal = self._initial_personal()
        self._upload_base, self._n_trained = {}, 0
        if exported is not None and Path(exported).is_file():
            Path(exported).unlink()
            deleted["file"] = 1
        return deleted


