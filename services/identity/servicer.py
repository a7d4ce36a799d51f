"""gRPC transport of IdentityService: protobuf in, domain calls in units of work, protobuf out.

Public RPCs (sign-up, sign-in, refresh, ...) run without a principal; the caller's source address (the
peer, or `x-forwarded-for` from a trusted proxy) feeds the rate limits, which are counted in a short
unit of work of their own before the action. Methods whose failures must persist (audit rows,
revocations) get an `Outcome` from the service, let the unit of work commit, then `settle` it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from services.identity import errors
from services.identity.models import (
    API_KEY_COLLECTION,
    WORKSPACE_NAME_PREFIX,
    api_key_message,
    session_message,
    token_set_message,
    user_message,
)
from services.identity.ratelimit import IpNetwork, source_address
from services.identity.service import IdentityService, api_key_workspace
from services.kit.db import Database
from services.kit.errors import AppError, InvalidArgument
from services.kit.interceptors import current_principal
from services.kit.server import ServicerBinding
from tessera.identity.v1 import identity_pb2, identity_service_pb2, identity_service_pb2_grpc

SERVICE_NAME: str = identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
FORWARDED_FOR_HEADER = "x-forwarded-for"

_SIGN_OUT_SCOPES = {
    identity_service_pb2.SIGN_OUT_SCOPE_UNSPECIFIED: "current",
    identity_service_pb2.SIGN_OUT_SCOPE_CURRENT: "current",
    identity_service_pb2.SIGN_OUT_SCOPE_ALL: "all",
    identity_service_pb2.SIGN_OUT_SCOPE_OTHERS: "others",
}


def parse_workspace_name(name: str, *, field: str) -> uuid.UUID:
    """`workspaces/{uuid}` -> the id; INVALID_ARGUMENT naming `field` otherwise."""
    if name.startswith(WORKSPACE_NAME_PREFIX):
        try:
            return uuid.UUID(name.removeprefix(WORKSPACE_NAME_PREFIX))
        except ValueError:
            pass
    raise InvalidArgument.for_field(field, "must be a workspace name: workspaces/{uuid}")


def parse_api_key_name(name: str, *, field: str = "name") -> tuple[uuid.UUID, uuid.UUID]:
    """`workspaces/{ws}/apiKeys/{key}` -> (ws, key); INVALID_ARGUMENT naming `field` otherwise."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] + "/" == WORKSPACE_NAME_PREFIX and parts[2] == API_KEY_COLLECTION:
        try:
            return uuid.UUID(parts[1]), uuid.UUID(parts[3])
        except ValueError:
            pass
    raise InvalidArgument.for_field(field, "must be an API key name: workspaces/{uuid}/apiKeys/{uuid}")


