"""Secure aggregation over a real Mosquitto: devices train, mask and answer the coordinator's four SecAgg+ stages;
the coordinator stores only masked inputs, recovers the mean within quantisation error, survives devices that drop
out after sharing their keys, and fails a round it cannot unmask without touching the global head."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.fleet.privacy import DPConfig
from coordinator.fleet.server import FleetConfig, FleetCoordinator
from coordinator.fleet.simulation import carve_devices, start_devices
from coordinator.fleet.state import FleetState
from edge_client import wire as P
from edge_client.learning.head import slice_head
from edge_client.secagg.masking import max_bits
from edge_client.secagg.masking import to_vector as flatten

pytestmark = pytest.mark.broker
RANGE = 0.5


def _fleet(mosquitto, tiny_export, tmp_path, n: int, fleet: str, dp: DPConfig | None = None):  # type: ignore[no-untyped-def]
    coord = FleetCoordinator(FleetConfig(fleet=fleet, deadline_s=20, local_epochs=1, lr=3e-3, min_devices=n,
                                         secagg=True, secagg_range=RANGE, secagg_stage_s=3.0, dp=dp),
                             mosquitto.address, FleetState(tmp_path / "fleet.sqlite")).start()
    coord.ensure_model(slice_head(tiny_export["model"].head_state(), 24))
    clients = start_devices(carve_devices(n, seed=2), tiny_export["backbone"], mosquitto.address, fleet, horizon=24)
    assert len(coord.wait_for_devices(n, 20)) == n
    sent: dict[str, np.ndarray] = {}
    for c in clients:  # what each device would have sent in the clear (for checking the sum only)
        start = c.secure.start
        c.secure.start = lambda task, update, start=start, d=c.device_id: (
            sent.__setitem__(d, flatten(dict(update.delta))), start(task, update))
    return coord, clients, sent


def _drop(client, message_type: type) -> None:  # type: ignore[no-untyped-def]
    """From this stage on the device no longer answers: it went offline."""
    handle = client.secure.handle
    gone = {"flag": False}

    def maybe(msg):  # type: ignore[no-untyped-def]
        gone["flag"] = gone["flag"] or isinstance(msg, message_type)
        if not gone["flag"]:
            handle(msg)

    client.secure.handle = maybe


def _stop(coord, clients) -> None:  # type: ignore[no-untyped-def]
    for c in clients:
        c.stop()
    coord.stop()


def test_a_secure_round_gives_fedavgs_mean_and_stores_only_masked_inputs(mosquitto, tiny_export, tmp_path) -> None:
    coord, clients, sent = _fleet(mosquitto, tiny_export, tmp_path, 4, "sa1")
    try:
        _, base = coord.current_model()
        res = coord.run_round("train")
        assert res.state == "closed" and sorted(res.metrics) == sorted(sent)
        _, new = coord.current_model()
        mean = sum(np.clip(v, -RANGE, RANGE) for v in sent.values()) / len(sent)
        step = 2 * RANGE / ((1 << max_bits(4)) - 1)
        np.testing.assert_allclose(flatten(new) - flatten(base), mean, atol=step + 1e-6)
        stored = [P.decode(p) for _, p in coord.state.updates(res.round_id)]
        assert len(stored) == 4 and all(isinstance(m, P.SecAggMasked) for m in stored)  # no Update, no delta
        for m in stored:  # a stored payload alone: at chance against the device's true delta
            y = np.frombuffer(m.masked, "<u4").astype(np.float64)
            assert abs(np.corrcoef(y, sent[m.device_id])[0, 1]) < 4 / np.sqrt(y.size)
    finally:
        _stop(coord, clients)


def test_devices_dropping_after_sharing_keys_leave_the_survivors_mean(mosquitto, tiny_export, tmp_path) -> None:
    coord, clients, sent = _fleet(mosquitto, tiny_export, tmp_path, 10, "sa2")
    gone = [c.device_id for c in clients[:3]]  # 30 %: keys and shares sent, then offline before masking
    for c in clients[:3]:
        _drop(c, P.SecAggInbox)
    try:
        _, base = coord.current_model()
        res = coord.run_round("train")
        assert res.state == "closed" and sorted(res.metrics) == sorted(set(sent) - set(gone))
        _, new = coord.current_model()
        mean = sum(np.clip(sent[d], -RANGE, RANGE) for d in res.metrics) / len(res.metrics)
        step = 2 * RANGE / ((1 << max_bits(10)) - 1)
        np.testing.assert_allclose(flatten(new) - flatten(base), mean, atol=step + 1e-6)
    finally:
        _stop(coord, clients)


def test_thirty_percent_dropping_at_every_stage_completes_or_fails_cleanly(mosquitto, tiny_export, tmp_path) -> None:
    coord, clients, sent = _fleet(mosquitto, tiny_export, tmp_path, 10, "sa3")
    for c, stage in zip(clients, [P.SecAggRoster] * 3 + [P.SecAggInbox] * 2 + [P.SecAggUnmask], strict=False):
        _drop(c, stage)
    try:
        version, base = coord.current_model()
        res = coord.run_round("train")
        after, new = coord.current_model()
        if res.state == "failed":  # too few shares came back: nothing unmasked, the head untouched
            assert after == version and all(np.array_equal(new[k], base[k]) for k in base)
            assert coord.receiver.rejected["secagg_abort"] == 1
        else:
            survivors = sorted(res.metrics)
            assert len(survivors) <= 5 and set(survivors) <= set(sent)
            mean = sum(np.clip(sent[d], -RANGE, RANGE) for d in survivors) / len(survivors)
            np.testing.assert_allclose(flatten(new) - flatten(base), mean, atol=1e-4)
        stored = [P.decode(p) for _, p in coord.state.updates(res.round_id)]
        assert all(isinstance(m, P.SecAggMasked) for m in stored)
    finally:
        _stop(coord, clients)


def test_distributed_dp_under_secure_aggregation_is_charged_and_never_seen_unnoised(mosquitto, tiny_export,
                                                                                  tmp_path) -> None:
    dp = DPConfig(placement="distributed", noise_multiplier=1.0, clip=0.05)
    coord, clients, sent = _fleet(mosquitto, tiny_export, tmp_path, 4, "sa4", dp)
    try:
        _, base = coord.current_model()
        res = coord.run_round("train")
        assert res.state == "closed" and res.epsilon is not None and res.epsilon > 0
        for v in sent.values():  # what each device masked was already clipped and noised on the device
            assert np.linalg.norm(v) > 0.05 * 1.5
        _, new = coord.current_model()
        mean = sum(np.clip(v, -RANGE, RANGE) for v in sent.values()) / 4  # divided by the devices asked
        np.testing.assert_allclose(flatten(new) - flatten(base), mean, atol=2 * RANGE / ((1 << max_bits(4)) - 1) + 1e-6)
        assert coord.state.latest_model_meta("tsfm")[1]["dp_epsilon"] == pytest.approx(res.epsilon)
    finally:
        _stop(coord, clients)
