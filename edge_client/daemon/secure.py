"""A device's side of a secure round over MQTT: runs edge_client.secagg's device state machine on the messages the
coordinator relays, so the update leaves the device only masked.

A round task with option ``secagg`` (and ``secagg_range``: the per-coordinate clipping range of the fixed-point
encoding) makes the client hand its computed update here instead of publishing it: the delta is flattened
(masking.to_vector), clipped to [-r, r] and quantised when the roster says how many bits, and every stage answers the
coordinator's message for it. A step the device must refuse (edge_client.secagg.protocol.SecAggError) is a typed
refusal (``secagg_refused``): logged, counted, and the device drops out of the round -- its input stays hidden.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_client.identity import IdentityError, verified_public_key
from edge_client.secagg.masking import quantise, to_vector
from edge_client.secagg.protocol import PeerCheck, RoundSpec, SecAggDevice, SecAggError
from edge_client.wire import (
    Message,
    RoundTask,
    SecAggInbox,
    SecAggKeys,
    SecAggMasked,
    SecAggRefused,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
    Update,
)

log = logging.getLogger("fedge.edge.secagg")


@dataclass
class _Round:
    task: RoundTask
    vector: np.ndarray
    device: SecAggDevice | None = None
    quantised: np.ndarray | None = None  # once the roster says the range and bits


class SecureSession:
    """The secure rounds of one device. `publish(msg)` sends a message on this device's secagg topic (signed by the
    client when it has an identity)."""

    def __init__(self, device_id: str, fleet: str, publish: Callable[[Message], None],
                 identity_key: Ed25519PrivateKey | None = None, ca: x509.Certificate | None = None,
                 refused: Callable[[SecAggRefused], None] | None = None) -> None:
        """With an identity (its key and the fleet CA) every neighbour's keys must come with a certificate from the
        fleet CA naming that neighbour, and carry that neighbour's signature; without one, keys are taken as relayed."""
        self.device_id, self.fleet = device_id, fleet
        self.publish = publish
        self.identity_key, self.ca = identity_key, ca
        self.refused = refused
        self._rounds: dict[int, _Round] = {}
        self._lock = threading.Lock()

    def start(self, task: RoundTask, update: Update) -> None:
        """Stage 1: keep the update (flattened) and send the round's public keys."""
        with self._lock:
            self._rounds = {r: v for r, v in self._rounds.items() if r >= task.round_id - 1}  # older rounds: gone
            self._rounds[task.round_id] = _Round(task, to_vector(update.delta))
        spec = RoundSpec(self.fleet, task.round_id, 0, 1.0, 1)  # size and range come with the roster
        device = SecAggDevice(self.device_id, spec, identity_key=self.identity_key)
        self._rounds[task.round_id].device = device
        c_pk, s_pk, sig = device.advertise()
        self.publish(SecAggKeys(fleet=self.fleet, device_id=self.device_id, round_id=task.round_id, c_pk=c_pk,
                                s_pk=s_pk, key_sig=sig))

    def handle(self, msg: Message) -> None:
        """Answer one coordinator message of a secure round; a refusal is reported and ends this device's part."""
        state = self._rounds.get(msg.round_id or -1)
        try:
            if state is None or state.device is None:
                raise SecAggRefused(f"{msg.type} for round {msg.round_id}, which this device is not in")
            if isinstance(msg, SecAggRoster):
                self._on_roster(state, msg)
            elif isinstance(msg, SecAggInbox):
                if state.quantised is None:
                    raise SecAggRefused("shares arrived before the roster")
                y = state.device.masked_input(state.quantised, msg.shares)
                self.publish(SecAggMasked(fleet=self.fleet, device_id=self.device_id, round_id=msg.round_id,
                                          masked=y.astype("<u4").tobytes()))
            elif isinstance(msg, SecAggUnmask):
                shares = state.device.reveal(msg.survivors, msg.dropped)
                self.publish(SecAggReveal(fleet=self.fleet, device_id=self.device_id, round_id=msg.round_id,
                                          shares=shares))
                with self._lock:
                    self._rounds.pop(msg.round_id, None)  # done: the secrets go with it
        except SecAggError as exc:
            self._refuse(msg, SecAggRefused(str(exc)))
        except SecAggRefused as exc:
            self._refuse(msg, exc)

    def _on_roster(self, state: _Round, msg: SecAggRoster) -> None:
        if msg.size != state.vector.size:
            raise SecAggRefused(f"the roster masks {msg.size} values, this update has {state.vector.size}")
        device = state.device
        assert device is not None
        device.spec = RoundSpec(self.fleet, msg.round_id, msg.size, msg.value_range, msg.bits)
        state.quantised = quantise(state.vector, msg.value_range, msg.bits)
        if self.ca is not None:
            device.check_peer = self._peer_check(msg.certs)
        shares = device.share(msg.neighbours, msg.threshold)
        self.publish(SecAggShares(fleet=self.fleet, device_id=self.device_id, round_id=msg.round_id, shares=shares))

    def _peer_check(self, certs: dict[str, bytes]) -> PeerCheck:
        ca = self.ca
        assert ca is not None

        def check(peer: str, signed: bytes, sig: bytes) -> None:
            if peer not in certs:
                raise SecAggRefused(f"the roster carries no certificate for neighbour {peer}")
            try:
                key = verified_public_key(x509.load_der_x509_certificate(certs[peer]), ca, expected_cn=peer)
                key.verify(sig, signed)
            except (IdentityError, InvalidSignature, ValueError) as exc:
                raise SecAggRefused(f"neighbour {peer}'s keys are not signed by its certified key: "
                                    f"{type(exc).__name__}") from None

        return check

    def _refuse(self, msg: Message, err: SecAggRefused) -> None:
        log.warning("device %s: refused %s of round %s: %s", self.device_id, msg.type, msg.round_id, err)
        with self._lock:
            self._rounds.pop(msg.round_id or -1, None)
        if self.refused is not None:
            self.refused(err)
