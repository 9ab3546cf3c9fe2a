"""Differential privacy (coordinator.fleet.privacy, edge_client.learning.dp): the accountant is dp-accounting's, the
mechanism adds the noise it is charged for, the ledger is durable on both backends, a spent budget stops training,
and real rounds over Mosquitto aggregate exactly the clipped, noised sum -- centrally or on the devices."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.fleet.privacy import (
    Charge,
    DPConfig,
    PrivacyBudgetSpent,
    calibrate_noise,
    calibrate_prototype_noise,
    dp_sum,
    epsilon,
    next_clip,
    prototype_epsilon,
)
from coordinator.fleet.server import FleetConfig, FleetCoordinator
from coordinator.fleet.simulation import carve_devices, start_devices
from coordinator.fleet.state import FleetState, PrivacyRow
from edge_client import wire as P
from edge_client.daemon.client import dp_options, prototype_dp_options
from edge_client.learning.dp import clip_l2, privatize, privatize_prototype
from edge_client.learning.head import slice_head


def test_epsilon_is_dp_accountings_rdp_of_the_subsampled_gaussian() -> None:
    acc = RdpAccountant(list(range(2, 257)))
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.1)), 30)
    ours = epsilon([Charge(0.2, 1.1)] * 30, 1e-3)
    assert ours == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)
    assert epsilon([Charge(0.2, 1.1)] * 31, 1e-3) > ours > epsilon([Charge(0.2, 1.1)] * 29, 1e-3)
    assert epsilon([Charge(0.2, 1.1), Charge(0.2, 0.0)], 1e-3) == math.inf  # a round without noise: no guarantee


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_noise_spends_the_target_epsilon(target: float) -> None:
    z = calibrate_noise(target, 1 / 50, 0.5, 20)
    spent = epsilon([Charge(0.5, z)] * 20, 1 / 50)
    assert spent <= target and spent == pytest.approx(target, rel=0.02)
    assert calibrate_noise(math.inf, 1 / 50, 0.5, 20) == 0.0


def test_dp_sum_clips_every_delta_and_adds_noise_of_the_charged_std() -> None:
    rng = np.random.default_rng(0)
    deltas = [{"w": rng.normal(0, s, 4000).astype(np.float16)} for s in (0.001, 0.1, 5.0)]
    clean, norms = dp_sum(deltas, 0.5, 0.0)
    expected = sum(clip_l2(d, 0.5)[0]["w"] for d in deltas)
    np.testing.assert_allclose(clean["w"], expected)
    assert norms[0] < 0.5 < norms[1] < norms[2]  # the norms before clipping (adaptive clipping counts them)
    noisy, _ = dp_sum(deltas, 0.5, 0.3, np.random.default_rng(1))
    assert np.std(noisy["w"] - clean["w"]) == pytest.approx(0.3, rel=0.05)


def test_a_device_clips_and_adds_its_share_of_the_noise() -> None:
    delta = {"a": np.full((50, 40), 0.2, np.float16), "b": np.full(7, -0.3, np.float16)}
    clipped, norm = clip_l2(delta, 1.0)
    assert norm > 1.0 and math.sqrt(sum(np.sum(v ** 2) for v in clipped.values())) == pytest.approx(1.0)
    noisy = privatize(delta, 1.0, 0.05, np.random.default_rng(3))
    assert {k: v.dtype for k, v in noisy.items()} == {"a": np.float16, "b": np.float16}  # same wire dtype
    assert np.std(noisy["a"].astype(np.float64) - clipped["a"]) == pytest.approx(0.05, rel=0.05)
    assert dp_options({"dp_clip": 0.5, "dp_noise_std": 0.01}) == (0.5, 0.01)
    assert dp_options({}) is None
    for bad in ({"dp_clip": -1}, {"dp_clip": "x"}, {"dp_clip": 1.0, "dp_noise_std": float("nan")}):
        with pytest.raises(P.InvalidMessage):
            dp_options(bad)


def test_a_prototype_is_clipped_and_noised_on_the_device_and_accounted_per_release() -> None:
    """The Gaussian mechanism on a prototype: norm ≤ C without noise, noise of std σ·C with it; ε is the RDP
    accountant's for noise multiplier σ/2 (replace-one: sensitivity 2C), composed over the releases."""
    big, small = np.full(64, 0.5), np.full(64, 0.01)
    assert np.linalg.norm(privatize_prototype(big, 1.0, 0.0)) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(privatize_prototype(small, 1.0, 0.0), small.astype(np.float32))  # inside the ball
    many = np.array([privatize_prototype(big, 1.0, 2.0, np.random.default_rng(i)) for i in range(200)])
    assert many.dtype == np.float32 and np.std(many - big / np.linalg.norm(big)) == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValueError):
        privatize_prototype(big, 0.0, 1.0)
    assert prototype_epsilon(3.0, 4, 1e-3) == pytest.approx(epsilon([Charge(1.0, 1.5)] * 4, 1e-3))
    assert prototype_epsilon(3.0, 1, 1e-3) < prototype_epsilon(3.0, 4, 1e-3) < prototype_epsilon(2.0, 4, 1e-3)
    assert prototype_epsilon(0.0, 4, 1e-3) == math.inf
    sigma = calibrate_prototype_noise(3.0, 1e-3, 4)
    assert prototype_epsilon(sigma, 4, 1e-3) == pytest.approx(3.0, rel=0.02)
    assert prototype_dp_options({"proto_clip": 0.5, "proto_noise": 2}) == (0.5, 2.0)
    assert prototype_dp_options({"method": "fcucr"}) is None
    for bad in ({"proto_clip": 0}, {"proto_clip": "x"}, {"proto_clip": 1.0, "proto_noise": -1.0},
                {"proto_clip": 1.0, "proto_noise": float("inf")}):
        with pytest.raises(P.InvalidMessage):
            prototype_dp_options(bad)


