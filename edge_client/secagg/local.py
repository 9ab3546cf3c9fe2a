"""A whole SecAgg+ round in one process, every message passed by hand: the reference the MQTT round is checked
against, and the 1,000-device cost cell of benchmarks/privacy.py (where a broker would measure the broker).

Devices in ``drop[stage]`` stop answering from that stage on (stages: "shares", "masked", "reveal").
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_client.secagg.masking import dequantise_sum, quantise
from edge_client.secagg.protocol import RoundSpec, SecAggAbort, SecAggDevice, SecAggServer

STAGES = ("shares", "masked", "reveal")


@dataclass
class LocalRound:
    """What a simulated round produced and what it cost."""

    total: np.ndarray | None  # the float sum of the survivors' vectors (None: aborted)
    survivors: list[str]
    aborted: str = ""
    bytes_up: dict[str, int] = field(default_factory=dict)  # device -> bytes it sent (keys, shares, masked, reveal)
    device_s: float = 0.0  # CPU seconds of all devices together
    server_s: float = 0.0


def run_local(vectors: Mapping[str, np.ndarray], spec: RoundSpec, *, seed: int = 0,
              drop: Mapping[str, Sequence[str]] | None = None, rng: np.random.Generator | None = None) -> LocalRound:
    drop = {s: set(drop.get(s, ())) for s in STAGES} if drop else {s: set() for s in STAGES}
    gone: set[str] = set()
    rng = rng if rng is not None else np.random.default_rng(seed)
    out = LocalRound(None, [])
    t_dev = t_srv = 0.0
    server = SecAggServer(spec)
    devices = {d: SecAggDevice(d, spec) for d in sorted(vectors)}
    sent = dict.fromkeys(devices, 0)
    try:
        t = time.process_time()
        for d, dev in devices.items():
            server.keys[d] = dev.advertise()
            sent[d] += 96
        t_dev += time.process_time() - t
        t = time.process_time()
        rosters = server.rosters(seed)
        t_srv += time.process_time() - t
        gone |= drop["shares"]
        for d in rosters:
            if d in gone:
                continue
            t = time.process_time()
            shares = devices[d].share(rosters[d], server.t)
            t_dev += time.process_time() - t
            sent[d] += sum(len(c) + len(v) for v, c in shares.items())
            server.add_shares(d, shares)
        t = time.process_time()
        inbox = server.forwarded()
        t_srv += time.process_time() - t
        gone |= drop["masked"]
        for d, received in inbox.items():
            if d in gone:
                continue
            t = time.process_time()
            y = devices[d].masked_input(quantise(vectors[d], spec.value_range, spec.bits, rng), received)
            t_dev += time.process_time() - t
            sent[d] += y.nbytes
            server.add_masked(d, y)
        survivors, dropped = server.unmask_request()
        gone |= drop["reveal"]
        for d in survivors:
            if d in gone:
                continue
            t = time.process_time()
            shares = devices[d].reveal(survivors, dropped)
            t_dev += time.process_time() - t
            sent[d] += sum(len(s) + len(o) + 8 for o, (_, _, s) in shares.items())
            server.add_reveal(d, shares)
        t = time.process_time()
        total, survivors = server.result()
        t_srv += time.process_time() - t
        out.total = dequantise_sum(total, len(survivors), spec.value_range, spec.bits)
        out.survivors = survivors
    except SecAggAbort as exc:
        out.aborted = str(exc)
    out.bytes_up, out.device_s, out.server_s = sent, t_dev, t_srv
    return out
