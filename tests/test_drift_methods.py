"""Device methods for drifted and faulty streams: sensor-fault repair (edge_client.learning.repair) and the track
record's forecast combination (edge_client.learning.serving)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from edge_client.learning import distortions as DS
from edge_client.learning.repair import SensorRepair, repaired_windows
from edge_client.learning.serving import TrackRecord, simplex_min

SEASON = 24


def _series(n: int = 2000, seed: int = 0) -> np.ndarray:
    """A daily cycle with a slow wander and noise, quantised like a real meter (short runs of equal readings)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = 3 * np.sin(2 * np.pi * t / SEASON) + np.cumsum(rng.normal(0, 0.05, n)) + rng.normal(0, 0.2, n)
    return np.round(x, 1)


def _faulty(x: np.ndarray, start: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Stuck runs, gaps and spikes after `start`, as the continual benchmark injects them; (record, faulty mask)."""
    rng = np.random.default_rng(seed)
    rec = x.astype(np.float64).copy()
    std = float(np.std(x[:start]))
    for a in range(start + 20, len(x) - 80, 150):
        kind = ("stuck", "gap", "spikes")[(a // 150) % 3]
        length = int(rng.integers(12, 72))
        if kind == "stuck":
            rec[a : a + length] = rec[a - 1]
        elif kind == "gap":
            rec[a : a + length] = np.nan
        else:
            hit = a + rng.choice(length, max(1, length // 8), replace=False)
            rec[hit] += rng.choice([-1.0, 1.0], len(hit)) * rng.uniform(3, 5, len(hit)) * std
    return rec, ~np.isfinite(rec) | (rec != x)


def test_repair_finds_the_faults_leaves_a_working_sensor_alone_and_imputes_better_than_forward_fill():
    x = _series()
    rep = SensorRepair.fit(x[:800], SEASON)  # a working sensor's history: quantised, with short equal runs
    assert rep.max_run >= 6 and np.isfinite(rep.spike_limit)
    assert rep.flags(x[None])[0].mean() < 0.01  # no faults: (almost) nothing flagged
    rec, bad = _faulty(x, 800)
    flags = rep.flags(rec[None])[0]
    assert flags[bad].mean() > 0.9 and bad[flags].mean() > 0.85  # recall and precision on the faults
    fixed, imputed = rep.repair(rec[None])
    ffill, _ = DS.fill_missing(rec[None])
    err_fixed, err_ffill = np.mean((fixed[0][bad] - x[bad]) ** 2), np.mean((ffill[0][bad] - x[bad]) ** 2)
    assert np.isfinite(fixed).all() and imputed[0] == pytest.approx(flags.mean())
    assert err_fixed < 0.5 * err_ffill, (err_fixed, err_ffill)


def test_a_context_is_repaired_with_nothing_newer_than_its_last_step():
    """A stuck run at the newest end of a context (a live forecast) is held at the last good reading; repairing a
    batch of contexts is the same as repairing each on its own (no context borrows from another, later one)."""
    x = _series()
    rep = SensorRepair.fit(x[:800], SEASON)
    ctx = x[900:1412].astype(np.float64).copy()
    ctx[-30:] = ctx[-31]  # frozen for the last 30 readings
    fixed, _ = rep.repair(ctx[None])
    assert np.allclose(fixed[0][-29:], ctx[-31]) and np.allclose(fixed[0][:-30], ctx[:-30])
    rec, _ = _faulty(x, 800)
    batch = np.stack([rec[s : s + 512] for s in range(800, 1400, 100)])
    alone = np.concatenate([rep.repair(row[None])[0] for row in batch])
    assert np.array_equal(rep.repair(batch)[0], alone)


def test_repaired_windows_keep_contexts_with_gaps_and_drop_targets_that_are_mostly_imputed():
    x = _series()
    rep = SensorRepair.fit(x[:800], SEASON)
    rec = x.astype(np.float64).copy()
    rec[1000:1010] = np.nan  # a short gap
    rec[1300:1360] = np.nan  # a long one
    ctx, y, idx, imputed = repaired_windows(rec, rep, 512, 24, start=900, stop=1500)
    assert np.isfinite(ctx).all() and np.isfinite(y).all() and len(y) == len(idx) == len(imputed)
    gap_in_ctx = (idx - 512 <= 1000) & (idx > 1010)
    assert gap_in_ctx.any() and (imputed[gap_in_ctx] > 0).all()  # make_windows would have dropped these
    t = idx[:, None] + np.arange(24)[None, :]
    assert not ((t >= 1300) & (t < 1360)).all(axis=1).any()  # a target that is all guess is never fit
    assert (((t >= 1000) & (t < 1010)).any(axis=1)).any()  # a few imputed target steps are kept


def test_the_rolling_median_skips_a_gap_without_a_warning_and_is_the_median_elsewhere():
    """A window inside a long gap has no median (NaN) and asks numpy for none, so no all-NaN RuntimeWarning is
    raised -- or needs silencing through the process-wide, thread-unsafe warnings filter."""
    import warnings

    from edge_client.learning.repair import _rolling_median

    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 60))
    x[0, 20:40] = np.nan  # 20 missing readings: windows of 5 centred inside hold none
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        med = _rolling_median(x, 5)
    assert np.isnan(med[0, 23:37]).all() and np.isfinite(med[0, :20]).all() and np.isfinite(med[1]).all()
    np.testing.assert_allclose(med[1, 2:-2], [np.median(x[1, i - 2: i + 3]) for i in range(2, 58)])
    np.testing.assert_allclose(med[0, 0], np.median(x[0, :3]))  # the edge: what exists


def test_simplex_min_matches_a_brute_force_search():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.normal(size=(50, 3))
        g = a.T @ a / 50
        w = simplex_min(g)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
        grid = [np.array(p) / 20 for p in itertools.product(range(21), repeat=3) if sum(p) == 20]
        best = min(float(v @ g @ v) for v in grid)
        assert float(w @ g @ w) <= best + 1e-9


def test_track_record_combination_is_served_only_on_its_own_prequential_record():
    """Two forecasters with independent errors of equal size: the best convex combination halves the error. It is
    a candidate like the others: scored on each round's new data with the weights of the round before, and served
    only after `min_count` scored rounds beat the global head's record by the margin."""
    tr = TrackRecord(beta=0.5, margin=0.02, combine=True)
    rng = np.random.default_rng(0)
    for r in range(4):
        e = rng.normal(size=(2, 4000))
        tr.update({"global": float(np.mean(e[0] ** 2)), "prior": float(np.mean(e[1] ** 2))})
        if tr.weights:
            tr.update({"combo": float(np.mean((tr.weights["global"] * e[0] + tr.weights["prior"] * e[1]) ** 2))})
        tr._refit({"global": e[0], "prior": e[1]})
        assert tr.weights["global"] == pytest.approx(0.5, abs=0.05) and sum(tr.weights.values()) == pytest.approx(1)
        assert tr.choose() == ("combo" if r >= 2 else "global")
    assert tr.scores["combo"] == pytest.approx(0.5, abs=0.05) and tr.counts["combo"] == 3
    tr_off = TrackRecord(beta=0.5, margin=0.02)
    tr_off.update({"global": 1.0, "prior": 1.0})
    assert tr_off.weights == {} and tr_off.choose() == "global"


def test_served_combination_is_the_weighted_mean_and_replaces_a_failed_personal_model_by_the_global_head(
        tiny_export):
    from edge_client.learning import personalize as PZ
    from edge_client.learning.head import Features, slice_head
    from edge_client.learning.serving import ServedModel, Windows

    head = {k: np.asarray(v, np.float32) for k, v in slice_head(tiny_export["model"].head_state(), 24).items()}
    other = {k: v + 0.1 for k, v in head.items()}
    rng = np.random.default_rng(0)
    n, d = 6, head["point_weight"].shape[1]
    w = Windows(Features(rng.normal(size=(n, d)).astype(np.float32), np.zeros((n, 1)), np.ones((n, 1))),
                rng.normal(size=(n, 24)), np.zeros(n), np.zeros(n, int), np.zeros(n), rng.normal(size=(n, 24)))
    served = ServedModel(PZ.init_params(other, 2), head, head, naive_prior=True)
    tr = TrackRecord(beta=0.5, margin=0.0, combine=True, min_count=1)
    tr.weights = {"personal": 0.5, "naive": 0.25, "global": 0.25}
    tr.update({"global": 1.0, "combo": 0.5})
    served = tr.apply(served)
    point = served.forecast(w)[0]
    parts = {k: served.candidate_forecast(k, w)[0] for k in ("personal", "naive", "global")}
    assert np.allclose(point, 0.5 * parts["personal"] + 0.25 * parts["naive"] + 0.25 * parts["global"], atol=1e-5)
    assert served.metrics()["combo_personal"] == 0.5
    failed = ServedModel(PZ.init_params(other, 2), head, head, naive_prior=True, fallback=True)
    failed = tr.apply(failed)
    assert failed.combo == {"naive": 0.25, "global": 0.75}  # the personal model's weight goes to the global head


def test_huber_point_loss_gradient_matches_finite_differences_and_bounds_a_faulty_target():
    from edge_client.learning import personalize as PZ
    from tests.test_personalization import H, N, _check_grads, _features, _params

    rng = np.random.default_rng(0)
    params = _params(rng)
    y = rng.normal(size=(N, H))
    y[0, 0] += 40.0  # a spike in a target: far in the linear part of the Huber loss
    batch = PZ.Batch(_features(rng), y)
    parts = _check_grads(PZ.PersonalConfig(rank=2, huber=0.5), batch, params)
    assert set(parts) == {"task"}
    sq = PZ.personal_loss_and_grad(params, batch, PZ.PersonalConfig(rank=2))
    hub = PZ.personal_loss_and_grad(params, batch, PZ.PersonalConfig(rank=2, huber=0.5))
    assert hub[0] < sq[0] / 5  # the spike's square no longer dominates
    assert np.abs(hub[1]["point_bias"]).max() < np.abs(sq[1]["point_bias"]).max() / 5


def test_a_round_that_asks_for_repair_rebuilds_the_learner_from_its_repaired_record_and_keeps_its_state(
        tiny_export):
    from edge_client.learning import personalize as PZ
    from edge_client.learning.head import slice_head
    from edge_client.learning.learner import DeviceLearner, SplitConfig
    from edge_client.runtime.backbone import BackboneRunner

    x = 10 + _series(1200)
    rec, _ = _faulty(x, 600)
    learner = DeviceLearner(BackboneRunner(tiny_export["backbone"]), rec, season=SEASON, split=SplitConfig())
    n_plain = learner.n_train  # windows with a gap anywhere were dropped
    head = slice_head(tiny_export["model"].head_state(), 24)
    cfg = PZ.PersonalConfig(rank=2, epochs=1, track_record=0.5, track_combine=True)
    learner.run_round(head, epochs=1, lr=1e-3, batch_size=32, personal=cfg)
    teacher, track = learner.personal_model, learner.track
    assert learner.repair is None
    out = learner.run_round(head, epochs=1, lr=1e-3, batch_size=32, personal=dataclasses.replace(cfg, repair=True))
    assert learner.repair is not None and learner.n_train > n_plain and learner.track is track
    assert learner.personal_model is not teacher and learner.personal_model.trained_at_day is not None
    assert out.metrics["repair_imputed"] > 0 and np.isfinite(out.metrics["personal_mse"])
    assert sum(v for k, v in out.metrics.items() if k.startswith("track_w_")) == pytest.approx(1.0)
    assert np.isfinite(learner.y_train).all() and np.isfinite(learner.w_train.x.feats).all()
