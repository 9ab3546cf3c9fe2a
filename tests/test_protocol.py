"""The wire contract: exact round trips, and one typed refusal for every kind of bad input."""

from __future__ import annotations

import logging

import msgpack
import numpy as np
import pytest

from edge_client import wire as P
from edge_client.wire import codec


def _update(**overrides):
    fields = dict(fleet="f1", device_id="dev-1", round_id=3, base_version=2, n_samples=100,
                  delta={"w": np.arange(12, dtype=np.float16).reshape(3, 4), "b": np.ones(3, np.float32)},
                  metrics={"global_mse": 0.5, "personal_mse": 0.4})
    fields.update(overrides)
    return P.Update(**fields)


def _raw(msg: P.Message) -> dict:
    return msg.model_dump(mode="python")


def _pack(raw: dict) -> bytes:
    return msgpack.packb(raw, default=codec.pack_ext, use_bin_type=True)


def test_update_round_trip_keeps_arrays_bit_exact() -> None:
    msg = _update()
    out = P.decode(P.encode(msg))
    assert isinstance(out, P.Update)
    assert out.msg_id == msg.msg_id and out.round_id == 3 and out.metrics == msg.metrics
    for k, v in msg.delta.items():
        assert out.delta[k].dtype == v.dtype and out.delta[k].shape == v.shape
        assert out.delta[k].tobytes() == v.tobytes()


def test_array_wire_format_is_dtype_shape_little_endian_bytes() -> None:
    arr = np.array([1.0, -2.0], dtype=">f4")  # big-endian in memory: must still travel little-endian
    ext = codec.pack_ext(arr)
    assert ext.code == P.ARRAY_EXT_CODE
    dtype, shape, raw = msgpack.unpackb(ext.data)
    assert (dtype, shape) == ("float32", [2])
    assert raw == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"


@pytest.mark.parametrize("factory", [
    lambda: P.Hello(fleet="f", device_id="d", runtime="onnxruntime 1.20", n_train=10, n_eval=2),
    lambda: P.Status(fleet="f", device_id="d", state="online"),
    lambda: P.Forget(fleet="f", device_id="d"),
    lambda: P.RoundTask(fleet="f", device_id="d", round_id=1, model_version=0, deadline_ts=1e9),
    lambda: P.GlobalModel(fleet="f", version=4, params={"w": np.zeros((2, 2), np.float32)}),
    lambda: P.BundleManifest(fleet="f", version=1, manifest=b"{}", sig=b"s" * 64),
    lambda: P.Reject(fleet="f", device_id="d", ref_msg_id="abc", reason="oversized"),
])
def test_every_message_type_round_trips(factory) -> None:
    msg = factory()
    out = P.decode(P.encode(msg))
    assert type(out) is type(msg)
    assert out.model_dump(exclude={"params"}) == msg.model_dump(exclude={"params"})


@pytest.mark.parametrize(("payload", "error"), [
    (b"\xc1", P.MalformedMessage),  # reserved msgpack byte
    (b"\x92\x01", P.MalformedMessage),  # truncated array
    (b"\x91" * 100_000, P.MalformedMessage),  # nesting bomb
    (msgpack.packb([1, 2, 3]), P.MalformedMessage),  # not a map
    (msgpack.packb({"v": 1, "type": "update"}) + b"\x00", P.MalformedMessage),  # trailing bytes
    (msgpack.packb({"v": 2, "type": "update"}), P.UnsupportedSchema),
    (msgpack.packb({"type": "update"}), P.UnsupportedSchema),
    (msgpack.packb({"v": 1, "type": "launch_missiles"}), P.UnknownMessageType),
    (msgpack.packb({"v": 1, "type": "update", "fleet": "f"}), P.InvalidMessage),  # missing fields
    (b"\x00" * (P.DEFAULT_LIMITS.max_payload_bytes + 1), P.PayloadTooLarge),
])
def test_bad_payloads_raise_one_typed_error(payload: bytes, error: type[P.ProtocolError]) -> None:
    with pytest.raises(error):
        P.decode(payload)


def test_non_finite_arrays_and_metrics_are_refused() -> None:
    raw = _raw(_update())
    raw["delta"] = {"w": np.array([1.0, np.nan], np.float32)}
    with pytest.raises(P.NonFiniteValues):
        P.decode(_pack(raw))
    raw = _raw(_update())
    raw["delta"] = {"w": np.array([np.inf], np.float16)}
    with pytest.raises(P.NonFiniteValues):
        P.decode(_pack(raw))
    raw = _raw(_update())
    raw["metrics"] = {"mse": float("inf")}
    with pytest.raises(P.NonFiniteValues):
        P.decode(_pack(raw))


