"""SASRec-style next-item transformer (Kang & McAuley, 2018) and its checkpoints (its training: recsys.training).

Why this shape:

* **Self-attention over the item sequence, learned positions, causal mask, 2 blocks, d=64,
  max_len 50, dropout 0.2** -- the SASRec recipe for MovieLens-sized data; small enough to train
  on two CPU cores in about a minute and to run on a Pi.
* **Full-softmax cross-entropy over all items** instead of SASRec's BCE with one sampled
  negative: with 1.7k items the full softmax is cheap and a clearly stronger objective.
* **Shared item embeddings for input and output** (score = h · E_i). This is what makes the
  device split work: the encoder (frozen, ONNX) maps a history to h, and the device ranks *all*
  items with one matrix product h' Eᵀ against the shipped table, so candidates never leave it.
* **Attention written out (no nn.MultiheadAttention)** with a padding-aware additive mask; a
  position always sees itself, so left-padded rows never produce NaN, and the graph exports
  cleanly with either ONNX exporter.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from coordinator.models.checkpoints import atomic_torch_save  # a killed run never leaves half a checkpoint
from edge_client.recsys.data import PAD, prefix_batch

SASREC_CHECKPOINT_FORMAT = "fedge.sasrec.checkpoint/1"


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int  # real items are 1..n_items; 0 is padding
    d: int = 64
    heads: int = 1
    blocks: int = 2
    max_len: int = 50
    dropout: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Block(nn.Module):
    """Pre-norm self-attention + point-wise feed-forward (SASRec's two-layer ReLU FFN)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, d), nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        dh = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, dh).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + mask, dim=-1)
        o = (self.drop(att) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.drop(self.proj(o))
        return x + self.drop(self.ff2(self.drop(F.relu(self.ff1(self.ln2(x))))))


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = c = config
        self.item_emb = nn.Embedding(c.n_items + 1, c.d, padding_idx=PAD)
        self.pos_emb = nn.Embedding(c.max_len, c.d)
        self.blocks = nn.ModuleList(_Block(c.d, c.heads, c.dropout) for _ in range(c.blocks))
        self.ln = nn.LayerNorm(c.d)
        self.drop = nn.Dropout(c.dropout)
        nn.init.normal_(self.item_emb.weight, std=c.d**-0.5)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def sequence(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids, left-padded -> (B, L, d) representations; position t predicts item t+1."""
        n = ids.shape[1]
        keep = (ids != PAD).unsqueeze(-1).to(self.item_emb.weight.dtype)
        pos = torch.arange(n, device=ids.device)
        x = self.item_emb(ids) * math.sqrt(self.config.d) + self.pos_emb(pos)[None]
        x = self.drop(x) * keep
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=ids.device), diagonal=1)
        eye = torch.eye(n, dtype=torch.bool, device=ids.device)
        blocked = (causal[None] | (ids == PAD)[:, None, :]) & ~eye[None]  # a position always sees itself
        mask = torch.where(blocked, torch.full_like(blocked, -1e9, dtype=x.dtype),
                           torch.zeros_like(blocked, dtype=x.dtype))[:, None]
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.ln(x)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, d): the representation after the whole (left-padded) history."""
        return self.sequence(ids)[:, -1]

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_emb.weight.T

    def item_table(self) -> np.ndarray:
        """What the device gets for scoring: (n_items + 1, d) float32, row 0 = padding."""
        return self.item_emb.weight.detach().cpu().numpy().astype(np.float32).copy()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def encode_prefixes(model: SASRec, items: np.ndarray, positions: np.ndarray, batch: int = 1024) -> np.ndarray:
    """h for every prefix items[:j], j in positions (the coordinator-side twin of the device encoder)."""
    model.eval()
    x = prefix_batch(items, positions, model.config.max_len)
    outs = [model.encode(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, model.config.d), np.float32)


# ------------------------------------------------------------------------------ checkpoints


def save_sasrec(model: SASRec, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    atomic_torch_save({"format": SASREC_CHECKPOINT_FORMAT, "config": model.config.to_dict(),
                       "state": model.state_dict(), "meta": meta or {}}, path)
    return path


def load_sasrec(path: str | os.PathLike[str]) -> tuple[SASRec, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != SASREC_CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a SASRec checkpoint ({blob.get('format')!r})")
    model = SASRec(SASRecConfig(**blob["config"]))
    model.load_state_dict(blob["state"])
    return model.eval(), blob["meta"]
