"""The coordinator's side of a secure round over MQTT (``FleetConfig.secagg``): relays SecAgg+'s four stages
(edge_client.secagg.protocol) between the devices of a round and unmasks only their sum.

What it stores: each device's masked input (the encoded SecAggMasked message, in the updates table where a plain
round keeps its Update) -- uniform in Z_2^32 alone -- and nothing else per device; keys and shares live in memory
for the round only. A stage waits until every device still in the round answered or its time is up; devices that
did not answer are dropped from there on. Too few devices at any stage, or too few shares to unmask, aborts the
round (SecAggAbort): the round fails, the global head stays, nothing is revealed. A restarted coordinator cannot
resume a secure round (the devices' secrets are per round and in memory): the open round is failed cleanly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from coordinator.fleet.state import FleetState
from edge_client.secagg.masking import DTYPE, dequantise_sum, max_bits
from edge_client.secagg.protocol import RoundSpec, SecAggAbort, SecAggError, SecAggServer, key_bytes
from edge_client.wire import (
    Message,
    SecAggInbox,
    SecAggKeys,
    SecAggMasked,
    SecAggRefused,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)

log = logging.getLogger("fedge.coordinator.secagg")

class SecureRound:
    """One secure round: fed by the coordinator's message handler (:meth:`on_message`, paho's thread), driven by
    :meth:`run` (the round loop's thread). `send(device, msg)` publishes a control message to a device."""

    def __init__(self, fleet: str, round_id: int, selected: tuple[str, ...], size: int, value_range: float,
                 send: Callable[[str, Message], None], state: FleetState, *, seed: int = 0,
                 check_keys: Callable[[str, bytes, bytes], None] | None = None,
                 cert_of: Callable[[str], bytes] | None = None) -> None:
        self.fleet, self.round_id, self.selected = fleet, round_id, frozenset(selected)
        self.spec = RoundSpec(fleet, round_id, size, value_range, max_bits(len(selected)))
        self.server = SecAggServer(self.spec)
        self.send, self.state, self.seed = send, state, seed
        self.check_keys = check_keys
        self.cert_of = cert_of  # a fleet with identities: each roster carries the neighbours' certificates
        self.stage = "keys"
        self.bytes_up: dict[str, int] = {}
        self._changed = threading.Condition()

    # ------------------------------------------------------------------ incoming (paho's thread)

    def on_message(self, msg: Message, payload: bytes) -> None:
        """Take one device message of this round's current stage; anything else is a typed refusal."""
        device = msg.device_id or ""
        if msg.round_id != self.round_id or device not in self.selected:
            raise SecAggRefused(f"{msg.type} from {device} for round {msg.round_id}: not in this secure round")
        with self._changed:
            try:
                if isinstance(msg, SecAggKeys) and self.stage == "keys":
                    if self.check_keys is not None:
                        self.check_keys(device, key_bytes(self.fleet, self.round_id, device, msg.c_pk, msg.s_pk),
                                        msg.key_sig)
                    self.server.keys[device] = (msg.c_pk, msg.s_pk, msg.key_sig)
                elif isinstance(msg, SecAggShares) and self.stage == "shares":
                    self.server.add_shares(device, msg.shares)
                elif isinstance(msg, SecAggMasked) and self.stage == "masked":
                    y = np.frombuffer(msg.masked, "<u4").astype(DTYPE)
                    self.server.add_masked(device, y)
                    self.state.add_update(self.round_id, device, msg.msg_id, 0, payload, {})  # the only thing kept
                elif isinstance(msg, SecAggReveal) and self.stage == "reveal":
                    self.server.add_reveal(device, msg.shares)
                else:
                    raise SecAggRefused(f"{msg.type} from {device} while round {self.round_id} is at stage "
                                        f"{self.stage}")
            except SecAggError as exc:
                raise SecAggRefused(str(exc)) from None
            self.bytes_up[device] = self.bytes_up.get(device, 0) + len(payload)
            self._changed.notify_all()

    # ------------------------------------------------------------------ driving (the round loop's thread)

    def _enter(self, stage: str) -> None:
        """Accept this stage's messages from now on (before its requests go out: answers can be fast)."""
        with self._changed:
            self.stage = stage

    def _wait(self, expected: set[str], have: Callable[[], Mapping[str, object]], until: float) -> None:
        with self._changed:
            while not expected <= set(have()) and time.time() < until:
                self._changed.wait(min(0.2, max(0.01, until - time.time())))
            self.stage = "closing"  # late messages of this stage are refused from here on

    def run(self, keys_until: float, stage_s: float) -> tuple[np.ndarray, list[str]]:
        """All four stages; returns (the float sum of the survivors' updates, the survivors). Raises SecAggAbort."""
        srv = self.server
        self._wait(set(self.selected), lambda: srv.keys, keys_until)
        rosters = srv.rosters(self.seed * 7919 + self.round_id)
        self._enter("shares")
        for device, neighbours in rosters.items():
            self.send(device, SecAggRoster(fleet=self.fleet, device_id=device, round_id=self.round_id,
                                           size=self.spec.size, value_range=self.spec.value_range,
                                           bits=self.spec.bits, threshold=srv.t, neighbours=neighbours,
                                           certs={v: self.cert_of(v) for v in neighbours} if self.cert_of else {}))
        self._wait(set(rosters), lambda: srv.shared, time.time() + stage_s)
        inboxes = srv.forwarded()
        self._enter("masked")
        for device, inbox in inboxes.items():
            self.send(device, SecAggInbox(fleet=self.fleet, device_id=device, round_id=self.round_id, shares=inbox))
        self._wait(set(srv.shared), lambda: srv.masked, time.time() + stage_s)
        survivors, dropped = srv.unmask_request()
        self._enter("reveal")
        for device in survivors:
            self.send(device, SecAggUnmask(fleet=self.fleet, device_id=device, round_id=self.round_id,
                                           survivors=survivors, dropped=dropped))
        self._wait(set(survivors), lambda: srv.revealed, time.time() + stage_s)
        total, survivors = srv.result()
        log.info("round %d: secure sum of %d devices (%d dropped after sharing keys)", self.round_id, len(survivors),
                 len(dropped))
        return dequantise_sum(total, len(survivors), self.spec.value_range, self.spec.bits), survivors


__all__ = ["SecAggAbort", "SecureRound"]
