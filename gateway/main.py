"""`python -m gateway.main`: run the gateway under uvicorn with settings from the environment."""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.settings import GatewaySettings, GatewaySettingsError, load_settings
from gateway.transport import CoalescingHttpToolsProtocol


def uvicorn_config(settings: GatewaySettings) -> uvicorn.Config:
    """The uvicorn configuration of a gateway process (the app is built inside uvicorn's event loop)."""

    def factory() -> Starlette:
        return create_app(settings)

    return uvicorn.Config(
        factory,
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # uvicorn's httptools protocol (the C parser, never h11 by accident), one socket write per response.
        http=CoalescingHttpToolsProtocol,
        loop="auto",  # uvloop where installed (a dependency except on Windows)
        access_log=settings.access_log,
        # Proxy headers only from configured proxies: otherwise any local client could pick its rate-limit
        # bucket with X-Forwarded-For, and every request would pay for parsing them.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=list(settings.forwarded_allow_ips) or None,
    )


def serve(settings: GatewaySettings) -> None:
    """Serve until SIGTERM/SIGINT."""
    uvicorn.Server(uvicorn_config(settings)).run()


def main() -> None:
    """Load settings (exit 2 naming the bad variable) and serve."""
    try:
        settings = load_settings()
    except GatewaySettingsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    serve(settings)


if __name__ == "__main__":
    main()
