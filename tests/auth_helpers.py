"""Access tokens for tests: a fresh signing key per `TestKeys`, its verifier, and good and bad tokens.

A runtime under test verifies with `keys.verifier` (`ServiceRuntime(..., verifier=keys.verifier)`);
a call carries a token with `metadata=bearer(token)`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.kit.tokens import KIND_API_KEY, KIND_USER, StaticJwksProvider, TokenSigner, TokenVerifier

AUTHORIZATION_HEADER = "authorization"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying an access token."""
    return ((AUTHORIZATION_HEADER, f"Bearer {token}"),)


class TestKeys:
    """A signing key of the tests' own, the matching verifier, and tokens signed with it (or forged)."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, *, kid: str | None = None, issuer: str = "tessera", audience: str = "tessera") -> None:
        self.kid = kid or f"test-{uuid.uuid4().hex[:12]}"
        self.issuer = issuer
        self.audience = audience
        self.private_key = Ed25519PrivateKey.generate()
        self.signer = TokenSigner(self.private_key, kid=self.kid, issuer=issuer, audience=audience)
        self.provider = StaticJwksProvider({self.kid: self.private_key.public_key()})
        self.verifier = TokenVerifier(self.provider, issuer=issuer, audience=audience)

    def token(
        self,
        user_id: str,
        *,
        session_id: str | None = None,
        workspace_id: str | None = None,
        role: str | None = None,
        kind: str = KIND_USER,
        ttl: timedelta = timedelta(minutes=10),
        now: datetime | None = None,
    ) -> str:
        """A token signed with this key (a new session id unless one is given)."""
        token, _ = self.signer.sign(
            subject=user_id,
            session_id=session_id or str(uuid.uuid4()),
            kind=kind,
            workspace_id=workspace_id,
            role=role,
            ttl=ttl,
            now=now,
        )
        return token

    def user_token(self, user_id: str, *, session_id: str | None = None) -> str:
        """A user-level token (no workspace)."""
        return self.token(user_id, session_id=session_id)

    def workspace_token(self, user_id: str, workspace_id: str, role: str, *, session_id: str | None = None) -> str:
        """A token for one workspace with one role."""
        return self.token(user_id, session_id=session_id, workspace_id=workspace_id, role=role)

    def api_key_token(self, api_key_id: str, workspace_id: str, role: str) -> str:
        """A token exchanged for an API key: subject and session are the key's id."""
        return self.token(api_key_id, session_id=api_key_id, workspace_id=workspace_id, role=role, kind=KIND_API_KEY)

    def expired_token(
        self,
        user_id: str,
        *,
        workspace_id: str | None = None,
        role: str | None = None,
        session_id: str | None = None,
    ) -> str:
        """A correctly signed token that expired an hour ago (well beyond any leeway)."""
        issued = datetime.now(UTC) - timedelta(hours=1, minutes=10)
        return self.token(user_id, session_id=session_id, workspace_id=workspace_id, role=role, now=issued)

    def forged_token(
        self,
        user_id: str,
        *,
        workspace_id: str | None = None,
        role: str | None = None,
        session_id: str | None = None,
    ) -> str:
        """A well-formed token naming this key's kid but signed by another key."""
        forger = TokenSigner(Ed25519PrivateKey.generate(), kid=self.kid, issuer=self.issuer, audience=self.audience)
        token, _ = forger.sign(
            subject=user_id, session_id=session_id or str(uuid.uuid4()), workspace_id=workspace_id, role=role
        )
        return token
