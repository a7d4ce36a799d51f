"""Entry point of the workflow service: `python -m services.workflow.main`."""

from __future__ import annotations

from services.kit.broker import Broker
from services.kit.consumer import EventConsumer
from services.kit.db import Database
from services.kit.paging import PageTokenCodec
from services.kit.relay import OutboxRelay
from services.kit.revocation import RevocationList
from services.kit.server import ServiceRuntime, run_service
from services.kit.tokens import TokenVerifier
from services.workflow.consumers import members_consumer
from services.workflow.models import SCHEMA, SERVICE, RenderedItems
from services.workflow.service import WorkflowService
from services.workflow.servicer import WorkflowServicer, binding
from services.workflow.settings import WorkflowSettings

# Workspaces differ in size by orders of magnitude (one with 100,000 items beside many with a hundred).
# asyncpg prepares every statement; after five executions PostgreSQL may switch a prepared statement to
# a generic plan, planned without the tenant and project values. For ListItems that plan walked the whole
# project by create_time (208 ms on the 100,000-item workspace) instead of the board index (0.6 ms).
# Planning each execution for its own values costs well under a millisecond.
SERVER_SETTINGS = {"plan_cache_mode": "force_custom_plan"}


async def build(settings: WorkflowSettings, *, verifier: TokenVerifier | None = None) -> ServiceRuntime:
    """Wire database, broker, relay, members consumer, revocation list and servicer into one runtime (not started).

    With TESSERA_AUTH=enforced, tokens are verified with `verifier` or, by default, against the identity
    service's JWKS (TESSERA_IDENTITY_ADDRESS).
    """
    database = Database(
        settings.database_url,
        service=SERVICE,
        schema=SCHEMA,
        pool_size=settings.db_pool_size,
        server_settings=SERVER_SETTINGS,
    )
    broker = Broker(settings.nats_url, name=f"tessera-{SERVICE}")
    try:
        await broker.connect()
        await broker.ensure_streams(SERVICE)
    except BaseException:
        await broker.close()
        await database.dispose()
        raise
    service = WorkflowService(
        page_tokens=PageTokenCodec(settings.page_token_key()),
        max_items_per_workspace=settings.max_items_per_workspace,
    )
    try:
        return ServiceRuntime(
            name=SERVICE,
            settings=settings,
            bindings=[
                binding(
                    WorkflowServicer(
                        database, service, rendered_items=RenderedItems(settings.rendered_items_cache_size)
                    )
                )
            ],
            database=database,
            background=[
                broker,  # first: it closes after the relay has flushed and the consumer drained
                OutboxRelay(database, broker, poll_seconds=settings.outbox_poll_seconds),
                EventConsumer(members_consumer(service), database, broker),
            ],
            verifier=verifier,
            revocations=RevocationList(broker),
        )
    except BaseException:
        await broker.close()
        await database.dispose()
        raise


def main() -> None:
    """Run the workflow service until SIGTERM/SIGINT."""
    run_service(build, WorkflowSettings)


if __name__ == "__main__":
    main()
