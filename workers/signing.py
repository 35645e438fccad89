"""Celery message signing: with `access.signing` configured, every task message is signed with this process's
key (Celery's `auth` serializer over JSON) and workers accept only messages whose signature verifies against a
certificate in the trusted store. A forged or altered message pushed into Redis is refused, and reported as a
security event, before any task code runs.

Keys are Ed25519 by default, RSA keys still work. Every message is signed once and verified once: RSA-2048 signs
in 1-1.6 ms of CPU here and verifies in 0.07 ms, Ed25519 in 0.1 and 0.3 ms, about a quarter of the CPU a message.
Celery's key and certificate classes take RSA only, so the serializer is Celery's (its message format, signer id
and checks) with key, certificate and store classes of ours.

Signing is global to the process (kombu's serializer registry), so it is set up once, at start: by the
orchestrator before its first message, by a worker before it consumes.
"""

from __future__ import annotations

import datetime
import glob
import os
from pathlib import Path

from celery.exceptions import SecurityError
from celery.security.certificate import Certificate, CertStore
from celery.security.serialization import SecureSerializer
from celery.security.utils import reraise_errors
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from kombu.serialization import disable_insecure_serializers, registry

from orchestrator.config import Config
from workers.app import app
from workers.quarantine import QuarantineConsumer

SigningPrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
SigningPublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey


def use_signing(config: Config) -> bool:
    """Sign and accept only signed task messages when the configuration asks for it; True when it does."""
    signing = config.access.signing if config.access is not None else None
    if signing is None:
        return False
    base = config.base_dir
    app.conf.update(task_serializer="auth", accept_content=["auth"], worker_consumer=f"{__name__}:SigningConsumer")
    install(secure_serializer(base / signing.key, base / signing.certificate, base / signing.store, signing.digest))
    return True


def install(serializer: SecureSerializer) -> None:
    """Make the serializer kombu's `auth` and the default, JSON the only other: Celery's setup_security, step by
    step, with a serializer of ours (its check of the task_serializer and accept_content settings is moot)."""
    # Results stay JSON; the pickle family stays disabled.
    disable_insecure_serializers(["json", "application/json"])  # type: ignore[no-untyped-call]
    registry.register("auth", serializer.serialize, serializer.deserialize, content_type="application/data",
                      content_encoding="utf-8")  # type: ignore[no-untyped-call]  # fmt: skip
    registry._set_default_serializer("auth")  # type: ignore[no-untyped-call]


def secure_serializer(key: Path, certificate: Path, store: Path, digest: str = "sha256") -> SecureSerializer:
    """Celery's `auth` serializer (its message format and checks) signing with the key and certificate in these
    PEM files and trusting the certificates of the store (a PEM file, or a directory of them)."""
    return SecureSerializer(MessageKey(key.read_bytes()), MessageCertificate(certificate.read_bytes()),
                            MessageCertStore(store), digest, serializer="json")  # fmt: skip


def create_identity(key_path: Path, certificate_path: Path, name: str, days: float = 365,
                    key: SigningPrivateKey | None = None) -> datetime.datetime:  # fmt: skip
    """Write a signing key (a new Ed25519 one unless given), readable by its owner only, and its self-signed
    certificate, as PEM files, replacing any there; returns when the certificate expires."""
    key = key or ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    expires = now + datetime.timedelta(days=days)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(expires))  # fmt: skip
    # Ed25519 hashes inside its signature: X.509 takes no digest for it.
    certificate = builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    for path in (key_path, certificate_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    key_path.unlink(missing_ok=True)  # created anew below, so its mode is 0600 whatever the old file's was
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return expires


def _pss(digest: hashes.HashAlgorithm) -> padding.PSS:
    # Celery's own RSA padding, so an RSA fleet signs and verifies as with Celery's setup_security.
    return padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.MAX_LENGTH)


class MessageKey:
    """The key this process signs messages with: Ed25519 or RSA (Celery's PrivateKey, which takes RSA only)."""

    def __init__(self, pem: bytes) -> None:
        with reraise_errors("Invalid private key: {0!r}", errors=(ValueError, TypeError)):
            key = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(key, SigningPrivateKey):
                raise ValueError(f"{type(key).__name__}: signing keys are Ed25519 or RSA")
        self._key = key

    def sign(self, data: bytes, digest: hashes.HashAlgorithm) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)  # the digest is for RSA: Ed25519 hashes inside (SHA-512)
        return self._key.sign(data, _pss(digest), digest)


class MessageCertificate(Certificate):  # type: ignore[misc]
    """A certificate whose key is Ed25519 or RSA; Celery's Certificate otherwise (signer id, expiry)."""

    def __init__(self, pem: bytes) -> None:
        with reraise_errors("Invalid certificate: {0!r}", errors=(ValueError,)):
            self._cert = x509.load_pem_x509_certificate(pem)
            key = self._cert.public_key()
            if not isinstance(key, SigningPublicKey):
                raise ValueError(f"{type(key).__name__}: certificates are Ed25519 or RSA")
        self._key = key

    def verify(self, data: bytes, signature: bytes, digest: hashes.HashAlgorithm) -> None:
        """Raise SecurityError unless the signature of data verifies and the certificate is unexpired."""
        if self.has_expired():
            raise SecurityError(f"Expired certificate: {self.get_id()!r}")
        # Errors named here: Celery's own default (the module cryptography.exceptions) is no exception class.
        with reraise_errors("Bad signature: {0!r}", errors=(InvalidSignature,)):
            if isinstance(self._key, ed25519.Ed25519PublicKey):
                self._key.verify(signature, data)
            else:
                self._key.verify(signature, data, _pss(digest), digest)


class MessageCertStore(CertStore):  # type: ignore[misc]
    """The trusted certificates, read as Celery's FSCertStore reads them (a file, a glob, or every file of a
    directory; a duplicate or expired certificate is refused), with certificates of ours."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        for name in sorted(glob.glob(str(path / "*") if path.is_dir() else str(path))):
            certificate = MessageCertificate(Path(name).read_bytes())
            if certificate.has_expired():
                raise SecurityError(f"Expired certificate: {certificate.get_id()!r}")
            self.add_cert(certificate)
        if not self._certs:
            # Celery would start, then refuse every message: say so at start instead.
            raise SecurityError(f"no trusted certificate in {path}")


class SigningConsumer(QuarantineConsumer):
    """The worker's consumer when signing is on: a message whose signature does not verify, or that is not signed,
    is quarantined (workers/quarantine.py) and reported as a security event like any other refused message."""
