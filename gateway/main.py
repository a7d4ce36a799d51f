"""`python -m gateway.main`: run the gateway under uvicorn with settings from the environment."""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.settings import GatewaySettings, GatewaySettingsError, load_settings


def serve(settings: GatewaySettings) -> None:
    """Serve until SIGTERM/SIGINT (the app is built inside uvicorn's event loop)."""

    def factory() -> Starlette:
        return create_app(settings)

    config = uvicorn.Config(
        factory,
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
    )
    uvicorn.Server(config).run()


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