def test_forbidden_dtype_and_inconsistent_array_bytes_are_refused() -> None:
    raw = _raw(_update())
    raw["delta"] = {"w": msgpack.ExtType(P.ARRAY_EXT_CODE, msgpack.packb(["complex128", [1], b"\x00" * 16]))}
    with pytest.raises(P.WrongDtype):
        P.decode(_pack(raw))
    raw["delta"] = {"w": msgpack.ExtType(P.ARRAY_EXT_CODE, msgpack.packb(["float32", [4], b"\x00" * 12]))}
    with pytest.raises(P.MalformedMessage):
        P.decode(_pack(raw))
    raw["delta"] = {"w": msgpack.ExtType(7, b"xx")}
    with pytest.raises(P.MalformedMessage):
        P.decode(_pack(raw))
    raw["delta"] = {"w": msgpack.ExtType(P.ARRAY_EXT_CODE, msgpack.packb(["float32", [1 << 30], b""]))}
    with pytest.raises((P.PayloadTooLarge, P.MalformedMessage)):
        P.decode(_pack(raw))


def test_unknown_fields_and_bad_ids_are_refused() -> None:
    raw = _raw(_update())
    raw["surprise"] = 1
    with pytest.raises(P.InvalidMessage):
        P.decode(_pack(raw))
    raw = _raw(_update())
    raw["device_id"] = "dev/+/#"
    with pytest.raises(P.InvalidMessage):
        P.decode(_pack(raw))


def test_encode_refuses_to_build_an_oversized_payload() -> None:
    small = P.Limits(max_payload_bytes=1000)
    with pytest.raises(P.PayloadTooLarge):
        P.encode(_update(delta={"w": np.zeros(1000, np.float32)}), small)


def test_check_arrays_names_the_wrong_shape_and_dtype() -> None:
    expected = {"w": (3, 4), "b": (3,)}
    P.check_arrays(_update().delta, expected)
    with pytest.raises(P.WrongShape, match=r"delta.w: expected shape \(3, 4\), got \(4, 3\)"):
        P.check_arrays({"w": np.zeros((4, 3)), "b": np.zeros(3)}, expected, what="delta")
    with pytest.raises(P.WrongShape, match="missing"):
        P.check_arrays({"w": np.zeros((3, 4))}, expected)
    with pytest.raises(P.WrongDtype):
        P.check_arrays({"w": np.zeros((3, 4), np.int32), "b": np.zeros(3)}, expected)


def test_receiver_counts_logs_and_refuses_replays_and_impersonation(caplog) -> None:
    topics = P.Topics("f1")
    rx = P.Receiver("test", is_known_device=lambda d: d != "stranger")
    msg = _update()
    payload = P.encode(msg)
    topic = topics.update(3, "dev-1")
    assert rx.accept(topic, payload, topics).msg_id == msg.msg_id
    assert rx.accept(topic, payload, topics).msg_id == msg.msg_id  # updates are idempotent: the store dedupes
    forget = P.encode(P.Forget(fleet="f1", device_id="dev-1"))
    rx.accept(topics.forget("dev-1"), forget, topics)
    with caplog.at_level(logging.WARNING, logger="fedge.protocol"), pytest.raises(P.ReplayedMessage):
        rx.accept(topics.forget("dev-1"), forget, topics)  # a forget acts once
    assert "replay" in caplog.text
    with pytest.raises(P.IdentityMismatch):
        rx.accept(topics.update(3, "dev-2"), P.encode(_update()), topics)  # dev-1 posing on dev-2's topic
    with pytest.raises(P.UnknownDevice):
        rx.accept(topics.update(3, "stranger"), P.encode(_update(device_id="stranger")), topics)
    with pytest.raises(P.MalformedMessage):
        rx.accept(topic, b"garbage", topics)
    assert rx.rejected == {"replay": 1, "identity_mismatch": 1, "unknown_device": 1, "malformed": 1}
    assert rx.accepted == {"update": 2, "forget": 1}


def test_replay_memory_survives_a_restart_and_tasks_and_models_never_go_back(tmp_path) -> None:
    from edge_client.wire.memory import SqliteReplay

    topics = P.Topics("f1")
    forget = P.encode(P.Forget(fleet="f1", device_id="dev-1"))
    P.Receiver("before", memory=SqliteReplay(tmp_path / "m.sqlite")).accept(topics.forget("dev-1"), forget, topics)
    rx = P.Receiver("after a restart", memory=SqliteReplay(tmp_path / "m.sqlite"))
    with pytest.raises(P.ReplayedMessage):
        rx.accept(topics.forget("dev-1"), forget, topics)

    def task(opened: float) -> bytes:
        return P.encode(P.RoundTask(fleet="f1", device_id="dev-1", round_id=2, model_version=1, deadline_ts=1e10,
                                    round_opened=opened))

    def model(version: int) -> bytes:
        return P.encode(P.GlobalModel(fleet="f1", version=version, params={"w": np.zeros(2, np.float32)}))

    rx.accept(topics.task("dev-1"), task(100.0), topics)
    rx.accept(topics.task("dev-1"), task(100.0), topics)  # the same round asked again (a resumed coordinator)
    rx.advance(rx.accept(topics.global_model("tsfm"), model(5), topics))
    rx.accept(topics.global_model("tsfm"), model(5), topics)  # the retained copy again
    rx = P.Receiver("after another restart", memory=SqliteReplay(tmp_path / "m.sqlite"))
    for topic, payload in ((topics.task("dev-1"), task(50.0)), (topics.global_model("tsfm"), model(4))):
        with pytest.raises(P.ReplayedMessage):
            rx.accept(topic, payload, topics)
    stale = P.Receiver("window", max_age_s=60)
    with pytest.raises(P.ReplayedMessage, match="older than the replay window"):
        stale.accept(topics.forget("dev-1"), P.encode(P.Forget(fleet="f1", device_id="dev-1", ts=1.0)), topics)


