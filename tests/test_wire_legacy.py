"""The wire format did not change: messages encoded by an earlier layout's code still decode, field for field,
and encode again to the same bytes (vectors and the script that made them: tests/data/wire_v1/). The one type
retired since (the unsigned model manifest) is refused with its own typed reason."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from edge_client import wire as P

VECTORS = Path(__file__).parent / "data" / "wire_v1"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())
ADDED = Path(__file__).parent / "data" / "wire_v1_issue11"  # types and signed forms added by issue #11
ADDED_EXPECTED = json.loads((ADDED / "expected.json").read_text())
SECAGG = Path(__file__).parent / "data" / "wire_v1_issue16"  # secure aggregation's types (issue #16)
SECAGG_EXPECTED = json.loads((SECAGG / "expected.json").read_text())


def _plain(value):
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.name, "shape": list(value.shape), "values": value.ravel().tolist()}
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def test_every_message_type_has_a_vector() -> None:
    assert set(EXPECTED) == {p.stem for p in VECTORS.glob("*.msgpack")}
    assert set(ADDED_EXPECTED) == {p.stem for p in ADDED.glob("*.msgpack")}
    assert set(SECAGG_EXPECTED) == {p.stem for p in SECAGG.glob("*.msgpack")}
    assert (set(EXPECTED) | set(ADDED_EXPECTED) | set(SECAGG_EXPECTED)
            == set(P.MESSAGE_TYPES) | set(P.RETIRED_TYPES))


@pytest.mark.parametrize(("folder", "name"), [(ADDED, n) for n in sorted(ADDED_EXPECTED)]
                         + [(SECAGG, n) for n in sorted(SECAGG_EXPECTED)])
def test_vectors_added_later_decode_re_encode_and_verify(folder: Path, name: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    payload = (folder / f"{name}.msgpack").read_bytes()
    msg = P.decode(payload)
    expected = json.loads((folder / "expected.json").read_text())[name]
    assert _plain(msg.model_dump(mode="python")) == expected
    assert P.encode(msg) == payload
    P.verify(msg, Ed25519PublicKey.from_public_bytes(bytes.fromhex((folder / "public_key.hex").read_text())))


# Vectors that later rules refuse on purpose, each with the typed reason (issue #11): a float64 array is refused
# rather than cast (a finite 1e300 becomes inf in float32); coordinators always sent float32 global heads.
REFUSED = {"global_model": P.WrongDtype}


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - set(REFUSED) - set(P.RETIRED_TYPES)))
def test_legacy_bytes_decode_field_for_field_and_encode_back_identically(name: str) -> None:
    payload = (VECTORS / f"{name}.msgpack").read_bytes()
    msg = P.decode(payload)
    assert msg.type == name
    assert _plain(msg.model_dump(mode="python")) == EXPECTED[name]
    assert P.encode(msg) == payload


@pytest.mark.parametrize("name", sorted(P.RETIRED_TYPES))
def test_retired_types_are_refused_with_a_typed_reason(name: str) -> None:
    payload = (VECTORS / f"{name}.msgpack").read_bytes()
    with pytest.raises(P.RetiredMessageType, match="signed bundle manifest") as refused:
        P.decode(payload)
    assert refused.value.reason == "retired_type"
    receiver = P.Receiver("device")
    with pytest.raises(P.RetiredMessageType):
        receiver.accept("fedge/v1/plant-7/models/tsfm/manifest", payload, P.Topics("plant-7"))
    assert receiver.rejected == {"retired_type": 1}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_legacy_bytes_that_newer_rules_refuse_get_a_typed_reason(name: str) -> None:
    with pytest.raises(REFUSED[name]):
        P.decode((VECTORS / f"{name}.msgpack").read_bytes())
