"""FeDPM: discrete prototypical memories (Deng et al., arXiv 2604.04475; ALGORITHMS.md §3).

Each client quantises the encoder's patch tokens to its nearest memory entry (VQ-VAE: straight-
through gradient, codebook + commitment losses). The memory has Q_s shared slots and Q_p personal
slots. The server pools every client's shared slots, weighted by usage, and runs weighted k-means
into one global memory: one discrete latent space across domains. At the start of a round a client
matches its shared slots to the global memory (Hungarian) and blends them, e ← (1-ω)e + ω g;
personal slots are never overwritten, so domain-specific regimes survive.

Deviation from the paper, stated: the paper keeps encoder/decoder local and shares only memories.
Here the backbone and head are also FedAvg-aggregated, because the deliverable is one pretrained
backbone to evaluate zero-shot and export. The global model quantises with the global memory.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
    torch_head_outputs,
    weighted_step,
)
from coordinator.pretrain.strategies.bilevel import kmeans, match


def quantize(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_q with straight-through gradient, the selected codes e (with gradient to the codebook),
    code indices). Forward value of z_q equals e; backward copies dL/dz_q onto z."""
    flat = z.reshape(-1, z.shape[-1])
    idx = torch.cdist(flat.detach(), codebook.detach()).argmin(1)
    e = codebook[idx].view_as(z)
    return z + (e - z).detach(), e, idx


def vq_losses(z: torch.Tensor, e: torch.Tensor, beta_c: float) -> torch.Tensor:
    """||sg[z] - e||² (moves the codebook) + β_c ||z - sg[e]||² (commits the encoder)."""
    return F.mse_loss(e, z.detach()) + beta_c * F.mse_loss(z, e.detach())


