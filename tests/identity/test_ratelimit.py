"""The caller's source address: the peer, or x-forwarded-for only through a trusted proxy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.identity.ratelimit import UNKNOWN_ADDRESS, RateLimiter, parse_networks, peer_ip, source_address

pytestmark = pytest.mark.gate("S02")

PROXIES = parse_networks(["127.0.0.1", "10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:192.0.2.10:53422", "192.0.2.10"),
        ("ipv6:[2001:db8::1]:443", "2001:db8::1"),
        ("ipv6:[fe80::1%eth0]:443", "fe80::1"),
        ("unix:/tmp/socket", None),
        ("", None),
        ("ipv4:not-an-ip:1", None),
    ],
)
def test_peer_ip(peer: str, expected: str | None) -> None:
    assert peer_ip(peer) == expected


def test_an_untrusted_peer_cannot_choose_its_address() -> None:
    assert source_address("ipv4:192.0.2.10:5000", "198.51.100.1", trusted_proxies=PROXIES) == "192.0.2.10"


def test_a_trusted_proxy_forwards_the_client_address() -> None:
    assert source_address("ipv4:127.0.0.1:5000", "198.51.100.1", trusted_proxies=PROXIES) == "198.51.100.1"


def test_the_rightmost_untrusted_hop_wins() -> None:
    # The client prepended a fake hop; the trusted proxies appended what they saw.
    forwarded = "203.0.113.66, 198.51.100.7, 10.1.2.3"
    assert source_address("ipv4:10.9.9.9:5000", forwarded, trusted_proxies=PROXIES) == "198.51.100.7"


def test_a_malformed_hop_stops_the_walk_at_the_proxy() -> None:
    assert source_address("ipv6:[::1]:5000", "198.51.100.7, bogus", trusted_proxies=PROXIES) == "::1"


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert source_address("ipv4:127.0.0.1:5000", "198.51.100.1", trusted_proxies=()) == "127.0.0.1"


def test_an_unparseable_peer_is_one_shared_bucket() -> None:
    assert source_address("unix:/run/sock", "198.51.100.1", trusted_proxies=PROXIES) == UNKNOWN_ADDRESS


def test_windows_are_aligned_and_retry_after_is_the_rest_of_the_window() -> None:
    limiter = RateLimiter(window=timedelta(minutes=1))
    moment = datetime(2026, 1, 2, 3, 4, 45, tzinfo=UTC)
    assert limiter.window_start(moment) == datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(window=timedelta(0))
