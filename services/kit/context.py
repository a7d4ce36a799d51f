"""Ambient request data (request id, tenant, principal) in context variables, for logs and traces.

Business code receives the principal explicitly; these variables exist so that log lines, metrics
and outgoing events can be correlated without threading ids through every call.
"""

from __future__ import annotations

import os
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("tessera_request_id", default=None)
tenant_id_var: ContextVar[str | None] = ContextVar("tessera_tenant_id", default=None)
subject_var: ContextVar[str | None] = ContextVar("tessera_subject", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


def new_request_id() -> str:
    """A fresh request id: 32 random hex digits (uuid4's shape, without building a UUID on every RPC)."""
    return os.urandom(16).hex()
