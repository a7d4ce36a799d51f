"""A real SMTP server on loopback for the mail tests: aiosmtpd's Controller, keeping what it receives.

`running_smtp_server(port=..., ...)` starts it (in its own thread, as aiosmtpd does) and stops it on
exit; `.received` holds every accepted mail, parsed, with the SMTP envelope's sender and recipients.
Optional: `credentials=(user, password)` requires AUTH; `tls=TlsFiles` offers (and requires) STARTTLS.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.policy
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera_cli.embedded import free_port


@dataclass(frozen=True)
class ReceivedMail:
    """One mail the server accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def text(self) -> str:
        part = self.message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())

    @property
    def html(self) -> str:
        part = self.message.get_body(("html",))
        assert part is not None
        return str(part.get_content())


@dataclass
class CapturingHandler:
    """aiosmtpd handler that keeps every accepted mail."""

    received: list[ReceivedMail] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.received.append(ReceivedMail(envelope.mail_from, tuple(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


@dataclass(frozen=True)
class SmtpServer:
    host: str
    port: int
    handler: CapturingHandler

    @property
    def received(self) -> list[ReceivedMail]:
        return self.handler.received

    def to(self, address: str) -> list[ReceivedMail]:
        """Mails whose envelope names this recipient."""
        return [mail for mail in self.received if address in mail.rcpt_tos]


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1 and the client context that trusts it."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def self_signed_tls(directory: Path) -> TlsFiles:
    """Write a self-signed certificate for 127.0.0.1 (valid for a day) into directory."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtp.crt", directory / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TlsFiles(cert=cert_path, key=key_path)


class _Authenticator:
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user.encode(), password.encode()

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            self.user,
            self.password,
        )
        return AuthResult(success=ok, handled=False)


@contextlib.contextmanager
def running_smtp_server(
    *, port: int | None = None, credentials: tuple[str, str] | None = None, tls: TlsFiles | None = None
) -> Iterator[SmtpServer]:
    """Start a capturing SMTP server on 127.0.0.1 (a free port unless given)."""
    handler = CapturingHandler()
    kwargs: dict[str, Any] = {}
    if credentials is not None:
        kwargs |= {"authenticator": _Authenticator(*credentials), "auth_required": True}
        kwargs["auth_require_tls"] = tls is not None
    if tls is not None:
        kwargs |= {"tls_context": tls.server_context(), "require_starttls": True}
    controller = Controller(handler, hostname="127.0.0.1", port=port or free_port(), **kwargs)
    controller.start()
    try:
        yield SmtpServer(host="127.0.0.1", port=controller.port, handler=handler)
    finally:
        controller.stop()
