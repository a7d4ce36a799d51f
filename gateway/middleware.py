"""Pure ASGI middleware on the gateway's hot path: CORS only where an Origin is, contract routes past the router.

Every request through the gateway pays for each layer it crosses. A contract request (the bulk of the traffic)
needs neither Starlette's router, which tries each local route (health, OpenAPI, docs, browser sessions)
before its catch-all, nor the CORS machinery when it carries no Origin header (API clients, server to server).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_NAMED_GROUP = re.compile(r"\(\?P<[^>]+>")


class OriginOnlyCORSMiddleware:
    """Starlette's CORSMiddleware for requests with an Origin header; the others only get `Vary: Origin`.

    Starlette's middleware parses the headers and wraps `send` on every request. Without an Origin there is
    nothing to allow, but the response still says it varies by Origin (as Starlette's does), so that a shared
    cache never hands it to a cross-origin caller.
    """

    def __init__(self, app: ASGIApp, /, **options: Any) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """CORS for cross-origin requests; `Vary: Origin` on the responses of the others."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if any(name == b"origin" for name, _ in scope["headers"]):
            await self.cors(scope, receive, send)
            return

        async def send_varying_by_origin(message: Message) -> None:
            if message["type"] == "http.response.start":
                add_vary_origin(message)
            await send(message)

        await self.app(scope, receive, send_varying_by_origin)


def add_vary_origin(message: Message) -> None:
    """Add `Origin` to the `Vary` header of an `http.response.start` message (merging an existing Vary)."""
    raw = message.setdefault("headers", [])
    if not isinstance(raw, list):
        raw = message["headers"] = list(raw)
    if any(name.lower() == b"vary" for name, _ in raw):
        headers = MutableHeaders(scope=message)
        headers["Vary"] = ", ".join([*headers.getlist("Vary"), "Origin"])
    else:
        raw.append((b"vary", b"Origin"))


class ContractDispatch:
    """Send contract requests straight to the gateway; the router gets the local routes' paths and the rest.

    The router would answer a path that no local route matches with its catch-all contract route; one regex
    over the local routes' paths answers the same question. Requests with a `root_path`, a method the
    catch-all does not take, or local routes without a path pattern go through the router as before.
    """

    def __init__(
        self, app: ASGIApp, *, gateway: ASGIApp, local_routes: Sequence[BaseRoute], methods: Collection[str]
    ) -> None:
        self.app = app
        self.gateway = gateway
        self.methods = frozenset(methods)
        self.local_paths = local_path_pattern(local_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one ASGI connection."""
        if (
            scope["type"] == "http"
            and self.local_paths is not None
            and not scope.get("root_path")
            and scope["method"] in self.methods
            and self.local_paths.match(scope["path"]) is None
        ):
            await self.gateway(scope, receive, send)
            return
        await self.app(scope, receive, send)


def local_path_pattern(routes: Sequence[BaseRoute]) -> re.Pattern[str] | None:
    """One regex matching every path one of `routes` answers (whatever the method), or None if a route has none."""
    patterns: list[str] = []
    for route in routes:
        regex = getattr(route, "path_regex", None)
        if not isinstance(regex, re.Pattern):
            return None
        # Group names may repeat across routes; only whether a path matches counts here.
        patterns.append(_NAMED_GROUP.sub("(?:", regex.pattern))
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns)) if patterns else re.compile(r"(?!)")
