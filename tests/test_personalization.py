"""Personalisation (issue 4): analytic gradients vs finite differences for every loss term, NaN
safety, rule guards, task-vector weighting, distortions, and a real-backbone training run."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.fleet.aggregation import ClientUpdate
from coordinator.fleet.strategies.task_vector import (
    TaskVectorAggregation,
    cosine_matrix,
    personalized_aggregates,
    personalized_weights,
)
from edge_client.learning import distortions as D
from edge_client.learning import personalize as P
from edge_client.learning.head import Features, head_shapes
from edge_client.learning.rules import RuleGuard

N, DIM, H, Q = 7, 5, 3, 3


def _features(rng: np.random.Generator, n: int = N) -> Features:
    return Features(rng.normal(size=(n, DIM)), rng.normal(size=(n, 1)), rng.uniform(0.5, 2.0, (n, 1)))


def _params(rng: np.random.Generator, rank: int = 2) -> dict[str, np.ndarray]:
    head = {k: rng.normal(0, 0.3, s) for k, s in head_shapes(DIM, H, Q).items()}
    p = P.init_params(head, rank, seed=1)
    p = {k: v.astype(np.float64) for k, v in p.items()}
    p["adapter_B"] = rng.normal(0, 0.3, p["adapter_B"].shape)  # non-zero so A gets a gradient too
    return p


def _numeric(f, params: dict[str, np.ndarray], eps: float = 1e-6) -> dict[str, np.ndarray]:
    out = {}
    for k, v in params.items():
        g = np.zeros_like(v, dtype=np.float64)
        for idx in np.ndindex(v.shape):
            plus = {**params, k: v.copy()}
            minus = {**params, k: v.copy()}
            plus[k][idx] += eps
            minus[k][idx] -= eps
            g[idx] = (f(plus) - f(minus)) / (2 * eps)
        out[k] = g
    return out


def _check_grads(cfg: P.PersonalConfig, batch: P.Batch, params, anchor=None, sd_w: float = 1.0) -> dict[str, float]:
    def f(p):
        return P.personal_loss_and_grad(p, batch, cfg, anchor=anchor, sd_w=sd_w)[0]

    loss, grads, parts = P.personal_loss_and_grad(params, batch, cfg, anchor=anchor, sd_w=sd_w)
    num = _numeric(f, params)
    for k in params:
        np.testing.assert_allclose(grads[k], num[k], rtol=2e-3, atol=2e-5, err_msg=k)
    assert loss == pytest.approx(sum(parts.values()))
    return parts


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_task_and_prox_gradients(rng):
    params = _params(rng)
    batch = P.Batch(_features(rng), rng.normal(size=(N, H)))
    anchor = {k: v + rng.normal(0, 0.1, v.shape) for k, v in params.items()}
    parts = _check_grads(P.PersonalConfig(rank=2, prox_mu=0.3, quantiles=(0.1, 0.5, 0.9)), batch, params, anchor)
    assert set(parts) == {"task", "prox"}


def test_self_distillation_gradient_and_time_weight(rng):
    params = _params(rng)
    batch = P.Batch(_features(rng), rng.normal(size=(N, H)), rng.normal(size=(N, H)), rng.normal(size=(N, Q, H)))
    parts = _check_grads(P.PersonalConfig(rank=2, self_distill=0.7), batch, params, sd_w=0.6)
    assert parts["distill"] > 0
    assert P.sd_weight(0, 10) == 1.0 and P.sd_weight(10, 10) == pytest.approx(np.exp(-1))
    assert P.sd_weight(100, 10) < P.sd_weight(5, 10)


def test_fedoa_feature_distance_gradient(rng):
    params = _params(rng)
    batch = P.Batch(_features(rng), rng.normal(size=(N, H)), global_h=rng.normal(size=(N, DIM)))
    parts = _check_grads(P.PersonalConfig(rank=2, feature_distance=0.5), batch, params)
    assert parts["feature_distance"] > 0


def test_distortion_consistency_gradient(rng):
    params = _params(rng)
    x = _features(rng)
    # the clean features are a stop-gradient target: fix them so finite differences see the same loss
    batch = P.Batch(x, rng.normal(size=(N, H)), distorted=(_features(rng), _features(rng)),
                    clean_h=P.adapt(params, x.feats)[0])
    parts = _check_grads(P.PersonalConfig(rank=2, consistency=0.4, distorted_task_weight=0.5), batch, params)
    assert parts["consistency"] > 0 and parts["distorted_task"] > 0


def test_all_terms_together_gradient(rng):
    params = _params(rng)
    x = _features(rng)
    batch = P.Batch(x, rng.normal(size=(N, H)), rng.normal(size=(N, H)), rng.normal(size=(N, Q, H)),
                    rng.normal(size=(N, DIM)), (_features(rng),), P.adapt(params, x.feats)[0])
    cfg = P.PersonalConfig(rank=2, prox_mu=0.1, self_distill=0.3, feature_distance=0.2, consistency=0.3)
    _check_grads(cfg, batch, params, {k: v * 0.9 for k, v in params.items()}, sd_w=0.5)


def test_gate_gradient(rng):
    cfg = P.PersonalConfig(gate_entropy=0.05)
    stats = rng.normal(size=(N, P.N_GATE_STATS))
    personal = (rng.normal(size=(N, H)), rng.normal(size=(N, Q, H)))
    other = (rng.normal(size=(N, H)), rng.normal(size=(N, Q, H)))
    y = rng.normal(size=(N, H))
    gate = {"gate_w": rng.normal(size=P.N_GATE_STATS), "gate_b": np.asarray(0.3)}
    _, grads = P.gate_loss_and_grad(gate, stats, 0.7, personal, other, y, cfg)
    num = _numeric(lambda g: P.gate_loss_and_grad(g, stats, 0.7, personal, other, y, cfg)[0], gate)
    for k in gate:
        np.testing.assert_allclose(grads[k], num[k], rtol=1e-4, atol=1e-7)


def test_gate_prefers_the_better_source_and_calibrates_with_little_data(rng):
    cfg = P.PersonalConfig(gate_prior_count=10.0)
    y = rng.normal(size=(200, H))
    good = (y + rng.normal(0, 0.05, y.shape), np.repeat(y[:, None], Q, 1))
    bad = (y + rng.normal(0, 1.0, y.shape), np.repeat(y[:, None], Q, 1) + 1.0)
    stats = rng.normal(size=(200, P.N_GATE_STATS))
    rich = P.fit_gate(stats, good, bad, bad, y, n_train=10_000, cfg=cfg)
    assert rich.r(stats).mean() > 0.8  # personal is better and the device has lots of data
    poor = P.fit_gate(stats, good, bad, bad, y, n_train=2, cfg=cfg)
    assert poor.r(stats).mean() < 0.2  # too little data: calibrated toward global/prior
    c = P.calibrate_c(y, y + 1.0, y, n_val=10_000, cfg=cfg)
    assert c > 0.95  # global is exact, prior is off


def test_personal_model_trains_and_reduces_loss(rng):
    x = _features(rng, 200)
    w_true = rng.normal(size=(H, DIM))
    y = (x.feats @ w_true.T) * x.scale + x.loc
    head = {k: np.zeros(s) for k, s in head_shapes(DIM, H, Q).items()}
    cfg = P.PersonalConfig(rank=2, epochs=30, lr=0.02, self_distill=0.1)
    model = P.PersonalModel.from_head(head, cfg).fit(x, y, now_day=0.0)
    assert model.log.losses[-1] < 0.2 * model.log.losses[0]
    again = model.fit(x, y, now_day=5.0, seed=1)  # second chunk: self-distils from the first model
    assert "distill" in again.log.parts
    point, quant = again.predict(x)
    assert point.shape == (200, H) and quant.shape == (200, Q, H)


def test_meta_training_runs_and_is_deterministic(rng):
    x = _features(rng, 64)
    y = rng.normal(size=(64, H))
    head = {k: np.zeros(s) for k, s in head_shapes(DIM, H, Q).items()}
    cfg = P.PersonalConfig(rank=2, epochs=2, consistency=0.1, meta=True)
    views = (_features(rng, 64), _features(rng, 64))
    a = P.PersonalModel.from_head(head, cfg).fit(x, y, distorted=views)
    b = P.PersonalModel.from_head(head, cfg).fit(x, y, distorted=views)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert "meta_test" in a.log.parts


def test_distortions_are_seeded_and_shaped(rng):
    x = rng.normal(size=(16, 96)).astype(np.float32)
    for kind in D.DISTORTIONS:
        a, b = D.distort(x, kind, seed=3), D.distort(x, kind, seed=3)
        assert a.shape == x.shape
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(np.nan_to_num(a), x), kind
    assert np.isnan(D.distort(x, "missing", seed=0)).any()
    assert D.HELD_OUT_DEFAULT not in D.training_distortions()
    views = D.distorted_views(x, D.DISTORTIONS, seed=1)
    assert all(np.isfinite(v[0]).all() for v in views.values())
    assert views["missing"][1].mean() > 0.05


def test_fill_missing_handles_any_nan_pattern():
    x = np.array([[np.nan, 1.0, np.nan, 3.0], [np.nan] * 4, [1.0, 2.0, np.inf, np.nan]])
    filled, rate = D.fill_missing(x)
    np.testing.assert_array_equal(filled, [[1, 1, 1, 3], [0, 0, 0, 0], [1, 2, 2, 2]])
    np.testing.assert_allclose(rate, [0.5, 1.0, 0.5])


def test_nan_device_data_never_crashes_with_a_real_backbone(tiny_export):
    from edge_client.runtime.backbone import BackboneRunner

    runner = BackboneRunner(tiny_export["backbone"])
    rng = np.random.default_rng(0)
    t = np.arange(2000)
    series = np.sin(2 * np.pi * t / 24) + 0.1 * rng.normal(size=len(t))
    series[rng.random(len(t)) < 0.03] = np.nan  # scattered lost readings
    series[500:700] = np.nan  # and a long outage
    ctx, y = [], []
    for s in range(0, len(t) - 120, 8):
        if np.isfinite(series[s + 96 : s + 120]).all():
            ctx.append(series[s : s + 96])
            y.append(series[s + 96 : s + 120])
    filled, miss = D.fill_missing(np.array(ctx))
    x = runner.features(filled)
    head = dict(np.load(tiny_export["dir"] / "head.npz"))
    cfg = P.PersonalConfig(epochs=3, consistency=0.1)
    views = tuple(runner.features(v[0]) for v in D.distorted_views(filled, D.training_distortions(), seed=0).values())
    model = P.PersonalModel.from_head(head, cfg).fit(x, np.array(y, np.float32), distorted=views)
    point, _ = model.predict(x)
    assert np.isfinite(point).all() and miss.max() > 0
    assert model.log.losses[-1] < model.log.losses[0]


def test_rules_fit_check_and_correct_on_a_hand_made_series():
    t = np.arange(24 * 10)
    history = 10 + 5 * np.sin(2 * np.pi * t / 24)  # 5..15, daily cycle, non-negative
    guard = RuleGuard.fit(history, season=24)
    assert {r.name for r in guard.rules} == {"sign", "range", "rate", "envelope"}
    ok = history[None, :24]
    assert sum(guard.check(ok, last=history[-1:], phase=[0]).values()) == 0
    bad = ok.copy()
    bad[0, 5] = 100.0  # out of range and a jump
    bad[0, 10] = -3.0  # negative
    hits = guard.check(bad, last=history[-1:], phase=[0])
    assert hits["range"] == 2 and hits["sign"] == 1 and hits["rate"] >= 2 and hits["envelope"] >= 2
    fixed = guard.correct(bad, last=history[-1:], phase=[0])
    assert sum(guard.check(fixed, last=history[-1:], phase=[0]).values()) == 0
    assert abs(fixed[0, 5] - ok[0, 5]) < 1.5
    report = guard.report()
    assert report["rule_hits_range"] == 2 and report["rule_corrected_windows"] == 1
    assert RuleGuard.fit(np.array([np.nan, np.nan])).rules == []  # nothing learnable, nothing enforced


def test_task_vector_weights_favour_similar_devices():
    rng = np.random.default_rng(0)
    base_a, base_b = rng.normal(size=50), rng.normal(size=50)
    taus = {f"a{i}": {"w": base_a + 0.1 * rng.normal(size=50)} for i in range(3)}
    taus |= {f"b{i}": {"w": base_b + 0.1 * rng.normal(size=50)} for i in range(3)}
    taus["x"] = {"w": -base_a}  # conflicts with group a
    pre = {"w": np.zeros(50)}
    aggs, w = personalized_aggregates(pre, taus, temperature=0.1, top_m=3)
    ids = list(taus)
    row = w[ids.index("a0")]
    assert row.sum() == pytest.approx(1.0)
    assert row[[ids.index("a0"), ids.index("a1"), ids.index("a2")]].sum() > 0.99  # self + its own group
    assert row[ids.index("x")] == 0.0
    assert np.corrcoef(aggs["a0"]["w"], base_a)[0, 1] > 0.95
    sim = cosine_matrix(np.stack([np.ones(4), np.ones(4) + 0.01, -np.ones(4)]), remove_mean=True)
    assert sim[0, 1] > 0.5 and sim[0, 2] < 0
    assert np.allclose(personalized_weights(np.eye(3), top_m=1), np.eye(3))
    updates = [ClientUpdate(i, 1, taus[i]) for i in ids]
    new = TaskVectorAggregation(top_m=3).aggregate_for(pre, taus["b0"], updates)
    assert np.corrcoef(new["w"], base_b)[0, 1] > 0.95


def test_a_personal_predictor_that_validates_worse_is_never_served(tiny_export):
    """The safe fallback: a personal model that cannot beat the global head on the device's newest training
    windows (here: a learning rate that wrecks it) is not served; the global head is, with the same scores."""
    from edge_client.learning.head import slice_head
    from edge_client.learning.learner import DeviceLearner, SplitConfig
    from edge_client.runtime.backbone import BackboneRunner

    t = np.arange(900)
    series = 10 + 3 * np.sin(2 * np.pi * t / 24) + np.random.default_rng(0).normal(0, 0.3, t.size)
    learner = DeviceLearner(BackboneRunner(tiny_export["backbone"]), series, season=24, split=SplitConfig())
    head = learner.run_round(slice_head(tiny_export["model"].head_state(), 24), epochs=20, lr=3e-3,
                             batch_size=32).personal  # a global head that already fits this device well
    for gate in (False, True):
        out = learner.run_round(head, epochs=1, lr=1e-3, batch_size=32,
                                personal=P.PersonalConfig(rank=2, lr=50.0, epochs=3, gate=gate, rules=True))
        served = learner.served
        assert served.fallback and out.metrics["personal_fallback"] == 1.0
        assert out.metrics["val_personal_mse"] >= out.metrics["val_global_mse"]
        assert out.metrics["personal_mse"] == out.metrics["global_mse"]
        assert all(np.array_equal(out.personal[k], np.asarray(head[k], np.float32)) for k in head)
    out = learner.run_round(head, epochs=1, lr=1e-3, batch_size=32, personal=P.PersonalConfig(rank=2, lr=3e-3,
                                                                                              epochs=3))
    assert out.metrics["personal_fallback"] == 0.0 or out.metrics["val_personal_mse"] >= out.metrics["val_global_mse"]


def test_track_record_weights_rounds_and_leaves_the_global_head_only_by_a_margin():
    from edge_client.learning.serving import TrackRecord

    tr = TrackRecord(beta=0.5, margin=0.02)
    tr.update({"prior": 0.5})
    assert tr.choose() is None  # no record of the global head yet: the in-chunk validation decides
    tr.update({"global": 1.0, "personal": 0.1})
    assert tr.choose() == "global"  # personal has one scored round only
    tr.update({"global": 1.0, "prior": 0.99, "personal": float("nan")})
    assert tr.scores == {"prior": pytest.approx(0.745), "global": 1.0, "personal": 0.1}
    assert tr.choose(frozenset({"personal"})) == "prior" and tr.counts == {"prior": 2, "global": 2, "personal": 1}
    tr.update({"global": 1.0, "prior": 1.5, "personal": 1.87})
    assert tr.scores["prior"] == pytest.approx(1.1225) and tr.choose() == "global"  # personal 0.985: within 2 %
    tr.update({"global": 1.0, "personal": 0.5})
    assert tr.scores["personal"] == pytest.approx(0.7425) and tr.choose() == "personal"
    with pytest.raises(ValueError):
        P.PersonalConfig(track_record=1.0)


def test_track_record_serves_the_prior_head_when_it_forecast_the_new_data_best(tiny_export):
    """Before training, a device scores last round's personal predictor, the new global head and the prior
    (its first global head) on its newest windows; a wrecked global head and personal model lose to the prior,
    which the device then serves (and reports as ``served_prior``)."""
    from edge_client.learning.head import slice_head
    from edge_client.learning.learner import DeviceLearner, SplitConfig
    from edge_client.runtime.backbone import BackboneRunner

    t = np.arange(900)
    series = 10 + 3 * np.sin(2 * np.pi * t / 24) + np.random.default_rng(0).normal(0, 0.3, t.size)
    learner = DeviceLearner(BackboneRunner(tiny_export["backbone"]), series, season=24, split=SplitConfig())
    head = learner.run_round(slice_head(tiny_export["model"].head_state(), 24), epochs=20, lr=3e-3,
                             batch_size=32).personal
    cfg = P.PersonalConfig(rank=2, lr=50.0, epochs=3, track_record=0.5)  # the personal model is wrecked
    first = learner.run_round(head, epochs=1, lr=1e-3, batch_size=32, personal=cfg)
    assert first.metrics["served_prior"] == 0.0 and set(learner.track.scores) == {"global"}
    bad = {k: v + np.random.default_rng(1).normal(0, 1.0, v.shape).astype(np.float32) for k, v in head.items()}
    out = learner.run_round(bad, epochs=1, lr=1e-3, batch_size=32, personal=cfg)
    assert not learner.served.serve_prior  # one scored round is not yet a record
    out = learner.run_round(bad, epochs=1, lr=1e-3, batch_size=32, personal=cfg)
    assert learner.served.serve_prior and out.metrics["served_prior"] == 1.0
    assert min(learner.track.scores, key=learner.track.scores.get) == "prior"
    assert out.metrics["personal_mse"] == pytest.approx(learner.evaluate(head, "x")["x_mse"])
    assert all(np.array_equal(out.personal[k], np.asarray(head[k], np.float32)) for k in head)
