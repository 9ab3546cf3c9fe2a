"""FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated Optimization", Algorithm 2): clients run FedAvg's
local training; the server treats the sample-weighted mean delta Δ̄ as a pseudo-gradient and takes an Adam
step on it:  m ← β1 m + (1-β1) Δ̄,  v ← β2 v + (1-β2) Δ̄²,  θ ← θ + η m / (√v + τ).

Why it is in the grid: when domain silos pull the shared weights apart, the averaged delta is small and noisy
in the coordinates they disagree on and consistent in the rest; per-coordinate normalisation moves the
consistent coordinates at full speed, which is the gap between FedAvg and centralized training that the
paper closes on its non-IID tasks. As in the paper there is no bias correction (m starts at 0, so the first
rounds' steps are small) and v starts at τ². η and τ are the paper's two knobs (its grid: η 10^-3..10^1,
τ 10^-5..10^-1); ours are chosen on validation windows (benchmarks/foundation.py, group "sweep").
"""

from __future__ import annotations

import numpy as np
import torch

from coordinator.fleet import aggregation
from coordinator.fleet.aggregation import Params
from coordinator.models.tsfm import TSFM
from coordinator.pretrain.silos import Silo
from coordinator.pretrain.strategies import State, Strategy, Upload


class FedAdam(Strategy):
    name = "fedadam"

    def __init__(self, server_lr: float = 3e-3, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if server_lr <= 0 or tau <= 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError("FedAdam needs server_lr > 0, tau > 0 and betas in [0, 1)")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau

    def init_server(self, model: TSFM, silos: list[Silo]) -> State:
        state: State = {}
        for name, p in model.state_dict().items():
            state[f"m.{name}"] = torch.zeros_like(p)
            state[f"v.{name}"] = torch.full_like(p, self.tau**2)
        return state

    def server_update(self, global_params: Params, uploads: list[Upload], server: State, rnd: int) -> Params:
        mean = aggregation.weighted_mean([u.update.delta for u in uploads], self.silo_weights(uploads))
        step = {}
        for name, delta in mean.items():
            m = self.beta1 * server[f"m.{name}"].numpy() + (1 - self.beta1) * delta
            v = self.beta2 * server[f"v.{name}"].numpy() + (1 - self.beta2) * delta**2
            server[f"m.{name}"] = torch.from_numpy(m.astype(np.float32))
            server[f"v.{name}"] = torch.from_numpy(v.astype(np.float32))
            step[name] = m / (np.sqrt(v) + self.tau)
        return aggregation.apply(global_params, step, lr=self.server_lr)
