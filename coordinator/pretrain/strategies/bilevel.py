"""Bi-level heterogeneity ("FedTRL", Chen et al., arXiv 2604.06727; ALGORITHMS.md §1).

Intra-domain (inside a client): a domain classifier over the client's sub-datasets (its datasets,
e.g. ETTh1 vs electricity; KernelSynth vs TSMixup) sits behind a gradient-reversal layer, so the
encoder is pushed toward features from which the sub-dataset cannot be told apart (DANN). Semantic
consistency: batch features are assigned to the nearest global prototype and each cluster mean is
pulled toward that prototype, relative to the batch's feature spread.

Warm start (default: the first half of training is plain FedAvg). Both regularisers have a trivial
minimiser, constant features (the forecast then survives on RevIN's level alone: the "predict the
level" plateau the cold-started runs stayed on). DANN, the GRL's source, adapts a feature extractor
that already solves the task, and the paper pretrains a forecaster whose features are then made
invariant and aligned; a warm start from a FedAvg model is that setting. The DANN ramp restarts at
the switch-on, and the server aggregates with plain n_k weights until then.

Inter-domain (server): clients upload k-means prototypes of their features; the server matches
them to the barycenter (Hungarian), re-estimates the barycenter, and weights each client by
n_k * exp(-d_k / β) -- the closed form of max_w Σ w_k(-d_k) + β H(w) -- where d_k is the client's
prototype distance to the barycenter and β their median.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from coordinator.fleet.aggregation import Params
from coordinator.models.tsfm import TSFM
from coordinator.pretrain.silos import Silo
from coordinator.pretrain.strategies import (
    LocalContext,
    State,
    Strategy,
    Upload,
    delta_update,
    encode_tokens,
    task_loss,
    weighted_step,
)


class GradReverse(torch.autograd.Function):
    """Identity forward, gradient multiplied by -γ backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: float) -> torch.Tensor:
        ctx.gamma = gamma
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.gamma * grad, None


