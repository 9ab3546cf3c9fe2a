"""Simulated devices carved from the real datasets, each running the real edge client in-process.

Non-IID on purpose: devices differ in domain (ETTh1 energy load vs. daily exchange rates),
channel and period. ETTh1 devices only use rows after the 12-month training split the backbone
was pretrained on, so every device's held-back window is data the backbone never saw; exchange
rates are a domain it never saw at all.

The coordinator only hands a device its *slice description*; the device reads the file itself,
so even in simulation no raw series passes through coordinator code.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

from edge_client.daemon.client import EdgeClient
from edge_client.daemon.config import DataSource
from edge_client.data.datasets import available, load_series
from edge_client.identity import Identity
from edge_client.learning.learner import DeviceLearner, SplitConfig
from edge_client.learning.windows import ETT_TRAIN_END
from edge_client.runtime.backbone import BackboneRunner
from edge_client.wire.mqtt import BrokerAddress

log = logging.getLogger("fedge.simulation")

ETTH1_PERIODS = ((ETT_TRAIN_END, ETT_TRAIN_END + 4500), (17420 - 4500, 17420))
EXCHANGE_PERIODS = ((0, 2600), (2500, 5100), (4988, 7588))


@dataclass(frozen=True)
class SimulatedDevice:
    device_id: str
    source: DataSource
    domain: str


SHIFT_STEP = 97  # rows between the starts of two overlapping slices (prime: shifted slices don't share a phase)


def _shifted(periods: tuple[tuple[int, int], ...], first: int, last: int) -> list[tuple[int, int]]:
    """Periods of the same length as `periods[0]`, starting every SHIFT_STEP rows in [first, last), minus the
    base periods themselves: more devices than distinct slices get overlapping windows of the same real series."""
    length = periods[0][1] - periods[0][0]
    return [(a, a + length) for a in range(first, last - length + 1, SHIFT_STEP) if (a, a + length) not in periods]


def _pool(data_dir: str | None, shifted: bool = False) -> dict[str, list[DataSource]]:
    names = available(data_dir)
    pools: dict[str, list[DataSource]] = {}
    etth1 = load_series("etth1", data_dir)
    periods = _shifted(ETTH1_PERIODS, ETTH1_PERIODS[0][0], ETTH1_PERIODS[-1][1]) if shifted else ETTH1_PERIODS
    pools["energy"] = [DataSource(dataset="etth1", column=c, start=a, stop=b, data_dir=data_dir)
                       for a, b in periods for c in etth1.columns]
    if "exchange_rate" in names:
        fx = load_series("exchange_rate", data_dir)
        periods = _shifted(EXCHANGE_PERIODS, 0, EXCHANGE_PERIODS[-1][1]) if shifted else EXCHANGE_PERIODS
        pools["finance"] = [DataSource(dataset="exchange_rate", column=c, start=a, stop=b, data_dir=data_dir)
                            for a, b in periods for c in fx.columns]
    return pools


def carve_devices(n: int, data_dir: str | None = None, seed: int = 0,
                  domains: tuple[str, ...] | None = None) -> list[SimulatedDevice]:
    """`n` devices, alternating between the available domains (2 energy : 1 finance), each a
    distinct (dataset, channel, period) slice chosen with a seeded shuffle: first the disjoint periods (14 ETTh1
    and 24 exchange-rate slices), then, for larger fleets, periods of the same length shifted by SHIFT_STEP rows,
    which overlap other devices' slices of the same series (:func:`slice_overlaps` says which)."""
    pools, extra = _pool(data_dir), _pool(data_dir, shifted=True)
    if domains:
        pools = {d: p for d, p in pools.items() if d in domains}
        if not pools:
            raise ValueError(f"none of the domains {domains} is available here")
    rng = random.Random(seed)
    for p in pools.values():
        rng.shuffle(p)
    for d, p in extra.items():  # distinct slices first; overlapping (shifted) ones only for larger fleets
        if d in pools:
            random.Random(seed + 1).shuffle(p)
            pools[d] = pools[d] + p
    pattern = [d for d in ("energy", "energy", "finance") if d in pools]
    devices: list[SimulatedDevice] = []
    used = dict.fromkeys(pools, 0)
    while len(devices) < n:
        progressed = False
        for domain in pattern:
            if len(devices) == n:
                break
            if used[domain] < len(pools[domain]):
                src = pools[domain][used[domain]]
                used[domain] += 1
                devices.append(SimulatedDevice(f"{src.dataset.replace('_', '')}-{src.column}-{src.start}".lower(),
                                               src, domain))
                progressed = True
        if not progressed:
            raise ValueError(f"only {len(devices)} distinct device slices are available, asked for {n}")
    return devices


def slice_overlaps(devices: list[SimulatedDevice]) -> dict[str, bool]:
    """device id -> whether its slice shares rows with another device's slice of the same series and channel."""
    out = {}
    for d in devices:
        s = d.source
        out[d.device_id] = any(o is not d and o.source.dataset == s.dataset and o.source.column == s.column
                               and o.source.start < s.stop and s.start < o.source.stop for o in devices)
    return out


def start_devices(
    devices: list[SimulatedDevice],
    backbone: str | Path,
    broker: BrokerAddress,
    fleet: str,
    *,
    horizon: int,
    threads: int = 1,
    seed: int = 0,
    identities: list[Identity] | None = None,
) -> list[EdgeClient]:
    """Build each device's learner (its own feature cache, on one ONNX Runtime session shared by the simulated
    devices of this process: a session per device costs ~20 MB and its start-up) and connect it."""
    clients = []
    runner = BackboneRunner(backbone, threads=threads)
    slots = threading.BoundedSemaphore(os.cpu_count() or 1)  # the devices of this process train a core's worth each
    for i, dev in enumerate(devices):
        series, season, domain = dev.source.load()
        learner = DeviceLearner(runner, series, season=season, split=SplitConfig(horizon=horizon))
        identity = identities[i] if identities is not None else None
        address = broker if identity is None else broker.with_identity(identity.ca_file, identity.cert_file,
                                                                       identity.key_file)
        client = EdgeClient(dev.device_id, fleet, learner, address, domain=domain, seed=seed + i,
                            identity=identity, compute_slots=slots).start()
        clients.append(client)
    return clients
