"""The fleet's certificate authority on the coordinator's disk: `fedge fleet init | enroll | revoke`.

Layout of a fleet folder (``fedge fleet init DIR``)::

    fleet.json                 fleet name, broker host names, the fleet's ceiling on one update's sample count
    ca.key, ca.crt             the fleet CA (ed25519); the key never leaves this folder
    coordinator.key/.crt       the coordinator's identity: TLS client + the key that signs control messages;
                               common name ``fedge-coordinator-<fleet>`` (its MQTT username and client id)
    broker.key/.crt            the broker's TLS server certificate (host names and addresses from --host)
    devices/<id>.crt, .json    every enrolled device: its certificate (common name = device id) and its declared
                               sample ceiling; the coordinator reads this folder (coordinator.fleet.registry)
    revoked.json, crl.pem      revoked devices: the coordinator refuses them, the broker's CRL and ACL shut them out
    enroll/<id>/               what a device installs: <id>.key, <id>.crt, ca.crt, coordinator.crt

Private keys are written encrypted when ``FEDGE_KEY_PASSPHRASE`` is set (edge_client.identity). Revocation reaches
a running Mosquitto without a restart: the CRL (new connections) and an ACL that denies the device everything
(its open connection) are rewritten and the broker reloads both on SIGHUP (checked against Mosquitto 2.0.11 in
tests/test_security.py; docs/security.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_client.identity import (
    COORDINATOR_CN_PREFIX,
    load_certificate,
    load_private_key,
    write_private_key,
)
from edge_client.wire import check_name

CA_DAYS, LEAF_DAYS = 3650, 825


def coordinator_name(fleet: str) -> str:
    return f"{COORDINATOR_CN_PREFIX}{fleet}"


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class FleetPKI:
    root: Path

    # ------------------------------------------------------------------ reading

    @property
    def info(self) -> dict:
        try:
            return json.loads((self.root / "fleet.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root} is not a fleet folder (run `fedge fleet init` first)") from None

    @property
    def fleet(self) -> str:
        return str(self.info["fleet"])

    def ca(self) -> tuple[Ed25519PrivateKey, x509.Certificate]:
        return load_private_key(self.root / "ca.key"), load_certificate(self.root / "ca.crt")

    def revoked(self) -> dict[str, float]:
        path = self.root / "revoked.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    # ------------------------------------------------------------------ writing

    def _issue(self, cn: str, key: Ed25519PrivateKey, *, server_names: tuple[str, ...] = (),
               days: int = LEAF_DAYS) -> x509.Certificate:
        ca_key, ca = self.ca()
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server_names
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server_names:
            alt: list[x509.GeneralName] = []
            for host in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(ca_key, None)

    def init(self, fleet: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
             max_samples: int = 1_000_000) -> None:
        """A new fleet: CA, coordinator identity, broker certificate, empty CRL. Refuses to overwrite a fleet."""
        check_name(fleet, "fleet")
        if (self.root / "ca.key").exists():
            raise FileExistsError(f"{self.root} already holds a fleet CA; enroll devices with it instead")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "fleet.json").write_text(json.dumps({"fleet": fleet, "hosts": list(hosts),
                                                          "max_samples": max_samples}, indent=2) + "\n")
        ca_key = Ed25519PrivateKey.generate()
        ca = (x509.CertificateBuilder().subject_name(_name(f"fedge fleet CA {fleet}"))
              .issuer_name(_name(f"fedge fleet CA {fleet}")).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=5))
              .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                           crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .sign(ca_key, None))
        write_private_key(self.root / "ca.key", ca_key)
        _write_cert(self.root / "ca.crt", ca)
        for name, hosts_for in ((coordinator_name(fleet), ()), ("broker", tuple(hosts))):
            key = Ed25519PrivateKey.generate()
            file = "coordinator" if not hosts_for else "broker"
            write_private_key(self.root / f"{file}.key", key)
            _write_cert(self.root / f"{file}.crt", self._issue(name, key, server_names=hosts_for))
        (self.root / "devices").mkdir(exist_ok=True)
        self.write_crl()

    def enroll(self, device_id: str, max_samples: int | None = None, out: Path | None = None) -> Path:
        """A device's key and certificate (common name = device id), registered for the coordinator and written as
        the bundle the device installs; returns the bundle folder."""
        check_name(device_id, "device id")
        if device_id.startswith(COORDINATOR_CN_PREFIX) or device_id == "broker":
            raise ValueError(f"{device_id!r} is reserved")
        if device_id in self.revoked():
            raise ValueError(f"{device_id} was revoked; enroll the replacement under a new id")
        key = Ed25519PrivateKey.generate()
        cert = self._issue(device_id, key)
        _write_cert(self.root / "devices" / f"{device_id}.crt", cert)
        cap = int(max_samples if max_samples is not None else self.info.get("max_samples", 1_000_000))
        (self.root / "devices" / f"{device_id}.json").write_text(json.dumps({"max_samples": cap}) + "\n")
        bundle = out or self.root / "enroll" / device_id
        write_private_key(bundle / f"{device_id}.key", key)
        _write_cert(bundle / f"{device_id}.crt", cert)
        shutil.copyfile(self.root / "ca.crt", bundle / "ca.crt")
        shutil.copyfile(self.root / "coordinator.crt", bundle / "coordinator.crt")
        return bundle

    def revoke(self, device_id: str, broker_pid_file: Path | None = None) -> bool:
        """Revoke a device: the coordinator refuses it from its next message on, the CRL and ACL are rewritten and a
        running broker is told to reload them (SIGHUP to the pid in `broker_pid_file`). True if a broker was told."""
        if not (self.root / "devices" / f"{device_id}.crt").is_file():
            raise ValueError(f"{device_id} is not enrolled in {self.root}")
        revoked = self.revoked()
        revoked[device_id] = _now().timestamp()
        (self.root / "revoked.json").write_text(json.dumps(revoked, indent=2) + "\n")
        self.write_crl()
        from coordinator.fleet.broker_config import write_acl  # the ACL lives beside the broker's config

        pid_file = broker_pid_file or self.root / "broker" / "mosquitto.pid"
        if (pid_file.parent / "acl").is_file():
            write_acl(pid_file.parent / "acl", self.fleet, coordinator_name(self.fleet), sorted(revoked))
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGHUP)
            return True
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False

    def write_crl(self) -> None:
        ca_key, ca = self.ca()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(_now())
                   .next_update(_now() + dt.timedelta(days=CA_DAYS)))
        for device_id, when in self.revoked().items():
            cert = load_certificate(self.root / "devices" / f"{device_id}.crt")
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(dt.datetime.fromtimestamp(when, dt.UTC)).build())
        tmp = self.root / "crl.pem.tmp"
        tmp.write_bytes(builder.sign(ca_key, None).public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, self.root / "crl.pem")
