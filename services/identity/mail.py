"""Outgoing mail: templates, senders (SMTP, or the log in development) and the consumers that send them.

Interface (used by the identity service's settings, service and main):

  Settings (IdentitySettings; `TESSERA_` prefix):
    smtp_url: SecretStr | None   TESSERA_SMTP_URL, `smtp://user:pass@host:587?starttls=1` (STARTTLS),
                                 `smtps://user:pass@host:465` (implicit TLS) or `smtp://host:25`; user and
                                 password percent-encoded. Validated with `parse_smtp_url` (ValueError).
                                 Unset: mails go to the log (LogMailSender) -- refused in production,
                                 where the log would hold single-use tokens.
    mail_from: str               TESSERA_MAIL_FROM, e.g. `Tessera <no-reply@example.com>`.
    public_base_url: str         TESSERA_PUBLIC_BASE_URL (exists): links are `{base}/verify-email?token=..`,
                                 `{base}/reset-password?token=..`, `{base}/accept-invitation?token=..`.

  main.py:
    sender = mail_sender(smtp_url, mail_from=settings.mail_from)        # SmtpMailSender or LogMailSender
    background += [EventConsumer(mail_requested_consumer(sender, base_url=settings.public_base_url), db, broker),
                   EventConsumer(invitation_mail_consumer(sender, base_url=settings.public_base_url), db, broker)]

  service.py (in the unit of work that creates the token, so the mail is requested iff the token exists):
    uow.emit(MailRequestedEvent(to=email, template=VERIFY_EMAIL, params={"token": token, "display_name": name}),
             subject=f"users/{user_id}", tenant_id=str(USER_LEVEL_TENANT))
    Templates and their params: `verify_email` and `reset_password` (token; display_name and
    expire_time optional); `invitation` (token, workspace_display_name, role; expire_time optional).
    expire_time is ISO 8601 (`datetime.isoformat()`), shown as `2030-01-02 03:04 UTC`. A `link`
    param, if given, is used as is instead of building one from the token.

Delivery: each consumer handles an event in one unit of work with its inbox row, so a redelivered event
sends nothing more once its mail went out and the transaction committed. An SMTP failure raises
`MailDeliveryError`: the kit consumer rolls back, retries with backoff and finally dead-letters the
event (`tessera events dlq replay` sends it later). The one gap is inherent to SMTP: a crash between
the server accepting the mail and the commit sends it again; its Message-ID (from the event id) lets
mail systems recognise the duplicate.
"""

from __future__ import annotations

import html
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Protocol
from urllib.parse import unquote, urlencode, urlsplit

import aiosmtplib
import structlog

from services.kit.consumer import ConsumerSpec
from services.kit.db import UnitOfWork
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.identity.v1.identity_events_pb2 import MailRequestedEvent
from tessera.tenancy.v1.tenancy_events_pb2 import InvitationCreatedEvent

VERIFY_EMAIL = "verify_email"
RESET_PASSWORD = "reset_password"  # noqa: S105  # a template name, not a secret
INVITATION = "invitation"
TEMPLATES = (VERIFY_EMAIL, RESET_PASSWORD, INVITATION)
LINK_PATHS: Mapping[str, str] = {
    VERIFY_EMAIL: "/verify-email",
    RESET_PASSWORD: "/reset-password",
    INVITATION: "/accept-invitation",
}

MAIL_REQUESTED_CONSUMER = "identity-mailer"
INVITATION_MAIL_CONSUMER = "identity-invitation-mailer"
# Mail retries are slow on purpose: an SMTP outage lasts minutes, not milliseconds.
MAIL_BACKOFF: Sequence[float] = (5.0, 30.0, 120.0, 600.0)
MAIL_MAX_DELIVER = 8
MESSAGE_ID_DOMAIN = "mail.tessera"

log = structlog.get_logger("tessera.identity.mail")


class MailTemplateError(ValueError):
    """A mail request names an unknown template or lacks a parameter the template needs."""


class MailDeliveryError(RuntimeError):
    """The SMTP server could not be reached or refused the mail; the consumer retries, then dead-letters."""


@dataclass(frozen=True)
class Mail:
    """One rendered mail: recipient, subject, plain-text and HTML bodies."""

    to: str
    subject: str
    text: str
    html: str
    message_id: str | None = None

    def to_message(self, sender: str) -> EmailMessage:
        """The MIME message (multipart/alternative) as sent over SMTP."""
        message = EmailMessage()
        message["From"] = sender
        message["To"] = self.to
        message["Subject"] = self.subject
        message["Date"] = format_datetime(_now())
        message["Message-ID"] = self.message_id or make_msgid(domain=MESSAGE_ID_DOMAIN)
        message.set_content(self.text)
        message.add_alternative(self.html, subtype="html")
        return message


class MailSender(Protocol):
    """Delivers rendered mails; raises MailDeliveryError when it cannot."""

    async def send(self, mail: Mail) -> None: ...


