"""Aggregation rules and the durable round state behind exactly-once aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.fleet.aggregation import Bounds, ClientUpdate, bound_updates, clip_by_norm, global_norm
from coordinator.fleet.state import FleetState
from coordinator.fleet.strategies import RoundInputs, fleet_strategy
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
    assert not st.set_device_state("d3", "online")  # a status alone registers nobody (issue #11)
    st.upsert_device("d4", domain="x")  # retained hello of a device whose status is unknown
    assert list(st.devices(online_only=True)) == ["d1"]
    assert st.devices()["d2"]["n_train"] == 9 and st.devices()["d4"]["state"] == "unknown"
    assert st.has_device("d2") and not st.has_device("d5")


def test_an_aggregate_that_overflows_float32_is_never_committed(tmp_path) -> None:
    from coordinator.fleet.aggregation import NonFiniteModel, apply

    with pytest.raises(NonFiniteModel):
        apply({"w": np.zeros(2, np.float32)}, {"w": np.array([1e300, 0.0])})
    state = FleetState(tmp_path / "f.sqlite")
    v0 = state.save_model("tsfm", {"w": np.zeros(2, np.float32)})
    rec = state.open_round("tsfm", "train", v0, ["a"], 1, 1e12, {})
    with pytest.raises(NonFiniteModel):
        state.close_round(rec.round_id, {"w": np.array([np.inf, 0], np.float32)}, "tsfm")
    with pytest.raises(NonFiniteModel):
        state.save_model("tsfm", {"w": np.array([np.nan], np.float32)})
    assert state.round(rec.round_id).state == "open" and state.latest_model("tsfm")[0] == v0


# --------------------------------------------------------------------------- issue #11: robust aggregation

BASE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}


def _honest_and_one_attacker(k: int, scale: float = -1e4) -> list[ClientUpdate]:
    rng = np.random.default_rng(0)
    ups = [ClientUpdate(f"h{i}", 100, {"w": (1 + 0.1 * rng.standard_normal((2, 3))).astype(np.float16),
                                        "b": (1 + 0.1 * rng.standard_normal(2)).astype(np.float32)})
           for i in range(k)]
    return [*ups, ClientUpdate("evil", 1 << 31, {key: v.astype(np.float32) * scale for key, v in ups[0].delta.items()})]


@pytest.mark.parametrize("k", [5, 9])
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_robust_strategies_keep_one_attacker_among_k_honest_devices_out(name: str, k: int) -> None:
    new = fleet_strategy(name).aggregate_round(RoundInputs(BASE, _honest_and_one_attacker(k), dict, lambda d: None))
    for v in new.global_params.values():  # the honest deltas are all near +1
        assert float(v.min()) > 0.7 and float(v.max()) < 1.3


def test_default_bounds_clip_to_a_multiple_of_the_median_norm_and_cap_weights() -> None:
    ups = _honest_and_one_attacker(5)
    bounded = bound_updates(ups, Bounds(), caps=lambda d: 50 if d == "h1" else None)
    honest_norm = float(np.median([global_norm(u.delta) for u in ups]))
    assert bounded.clipped == ("evil",) and bounded.norm_bound == pytest.approx(2 * honest_norm)
    evil = bounded.updates[-1]
    assert global_norm(evil.delta) == pytest.approx(2 * honest_norm) and evil.n_samples == 200
    assert bounded.updates[1].n_samples == 50 and set(bounded.capped) == {"h1", "evil"}
    step = FedAvg().aggregate(BASE, bounded.updates)  # the attacker's pull is bounded, not its sign
    assert np.abs(step["w"]).max() < 3.0
    assert np.abs(FedAvg().aggregate(BASE, ups)["w"]).max() > 1e3  # without bounds it owns the step


def test_trimmed_mean_trims_one_device_even_below_ten() -> None:
    from coordinator.fleet.aggregation import trimmed_mean

    deltas = [{"w": np.array([v])} for v in (1.0, 1.1, 0.9, 1e4)]
    assert trimmed_mean(deltas, 0.1, min_cut=1)["w"][0] == pytest.approx(1.05)
    assert trimmed_mean(deltas[:2], 0.1, min_cut=1)["w"][0] == pytest.approx(1.05)  # two: nothing to trim


def test_multi_krum_leaves_the_outlier_out_and_keeps_agreeing_devices() -> None:
    from coordinator.fleet.strategies.krum import MultiKrum

    ups = _honest_and_one_attacker(5)
    assert [u.device_id for u in MultiKrum().selected(ups)] == [f"h{i}" for i in range(5)]


def test_retention_drops_old_update_payloads_and_models_but_keeps_metrics(tmp_path) -> None:
    from edge_client import wire as P

    state = FleetState(tmp_path / "f.sqlite")
    state.save_model("tsfm", {"w": np.zeros(2, np.float32)})
    for r in range(1, 6):
        rec = state.open_round("tsfm", "train", r - 1, ["a"], 1, 1e12, {})
        update = P.Update(fleet="f", device_id="a", round_id=rec.round_id, base_version=r - 1, n_samples=7,
                          delta={"w": np.ones(2, np.float16)}, metrics={"global_mse": float(r)})
        state.add_update(rec.round_id, "a", update.msg_id, 7, P.encode(update))
        state.close_round(rec.round_id, {"w": np.full(2, r, np.float32)}, "tsfm")
    pruned = state.prune(keep_rounds=2, keep_models=2)
    assert pruned == {"update_payloads": 3, "models": 3}  # rounds 1-3; versions 1-3 (0 and the newest 2 stay)
    assert [len(p) for _, p in state.updates(3)] == [0] and len(state.updates(4)[0][1]) > 0
    assert state.round_metrics(2) == {"a": {"global_mse": 2.0}} and state.reported(1) == {"a"}
    assert state.latest_model("tsfm")[0] == 5 and float(state.model(0)["w"][0]) == 0.0
    assert state.prune(keep_rounds=2, keep_models=2) == {"update_payloads": 0, "models": 0}
