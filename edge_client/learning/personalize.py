"""On-device personalisation and continual learning on top of the frozen ONNX backbone (numpy only).

Why this exists: a device's data drifts, is faulty and short. The global head (edge_client/adapters)
is one model for the whole fleet; this module gives each device a :class:`PersonalModel` it owns,
plus the methods from the research this project builds on, each switched on in
:class:`PersonalConfig` and freely combinable:

* low-rank residual feature adapter  h' = h + (h A) B  (B starts at 0, so a fresh adapter is the
  identity and the pretrained head's forecasts are unchanged), then the linear point + quantile head
  on h' (same head layout as :mod:`edge_client.learning.head`, so global heads drop in);
* task loss: MSE + pinball (as the coordinator's pretraining), optional FedProx;
* time-aware self-distillation (FCUCR, ALGORITHMS.md §4): match the previous personal model's
  forecasts on the new data with weight λ_sd·exp(−Δt/τ), so old patterns are not erased by new data
  but old knowledge counts less the older it is;
* FedOA feature distance (§6): λ_fd·mean||h'_p − sg(h'_g)||², personal features stay near the global
  adapter's, which keeps the global model's out-of-distribution robustness;
* distortion consistency (Meta-FC, §8): task loss on distorted contexts and λ_fc·mean||h'(d(x)) −
  sg(h'(x))||², optionally with a first-order meta-train/meta-test split over distortions;
* FVG-PT gate with prior calibration (§7): ŷ = r·ŷ_p + (1−r)·[c·ŷ_g + (1−c)·ŷ_0]; r = κ·σ(w·s + b)
  learned on a local validation split, κ = n/(n+n₀) shrinks toward the global/prior when the device
  has little data; c calibrated on the validation split and shrunk toward its prior value.

All gradients are analytic (tests check them by finite differences); no autograd on a device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from edge_client.learning.head import (
    HEAD_KEYS,
    Adam,
    Features,
    Params,
    as_float32,
    head_backward,
    head_forecast,
    head_outputs,
    output_grads,
)

ADAPTER_KEYS = ("adapter_A", "adapter_B")
GATE_KEYS = ("gate_w", "gate_b")
N_GATE_STATS = 4


@dataclass(frozen=True)
class PersonalConfig:
    """Which personalisation terms are on (weight 0 = off) and how the device trains."""

    rank: int = 4  # adapter rank; 0 trains the head only
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    quantile_weight: float = 1.0
    prox_mu: float = 0.0  # FedProx toward the round's starting model
    self_distill: float = 0.0  # λ_sd, time-aware self-distillation from the previous personal model
    sd_tau_days: float = 60.0  # τ of w(Δt) = exp(−Δt/τ)
    feature_distance: float = 0.0  # λ_fd, FedOA
    consistency: float = 0.0  # λ_fc, Meta-FC feature consistency (needs distorted views)
    distorted_task_weight: float = 0.5  # weight of the task loss on distorted inputs (when views are given)
    meta: bool = False  # first-order meta-train/meta-test over two different distortions per step
    gate: bool = False  # FVG-PT gated global/personal mixing with prior calibration
    gate_prior_count: float = 100.0  # n₀ of κ = n/(n+n₀)
    gate_c_init: float = 0.8
    gate_entropy: float = 0.01
    gate_epochs: int = 200
    naive_prior: bool = False  # the gate's prior is the seasonal-naive forecast (edge_client.learning.serving)
    rules: bool = False  # learned rule guards (edge_client.learning.rules) correct the served forecasts
    track_record: float = 0.0  # β of the prequential track record that picks what to serve (0: off; serving.py)
    track_margin: float = 0.02  # a candidate other than the global head must beat its record by this fraction
    track_combine: bool = False  # the track record also offers the best convex combination of its candidates
    repair: bool = False  # repair stuck runs, spikes and gaps in the contexts and targets (repair.py)
    huber: float = 0.0  # δ of a Huber point loss for the personal model (0: squared error; head.output_grads)
    epochs: int = 5
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.track_record < 1.0 or not 0.0 <= self.track_margin < 1.0:
            raise ValueError("track_record and track_margin must lie in [0, 1)")

    @property
    def uses_distortions(self) -> bool:
        return self.consistency > 0 or self.meta


def sd_weight(dt_days: float, tau_days: float) -> float:
    """w(Δt) = exp(−Δt/τ): a snapshot from long ago constrains the new model less."""
    return float(np.exp(-max(dt_days, 0.0) / max(tau_days, 1e-9)))


# ------------------------------------------------------------------------------------ the model

def init_params(head: Mapping[str, np.ndarray], rank: int, seed: int = 0) -> Params:
    """Head + adapter. A is a fixed seeded random projection (scale 1/√D), B = 0: the adapter starts
    as the identity. Every device of a fleet must use the same seed so adapters can be averaged."""
    params = as_float32({k: head[k] for k in HEAD_KEYS})
    d = params["point_weight"].shape[1]
    rng = np.random.default_rng(seed)
    params["adapter_A"] = (rng.normal(0.0, 1.0, (d, rank)) / np.sqrt(d)).astype(np.float32)
    params["adapter_B"] = np.zeros((rank, d), np.float32)
    return params


def adapt(params: Mapping[str, np.ndarray], feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h' = h + (h A) B, and h A (kept for the backward pass)."""
    if "adapter_A" not in params or params["adapter_A"].shape[1] == 0:
        return feats, np.zeros((len(feats), 0), feats.dtype)
    ha = feats @ params["adapter_A"]
    return feats + ha @ params["adapter_B"], ha


