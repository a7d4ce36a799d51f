"""Helpers of the identity gRPC tests: runtime settings as deployed, addresses, error details."""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from migrations import runner
from services.identity.settings import IdentitySettings
from services.kit.settings import load_settings
from tests.auth_helpers import bearer
from tests.identity.mail_server import SmtpServer

Metadata = tuple[tuple[str, str], ...]

SIGN_IN_PER_ACCOUNT = 5
SIGN_IN_PER_ADDRESS = 12


def runtime_settings(admin_url: str, nats_url: str, smtp: SmtpServer, **overrides: Any) -> IdentitySettings:
    values: dict[str, Any] = {
        "database_url": runner.service_url(admin_url, "identity"),
        "nats_url": nats_url,
        "auth": "enforced",
        "environment": "test",
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": None,
        "outbox_poll_seconds": 0.2,
        "shutdown_grace_seconds": 2.0,
        "smtp_url": f"smtp://127.0.0.1:{smtp.port}",
        "public_base_url": "https://app.example.test",
        "trusted_proxies": "127.0.0.1",
        "argon2_time_cost": 1,
        "argon2_memory_kib": 1024,
        "argon2_parallelism": 1,
        # One long window: a test's attempts never straddle two windows.
        "rate_limit_window_seconds": 86_400,
        "sign_in_limit_per_account": SIGN_IN_PER_ACCOUNT,
        "sign_in_limit_per_address": SIGN_IN_PER_ADDRESS,
    }
    values.update(overrides)
    return load_settings(IdentitySettings, **values)


def new_address() -> str:
    """A client address of this test alone (sent as x-forwarded-for through the trusted 127.0.0.1)."""
    return f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"


def via(address: str, token: str | None = None) -> Metadata:
    metadata: Metadata = (("x-forwarded-for", f"203.0.113.9, {address}"),)
    return metadata + bearer(token) if token else metadata


def details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[str], float | None]:
    """ErrorInfo, BadRequest field paths and RetryInfo delay (seconds) of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    retry: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.extend(violation.field for violation in bad_request.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry = retry_info.retry_delay.ToTimedelta().total_seconds()
    return info, fields, retry


async def rejected(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value
