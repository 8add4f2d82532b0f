"""A TCP proxy on loopback that a test puts between the app and PostgreSQL, to break the
network on purpose.

* ``refuse()`` closes the listening socket: new connections are refused (``ECONNREFUSED``),
  as when the database host is up but PostgreSQL is not; ``accept()`` listens again on the
  same port ("the database is back").
* ``cut()`` ends every open connection at once, with a TCP reset by default (both sides see
  ``ECONNRESET``), as a restart or a network cut does; ``cut(reset=False)`` closes them
  cleanly (FIN) instead.
* ``stall()`` keeps reading what either side sends but forwards nothing (a hung network:
  no error, no answer) until ``resume()``, which delivers what was held, in order.

Connections opened while the proxy accepts are forwarded byte for byte, each to its own
upstream connection. ``upstream_ports`` are the local ports of those upstream connections:
PostgreSQL reports them as ``pg_stat_activity.client_port``, which tells the backends serving
the proxied connections apart from any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType

HOST = "127.0.0.1"
CHUNK = 64 * 1024


def _reset_on_close(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER with a zero timeout: closing the socket sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Link:
    """One proxied connection: the client's side, the upstream side, and two pumps."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []
        sockname = upstream.get_extra_info("sockname")
        self.upstream_port: int = sockname[1] if sockname else 0

    def end(self, *, reset: bool) -> None:
        for writer in (self.client, self.upstream):
            if reset:
                _reset_on_close(writer)
                writer.transport.abort()
            else:
                writer.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` until told otherwise."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.accepted = 0  # connections accepted since the start
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> TcpProxy:
        await self.accept()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self.refuse()
        self.resume()
        await self.cut(reset=False)

    # --- the controls -------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def accept(self) -> None:
        """Listen (again) on the proxy's port; the first call chooses a free port."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, HOST, self.port, reuse_address=True, backlog=128
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def refuse(self) -> None:
        """Close the listening socket: connecting now fails at once with ECONNREFUSED.
        Connections already open are left alone (``cut`` ends them)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()  # closes the listening socket now; open connections stay

    async def cut(self, *, reset: bool = True) -> int:
        """End every open connection (RST by default); returns how many there were."""
        links = list(self._links)
        self._links.clear()
        for link in links:
            link.end(reset=reset)
        tasks = [t for link in links for t in link.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(links)

    def stall(self) -> None:
        """Forward nothing from now on (bytes are read and held) until ``resume``."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    @property
    def upstream_ports(self) -> list[int]:
        return sorted(link.upstream_port for link in self._links)

    # --- forwarding ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.upstream_host.startswith("/"):
                # A socket directory (the embedded server listens on a Unix socket only).
                up_reader, up_writer = await asyncio.open_unix_connection(
                    f"{self.upstream_host}/.s.PGSQL.{self.upstream_port}"
                )
            else:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
        except OSError:
            _reset_on_close(writer)
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link), name="proxy-up"),
            asyncio.create_task(self._pump(up_reader, writer, link), name="proxy-down"),
        ]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # a stalled proxy holds what it read
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side went away (or the proxy ends the link): the other side follows, with
            # a FIN, as a TCP relay does; ``cut`` has already dropped the link with RSTs.
            if link in self._links:
                self._links.discard(link)
                link.end(reset=False)
