"""Fixed-point quantisation into Z_{2^32} and the pseudo-random masks that hide one device's vector in the sum.

Why modular arithmetic: a mask uniform in Z_{2^32}, added mod 2^32, makes the masked value uniform whatever the
vector -- a float mask could never hide a value completely. Every device maps its (clipped) update from [-r, r] to
integers in [0, 2^bits - 1] (stochastic rounding keeps the mean unbiased); the sum of n of them fits 32 bits while
n·(2^bits - 1) < 2^32, so the server recovers Σ exactly from the masked sum and maps it back.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MODULUS_BITS = 32
DTYPE = np.uint32


def max_bits(n_devices: int) -> int:
    """The most quantisation bits with which the sum of `n_devices` values cannot wrap around 2^32."""
    return MODULUS_BITS - max(1, int(np.ceil(np.log2(max(n_devices, 2)))))


def quantise(x: np.ndarray, value_range: float, bits: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """[-r, r] -> {0 .. 2^bits - 1} (clipped to the range first), with stochastic rounding."""
    levels = (1 << bits) - 1
    scaled = (np.clip(np.asarray(x, np.float64), -value_range, value_range) + value_range) / (2 * value_range) * levels
    rng = rng if rng is not None else np.random.default_rng()
    low = np.floor(scaled)
    return (low + (rng.random(scaled.shape) < scaled - low)).astype(DTYPE)


def dequantise_sum(total: np.ndarray, n: int, value_range: float, bits: int) -> np.ndarray:
    """The float sum of `n` quantised vectors from their integer sum."""
    levels = (1 << bits) - 1
    return np.asarray(total, np.float64) / levels * (2 * value_range) - n * value_range


def prg(seed: bytes, size: int, nonce: bytes) -> np.ndarray:
    """`size` uint32 from the ChaCha20 keystream of a 32-byte seed (`nonce`: 16 bytes naming the round and use)."""
    enc = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * size)), dtype="<u4").astype(DTYPE)


def to_vector(delta: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float64 vector of a delta, keys in sorted order: what a device masks (see :func:`from_vector`)."""
    return np.concatenate([np.asarray(delta[k], np.float64).ravel() for k in sorted(delta)])


def from_vector(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_vector`: arrays shaped as `like` (a head), keys in sorted order."""
    out, at = {}, 0
    for k in sorted(like):
        n = int(np.prod(like[k].shape))
        out[k] = np.asarray(vector[at:at + n], np.float64).reshape(like[k].shape)
        at += n
    if at != vector.size:
        raise ValueError(f"a vector of {vector.size} values for a head of {at}")
    return out
