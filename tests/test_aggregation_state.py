"""Aggregation rules and the durable round state behind exactly-once aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.fleet.aggregation import ClientUpdate, clip_by_norm, global_norm
from coordinator.fleet.state import FleetState
from coordinator.fleet.strategies import fleet_strategy
from coordinator.fleet.strategies.fedavg import FedAvg
from coordinator.fleet.strategies.trimmed_mean import TrimmedMean


def _upd(name: str, n: int, value: float) -> ClientUpdate:
    return ClientUpdate(name, n, {"w": np.full((2, 3), value, np.float16), "b": np.full(2, value, np.float32)})


def test_fedavg_is_sample_weighted_mean_of_deltas() -> None:
    base = {"w": np.zeros((2, 3), np.float32), "b": np.ones(2, np.float32)}
    new = FedAvg().aggregate(base, [_upd("a", 100, 1.0), _upd("b", 300, -1.0)])
    np.testing.assert_allclose(new["w"], -0.5)
    np.testing.assert_allclose(new["b"], 0.5)
    assert new["w"].dtype == np.float32


def test_clipping_bounds_one_outlier() -> None:
    big = _upd("evil", 100, 1e3)
    assert global_norm(clip_by_norm(big.delta, 1.0)) == pytest.approx(1.0)
    base = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    clipped = FedAvg(clip_norm=1.0).aggregate(base, [big, _upd("a", 100, 0.01)])
    assert np.abs(clipped["w"]).max() < 0.5


def test_trimmed_mean_ignores_extremes() -> None:
    base = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    ups = [_upd(str(i), 1, v) for i, v in enumerate([0.1, 0.2, 0.3, 100.0, -100.0])]
    new = TrimmedMean(trim=0.2).aggregate(base, ups)
    np.testing.assert_allclose(new["w"], 0.2, rtol=1e-3)


def test_fleet_strategy_rejects_unknown_names() -> None:
    assert fleet_strategy("fedprox").name == "fedprox"
    with pytest.raises(ValueError, match="unknown aggregation strategy"):
        fleet_strategy("magic")


def test_round_state_survives_reopen_and_closes_once(tmp_path) -> None:
    db = tmp_path / "fleet.sqlite"
    st = FleetState(db)
    v0 = st.save_model("tsfm", {"w": np.zeros(3, np.float32)}, {"backbone_sha256": "ab"})
    rec = st.open_round("tsfm", "train", v0, ["a", "b"], 1, 1e12, {"lr": 0.1})
    assert st.add_update(rec.round_id, "a", "m1", 10, b"payload-a")
    assert not st.add_update(rec.round_id, "a", "m1-again", 10, b"other")  # a second copy is ignored
    st.close()

    st = FleetState(db)  # as after a crash
    (open_rec,) = st.open_rounds("tsfm")
    assert open_rec.round_id == rec.round_id and open_rec.selected == ("a", "b") and open_rec.config == {"lr": 0.1}
    assert st.updates(rec.round_id) == [("a", b"payload-a")]
    v1 = st.close_round(rec.round_id, {"w": np.ones(3, np.float32)}, "tsfm")
    assert v1 == v0 + 1
    assert st.close_round(rec.round_id, {"w": np.full(3, 9, np.float32)}, "tsfm") == v1  # no second aggregate
    version, params, _ = st.latest_model("tsfm")
    assert version == v1 and params["w"].tolist() == [1, 1, 1]
    assert st.open_rounds("tsfm") == []


def test_devices_registry(tmp_path) -> None:
    st = FleetState(tmp_path / "f.sqlite")
    st.upsert_device("d1", domain="energy", n_train=5, state="online")
    st.upsert_device("d2", domain="finance", state="online")
    st.set_device_state("d2", "offline")
    st.upsert_device("d2", domain="finance", n_train=9)  # a retained hello: card refreshed, state kept
    st.set_device_state("d3", "online")  # status seen before any hello
    st.upsert_device("d4", domain="x")  # retained hello of a device whose status is unknown
    assert list(st.devices(online_only=True)) == ["d1", "d3"]
    assert st.devices()["d2"]["n_train"] == 9 and st.devices()["d4"]["state"] == "unknown"
    assert st.has_device("d2") and not st.has_device("d5")
