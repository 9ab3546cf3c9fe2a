"""The on-device learning state (edge_client.learning.state) survives encode/decode exactly: a learner rebuilt from the
blob answers the next round as the learner that never stopped (same upload, same served predictor, same residual),
and a damaged, foreign or other-version blob is refused with StateRefused, never another exception."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from edge_client.learning import personalize as P
from edge_client.learning import state as LS
from edge_client.learning.compress import compress
from edge_client.learning.head import slice_head
from edge_client.learning.learner import DeviceLearner, SplitConfig
from edge_client.runtime.backbone import BackboneRunner

CFG = P.PersonalConfig(rank=2, epochs=2, gate=True, rules=True, track_record=0.5)


def _series() -> np.ndarray:
    t = np.arange(900)
    return 10 + 3 * np.sin(2 * np.pi * t / 24) + np.random.default_rng(0).normal(0, 0.3, t.size)


def _round(learner: DeviceLearner, head: dict, r: int) -> tuple[dict, dict]:
    """One personalised round with a top-k upload (error feedback), as compute_update does it."""
    out = learner.run_round(head, epochs=1, lr=1e-3, batch_size=32, seed=r, personal=CFG, upload_dtype="float32")
    packed, learner.upload_residual = compress(out.delta, "topk", 0.2, learner.upload_residual)
    return out.metrics, {k: c.values for k, c in packed.items()}


def _spec(runner: BackboneRunner) -> LS.HeadSpec:
    return LS.HeadSpec(runner.sha256, runner.spec.feature_dim, 24, len(runner.spec.quantiles))


@pytest.fixture(scope="module")
def trained(tiny_export):
    """A learner after three personalised rounds (gate, rule guards, track record, top-k)."""
    runner = BackboneRunner(tiny_export["backbone"])
    head = slice_head(tiny_export["model"].head_state(), 24)
    learner = DeviceLearner(runner, _series(), season=24, split=SplitConfig())
    for r in range(3):
        bumped = {k: v + np.float32(0.01 * r) for k, v in head.items()}  # a new global head every round
        _round(learner, bumped, r)
    return runner, head, learner


def test_a_learner_restored_from_the_blob_answers_the_next_round_as_the_one_that_never_stopped(trained):
    runner, head, learner = trained
    assert learner.served.gate is not None and learner.served.guard is not None and learner.track.counts
    assert learner.upload_residual is not None and learner.last_served is learner.served
    blob = LS.encode_learner_state(LS.LearnerState.of(learner), _spec(runner))
    restored = DeviceLearner(runner, _series(), season=24, split=SplitConfig())  # the restarted daemon's learner
    state = LS.decode_learner_state(blob, _spec(runner))
    state.apply(restored)
    assert restored.last_served is restored.served  # stored once, restored as one object
    assert LS.encode_learner_state(LS.LearnerState.of(restored), _spec(runner)) == blob
    # the served predictor forecasts identically (gate, prior, rule guards with their counters)
    checked = learner.served.guard.checked_values
    np.testing.assert_array_equal(restored.served.forecast(restored.w_eval)[0],
                                  learner.served.forecast(learner.w_eval)[0])
    np.testing.assert_array_equal(restored.served.personal_forecast(restored.w_eval)[0],
                                  learner.served.personal_forecast(learner.w_eval)[0])
    a, b = restored.served.guard, learner.served.guard
    assert (a.hits, a.checked_values, a.corrected_windows) == (b.hits, b.checked_values, b.corrected_windows)
    assert b.checked_values > checked and a.describe() == b.describe()
    # and the next round is the same: metrics, top-k upload, new residual, new served predictor
    bumped = {k: v + np.float32(0.05) for k, v in head.items()}
    m_a, up_a = _round(learner, bumped, 7)
    m_b, up_b = _round(restored, bumped, 7)
    assert m_a == m_b
    for k in up_a:
        np.testing.assert_array_equal(up_a[k], up_b[k])
        np.testing.assert_array_equal(learner.upload_residual[k], restored.upload_residual[k])
    assert learner.track.scores == restored.track.scores and learner.track.counts == restored.track.counts
    # without the state the round differs (what a restart did before): the test can fail
    fresh = DeviceLearner(runner, _series(), season=24, split=SplitConfig())
    m_c, up_c = _round(fresh, bumped, 7)
    assert m_c != m_b or any(not np.array_equal(up_c[k], up_b[k]) for k in up_c)


def _rewrite(blob: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    with np.load(io.BytesIO(blob)) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays[LS.HEADER].tobytes())
    edit(header, arrays)
    arrays[LS.HEADER] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_damaged_foreign_or_other_version_state_is_refused_with_a_reason(trained):
    runner, _, learner = trained
    spec = _spec(runner)
    blob = LS.encode_learner_state(LS.LearnerState.of(learner), spec)

    def nan(h, a):  # type: ignore[no-untyped-def]
        a[f"{h['upload_residual']}.point_bias"] = a[f"{h['upload_residual']}.point_bias"] * np.nan

    def shape(h, a):  # type: ignore[no-untyped-def]
        a[f"{h['prior']}.point_bias"] = a[f"{h['prior']}.point_bias"][:12]

    cases = {
        "truncated": (blob[: len(blob) // 2], "not a readable"),
        "bit flips": (blob[:100] + bytes(b ^ 0xFF for b in blob[100:400]) + blob[400:], "not a readable"),
        "empty": (b"", "not a readable"),
        "not npz": (b"\x93NUMPY garbage", "not a readable"),
        "version": (_rewrite(blob, lambda h, a: h.update(version=LS.STATE_VERSION + 1)), "version"),
        "format": (_rewrite(blob, lambda h, a: h.update(format="other")), "not a fedge learning state"),
        "backbone": (_rewrite(blob, lambda h, a: h.update(backbone_sha256="0" * 64)), "another backbone"),
        "horizon": (_rewrite(blob, lambda h, a: h.update(horizon=12)), "for head"),
        "nan": (_rewrite(blob, nan), "not finite"),
        "shape": (_rewrite(blob, shape), "shape"),
        "missing": (_rewrite(blob, lambda h, a: a.pop(f"{h['prior']}.point_weight")), "keys"),
        "header": (_rewrite(blob, lambda h, a: h.update(track={"beta": 0.5})), "malformed"),
        "number": (_rewrite(blob, lambda h, a: h["track"].update(beta="x")), "not a number"),
        "rule": (_rewrite(blob, lambda h, a: h["served"]["guard"]["rules"].append({"kind": "x"})), "rule kind"),
    }
    for name, (bad, why) in cases.items():
        with pytest.raises(LS.StateRefused, match=why):
            LS.decode_learner_state(bad, spec)
            pytest.fail(name)
    assert LS.decode_learner_state(blob, spec).track.counts == learner.track.counts  # the intact blob still reads


def test_repair_limits_and_the_track_records_combination_survive_the_blob(tiny_export):
    """A device that repairs faults and combines its candidates: the detector's limits, the record's error
    cross-products and weights, and a served combination come back exactly; a learner built with the restored
    detector answers the next round as the one that never stopped."""
    import dataclasses

    runner = BackboneRunner(tiny_export["backbone"])
    head = slice_head(tiny_export["model"].head_state(), 24)
    series = _series()
    series[500:540] = series[499]  # a frozen sensor
    cfg = dataclasses.replace(CFG, repair=True, track_combine=True, naive_prior=True, track_margin=0.0)
    learner = DeviceLearner(runner, series, season=24, split=SplitConfig())
    for r in range(4):
        learner.run_round({k: v + np.float32(0.01 * r) for k, v in head.items()}, epochs=1, lr=1e-3,
                          batch_size=32, seed=r, personal=cfg)
    learner.served.combo = dict(learner.track.weights)  # as if the record had chosen the combination
    assert learner.repair is not None and learner.track.gram and learner.track.weights
    blob = LS.encode_learner_state(LS.LearnerState.of(learner), _spec(runner))
    state = LS.decode_learner_state(blob, _spec(runner))
    assert state.repair == learner.repair and state.track.combine
    assert state.track.gram == learner.track.gram and state.track.weights == learner.track.weights
    assert state.served.combo == learner.served.combo
    restored = DeviceLearner(runner, series, season=24, split=SplitConfig(), repair=state.repair)
    state.apply(restored)
    assert LS.encode_learner_state(LS.LearnerState.of(restored), _spec(runner)) == blob
    np.testing.assert_array_equal(restored.y_train, learner.y_train)  # the same repaired windows
    bumped = {k: v + np.float32(0.05) for k, v in head.items()}
    m_a = learner.run_round(bumped, epochs=1, lr=1e-3, batch_size=32, seed=9, personal=cfg).metrics
    m_b = restored.run_round(bumped, epochs=1, lr=1e-3, batch_size=32, seed=9, personal=cfg).metrics
    assert m_a == m_b
