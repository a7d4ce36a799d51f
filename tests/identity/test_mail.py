"""Mail templates and senders against a real SMTP server (aiosmtpd on loopback): gate S02 (auth mails)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from services.identity.mail import (
    INVITATION,
    RESET_PASSWORD,
    VERIFY_EMAIL,
    LogMailSender,
    MailDeliveryError,
    MailTemplateError,
    SmtpEndpoint,
    SmtpMailSender,
    action_link,
    mail_sender,
    message_id_for,
    parse_smtp_url,
    render_mail,
)
from tessera_cli.embedded import free_port
from tests.identity.mail_server import SmtpServer, running_smtp_server, self_signed_tls

pytestmark = pytest.mark.gate("S02")

BASE_URL = "https://app.tessera.test"
MAIL_FROM = "Tessera <no-reply@tessera.test>"


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    with running_smtp_server() as server:
        yield server


def recipient() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.com"


def sender_for(server: SmtpServer, **kwargs: object) -> SmtpMailSender:
    return SmtpMailSender(server.host, server.port, sender=MAIL_FROM, timeout=5, **kwargs)  # type: ignore[arg-type]


class TestTemplates:
    @pytest.mark.parametrize(
        ("template", "path", "subject"),
        [
            (VERIFY_EMAIL, "/verify-email", "Verify your email address for Tessera"),
            (RESET_PASSWORD, "/reset-password", "Reset your Tessera password"),
        ],
    )
    async def test_account_mails_are_delivered_with_their_link(
        self, smtp: SmtpServer, template: str, path: str, subject: str
    ) -> None:
        to = recipient()
        token = "tok_" + uuid.uuid4().hex + "+/="
        mail = render_mail(
            template,
            to=to,
            params={"token": token, "display_name": "Ada <Lovelace>", "expire_time": "2030-01-02T04:04:00+01:00"},
            base_url=BASE_URL + "/",
            message_id=message_id_for("0190c0de-0000-7000-8000-000000000001"),
        )

        await sender_for(smtp).send(mail)

        [received] = smtp.to(to)
        link = f"{BASE_URL}{path}?token=tok_{token[4:36]}%2B%2F%3D"
        assert received.rcpt_tos == (to,)
        assert received.message["To"] == to
        assert received.message["From"] == MAIL_FROM
        assert received.message["Message-ID"] == "<0190c0de-0000-7000-8000-000000000001@mail.tessera>"
        assert received.subject == subject
        assert link in received.text
        assert "Hello Ada <Lovelace>," in received.text
        assert "The link expires on 2030-01-02 03:04 UTC." in received.text
        assert f'href="{link}"' in received.html
        assert "Ada &lt;Lovelace&gt;" in received.html  # names are escaped in HTML
        assert "<Lovelace>" not in received.html

    async def test_invitation_mail_names_the_workspace_and_role(self, smtp: SmtpServer) -> None:
        to = recipient()
        mail = render_mail(
            INVITATION,
            to=to,
            params={
                "token": "inv_abc",
                "workspace_display_name": "Acme\r\nBcc: attacker@example.com",
                "role": "admin",
                "expire_time": "2030-01-02 03:04 UTC",
            },
            base_url=BASE_URL,
        )

        await sender_for(smtp).send(mail)

        [received] = smtp.to(to)
        assert received.rcpt_tos == (to,)
        assert received.subject == "You are invited to join Acme Bcc: attacker@example.com on Tessera"
        assert received.message["Bcc"] is None
        assert f"{BASE_URL}/accept-invitation?token=inv_abc" in received.text
        assert "as admin" in received.text
        assert "2030-01-02 03:04 UTC" in received.text
        assert not smtp.to("attacker@example.com")

    def test_a_given_link_is_used_as_is(self) -> None:
        mail = render_mail(VERIFY_EMAIL, to="a@example.com", params={"link": "https://x.test/v?t=1"}, base_url=BASE_URL)
        assert "https://x.test/v?t=1" in mail.text

    @pytest.mark.parametrize(
        ("template", "to", "params"),
        [
            ("welcome", "a@example.com", {"token": "t"}),
            (VERIFY_EMAIL, "a@example.com", {}),
            (RESET_PASSWORD, "not-an-address", {"token": "t"}),
            (INVITATION, "a@example.com\r\nBcc: b@example.com", {"token": "t"}),
        ],
    )
    def test_bad_requests_are_refused(self, template: str, to: str, params: dict[str, str]) -> None:
        with pytest.raises(MailTemplateError):
            render_mail(template, to=to, params=params, base_url=BASE_URL)

    def test_action_link(self) -> None:
        assert (
            action_link("https://a.test/app/", RESET_PASSWORD, "t 1") == "https://a.test/app/reset-password?token=t+1"
        )


class TestSmtpSender:
    async def test_unreachable_server_raises_a_delivery_error(self) -> None:
        sender = SmtpMailSender("127.0.0.1", free_port(), sender=MAIL_FROM, timeout=5)
        mail = render_mail(VERIFY_EMAIL, to="a@example.com", params={"token": "t"}, base_url=BASE_URL)
        with pytest.raises(MailDeliveryError) as info:
            await sender.send(mail)
        assert "a@example.com" not in str(info.value)

    @pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
    async def test_authenticated_delivery(self) -> None:
        to = recipient()
        mail = render_mail(VERIFY_EMAIL, to=to, params={"token": "t"}, base_url=BASE_URL)
        with running_smtp_server(credentials=("mailer", "s3cret:/@")) as server:
            url = f"smtp://mailer:s3cret%3A%2F%40@{server.host}:{server.port}"
            await SmtpMailSender.from_url(url, sender=MAIL_FROM).send(mail)
            with pytest.raises(MailDeliveryError):
                await sender_for(server, username="mailer", password="wrong").send(mail)
            assert len(server.to(to)) == 1

    async def test_starttls_delivery(self, tmp_path: Path) -> None:
        tls = self_signed_tls(tmp_path)
        to = recipient()
        mail = render_mail(RESET_PASSWORD, to=to, params={"token": "t"}, base_url=BASE_URL)
        with running_smtp_server(credentials=("mailer", "pw"), tls=tls) as server:
            url = f"smtp://mailer:pw@{server.host}:{server.port}?starttls=1"
            await SmtpMailSender.from_url(url, sender=MAIL_FROM, tls_context=tls.client_context()).send(mail)
            with pytest.raises(MailDeliveryError):  # the server requires STARTTLS
                await sender_for(server, username="mailer", password="pw").send(mail)
            assert len(server.to(to)) == 1

    async def test_log_sender_in_development(self) -> None:
        mail = render_mail(VERIFY_EMAIL, to="dev@example.com", params={"token": "devtoken"}, base_url=BASE_URL)
        with structlog.testing.capture_logs() as logs:
            await LogMailSender().send(mail)
        assert any("devtoken" in str(entry.get("text", "")) for entry in logs)

    def test_mail_sender_from_settings(self) -> None:
        assert isinstance(mail_sender(None, mail_from=MAIL_FROM), LogMailSender)
        smtp = mail_sender("smtps://u:p@mail.example.com", mail_from=MAIL_FROM)
        assert isinstance(smtp, SmtpMailSender)
        assert (smtp.host, smtp.port, smtp.use_tls, smtp.starttls) == ("mail.example.com", 465, True, False)


class TestSmtpUrl:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("smtp://mail.example.com", SmtpEndpoint("mail.example.com", 25)),
            (
                "smtp://u%40x:p%2Fw@mail.example.com:2525?starttls=1",
                SmtpEndpoint("mail.example.com", 2525, "u@x", "p/w", starttls=True),
            ),
            ("smtp://mail.example.com?starttls=true", SmtpEndpoint("mail.example.com", 587, starttls=True)),
            ("smtps://u:p@mail.example.com", SmtpEndpoint("mail.example.com", 465, "u", "p", use_tls=True)),
        ],
    )
    def test_valid_urls(self, url: str, expected: SmtpEndpoint) -> None:
        assert parse_smtp_url(url) == expected

    @pytest.mark.parametrize(
        "url",
        [
            "http://mail.example.com",
            "smtp://",
            "smtp://mail.example.com:99999",
            "smtp://mail.example.com?tls=1",
            "smtp://mail.example.com?starttls=maybe",
            "smtps://mail.example.com?starttls=1",
            "smtp://user@mail.example.com",
        ],
    )
    def test_invalid_urls(self, url: str) -> None:
        with pytest.raises(ValueError, match=r"."):
            parse_smtp_url(url)