def grl(x: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    return GradReverse.apply(x, gamma)


def dann_gamma(progress: float) -> float:
    """DANN's ramp 2/(1+e^{-10p}) - 1: no reversal while features are still random."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, init: np.ndarray | None = None,
           weights: np.ndarray | None = None, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Lloyd k-means; returns (centroids (k, d), total weight per centroid (k,)).
    Empty clusters keep their previous centroid so centroid j stays comparable across calls."""
    w = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
    centroids = (init.copy() if init is not None else x[rng.choice(len(x), size=k, replace=len(x) < k)]).astype(
        np.float64)
    for _ in range(iters):
        assign = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            m = assign == j
            if w[m].sum() > 0:
                centroids[j] = np.average(x[m], axis=0, weights=w[m])
    assign = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    mass = np.bincount(assign, weights=w, minlength=k)
    return centroids.astype(np.float32), mass


def match(reference: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """perm such that candidates[perm[j]] is matched to reference[j] (Hungarian on L2; greedy
    nearest fallback when scipy is missing)."""
    cost = np.sqrt(((reference[:, None, :] - candidates[None]) ** 2).sum(-1))
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy ships with statsforecast
        return cost.argmin(1)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


class BiLevel(Strategy):
    name = "bilevel"

    def __init__(self, lam: float = 0.1, alpha: float = 0.5, n_protos: int = 8, uniform: bool = False,
                 proto_batches: int = 4, warm_start: float = 0.5) -> None:
        self.lam, self.alpha, self.n_protos, self.uniform = lam, alpha, n_protos, uniform
        self.proto_batches = proto_batches
        # Fraction of training run as plain FedAvg before the regularisers switch on: a warm start from
        # a FedAvg model, so invariance and prototype alignment act on forecasting features instead of
        # pulling random initial features to their trivial (constant) minimiser. 0 = cold start.
        self.warm_start = warm_start

    def active(self, progress: float) -> bool:
        return progress >= self.warm_start

    def ramp(self, progress: float) -> float:
        """DANN's γ over the regularised part of training (from the warm start's end, not from 0)."""
        return dann_gamma((progress - self.warm_start) / max(1e-9, 1.0 - self.warm_start))

    def init_client(self, model: TSFM, silo: Silo) -> State:
        if silo.n_sub < 2 or self.lam == 0:
            return {}
        d = model.config.feature_dim
        g = torch.Generator().manual_seed(silo.n_sub)
        w = (torch.randn(silo.n_sub, d, generator=g) / math.sqrt(d)).requires_grad_(True)
        return {"dom_weight": w, "dom_bias": torch.zeros(silo.n_sub, requires_grad=True)}

    def local_loss(self, model: TSFM, x: torch.Tensor, y: torch.Tensor, sub: torch.Tensor,
                   ctx: LocalContext) -> torch.Tensor:
        features, loc, scale = encode_tokens(model, x)
        loss = task_loss(model, features, loc, scale, y)
        buf = ctx.scratch.setdefault("features", [])
        buf.append(features.detach())
        del buf[: -self.proto_batches]  # the last few batches describe the end-of-round encoder
        ctx.scratch["active"] = self.active(ctx.progress)
        if not ctx.scratch["active"]:  # warm start: plain FedAvg (prototypes still go up for the barycenter)
            return loss
        if "dom_weight" in ctx.client:
            logits = F.linear(grl(features, self.ramp(ctx.progress)), ctx.client["dom_weight"], ctx.client["dom_bias"])
            loss = loss + self.lam * F.cross_entropy(logits, sub)
        if self.alpha > 0 and "barycenter" in ctx.server:
            loss = loss + self.alpha * prototype_alignment(features, ctx.server["barycenter"])
        return loss

    def upload(self, model: TSFM, ctx: LocalContext) -> Upload:
        feats = torch.cat(ctx.scratch["features"]).numpy()
        rng = np.random.default_rng([ctx.round, ctx.silo.n_samples])
        init = ctx.server["barycenter"].numpy() if "barycenter" in ctx.server else None
        protos, mass = kmeans(feats, self.n_protos, rng, init=init)
        active = np.float32(bool(ctx.scratch.get("active", True)))
        return Upload(delta_update(model, ctx), {"prototypes": protos, "mass": mass.astype(np.float32),
                                                 "active": np.array(active, np.float32)})

    def server_update(self, global_params: Params, uploads: list[Upload], server: State, rnd: int) -> Params:
        protos = [u.payload["prototypes"] for u in uploads]
        sizes = np.array(self.silo_weights(uploads), np.float64)
        mass = [u.payload["mass"] * n for u, n in zip(uploads, sizes, strict=True)]
        ref = server["barycenter"].numpy() if "barycenter" in server else protos[int(np.argmax(
            [u.update.n_samples for u in uploads]))]
        perms = [match(ref, p) for p in protos]
        matched = np.stack([p[perm] for p, perm in zip(protos, perms, strict=True)])  # (K, J, D)
        masses = np.stack([m[perm] for m, perm in zip(mass, perms, strict=True)]) + 1e-8  # (K, J)
        barycenter = (matched * masses[..., None]).sum(0) / masses.sum(0)[:, None]
        dist = np.sqrt(((matched - barycenter[None]) ** 2).sum(-1)).mean(1)  # d_k
        warm = not any(float(u.payload.get("active", 1.0)) for u in uploads)  # still the FedAvg warm start
        weights = domain_weights(dist, sizes, self.uniform or warm)
        server["barycenter"] = torch.from_numpy(barycenter.astype(np.float32))
        server["weights"] = torch.from_numpy(weights.astype(np.float32))
        return weighted_step(global_params, uploads, list(weights))


def prototype_alignment(features: torch.Tensor, barycenter: torch.Tensor) -> torch.Tensor:
    """Mean over occupied clusters of ||batch cluster mean - global prototype||², divided by the
    batch's feature spread (mean squared distance of a feature to the batch mean).

    Why the division: unnormalised, the term is driven to zero by shrinking all features toward one
    point near the prototypes (the head rescales, RevIN keeps the level) -- the constant-feature
    minimiser, which aligns nothing. As a ratio, collapse makes it grow instead, so it can only be
    lowered by moving clusters toward their prototypes relative to how far features spread."""
    assign = torch.cdist(features.detach(), barycenter).argmin(1)
    onehot = F.one_hot(assign, len(barycenter)).float()  # (B, J)
    count = onehot.sum(0)
    occupied = count > 0
    means = (onehot.T @ features)[occupied] / count[occupied, None]
    spread = torch.sum((features - features.mean(0)) ** 2, dim=1).mean()
    return torch.mean(torch.sum((means - barycenter[occupied]) ** 2, dim=1)) / (spread + 1e-6)


def domain_weights(dist: np.ndarray, n: np.ndarray, uniform: bool = False) -> np.ndarray:
    """w_k ∝ n_k exp(-d_k/β), β = median d_k: the entropy-regularised optimum, scaled so a
    client with the median distance keeps e^-1 of its FedAvg weight relative to a perfect one."""
    if uniform:
        return n / n.sum()
    beta = float(np.median(dist))
    w = n * np.exp(-(dist - dist.min()) / beta) if beta > 0 else n.copy()
    return w / w.sum()
