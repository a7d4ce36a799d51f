"""The gateway's HTTP/1.1 protocol: one socket write per response, streams still flow (gate S01).

Through a real uvicorn server speaking over loopback sockets; the write count is read off the real
transport the protocol writes through.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from gateway.transport import CoalescingTransport
from tests.gateway.conftest import serve

pytestmark = pytest.mark.gate("S01")


class CountingTransport(asyncio.Transport):
    """A real socket transport, with the writes it is asked to do counted."""

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

    def write_eof(self) -> None:
        self.inner.write_eof()

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()


async def _socket_pair() -> tuple[CountingTransport, socket.socket]:
    ours, peer = socket.socketpair()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
    peer.setblocking(False)
    return CountingTransport(transport), peer


async def _read(peer: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(5):
        while len(data) < size:
            data += await loop.sock_recv(peer, size - len(data))
    return data


async def test_a_start_and_body_written_back_to_back_reach_the_socket_as_one_write() -> None:
    counting, peer = await _socket_pair()
    coalescing = CoalescingTransport(counting, asyncio.get_running_loop())
    coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    coalescing.write(b"")  # nothing to send is no write
    assert counting.writes == []  # a lone write is held
    assert coalescing.get_write_buffer_size() == 38
    coalescing.write(memoryview(b"{}"))
    # The second write sends both at once, without waiting for the end of the loop's pass.
    assert counting.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    assert await _read(peer, 40) == counting.writes[0]

    coalescing.write(b"a lone event")
    assert counting.writes[1:] == []
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert counting.writes[1:] == [b"a lone event"]  # sent at the end of the pass that wrote it
    coalescing.close()
    peer.close()


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    counting, peer = await _socket_pair()
    coalescing = CoalescingTransport(counting, asyncio.get_running_loop())
    coalescing.write(b"last words")
    coalescing.close()
    assert counting.writes == [b"last words"]
    assert await _read(peer, 10) == b"last words"
    peer.close()

    counting, peer = await _socket_pair()
    coalescing = CoalescingTransport(counting, asyncio.get_running_loop())
    coalescing.write(b"never sent")
    coalescing.abort()
    await asyncio.sleep(0.01)
    assert counting.writes == []
    assert coalescing.is_closing()
    peer.close()


async def _raw_exchange(url: str, requests: list[bytes], responses: int) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for request in requests:
            writer.write(request)
        await writer.drain()
        data = b""
        async with asyncio.timeout(10):
            while data.count(b"HTTP/1.1 ") < responses or not data.endswith((b"ok", b"0\r\n\r\n")):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
        return data
    finally:
        writer.close()


async def plain(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_keep_alive_and_pipelined_requests_get_whole_responses_in_order() -> None:
    async with serve(plain) as url:
        request = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n"
        data = await _raw_exchange(url, [request, request, request], responses=3)
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.count(b"\r\n\r\nok") == 3
    assert data.endswith(b"ok")


async def test_a_stream_delivers_each_event_before_the_app_sends_the_next() -> None:
    delivered = asyncio.Event()

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        # The client must see the first event while the response is still open.
        async with asyncio.timeout(5):
            await delivered.wait()
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})

    async with serve(stream) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        async with asyncio.timeout(5):
            while b"data: 1" not in data:
                data += await reader.read(65536)
        assert b"data: 2" not in data
        delivered.set()
        async with asyncio.timeout(5):
            while not data.endswith(b"0\r\n\r\n"):
                data += await reader.read(65536)
        writer.close()
    assert data.index(b"data: 1") < data.index(b"data: 2")
