"""A forecasting device's prototype: a few dozen floats that say what its data looks like to the backbone.

Why: a coordinator that knows which devices see similar data can give each device the head of devices like it
(coordinator/fleet/strategies/prototype.py), and can place a device that has not trained yet. The prototype is
the mean and the spread of the device's backbone features over its training windows (2 x feature_dim numbers),
standardised per window set and multiplied by one fixed, seeded random projection down to ``PROTOTYPE_DIM``
numbers: every device of a fleet uses the same projection (same seed), so prototypes are comparable, and the
projection is many-to-one, so the exact feature statistics cannot be read back (what it still reveals:
docs/privacy.md).
"""

from __future__ import annotations

import numpy as np

PROTOTYPE_DIM = 32
PROTOTYPE_SEED = 20_261_201


def projection(in_dim: int, out_dim: int = PROTOTYPE_DIM, seed: int = PROTOTYPE_SEED) -> np.ndarray:
    """The fleet-wide Gaussian random projection (in_dim, out_dim), columns scaled by 1/sqrt(out_dim)."""
    return (np.random.default_rng(seed).normal(0.0, 1.0, (in_dim, out_dim)) / np.sqrt(out_dim)).astype(np.float32)


def feature_prototype(feats: np.ndarray, dim: int = PROTOTYPE_DIM, seed: int = PROTOTYPE_SEED) -> np.ndarray:
    """(dim,) float32 prototype of backbone features (N, D): projected [mean; std] over the N windows."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or len(f) == 0:
        raise ValueError("a prototype needs at least one window of features")
    stats = np.concatenate([f.mean(axis=0), f.std(axis=0)])
    return (stats @ projection(len(stats), dim, seed)).astype(np.float32)
