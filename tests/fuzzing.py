"""Hostile inputs for the wire: one valid message of every type, and mutations of them (bytes flipped, cut, spliced;
a field replaced by a value of another type, a huge integer, a nested bomb, an array where a number belongs). Shared
by the property-based tests (tests/test_fuzz.py) and benchmarks/fuzz.py."""

from __future__ import annotations

import random

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_client import wire as P
from edge_client.wire import codec

FLEET = "fuzz"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def samples() -> dict[str, P.Message]:
    """One valid message of every type (signed where the protocol signs it)."""
    arr = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float16)}
    msgs: list[P.Message] = [
        P.Hello(fleet=FLEET, device_id="dev-1", runtime="ort", n_train=100, n_eval=10),
        P.Status(fleet=FLEET, device_id="dev-1", state="online"),
        P.Forget(fleet=FLEET, device_id="dev-1"),
        P.RoundTask(fleet=FLEET, device_id="dev-1", round_id=1, model_version=0, deadline_ts=2e9,
                    options={"upload_dtype": "float16"}, params=arr),
        P.Update(fleet=FLEET, device_id="dev-1", round_id=1, base_version=0, n_samples=100, delta=arr,
                 metrics={"global_mse": 0.5}),
        P.GlobalModel(fleet=FLEET, version=0, params=arr),
        P.BundleManifest(fleet=FLEET, version=1, manifest=b'{"format": "x"}'),
        P.BundleChunk(fleet=FLEET, version=1, file="backbone.onnx", index=0, total=1, sha256="a" * 64, data=b"xyz"),
        P.Reject(fleet=FLEET, device_id="dev-1", ref_msg_id="m" * 16, reason="stale_round"),
        P.Receipt(fleet=FLEET, device_id="dev-1", round_id=1, ref_msg_id="m" * 16),
        P.SecAggKeys(fleet=FLEET, device_id="dev-1", round_id=1, c_pk=bytes(32), s_pk=bytes(range(32))),
        P.SecAggRoster(fleet=FLEET, device_id="dev-1", round_id=1, size=12, value_range=0.5, bits=28, threshold=2,
                       neighbours={"dev-2": (bytes(32), bytes(32), b""), "dev-3": (bytes(32), bytes(32), b"")}),
        P.SecAggShares(fleet=FLEET, device_id="dev-1", round_id=1, shares={"dev-2": bytes(40), "dev-3": bytes(41)}),
        P.SecAggInbox(fleet=FLEET, device_id="dev-1", round_id=1, shares={"dev-2": bytes(40)}),
        P.SecAggMasked(fleet=FLEET, device_id="dev-1", round_id=1, masked=bytes(48)),
        P.SecAggUnmask(fleet=FLEET, device_id="dev-1", round_id=1, survivors=["dev-1", "dev-2"], dropped=["dev-3"]),
        P.SecAggReveal(fleet=FLEET, device_id="dev-1", round_id=1, shares={"dev-2": ("b", 1, bytes(66))}),
    ]
    out = {m.type: P.sign(m, KEY) for m in msgs}
    assert set(out) == set(P.MESSAGE_TYPES)
    return out


def _odd_value(rng: random.Random) -> object:
    choice = rng.randrange(12)
    if choice == 0:
        return np.zeros(rng.randrange(1, 4), rng.choice([np.float16, np.float32]))
    if choice == 1:
        return rng.choice([1 << 63, (1 << 64) - 1, -(1 << 63), 1 << 53, -1])
    if choice == 2:
        return rng.choice([float("nan"), float("inf"), -0.0, 1e308, 5e-324])
    if choice == 3:
        return {"a": [1, 2, {"b": None}]}
    if choice == 4:
        return [[[]]] * rng.randrange(1, 5)
    if choice == 5:
        return b"\x00" * rng.randrange(0, 64)
    if choice == 6:
        return "x" * rng.randrange(0, 5000)
    if choice == 7:
        return msgpack.ExtType(rng.choice([P.ARRAY_EXT_CODE, 7, 127]), bytes(rng.randrange(256) for _ in range(9)))
    if choice == 8:
        return msgpack.ExtType(P.ARRAY_EXT_CODE, msgpack.packb([rng.choice(["float64", "int64", "float32", "<f4"]),
                                                                [rng.randrange(-2, 1 << 21)], b"\x00" * 8]))
    if choice == 9:
        return None
    if choice == 10:
        return rng.choice([True, False])
    return rng.random()


def mutate(payload: bytes, rng: random.Random) -> bytes:
    """One random mutation of an encoded message (bytes that no longer unpack are cut instead)."""
    try:
        return _mutate(payload, rng)
    except (ValueError, TypeError, OverflowError, IndexError, msgpack.ExtraData):  # IndexError: an emptied map
        return payload[: rng.randrange(len(payload) + 1)]


def _mutate(payload: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    data = bytearray(payload)
    if kind == 0 and data:  # flip bytes
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 1:  # cut
        return bytes(data[: rng.randrange(len(data) + 1)])
    if kind == 2:  # splice two halves / insert garbage
        at = rng.randrange(len(data) + 1)
        return bytes(data[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32))) + data[at:])
    raw = msgpack.unpackb(payload, raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d))
    keys = list(raw)
    if kind == 3:  # replace a field's value with another type
        raw[rng.choice(keys)] = _odd_value(rng)
    elif kind == 4:  # add or drop fields
        if rng.random() < 0.5:
            raw.pop(rng.choice(keys))
        else:
            raw[rng.choice(["surprise", "sig", "delta", "v", "type"])] = _odd_value(rng)
    elif kind == 5:  # header confusion: another message's type on these fields
        raw["type"] = rng.choice([*P.MESSAGE_TYPES, "manifest", "", "x" * 100])
    else:  # the header alone, odd
        raw = {"v": _odd_value(rng), "type": rng.choice([*P.MESSAGE_TYPES, _odd_value(rng)])}
    return msgpack.packb(raw, default=codec.pack_ext, use_bin_type=True)
