"""The synthetic silo (KernelSynth + TSMixup) and the standard long-horizon protocol: deterministic,
sized as configured, no leakage of held-out data, and the window counts of the published protocol."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.pretrain.protocol import HORIZONS, nlinear_fit, protocol_windows, seasonal_naive_scores, split_subset
from coordinator.pretrain.synthetic import (
    KERNELSYNTH,
    TSMIXUP,
    SyntheticSettings,
    kernel_bank,
    kernelsynth,
    random_kernel,
    series_count,
    synthetic_silo,
    tsmixup,
)

SMALL = SyntheticSettings(length=96, window_stride=8, share=0.25)


def test_kernelsynth_is_seeded_prefix_stable_and_finite() -> None:
    a = kernelsynth(6, SMALL)
    b = kernelsynth(3, SMALL, start=3)
    assert a.shape == (6, 96) and np.isfinite(a).all()
    np.testing.assert_array_equal(a[3:], b)  # series i depends on i only: the cache can grow
    assert (a.std(axis=1) > 1e-6).all()
    assert not np.allclose(a[0], a[1])


def test_random_kernels_compose_bank_members() -> None:
    bank = kernel_bank(96)
    assert len(bank) >= 20
    rng = np.random.default_rng(0)
    kernels = [random_kernel(rng, bank, 5) for _ in range(50)]
    # compositions (sums/products) appear as well as single kernels
    assert any("+" in repr(k) or "*" in repr(k) for k in kernels)
    assert any(k in bank for k in kernels)


def test_tsmixup_mixes_only_the_given_sources_convexly() -> None:
    rng = np.random.default_rng(0)
    ramp = np.linspace(1.0, 2.0, 300)  # positive: mean scaling keeps it a scaled ramp
    out = tsmixup(20, [ramp], SMALL, rng)
    assert out.shape == (20, 96)
    # one source -> every mixture is that source's window divided by its mean |x| (weights sum to 1)
    for row in out:
        assert np.all(np.diff(row) > 0)
        assert 0.5 < row.mean() < 1.5
    with pytest.raises(ValueError, match="gap-free"):
        tsmixup(2, [np.full(50, np.nan)], SMALL, rng)


def test_share_sets_the_fraction_of_synthetic_windows() -> None:
    per_series = (96 - 48) // 8 + 1
    n = series_count(SMALL, n_real_windows=3000, span=48)
    assert n * per_series == pytest.approx(0.25 / 0.75 * 3000, rel=0.02)
    assert series_count(SyntheticSettings(share=0.0), 3000, 48) == 0
    with pytest.raises(ValueError):
        SyntheticSettings(share=1.0)


def test_synthetic_silo_windows_and_kinds(tmp_path) -> None:
    from coordinator.pretrain.silos import build_silos

    real = build_silos(("energy",), 48 + 24, train_rows=400)
    # sub-dataset ids are the silo's datasets (ETTh1, electricity), not dataset x channel
    assert real[0].n_sub == 2 and set(np.unique(real[0].sub_ids)) == {0, 1}
    assert np.all(np.diff(real[0].sub_ids) >= 0)  # ETTh1's windows first, then electricity's
    s = SyntheticSettings(length=96, window_stride=8, share=0.1, kernelsynth_fraction=0.5)
    silo = synthetic_silo(s, real, 72, cache_dir=tmp_path)
    share = silo.n_samples / (silo.n_samples + sum(r.n_samples for r in real))
    assert share == pytest.approx(0.1, abs=0.01)
    assert set(np.unique(silo.sub_ids)) == {KERNELSYNTH, TSMIXUP}
    x, y, _ = silo.sample(np.random.default_rng(0), 16, 48)
    assert x.shape == (16, 48) and y.shape == (16, 24) and np.isfinite(x.numpy()).all()
    again = synthetic_silo(s, real, 72, cache_dir=tmp_path)  # from the cache, identical
    np.testing.assert_array_equal(silo.pool.flat, again.pool.flat)


def test_standard_protocol_windows_match_the_published_counts() -> None:
    tw = protocol_windows("etth1", 512)
    # ETTh1 test split: 2,880 rows; stride-1 windows with H targets inside it, 7 channels
    for h in HORIZONS:
        assert len(tw.rows(h)) == (2880 - h + 1) * 7
    assert tw.x.shape[1] == 512 and np.isfinite(tw.x).all()
    sub = tw.rows(96, subset=True)
    assert 0 < len(sub) <= 1000 and set(sub) <= set(tw.rows(96))


def test_nlinear_and_seasonal_naive_baselines_are_sane() -> None:
    sn = seasonal_naive_scores("etth1")
    assert 0.4 < sn["H96"]["mse"] < 0.7
    w, b = nlinear_fit("etth1", 512, 96, stride=8)
    assert w.shape == (512, 96) and b.shape == (96,)
    x, y = split_subset("etth1", "val", 512, 96, n=200)
    last = x[:, -1:]
    pred = (x - last) @ w + b + last
    naive = np.repeat(last, 96, axis=1)
    assert np.mean((pred - y) ** 2) < np.mean((naive - y) ** 2)  # least squares beats repeating the last value