def test_adaptive_clip_follows_the_target_quantile_of_the_norms() -> None:
    cfg = DPConfig(adaptive=True, target_quantile=0.5, clip_lr=0.2, count_noise=2.0, clip=10.0)
    rng = np.random.default_rng(0)
    clip = cfg.clip
    for _ in range(200):
        clip = next_clip(clip, rng.uniform(0, 2, 100).tolist(), cfg, 100, rng)
    assert clip == pytest.approx(1.0, abs=0.1)  # the median of U(0, 2)
    assert cfg.delta_noise(100) > cfg.noise_multiplier  # part of the noise paid for the count
    with pytest.raises(ValueError, match="σ_b"):
        DPConfig(adaptive=True, noise_multiplier=2.0, count_noise=0.5).delta_noise(10)
    with pytest.raises(ValueError, match="central"):
        DPConfig(adaptive=True, placement="distributed")


def test_the_privacy_ledger_is_durable_on_both_backends(fleet_db) -> None:
    state = FleetState(fleet_db)
    row = PrivacyRow(1, "tsfm", "central", 1.2, 0.5, 0.1, 4, 0.01, 2.5)
    assert state.charge_privacy(row) and not state.charge_privacy(row)  # charged once
    state.charge_privacy(PrivacyRow(2, "tsfm", "central", 0.0, 0.5, 0.1, 4, 0.01, math.inf))
    state.set_next_clip(1, 0.2)
    state.close()
    again = FleetState(fleet_db)
    assert again.privacy_ledger("tsfm") == [PrivacyRow(1, "tsfm", "central", 1.2, 0.5, 0.1, 4, 0.01, 2.5, 0.2),
                                            PrivacyRow(2, "tsfm", "central", 0.0, 0.5, 0.1, 4, 0.01, math.inf)]
    again.close()


def _fleet(mosquitto, tiny_export, db, dp: DPConfig, fleet: str):  # type: ignore[no-untyped-def]
    coord = FleetCoordinator(FleetConfig(fleet=fleet, deadline_s=60, local_epochs=1, lr=3e-3, min_devices=3, dp=dp),
                             mosquitto.address, FleetState(db)).start()
    coord.ensure_model(slice_head(tiny_export["model"].head_state(), 24))
    clients = start_devices(carve_devices(3, seed=1), tiny_export["backbone"], mosquitto.address, fleet, horizon=24)
    assert len(coord.wait_for_devices(3, 15)) == 3
    return coord, clients


def _stop(coord, clients) -> None:  # type: ignore[no-untyped-def]
    for c in clients:
        c.stop()
    coord.stop()