@dataclass(frozen=True)
class SmtpEndpoint:
    """An SMTP server as configured by TESSERA_SMTP_URL."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    use_tls: bool = False


def parse_smtp_url(url: str) -> SmtpEndpoint:
    """Parse `smtp[s]://[user:pass@]host[:port][?starttls=1]`; ValueError describing what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError("must be an smtp:// or smtps:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    query: dict[str, str] = {}
    for pair in filter(None, parts.query.split("&")):
        key, _, value = pair.partition("=")
        query[key] = value
    unknown = set(query) - {"starttls"}
    if unknown:
        raise ValueError(f"has unknown parameters: {', '.join(sorted(unknown))}")
    flag = query.get("starttls", "0").lower()
    if flag not in ("0", "1", "true", "false"):
        raise ValueError("starttls must be 1 or 0")
    starttls = flag in ("1", "true")
    use_tls = parts.scheme == "smtps"
    if use_tls and starttls:
        raise ValueError("smtps:// already uses TLS; starttls applies to smtp:// only")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if (username is None) != (password is None):
        raise ValueError("needs both a user and a password, or neither")
    return SmtpEndpoint(
        host=parts.hostname,
        port=port or (465 if use_tls else 587 if starttls else 25),
        username=username,
        password=password,
        starttls=starttls,
        use_tls=use_tls,
    )


class SmtpMailSender:
    """Sends through an SMTP server with aiosmtplib (one connection per mail)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        use_tls: bool = False,
        sender: str,
        timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.starttls = starttls
        self.use_tls = use_tls
        self.sender = sender
        self.timeout = timeout
        self._tls_context = tls_context

    @classmethod
    def from_url(
        cls, url: str, *, sender: str, timeout: float = 30.0, tls_context: ssl.SSLContext | None = None
    ) -> SmtpMailSender:
        """A sender for TESSERA_SMTP_URL (see parse_smtp_url)."""
        endpoint = parse_smtp_url(url)
        return cls(
            endpoint.host,
            endpoint.port,
            username=endpoint.username,
            password=endpoint.password,
            starttls=endpoint.starttls,
            use_tls=endpoint.use_tls,
            sender=sender,
            timeout=timeout,
            tls_context=tls_context,
        )

    async def send(self, mail: Mail) -> None:
        """Deliver one mail; MailDeliveryError if the server is unreachable or refuses it."""
        try:
            await aiosmtplib.send(
                mail.to_message(self.sender),
                hostname=self.host,
                port=self.port,
                username=self.username,
                password=self._password,
                start_tls=self.starttls,
                use_tls=self.use_tls,
                timeout=self.timeout,
                tls_context=self._tls_context,
            )
        except (aiosmtplib.SMTPException, OSError) as error:
            # The recipient stays out of the message: it ends up in dead-letter headers and logs.
            raise MailDeliveryError(
                f"SMTP delivery via {self.host}:{self.port} failed: {type(error).__name__}: {error}"
            ) from error
        log.info("mail sent", subject=mail.subject, message_id=mail.message_id)


class LogMailSender:
    """Development only: writes mails (with their links) to the log instead of sending them."""

    async def send(self, mail: Mail) -> None:
        """Log the mail."""
        log.warning("mail not sent (no TESSERA_SMTP_URL): logged instead", to=mail.to, subject=mail.subject)
        log.info("mail body", to=mail.to, text=mail.text)


def mail_sender(smtp_url: str | None, *, mail_from: str) -> MailSender:
    """SmtpMailSender for a configured TESSERA_SMTP_URL, else LogMailSender (refuse that in production)."""
    if smtp_url:
        return SmtpMailSender.from_url(smtp_url, sender=mail_from)
    return LogMailSender()


def action_link(base_url: str, template: str, token: str) -> str:
    """The link a template's mail carries: `{base}{path}?token=...`."""
    try:
        path = LINK_PATHS[template]
    except KeyError:
        raise MailTemplateError(f"template {template!r} has no link") from None
    return f"{base_url.rstrip('/')}{path}?{urlencode({'token': token})}"


def message_id_for(event_id: str) -> str:
    """A Message-ID derived from the event id: a resent mail of the same event carries the same one."""
    return f"<{event_id}@{MESSAGE_ID_DOMAIN}>"


def render_mail(
    template: str, *, to: str, params: Mapping[str, str], base_url: str, message_id: str | None = None
) -> Mail:
    """Render one of TEMPLATES for a recipient; MailTemplateError for an unknown template or missing params."""
    if template not in TEMPLATES:
        raise MailTemplateError(f"unknown mail template {template!r}")
    if not to or "@" not in to or any(char in to for char in "\r\n"):
        raise MailTemplateError("the recipient is not a mail address")
    link = params.get("link") or ""
    if not link:
        token = params.get("token") or ""
        if not token:
            raise MailTemplateError(f"template {template!r} needs a `token` (or `link`) parameter")
        link = action_link(base_url, template, token)
    greeting = f"Hello {_one_line(params['display_name'])}," if params.get("display_name") else "Hello,"
    expiry = [f"The link expires on {_when(params['expire_time'])}."] if params.get("expire_time") else []
    if template == VERIFY_EMAIL:
        return _compose(
            to=to,
            subject="Verify your email address for Tessera",
            greeting=greeting,
            lines=["Please confirm that this is your email address by opening the link below.", *expiry],
            action="Verify email address",
            link=link,
            footer="If you did not sign up for Tessera, you can ignore this mail.",
            message_id=message_id,
        )
    if template == RESET_PASSWORD:
        return _compose(
            to=to,
            subject="Reset your Tessera password",
            greeting=greeting,
            lines=["Someone asked to reset the password of your Tessera account. The link works once.", *expiry],
            action="Choose a new password",
            link=link,
            footer="If you did not ask for this, ignore this mail: your password stays as it is.",
            message_id=message_id,
        )
    workspace = _one_line(params.get("workspace_display_name") or "a workspace")
    invited = f"You have been invited to join {workspace} on Tessera"
    if params.get("role"):
        invited += f" as {_one_line(params['role'])}"
    lines = [f"{invited}."]
    if params.get("expire_time"):
        lines.append(f"The invitation expires on {_when(params['expire_time'])}.")
    return _compose(
        to=to,
        subject=f"You are invited to join {workspace} on Tessera",
        greeting="Hello,",
        lines=lines,
        action="Accept the invitation",
        link=link,
        footer="If you do not know this workspace, you can ignore this mail.",
        message_id=message_id,
    )


def mail_requested_consumer(
    sender: MailSender,
    *,
    base_url: str,
    name: str = MAIL_REQUESTED_CONSUMER,
    max_deliver: int = MAIL_MAX_DELIVER,
    backoff: Sequence[float] = MAIL_BACKOFF,
) -> ConsumerSpec[MailRequestedEvent]:
    """The durable consumer of `tessera.identity.mail_requested` that renders and sends each mail once."""

    async def handle(uow: UnitOfWork, envelope: EventEnvelope, event: MailRequestedEvent) -> None:
        mail = render_mail(
            event.template,
            to=event.to,
            params=dict(event.params),
            base_url=base_url,
            message_id=message_id_for(envelope.id),
        )
        await sender.send(mail)

    return ConsumerSpec(
        name, "identity", MailRequestedEvent, handle, max_deliver=max_deliver, backoff=backoff, max_in_flight=4
    )


def invitation_mail_consumer(
    sender: MailSender,
    *,
    base_url: str,
    name: str = INVITATION_MAIL_CONSUMER,
    max_deliver: int = MAIL_MAX_DELIVER,
    backoff: Sequence[float] = MAIL_BACKOFF,
) -> ConsumerSpec[InvitationCreatedEvent]:
    """The durable consumer of `tessera.tenancy.invitation_created` that mails the invitee its link."""

    async def handle(uow: UnitOfWork, envelope: EventEnvelope, event: InvitationCreatedEvent) -> None:
        invitation = event.invitation
        params = {
            "token": event.token,
            "workspace_display_name": event.workspace_display_name,
            "role": invitation.role,
        }
        if invitation.HasField("expire_time"):
            params["expire_time"] = invitation.expire_time.ToDatetime(tzinfo=UTC).isoformat()
        mail = render_mail(
            INVITATION,
            to=invitation.email,
            params=params,
            base_url=base_url,
            message_id=message_id_for(envelope.id),
        )
        await sender.send(mail)

    return ConsumerSpec(
        name, "tenancy", InvitationCreatedEvent, handle, max_deliver=max_deliver, backoff=backoff, max_in_flight=4
    )


def _compose(
    *,
    to: str,
    subject: str,
    greeting: str,
    lines: Sequence[str],
    action: str,
    link: str,
    footer: str,
    message_id: str | None,
) -> Mail:
    text = "\n\n".join([greeting, *lines, f"{action}: {link}", footer, "-- Tessera"]) + "\n"
    paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    body = (
        "<!doctype html>\n"
        '<html><body style="font-family: sans-serif; line-height: 1.5">'
        f"<p>{html.escape(greeting)}</p>{paragraphs}"
        f'<p><a href="{html.escape(link, quote=True)}">{html.escape(action)}</a></p>'
        f'<p style="color: #666">{html.escape(footer)}</p>'
        "<p>&mdash; Tessera</p></body></html>\n"
    )
    return Mail(to=to, subject=_one_line(subject), text=text, html=body, message_id=message_id)


def _one_line(value: str) -> str:
    """Collapse whitespace (no line breaks can reach a header from user-chosen names)."""
    return " ".join(value.split())[:200]


def _when(value: str) -> str:
    """An ISO 8601 time as `2030-01-02 03:04 UTC` (other text as given, on one line)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return _one_line(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _now() -> datetime:
    return datetime.now(UTC)
