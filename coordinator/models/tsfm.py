"""A tiny patch-transformer time-series foundation model (PatchTST family).

The model is split where the fleet needs it split:

* :class:`TSFMBackbone` -- RevIN, patching, a pre-norm transformer encoder and a flatten->feature
  projection. It is exported once to ONNX and stays frozen on the device.
* :class:`ForecastHead` -- a *linear* point head and a *linear* quantile head on the backbone
  features. Linear on purpose: the device retrains it in numpy with analytic gradients and uploads
  it, so it must be reproducible with two matrix products and nothing else::

      point_n = f @ W_p.T + b_p                          # (N, H)
      q_n     = einsum("nd,qhd->nqh", f, W_q) + b_q      # (N, Q, H)
      point   = point_n * scale + loc                    # RevIN de-normalisation

Channel independence: every input is one univariate window (B, L); a multichannel series is fed
as B = batch * channels rows through shared weights, like PatchTST.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_client.learning.head import HEAD_KEYS

REVIN_EPS = 1e-5


@dataclass(frozen=True)
class TSFMConfig:
    """Hyper-parameters of the TSFM; hashable and JSON-serialisable (checkpoints and ONNX specs
    carry it, the pretraining cache is keyed by it)."""

    context: int = 512
    horizon: int = 96
    patch_len: int = 16
    stride: int = 8
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 3
    d_ff: int = 128
    dropout: float = 0.2  # ETTh1 overfits within a few hundred steps; 0.2 beat 0.1 on validation
    feature_dim: int = 64
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)

    def __post_init__(self) -> None:
        # Fail at construction, not deep inside a forward pass or an ONNX export.
        if self.context < self.patch_len:
            raise ValueError(f"context {self.context} is shorter than patch_len {self.patch_len}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if min(self.horizon, self.stride, self.feature_dim, self.n_layers) < 1:
            raise ValueError("horizon, stride, feature_dim and n_layers must be positive")
        if not all(0.0 < q < 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must lie in (0, 1): {self.quantiles}")
        object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))

    @property
    def n_patches(self) -> int:
        """PatchTST padding: `stride` copies of the last value are appended, which yields one
        extra patch so the newest values are covered: N = (L - P) // S + 2."""
        return (self.context - self.patch_len) // self.stride + 2

    @property
    def n_quantiles(self) -> int:
        return len(self.quantiles)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TSFMConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected so a newer/other file is not
        silently half-read."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TSFMConfig keys: {sorted(unknown)}")
        d = dict(d)
        if "quantiles" in d:
            d["quantiles"] = tuple(d["quantiles"])
        return cls(**d)

    @classmethod
    def tiny(cls, **overrides: Any) -> TSFMConfig:
        """The default size class (≤1M parameters): runs on a Raspberry Pi 4 in milliseconds."""
        return cls(**overrides)

    @classmethod
    def small(cls, **overrides: Any) -> TSFMConfig:
        """The larger size class (≤5M parameters) for Pi 5 / Jetson. feature_dim stays ≤128 so
        the uploaded head (feature_dim * 24 * (1+Q) float16 values) stays under 32 KB."""
        base: dict[str, Any] = dict(d_model=128, n_heads=8, n_layers=4, d_ff=256, feature_dim=128)
        base.update(overrides)
        return cls(**base)