@pytest.mark.broker
def test_central_dp_rounds_add_the_charged_noise_and_stop_when_the_budget_is_spent(mosquitto, tiny_export,
                                                                                  tmp_path) -> None:
    z = 0.8
    budget = epsilon([Charge(1.0, z)] * 2, 1 / 3) * 1.001  # room for two rounds of all three devices
    dp = DPConfig(noise_multiplier=z, clip=0.05, epsilon_budget=budget)
    db = tmp_path / "fleet.sqlite"
    coord, clients = _fleet(mosquitto, tiny_export, db, dp, "dp1")
    try:
        for r in range(2):
            coord.dp_rng = np.random.default_rng(r)
            _, base = coord.current_model()
            res = coord.run_round("train")
            assert res.state == "closed"
            stored = [P.decode(p) for _, p in coord.state.updates(res.round_id)]
            assert len(stored) == 3
            sums, _ = dp_sum([u.delta for u in stored], 0.05, z * 0.05, np.random.default_rng(r))
            _, new = coord.current_model()
            for k in base:  # exactly base + (Σ clip(Δ) + N(0, (zC)²)) / devices asked
                np.testing.assert_allclose(new[k], (base[k] + sums[k] / 3).astype(np.float32), rtol=1e-5, atol=1e-6)
            assert res.epsilon == pytest.approx(epsilon([Charge(1.0, z)] * (r + 1), 1 / 3))
        with pytest.raises(PrivacyBudgetSpent, match="budget spent"):
            coord.run_round("train")
        assert coord.state.next_round_id() == 3  # the refused round was never opened
        assert coord.privacy_spent() == pytest.approx(res.epsilon)
    finally:
        _stop(coord, clients)
    out = CliRunner().invoke(app, ["status", "--db", str(db)])
    assert out.exit_code == 0 and "privacy" in out.output and f"{res.epsilon:.3g}" in out.output
    assert FleetState(db).latest_model_meta("tsfm")[1]["dp_epsilon"] == pytest.approx(res.epsilon)  # dashboard, metrics


@pytest.mark.broker
def test_distributed_dp_devices_upload_clipped_noised_deltas(mosquitto, tiny_export, tmp_path) -> None:
    z, clip = 1.0, 0.02
    coord, clients = _fleet(mosquitto, tiny_export, tmp_path / "fleet.sqlite",
                            DPConfig(placement="distributed", noise_multiplier=z, clip=clip), "dp2")
    try:
        _, base = coord.current_model()
        res = coord.run_round("train")
        assert res.state == "closed"
        stored = [P.decode(p) for _, p in coord.state.updates(res.round_id)]
        size = sum(v.size for v in base.values())
        share = z * clip / math.sqrt(3)  # each device's noise std: the sum of three carries z·C
        for u in stored:  # ‖Δ‖ ≈ sqrt(‖clip(Δ)‖² + size·share²): the noise is on the device, before upload
            norm = math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in u.delta.values()))
            assert norm == pytest.approx(math.sqrt(size) * share, rel=0.15) and norm > clip
        _, new = coord.current_model()
        for k in base:  # the coordinator adds nothing and clips nothing: the mean of what arrived
            expected = base[k] + sum(np.asarray(u.delta[k], np.float64) for u in stored) / 3
            np.testing.assert_allclose(new[k], expected.astype(np.float32), rtol=1e-5, atol=1e-6)
    finally:
        _stop(coord, clients)


@pytest.mark.parametrize(("args", "message"), [
    (["--dp", "central"], "needs --dp-noise or --dp-epsilon-budget"),
    (["--dp", "sideways", "--dp-noise", "1"], "placement"),
    (["--dp", "distributed", "--dp-noise", "1", "--dp-adaptive-clip", "0.5"], "central placement only"),
    (["--dp", "central", "--dp-noise", "1", "--strategy", "median"], "fedavg or fedprox"),
])
def test_serve_refuses_dp_settings_it_cannot_honour(tmp_path, args: list[str], message: str) -> None:
    out = CliRunner().invoke(app, ["serve", "--db", str(tmp_path / "f.sqlite"), "--broker", "127.0.0.1:1",
                                   "--wait-devices", "1", *args])
    assert out.exit_code == 2 and message in " ".join(out.output.split())


@pytest.mark.broker
def test_adaptive_clipping_moves_the_next_rounds_clip_and_devices_get_it(mosquitto, tiny_export, tmp_path) -> None:
    dp = DPConfig(noise_multiplier=0.5, clip=1e-4, adaptive=True, target_quantile=0.5, clip_lr=0.5, count_noise=0.3)
    coord, clients = _fleet(mosquitto, tiny_export, tmp_path / "fleet.sqlite", dp, "dp3")
    try:
        coord.dp_rng = np.random.default_rng(0)
        for _ in range(2):
            assert coord.run_round("train").state == "closed"
        first, second = coord.state.privacy_ledger("tsfm")
        # every norm is far above 1e-4: none unclipped, so C grows by about exp(0.5 · 0.5) per round
        assert first.clip == 1e-4 and second.clip == first.next_clip > first.clip
        assert second.next_clip > second.clip
        tasks = [coord.state.round(r).config["options"]["dp_clip"] for r in (1, 2)]
        assert tasks == [first.clip, second.clip]  # what each round's devices were told to clip to
    finally:
        _stop(coord, clients)
