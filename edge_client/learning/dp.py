"""The device's part of user-level DP-FedAvg (McMahan et al., 2018): clip the round's delta to an L2 bound and,
under distributed noise, add this device's share of the Gaussian noise before anything leaves the device; and the
Gaussian mechanism on a prototype (:func:`privatize_prototype`), which leaves the device on its own, not in a sum.

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


# task options of a prototype release (the recommender's evaluate tasks): the prototype's L2 bound C and the noise
# multiplier σ of the Gaussian mechanism (std σ·C per coordinate); coordinator.fleet.privacy.prototype_epsilon
PROTOTYPE_DP_OPTIONS = ("proto_clip", "proto_noise")


def privatize_prototype(prototype: np.ndarray, clip: float, noise_multiplier: float,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """A prototype clipped to L2 norm `clip` plus N(0, (noise_multiplier·clip)²) per coordinate, as float32.

    Why on the device and per prototype: unlike a delta, a prototype is not summed with others before the coordinator
    reads it (the prototype server compares users one by one), so only noise added here protects it. One user's
    clipped prototype can move anywhere in the ball of radius C when their data changes: sensitivity 2C, so the
    mechanism is a Gaussian one with noise multiplier σ/2 per release (accounted in coordinator.fleet.privacy)."""
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"bad prototype DP settings: clip {clip}, noise multiplier {noise_multiplier}")
    out = privatize({"p": np.asarray(prototype, np.float64)}, clip, noise_multiplier * clip, rng)["p"]
    return out.astype(np.float32)
