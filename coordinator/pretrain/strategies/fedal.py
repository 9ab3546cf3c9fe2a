"""FeDaL (Chen et al., ICLR 2026) built on FedDBE's exact rule (Zhang et al., NeurIPS 2023;
ALGORITHMS.md §2).

DBE (client): a learnable bias b_k in feature space, ŷ = head(f(x) + b_k). It absorbs what is
peculiar to the domain, so the shared encoder/head need not; b_k never leaves the client. A mean
regulariser κ·mean(½(m_k - m̄)²) pulls the running feature mean m_k toward the global mean m̄.
Round 1 is FedDBE's initialisation round: plain training, clients upload m_k, the server sets m̄.

GBE (server): client deltas that disagree with the consensus are the biased ones; each client gets
w_k ∝ n_k exp(-||Δ_k - Δ̄|| / τ), τ = median residual, and m̄ is re-estimated (EMA 0.9) every round.
The global model is evaluated with b = 0 (a new domain has no bias of its own yet).
"""

from __future__ import annotations

import numpy as np
import torch

from coordinator.fleet import aggregation
from coordinator.fleet.aggregation import Params, global_norm
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


class FeDaL(Strategy):
    name = "fedal"

    def __init__(self, kappa: float = 1.0, momentum: float = 0.1, dbe: bool = True, gbe: bool = True,
                 mean_ema: float = 0.9) -> None:
        self.kappa, self.momentum, self.dbe, self.gbe, self.mean_ema = kappa, momentum, dbe, gbe, mean_ema

    def init_client(self, model: TSFM, silo: Silo) -> State:
        return {"dbe_bias": torch.zeros(model.config.feature_dim, requires_grad=True)} if self.dbe else {}

    def local_loss(self, model: TSFM, x: torch.Tensor, y: torch.Tensor, sub: torch.Tensor,
                   ctx: LocalContext) -> torch.Tensor:
        features, loc, scale = encode_tokens(model, x)
        # Running mean; detached history, so only the current batch carries gradient (FedDBE).
        prev = ctx.scratch.get("running_mean")
        batch_mean = features.mean(0)
        running = batch_mean if prev is None else (1 - self.momentum) * prev + self.momentum * batch_mean
        ctx.scratch["running_mean"] = running.detach()
        initialised = "global_mean" in ctx.server
        if self.dbe and initialised:
            features = features + ctx.client["dbe_bias"]
        loss = task_loss(model, features, loc, scale, y)
        if initialised and self.kappa > 0:
            loss = loss + self.kappa * torch.mean(0.5 * (running - ctx.server["global_mean"]) ** 2)
        return loss

    def upload(self, model: TSFM, ctx: LocalContext) -> Upload:
        # Only the shared weights and a D-dim mean go up; the DBE bias stays in ctx.client.
        mean = ctx.scratch["running_mean"].numpy().astype(np.float32)
        return Upload(delta_update(model, ctx), {"feature_mean": mean})

    def server_update(self, global_params: Params, uploads: list[Upload], server: State, rnd: int) -> Params:
        n = np.array(self.silo_weights(uploads), np.float64)
        means = np.stack([u.payload["feature_mean"] for u in uploads])
        pooled = (means * n[:, None]).sum(0) / n.sum()
        if "global_mean" in server:
            pooled = self.mean_ema * server["global_mean"].numpy() + (1 - self.mean_ema) * pooled
        server["global_mean"] = torch.from_numpy(pooled.astype(np.float32))
        weights = gbe_weights([u.update.delta for u in uploads], n) if self.gbe else n / n.sum()
        server["weights"] = torch.from_numpy(weights.astype(np.float32))
        return weighted_step(global_params, uploads, list(weights))


def gbe_weights(deltas: list, n: np.ndarray) -> np.ndarray:
    """n_k exp(-r_k/τ) with r_k = ||Δ_k - Δ̄||, Δ̄ the sample-weighted mean delta, τ = median r_k."""
    mean = aggregation.weighted_mean(deltas, list(n))
    resid = np.array([global_norm({k: np.asarray(d[k], np.float64) - mean[k] for k in mean}) for d in deltas])
    tau = float(np.median(resid))
    w = n * np.exp(-(resid - resid.min()) / tau) if tau > 0 else n.copy()
    return w / w.sum()
