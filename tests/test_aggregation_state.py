"""Aggregation rules and the durable round state behind exactly-once aggregation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from coordinator.fleet.aggregation import (
    Bounds,
    ClientUpdate,
    RunningSum,
    bound_updates,
    bounded_streamed_mean,
    clip_by_norm,
    global_norm,
    plan_bounds,
    summable,
    weighted_mean,
)
from coordinator.fleet.ingest import BatchWriter
from coordinator.fleet.state import DUPLICATE, NOT_OPEN, STORED, FleetState, UpdateRow
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


def test_round_state_survives_reopen_and_closes_once(fleet_db) -> None:
    db = fleet_db
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


def test_devices_registry(fleet_db) -> None:
    st = FleetState(fleet_db)
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

def test_running_sum_is_the_weighted_mean_in_any_order_and_merges_by_addition() -> None:
    rng = np.random.default_rng(0)
    deltas = [{"w": rng.normal(size=(4, 5)).astype(np.float16)} for _ in range(50)]
    weights = rng.integers(1, 500, size=50).astype(float)
    whole = RunningSum()
    for d, w in zip(deltas, weights, strict=True):
        whole.add(d, w)
    a, b = RunningSum(), RunningSum()  # two ingestion workers, each with every other update, in reverse order
    for i in reversed(range(50)):
        (a if i % 2 else b).add(deltas[i], weights[i])
    merged = a.merge(b)
    expected = sum(w * d["w"].astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / weights.sum()
    np.testing.assert_allclose(whole.mean()["w"], expected, rtol=1e-12)
    np.testing.assert_allclose(merged.mean()["w"], expected, rtol=1e-12)
    np.testing.assert_allclose(weighted_mean([d for d in deltas], list(weights))["w"], expected, rtol=1e-12)
    assert merged.count == whole.count == 50 and a.count == 25
    with pytest.raises(ValueError, match="non-negative"):
        whole.add(deltas[0], float("nan"))


def _row(rid: int, dev: str, value: float, n: int = 10) -> UpdateRow:
    delta = {"w": np.full(3, value, np.float16)}
    return UpdateRow(rid, dev, f"msg-{dev}-{rid}", n, b"payload-" + dev.encode(), {"mse": value}, (delta, float(n)),
                     global_norm(delta))


def test_batched_updates_keep_exact_running_sums_across_ingesters_and_close_once(fleet_db) -> None:
    st = FleetState(fleet_db)
    v0 = st.save_model("tsfm", {"w": np.zeros(3, np.float32)})
    rec = st.open_round("tsfm", "train", v0, ["a", "b", "c", "d"], 2, 1e12, {})
    assert st.add_updates([_row(rec.round_id, "a", 1.0), _row(rec.round_id, "b", 2.0, 30)], "worker-1") == [
        STORED, STORED]
    # a second ingester (another process in production) with a re-delivered copy of b and a new update
    other = FleetState(fleet_db)
    assert other.add_updates([_row(rec.round_id, "b", 2.0, 30), _row(rec.round_id, "c", 4.0)], "worker-2") == [
        DUPLICATE, STORED]
    assert other.add_updates([_row(99, "d", 1.0)], "worker-2") == [NOT_OPEN]  # no such round
    running = st.round_sum(rec.round_id)
    assert running.count == 3 and running.weight == 50.0
    np.testing.assert_allclose(running.mean()["w"], (10 * 1 + 30 * 2 + 10 * 4) / 50)
    assert st.reports(rec.round_id)["b"] == (30, {"mse": 2.0})

    def finish(run: RunningSum, rows, fetch) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
        assert [r[:2] for r in rows] == [("a", 10), ("b", 30), ("c", 10)] and fetch([]) == {}
        return {"w": run.mean()["w"].astype(np.float32)}

    done, v1 = other.close_streaming_round(rec.round_id, "tsfm", finish)
    assert done and v1 == v0 + 1
    assert st.close_streaming_round(rec.round_id, "tsfm", finish) == (True, v1)  # no second aggregate
    assert st.add_updates([_row(rec.round_id, "d", 1.0)], "worker-1") == [NOT_OPEN]  # closed: nothing joins late
    np.testing.assert_allclose(st.latest_model("tsfm")[1]["w"], 2.2, rtol=1e-6)
    other.close()
    st.close()


def test_forgetting_a_device_mid_round_makes_the_close_fall_back_to_stored_updates(fleet_db) -> None:
    st = FleetState(fleet_db)
    v0 = st.save_model("tsfm", {"w": np.zeros(3, np.float32)})
    rec = st.open_round("tsfm", "train", v0, ["a", "b"], 1, 1e12, {})
    st.add_updates([_row(rec.round_id, "a", 1.0), _row(rec.round_id, "b", 3.0)])
    st.forget_device("a")
    assert st.close_streaming_round(rec.round_id, "tsfm", lambda run, rows, fetch: run.mean()) == (False, None)
    assert st.open_rounds("tsfm")[0].round_id == rec.round_id and st.reported(rec.round_id) == {"b"}
    st.close()


def test_batch_writer_applies_in_order_and_calls_back_after_commit(tmp_path) -> None:
    st = FleetState(tmp_path / "f.sqlite")
    v0 = st.save_model("tsfm", {"w": np.zeros(3, np.float32)})
    rec = st.open_round("tsfm", "train", v0, ["a", "b"], 1, 1e12, {})
    writer = BatchWriter(st, max_batch=100, linger_s=0.05)
    seen: list[object] = []
    writer.submit(lambda s: s.upsert_device("a", state="online"), seen.append)
    for dev in ("a", "b", "a"):
        writer.submit(_row(rec.round_id, dev, 1.0), seen.append)
    writer.submit(lambda s: s.count_updates(rec.round_id), seen.append)
    assert writer.flush(10)
    assert seen == [None, STORED, STORED, DUPLICATE, 2]
    assert writer.batches == 1  # five writes, one transaction
    writer.stop()
    st.close()


def test_a_write_after_the_writer_stopped_is_never_committed_and_nothing_waits_for_it(tmp_path) -> None:
    """paho can deliver a message while the coordinator disconnects, after the writer's thread ended: the write is
    not applied (so not acknowledged: the broker delivers it again), and neither flush nor a second stop hangs."""
    st = FleetState(tmp_path / "f.sqlite")
    writer = BatchWriter(st, linger_s=0.0)
    seen: list[object] = []
    writer.submit(lambda s: "before", seen.append)
    writer.stop()
    writer.submit(lambda s: "after", seen.append)
    t0 = time.monotonic()
    assert writer.flush(30) is False
    writer.stop()
    assert time.monotonic() - t0 < 5 and seen == ["before"]
    st.close()


@pytest.mark.parametrize("clip", [None, 0.5])
def test_streamed_bounded_mean_equals_bounding_every_update_and_reads_only_the_bounded_ones(clip) -> None:
    """The streaming close (a running sum of the raw n_k·Δ_k plus each update's norm and count) gives exactly the
    default bounds' result (adaptive norm clip, sample caps) and the strategy's own clip_norm, and reads back only
    the updates whose coefficient the bounds changed."""
    ups = _honest_and_one_attacker(9)
    ups[3] = ClientUpdate("h3", 5000, ups[3].delta)  # an over-weighted honest one: capped, not clipped
    running, rows = RunningSum(), []
    for u in ups:  # as the coordinator ingests them: the attacker's 2^31 samples keep it out of the raw sum
        summed = summable(u.n_samples, global_norm(u.delta), Bounds(), global_norm(BASE) + 1.0)
        if summed:
            running.add(u.delta, float(u.n_samples))
        rows.append((u.device_id, u.n_samples, global_norm(u.delta), summed))
    assert [r[0] for r in rows if not r[3]] == ["evil"]
    plan = plan_bounds([r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows], Bounds())
    fetched: list[str] = []

    def fetch(devices):  # type: ignore[no-untyped-def]
        fetched.extend(devices)
        return {u.device_id: u.delta for u in ups if u.device_id in devices}

    streamed = bounded_streamed_mean(running, rows, plan, clip, fetch)
    expected = FedAvg(clip_norm=clip).aggregate({k: np.zeros_like(v, np.float32) for k, v in BASE.items()},
                                               bound_updates(ups, Bounds()).updates)
    for k in BASE:
        np.testing.assert_allclose(streamed[k], expected[k], rtol=1e-6, atol=1e-7)  # `expected` went through float32
    if clip is None:
        assert set(fetched) == {"evil", "h3"}  # the clipped attacker and the capped count, nobody else


def test_running_sum_blobs_are_exact_and_old_npz_rows_still_read() -> None:
    """The per-batch sum blob is msgpack of float64 bytes; a row written as .npz before that (a round left open
    across an upgrade) still reads, bit for bit."""
    from coordinator.fleet.state import sums_from_blob, sums_to_blob
    from edge_client.daemon.store import params_to_blob

    rng = np.random.default_rng(3)
    sums = {"w": rng.normal(size=(3, 24, 64)) * 1e6, "b": np.array([1e-300, -0.0, 5e-324])}
    for blob in (sums_to_blob(sums), params_to_blob(sums)):
        back = sums_from_blob(blob)
        assert set(back) == set(sums)
        for k in sums:
            assert back[k].dtype == np.float64 and back[k].tobytes() == sums[k].tobytes()
            back[k] += 1.0  # writable: a running sum adds into it
