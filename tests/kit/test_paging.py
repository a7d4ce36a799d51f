"""Page tokens: signed keyset cursors bound to one query and one caller."""

from __future__ import annotations

import base64

import pytest

from services.kit.errors import InvalidArgument
from services.kit.paging import INVALID_PAGE_TOKEN, PageTokenCodec, page_size, query_key
from tessera.common.v1.paging_pb2 import PageCursor

SECRET = b"0123456789abcdef0123456789abcdef"
QUERY = query_key("workspaces", "create_time desc", "")
TENANT = "0190a0a0-0000-7000-8000-000000000001"


@pytest.fixture
def codec() -> PageTokenCodec:
    return PageTokenCodec(SECRET)


def assert_invalid_token(error: InvalidArgument) -> None:
    assert error.reason == INVALID_PAGE_TOKEN
    assert [v.field for v in error.violations] == ["page_token"]


def test_roundtrip(codec: PageTokenCodec) -> None:
    values = ["2026-01-01T00:00:00.000001+00:00", "0190a0a0-0000-7000-8000-0000000000aa", ""]
    token = codec.encode(values, query_key=QUERY, issued_to=TENANT)
    assert token.isascii()
    assert not set(token) & set("=/+")
    assert codec.decode(token, query_key=QUERY, issued_to=TENANT) == values


@pytest.mark.parametrize("position", [0, 5, -1])
def test_tampered_token_is_rejected(codec: PageTokenCodec, position: int) -> None:
    token = codec.encode(["a", "b"], query_key=QUERY, issued_to=TENANT)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[position] ^= 0x01
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(InvalidArgument) as failure:
        codec.decode(tampered, query_key=QUERY, issued_to=TENANT)
    assert_invalid_token(failure.value)


def test_forged_cursor_without_the_secret_is_rejected(codec: PageTokenCodec) -> None:
    forged_payload = PageCursor(last_values=["z"], query_hash=b"x" * 16, issued_to=TENANT).SerializeToString()
    forged = base64.urlsafe_b64encode(forged_payload + b"\x00" * 32).rstrip(b"=").decode()
    other_secret = PageTokenCodec(b"another-secret-another-secret!!!").encode(["z"], query_key=QUERY, issued_to=TENANT)
    for token in (forged, other_secret, "", "!!!not base64!!!", "A" * 5000):
        with pytest.raises(InvalidArgument) as failure:
            codec.decode(token, query_key=QUERY, issued_to=TENANT)
        assert_invalid_token(failure.value)


def test_token_for_another_query_is_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode(["a"], query_key=QUERY, issued_to=TENANT)
    with pytest.raises(InvalidArgument) as failure:
        codec.decode(token, query_key=query_key("workspaces", "create_time asc", ""), issued_to=TENANT)
    assert_invalid_token(failure.value)


@pytest.mark.gate("S03")
def test_token_issued_to_another_tenant_is_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode(["a"], query_key=QUERY, issued_to=TENANT)
    with pytest.raises(InvalidArgument) as failure:
        codec.decode(token, query_key=QUERY, issued_to="0190a0a0-0000-7000-8000-000000000002")
    assert_invalid_token(failure.value)


def test_query_key_separates_its_parts() -> None:
    assert query_key("ab", "c") != query_key("a", "bc")
    assert query_key("a", "b") == query_key("a", "b")


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        PageTokenCodec(b"short")


def test_page_size_rules() -> None:
    assert page_size(0) == 50
    assert page_size(7) == 7
    assert page_size(5000) == 1000
    assert page_size(0, default=20, maximum=100) == 20
    assert page_size(101, default=20, maximum=100) == 100
    with pytest.raises(InvalidArgument) as failure:
        page_size(-1)
    assert [v.field for v in failure.value.violations] == ["page_size"]
