"""Update compression (int8 per-tensor scale, top-k with error feedback) and forecasting prototypes."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.fleet.strategies.prototype import place, prototype_weights
from edge_client.learning.compress import compress, decompress, nbytes
from edge_client.learning.head import head_shapes
from edge_client.learning.prototype import PROTOTYPE_DIM, feature_prototype


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in head_shapes(64, 24, 3).items()}


def test_int8_is_a_quarter_of_float32_and_rounds_to_half_a_step():
    d = _delta()
    packed, residual = compress(d, "int8")
    assert nbytes(packed) == sum(v.size for v in d.values()) + 4 * len(d)
    out = decompress(packed)
    for k, v in d.items():
        step = np.abs(v).max() / 127
        assert np.abs(out[k] - v).max() <= step / 2 + 1e-9
        np.testing.assert_allclose(out[k] + residual[k], v, atol=1e-7)


def test_topk_fits_4kb_at_horizon_24_and_error_feedback_sends_everything_eventually():
    d = _delta()
    packed, _ = compress(d, "topk", k=0.2)
    assert nbytes(packed) <= 4096  # 6,240 head numbers: 1,248 int8 values + uint16 positions + 4 scales
    sent = decompress(packed)
    assert sum(int(np.count_nonzero(v)) for v in sent.values()) <= 0.2 * 6240 + 4
    # with the same delta every round, the running total of what arrived approaches rounds x delta
    total = {k: np.zeros_like(v) for k, v in d.items()}
    res = None
    for _ in range(20):
        packed, res = compress(d, "topk", k=0.2, residual=res)
        for k, v in decompress(packed).items():
            total[k] += v
    for k, v in d.items():
        np.testing.assert_allclose(total[k] + res[k], 20 * v, atol=1e-5)
        assert np.abs(res[k]).max() < 3 * np.abs(v).max()  # the residual stays bounded


def test_compress_refuses_unknown_methods_and_fractions():
    with pytest.raises(ValueError, match="unknown compression"):
        compress(_delta(), "zip")
    with pytest.raises(ValueError, match="fraction"):
        compress(_delta(), "topk", k=0.0)


def test_prototypes_are_short_deterministic_and_place_a_device_near_its_kind():
    rng = np.random.default_rng(1)
    kinds = [rng.normal(size=64) * 3 for _ in range(2)]
    feats = [kinds[i % 2] + rng.normal(size=(50, 64)) for i in range(6)]
    protos = np.stack([feature_prototype(f) for f in feats]).astype(np.float64)
    assert protos.shape == (6, PROTOTYPE_DIM)
    np.testing.assert_array_equal(feature_prototype(feats[0]), feature_prototype(feats[0]))
    w = prototype_weights(protos, 0.1, top_m=3)
    assert np.allclose(w.sum(axis=1), 1.0)
    for i in range(6):  # weight goes to devices of the same kind
        assert w[i, [j for j in range(6) if j % 2 == i % 2]].sum() > 0.99
    heads = [{"point_bias": np.full(3, float(i % 2))} for i in range(6)]
    newcomer = feature_prototype(kinds[1] + rng.normal(size=(50, 64)))
    assert np.allclose(place(newcomer, protos, heads, 0.1, top_m=3)["point_bias"], 1.0, atol=0.01)
    with pytest.raises(ValueError):
        feature_prototype(np.zeros((0, 64)))


def test_a_hello_may_carry_a_prototype_vector_and_nothing_else():
    from edge_client import wire as P

    hello = P.Hello(fleet="f", device_id="d", runtime="ort", n_train=1, n_eval=1)
    assert b"prototype" not in P.encode(hello)  # absent unless the device opts in: old bytes unchanged
    with_proto = hello.model_copy(update={"prototype": np.ones(PROTOTYPE_DIM, np.float32)})
    assert P.decode(P.encode(with_proto)).prototype.shape == (PROTOTYPE_DIM,)
    import msgpack

    raw = msgpack.unpackb(P.encode(with_proto), raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d))
    raw["prototype"] = msgpack.ExtType(42, msgpack.packb(["float32", [2, 2], np.ones(4, "<f4").tobytes()]))
    with pytest.raises(P.WrongShape):
        P.decode(msgpack.packb(raw, use_bin_type=True))


def test_packed_updates_decode_to_their_values_and_hostile_ones_get_typed_refusals():
    import msgpack

    from edge_client import wire as P
    from edge_client.learning.compress import compress

    d = _delta()
    for method in ("int8", "topk"):
        parts, _ = compress(d, method)
        packed = {k: P.PackedArray(values=c.values, scale=c.scale, shape=list(c.shape), index=c.index)
                  for k, c in parts.items()}
        u = P.Update(fleet="f", device_id="d", round_id=1, base_version=0, n_samples=5, packed=packed)
        raw = P.encode(u)
        assert len(raw) < (6240 + 1024 if method == "int8" else 4096 + 1024)
        back = P.decode(raw)
        for k, v in decompress(parts).items():
            np.testing.assert_array_equal(back.delta[k], v)
    plain = P.encode(P.Update(fleet="f", device_id="d", round_id=1, base_version=0, n_samples=5,
                              delta={"a": np.zeros(3, np.float16)}))
    assert b"packed" not in plain  # an uncompressed update encodes exactly as before

    def tamper(**change) -> bytes:
        m = msgpack.unpackb(raw, raw=False, ext_hook=lambda c, b: msgpack.ExtType(c, b))
        name = next(iter(m["packed"]))
        m["packed"][name].update(change)
        return msgpack.packb(m, use_bin_type=True)

    def arr(a: np.ndarray) -> msgpack.ExtType:
        return msgpack.ExtType(42, msgpack.packb([a.dtype.name, list(a.shape), a.tobytes()]))

    for bad, error in ((dict(scale=-1.0), P.InvalidMessage), (dict(scale=float("nan")), P.ProtocolError),
                       (dict(index=arr(np.array([5, 3], np.uint16))), P.WrongShape),
                       (dict(index=arr(np.array([10**6], np.uint32))), P.WrongShape),
                       (dict(values=arr(np.ones(3, np.float32))), P.WrongDtype),
                       (dict(shape=[10**7]), P.ProtocolError)):
        with pytest.raises(error):
            P.decode(tamper(**bad))
    m = msgpack.unpackb(raw, raw=False, ext_hook=lambda c, b: msgpack.ExtType(c, b))
    m["delta"] = {"a": arr(np.zeros(3, np.float16))}
    with pytest.raises(P.WrongShape):  # both delta and packed
        P.decode(msgpack.packb(m, use_bin_type=True))
    m = msgpack.unpackb(plain, raw=False, ext_hook=lambda c, b: msgpack.ExtType(c, b))
    m["delta"] = {"a": arr(np.zeros(3, np.int8))}
    with pytest.raises(P.WrongDtype):  # int8 is only for packed values
        P.decode(msgpack.packb(m, use_bin_type=True))


def test_a_forecasting_prototype_is_clipped_and_noised_when_the_task_asks():
    """Task options proto_clip / proto_noise make the device send its prototype through the Gaussian mechanism
    (edge_client.learning.dp.privatize_prototype), the same as a recommender device's."""
    import time
    from types import SimpleNamespace

    from edge_client.daemon.client import _prototype
    from edge_client.wire import InvalidMessage, RoundTask

    feats = np.random.default_rng(0).normal(3.0, 1.0, (80, 64))
    learner = SimpleNamespace(f_train=SimpleNamespace(feats=feats))

    def task(**options):  # type: ignore[no-untyped-def]
        return RoundTask(fleet="f", device_id="d", round_id=1, task="tsfm", kind="train", model_version=0,
                         deadline_ts=time.time() + 60, options=options)

    exact = _prototype(learner, task(prototype=True))
    np.testing.assert_array_equal(exact, feature_prototype(feats))
    assert _prototype(learner, task()) is None
    clip = float(np.linalg.norm(exact)) / 4
    clipped = _prototype(learner, task(prototype=True, proto_clip=clip))
    np.testing.assert_allclose(clipped, exact / 4, rtol=1e-5)
    noisy = _prototype(learner, task(prototype=True, proto_clip=clip, proto_noise=1.0))
    assert noisy.dtype == np.float32 and noisy.shape == (PROTOTYPE_DIM,) and not np.allclose(noisy, clipped)
    with pytest.raises(InvalidMessage):
        _prototype(learner, task(prototype=True, proto_clip=-1.0))