class QuantizedTSFM(nn.Module):
    """The global FeDPM model for evaluation: a TSFM whose tokens are quantised with a memory.
    Exposes the TSFM calls evaluation uses (config, features, forward, head)."""

    def __init__(self, model: TSFM, memory: torch.Tensor) -> None:
        super().__init__()
        self.model, self.config, self.head = model, model.config, model.head
        self.register_buffer("memory", memory.clone())

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return encode_tokens(self.model, x, lambda z: quantize(z, self.memory)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_head_outputs(self.model, *self.features(x))


class FeDPM(Strategy):
    name = "fedpm"

    def __init__(self, shared_slots: int = 128, personal_slots: int = 128, beta_c: float = 0.25, omega: float = 0.5,
                 align: float = 0.1, kmeans_iters: int = 10) -> None:
        # 128 + 128 slots: the paper's memory of Q = 256 entries, split evenly (ALGORITHMS.md §3). The global
        # model quantises every patch token to one of the Q_s shared entries, so Q_s bounds what it can say;
        # 32 (the earlier default, kept as a sweep point) was the bottleneck the toy-budget run paid for.
        self.q_s, self.q_p, self.beta_c, self.omega = shared_slots, personal_slots, beta_c, omega
        self.align, self.kmeans_iters = align, kmeans_iters

    def init_client(self, model: TSFM, silo: Silo) -> State:
        # Filled from the client's own tokens on its first step (data-dependent init avoids dead codes).
        codebook = torch.zeros(self.q_s + self.q_p, model.config.d_model, requires_grad=True)
        return {"codebook": codebook, "initialised": torch.zeros(())}

    def begin_round(self, model: TSFM, ctx: LocalContext) -> None:
        if "memory" not in ctx.server or not bool(ctx.client["initialised"]):
            return
        with torch.no_grad():
            cb = ctx.client["codebook"]
            shared, g = cb[: self.q_s].numpy(), ctx.server["memory"].numpy()
            perm = match(g, shared)  # shared slot perm[j] <-> global entry j
            cb[: self.q_s] = (1 - self.omega) * cb[: self.q_s][torch.from_numpy(perm)] + self.omega * ctx.server[
                "memory"]

    def _init_codebook(self, ctx: LocalContext, z: torch.Tensor, rng: np.random.Generator) -> None:
        flat = z.detach().reshape(-1, z.shape[-1])
        with torch.no_grad():
            size = self.q_s + self.q_p
            pick = torch.from_numpy(rng.choice(len(flat), size=size, replace=len(flat) < size))
            ctx.client["codebook"].copy_(flat[pick])
            if "memory" in ctx.server:
                ctx.client["codebook"][: self.q_s] = ctx.server["memory"]
            ctx.client["initialised"].fill_(1.0)

    def local_loss(self, model: TSFM, x: torch.Tensor, y: torch.Tensor, sub: torch.Tensor,
                   ctx: LocalContext) -> torch.Tensor:
        cb = ctx.client["codebook"]
        extra: list[torch.Tensor] = []

        def token_fn(z: torch.Tensor) -> torch.Tensor:
            if not bool(ctx.client["initialised"]):
                self._init_codebook(ctx, z, np.random.default_rng([ctx.round, ctx.silo.n_samples]))
            z_q, e, idx = quantize(z, cb)
            extra.append(vq_losses(z, e, self.beta_c))
            usage = ctx.scratch.setdefault("usage", torch.zeros(len(cb)))
            usage += torch.bincount(idx, minlength=len(cb)).float()
            ctx.scratch["tokens"] = z.detach().reshape(-1, z.shape[-1])
            return z_q

        features, loc, scale = encode_tokens(model, x, token_fn)
        loss = task_loss(model, features, loc, scale, y) + extra[0]
        if self.align > 0 and "memory" in ctx.server:
            loss = loss + self.align * F.mse_loss(cb[: self.q_s], ctx.server["memory"])
        return loss

    def upload(self, model: TSFM, ctx: LocalContext) -> Upload:
        usage = ctx.scratch["usage"]
        self._revive_dead_codes(ctx, usage)
        shared = ctx.client["codebook"][: self.q_s].detach().numpy().copy()
        metrics = {"perplexity": perplexity(usage)}
        return Upload(delta_update(model, ctx, metrics), {"codes": shared, "usage": usage[: self.q_s].numpy().copy()})

    @torch.no_grad()
    def _revive_dead_codes(self, ctx: LocalContext, usage: torch.Tensor) -> None:
        """Unused entries restart on random recent tokens (standard VQ practice against collapse)."""
        dead = torch.nonzero(usage <= 0).flatten()
        tokens = ctx.scratch["tokens"]
        if len(dead):
            rng = np.random.default_rng([ctx.round, ctx.silo.n_samples, 1])
            pick = torch.from_numpy(rng.choice(len(tokens), size=len(dead), replace=len(tokens) < len(dead)))
            ctx.client["codebook"][dead] = tokens[pick]

    def server_update(self, global_params: Params, uploads: list[Upload], server: State, rnd: int) -> Params:
        codes = np.concatenate([u.payload["codes"] for u in uploads])
        sizes = self.silo_weights(uploads)
        weights = np.concatenate([(u.payload["usage"] + 1.0) * w / max(u.payload["usage"].sum(), 1.0)
                                  for u, w in zip(uploads, sizes, strict=True)])
        init = server["memory"].numpy() if "memory" in server else None
        memory, _ = kmeans(codes, self.q_s, np.random.default_rng(rnd), init=init, weights=weights,
                           iters=self.kmeans_iters)
        server["memory"] = torch.from_numpy(memory)
        return weighted_step(global_params, uploads, sizes)

    def eval_model(self, model: TSFM, server: State) -> nn.Module:
        return QuantizedTSFM(model, server["memory"]) if "memory" in server else model

    def exportable(self) -> bool:
        return False  # the VQ layer is not part of the ONNX backbone


def perplexity(usage: torch.Tensor) -> float:
    """exp(entropy of code usage): ~number of codes in use; collapse shows as a value near 1."""
    p = usage / usage.sum().clamp_min(1.0)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
