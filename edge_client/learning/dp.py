"""The device's part of user-level DP-FedAvg (McMahan et al., 2018): clip the round's delta to an L2 bound and,
under distributed noise, add this device's share of the Gaussian noise before anything leaves the device.

numpy only (the edge install has no torch and no accountant): the coordinator decides the bound and the noise
per round and sends them in the task's options (:data:`DP_OPTIONS`); it accounts for the privacy spent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# task options: the L2 bound of the delta, and the std of the Gaussian noise this device adds per coordinate
# (distributed placement: sigma * clip / sqrt(expected devices); 0 under central noise, where only clipping runs here)
DP_OPTIONS = ("dp_clip", "dp_noise_std")


def clip_l2(delta: Mapping[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float]:
    """The delta scaled so that its L2 norm over all parameters is at most `bound`, and its norm before."""
    norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in delta.values()))
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, np.float64) * factor for k, v in delta.items()}, norm


def privatize(delta: Mapping[str, np.ndarray], clip: float, noise_std: float,
              rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Clip to `clip`, add N(0, noise_std^2) to every coordinate, keep each array's dtype. The noise comes from the
    OS's entropy unless a generator is given (tests and simulations)."""
    clipped, _ = clip_l2(delta, clip)
    rng = rng if rng is not None else np.random.default_rng()
    out = {}
    for k, v in clipped.items():
        noisy = v + rng.normal(0.0, noise_std, v.shape) if noise_std > 0 else v
        out[k] = noisy.astype(np.asarray(delta[k]).dtype)
    return out
