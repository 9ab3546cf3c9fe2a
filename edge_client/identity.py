"""A fleet identity on disk: an ed25519 key, its X.509 certificate from the fleet CA, the CA certificate, and the
coordinator's certificate.

One key per identity serves twice: it authenticates the TLS connection to the broker (the certificate's common name
is the device id, which the broker uses as the MQTT username for its ACL) and it signs control messages
(:mod:`edge_client.wire.signing`), so the coordinator can check who wrote a payload even where a broker has no ACL.
``fedge fleet enroll`` writes these files as a small bundle the device installs (hardware/INSTALL.md).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

PASSPHRASE_ENV = "FEDGE_KEY_PASSPHRASE"  # when set, private keys are written and read encrypted with it
COORDINATOR_CN_PREFIX = "fedge-coordinator-"


class IdentityError(ValueError):
    """A key or certificate that cannot be used: unreadable, not ed25519, not issued by the fleet CA, expired."""


def passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def write_private_key(path: str | os.PathLike[str], key: Ed25519PrivateKey) -> None:
    """PKCS8 PEM, mode 0600, encrypted with ``$FEDGE_KEY_PASSPHRASE`` when it is set."""
    secret = passphrase()
    enc = serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An ed25519 private key from PEM (decrypted with ``$FEDGE_KEY_PASSPHRASE`` when the file is encrypted)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), passphrase())
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"cannot read the private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, fedge identities are ed25519")
    return key


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read the certificate {path}: {exc}") from None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def verified_public_key(cert: x509.Certificate, ca: x509.Certificate, expected_cn: str | None = None,
                        now: dt.datetime | None = None) -> Ed25519PublicKey:
    """The certificate's ed25519 key, after checking the CA signed it, it is valid now and names `expected_cn`."""
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes)  # type: ignore[call-arg,union-attr]
    except (InvalidSignature, TypeError, ValueError):
        raise IdentityError(f"certificate {common_name(cert)!r} was not issued by the fleet CA") from None
    now = now or dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise IdentityError(f"certificate {common_name(cert)!r} is not valid now (expires {cert.not_valid_after_utc})")
    if expected_cn is not None and common_name(cert) != expected_cn:
        raise IdentityError(f"certificate names {common_name(cert)!r}, expected {expected_cn!r}")
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"certificate {common_name(cert)!r} holds a {type(key).__name__}, not an ed25519 key")
    return key


@dataclass(frozen=True)
class Identity:
    """What one party holds: its key and certificate, the fleet CA, and the coordinator's verified public key (what
    a device checks control messages against; the coordinator's own key for the coordinator)."""

    name: str
    key: Ed25519PrivateKey
    key_file: Path
    cert_file: Path
    ca_file: Path
    coordinator_key: Ed25519PublicKey

    @classmethod
    def load(cls, folder: str | os.PathLike[str], name: str | None = None) -> Identity:
        """An enrollment bundle: ``<name>.key``, ``<name>.crt``, ``ca.crt`` and ``coordinator.crt`` in one folder
        (`name` defaults to the one ``*.key`` file there)."""
        d = Path(folder)
        if name is None:
            keys = sorted(p.stem for p in d.glob("*.key") if p.stem != "ca")
            if len(keys) != 1:
                raise IdentityError(f"{d} must hold exactly one identity key, found {keys or 'none'}")
            name = keys[0]
        ca = load_certificate(d / "ca.crt")
        key = load_private_key(d / f"{name}.key")
        own = verified_public_key(load_certificate(d / f"{name}.crt"), ca, expected_cn=name)
        if own.public_bytes_raw() != key.public_key().public_bytes_raw():
            raise IdentityError(f"{d / (name + '.crt')} does not certify the key {d / (name + '.key')}")
        coord_cert = load_certificate(d / "coordinator.crt")
        if not common_name(coord_cert).startswith(COORDINATOR_CN_PREFIX):
            raise IdentityError(f"{d / 'coordinator.crt'} is not a coordinator certificate")
        return cls(name, key, d / f"{name}.key", d / f"{name}.crt", d / "ca.crt",
                   verified_public_key(coord_cert, ca))
