"""The community's own certificate authority (the `cryptography` package):
one CA per community, made by `peergrid init`, that signs the broker's
server certificate. Each board gets the CA certificate at commissioning and
accepts only a broker whose certificate chains to it and names the address
the board dials. No public CA, no Internet: the router is the whole PKI.

Keys are ECDSA P-256 (small certificates and quick handshakes for the
boards' mbedTLS), written 0600; certificates are PEM. Nothing here
overwrites a key that exists: rerunning init keeps the CA (every board
trusts it) and renews the server certificate only when asked or when it
is close to expiry or no longer names the router."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peergrid.community.registry import atomic_write

CA_DAYS = 20 * 365              # the CA outlives the boards it is flashed into
SERVER_DAYS = 825               # the broker's certificate: renewed by rerunning init
RENEW_DAYS = 30                 # init and doctor act within this many days of expiry


class PkiError(ValueError):
    pass


@dataclass
class CertInfo:
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    names: list[str]            # DNS names and IP addresses it is valid for
    is_ca: bool

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.timezone.utc)
        return (self.not_after - now).total_seconds() / 86400


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if not n or any(c.isspace() for c in n):
                raise PkiError(f"not a host name or address: {n!r}") from None
            out.append(x509.DNSName(n))
    return out


def make_ca(cert: Path, key: Path, community: str, *, days: int = CA_DAYS,
            now: dt.datetime | None = None) -> bool:
    """The community CA, unless both files exist (then False: kept as is)."""
    if cert.exists() and key.exists():
        load_cert(cert)          # a damaged CA is an error, never silently replaced
        return False
    if cert.exists() or key.exists():
        raise PkiError(f"only one of {cert} and {key} exists: restore the other or remove both")
    now = now or _now()
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PeerGrid"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"PeerGrid community {community} CA")])
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                      crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
         .sign(k, hashes.SHA256()))
    atomic_write(key, _key_pem(k))
    _write_public(cert, c.public_bytes(serialization.Encoding.PEM))
    return True


def make_server_cert(cert: Path, key: Path, ca_cert: Path, ca_key: Path, names: list[str], *,
                     days: int = SERVER_DAYS, now: dt.datetime | None = None) -> None:
    """The broker's certificate for `names` (the addresses boards dial; the
    first is the common name), signed by the CA; a new key each time."""
    if not names:
        raise PkiError("the broker's certificate needs at least one name or address")
    now = now or _now()
    ca = load_cert(ca_cert)
    ca_k = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(ca_k, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{ca_key}: not the community CA's EC key")
    k = ec.generate_private_key(ec.SECP256R1())
    c = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
         .issuer_name(ca.subject).public_key(k.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_k.public_key()), critical=False)
         .sign(ca_k, hashes.SHA256()))
    atomic_write(key, _key_pem(k))
    _write_public(cert, c.public_bytes(serialization.Encoding.PEM))


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path}: no such certificate") from None
    except ValueError as e:
        raise PkiError(f"{path}: not a PEM certificate ({e})") from None


def info(path: Path) -> CertInfo:
    c = load_cert(path)
    names: list[str] = []
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    try:
        is_ca = bool(c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(c.subject.rfc4514_string(), c.issuer.rfc4514_string(), c.not_valid_before_utc,
                    c.not_valid_after_utc, names, is_ca)


def signed_by(cert: Path, ca_cert: Path) -> bool:
    """True if `cert` carries a valid signature of the CA in `ca_cert`."""
    c, ca = load_cert(cert), load_cert(ca_cert)
    try:
        c.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and issuer mismatch alike
        return False


def needs_renewal(cert: Path, ca_cert: Path, names: list[str], now: dt.datetime | None = None) -> str | None:
    """Why the broker's certificate must be made again, or None."""
    if not cert.exists():
        return "missing"
    i = info(cert)
    if i.days_left(now) < RENEW_DAYS:
        return f"expires in {i.days_left(now):.0f} days"
    if not signed_by(cert, ca_cert):
        return "not signed by the community CA"
    missing = [n for n in names if n not in i.names]
    if missing:
        return f"does not name {', '.join(missing)}"
    return None
