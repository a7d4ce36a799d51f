"""A real OpenID Connect provider on loopback for the OIDC tests: `oidc-provider-mock` in a subprocess.

`oidc-provider-mock` (PyPI) is an Authlib-based OpenID provider: discovery, an authorization form,
the token endpoint with client authentication, RS256 ID tokens and a JWKS endpoint. Version 0.3.4
does not check PKCE, so this module runs it with Authlib's own RFC 7636 `CodeChallenge` extension
registered (`python -m tests.identity.oidc_provider ...` below): the code challenge is stored with the
authorization code and the token endpoint rejects a wrong `code_verifier` (`invalid_grant`), as a
production provider does. Everything else is the package unchanged.

Used by tests:
- `running_provider(...)` context manager -> `OidcProvider` (`.issuer`, `.port`), stopped on exit;
- `await register_client(http, provider, redirect_uris=...)` -> `RegisteredClient(client_id, client_secret)`;
- `await set_user(http, provider, sub, claims)` (email, email_verified, name, ... in the ID token);
- `await sign_in_at_provider(http, authorization_url, sub=...)` -> `Callback(code, state)`, driving the
  authorization form over HTTP like a browser and reading the redirect back to the relying party.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from tessera_cli.embedded import free_port, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class OidcProvider:
    """A running provider: its issuer URL (also the discovery base)."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class RegisteredClient:
    """A client registered at the provider (dynamic client registration)."""

    client_id: str
    client_secret: str


@dataclass(frozen=True)
class Callback:
    """The query of the provider's redirect back to the relying party."""

    code: str
    state: str
    redirect_uri: str


@contextlib.contextmanager
def running_provider(*, require_nonce: bool = True, token_max_age: int = 300) -> Iterator[OidcProvider]:
    """Start the provider on a free loopback port (clients must register; PKCE enforced)."""
    last_error = ""
    for _ in range(3):  # the free port may be taken between the probe and the bind: try another
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "tests.identity.oidc_provider",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--require-registration",
            "true",
            "--token-max-age",
            str(token_max_age),
        ]
        if require_nonce:
            args += ["--require-nonce", "true"]
        env = {**os.environ, "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if wait_for_port("127.0.0.1", port, START_TIMEOUT, process):
            try:
                yield OidcProvider(port=port, process=process)
            finally:
                _stop(process)
            return
        _stop(process)
        last_error = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
    raise RuntimeError(f"the OIDC provider did not start: {last_error}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if process.stderr:
        process.stderr.close()


async def register_client(
    http: httpx.AsyncClient,
    provider: OidcProvider,
    *,
    redirect_uris: Sequence[str],
    auth_method: str = "client_secret_basic",
) -> RegisteredClient:
    """Register a confidential client (RFC 7591) with these redirect URIs."""
    response = await http.post(
        f"{provider.issuer}/oauth2/clients",
        json={"redirect_uris": list(redirect_uris), "token_endpoint_auth_method": auth_method},
    )
    response.raise_for_status()
    body = response.json()
    return RegisteredClient(client_id=body["client_id"], client_secret=body["client_secret"])


async def set_user(http: httpx.AsyncClient, provider: OidcProvider, sub: str, claims: Mapping[str, object]) -> None:
    """Define (or replace) the claims the provider puts in this subject's ID tokens."""
    response = await http.put(f"{provider.issuer}/users/{sub}", json=dict(claims))
    response.raise_for_status()


async def sign_in_at_provider(http: httpx.AsyncClient, authorization_url: str, *, sub: str) -> Callback:
    """Open the authorization URL, submit the form as user `sub`, and return the redirect's code and state."""
    form = await http.get(authorization_url)
    form.raise_for_status()
    response = await http.post(authorization_url, data={"sub": sub})
    if response.status_code != 302:
        raise AssertionError(f"authorization failed: {response.status_code} {response.text[:500]}")
    location = response.headers["location"]
    parts = urlsplit(location)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    if "error" in query:
        raise AssertionError(f"the provider redirected with an error: {query}")
    redirect_uri = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return Callback(code=query["code"], state=query.get("state", ""), redirect_uri=redirect_uri)


def _enable_pkce() -> None:
    """Register Authlib's RFC 7636 CodeChallenge on the provider's authorization-code grant."""
    from dataclasses import dataclass as _dataclass
    from typing import Any

    import authlib.oauth2.rfc6749
    from authlib.oauth2.rfc7636 import CodeChallenge
    from oidc_provider_mock import _app, _storage

    @_dataclass(kw_only=True, frozen=True)
    class PkceAuthorizationCode(_storage.AuthorizationCode):
        code_challenge: str | None = None
        code_challenge_method: str | None = None

    class PkceAuthorizationCodeGrant(_app.AuthorizationCodeGrant):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            CodeChallenge(required=True)(self)

        def save_authorization_code(self, code: str, request: object) -> None:
            assert isinstance(request, authlib.oauth2.rfc6749.OAuth2Request)
            client = request.client
            user = request.user
            data = request.payload.data
            _storage.storage.store_authorization_code(
                PkceAuthorizationCode(
                    code=code,
                    user_id=user.sub,
                    client_id=client.get_client_id(),
                    redirect_uri=request.payload.redirect_uri,
                    scope=request.scope,
                    nonce=data.get("nonce"),
                    code_challenge=data.get("code_challenge"),
                    code_challenge_method=data.get("code_challenge_method"),
                )
            )

    _app.AuthorizationCodeGrant = PkceAuthorizationCodeGrant  # read by the blueprint when the app is built


if __name__ == "__main__":
    _enable_pkce()
    from oidc_provider_mock.__main__ import run

    run()
