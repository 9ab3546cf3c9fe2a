"""The load harness end to end, small: emulated devices (several per process, one selector loop each) against a
private Mosquitto and a real `fedge serve` process; every acknowledged update stored and aggregated exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.loadtest.bank import FeatureBank, build_bank
from coordinator.loadtest.harness import LoadConfig, run_loadtest

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_feature_bank_slices_are_real_windows_of_one_series(tiny_export, tmp_path) -> None:
    folder = build_bank(tiny_export["backbone"], 24, tmp_path, max_windows=300)
    bank = FeatureBank.load(folder)
    slices, overlap = bank.plan(30, 48, 4)
    assert len(slices) == 30 and overlap > 0
    for sl in slices:
        series = bank.series[sl.series]
        assert series.lo <= sl.train[0] < sl.train[1] <= sl.eval[0] < sl.eval[1] <= series.hi
        data = bank.device_data(sl)
        assert data["f_train"].feats.shape == (48, tiny_export["config"].feature_dim)
        assert data["y_eval"].shape == (4, 24) and np.isfinite(data["y_train"]).all()
    assert len({sl.train for sl in slices}) == 30  # every device its own slice


def test_twenty_emulated_devices_complete_rounds_with_nothing_lost_or_duplicated(tiny_export, tmp_path) -> None:
    cfg = LoadConfig(devices=20, rounds=2, procs=2, n_train=48, n_eval=4, deadline_s=120, work_dir=tmp_path,
                     cache_dir=tmp_path / "cache", model_dir=tiny_export["dir"], bank_windows=300,
                     online_timeout_s=120)
    result = run_loadtest(cfg)
    assert result.rounds_done == 2 and result.updates == [20, 20]
    assert result.lost == 0 and result.duplicated == 0
    assert result.online_s < 120 and all(0 < s < 120 for s in result.round_s)
    assert all(up > 20 * 1000 for up in result.bytes_up)  # real float16 deltas went up
    assert result.coordinator_peak_rss_mb > 0 and result.broker_peak_rss_mb > 0
    assert result.rejected == {}


def test_a_secure_fleet_of_emulated_devices_completes_rounds_with_nothing_lost(tiny_export, tmp_path) -> None:
    """Secure mode: enrolled identities, TLS with client certificates and the fleet's ACL at the broker, signed
    messages both ways (a device whose signature or the coordinator's failed would show in `rejected`, or its
    update would be missing); the enrolment is cached for the next run."""
    from coordinator.loadtest.identities import enrolled_fleet

    cfg = LoadConfig(devices=6, rounds=2, procs=2, n_train=48, n_eval=4, deadline_s=120, work_dir=tmp_path,
                     cache_dir=tmp_path / "cache", model_dir=tiny_export["dir"], bank_windows=300,
                     online_timeout_s=120, secure=True)
    result = run_loadtest(cfg)
    assert result.secure and result.enrolled_now == 6
    assert result.rounds_done == 2 and result.updates == [6, 6]
    assert result.lost == 0 and result.duplicated == 0 and result.rejected == {}
    assert "TLS" in result.broker
    _, again = enrolled_fleet(tmp_path / "fleet-load", "load", [f"emu-{i:05d}" for i in range(7)])
    assert again == 1  # the six from the run were cached
