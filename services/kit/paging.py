"""AIP-158 paging: signed, opaque page tokens (keyset cursors) and page size rules.

A token is `urlsafe_b64(PageCursor || HMAC-SHA256(secret, PageCursor))` without padding. The cursor
holds the sort-key values of the last element served, a hash of the query parameters and whom the
token was issued to; a token that was altered, or that is presented for another query or by another
tenant or caller, is rejected with INVALID_ARGUMENT and the reason INVALID_PAGE_TOKEN.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from services.kit.errors import InvalidArgument
from tessera.common.v1.paging_pb2 import PageCursor

INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"  # noqa: S105  # an error reason, not a credential
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_MAC_BYTES = hashlib.sha256().digest_size
_MAX_TOKEN_CHARS = 4096
_MAC_CONTEXT = b"tessera.page_token.v1\x00"


def _invalid(description: str) -> InvalidArgument:
    return InvalidArgument.for_field("page_token", description, reason=INVALID_PAGE_TOKEN)


def query_key(*parts: str) -> bytes:
    """A stable key for the query parameters a token is bound to (parent, filter, order_by, ...)."""
    digest = hashlib.sha256()
    for part in parts:
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    return digest.digest()


class PageTokenCodec:
    """Encodes and verifies page tokens with one service secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a page token secret needs at least 16 bytes")
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, _MAC_CONTEXT + payload, hashlib.sha256).digest()

    @staticmethod
    def _query_hash(query_key: bytes) -> bytes:
        return hashlib.sha256(query_key).digest()[:16]

    def encode(self, cursor_values: Sequence[str], *, query_key: bytes, issued_to: str) -> str:
        """The opaque token for the page after the element whose sort-key values are given."""
        payload = PageCursor(
            last_values=list(cursor_values),
            query_hash=self._query_hash(query_key),
            issued_to=issued_to,
        ).SerializeToString(deterministic=True)
        return base64.urlsafe_b64encode(payload + self._mac(payload)).rstrip(b"=").decode("ascii")

    def decode(self, token: str, *, query_key: bytes, issued_to: str) -> list[str]:
        """The cursor values of a token issued by this service for this query and caller, else InvalidArgument."""
        if len(token) > _MAX_TOKEN_CHARS:
            raise _invalid("page token is too long")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise _invalid("page token is malformed") from None
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) < _MAC_BYTES or not hmac.compare_digest(mac, self._mac(payload)):
            raise _invalid("page token is malformed or was altered")
        cursor = PageCursor()
        try:
            cursor.ParseFromString(payload)
        except DecodeError:
            raise _invalid("page token is malformed") from None
        if not hmac.compare_digest(cursor.query_hash, self._query_hash(query_key)):
            raise _invalid("page token was issued for a different query")
        if cursor.issued_to != issued_to:
            raise _invalid("page token was issued to another caller")
        return list(cursor.last_values)


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """The effective page size: 0 means the default, above the maximum means the maximum, negative is invalid."""
    if requested < 0:
        raise InvalidArgument.for_field("page_size", "must not be negative")
    if requested == 0:
        return min(default, maximum)
    return min(requested, maximum)
