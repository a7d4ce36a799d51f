"""Which verified access tokens no longer count: ended sessions, revoked API keys, changed memberships.

Every service process keeps the list in memory, fed by ephemeral ordered JetStream consumers that start
`max_token_lifetime` in the past (an older event can only concern tokens that have expired anyway):

- `tessera.identity.sessions_revoked` (SessionsRevokedEvent): every token of those sessions;
- `tessera.identity.api_key_revoked` (ApiKeyRevokedEvent): every token exchanged for the key (its id
  is the token's `sid`);
- `tessera.tenancy.membership_changed` (MembershipChangedEvent): workspace tokens of that user and
  workspace issued at or before the change (a role change or removal takes effect at once; the user
  exchanges the session for a new workspace token);
- `tessera.tenancy.workspace_deleted` (WorkspaceDeletedEvent): every workspace token of that workspace
  issued at or before the deletion (an owner restoring it within its window gets a new token).

Entries are dropped once every token they could concern has expired. `start()` returns after the
backlog of the window has been read; until then `revoked_reason` fails closed (UNAVAILABLE).
Propagation from another process is asynchronous (milliseconds); the identity process applies its own
revocations at once with `revoke_session` / `revoke_api_key`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import structlog
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from services.kit.broker import Broker
from services.kit.errors import Unavailable
from services.kit.events import stream_name, subject_for
from services.kit.tokens import MAX_TOKEN_LIFETIME, AccessClaims
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.identity.v1.identity_events_pb2 import ApiKeyRevokedEvent, SessionsRevokedEvent
from tessera.tenancy.v1.tenancy_events_pb2 import MembershipChangedEvent, WorkspaceDeletedEvent

SESSION_REVOKED = "session revoked"
MEMBERSHIP_CHANGED = "membership changed"
WORKSPACE_DELETED = "workspace deleted"

_PRUNE_INTERVAL_SECONDS = 30.0

_log = structlog.get_logger("tessera.revocation")


def _time_of(message: Message, field: str, envelope: EventEnvelope) -> datetime:
    """A Timestamp field of the event, or when the event occurred if the field is unset."""
    stamp = getattr(message, field) if message.HasField(field) else envelope.occurred_at
    moment: datetime = stamp.ToDatetime(tzinfo=UTC)
    return moment


def _canonical(value: str) -> str:
    """UUIDs in their canonical form (token claims are canonical); anything else as it is."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value


