"""Abuse limits: fixed-window counters in PostgreSQL, and the caller's source address.

A limit is a key (`sign_in:account:<email>`, `sign_in:address:<ip>`, ...) and a maximum per window.
One statement counts a hit on every key of an action (upsert, keys in a fixed order so that concurrent
callers never deadlock) and returns the counts; a count above its maximum rejects the call with
RESOURCE_EXHAUSTED and the time left in the window (RetryInfo). The counters live in PostgreSQL so that
every replica of the service shares them; the service runs them in a short transaction of their own,
so a slow action (argon2) never holds a counter's row lock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.identity.models import rate_limits
from services.kit.db import UnitOfWork
from services.kit.sql import Query

UNKNOWN_ADDRESS = "unknown"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `maximum` hits on `key` per window."""

    key: str
    maximum: int


@dataclass(frozen=True, slots=True)
class Exceeded:
    """The first limit that was exceeded, and the seconds until its window ends."""

    limit: Limit
    retry_after: float


_HIT = Query(
    pg_insert(rate_limits)
    .from_select(
        ["key", "window_start", "count"],
        sa.select(
            sa.func.unnest(sa.bindparam("keys", type_=postgresql.ARRAY(sa.Text))),
            sa.bindparam("window_start", type_=sa.DateTime(timezone=True)),
            sa.literal(1),
        ),
    )
    .on_conflict_do_update(
        index_elements=[rate_limits.c.key, rate_limits.c.window_start],
        set_={"count": rate_limits.c.count + 1},
    )
    .returning(rate_limits.c.key, rate_limits.c.count)
)

_PURGE = Query(sa.delete(rate_limits).where(rate_limits.c.window_start < sa.bindparam("before")))


class RateLimiter:
    """Fixed-window limits of one window length."""

    def __init__(self, *, window: timedelta) -> None:
        if window <= timedelta(0):
            raise ValueError("the window must be positive")
        self.window = window

    def window_start(self, now: datetime) -> datetime:
        """The start of the window `now` falls in (windows are aligned to the epoch)."""
        seconds = self.window.total_seconds()
        start = (now.timestamp() // seconds) * seconds
        return datetime.fromtimestamp(start, UTC)

    async def hit(self, uow: UnitOfWork, limits: Sequence[Limit], *, now: datetime) -> Exceeded | None:
        """Count one hit on every limit; the first exceeded limit (None if all are within bounds)."""
        if not limits:
            return None
        by_key = {limit.key: limit for limit in limits}
        start = self.window_start(now)
        rows = await uow.fetch(_HIT, keys=sorted(by_key), window_start=start)
        retry_after = max((start + self.window - now).total_seconds(), 0.001)
        for row in rows:
            limit = by_key[row["key"]]
            if row["count"] > limit.maximum:
                return Exceeded(limit, retry_after)
        return None

    async def purge(self, uow: UnitOfWork, *, now: datetime) -> int:
        """Delete counters of windows that ended before the current one; returns how many."""
        status = await uow.execute(_PURGE, before=self.window_start(now))
        return int(status.split()[-1])


def peer_ip(peer: str) -> str | None:
    """The IP address in a gRPC peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`), or None."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
    else:
        return None
    host = host.split("%", 1)[0]  # drop an IPv6 zone id
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def parse_networks(entries: Sequence[str]) -> tuple[IpNetwork, ...]:
    """IP networks from addresses or CIDRs (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _trusted(address: str, networks: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def source_address(peer: str, forwarded_for: str | None, *, trusted_proxies: Sequence[IpNetwork]) -> str:
    """The caller's address: the peer's, or from `x-forwarded-for` when the peer is a trusted proxy.

    The header is read right to left (each proxy appends the address it saw) and the first address
    that is not itself a trusted proxy wins; a client cannot choose its address by sending the header.
    """
    address = peer_ip(peer)
    if address is None:
        return UNKNOWN_ADDRESS
    if not forwarded_for or not _trusted(address, trusted_proxies):
        return address
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            candidate = str(ipaddress.ip_address(hop))
        except ValueError:
            return address  # a malformed hop: trust nothing further left than the proxy itself
        if not _trusted(candidate, trusted_proxies):
            return candidate
        address = candidate
    return address
