"""The round-level checks every update passes before it is stored, and the refusal a device gets: shared by the
coordinator's own ingestion and by `fedge ingest` workers (several processes on an MQTT v5 shared subscription)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import paho.mqtt.client as paho

from coordinator.fleet.state import RoundRecord
from edge_client.wire import (
    InvalidMessage,
    ProtocolError,
    Reject,
    RoundClosed,
    StaleRound,
    Topics,
    UnknownDevice,
    Update,
    check_arrays,
    encode,
)
from edge_client.wire import mqtt as M

log = logging.getLogger("fedge.coordinator")


def check_update(msg: Update, rec: RoundRecord | None, *, registered: bool,
                 expected_shapes: Mapping[str, tuple[int, ...]], closing: Collection[int] = ()) -> RoundRecord:
    """Raise the typed refusal for an update that does not belong in the open round `rec` (or belongs to a round in
    `closing`, whose aggregate is being computed); return `rec`."""
    if not registered:
        raise UnknownDevice(f"update from unregistered device {msg.device_id!r}")
    if msg.round_id in closing:
        raise RoundClosed(f"round {msg.round_id} is closing; its aggregate is being computed without this update")
    if rec is None or msg.round_id != rec.round_id:
        raise StaleRound(f"update for round {msg.round_id}, open round is {rec.round_id if rec else 'none'}")
    if msg.device_id not in rec.selected_set:
        raise StaleRound(f"device {msg.device_id} was not selected for round {rec.round_id}")
    if msg.base_version != rec.base_version:
        raise StaleRound(f"update built on v{msg.base_version}, round {rec.round_id} uses v{rec.base_version}")
    if msg.kind != rec.kind:
        raise InvalidMessage(f"{msg.kind} update for a {rec.kind} round")
    if rec.kind == "train":
        if msg.n_samples <= 0:
            raise InvalidMessage("a training update needs n_samples > 0")
        check_arrays(msg.delta, expected_shapes, what="delta")
    return rec


def send_reject(client: paho.Client, topics: Topics, device_id: str | None, err: ProtocolError,
                ref_msg_id: str) -> None:
    """Tell the device why; a reject to an id that cannot be a topic level is not sent."""
    if not device_id:
        return
    try:
        reject = Reject(fleet=topics.fleet, device_id=device_id, ref_msg_id=ref_msg_id, reason=err.reason,
                        detail=str(err)[:1000])
        M.publish(client, topics.task(device_id), encode(reject), expiry_s=3600)
    except (ValueError, ProtocolError):
        log.debug("cannot address a reject to %r", device_id)
