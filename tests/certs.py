"""
Certificates for the tests, made with C{cryptography}: a root CA, an intermediate CA it
signed, and leaf certificates the intermediate signs for given DNS names and IP addresses
(subjectAltName), written as PEM files the way a server is deployed (Let's Encrypt's
C{fullchain.pem} and C{privkey.pem}); plus an expired one and a self-signed one, for the
tests where verification must fail. EC P-256 keys: a certificate takes a millisecond.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: How far the validity of a certificate reaches either side of now.
_DAY = datetime.timedelta(days=1)


@attrs.frozen
class Issued:
    """
    One certificate, written out.

    @ivar chain: the PEM file holding the certificate, then the intermediate CA's
        (C{tls.certificate}); for a self-signed one, the certificate alone.
    @ivar key: the PEM file holding its private key (PKCS #8, no passphrase: C{tls.key}).
    @ivar ca: the PEM file holding the root CA a client must trust (C{upstream_tls.ca_file}).
    @ivar serial: the certificate's serial number.
    @ivar fingerprint: the SHA-256 of the certificate's DER encoding, in hex.
    """

    chain: str
    key: str
    ca: str
    serial: int
    fingerprint: str
    certificate: x509.Certificate


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _keyPem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _alternativeNames(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


def _sign(
    subject: x509.Name,
    publicKey: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuerKey: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    names: tuple[str, ...] = (),
    expired: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    notBefore, notAfter = (
        (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(publicKey), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip
        builder = builder.add_extension(usage, critical=True)
    else:
        builder = builder.add_extension(_alternativeNames(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    return builder.sign(issuerKey, hashes.SHA256())


def _issued(
    certificate: x509.Certificate, chain: bytes, key: ec.EllipticCurvePrivateKey, directory: str,
    stem: str, ca: str,
) -> Issued:  # fmt: skip
    return Issued(
        chain=_write(os.path.join(directory, f"{stem}-fullchain.pem"), chain),
        key=_write(os.path.join(directory, f"{stem}-privkey.pem"), _keyPem(key)),
        ca=ca,
        serial=certificate.serial_number,
        fingerprint=hashlib.sha256(
            certificate.public_bytes(serialization.Encoding.DER)
        ).hexdigest(),
        certificate=certificate,
    )


class CertificateAuthority:
    """
    A root CA and an intermediate CA under it, in C{directory}: the root's certificate is
    in L{ca} (the file clients trust); the leaves it issues carry the intermediate in
    their chain file, so a client verifies them only if the server sends the whole chain.
    """

    def __init__(self, directory: str, name: str = "mailproxy test") -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._rootKey = _key()
        root = _name(f"{name} root CA")
        self.root = _sign(root, self._rootKey.public_key(), root, self._rootKey, ca=True)
        self._intermediateKey = _key()
        self._intermediateName = _name(f"{name} intermediate CA")
        self.intermediate = _sign(
            self._intermediateName,
            self._intermediateKey.public_key(),
            root,
            self._rootKey,
            ca=True,
        )
        self.ca = _write(os.path.join(directory, f"{_slug(name)}-ca.pem"), _pem(self.root))
        self._count = 0

    def issue(self, *names: str, expired: bool = False, stem: str | None = None) -> Issued:
        """
        A certificate for C{names} (DNS names or IP addresses; the first is also the
        common name), signed by the intermediate; C{expired}: its validity ended
        yesterday. Written as C{STEM-fullchain.pem} and C{STEM-privkey.pem}.
        """
        self._count += 1
        key = _key()
        certificate = _sign(
            _name(names[0]),
            key.public_key(),
            self._intermediateName,
            self._intermediateKey,
            ca=False,
            names=names,
            expired=expired,
        )
        return _issued(
            certificate,
            _pem(certificate, self.intermediate),
            key,
            self.directory,
            stem or f"{_slug(names[0])}-{self._count}",
            self.ca,
        )


def selfSigned(directory: str, *names: str, stem: str = "self-signed") -> Issued:
    """A leaf certificate for C{names} that signs itself: no CA vouches for it; its
    C{ca} is its own chain file."""
    os.makedirs(directory, exist_ok=True)
    key = _key()
    certificate = _sign(
        _name(names[0]), key.public_key(), _name(names[0]), key, ca=False, names=names
    )
    chain = os.path.join(directory, f"{stem}-fullchain.pem")
    return _issued(certificate, _pem(certificate), key, directory, stem, chain)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name)
