"""uvicorn's HTTP/1.1 protocol with one socket write per response instead of two.

uvicorn writes a response's status line and headers as soon as the app sends `http.response.start`,
then the body when it sends `http.response.body`: two `send` system calls, and two packets for the client
to read, for every unary JSON response. `CoalescingTransport` holds a lone write until the next one,
which it joins and sends at once, or until the end of the event loop's pass (or a close), whichever comes
first. A response whose start and body are sent back to back (every transcoded unary call) leaves in one
piece and without waiting for the rest of the pass; a stream's events still leave in the pass that
wrote them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport(asyncio.Transport):
    """A transport that sends two writes in a row as one write of the wrapped transport."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hold `data` until the next write or the end of this loop pass; with a write held, send both now."""
        if not data:
            return
        self._pending.append(bytes(data))
        if len(self._pending) > 1:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_of_pass)

    def _end_of_pass(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def writelines(self, list_of_data: Any) -> None:
        """Queue each chunk (see `write`)."""
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand everything queued to the socket now, as one write."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        """Flush, then close (the wrapped transport sends what it holds before closing)."""
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        """Flush, then half-close."""
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        """Drop what is queued and close at once."""
        self._pending.clear()
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(data) for data in self._pending)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a `CoalescingTransport`."""

    # The ignore: asyncio.Protocol takes any BaseTransport; uvicorn (and this override) a stream Transport.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Wrap the connection's transport, then set up as uvicorn does."""
        super().connection_made(CoalescingTransport(transport, self.loop))
