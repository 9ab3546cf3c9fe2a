"""SecAgg+'s sparse communication graph: each device shares secrets with and masks against k = O(log n) neighbours.

A Harary graph H(k, n) on a random ordering of the devices (Bell et al., 2020, section 3.2): device i is linked to
the k/2 devices before and after it on a ring. Every device then has k neighbours, so what it sends and computes
grows as O(log n) instead of O(n), and with a random ordering an adversary cannot choose whom a device is linked to.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

DEFAULT_FACTOR = 6.0


def degree(n: int, factor: float = DEFAULT_FACTOR) -> int:
    """k: an even number near factor·log2(n), at most n - 1 (everyone, for rounds of up to ~30 devices).

    Why 6·log2(n): a device's secrets come back only if a majority (t) of its k neighbours is still there at the
    end, so k must leave room for dropouts. With 30 % of the devices gone, a neighbourhood of k keeps 0.7·k on
    average; k = 40 (n = 100) or 60 (n = 1,000) keeps at least t = k/2 + 1 for all but ~1 % or ~0.1 % of the
    devices, where k = 2·log2(n) would fail one device in six."""
    if n <= 5:
        return n - 1
    k = 2 * math.ceil(factor * math.log2(n) / 2)
    return min(n - 1, max(4, k))


def threshold(k: int) -> int:
    """t = ⌊k/2⌋ + 1 of a device's k neighbours reconstruct its secrets: a majority, so the server never gets t
    shares of both of one device's secrets from honest neighbours (each reveals only one of the two)."""
    return k // 2 + 1


def neighbours(devices: Sequence[str], k: int, seed: int) -> dict[str, list[str]]:
    """device -> its k neighbours (symmetric), on the ring of a seeded random order."""
    order = sorted(devices)
    random.Random(seed).shuffle(order)
    n = len(order)
    if not 0 <= k < n:
        raise ValueError(f"degree {k} needs more than {k} devices, got {n}")
    out: dict[str, set[str]] = {d: set() for d in order}
    for i, d in enumerate(order):
        for step in range(1, k // 2 + 1):
            for j in (i - step, i + step):
                other = order[j % n]
                if other != d:
                    out[d].add(other)
                    out[other].add(d)
        if k % 2 and n % 2 == 0:  # odd degree (k = n - 1 for small rounds): the opposite device too
            other = order[(i + n // 2) % n]
            out[d].add(other)
            out[other].add(d)
    return {d: sorted(v) for d, v in out.items()}
