"""Typed, bounded mailboxes: in-process (anyio memory streams) and cross-process (msgpack frames on a socket).

In-process messages are handed over as objects (no serialization). Cross-process frames are a 4-byte
little-endian length followed by a msgspec msgpack payload decoded straight into the receiver's union type;
no pickle anywhere. A full mailbox blocks the sender: that is the backpressure.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from anyio.abc import SocketStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")
In = TypeVar("In")

_LEN = struct.Struct("<I")


class MailboxClosed(Exception):
    """The other side closed the mailbox (or its process went away)."""


class Outbox(Generic[T]):
    """The sending half of an in-process mailbox."""

    def __init__(self, stream: MemoryObjectSendStream[T]) -> None:
        self._stream = stream

    async def send(self, msg: T) -> None:
        try:
            await self._stream.send(msg)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise MailboxClosed from None

    def send_nowait(self, msg: T) -> None:
        """For callers outside an actor loop; raises anyio.WouldBlock when full."""
        try:
            self._stream.send_nowait(msg)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise MailboxClosed from None

    def clone(self) -> Outbox[T]:
        return Outbox(self._stream.clone())

    def close(self) -> None:
        self._stream.close()


class Inbox(Generic[T]):
    """The receiving half of an in-process mailbox."""

    def __init__(self, stream: MemoryObjectReceiveStream[T]) -> None:
        self._stream = stream

    async def receive(self) -> T:
        try:
            return await self._stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise MailboxClosed from None

    def drain(self) -> list[T]:
        """Everything waiting now, without blocking."""
        out: list[T] = []
        while True:
            try:
                out.append(self._stream.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return out

    def statistics(self) -> Any:
        return self._stream.statistics()

    def close(self) -> None:
        self._stream.close()


def mailbox(msg_type: type[T] | Any, capacity: int) -> tuple[Outbox[T], Inbox[T]]:
    """A bounded in-process mailbox for messages of `msg_type` (a Struct or a union of Structs)."""
    del msg_type  # for the reader and the type checker: the stream itself is untyped at run time
    send, receive = anyio.create_memory_object_stream[T](capacity)
    return Outbox(send), Inbox(receive)


class SocketMailbox(Generic[In]):
    """One end of a cross-process mailbox on an anyio socket stream: receives `In`, sends any Struct."""

    def __init__(self, stream: SocketStream, in_type: type[In] | Any) -> None:
        self._stream = stream
        self._decoder = msgspec.msgpack.Decoder(in_type)
        self._encoder = msgspec.msgpack.Encoder()
        self._buffer = bytearray()
        self._send_lock = anyio.Lock()

    async def send(self, msg: msgspec.Struct) -> None:
        payload = self._encoder.encode(msg)
        async with self._send_lock:
            try:
                await self._stream.send(_LEN.pack(len(payload)) + payload)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                raise MailboxClosed from None

    async def receive(self) -> In:
        header = await self._read_exactly(_LEN.size)
        (length,) = _LEN.unpack(header)
        return self._decoder.decode(await self._read_exactly(length))

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            try:
                chunk = await self._stream.receive(max(65536, n - len(self._buffer)))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                raise MailboxClosed from None
            self._buffer += chunk
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def aclose(self) -> None:
        await self._stream.aclose()


class BlockingSocketMailbox(Generic[In]):
    """The worker-process end: plain blocking socket calls (the worker's loop is compute, not asyncio)."""

    def __init__(self, sock: socket.socket, in_type: type[In] | Any) -> None:
        self._sock = sock
        self._decoder = msgspec.msgpack.Decoder(in_type)
        self._encoder = msgspec.msgpack.Encoder()

    def send(self, msg: msgspec.Struct) -> None:
        payload = self._encoder.encode(msg)
        try:
            self._sock.sendall(_LEN.pack(len(payload)) + payload)
        except OSError:
            raise MailboxClosed from None

    def receive(self) -> In:
        (length,) = _LEN.unpack(self._read_exactly(_LEN.size))
        return self._decoder.decode(self._read_exactly(length))

    def _read_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self._sock.recv_into(view[got:], n - got)
            except OSError:
                raise MailboxClosed from None
            if k == 0:
                raise MailboxClosed
            got += k
        return bytes(buf)

    def close(self) -> None:
        self._sock.close()