class IdentityServicer:
    """Implements tessera.identity.v1.IdentityService on top of IdentityService."""

    def __init__(
        self, database: Database, service: IdentityService, *, trusted_proxies: Sequence[IpNetwork] = ()
    ) -> None:
        self.database = database
        self.service = service
        self.trusted_proxies = tuple(trusted_proxies)

    def _source(self, context: Any) -> str:
        forwarded = None
        for key, value in context.invocation_metadata() or ():
            if key == FORWARDED_FOR_HEADER:
                forwarded = value if forwarded is None else f"{forwarded},{value}"
        return source_address(context.peer() or "", forwarded, trusted_proxies=self.trusted_proxies)

    async def SignUp(
        self, request: identity_service_pb2.SignUpRequest, context: Any
    ) -> identity_service_pb2.SignUpResponse:
        """Create a user and mail a verification link."""
        source = self._source(context)
        async with self.database.unit_of_work(None) as uow:
            await self.service.enforce_limits(uow, self.service.sign_up_limits(source=source), what="sign-up")
        async with self.database.unit_of_work(None) as uow:
            user = await self.service.sign_up(
                uow,
                None,
                email=request.email,
                password=request.password,
                display_name=request.display_name,
                source=source,
            )
        return identity_service_pb2.SignUpResponse(user=user_message(user))

    async def VerifyEmail(
        self, request: identity_service_pb2.VerifyEmailRequest, context: Any
    ) -> identity_service_pb2.VerifyEmailResponse:
        """Mark the email of the token's user verified."""
        async with self.database.unit_of_work(None) as uow:
            user = await self.service.verify_email(uow, None, token=request.token)
        return identity_service_pb2.VerifyEmailResponse(user=user_message(user))

    async def RequestPasswordReset(
        self, request: identity_service_pb2.RequestPasswordResetRequest, context: Any
    ) -> identity_service_pb2.RequestPasswordResetResponse:
        """Mail a reset link if the email has an account (the same answer either way)."""
        source = self._source(context)
        async with self.database.unit_of_work(None) as uow:
            limits = self.service.mail_limits(email=request.email, source=source)
            await self.service.enforce_limits(uow, limits, what="password reset")
        async with self.database.unit_of_work(None) as uow:
            await self.service.request_password_reset(uow, None, email=request.email)
        return identity_service_pb2.RequestPasswordResetResponse()

    async def ResetPassword(
        self, request: identity_service_pb2.ResetPasswordRequest, context: Any
    ) -> identity_service_pb2.ResetPasswordResponse:
        """Set a new password with a reset token and end every session."""
        source = self._source(context)
        async with self.database.unit_of_work(None) as uow:
            outcome = await self.service.reset_password(
                uow, None, token=request.token, new_password=request.new_password, source=source
            )
        self.service.settle(outcome)
        return identity_service_pb2.ResetPasswordResponse()

    async def SignIn(
        self, request: identity_service_pb2.SignInRequest, context: Any
    ) -> identity_service_pb2.SignInResponse:
        """Sign in with email and password."""
        source = self._source(context)
        async with self.database.unit_of_work(None) as uow:
            limits = self.service.sign_in_limits(email=request.email, source=source)
            await self.service.enforce_limits(uow, limits, what="sign-in")
        async with self.database.unit_of_work(None) as uow:
            outcome = await self.service.sign_in(
                uow, None, email=request.email, password=request.password, source=source
            )
        signed_in = self.service.settle(outcome)
        return identity_service_pb2.SignInResponse(
            user=user_message(signed_in.user), tokens=token_set_message(signed_in.tokens)
        )

    async def RefreshTokens(
        self, request: identity_service_pb2.RefreshTokensRequest, context: Any
    ) -> identity_service_pb2.RefreshTokensResponse:
        """Rotate a refresh token."""
        source = self._source(context)
        async with self.database.unit_of_work(None) as uow:
            limits = await self.service.refresh_limits(uow, refresh_token=request.refresh_token, source=source)
            await self.service.enforce_limits(uow, limits, what="refresh")
        async with self.database.unit_of_work(None) as uow:
            outcome = await self.service.refresh_tokens(uow, None, refresh_token=request.refresh_token, source=source)
        tokens = self.service.settle(outcome)
        return identity_service_pb2.RefreshTokensResponse(tokens=token_set_message(tokens))

    async def SignOut(
        self, request: identity_service_pb2.SignOutRequest, context: Any
    ) -> identity_service_pb2.SignOutResponse:
        """End the caller's session, all their sessions, or all others."""
        principal = current_principal()
        async with self.database.unit_of_work(principal) as uow:
            outcome = await self.service.sign_out(uow, principal, scope=_SIGN_OUT_SCOPES[request.scope])
        return identity_service_pb2.SignOutResponse(revoked_sessions=self.service.settle(outcome))

    async def ChangePassword(
        self, request: identity_service_pb2.ChangePasswordRequest, context: Any
    ) -> identity_service_pb2.ChangePasswordResponse:
        """Change the caller's password and end their other sessions."""
        principal = current_principal()
        async with self.database.unit_of_work(principal) as uow:
            outcome = await self.service.change_password(
                uow,
                principal,
                current_password=request.current_password,
                new_password=request.new_password,
                source=self._source(context),
            )
        return identity_service_pb2.ChangePasswordResponse(revoked_sessions=self.service.settle(outcome))

    async def GetCurrentUser(
        self, request: identity_service_pb2.GetCurrentUserRequest, context: Any
    ) -> identity_service_pb2.GetCurrentUserResponse:
        """The calling user."""
        principal = current_principal()
        async with self.database.unit_of_work(principal) as uow:
            user = await self.service.get_current_user(uow, principal)
        return identity_service_pb2.GetCurrentUserResponse(user=user_message(user))

    async def ListSessions(
        self, request: identity_service_pb2.ListSessionsRequest, context: Any
    ) -> identity_service_pb2.ListSessionsResponse:
        """The caller's live sessions, newest first."""
        principal = current_principal()
        async with self.database.unit_of_work(principal) as uow:
            sessions = await self.service.list_sessions(uow, principal)
        return identity_service_pb2.ListSessionsResponse(
            sessions=[session_message(session, current_session=principal.session_id) for session in sessions]
        )

    async def IssueWorkspaceToken(
        self, request: identity_service_pb2.IssueWorkspaceTokenRequest, context: Any
    ) -> identity_service_pb2.IssueWorkspaceTokenResponse:
        """An access token for one workspace with the caller's role there."""
        principal = current_principal()
        workspace_id = parse_workspace_name(request.workspace, field="workspace")
        async with self.database.unit_of_work(principal) as uow:
            await self.service.require_live_session(uow, principal)
        # The membership lookup calls tenancy: no transaction is held open across it.
        issued = await self.service.issue_workspace_token(principal, workspace_id=workspace_id)
        return identity_service_pb2.IssueWorkspaceTokenResponse(
            tokens=token_set_message(issued.tokens), role=issued.role
        )

    async def GetJwks(
        self, request: identity_service_pb2.GetJwksRequest, context: Any
    ) -> identity_service_pb2.GetJwksResponse:
        """The public keys that verify access tokens."""
        keys = await self.service.jwks()
        return identity_service_pb2.GetJwksResponse(keys=[identity_pb2.JsonWebKey(**jwk) for jwk in keys])

    async def StartOidcSignIn(
        self, request: identity_service_pb2.StartOidcSignInRequest, context: Any
    ) -> identity_service_pb2.StartOidcSignInResponse:
        """The provider's authorization URL for a new OIDC sign-in."""
        # Discovery may call the provider: outside any transaction.
        authorization = await self.service.oidc_authorization(
            provider=request.provider, redirect_uri=request.redirect_uri
        )
        async with self.database.unit_of_work(None) as uow:
            await self.service.remember_oidc_login(
                uow, None, provider=request.provider, request=authorization, redirect_uri=request.redirect_uri
            )
        return identity_service_pb2.StartOidcSignInResponse(
            authorization_url=authorization.url, state=authorization.state
        )

    async def CompleteOidcSignIn(
        self, request: identity_service_pb2.CompleteOidcSignInRequest, context: Any
    ) -> identity_service_pb2.CompleteOidcSignInResponse:
        """Complete an OIDC sign-in with the callback's code and state."""
        source = self._source(context)
        # The state is spent first (and committed): a replayed callback cannot try again.
        async with self.database.unit_of_work(None) as uow:
            login = await self.service.consume_oidc_login(uow, None, state=request.state)
        try:
            identity = await self.service.verify_oidc_callback(login=login, code=request.code)
        except AppError as error:
            async with self.database.unit_of_work(None) as uow:
                await self.service.audit_oidc_failure(
                    uow, None, provider=login.provider, reason=error.reason, source=source
                )
            raise
        async with self.database.unit_of_work(None) as uow:
            outcome = await self.service.oidc_sign_in(
                uow, None, provider=login.provider, identity=identity, source=source
            )
        signed_in = self.service.settle(outcome)
        return identity_service_pb2.CompleteOidcSignInResponse(
            user=user_message(signed_in.user), tokens=token_set_message(signed_in.tokens)
        )

    async def CreateApiKey(
        self, request: identity_service_pb2.CreateApiKeyRequest, context: Any
    ) -> identity_service_pb2.CreateApiKeyResponse:
        """Create an API key of the workspace; the secret is returned only here."""
        principal = current_principal()
        workspace_id = parse_workspace_name(request.parent, field="parent")
        async with self.database.unit_of_work(principal) as uow:
            created = await self.service.create_api_key(
                uow,
                principal,
                workspace_id=workspace_id,
                display_name=request.api_key.display_name,
                role=request.api_key.role,
            )
        return identity_service_pb2.CreateApiKeyResponse(
            api_key=api_key_message(created.api_key), secret=created.secret
        )

    async def ListApiKeys(
        self, request: identity_service_pb2.ListApiKeysRequest, context: Any
    ) -> identity_service_pb2.ListApiKeysResponse:
        """The workspace's API keys (never their secrets)."""
        principal = current_principal()
        workspace_id = parse_workspace_name(request.parent, field="parent")
        async with self.database.unit_of_work(principal) as uow:
            keys = await self.service.list_api_keys(uow, principal, workspace_id=workspace_id)
        return identity_service_pb2.ListApiKeysResponse(api_keys=[api_key_message(key) for key in keys])

    async def RevokeApiKey(
        self, request: identity_service_pb2.RevokeApiKeyRequest, context: Any
    ) -> identity_service_pb2.RevokeApiKeyResponse:
        """Revoke an API key."""
        principal = current_principal()
        workspace_id, key_id = parse_api_key_name(request.name)
        async with self.database.unit_of_work(principal) as uow:
            outcome = await self.service.revoke_api_key(uow, principal, workspace_id=workspace_id, key_id=key_id)
        return identity_service_pb2.RevokeApiKeyResponse(api_key=api_key_message(self.service.settle(outcome)))

    async def ExchangeApiKey(
        self, request: identity_service_pb2.ExchangeApiKeyRequest, context: Any
    ) -> identity_service_pb2.ExchangeApiKeyResponse:
        """A short-lived workspace token for an API key."""
        source = self._source(context)
        async with self.database.unit_of_work(None) as uow:
            limits = self.service.api_key_exchange_limits(source=source)
            await self.service.enforce_limits(uow, limits, what="API key exchange")
        workspace_id = api_key_workspace(request.secret)
        if workspace_id is None:
            raise errors.invalid_api_key()
        # The secret names its workspace: the unit of work runs in that tenant (RLS applies).
        async with self.database.unit_of_work(None, tenant_id=str(workspace_id)) as uow:
            tokens = await self.service.exchange_api_key(uow, None, secret=request.secret, source=source)
        return identity_service_pb2.ExchangeApiKeyResponse(tokens=token_set_message(tokens))


def binding(servicer: IdentityServicer) -> ServicerBinding:
    """The servicer as the kit runtime registers it."""
    return ServicerBinding(
        service_name=SERVICE_NAME,
        servicer=servicer,
        add_to_server=identity_service_pb2_grpc.add_IdentityServiceServicer_to_server,
    )
