"""Calls from one service to another on behalf of the caller being served.

An RPC handler that calls another service passes `metadata=outgoing_metadata()` (the caller's bearer
token and the request id travel on, so the callee authorizes the same caller and logs the same request)
and `timeout=outgoing_timeout(default)` (a little shorter than the caller still waits), over a channel
from `service_channel(address)` (one per address and event loop, reused).
"""

from __future__ import annotations

import asyncio
import time

import grpc

from services.kit.context import request_id_var
from services.kit.interceptors import AUTHORIZATION_HEADER, REQUEST_ID_HEADER, current_call

# Below this, an outgoing call could not even reach the other service: fail it at once.
MIN_TIMEOUT_SECONDS = 0.001
# Taken off the caller's remaining time: the callee gives up first (gRPC carries deadlines as relative
# timeouts rounded up to whole milliseconds, and the call spends time in transit), so the caller gets the
# callee's answer or error rather than running out of time itself.
DEADLINE_MARGIN_SECONDS = 0.02

_channels: dict[tuple[int, str], grpc.aio.Channel] = {}


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The caller's authorization and request id, as metadata of a call made while serving it."""
    call = current_call()
    if call is None:
        request_id = request_id_var.get()
        return ((REQUEST_ID_HEADER, request_id),) if request_id else ()
    if call.authorization is None:
        return ((REQUEST_ID_HEADER, call.request_id),)
    return ((AUTHORIZATION_HEADER, call.authorization), (REQUEST_ID_HEADER, call.request_id))


def outgoing_timeout(default: float) -> float:
    """The timeout of a call made while serving an RPC: `default`, capped by that RPC's remaining deadline."""
    call = current_call()
    if call is None or call.deadline is None:
        return default
    remaining = call.deadline - time.monotonic() - DEADLINE_MARGIN_SECONDS
    return max(MIN_TIMEOUT_SECONDS, min(default, remaining))


def service_channel(address: str) -> grpc.aio.Channel:
    """A shared insecure channel to another service (host:port), created on first use in this event loop."""
    key = (id(asyncio.get_running_loop()), address)
    channel = _channels.get(key)
    if channel is None:
        channel = _channels[key] = grpc.aio.insecure_channel(address)
    return channel


async def close_channels() -> None:
    """Close the channels this event loop opened (at process shutdown)."""
    loop_id = id(asyncio.get_running_loop())
    for key in [key for key in _channels if key[0] == loop_id]:
        await _channels.pop(key).close()
