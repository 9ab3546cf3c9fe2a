"""Encode the message types and forms added by issue #11 (a Receipt; a signed Update) with fixed fields and a fixed
key, so the bytes are reproducible. Run once from the repository root; never regenerate with newer code."""

import base64
import json
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_client import wire as P

OUT = Path(__file__).parent
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
H = dict(fleet="plant-7", ts=1700000000.25)
MESSAGES = {
    "receipt": P.sign(P.Receipt(msg_id="0000000000000011", device_id="meter-17", round_id=4,
                                ref_msg_id="0000000000000005", **H), KEY),
    "update": P.sign(P.Update(msg_id="0000000000000012", device_id="meter-17", round_id=4, base_version=3,
                              n_samples=512, delta={"w": np.arange(6, dtype=np.float16).reshape(2, 3) / 8},
                              metrics={"global_mse": 0.5}, round_opened=1699999990.0, **H), KEY),
}


def plain(value):
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.name, "shape": list(value.shape), "values": value.ravel().tolist()}
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    for name, msg in MESSAGES.items():
        (OUT / f"{name}.msgpack").write_bytes(P.encode(msg))
    (OUT / "expected.json").write_text(json.dumps({n: plain(m.model_dump(mode="python")) for n, m in MESSAGES.items()},
                                                  indent=1) + "\n")
    (OUT / "public_key.hex").write_text(KEY.public_key().public_bytes_raw().hex() + "\n")
