"""SecAgg+ (Bell et al., 2020) as two state machines without I/O: :class:`SecAggDevice` and :class:`SecAggServer`.

A round has four stages; the coordinator only relays, and a device that disappears at any stage is tolerated:

1. **keys** -- each device makes two X25519 key pairs (c: encrypts its shares, s: agrees its pairwise masks) and
   sends the public halves, signed with its identity key where it has one. The server draws the neighbour graph
   (:mod:`.graph`) over the devices that answered and gives each the keys of its neighbours.
2. **shares** -- each device draws a self-mask seed b, splits b and its s private key t-of-k (:mod:`.shamir`) among
   its k neighbours and sends each share encrypted (AES-GCM under an X25519 key only the two devices know) through
   the server, which forwards to every device the shares addressed to it.
3. **masked input** -- y_u = x_u + PRG(b_u) + Σ_{v neighbour that shared} ±PRG(s_uv) mod 2^32, x_u the quantised
   update (:mod:`.masking`). Pairwise masks cancel in the sum of two devices that both send; the self-mask hides x_u
   even when the server later learns s_uv of a neighbour that dropped.
4. **unmasking** -- the server names the devices whose masked input arrived (survivors) and those that shared but
   did not send it (dropped). A device sends, for each neighbour, the share of b (survivor) or of the s key
   (dropped), never both for one neighbour, and refuses when the lists overlap or too few survived. With t shares
   the server removes every survivor's self-mask and every dropped device's pairwise masks: what is left is Σ x_u.

The server here is honest-but-curious in what it may learn: one masked input alone is uniform in Z_2^32 (it
reveals nothing); only the sum of the survivors' inputs is ever unmasked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_client.secagg import shamir
from edge_client.secagg.graph import DEFAULT_FACTOR, degree, neighbours, threshold
from edge_client.secagg.masking import DTYPE, prg

# what a device checks of a neighbour's advertised keys: (device id, the signed bytes, the signature) -> raises if bad
PeerCheck = Callable[[str, bytes, bytes], None]


class SecAggError(ValueError):
    """A protocol step that must not happen: a forged or corrupt share, overlapping survivor/dropped lists, too few
    survivors to keep a device's input hidden, a second different request. The device stops taking part."""


class SecAggAbort(RuntimeError):
    """The server cannot finish the round: too few devices at a stage, or too few shares to unmask. Nothing about
    any device's input is revealed; the round fails cleanly."""


