"""Property-based fuzzing (hypothesis) of every message type and of both sides' receive paths: whatever arrives,
decode returns a message or raises a typed ProtocolError, and neither side's MQTT callback raises or counts a
callback error. benchmarks/fuzz.py runs the same mutations 100,000+ times and reports refusals by reason."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.fleet.server import FleetConfig, FleetCoordinator
from coordinator.fleet.state import FleetState
from edge_client import wire as P
from edge_client.wire.mqtt import BrokerAddress
from tests.fuzzing import FLEET, mutate, samples

SAMPLES = samples()
PAYLOADS = {name: P.encode(msg) for name, msg in SAMPLES.items()}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _decode_or_refuse(payload: bytes) -> None:
    try:
        P.decode(payload)
    except P.ProtocolError as err:
        assert err.reason  # every refusal names its reason
    # anything else propagates and fails the test


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_are_refused(payload: bytes) -> None:
    _decode_or_refuse(payload)


@FUZZ
@given(st.sampled_from(sorted(PAYLOADS)), st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_mutations_of_every_message_type_decode_or_are_refused(name: str, seed: int, depth: int) -> None:
    rng = random.Random(seed)
    payload = PAYLOADS[name]
    for _ in range(depth):
        payload = mutate(payload, rng)
        _decode_or_refuse(payload)


_SCALARS = (st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats() | st.text(max_size=20)
            | st.binary(max_size=20))
_MSGPACK = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "type", "fleet", "device_id", "round_id", "msg_id", "ts", "sig",
                                        "n_samples", "delta", "params", "version"]), _MSGPACK, max_size=12))
def test_arbitrary_maps_with_header_like_keys_decode_or_are_refused(raw: dict) -> None:
    import msgpack

    try:
        payload = msgpack.packb(raw, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    _decode_or_refuse(payload)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """The coordinator's receive path, without a broker: paho queues what it publishes."""
    coord = FleetCoordinator(FleetConfig(fleet=FLEET), BrokerAddress(),
                             FleetState(tmp_path_factory.mktemp("fuzz") / "fleet.sqlite"))
    coord.ensure_model({"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)})
    coord.state.upsert_device("dev-1", state="online")
    return coord


@FUZZ
@given(st.sampled_from(sorted(PAYLOADS)), st.integers(0, 2**32 - 1))
def test_no_message_can_raise_in_the_coordinators_callback(coordinator, name: str, seed: int) -> None:
    payload = mutate(PAYLOADS[name], random.Random(seed)) if seed % 4 else PAYLOADS[name]
    topics = P.Topics(FLEET)
    topic = random.Random(seed).choice([topics.update(1, "dev-1"), topics.hello("dev-1"), topics.status("dev-1"),
                                        topics.forget("dev-1"), topics.update(1, "dev-2")])
    coordinator.client.on_message(coordinator.client, None, SimpleNamespace(topic=topic, payload=payload,
                                                                           retain=False))
    assert coordinator.receiver.rejected["callback_error"] == 0


@pytest.fixture(scope="module")
def device(tiny_export):
    from coordinator.fleet.simulation import carve_devices
    from edge_client.daemon.client import EdgeClient
    from edge_client.learning.learner import DeviceLearner, SplitConfig
    from edge_client.runtime.backbone import BackboneRunner

    series, season, _ = carve_devices(1, seed=0)[0].source.load()
    learner = DeviceLearner(BackboneRunner(tiny_export["backbone"]), series[:2000], season=season,
                            split=SplitConfig(horizon=24))
    return EdgeClient("dev-1", FLEET, learner, BrokerAddress())


@FUZZ
@given(st.sampled_from(sorted(PAYLOADS)), st.integers(0, 2**32 - 1))
def test_no_message_can_raise_in_the_devices_callback(device, name: str, seed: int) -> None:
    payload = mutate(PAYLOADS[name], random.Random(seed)) if seed % 4 else PAYLOADS[name]
    topics = P.Topics(FLEET)
    topic = random.Random(seed).choice([topics.task("dev-1"), topics.global_model("tsfm"), topics.task("dev-2")])
    device.client.on_message(device.client, None, SimpleNamespace(topic=topic, payload=payload, retain=True))
    assert device.receiver.rejected["callback_error"] == 0
