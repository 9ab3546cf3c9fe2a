"""SCAFFOLD (Karimireddy et al., ICML 2020, "Stochastic Controlled Averaging for Federated Learning"): every
local gradient is corrected by the difference between the server's and the client's control variates,
g ← ∇f_i(y) − c_i + c, so a client that takes many local steps follows the fleet's direction instead of drifting
to its own domain's optimum.

Why it is in the grid: at equal windows, smaller client batches give FedAvg more sequential steps and close
most of its gap at batch 64, but from batch 8 on (120+ local steps a round) FedAvg stops improving while
centralized training keeps going; drift on six heterogeneous domain silos is the textbook reason, and SCAFFOLD
is the textbook correction (docs/results/foundation.md, groups "batch" and "drift"). With the sample weights
FedAvg uses it barely helps there; with every silo weighted alike (weight_power 0, the paper's own uniform
average) it is the grid's best federated setting, within 5 % of centralized training (group "alike").

Concrete choices where the paper assumes plain SGD:
* The correction is added to the gradient before the local optimizer (AdamW, as for every strategy), through a
  gradient hook on each parameter, so the local loss is FedAvg's.
* c_i is the mean raw local gradient along the round's trajectory. That is what the paper's option II,
  c_i ← c_i − c + (x − y_i)/(Kη), equals under SGD; with AdamW the step is not η·g, so it is measured directly.
* c is the weighted mean of the c_i, with the weights the deltas are averaged with (`silo_weights`: by windows as
  FedAvg by default; the paper's uniform mean at weight_power 0), kept by adding the weighted mean of the clients'
  Δc_i times the participating share of clients, as in the paper's server step.
Round 0 is FedAvg (every control variate starts at 0). Uploads carry Δc_i, a second model-sized array: twice
FedAvg's upload, the cost the paper states."""

from __future__ import annotations

import numpy as np
import torch

from coordinator.fleet import aggregation
from coordinator.fleet.aggregation import Params
from coordinator.models.tsfm import TSFM
from coordinator.pretrain.silos import Silo
from coordinator.pretrain.strategies import LocalContext, State, Strategy, Upload, delta_update, weighted_step

PREFIX = "c."  # control variates in client and server state: "c.<parameter name>"


def _zeros(model: TSFM) -> State:
    return {PREFIX + n: torch.zeros_like(p, requires_grad=False) for n, p in model.named_parameters()}


class Scaffold(Strategy):
    name = "scaffold"

    def init_server(self, model: TSFM, silos: list[Silo]) -> State:
        return {**_zeros(model), "n_clients": torch.tensor(float(len(silos)))}

    def init_client(self, model: TSFM, silo: Silo) -> State:
        return _zeros(model)

    def begin_round(self, model: TSFM, ctx: LocalContext) -> None:
        sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        ctx.scratch.update(sums=sums, steps=0, hooks=[])
        for n, p in model.named_parameters():
            correction = (ctx.server[PREFIX + n] - ctx.client[PREFIX + n]).detach()

            def hook(grad: torch.Tensor, n: str = n, correction: torch.Tensor = correction) -> torch.Tensor:
                sums[n] += grad.detach()
                return grad + correction

            ctx.scratch["hooks"].append(p.register_hook(hook))

    def local_loss(self, model: TSFM, x: torch.Tensor, y: torch.Tensor, sub: torch.Tensor,
                   ctx: LocalContext) -> torch.Tensor:
        ctx.scratch["steps"] += 1
        return super().local_loss(model, x, y, sub, ctx)

    def upload(self, model: TSFM, ctx: LocalContext) -> Upload:
        for handle in ctx.scratch.pop("hooks"):  # the worker model is reused by the next client
            handle.remove()
        steps = max(1, ctx.scratch["steps"])
        payload = {}
        for n, total in ctx.scratch["sums"].items():
            new = total / steps
            payload[n] = (new - ctx.client[PREFIX + n]).numpy().astype(np.float32)
            ctx.client[PREFIX + n] = new
        return Upload(delta_update(model, ctx), payload)

    def server_update(self, global_params: Params, uploads: list[Upload], server: State, rnd: int) -> Params:
        weights = self.silo_weights(uploads)
        mean_dc = aggregation.weighted_mean([u.payload for u in uploads], weights)
        share = len(uploads) / float(server["n_clients"])
        for n, dc in mean_dc.items():
            server[PREFIX + n] = server[PREFIX + n] + share * torch.from_numpy(np.asarray(dc, np.float32))
        return weighted_step(global_params, uploads, weights)
