"""The personal adapter over the frozen encoder's h, with exact gradients in numpy: the low-rank adapter and user
vector, the FCUCR prototype gate, the item-side adapter, full-softmax scores of all items and the self-distillation
term (the model is described in :mod:`edge_client.recsys.device`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_client.learning.head import Params
from edge_client.recsys.data import PAD

REC_ADAPTER_KEYS = ("U", "V", "u")
REC_GATE_KEYS = ("Wg", "bg")
REC_ITEM_KEYS = ("item_b", "item_A", "item_B")  # score_i += A_i · (B z) + b_i; row 0 (PAD) is never a candidate


@dataclass(frozen=True)
class RecAdapterConfig:
    rank: int = 8
    steps: int = 30  # full-batch Adam steps per period on the user's new targets
    lr: float = 1e-3  # 5e-3 overfit the ~60 targets a user has per period (local-only lost half its HR@10)
    weight_decay: float = 1e-3  # decoupled (AdamW-style): ~20–200 targets per user and period overfit fast
    lambda_sd: float = 0.5
    temperature: float = 2.0
    tau_days: float = 7.0  # τ of w(Δt); the simulation sets it to the median inter-session gap
    n_negatives: int = 100
    recent: int = 20  # history items in the distillation candidates and in the prototype
    gate_bias: float = -2.0  # σ(−2) ≈ 0.12: a new gate lets a little of p̃ in until it has learned
    init_scale: float = 0.01
    item_rank: int = 8  # rank of the item-table correction A B (0: the item adapter is a bias only)


def init_adapter(d: int, cfg: RecAdapterConfig, rng: np.random.Generator, n_items: int = 0) -> Params:
    """U = 0 (so the adapter starts as the identity, LoRA-style), V small random, u = 0, gate closed-ish;
    with `n_items`, the item adapter too: b = 0, A = 0, B small random (it also starts as the identity)."""
    params: Params = {
        "U": np.zeros((d, cfg.rank)),
        "V": rng.normal(0.0, cfg.init_scale, (cfg.rank, d)),
        "u": np.zeros(d),
        "Wg": np.zeros((d, 2 * d)),
        "bg": np.full(d, cfg.gate_bias),
    }
    if n_items:
        item_rng = np.random.default_rng(rng.integers(2**63))  # its own stream: U, V, u draw as before
        params["item_b"] = np.zeros(n_items + 1)
        params["item_A"] = np.zeros((n_items + 1, cfg.item_rank))
        params["item_B"] = item_rng.normal(0.0, cfg.init_scale, (cfg.item_rank, d))
    return params


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _uses_gate(params: Mapping[str, np.ndarray], p_tilde: np.ndarray | None) -> bool:
    return p_tilde is not None and "Wg" in params


def represent(params: Mapping[str, np.ndarray], h: np.ndarray, p_tilde: np.ndarray | None = None) -> np.ndarray:
    """z for frozen representations h (N, d); missing keys mean "that part is off"."""
    return _forward(params, h, p_tilde)[0]


def _forward(params: Mapping[str, np.ndarray], h: np.ndarray, p_tilde: np.ndarray | None) -> tuple[np.ndarray, dict]:
    h = np.asarray(h, dtype=np.float64)
    cache: dict[str, np.ndarray] = {}
    z = h
    if "U" in params:
        cache["a"] = h @ params["V"].T
        z = z + cache["a"] @ params["U"].T
    if "u" in params:
        z = z + params["u"]
    if _uses_gate(params, p_tilde):
        pt = np.broadcast_to(np.asarray(p_tilde, np.float64), z.shape)
        cache["cat"] = np.concatenate([z, pt], axis=1)
        cache["g"] = _sigmoid(cache["cat"] @ params["Wg"].T + params["bg"])
        z = z + cache["g"] * pt
    return z, cache


@dataclass(frozen=True)
class Teacher:
    """Frozen previous-period scores on a candidate set, with the time-gap weight already applied."""

    candidates: np.ndarray  # (C,) item ids
    scores: np.ndarray  # (N, C) s_old
    weight: float  # λ·exp(−Δt/τ)
    gap_days: float = float("nan")  # Δt


def adapter_loss_and_grad(
    params: Mapping[str, np.ndarray],
    h: np.ndarray,
    targets: np.ndarray,
    items: np.ndarray,
    p_tilde: np.ndarray | None = None,
    teacher: Teacher | None = None,
    temperature: float = 2.0,
) -> tuple[float, Params]:
    """Mean CE over all items (+ weighted KL to the teacher) and its exact gradient.

    Backward pass, z = h' + g⊙p̃ and s = z Eᵀ: ∂L/∂s = softmax(s) − onehot (+ w(p_new − p_old)/T on
    the candidates), ∂L/∂z = ∂L/∂s · E (+ ∂L/∂s A B with the item adapter, whose own gradients are
    ∂b = Σ_n ∂L/∂s, ∂A = ∂L/∂sᵀ (z Bᵀ), ∂B = (∂L/∂s A)ᵀ z); through the gate ∂L/∂pre = (∂L/∂z ⊙ p̃) ⊙ g(1−g) and
    ∂L/∂h' = ∂L/∂z + (∂L/∂pre · W_g)[:, :d]; then ∂U = ∂h'ᵀ(Vh), ∂V = (∂h' U)ᵀh, ∂u = Σ ∂h'.
    """
    n = len(h)
    z, cache = _forward(params, h, p_tilde)
    emb = np.asarray(items[1:])  # column i = item i+1; PAD is never a candidate
    if emb.dtype not in (np.float32, np.float64):
        emb = emb.astype(np.float64)
    logits = z.astype(emb.dtype) @ emb.T  # the two big products run in the table's dtype (float32 on devices)
    logits = _add_item_adapter(params, z, logits, dtype=emb.dtype)
    prob = _softmax(logits)
    rows = np.arange(n)
    t = np.asarray(targets, np.int64) - 1
    loss = float(-np.mean(np.log(prob[rows, t] + 1e-300)))
    d_logits = prob
    d_logits[rows, t] -= 1.0
    d_logits /= n
    if teacher is not None and teacher.weight > 0:
        cols = np.asarray(teacher.candidates, np.int64) - 1
        p_new = _softmax(logits[:, cols] / temperature)
        p_old = _softmax(np.asarray(teacher.scores, np.float64) / temperature)
        kl = np.sum(p_old * (np.log(p_old + 1e-300) - np.log(p_new + 1e-300)), axis=1)
        loss += teacher.weight * float(kl.mean())
        d_logits[:, cols] += teacher.weight * (p_new - p_old) / (temperature * n)  # candidates are unique
    dz = (d_logits @ emb).astype(np.float64)
    grads: Params = {}
    if "item_b" in params:
        grads["item_b"] = np.concatenate([[0.0], d_logits.sum(axis=0, dtype=np.float64)])
    if "item_A" in params:
        w = (z @ params["item_B"].T).astype(emb.dtype)  # (N, r); the (n_items x N) products in the table's dtype
        grads["item_A"] = np.vstack([np.zeros((1, w.shape[1])), d_logits.T @ w]).astype(np.float64)
        dw = (d_logits @ params["item_A"][1:].astype(emb.dtype)).astype(np.float64)
        grads["item_B"] = dw.T @ z
        dz = dz + dw @ params["item_B"]
    dh = dz
    if _uses_gate(params, p_tilde):
        d_pre = dz * np.asarray(p_tilde, np.float64) * cache["g"] * (1.0 - cache["g"])
        grads["Wg"] = d_pre.T @ cache["cat"]
        grads["bg"] = d_pre.sum(axis=0)
        dh = dz + (d_pre @ params["Wg"])[:, : z.shape[1]]
    if "u" in params:
        grads["u"] = dh.sum(axis=0)
    if "U" in params:
        grads["U"] = dh.T @ cache["a"]
        grads["V"] = (dh @ params["U"]).T @ np.asarray(h, np.float64)
    return loss, grads


def _add_item_adapter(params: Mapping[str, np.ndarray], z: np.ndarray, logits: np.ndarray,
                      cols: np.ndarray | None = None, dtype: np.dtype | type = np.float64) -> np.ndarray:
    """logits (scores of items 1..n, or of item ids `cols`) plus the item adapter's A_i·(B z) + b_i, in `dtype`
    (training keeps the (N x n_items) matrices in the item table's float32, as the device does)."""
    rows = slice(1, None) if cols is None else np.asarray(cols, np.int64)
    if "item_A" in params:
        w = (np.asarray(z, np.float64) @ params["item_B"].T).astype(dtype)
        logits = logits + w @ params["item_A"][rows].T.astype(dtype)
    if "item_b" in params:
        logits = logits + params["item_b"][rows].astype(dtype)
    return logits


def full_scores(z: np.ndarray, items: np.ndarray, params: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """(N, n_items + 1) scores of every item (with `params`' item adapter, if it has one); column PAD is −inf."""
    s = np.asarray(z, np.float64) @ np.asarray(items, np.float64).T
    if params:
        s[:, 1:] = _add_item_adapter(params, z, s[:, 1:])
    s[:, PAD] = -np.inf
    return s


def candidate_scores(params: Mapping[str, np.ndarray], z: np.ndarray, items: np.ndarray,
                     candidates: np.ndarray) -> np.ndarray:
    """Scores of the item ids `candidates` only (distillation targets)."""
    cand = np.asarray(candidates, np.int64)
    return _add_item_adapter(params, z, np.asarray(z, np.float64) @ np.asarray(items[cand], np.float64).T, cand)
