"""`fedge broker config`: a production Mosquitto configuration for one fleet (TLS, certificates, ACL, persistence).

What it enforces at the broker, before any payload reaches fedge:

- TLS only, and a client certificate from the fleet CA (``require_certificate``); the certificate's common name is
  the MQTT username (``use_identity_as_username``) and the client id (``use_username_as_clientid``), so nobody but
  the holder of the coordinator's key can take over the coordinator's persistent session, and no device can use
  another's client id.
- An ACL with ``%u`` patterns: a device publishes only on its own hello/status/forget topics and its own update
  and secure-aggregation topics, and reads only its own task topic and the fleet's models; the coordinator reads and
  writes the fleet's tree. A revoked device is denied everything (``fedge fleet revoke`` rewrites the ACL and the CRL
  and sends SIGHUP: Mosquitto reloads both without a restart; the CRL refuses its next connection, the ACL its open
  one).
- Persistence on (queued updates survive a broker restart), and queue limits sized for the fleet: the coordinator's
  session must hold a few rounds of updates from every device while it is away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_client.wire import TOPIC_ROOT, check_name

UPDATE_BYTES = 64 * 1024  # generous: a float16 head update is ~25 KB


def acl_text(fleet: str, coordinator: str, revoked: Sequence[str] = ()) -> str:
    root = f"{TOPIC_ROOT}/{check_name(fleet, 'fleet')}"
    lines = [f"# fedge ACL for fleet {fleet} (written by fedge; `fedge fleet revoke` rewrites it)", ""]
    for device in revoked:  # user-specific denials are checked before any pattern
        lines += [f"user {check_name(device, 'device id')}", "topic deny #", ""]
    lines += [f"user {coordinator}", f"topic readwrite {root}/#", "",
              "# every other client is a device whose certificate names it: %u is its id",
              f"pattern write {root}/devices/%u/hello",
              f"pattern write {root}/devices/%u/status",
              f"pattern write {root}/devices/%u/forget",
              f"pattern write {root}/rounds/+/updates/%u",
              f"pattern write {root}/rounds/+/secagg/%u",  # secure aggregation's four stages (SecAgg+)
              f"pattern read {root}/devices/%u/task",
              f"pattern read {root}/models/#", ""]
    return "\n".join(lines)


def write_acl(path: Path, fleet: str, coordinator: str, revoked: Sequence[str] = ()) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(acl_text(fleet, coordinator, revoked))
    tmp.replace(path)


@dataclass(frozen=True)
class BrokerConfig:
    """Where the broker listens and how many devices it must hold sessions for."""

    port: int = 8883
    bind: str = "0.0.0.0"
    devices: int = 1000
    rounds_buffered: int = 4  # rounds of updates the coordinator's session keeps while it is away
    max_payload_bytes: int = 1024 * 1024
    run_as: str | None = None  # Mosquitto started as root drops to this user (its default: "mosquitto")

    @property
    def max_queued_messages(self) -> int:
        return max(1000, self.devices * self.rounds_buffered * 2)

    @property
    def max_queued_bytes(self) -> int:
        return self.devices * self.rounds_buffered * UPDATE_BYTES


def mosquitto_conf(cfg: BrokerConfig, *, ca: Path, cert: Path, key: Path, crl: Path, acl: Path, data_dir: Path,
                   log_dest: str = "syslog") -> str:
    return "\n".join([
        "# fedge production broker (written by `fedge broker config`; see docs/security.md)",
        "per_listener_settings false",
        *([f"user {cfg.run_as}"] if cfg.run_as else []),
        "allow_anonymous false",
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 30",
        f"pid_file {data_dir}/mosquitto.pid",
        f"log_dest {log_dest}",
        f"acl_file {acl}",
        f"message_size_limit {cfg.max_payload_bytes}",
        f"max_queued_messages {cfg.max_queued_messages}",
        f"max_queued_bytes {cfg.max_queued_bytes}",
        "max_inflight_messages 20",
        "",
        f"listener {cfg.port} {cfg.bind}",
        "protocol mqtt",
        f"max_connections {cfg.devices + 64}",
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        f"crlfile {crl}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "",
    ])


def write_broker_config(fleet_dir: Path, out_dir: Path, cfg: BrokerConfig, log_dest: str = "syslog") -> Path:
    """mosquitto.conf and acl in `out_dir` for the fleet in `fleet_dir` (its CA, broker certificate and CRL)."""
    from coordinator.fleet.pki import FleetPKI, coordinator_name

    pki = FleetPKI(fleet_dir)
    fleet = pki.fleet
    out_dir.mkdir(parents=True, exist_ok=True)
    write_acl(out_dir / "acl", fleet, coordinator_name(fleet), sorted(pki.revoked()))
    root = fleet_dir.resolve()
    conf = out_dir / "mosquitto.conf"
    conf.write_text(mosquitto_conf(cfg, ca=root / "ca.crt", cert=root / "broker.crt", key=root / "broker.key",
                                   crl=root / "crl.pem", acl=(out_dir / "acl").resolve(), data_dir=out_dir.resolve(),
                                   log_dest=log_dest))
    return conf