def test_signatures_bind_every_field_to_the_signers_key() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = P.sign(_update(), key)
    out = P.decode(P.encode(signed))
    P.verify(out, key.public_key())
    with pytest.raises(P.SignatureMismatch):
        P.verify(out, other.public_key())
    with pytest.raises(P.SignatureMismatch):  # any field changed after signing
        P.verify(out.model_copy(update={"n_samples": out.n_samples + 1}), key.public_key())
    with pytest.raises(P.Unsigned):
        P.verify(_update(), key.public_key())


def test_topics_are_namespaced_and_parse_back() -> None:
    t = P.Topics("plant-7")
    assert t.update(12, "meter.3") == "fedge/v1/plant-7/rounds/12/updates/meter.3"
    assert t.status("meter.3") == "fedge/v1/plant-7/devices/meter.3/status"
    assert t.global_model("tsfm") == "fedge/v1/plant-7/models/tsfm/global"
    assert t.bundle("tsfm") == "fedge/v1/plant-7/models/tsfm/bundle"
    assert t.device_of(t.update(1, "x")) == "x" and t.device_of(t.task("y")) == "y"
    assert t.device_of("fedge/v1/other/devices/x/status") is None
    for bad in ("", "a/b", "+", "#", "x" * 65):
        with pytest.raises(ValueError):
            t.task(bad)


# --------------------------------------------------------------------------- issue #11: total decoding

POISON_19 = msgpack.packb({"v": np.zeros(1, np.float16)}, default=codec.pack_ext, use_bin_type=True)


@pytest.mark.parametrize("version", [np.zeros(3, np.float32), {"a": 1}, [1], True, 1.0, "1", None])
def test_a_schema_version_of_any_other_type_is_a_typed_refusal(version) -> None:
    with pytest.raises(P.UnsupportedSchema):
        P.decode(_pack({"v": version, "type": "update"}))


def test_the_19_byte_message_that_stopped_the_coordinator_is_refused() -> None:
    assert len(POISON_19) <= 23
    with pytest.raises(P.UnsupportedSchema):
        P.decode(POISON_19)


@pytest.mark.parametrize("kind", [np.zeros(2, np.float32), 7, {"x": 1}, b"update"])
def test_a_message_type_of_any_other_type_is_a_typed_refusal(kind) -> None:
    with pytest.raises(P.UnknownMessageType):
        P.decode(_pack({"v": 1, "type": kind}))


@pytest.mark.parametrize("dtype", ["float64", "int32", "int64", "uint8"])
def test_only_float16_and_float32_arrays_travel(dtype: str) -> None:
    raw = _raw(_update())
    data = b"\x00" * np.dtype(dtype).itemsize
    raw["delta"] = {"w": msgpack.ExtType(P.ARRAY_EXT_CODE, msgpack.packb([dtype, [1], data]))}
    with pytest.raises(P.WrongDtype):
        P.decode(_pack(raw))
    with pytest.raises(ValueError, match="not allowed"):  # and nobody can build one to send
        _update(delta={"w": np.full(3, 1e300)})


@pytest.mark.parametrize(("field", "value"), [("n_samples", 1 << 63), ("n_samples", (1 << 64) - 1),
                                              ("n_samples", 1 << 40), ("round_id", 1 << 62),
                                              ("base_version", (1 << 64) - 1), ("n_samples", -1)])
def test_integers_are_bounded_by_the_schema(field: str, value: int) -> None:
    raw = _raw(_update())
    raw[field] = value
    with pytest.raises(P.InvalidMessage):
        P.decode(_pack(raw))


def test_a_global_model_version_near_2_64_is_refused() -> None:
    raw = _raw(P.GlobalModel(fleet="f", version=1, params={"w": np.zeros(2, np.float32)}))
    raw["version"] = (1 << 64) - 1
    with pytest.raises(P.InvalidMessage):
        P.decode(_pack(raw))


def test_guarded_callbacks_count_and_swallow_what_they_raise(caplog) -> None:
    from edge_client.wire.mqtt import guarded

    rx = P.Receiver("test")

    def boom(*_):
        raise RuntimeError("bug")

    with caplog.at_level(logging.ERROR):
        guarded(boom, "test on_message", rx.callback_failed)(None, None, None)
    assert rx.rejected["callback_error"] == 1 and "bug" in caplog.text


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "+", "#", ""])
def test_names_that_could_leave_a_folder_or_a_topic_level_are_refused(name: str) -> None:
    raw = _raw(P.BundleChunk(fleet="f", version=1, file="backbone.onnx", index=0, total=1, sha256="a" * 64,
                             data=b"x"))
    raw["file"] = name
    with pytest.raises(P.InvalidMessage):
        P.decode(_pack(raw))
