"""A TCP proxy on 127.0.0.1 (port 0) in front of a real server (Redis, or a fake
platform's HTTP and websocket server), for the network's bad days: hold a
command for a while before passing it on, pass a command on and lose its answer
(the connection drops just before the reply), so the client's own retry sends it
again, or take the network away until it is restored: cut (every connection reset,
new ones too) or stalled (nothing flows, connections stay open)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field


@dataclass
class _Rule:
    marker: bytes  # matched in what the client sends
    delay: float = 0.0
    drop_reply: bool = False


@dataclass
class TcpProxy:
    target_host: str
    target_port: int
    port: int = 0
    seen: list[bytes] = field(default_factory=list)  # every chunk a client sent, in order
    _rules: list[_Rule] = field(default_factory=list)
    down: bool = False  # cut(): new connections are closed at once, until restore()
    cuts: int = 0
    stalls: int = 0
    _flowing: asyncio.Event = field(default_factory=asyncio.Event)  # cleared by stall(), set by restore()
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _open: set[asyncio.StreamWriter] = field(default_factory=set)  # both ends of every open connection

    async def start(self) -> TcpProxy:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def delay_next(self, marker: bytes, seconds: float) -> None:
        """Hold the next chunk containing `marker` for `seconds` before passing it on."""
        self._rules.append(_Rule(marker, delay=seconds))

    def drop_next_reply(self, marker: bytes) -> None:
        """Pass the next chunk containing `marker` on, then drop that connection
        instead of returning the server's answer."""
        self._rules.append(_Rule(marker, drop_reply=True))

    def count(self, marker: bytes) -> int:
        return sum(marker in chunk for chunk in self.seen)

    def cut(self) -> None:
        """The network is gone and a middlebox says so: every open connection is reset, and
        new ones are reset as they come, until restore()."""
        self.down = True
        self.cuts += 1
        for writer in list(self._open):
            _reset(writer)
        self._open.clear()

    def stall(self) -> None:
        """The network is gone silently (packets dropped): nothing flows on any connection, old or
        new, until restore(); then it all goes through, late, as TCP's retransmissions would. A
        client sees its calls hang, and gives up on them only by its own timeouts."""
        self.stalls += 1
        self._flowing.clear()

    def restore(self) -> None:
        self.down = False
        self._flowing.set()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        if self.down:
            _reset(client_writer)
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:  # the server is down (a restart): the client sees its connection dropped
            _reset(client_writer)
            return
        if self.down:  # cut while connecting
            _reset(client_writer)
            _reset(server_writer)
            return
        self._open |= {client_writer, server_writer}
        dropping = asyncio.Event()
        upstream = asyncio.create_task(self._upstream(client_reader, server_writer, dropping))
        downstream = asyncio.create_task(self._downstream(server_reader, client_writer, dropping))
        self._tasks |= {upstream, downstream}
        try:
            await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (upstream, downstream):
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_writer, server_writer):
                self._open.discard(writer)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        dropping: asyncio.Event) -> None:  # fmt: skip
        with contextlib.suppress(ConnectionError):
            await self._pass_upstream(reader, writer, dropping)

    async def _pass_upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             dropping: asyncio.Event) -> None:  # fmt: skip
        while chunk := await reader.read(65536):
            self.seen.append(chunk)
            rule = next((rule for rule in self._rules if rule.marker in chunk), None)
            if rule is not None:
                self._rules.remove(rule)
                if rule.delay:
                    await asyncio.sleep(rule.delay)
                if rule.drop_reply:
                    dropping.set()
            await self._flowing.wait()
            writer.write(chunk)
            await writer.drain()

    async def _downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          dropping: asyncio.Event) -> None:  # fmt: skip
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                if dropping.is_set():
                    return  # the command ran; its answer is lost with the connection
                await self._flowing.wait()
                writer.write(chunk)
                await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop a connection with a reset (SO_LINGER 0), not a polite FIN: what a lost network looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
