"""Hard bounds of the wire: what a payload, an array and a collection may be at most.

They are checked before and during decoding (:mod:`edge_client.wire.codec`), so a hostile payload cannot make a
receiver allocate much more than the payload itself.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1
ARRAY_EXT_CODE = 42  # the msgpack extension type that carries one numpy array
# Parameters and prototypes are the only arrays on the wire, and float16/float32 are all they need. A wider dtype
# is refused rather than cast: a finite float64 (1e300) becomes inf when cast to float32.
ALLOWED_DTYPES = frozenset({"float16", "float32"})
# Compressed deltas (Update.packed) carry int8 values and unsigned positions; only that field accepts them.
PACKED_DTYPES = frozenset({"int8", "uint16", "uint32"})
WIRE_DTYPES = ALLOWED_DTYPES | PACKED_DTYPES
MAX_WIRE_INT = (1 << 53) - 1  # ids, versions and counters: exact in a double, far inside SQLite's int64
MAX_SAMPLES = (1 << 31) - 1  # what one device may claim to have trained on (fleets cap it much lower)
MAX_PROTOTYPE_DIM = 4096


@dataclass(frozen=True)
class Limits:
    """Hard bounds checked before and during decoding."""

    max_payload_bytes: int = 512 * 1024
    max_array_elements: int = 1 << 20
    max_arrays: int = 64
    max_str_len: int = 4096
    max_collection_len: int = 4096


DEFAULT_LIMITS = Limits()
