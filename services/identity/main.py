"""Entry point of the identity service: `python -m services.identity.main`."""

from __future__ import annotations

from datetime import timedelta

from services.identity.housekeeping import Housekeeper
from services.identity.keys import KeyRing
from services.identity.mail import invitation_mail_consumer, mail_requested_consumer, mail_sender
from services.identity.memberships import TenancyMemberships
from services.identity.models import SCHEMA, SERVICE
from services.identity.oidc import OidcClient
from services.identity.passwords import PasswordHasher
from services.identity.ratelimit import RateLimiter, parse_networks
from services.identity.service import IdentityPolicy, IdentityService
from services.identity.servicer import IdentityServicer, binding
from services.identity.settings import IdentitySettings
from services.kit.broker import Broker
from services.kit.consumer import EventConsumer
from services.kit.db import Database
from services.kit.relay import OutboxRelay
from services.kit.revocation import RevocationList
from services.kit.server import ServiceRuntime, run_service
from services.kit.tokens import TokenVerifier


def policy_from(settings: IdentitySettings) -> IdentityPolicy:
    """The lifetimes and limits the service enforces, from the settings."""
    return IdentityPolicy(
        access_token_ttl=settings.access_token_ttl,
        refresh_token_ttl=settings.refresh_token_ttl,
        session_max=settings.session_max,
        refresh_grace=timedelta(seconds=settings.refresh_grace_seconds),
        email_verification_ttl=timedelta(seconds=settings.email_verification_ttl_seconds),
        password_reset_ttl=timedelta(seconds=settings.password_reset_ttl_seconds),
        oidc_login_ttl=timedelta(seconds=settings.oidc_login_ttl_seconds),
        public_base_url=settings.public_base_url,
        sign_in_per_account=settings.sign_in_limit_per_account,
        sign_in_per_address=settings.sign_in_limit_per_address,
        refresh_per_session=settings.refresh_limit_per_session,
        refresh_per_address=settings.refresh_limit_per_address,
        sign_up_per_address=settings.sign_up_limit_per_address,
        mail_per_account=settings.mail_limit_per_account,
        api_key_exchange_per_address=settings.api_key_exchange_limit_per_address,
    )


class _ClosingOidcClients:
    """Closes the OIDC clients' HTTP connections at shutdown (a BackgroundService with nothing to start)."""

    def __init__(self, clients: list[OidcClient]) -> None:
        self.clients = clients

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Close every client."""
        for client in self.clients:
            await client.aclose()


async def build(settings: IdentitySettings) -> ServiceRuntime:
    """Wire database, keys, broker, relay, mail consumers and servicer into one runtime (not started).

    The identity process verifies access tokens with its own keys (read from its database), so it does
    not need TESSERA_IDENTITY_ADDRESS; it applies its own revocations to its revocation list at once.
    """
    database = Database(settings.database_url, service=SERVICE, schema=SCHEMA, pool_size=settings.db_pool_size)
    broker = Broker(settings.nats_url, name=f"tessera-{SERVICE}")
    keys = KeyRing(
        database,
        overlap=settings.signing_key_overlap,
        cache_seconds=settings.signing_key_cache_seconds,
        issuer=settings.token_issuer,
        audience=settings.token_audience,
    )
    oidc_clients = {provider: OidcClient(config) for provider, config in settings.oidc_providers.items()}
    try:
        await keys.start()  # the first start creates the first signing key
        await broker.connect()
        await broker.ensure_streams(SERVICE)
    except BaseException:
        await broker.close()
        await database.dispose()
        for client in oidc_clients.values():
            await client.aclose()
        raise
    revocations = RevocationList(broker)
    service = IdentityService(
        keys=keys,
        hasher=PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_kib=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
        ),
        limiter=RateLimiter(window=timedelta(seconds=settings.rate_limit_window_seconds)),
        policy=policy_from(settings),
        memberships=TenancyMemberships(settings.tenancy_address) if settings.tenancy_address else None,
        revocations=revocations,
        oidc_clients=oidc_clients,
    )
    sender = mail_sender(
        settings.smtp_url.get_secret_value() if settings.smtp_url else None, mail_from=settings.mail_from
    )
    servicer = IdentityServicer(database, service, trusted_proxies=parse_networks(settings.trusted_proxies))
    return ServiceRuntime(
        name=SERVICE,
        settings=settings,
        bindings=[binding(servicer)],
        database=database,
        background=[
            broker,  # first: it closes after the relay has flushed and the consumers drained
            OutboxRelay(database, broker, poll_seconds=settings.outbox_poll_seconds),
            EventConsumer(mail_requested_consumer(sender, base_url=settings.public_base_url), database, broker),
            EventConsumer(invitation_mail_consumer(sender, base_url=settings.public_base_url), database, broker),
            Housekeeper(
                database,
                service,
                interval_seconds=settings.housekeeping_interval_seconds,
                key_overlap=settings.signing_key_overlap,
            ),
            _ClosingOidcClients(list(oidc_clients.values())),
        ],
        verifier=TokenVerifier(keys, issuer=settings.token_issuer, audience=settings.token_audience),
        revocations=revocations,
    )


def main() -> None:
    """Run the identity service until SIGTERM/SIGINT."""
    run_service(build, IdentitySettings)


if __name__ == "__main__":
    main()