def key_bytes(fleet: str, round_id: int, device_id: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a device signs of its advertised keys (binds them to fleet, round and device)."""
    return b"|".join([b"fedge-secagg-keys", fleet.encode(), str(round_id).encode(), device_id.encode(), c_pk, s_pk])


def _kdf(shared: bytes, purpose: str, round_id: int) -> bytes:
    return HKDF(hashes.SHA256(), 32, None, f"fedge-secagg|{purpose}|{round_id}".encode()).derive(shared)


def _nonce(round_id: int, purpose: int) -> bytes:
    return purpose.to_bytes(4, "little") + round_id.to_bytes(12, "little")


def pair_sign(u: str, v: str) -> int:
    """+1 for the smaller id of a pair, -1 for the larger: the two pairwise masks cancel in the sum."""
    return 1 if u < v else -1


@dataclass(frozen=True)
class RoundSpec:
    """What every device of a round must agree on."""

    fleet: str
    round_id: int
    size: int  # length of the quantised vector
    value_range: float  # updates are clipped to [-r, r] per coordinate before quantisation
    bits: int  # quantisation bits (masking.max_bits of the round's device count at most)


@dataclass
class SecAggDevice:
    """One device's side of a round. Its secrets never leave it except as encrypted shares."""

    device_id: str
    spec: RoundSpec
    identity_key: Ed25519PrivateKey | None = None
    check_peer: PeerCheck | None = None
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _b: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    _peers: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    _held: dict[str, tuple[int, int, int]] = field(default_factory=dict, repr=False)  # owner -> (x, s_y, b_y)
    _t: int = 0
    _revealed: tuple[frozenset[str], frozenset[str]] | None = None

    def advertise(self) -> tuple[bytes, bytes, bytes]:
        """Stage 1: (c public key, s public key, signature over both; b'' without an identity key)."""
        c_pk, s_pk = self._c.public_key().public_bytes_raw(), self._s.public_key().public_bytes_raw()
        sig = (self.identity_key.sign(key_bytes(self.spec.fleet, self.spec.round_id, self.device_id, c_pk, s_pk))
               if self.identity_key is not None else b"")
        return c_pk, s_pk, sig

    def share(self, roster: Mapping[str, tuple[bytes, bytes, bytes]], t: int) -> dict[str, bytes]:
        """Stage 2: given the neighbours' (c_pk, s_pk, sig), the encrypted shares for each neighbour."""
        if self._peers:
            raise SecAggError("keys were already shared this round")
        if self.device_id in roster or not 1 <= t <= len(roster):
            raise SecAggError(f"bad roster: {len(roster)} neighbours, threshold {t}")
        for v, (c_pk, s_pk, sig) in roster.items():
            if self.check_peer is not None:
                self.check_peer(v, key_bytes(self.spec.fleet, self.spec.round_id, v, c_pk, s_pk), sig)
            if len(c_pk) != 32 or len(s_pk) != 32:
                raise SecAggError(f"neighbour {v}'s keys are not X25519 keys")
            self._peers[v] = (c_pk, s_pk)
        self._t = t
        order = sorted(self._peers)
        s_shares = shamir.split(self._s.private_bytes_raw(), len(order), t)
        b_shares = shamir.split(self._b, len(order), t)
        out = {}
        for x, v in enumerate(order, start=1):
            plain = msgpack.packb([self.device_id, v, x, s_shares[x].to_bytes(shamir.SHARE_BYTES, "big"),
                                   b_shares[x].to_bytes(shamir.SHARE_BYTES, "big")])
            key = AESGCM(self._enc_key(v))
            out[v] = key.encrypt(_nonce(self.spec.round_id, 1), plain, self._aad(self.device_id, v))
        return out

    def masked_input(self, x: np.ndarray, received: Mapping[str, bytes]) -> np.ndarray:
        """Stage 3: y = x + PRG(b) + Σ ±PRG(s_uv) over the neighbours whose shares arrived (`received`: sender ->
        ciphertext addressed to this device); every share is decrypted and checked first."""
        if x.dtype != DTYPE or x.shape != (self.spec.size,):
            raise SecAggError(f"the input must be {self.spec.size} uint32")
        for v, ct in received.items():
            if v not in self._peers:
                raise SecAggError(f"a share from {v}, who is not a neighbour")
            try:
                owner, holder, idx, s_y, b_y = msgpack.unpackb(
                    AESGCM(self._enc_key(v)).decrypt(_nonce(self.spec.round_id, 1), ct, self._aad(v, self.device_id)))
            except (InvalidTag, ValueError, TypeError, msgpack.ExtraData) as exc:
                raise SecAggError(f"the share from {v} does not decrypt: {type(exc).__name__}") from None
            if (owner, holder) != (v, self.device_id) or not isinstance(idx, int):
                raise SecAggError(f"the share from {v} names the wrong devices")
            self._held[v] = (idx, int.from_bytes(s_y, "big"), int.from_bytes(b_y, "big"))
        y = x + prg(self._b, self.spec.size, _nonce(self.spec.round_id, 2))
        for v in sorted(self._held):
            mask = prg(self._mask_seed(v), self.spec.size, _nonce(self.spec.round_id, 3))
            y = y + mask if pair_sign(self.device_id, v) > 0 else y - mask
        return y.astype(DTYPE)

    def reveal(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, tuple[str, int, bytes]]:
        """Stage 4: owner -> ("b" | "s", x, share) for each neighbour whose share this device holds: b of a survivor,
        the s key of a dropped device. Refused: overlapping lists, a second different request, fewer than t
        survivors among this device and its neighbours (the sum would expose too few inputs)."""
        alive, gone = frozenset(survivors), frozenset(dropped)
        if alive & gone:
            raise SecAggError(f"devices both survived and dropped: {sorted(alive & gone)[:5]}")
        if self._revealed is not None and self._revealed != (alive, gone):
            raise SecAggError("a second, different unmasking request")
        if self.device_id not in alive:
            raise SecAggError("this device's masked input is not among the survivors")
        if len(alive & (set(self._peers) | {self.device_id})) < self._t:
            raise SecAggError(f"only {len(alive & set(self._peers))} neighbours survived, threshold {self._t}")
        self._revealed = (alive, gone)
        out = {}
        for v, (idx, s_y, b_y) in self._held.items():
            if v in alive:
                out[v] = ("b", idx, b_y.to_bytes(shamir.SHARE_BYTES, "big"))
            elif v in gone:
                out[v] = ("s", idx, s_y.to_bytes(shamir.SHARE_BYTES, "big"))
        return out

    def _aad(self, sender: str, receiver: str) -> bytes:
        return f"{self.spec.fleet}|{self.spec.round_id}|{sender}|{receiver}".encode()

    def _enc_key(self, v: str) -> bytes:
        return _kdf(self._c.exchange(X25519PublicKey.from_public_bytes(self._peers[v][0])), "enc", self.spec.round_id)

    def _mask_seed(self, v: str) -> bytes:
        return _kdf(self._s.exchange(X25519PublicKey.from_public_bytes(self._peers[v][1])), "mask",
                    self.spec.round_id)


@dataclass
class SecAggServer:
    """The coordinator's side: draws the graph, routes shares, sums masked inputs, unmasks the sum. It never holds
    a device's unmasked input; what it stores per device is the masked vector only."""

    spec: RoundSpec
    min_devices: int = 2
    degree_factor: float = DEFAULT_FACTOR
    keys: dict[str, tuple[bytes, bytes, bytes]] = field(default_factory=dict)
    graph: dict[str, list[str]] = field(default_factory=dict)
    t: int = 0
    shared: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sender -> receiver -> ciphertext
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    revealed: dict[str, dict[str, tuple[str, int, bytes]]] = field(default_factory=dict)  # holder -> owner -> share

    def _need(self, n: int, stage: str) -> None:
        if n < max(self.min_devices, self.t):
            raise SecAggAbort(f"{stage}: {n} devices, the round needs {max(self.min_devices, self.t)}")

    def rosters(self, seed: int) -> dict[str, dict[str, tuple[bytes, bytes, bytes]]]:
        """After stage 1: each device's neighbours' keys (the graph is drawn over the devices that advertised)."""
        self._need(len(self.keys), "keys")
        devices = sorted(self.keys)
        k = degree(len(devices), self.degree_factor)
        self.t = threshold(k)
        self.graph = neighbours(devices, k, seed)
        return {u: {v: self.keys[v] for v in self.graph[u]} for u in devices}

    def add_shares(self, sender: str, shares: Mapping[str, bytes]) -> None:
        if sender not in self.graph or set(shares) != set(self.graph[sender]):
            raise SecAggError(f"{sender}'s shares are not addressed to its neighbours")
        self.shared[sender] = dict(shares)

    def forwarded(self) -> dict[str, dict[str, bytes]]:
        """After stage 2: receiver -> {sender: ciphertext}, only from senders whose shares all arrived."""
        self._need(len(self.shared), "shares")
        out: dict[str, dict[str, bytes]] = {u: {} for u in self.shared}
        for sender, per in self.shared.items():
            for receiver, ct in per.items():
                if receiver in out:
                    out[receiver][sender] = ct
        return out

    def add_masked(self, sender: str, y: np.ndarray) -> None:
        if sender not in self.shared or y.dtype != DTYPE or y.shape != (self.spec.size,):
            raise SecAggError(f"a masked input from {sender} that does not belong to the round")
        self.masked[sender] = y

    def unmask_request(self) -> tuple[list[str], list[str]]:
        """After stage 3: (survivors, dropped) -- who sent a masked input, who shared but did not."""
        self._need(len(self.masked), "masked input")
        return sorted(self.masked), sorted(set(self.shared) - set(self.masked))

    def add_reveal(self, holder: str, shares: Mapping[str, tuple[str, int, bytes]]) -> None:
        if holder not in self.masked:
            raise SecAggError(f"unmasking shares from {holder}, who is not a survivor")
        self.revealed[holder] = dict(shares)

    def result(self) -> tuple[np.ndarray, list[str]]:
        """After stage 4: (Σ x_u mod 2^32 over the survivors, the survivors). SecAggAbort if some secret cannot be
        reconstructed from the shares that came back."""
        survivors, dropped = self.unmask_request()
        per_owner: dict[tuple[str, str], dict[int, int]] = {}
        for holder, shares in self.revealed.items():
            for owner, (kind, x, y) in shares.items():
                if holder not in self.graph.get(owner, ()):
                    continue  # only the owner's neighbours hold its shares
                if (kind == "b" and owner in survivors) or (kind == "s" and owner in dropped):
                    per_owner.setdefault((owner, kind), {})[int(x)] = int.from_bytes(y, "big")
        total = np.zeros(self.spec.size, DTYPE)
        for u in survivors:
            total = total + self.masked[u]
        for u in survivors:
            b = self._secret(per_owner, u, "b")
            total = total - prg(b, self.spec.size, _nonce(self.spec.round_id, 2))
        for v in dropped:
            s_v = X25519PrivateKey.from_private_bytes(self._secret(per_owner, v, "s"))
            for u in self.graph[v]:
                if u in self.masked and v in self.shared and u in self.shared[v]:
                    seed = _kdf(s_v.exchange(X25519PublicKey.from_public_bytes(self.keys[u][1])), "mask",
                                self.spec.round_id)
                    mask = prg(seed, self.spec.size, _nonce(self.spec.round_id, 3))
                    # u added pair_sign(u, v)·mask; take it out
                    total = total - mask if pair_sign(u, v) > 0 else total + mask
        return total.astype(DTYPE), survivors

    def _secret(self, per_owner: Mapping[tuple[str, str], dict[int, int]], owner: str, kind: str) -> bytes:
        shares = per_owner.get((owner, kind), {})
        if len(shares) < self.t:
            raise SecAggAbort(f"{len(shares)} shares of {owner}'s {'self-mask' if kind == 'b' else 'mask key'} came "
                              f"back, {self.t} needed")
        return shamir.combine(shares, self.t)