def _last_segment(name: str, collection: str) -> tuple[str, str] | None:
    """(`workspaces/{ws}/<collection>/{id}`) -> (ws, id), or None for another shape."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "workspaces" or parts[2] != collection or not parts[1] or not parts[3]:
        return None
    return parts[1], parts[3]


class RevocationList:
    """The in-memory revocation list of one process (a BackgroundService); `broker=None` keeps it local only."""

    def __init__(
        self,
        broker: Broker | None,
        *,
        max_token_lifetime: timedelta = MAX_TOKEN_LIFETIME,
        leeway: timedelta = timedelta(seconds=30),
        catch_up_timeout: float = 30.0,
    ) -> None:
        self.broker = broker
        self.max_token_lifetime = max_token_lifetime
        self.leeway = leeway
        self.catch_up_timeout = catch_up_timeout
        self._sessions: dict[str, datetime] = {}  # sid -> when its entry may go
        self._memberships: dict[tuple[str, str], datetime] = {}  # (user, workspace) -> latest change time
        self._deleted_workspaces: dict[str, datetime] = {}  # workspace -> latest deletion time
        self._subscriptions: list[JetStreamContext.PushSubscription] = []
        self._ready = broker is None
        self._last_prune = time.monotonic()
        self.events_applied = 0

    @property
    def ready(self) -> bool:
        """Whether the backlog has been read (always true for a local-only list)."""
        return self._ready

    # -- the per-call check ---------------------------------------------------------------------

    def revoked_reason(self, claims: AccessClaims) -> str | None:
        """Why a verified token no longer counts ("session revoked", "membership changed"), or None."""
        if not self._ready:
            raise Unavailable("the revocation list is still loading")
        if claims.session_id in self._sessions:
            return SESSION_REVOKED
        if claims.workspace_id is not None and self._memberships:
            changed = self._memberships.get((claims.subject, claims.workspace_id))
            if changed is not None and changed >= claims.issued_at:
                return MEMBERSHIP_CHANGED
        if claims.workspace_id is not None and self._deleted_workspaces:
            deleted = self._deleted_workspaces.get(claims.workspace_id)
            if deleted is not None and deleted >= claims.issued_at:
                return WORKSPACE_DELETED
        return None

    # -- applying revocations -------------------------------------------------------------------

    def revoke_session(self, session_id: str, *, at: datetime | None = None) -> None:
        """Reject every token of a session (or of an API key: its id is the tokens' sid)."""
        session_id = _canonical(session_id)
        at = at or datetime.now(UTC)
        until = at + self.max_token_lifetime + self.leeway
        if self._sessions.get(session_id, until) <= until:
            self._sessions[session_id] = until
        self._maybe_prune()

    def revoke_api_key(self, api_key_id: str, *, at: datetime | None = None) -> None:
        """Reject every token exchanged for an API key."""
        self.revoke_session(api_key_id, at=at)

    def membership_changed(self, user_id: str, workspace_id: str, *, at: datetime) -> None:
        """Reject workspace tokens of the user in that workspace issued at or before `at`."""
        key = (_canonical(user_id), _canonical(workspace_id))
        previous = self._memberships.get(key)
        if previous is None or at > previous:
            self._memberships[key] = at
        self._maybe_prune()

    def workspace_deleted(self, workspace_id: str, *, at: datetime) -> None:
        """Reject every workspace token of that workspace issued at or before `at`."""
        key = _canonical(workspace_id)
        previous = self._deleted_workspaces.get(key)
        if previous is None or at > previous:
            self._deleted_workspaces[key] = at
        self._maybe_prune()

    def prune(self, *, now: datetime | None = None) -> None:
        """Drop the entries every token they could concern has outlived."""
        now = now or datetime.now(UTC)
        self._sessions = {sid: until for sid, until in self._sessions.items() if until > now}
        horizon = now - self.max_token_lifetime - self.leeway
        self._memberships = {key: at for key, at in self._memberships.items() if at > horizon}
        self._deleted_workspaces = {key: at for key, at in self._deleted_workspaces.items() if at > horizon}
        self._last_prune = time.monotonic()

    def _maybe_prune(self) -> None:
        if time.monotonic() - self._last_prune >= _PRUNE_INTERVAL_SECONDS:
            self.prune()

    # -- consuming the events -------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the revocation events of the window and return once its backlog is applied."""
        if self.broker is None or self._subscriptions:
            return
        since = datetime.now(UTC) - self.max_token_lifetime - self.leeway
        feeds: tuple[tuple[str, Message, Callable[[EventEnvelope, Msg], None]], ...] = (
            ("identity", SessionsRevokedEvent(), self._on_sessions_revoked),
            ("identity", ApiKeyRevokedEvent(), self._on_api_key_revoked),
            ("tenancy", MembershipChangedEvent(), self._on_membership_changed),
            ("tenancy", WorkspaceDeletedEvent(), self._on_workspace_deleted),
        )
        try:
            waits = []
            for source in sorted({source for source, _, _ in feeds}):
                await self.broker.ensure_streams(source)
            for source, event, apply in feeds:
                waits.append(await self._subscribe(source, subject_for(source, event), apply, since=since))
            await asyncio.wait_for(asyncio.gather(*waits), timeout=self.catch_up_timeout)
        except BaseException:
            await self.stop()
            raise
        self._ready = True
        _log.info("revocation list ready", sessions=len(self._sessions), memberships=len(self._memberships))

    async def stop(self) -> None:
        """Drop the subscriptions (the list stays as it is)."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _subscribe(
        self,
        source: str,
        subject: str,
        apply: Callable[[EventEnvelope, Msg], None],
        *,
        since: datetime,
    ) -> Awaitable[None]:
        """Start an ordered consumer on `subject`; returns an awaitable done once its backlog is applied."""
        assert self.broker is not None
        js = self.broker.js
        stream = stream_name(source)
        caught_up = asyncio.get_running_loop().create_future()
        target = 0
        with contextlib.suppress(NotFoundError):
            last = await js.get_last_msg(stream, subject)
            if last.seq is not None and last.time is not None and last.time >= since:
                target = last.seq
        if target == 0:
            caught_up.set_result(None)

        async def on_message(msg: Msg) -> None:
            envelope = EventEnvelope()
            try:
                envelope.ParseFromString(msg.data)
                apply(envelope, msg)
                self.events_applied += 1
            except (DecodeError, ValueError) as error:
                _log.error("unusable revocation event skipped", subject=msg.subject, error=repr(error))
            if not caught_up.done() and msg.metadata.sequence.stream >= target:
                caught_up.set_result(None)

        subscription = await js.subscribe(
            subject,
            stream=stream,
            cb=on_message,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_TIME,
            config=ConsumerConfig(opt_start_time=since),
        )
        self._subscriptions.append(subscription)
        return caught_up

    def _payload(self, envelope: EventEnvelope, message: Message) -> bool:
        if not envelope.payload.Unpack(message):
            _log.error("revocation event with an unexpected payload", type_url=envelope.payload.type_url)
            return False
        return True

    def _on_sessions_revoked(self, envelope: EventEnvelope, msg: Msg) -> None:
        event = SessionsRevokedEvent()
        if self._payload(envelope, event):
            at = _time_of(event, "revoke_time", envelope)
            for session_id in event.session_ids:
                self.revoke_session(session_id, at=at)

    def _on_api_key_revoked(self, envelope: EventEnvelope, msg: Msg) -> None:
        event = ApiKeyRevokedEvent()
        if self._payload(envelope, event):
            parsed = _last_segment(event.api_key.name, "apiKeys")
            if parsed is None:
                raise ValueError(f"api key name {event.api_key.name!r} is not workspaces/{{ws}}/apiKeys/{{id}}")
            self.revoke_api_key(parsed[1], at=_time_of(event.api_key, "revoke_time", envelope))

    def _on_membership_changed(self, envelope: EventEnvelope, msg: Msg) -> None:
        event = MembershipChangedEvent()
        if self._payload(envelope, event):
            parsed = _last_segment(event.member, "members")
            if parsed is None:
                raise ValueError(f"member name {event.member!r} is not workspaces/{{ws}}/members/{{user}}")
            workspace_id, user_id = parsed
            self.membership_changed(user_id, workspace_id, at=_time_of(event, "change_time", envelope))

    def _on_workspace_deleted(self, envelope: EventEnvelope, msg: Msg) -> None:
        event = WorkspaceDeletedEvent()
        if self._payload(envelope, event):
            parsed = event.workspace.name.split("/")
            if len(parsed) != 2 or parsed[0] != "workspaces":
                raise ValueError(f"workspace name {event.workspace.name!r} is not workspaces/{{ws}}")
            self.workspace_deleted(parsed[1], at=_time_of(event.workspace, "delete_time", envelope))
