"""Federated pretraining strategies, one module each so they can be read side by side.

Every strategy is a plain object with the same small interface; the round loop
(:mod:`coordinator.pretrain.federated`) never knows which one it runs:

* ``init_client(model, silo)`` -- persistent per-client state (tensors; kept on the client).
* ``begin_round(model, ctx)`` -- client-side setup when the global state arrives.
* ``local_loss(model, x, y, sub, ctx)`` -- the local objective for one mini-batch.
* ``upload(model, ctx)`` -- what leaves the client: a fleet :class:`ClientUpdate` (weight delta)
  plus a payload of small non-weight arrays (prototypes, means, codes).
* ``server_update(global_params, uploads, server, round)`` -- new global weights, computed with
  the fleet's aggregation functions (:mod:`coordinator.fleet.aggregation`).
* ``eval_model(model, server)`` -- the global model as it is evaluated and exported.

All state is dicts of tensors so a checkpoint is a plain ``weights_only`` torch file.

Aggregation goes through the module object ``coordinator.fleet.aggregation`` (not names copied out
of it), so the MQTT fleet and pretraining provably run the same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from coordinator.fleet import aggregation
from coordinator.fleet.aggregation import ClientUpdate, Params
from coordinator.models.tsfm import TSFM, revin_stats
from coordinator.pretrain.silos import Silo
from coordinator.pretrain.training import forecast_loss

State = dict[str, torch.Tensor]
TokenFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LocalContext:
    """What a client sees during one round of local training."""

    silo: Silo
    client: State  # persistent, never uploaded unless the strategy's upload puts it there
    server: State  # broadcast server state (read-only on the client)
    global_params: dict[str, torch.Tensor]  # θ^t as received
    round: int
    progress: float  # fraction of all local steps done (0..1), for ramps
    scratch: dict[str, Any] = field(default_factory=dict)  # per-round working memory


@dataclass
class Upload:
    """One client's message: the fleet update plus strategy-specific payload arrays."""

    update: ClientUpdate
    payload: dict[str, np.ndarray] = field(default_factory=dict)


def params_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32).copy() for k, v in model.state_dict().items()}


def encode_tokens(model: TSFM, x: torch.Tensor, token_fn: TokenFn | None = None) -> tuple[torch.Tensor, ...]:
    """TSFMBackbone.forward step by step, with a hook on the encoder tokens (FedPM quantises them).
    Without a hook it computes exactly what ``model.backbone(x)`` does."""
    b = model.backbone
    loc, scale = revin_stats(x)
    tokens = b.patch_embed(b.patchify((x - loc) / scale)) + b.pos_embed
    tokens = b.encoder(b.dropout(tokens))
    if token_fn is not None:
        tokens = token_fn(tokens)
    return b.activation(b.project(tokens.flatten(1))), loc, scale


def torch_head_outputs(
    model: TSFM, features: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    point_n, q_n = model.head(features)
    return point_n * scale + loc, q_n * scale.unsqueeze(1) + loc.unsqueeze(1)


def task_loss(
    model: TSFM, features: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The shared forecasting objective (MSE + pinball, scaled values) of central pretraining."""
    point, quantiles = torch_head_outputs(model, features, loc, scale)
    return forecast_loss(point, quantiles, y, torch.tensor(model.config.quantiles, dtype=torch.float32))


def delta_update(model: nn.Module, ctx: LocalContext, metrics: dict[str, float] | None = None) -> ClientUpdate:
    """Local minus received weights, as the fleet's ClientUpdate (the same type MQTT devices send)."""
    local = params_of(model)
    delta = {k: local[k] - ctx.global_params[k].numpy() for k in local}
    return ClientUpdate(ctx.silo.domain, ctx.silo.n_samples, delta, metrics or {})


def weighted_step(global_params: Params, uploads: list[Upload], weights: list[float], lr: float = 1.0) -> Params:
    """θ + lr · Σ w_k Δ_k / Σ w_k via the fleet's weighted_mean/apply."""
    return aggregation.apply(global_params, aggregation.weighted_mean([u.update.delta for u in uploads], weights),
                             lr=lr)


class Strategy:
    """FedAvg behaviour; subclasses override only what makes them different."""

    name = "base"
    steps_multiplier = 1  # local steps per round relative to the federated budget
    # A client's say in the server's averages is n_k^p (n_k its windows): 1 is FedAvg's sample weighting, 0 every
    # silo alike (SCAFFOLD's and FedProx's papers average uniformly). Why it is a knob of every strategy: the domain
    # silos differ in size by 300x, and a small silo's AdamW steps, as long as a large silo's, reach the global
    # model scaled by its share of the windows (the weather silo: 0.6 %), while centralized AdamW normalises each
    # weight's step by its own gradient history and lets a rare domain's consistent gradient through
    # (docs/results/foundation.md, Findings 3). Set by `make_strategy` from the `weight_power` hyper-parameter.
    weight_power = 1.0

    def clients(self, silos: list[Silo]) -> list[Silo]:
        return silos

    def init_server(self, model: TSFM, silos: list[Silo]) -> State:
        return {}

    def init_client(self, model: TSFM, silo: Silo) -> State:
        return {}

    def begin_round(self, model: TSFM, ctx: LocalContext) -> None:
        return None

    def trainable(self, ctx: LocalContext) -> list[torch.Tensor]:
        """Client-state tensors optimised together with the model (e.g. DBE bias, classifier)."""
        return [t for t in ctx.client.values() if t.requires_grad]

    def local_loss(self, model: TSFM, x: torch.Tensor, y: torch.Tensor, sub: torch.Tensor,
                   ctx: LocalContext) -> torch.Tensor:
        features, loc, scale = encode_tokens(model, x)
        return task_loss(model, features, loc, scale, y)

    def upload(self, model: TSFM, ctx: LocalContext) -> Upload:
        return Upload(delta_update(model, ctx))

    def silo_weights(self, uploads: list[Upload]) -> list[float]:
        """Each upload's weight in the server's averages: n_k^weight_power (see `weight_power`)."""
        return [float(u.update.n_samples) ** self.weight_power for u in uploads]

    def server_update(self, global_params: Params, uploads: list[Upload], server: State, rnd: int) -> Params:
        return weighted_step(global_params, uploads, self.silo_weights(uploads))

    def eval_model(self, model: TSFM, server: State) -> TSFM:
        return model

    def exportable(self) -> bool:
        """Whether the global model is a plain TSFM the ONNX export reproduces."""
        return True


def make_strategy(name: str, weight_power: float = 1.0, **hparams: Any) -> Strategy:
    """The named strategy with its hyper-parameters; `weight_power` (every strategy's, see Strategy) is checked here."""
    from coordinator.pretrain.strategies import bilevel, centralized, fedadam, fedal, fedavg, fedpm, fedprox, scaffold

    table: dict[str, type[Strategy]] = {
        "centralized": centralized.Centralized, "fedavg": fedavg.FedAvgStrategy, "fedprox": fedprox.FedProx,
        "fedadam": fedadam.FedAdam, "scaffold": scaffold.Scaffold,
        "bilevel": bilevel.BiLevel, "fedal": fedal.FeDaL, "fedpm": fedpm.FeDPM,
    }
    if name not in table:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(table)}")
    if not 0.0 <= weight_power <= 1.0:
        raise ValueError("weight_power must be in [0, 1] (0: every silo alike, 1: by windows)")
    strategy = table[name](**hparams)
    strategy.weight_power = float(weight_power)
    return strategy


STRATEGIES = ("centralized", "fedavg", "fedprox", "fedadam", "scaffold", "bilevel", "fedal", "fedpm")
