"""Encode the secure-aggregation message types added by issue #16 with fixed fields and a fixed key, so the bytes are
reproducible. Run once from the repository root; never regenerate with newer code."""

import base64
import json
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_client import wire as P

OUT = Path(__file__).parent
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
H = dict(fleet="plant-7", ts=1700000000.25, round_id=4)
C, S, SIG = bytes(range(32)), bytes(range(32, 64)), bytes(64)
MESSAGES = {
    "secagg_keys": P.SecAggKeys(msg_id="0000000000000021", device_id="meter-17", c_pk=C, s_pk=S, key_sig=SIG, **H),
    "secagg_roster": P.SecAggRoster(msg_id="0000000000000022", device_id="meter-17", size=6, value_range=0.5,
                                    bits=28, threshold=2, neighbours={"meter-18": (C, S, SIG), "meter-19": (S, C, b"")},
                                    **H),
    "secagg_shares": P.SecAggShares(msg_id="0000000000000023", device_id="meter-17",
                                    shares={"meter-18": bytes(range(60)), "meter-19": bytes(range(1, 61))}, **H),
    "secagg_inbox": P.SecAggInbox(msg_id="0000000000000024", device_id="meter-17",
                                  shares={"meter-18": bytes(range(2, 62))}, **H),
    "secagg_masked": P.SecAggMasked(msg_id="0000000000000025", device_id="meter-17",
                                    masked=np.arange(6, dtype="<u4").tobytes(), **H),
    "secagg_unmask": P.SecAggUnmask(msg_id="0000000000000026", device_id="meter-17",
                                    survivors=["meter-17", "meter-18"], dropped=["meter-19"], **H),
    "secagg_reveal": P.SecAggReveal(msg_id="0000000000000027", device_id="meter-17",
                                    shares={"meter-18": ("b", 1, bytes(66)), "meter-19": ("s", 2, bytes(range(66)))},
                                    **H),
}
MESSAGES = {name: P.sign(msg, KEY) for name, msg in MESSAGES.items()}


def plain(value):
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.name, "shape": list(value.shape), "values": value.ravel().tolist()}
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


if __name__ == "__main__":
    for name, msg in MESSAGES.items():
        (OUT / f"{name}.msgpack").write_bytes(P.encode(msg))
    (OUT / "expected.json").write_text(json.dumps({n: plain(m.model_dump(mode="python")) for n, m in MESSAGES.items()},
                                                  indent=1) + "\n")
    (OUT / "public_key.hex").write_text(KEY.public_key().public_bytes_raw().hex() + "\n")
