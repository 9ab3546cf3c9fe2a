"""The coordinator's view of who belongs to the fleet: enrolled devices with their verified public keys and
declared sample ceilings, and who was revoked. Read from the fleet folder (coordinator.fleet.pki) and read again
when it changes, so `fedge fleet enroll` and `fedge fleet revoke` take effect without restarting the coordinator."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding

from edge_client.identity import IdentityError, load_certificate, load_private_key, verified_public_key
from edge_client.wire import Revoked, UnknownDevice

log = logging.getLogger("fedge.registry")


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    public_key: Ed25519PublicKey
    max_samples: int


class DeviceRegistry:
    def __init__(self, fleet_dir: str | Path) -> None:
        self.root = Path(fleet_dir)
        self.ca = load_certificate(self.root / "ca.crt")
        self.info = json.loads((self.root / "fleet.json").read_text())
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] = ()
        self._devices: dict[str, Enrolled] = {}
        self._revoked: set[str] = set()
        self._reload()

    @property
    def fleet(self) -> str:
        return str(self.info["fleet"])

    def coordinator_key(self) -> Ed25519PrivateKey:
        return load_private_key(self.root / "coordinator.key")

    def _stamp_now(self) -> tuple[float, ...]:
        paths = [self.root / "devices", self.root / "revoked.json"]
        return tuple(p.stat().st_mtime_ns if p.exists() else 0.0 for p in paths)

    def _reload(self) -> None:
        stamp = self._stamp_now()
        if stamp == self._stamp:
            return
        revoked_file = self.root / "revoked.json"
        revoked = set(json.loads(revoked_file.read_text())) if revoked_file.is_file() else set()
        devices = {}
        for cert_file in sorted((self.root / "devices").glob("*.crt")):
            device_id = cert_file.stem
            try:
                key = verified_public_key(load_certificate(cert_file), self.ca, expected_cn=device_id)
                meta_file = cert_file.with_suffix(".json")
                meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            except (IdentityError, ValueError) as exc:
                log.error("enrolled device %s is unusable: %s", device_id, exc)
                continue
            devices[device_id] = Enrolled(device_id, key, int(meta.get("max_samples",
                                                                       self.info.get("max_samples", 1_000_000))))
        self._devices, self._revoked, self._stamp = devices, revoked, stamp
        log.info("fleet registry: %d devices enrolled, %d revoked", len(devices), len(revoked))

    def device(self, device_id: str) -> Enrolled:
        """The enrolled device, or UnknownDevice / Revoked."""
        with self._lock:
            self._reload()
            if device_id in self._revoked:
                raise Revoked(f"device {device_id!r} was revoked")
            if device_id not in self._devices:
                raise UnknownDevice(f"device {device_id!r} is not enrolled in fleet {self.fleet!r}")
            return self._devices[device_id]

    def certificate_der(self, device_id: str) -> bytes:
        """The enrolled device's certificate (DER): what its secure-aggregation neighbours check its keys with."""
        self.device(device_id)  # enrolled and not revoked
        return load_certificate(self.root / "devices" / f"{device_id}.crt").public_bytes(Encoding.DER)
