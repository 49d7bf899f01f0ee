"""The gateway's hot path to vLLM: one HTTP/1.1 exchange per generation on kept-alive connections, parsed
by llhttp (httptools, as uvicorn parses vLLM's side) inside the connection's own callbacks.

Why not the aiohttp client here: a streamed token costs the gateway an engine read, a parse and a client
write, and through aiohttp's client each one also wakes a task through its stream reader and timers. On
the 2-core CPU box that tripled the CPU of a bare byte pipe between the same sockets. Here each arrival
is handled in the callback that reads it, and the relay writes it on at once (serving/relay.py).

One `EngineCall` is one request: `head()` waits for the status line and headers, then either `read()`
(the whole body) or `stream(sink)` (each body piece handed to `sink` as it arrives, `pause()`/`resume()`
for a client that reads slowly). A connection goes back to the pool only after a complete response
that keeps it alive; a call abandoned midway (`abort()`) closes it, which makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools

from lcserve.engine import bearer, engine_address

# headers sent upstream may come from a client: a value with a line break would forge a header
_UNSAFE = (b"\r", b"\n")


class EngineRefused(Exception):
    """The engine did not accept a connection: it is not listening (down, or not yet up)."""


class EngineLost(Exception):
    """The engine connection broke before the response was complete."""


class EngineCall:
    """One request and its answer. The connection is `connection`'s until the answer is complete; the
    parsed answer stays here for the relay to take, while the connection serves the next request."""

    def __init__(self, connection: _Connection):
        self.connection = connection
        loop = asyncio.get_running_loop()
        self._head, self._done = loop.create_future(), loop.create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self.received = False  # any byte of the answer: a request that got none may be sent again
        self.complete = False

    async def head(self) -> tuple[int, dict[str, str]]:
        await self._head
        return self.status, self.headers

    async def read(self) -> bytes:
        """The whole body; EngineLost when the connection broke first."""
        await self._done
        return b"".join(self._body)

    async def stream(self, sink: Callable[[bytes], None]) -> None:
        """Hand each body piece to `sink` as it arrives (what came with the head first); returns at the end
        of the body, raises EngineLost when the connection breaks first."""
        pending, self._body = self._body, []
        self._sink = sink
        for piece in pending:
            sink(piece)
        await self._done

    def pause(self) -> None:
        if not self.complete:
            self.connection.transport.pause_reading()

    def resume(self) -> None:
        if not self.complete:
            self.connection.transport.resume_reading()

    def abort(self) -> None:
        """Leave the call: the connection is closed (vLLM aborts a request whose client went away)."""
        if not self.complete:
            self.connection.transport.abort()

    def headed(self, status: int) -> None:
        self.status = status
        if not self._head.done():
            self._head.set_result(None)

    def completed(self) -> None:
        self.complete = True
        if not self._done.done():
            self._done.set_result(None)

    async def answered(self) -> None:
        """The head arrived: the engine took the request (EngineLost, or cancelled, before that)."""
        await asyncio.shield(self._head)

    def body(self, piece: bytes) -> None:
        if self._sink is not None:
            self._sink(piece)
        else:
            self._body.append(piece)

    def fail(self, error: Exception) -> None:
        for future in (self._head, self._done):
            if not future.done():
                future.set_exception(error)
                future.exception()  # read, so an unawaited one is not logged as "never retrieved"


class _Connection(asyncio.Protocol):
    """A kept-alive connection to the engine, one call at a time; llhttp's callbacks fill the call."""

    def __init__(self, pool: EnginePool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.call: EngineCall | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._last_read = 0.0
        self._watch: asyncio.TimerHandle | None = None

    def send(self, request: bytes) -> EngineCall:
        self.call = EngineCall(self)
        self.parser = httptools.HttpResponseParser(self)
        self._last_read = self._loop.time()
        self._watch = self._loop.call_later(self.pool.read_timeout_s, self._check_silence)
        self.transport.write(request)
        return self.call

    def _check_silence(self) -> None:
        """One timer per call, not per read: an engine silent for `read_timeout_s` loses the call."""
        self._watch = None
        if self.call is None:
            return
        silent = self._loop.time() - self._last_read
        if silent < self.pool.read_timeout_s:
            self._watch = self._loop.call_later(self.pool.read_timeout_s - silent, self._check_silence)
            return
        self.call.fail(EngineLost(f"the engine sent nothing for {self.pool.read_timeout_s:g} s"))
        self.transport.abort()

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.call is None:  # nothing was asked: not an answer
            self.transport.abort()
            return
        self.call.received = True
        self._last_read = self._loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.call.fail(EngineLost(f"the engine's answer is not HTTP: {e}"))
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watch()
        self.pool.forget(self)
        if self.call is not None and not self.call.complete:
            self.call.fail(EngineLost("the engine closed the connection before the response was complete"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.call.headers[name.decode("latin-1").title()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.call.headed(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.call.body(body)

    def on_message_complete(self) -> None:
        call, self.call = self.call, None
        self._stop_watch()
        call.completed()
        if self.parser.should_keep_alive() and not self.transport.is_closing():
            self.pool.give_back(self)
        else:
            self.transport.close()


class EnginePool:
    """Kept-alive connections to the engine at `address()` (read at each call: the supervisor owns it)."""

    def __init__(
        self,
        address: Callable[[], str],
        api_key: str | None = None,
        read_timeout_s: float = 3600.0,
        idle_limit: int = 64,
    ):
        self.address = address
        self.api_key = api_key
        self.read_timeout_s = read_timeout_s  # an engine that sends nothing for this long loses the call (502)
        self.idle_limit = idle_limit
        self._idle: list[_Connection] = []
        self._idle_address: str | None = None

    async def call(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> EngineCall:
        """Send one request; EngineRefused when no connection can be made. A kept-alive connection that the
        engine closed while idle is noticed before any answer, and the request is sent once more on a new one."""
        url = self.address()
        base, uds = engine_address(url)
        request = self._request(method, path, body, headers, base)
        if url != self._idle_address:  # a new engine: the old one's connections are dead
            self.close()
            self._idle_address = url
        while self._idle:
            connection = self._idle.pop()
            if connection.transport.is_closing():
                continue
            call = connection.send(request)
            try:
                await call.answered()
                return call
            except EngineLost:
                if call.received:
                    raise
            except asyncio.CancelledError:  # the client went away: so does the engine request
                call.abort()
                raise
        connection = await self._connect(base, uds)
        return connection.send(request)

    async def _connect(self, base: str, uds: str | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if uds:
                _, connection = await loop.create_unix_connection(lambda: _Connection(self), uds)
            else:
                host, _, port = base.removeprefix("http://").rpartition(":")
                _, connection = await asyncio.wait_for(
                    loop.create_connection(lambda: _Connection(self), host.strip("[]"), int(port)), 5
                )
        except (TimeoutError, OSError) as e:
            raise EngineRefused(str(e)) from None
        return connection

    def _request(self, method: str, path: str, body: bytes, headers: dict[str, str], base: str) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {base.removeprefix('http://')}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in bearer(self.api_key).items()]
        head = "\r\n".join(lines).encode("latin-1")
        for name, value in headers.items():
            raw = f"{name}: {value}".encode("latin-1", "replace")
            if not any(c in raw for c in _UNSAFE):
                head += b"\r\n" + raw
        return head + b"\r\n\r\n" + body

    def give_back(self, connection: _Connection) -> None:
        if len(self._idle) < self.idle_limit:
            self._idle.append(connection)
        else:
            connection.transport.close()

    def forget(self, connection: _Connection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.transport.close()
        self._idle.clear()
