"""The wire format did not change: messages encoded by an earlier layout's code still decode, field for field,
and encode again to the same bytes (vectors and the script that made them: tests/data/wire_v1/)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from edge_client import wire as P

VECTORS = Path(__file__).parent / "data" / "wire_v1"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())


def _plain(value):
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.name, "shape": list(value.shape), "values": value.ravel().tolist()}
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def test_every_message_type_has_a_vector() -> None:
    assert set(EXPECTED) == {p.stem for p in VECTORS.glob("*.msgpack")}
    assert set(EXPECTED) == set(P.MESSAGE_TYPES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_legacy_bytes_decode_field_for_field_and_encode_back_identically(name: str) -> None:
    payload = (VECTORS / f"{name}.msgpack").read_bytes()
    msg = P.decode(payload)
    assert msg.type == name
    assert _plain(msg.model_dump(mode="python")) == EXPECTED[name]
    assert P.encode(msg) == payload
