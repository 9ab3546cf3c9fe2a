"""Shamir's t-of-n secret sharing over GF(p), p = 2^521 - 1 (a Mersenne prime above every 32-byte secret).

Why this field: the secrets shared are 32-byte X25519 private keys and 32-byte self-mask seeds; a prime above 2^256
takes any of them as one field element, so a share is one number and no secret is split into pieces. Coefficients
come from the OS's entropy (``secrets``): the shares of a secret must be unpredictable to whoever holds fewer than t.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

PRIME = 2**521 - 1
SHARE_BYTES = 66  # 521 bits


def split(secret: bytes, n: int, t: int) -> dict[int, int]:
    """Shares x -> f(x) for x = 1..n of a random polynomial f of degree t-1 with f(0) = the secret."""
    if not 1 <= t <= n:
        raise ValueError(f"threshold {t} must be in 1..{n}")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret does not fit the field")
    coeffs = [value] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def combine(shares: Mapping[int, int], t: int, length: int = 32) -> bytes:
    """The secret from any t shares (Lagrange interpolation at 0); fewer than t is a ValueError."""
    points = list(shares.items())[:t]
    if len(points) < t:
        raise ValueError(f"{len(points)} shares, {t} needed")
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share indices must be distinct and non-zero")
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ValueError("shares do not interpolate to a secret of this length (corrupt or mixed shares)")
    return secret.to_bytes(length, "big")