def personal_forecast(params: Mapping[str, np.ndarray], x: Features) -> tuple[np.ndarray, np.ndarray]:
    """Point (N, H) and quantile (N, Q, H) forecasts in data units through adapter + head."""
    h, _ = adapt(params, x.feats)
    return head_forecast(params, Features(h, x.loc, x.scale))


# ------------------------------------------------------------------------------------ batches

@dataclass(frozen=True)
class Batch:
    """Everything one loss evaluation needs. Optional parts switch terms on:
    prev_* (self-distillation targets, normalised units), global_h (FedOA), distorted (Meta-FC)."""

    x: Features
    y: np.ndarray  # (N, H) clean targets in data units
    prev_point: np.ndarray | None = None  # (N, H)
    prev_quant: np.ndarray | None = None  # (N, Q, H)
    global_h: np.ndarray | None = None  # (N, D) global adapter features (stop-gradient)
    distorted: tuple[Features, ...] = ()
    clean_h: np.ndarray | None = None  # (N, D) fixed consistency target; None: sg(h'(x)) at current params

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Batch:
        def sub(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return Batch(self.x.subset(idx), self.y[idx], sub(self.prev_point), sub(self.prev_quant),
                     sub(self.global_h), tuple(d.subset(idx) for d in self.distorted), sub(self.clean_h))

    def with_view(self, k: int | None) -> Batch:
        """The batch with only distorted view `k` (None: no distorted view)."""
        return replace(self, distorted=() if k is None else (self.distorted[k],))


# ------------------------------------------------------------------------------------ losses

def task_output_grads(
    point: np.ndarray, quant: np.ndarray, y: np.ndarray, scale: np.ndarray, cfg: PersonalConfig, weight: float = 1.0
) -> tuple[float, np.ndarray, np.ndarray]:
    """The shared task loss (edge_client.learning.head.output_grads) with this config's quantile settings."""
    return output_grads(point, quant, y, scale, cfg.quantiles, cfg.quantile_weight, weight, cfg.huber)


def adapter_backward(params: Mapping[str, np.ndarray], feats: np.ndarray, ha: np.ndarray, g_h: np.ndarray) -> Params:
    """h' = h + (hA)B ⇒ ∂L/∂B = (hA)ᵀ g, ∂L/∂A = hᵀ (g Bᵀ)."""
    if "adapter_A" not in params:
        return {}
    return {"adapter_A": feats.T @ (g_h @ params["adapter_B"].T), "adapter_B": ha.T @ g_h}


def _add(total: Params, part: Mapping[str, np.ndarray]) -> None:
    for k, g in part.items():
        total[k] = total[k] + g if k in total else np.asarray(g, np.float64)


def _branch(
    params: Mapping[str, np.ndarray], x: Features, y: np.ndarray, cfg: PersonalConfig, weight: float,
    extra_gh: np.ndarray | None = None,
) -> tuple[float, Params, np.ndarray]:
    """Task loss of one input view (clean or distorted) through adapter + head; returns h' too."""
    h, ha = adapt(params, x.feats)
    point_n, quant_n = head_outputs(params, h)
    point = point_n * x.scale + x.loc
    quant = quant_n * x.scale[:, :, None] + x.loc[:, :, None]
    loss, g_point, g_quant = task_output_grads(point, quant, y, x.scale, cfg, weight)
    grads, g_h = head_backward(params, h, g_point, g_quant)
    if extra_gh is not None:
        g_h = g_h + extra_gh
    _add(grads, adapter_backward(params, x.feats, ha, g_h))
    return loss, grads, h


def personal_loss_and_grad(
    params: Mapping[str, np.ndarray],
    batch: Batch,
    cfg: PersonalConfig,
    *,
    anchor: Mapping[str, np.ndarray] | None = None,
    sd_w: float = 1.0,
) -> tuple[float, Params, dict[str, float]]:
    """Total loss, exact gradient for every parameter, and each term's value (for logs).

    Terms: task(clean) [+ w_d·task(distorted) + λ_fc·consistency] [+ λ_sd·sd_w·distill]
    [+ λ_fd·feature distance] [+ μ/2·||θ − anchor||²]."""
    n, d = batch.x.feats.shape
    parts: dict[str, float] = {}
    h, ha = adapt(params, batch.x.feats)
    point_n, quant_n = head_outputs(params, h)
    x = batch.x
    point, quant = point_n * x.scale + x.loc, quant_n * x.scale[:, :, None] + x.loc[:, :, None]
    loss, g_point, g_quant = task_output_grads(point, quant, batch.y, x.scale, cfg)
    parts["task"] = loss
    if cfg.self_distill > 0 and batch.prev_point is not None and sd_w > 0:
        lam = cfg.self_distill * sd_w
        dp, dq = point_n - batch.prev_point, quant_n - batch.prev_quant
        parts["distill"] = lam * (float(np.mean(dp**2)) + float(np.mean(dq**2)))
        g_point = g_point + (2.0 * lam / dp.size) * dp
        g_quant = g_quant + (2.0 * lam / dq.size) * dq
    grads, g_h = head_backward(params, h, g_point, g_quant)
    if cfg.feature_distance > 0 and batch.global_h is not None:
        diff = h - batch.global_h
        parts["feature_distance"] = cfg.feature_distance * float(np.mean(diff**2))
        g_h = g_h + (2.0 * cfg.feature_distance / (n * d)) * diff
    _add(grads, adapter_backward(params, x.feats, ha, g_h))
    for view in batch.distorted:
        w = cfg.distorted_task_weight / len(batch.distorted)
        lam = cfg.consistency / len(batch.distorted)
        hd, _ = adapt(params, view.feats)
        target = h if batch.clean_h is None else batch.clean_h
        diff = hd - target  # a stop-gradient target: no gradient flows into the clean branch
        extra = (2.0 * lam / (n * d)) * diff if lam > 0 else None
        l_d, g_d, _ = _branch(params, view, batch.y, cfg, w, extra)
        parts["distorted_task"] = parts.get("distorted_task", 0.0) + l_d
        parts["consistency"] = parts.get("consistency", 0.0) + lam * float(np.mean(diff**2))
        _add(grads, g_d)
    if cfg.prox_mu > 0 and anchor is not None:
        prox = 0.0
        for k in anchor:
            diff = np.asarray(params[k], np.float64) - anchor[k]
            prox += 0.5 * cfg.prox_mu * float(np.sum(diff**2))
            grads[k] = grads[k] + cfg.prox_mu * diff
        parts["prox"] = prox
    total = float(sum(parts.values()))
    return total, {k: np.asarray(g, np.float32) for k, g in grads.items()}, parts


# ------------------------------------------------------------------------------------ training

@dataclass(frozen=True)
class TrainLog:
    losses: list[float]  # mean total loss per epoch
    parts: dict[str, float]  # last epoch's mean of each term
    steps: int


def _step_grads(
    params: Params, batch: Batch, cfg: PersonalConfig, anchor: Params | None, sd_w: float, rng: np.random.Generator
) -> tuple[float, Params, dict[str, float]]:
    """One step's gradient. With distorted views: one random view per step (single random
    distortion), or with cfg.meta the first-order meta-train/meta-test sum over two views."""
    views = len(batch.distorted)
    if views == 0:
        return personal_loss_and_grad(params, batch, cfg, anchor=anchor, sd_w=sd_w)
    if not cfg.meta or views < 2:
        return personal_loss_and_grad(params, batch.with_view(int(rng.integers(views))), cfg, anchor=anchor, sd_w=sd_w)
    k_tr, k_te = rng.choice(views, 2, replace=False)
    loss, g_tr, parts = personal_loss_and_grad(params, batch.with_view(int(k_tr)), cfg, anchor=anchor, sd_w=sd_w)
    inner = {k: params[k] - cfg.lr * g_tr[k] for k in params}
    loss_te, g_te, _ = personal_loss_and_grad(inner, batch.with_view(int(k_te)), cfg, anchor=anchor, sd_w=sd_w)
    parts["meta_test"] = loss_te
    return loss + loss_te, {k: g_tr[k] + g_te[k] for k in g_tr}, parts


def train(
    init: Mapping[str, np.ndarray], batch: Batch, cfg: PersonalConfig, *,
    anchor: Mapping[str, np.ndarray] | None = None, sd_w: float = 1.0, seed: int | None = None,
) -> tuple[Params, TrainLog]:
    """Mini-batch Adam over all personal parameters from `init`; deterministic for a seed."""
    params = as_float32(init)
    anchor_p = as_float32(anchor) if anchor is not None and cfg.prox_mu > 0 else None
    opt = Adam(lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    losses: list[float] = []
    sums: dict[str, float] = {}
    for _ in range(cfg.epochs):
        order = rng.permutation(len(batch))
        total, sums = 0.0, {}
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss, grads, parts = _step_grads(params, batch.subset(idx), cfg, anchor_p, sd_w, rng)
            opt.step(params, grads)
            total += loss * len(idx)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
        losses.append(total / max(len(batch), 1))
    parts = {k: v / max(len(batch), 1) for k, v in sums.items()}
    return params, TrainLog(losses, parts, opt.t)


# ------------------------------------------------------------------------------------ FVG-PT gate

def gate_stats(x: Features, personal_point: np.ndarray, global_point: np.ndarray,
               missing_rate: np.ndarray | None = None) -> np.ndarray:
    """Per-window reliability cues (N, 4): RevIN level and log-spread of the context, how much the
    personal and global forecasts disagree (in context-std units), and the context's missing rate."""
    miss = np.zeros(len(x)) if missing_rate is None else np.asarray(missing_rate, np.float64)
    disagree = np.mean(np.abs(personal_point - global_point), axis=1) / np.maximum(x.scale[:, 0], 1e-6)
    return np.stack([x.loc[:, 0], np.log(np.maximum(x.scale[:, 0], 1e-6)), disagree, miss], axis=1).astype(np.float64)


def gate_loss_and_grad(
    gate: Mapping[str, np.ndarray], stats: np.ndarray, kappa: float,
    personal: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray], y: np.ndarray,
    cfg: PersonalConfig,
) -> tuple[float, Params]:
    """Loss of ŷ = r·ŷ_p + (1−r)·ŷ_m with r = κ·σ(w·s + b), minus λ_H·mean entropy of σ (keeps the
    gate from saturating on a small validation split); gradient w.r.t. w and b."""
    z = stats @ gate["gate_w"] + gate["gate_b"]
    sig = 1.0 / (1.0 + np.exp(-z))
    r = kappa * sig
    (pp, pq), (mp, mq) = personal, other
    point = r[:, None] * pp + (1 - r[:, None]) * mp
    quant = r[:, None, None] * pq + (1 - r[:, None, None]) * mq
    loss, g_point, g_quant = task_output_grads(point, quant, y, np.ones((len(y), 1)), cfg)
    g_r = np.sum(g_point * (pp - mp), axis=1) + np.sum(g_quant * (pq - mq), axis=(1, 2))
    s = np.clip(sig, 1e-12, 1 - 1e-12)
    ent = -(s * np.log(s) + (1 - s) * np.log(1 - s))
    loss -= cfg.gate_entropy * float(np.mean(ent))
    g_sig = g_r * kappa - cfg.gate_entropy * np.log((1 - s) / s) / len(s)
    g_z = g_sig * sig * (1 - sig)
    return float(loss), {"gate_w": stats.T @ g_z, "gate_b": np.asarray(g_z.sum())}


@dataclass
class Gate:
    """FVG-PT gate for one device: learned reliability gate r and calibrated prior weight c."""

    w: np.ndarray = field(default_factory=lambda: np.zeros(N_GATE_STATS))
    b: float = 0.0  # σ(0) = 0.5: no preference before any evidence
    c: float = 0.8
    kappa: float = 1.0  # n/(n+n₀): little local data ⇒ r → 0 ⇒ forecast → calibrated global/prior
    stat_mean: np.ndarray = field(default_factory=lambda: np.zeros(N_GATE_STATS))
    stat_std: np.ndarray = field(default_factory=lambda: np.ones(N_GATE_STATS))

    def r(self, stats: np.ndarray) -> np.ndarray:
        z = ((stats - self.stat_mean) / self.stat_std) @ self.w + self.b
        return self.kappa / (1.0 + np.exp(-z))

    def mix(self, stats: np.ndarray, personal: tuple[np.ndarray, np.ndarray], glob: tuple[np.ndarray, np.ndarray],
            prior: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        r = self.r(stats)
        out = []
        for p, g, z in zip(personal, glob, prior, strict=True):
            rr = r.reshape((-1,) + (1,) * (p.ndim - 1))
            out.append(rr * p + (1 - rr) * (self.c * g + (1 - self.c) * z))
        return out[0], out[1]


def calibrate_c(glob: np.ndarray, prior: np.ndarray, y: np.ndarray, n_val: int, cfg: PersonalConfig) -> float:
    """Prior calibration: the c ∈ [0, 1] that best mixes global and prior point forecasts on the
    validation split (closed-form least squares), shrunk toward cfg.gate_c_init by n/(n+n₀) so a
    few validation windows cannot throw the prior away."""
    d = (glob - prior).ravel()
    denom = float(d @ d)
    c_hat = float(np.clip(((y - prior).ravel() @ d) / denom, 0.0, 1.0)) if denom > 1e-12 else cfg.gate_c_init
    shrink = n_val / (n_val + cfg.gate_prior_count)
    return shrink * c_hat + (1 - shrink) * cfg.gate_c_init


def fit_gate(
    stats: np.ndarray, personal: tuple[np.ndarray, np.ndarray], glob: tuple[np.ndarray, np.ndarray],
    prior: tuple[np.ndarray, np.ndarray], y: np.ndarray, n_train: int, cfg: PersonalConfig,
) -> Gate:
    """Fit c (calibration) then w, b (full-batch Adam) on a local validation split."""
    mean, std = stats.mean(axis=0), stats.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    gate = Gate(c=calibrate_c(glob[0], prior[0], y, len(y), cfg),
                kappa=n_train / (n_train + cfg.gate_prior_count), stat_mean=mean, stat_std=std)
    other = tuple(gate.c * g + (1 - gate.c) * z for g, z in zip(glob, prior, strict=True))
    s = (stats - mean) / std
    params: Params = {"gate_w": np.zeros(stats.shape[1]), "gate_b": np.zeros(())}
    opt = Adam(lr=0.05)
    for _ in range(cfg.gate_epochs):
        _, grads = gate_loss_and_grad(params, s, gate.kappa, personal, other, y, cfg)
        opt.step(params, grads)
    gate.w, gate.b = params["gate_w"].copy(), float(params["gate_b"])
    return gate


# ------------------------------------------------------------------------------------ the device object

@dataclass
class PersonalModel:
    """A device's own forecaster: adapter + head parameters, an optional gate, and the snapshot
    used for self-distillation. It never leaves the device; only deltas of the shared part do."""

    params: Params
    cfg: PersonalConfig
    gate: Gate | None = None
    trained_at_day: float | None = None  # time of the data the current params were fit on
    log: TrainLog | None = None

    @classmethod
    def from_head(cls, head: Mapping[str, np.ndarray], cfg: PersonalConfig, seed: int = 0) -> PersonalModel:
        return cls(init_params(head, cfg.rank, seed), cfg)

    def predict(self, x: Features) -> tuple[np.ndarray, np.ndarray]:
        return personal_forecast(self.params, x)

    def distill_targets(self, x: Features) -> tuple[np.ndarray, np.ndarray]:
        h, _ = adapt(self.params, x.feats)
        return head_outputs(self.params, h)

    def fit(
        self, x: Features, y: np.ndarray, *, start: Mapping[str, np.ndarray] | None = None, now_day: float = 0.0,
        global_params: Mapping[str, np.ndarray] | None = None, distorted: tuple[Features, ...] = (),
        seed: int | None = None,
    ) -> PersonalModel:
        """Train on the current data from `start` (default: own params) and return the new model.
        Self-distillation uses *this* model as the teacher, weighted by the time since it was fit."""
        cfg = self.cfg
        prev_p = prev_q = None
        w = 0.0
        if cfg.self_distill > 0 and self.trained_at_day is not None:
            w = sd_weight(now_day - self.trained_at_day, cfg.sd_tau_days)
            prev_p, prev_q = self.distill_targets(x)
        global_h = adapt(global_params, x.feats)[0] if cfg.feature_distance > 0 and global_params else None
        batch = Batch(x, y, prev_p, prev_q, global_h, distorted if cfg.uses_distortions else ())
        init = self.params if start is None else start
        params, log = train(init, batch, cfg, anchor=init, sd_w=w, seed=seed)
        return PersonalModel(params, cfg, None, now_day, log)
