"""The embedded broker with a SASL_SSL listener: TLS with certificates made here, SCRAM users.

Tests use it to check that TLS and SASL settings reach every Kafka client. The PLAINTEXT
listener stays (the broker talks to itself over it); clients that should be checked are
pointed at ``secure_bootstrap`` only.

Certificates come from the ``cryptography`` package: a throw-away CA, and a server
certificate for 127.0.0.1 signed by it, stored as a PKCS#12 keystore for the broker. SCRAM
credentials are written into the KRaft metadata when the log dir is formatted
(``kafka-storage format --add-scram``), so they exist before the first client connects.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from clipstream.streams.broker import EmbeddedBroker
from clipstream.streams.runtime.ports import HOST, free_port

SCRAM_MECHANISM = "SCRAM-SHA-512"


@dataclass(frozen=True)
class Certificates:
    """Files for one TLS set-up: the CA clients trust and the broker's keystore."""

    ca_pem: Path
    keystore: Path
    keystore_password: str


def make_certificates(directory: Path, host: str = HOST) -> Certificates:
    """A fresh CA and a server certificate for ``host``, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clipstream test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = directory / "ca.pem"
    ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    password = secrets.token_urlsafe(16)
    keystore = directory / "broker.p12"
    keystore.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"broker",
            key,
            server_cert,
            [ca_cert],
            serialization.BestAvailableEncryption(password.encode()),
        )
    )
    keystore.chmod(0o600)
    return Certificates(ca_pem, keystore, password)


class SecureEmbeddedBroker(EmbeddedBroker):
    """An EmbeddedBroker that also listens with SASL_SSL (SCRAM) on ``secure_port``."""

    def __init__(
        self,
        certificates: Certificates,
        users: dict[str, str],
        *,
        mechanism: str = SCRAM_MECHANISM,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not users:
            raise ValueError("a SASL_SSL listener needs at least one SCRAM user")
        self.certificates = certificates
        self.users = dict(users)
        self.mechanism = mechanism
        self.secure_port: int | None = None

    @property
    def secure_bootstrap(self) -> str:
        if self.secure_port is None:
            raise RuntimeError("the broker has no SASL_SSL port yet: call start() first")
        return f"{HOST}:{self.secure_port}"

    def start(self, timeout: float = 120.0) -> None:
        if self.secure_port is None:
            self.secure_port = free_port()
        super().start(timeout)

    def properties(self) -> dict[str, str]:
        props = super().properties()
        secure = f"SASL_SSL://{HOST}:{self.secure_port}"
        props["listeners"] = f"{props['listeners']},{secure}"
        props["advertised.listeners"] = f"{props['advertised.listeners']},{secure}"
        prefix = f"listener.name.sasl_ssl.{self.mechanism.lower()}"
        props.update(
            {
                "sasl.enabled.mechanisms": self.mechanism,
                f"{prefix}.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
                "ssl.keystore.type": "PKCS12",
                "ssl.keystore.location": str(self.certificates.keystore),
                "ssl.keystore.password": self.certificates.keystore_password,
                "ssl.key.password": self.certificates.keystore_password,
                "ssl.client.auth": "none",
            }
        )
        return props

    def _command(
        self, main: str, *args: str, dump_cds: bool = False, gc_log: bool = False
    ) -> list[str]:
        if main == "kafka.tools.StorageTool" and args[:1] == ("format",):
            for name, password in self.users.items():
                args = (*args, "--add-scram", f"{self.mechanism}=[name={name},password={password}]")
        return super()._command(main, *args, dump_cds=dump_cds, gc_log=gc_log)