def revin_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window mean and std (population variance + eps, no affine): the level/scale the
    model forecasts relative to, so it transfers across series of any unit."""
    loc = x.mean(dim=-1, keepdim=True)
    scale = torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + REVIN_EPS)
    return loc, scale


class TSFMBackbone(nn.Module):
    """Raw window (B, L) -> (features (B, D), loc (B, 1), scale (B, 1)).

    The features are a GELU of a linear projection of the flattened encoder tokens: the
    projection keeps PatchTST's flatten head expressive, the nonlinearity gives the linear
    device head a richer basis than a low-rank linear map would.
    """

    def __init__(self, config: TSFMConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Linear(c.patch_len, c.d_model)
        self.pos_embed = nn.Parameter(torch.empty(1, c.n_patches, c.d_model))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.dropout = nn.Dropout(c.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=c.d_model,
            nhead=c.n_heads,
            dim_feedforward=c.d_ff,
            dropout=c.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # No dropout on the attention weights (PatchTST's attn_dropout=0): on CPU sampling that
        # (B, heads, N, N) mask took ~40 % of a training step, for no accuracy gain on ETT.
        layer.self_attn.dropout = 0.0
        # Pre-norm needs a final norm; nested tensors only matter with padding masks (none here).
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=c.n_layers, norm=nn.LayerNorm(c.d_model), enable_nested_tensor=False
        )
        self.project = nn.Linear(c.n_patches * c.d_model, c.feature_dim)
        self.activation = nn.GELU()

    def patchify(self, xn: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, N, P): replicate-pad `stride` values at the end, then slide."""
        c = self.config
        pad = xn[:, -1:].expand(-1, c.stride)
        return torch.cat([xn, pad], dim=1).unfold(1, c.patch_len, c.stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loc, scale = revin_stats(x)
        tokens = self.patch_embed(self.patchify((x - loc) / scale)) + self.pos_embed
        tokens = self.encoder(self.dropout(tokens))
        features = self.activation(self.project(tokens.flatten(1)))
        return features, loc, scale


class ForecastHead(nn.Module):
    """Linear point + quantile heads, in RevIN-normalised space (see the module docstring for
    the exact formula the device reproduces)."""

    def __init__(self, feature_dim: int, horizon: int, quantiles: tuple[float, ...]) -> None:
        super().__init__()
        self.point = nn.Linear(feature_dim, horizon)
        self.quantile_weight = nn.Parameter(torch.empty(len(quantiles), horizon, feature_dim))
        self.quantile_bias = nn.Parameter(torch.empty(len(quantiles), horizon))
        self.reset_quantiles(quantiles)

    @torch.no_grad()
    def reset_quantiles(self, quantiles: tuple[float, ...]) -> None:
        """Start every quantile at the point forecast, nudged by a small normal-score offset so
        the bands are ordered from step one; pinball loss then only has to widen them."""
        z = torch.tensor([_normal_ppf(q) for q in quantiles], dtype=torch.float32)
        self.quantile_weight.copy_(self.point.weight.unsqueeze(0).expand_as(self.quantile_weight))
        self.quantile_bias.copy_(self.point.bias.unsqueeze(0) + 0.1 * z[:, None])

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        point = self.point(features)
        quantiles = torch.einsum("bd,qhd->bqh", features, self.quantile_weight) + self.quantile_bias
        return point, quantiles


def _normal_ppf(q: float) -> float:
    """Standard normal quantile (stdlib only; used once at init)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


class TSFM(nn.Module):
    """Backbone + linear head; forward returns de-normalised forecasts in the input's units."""

    def __init__(self, config: TSFMConfig | None = None) -> None:
        super().__init__()
        self.config = config or TSFMConfig()
        self.backbone = TSFMBackbone(self.config)
        self.head = ForecastHead(self.config.feature_dim, self.config.horizon, self.config.quantiles)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backbone output (features, loc, scale): what the device computes with ONNX Runtime."""
        return self.backbone(x)

    def forward_normalised(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(point_n, quantiles_n, loc, scale): normalised head outputs plus RevIN stats."""
        features, loc, scale = self.backbone(x)
        point_n, q_n = self.head(features)
        return point_n, q_n, loc, scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        point_n, q_n, loc, scale = self.forward_normalised(x)
        return point_n * scale + loc, q_n * scale.unsqueeze(1) + loc.unsqueeze(1)

    def head_state(self) -> dict[str, np.ndarray]:
        """The head as float32 numpy arrays, the exact keys the device and the wire use."""
        h = self.head
        arrays = (h.point.weight, h.point.bias, h.quantile_weight, h.quantile_bias)
        return {k: v.detach().cpu().numpy().astype(np.float32).copy() for k, v in zip(HEAD_KEYS, arrays, strict=True)}

    @torch.no_grad()
    def load_head_state(self, state: dict[str, np.ndarray]) -> None:
        """Install a head (e.g. an aggregated one from the fleet); shapes are checked so a head
        for another horizon/feature size cannot be loaded by accident."""
        missing = [k for k in HEAD_KEYS if k not in state]
        if missing:
            raise KeyError(f"head state lacks {missing}")
        h = self.head
        for key, param in zip(HEAD_KEYS, (h.point.weight, h.point.bias, h.quantile_weight, h.quantile_bias),
                              strict=True):
            value = torch.as_tensor(np.asarray(state[key], dtype=np.float32))
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} != expected {tuple(param.shape)}")
            param.copy_(value)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def model_id(self) -> str:
        """Content hash of config + backbone weights: names the frozen backbone a device runs,
        so heads trained on different backbones are never mixed."""
        digest = hashlib.sha256(repr(sorted(self.config.to_dict().items())).encode())
        for name, tensor in sorted(self.backbone.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"tsfm-{digest.hexdigest()[:12]}"


@torch.inference_mode()
def forecast(model: TSFM, x: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Batched inference in eval mode: point (N, H) and quantiles (N, Q, H) as float32 numpy arrays (the torch
    reference that export's parity checks and the pretraining evaluation compare against)."""
    was_training = model.training
    model.eval()
    points, quants = [], []
    for i in range(0, len(x), batch_size):
        p, q = model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)))
        points.append(p.numpy())
        quants.append(q.numpy())
    model.train(was_training)
    h, nq = model.config.horizon, model.config.n_quantiles
    if not points:
        return np.zeros((0, h), np.float32), np.zeros((0, nq, h), np.float32)
    return np.concatenate(points), np.concatenate(quants)
