"""The MCP session pool of a worker process.

One event loop per process, on its own thread, owns every connection; each connection has one owner
task that enters and leaves the SDK's `Client` (anyio forbids entering a connection in one task and
leaving it in another). Celery task threads hand calls to the loop and wait for their answer, so one
process carries as many in-flight calls as it has task threads, over one session per server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT, CallToolResult, ListToolsResult, TextContent
from redis.exceptions import RedisError

from orchestrator.config import Config, HttpServer, StdioServer
from orchestrator.errors import (
    Cancelled,
    CredentialRejected,
    StepTimeout,
    ToolCallError,
    ToolError,
    TransportError,
    VaultError,
)
from workers.credentials import Credentials, SecretAuth
from workers.oauth import FleetOAuth
from workers.tls import server_verify

log = logging.getLogger(__name__)
T = TypeVar("T")
# A JSON-RPC error code of our own (in the range left to implementations): one HTTP request failed in transport,
# while its MCP session goes on.
REQUEST_LOST = -32090
# Seconds an idle pooled HTTP connection is reused: below the 5 s after which uvicorn and Node.js servers close
# one, so a request is not sent on a connection the server is closing.
KEEPALIVE = 2.0


def describe(exc: BaseException) -> str:
    """One line for an exception, looking inside the ExceptionGroups that `async with` raises."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    text = str(exc) or type(exc).__name__
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"


def timed_out(server: str, timeout: float) -> StepTimeout:
    return StepTimeout(f"no answer from '{server}' within {timeout:g} s; the call was cancelled")


class ContainedClient(httpx2.AsyncClient):
    """An HTTP client whose failed POST fails that one MCP message only.

    The SDK sends each POST in a task of its session's task group, so a transport error on one (a reset
    connection, a refused connect, a server closing a kept-alive connection) would end the session and fail
    every call in flight on it. Here that error becomes a JSON-RPC error answer to the message being sent.
    """

    async def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        try:
            return await super().send(request, **kwargs)
        except httpx2.TransportError as exc:
            if request.method != "POST":
                raise
            error = {"code": REQUEST_LOST, "message": f"connection lost: {describe(exc)}"}
            return httpx2.Response(502, json={"jsonrpc": "2.0", "id": None, "error": error}, request=request)


class Connection:
    """One open MCP session to one server, rebuilt on the next call after it breaks.

    A stdio server whose environment carries vault secrets is restarted, drained, when one of them gets a
    new version: new calls go to a new process while calls in flight finish on the old one, which is then
    closed. An HTTP server's secrets go through `SecretAuth`, which reads them on every request.
    """

    def __init__(
        self, name: str, spec: StdioServer | HttpServer, errlog: TextIO, credentials: Credentials | None = None
    ) -> None:
        self.name = name
        self.spec = spec
        self._errlog = errlog
        self._credentials = credentials or Credentials(None)
        self._client: Client | None = None
        self._owner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._generation = 0
        self._id = uuid.uuid4().hex[:16]  # with the generation, names a session across the fleet (`session`)
        self._versions: dict[str, int] = {}  # the secret versions the open stdio server was started with
        self._in_use: dict[int, int] = {}  # calls in flight, by generation
        self._draining: dict[int, tuple[asyncio.Event, asyncio.Task[None] | None]] = {}
        self.auth: SecretAuth | FleetOAuth | None = None

    @property
    def alive(self) -> bool:
        return self._client is not None and self._owner is not None and not self._owner.done()

    async def client(self) -> tuple[Client, int]:
        """The open client and its generation, connecting first when there is none."""
        if self.alive and self._client is not None and not self._outdated():
            return self._client, self._generation
        async with self._lock:
            if self.alive and self._outdated():
                self._retire()
            if not self.alive:
                await self._open()
            assert self._client is not None
            return self._client, self._generation

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[tuple[Client, int]]:
        """The client for one call, counted in flight so a drained restart knows when the old one is idle."""
        client, generation = await self.client()
        self._in_use[generation] = self._in_use.get(generation, 0) + 1
        try:
            yield client, generation
        finally:
            self._in_use[generation] -= 1
            if not self._in_use[generation]:
                del self._in_use[generation]
                if generation in self._draining:
                    self._draining.pop(generation)[0].set()

    def _outdated(self) -> bool:
        if not self._versions:
            return False
        try:
            return self._credentials.versions(list(self._versions)) != self._versions
        except (VaultError, RedisError) as exc:  # the vault is unreachable: keep the process that works
            log.warning("MCP server '%s': cannot check its secrets' versions: %s", self.name, type(exc).__name__)
            return False

    def _retire(self) -> None:
        # A drained restart: the current process takes no new call and stops once its calls are done.
        log.info("MCP server '%s': a secret in its environment changed; restarting it, drained", self.name)
        if self._in_use.get(self._generation):
            self._draining[self._generation] = (self._stop, self._owner)
        else:
            self._stop.set()
        self._client = None

    async def _open(self) -> None:
        opened_at = time.monotonic()
        transport = self._transport()  # reads the vault first: a missing secret fails the call, not the loop
        self._generation += 1
        self._stop = asyncio.Event()
        ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        self._owner = asyncio.create_task(
            self._own(transport, ready, self._stop, self._generation, opened_at), name=f"mcp-session-{self.name}"
        )
        self._client = await ready

    async def _own(
        self, transport: Any, ready: asyncio.Future[Client], stop: asyncio.Event, generation: int, opened_at: float
    ) -> None:
        try:
            async with Client(transport, cache=None) as client:
                ready.set_result(client)
                await stop.wait()
        except BaseException as exc:  # boundary: the owner task reports, it never raises into the loop
            if not ready.done():
                why = self.refusal(opened_at) or describe(exc)
                ready.set_exception(TransportError(f"cannot connect to MCP server '{self.name}': {why}"))
            elif not isinstance(exc, asyncio.CancelledError):
                log.warning("MCP session to %s ended: %s", self.name, describe(exc))
        finally:
            if generation == self._generation:  # a drained predecessor ending must not drop its successor
                self._client = None

    def _transport(self) -> Any:
        if isinstance(self.spec, HttpServer):
            secret_headers = self.spec.secret_headers
            for secret, _ in secret_headers.values():
                self._credentials.current(secret)
            if self.spec.oauth is not None:
                self.auth = FleetOAuth(self.name, self.spec, self._credentials)
            else:
                self.auth = SecretAuth(self.name, secret_headers, self._credentials) if secret_headers else None
            http = ContainedClient(
                headers=self.spec.plain_headers,
                auth=self.auth,
                timeout=httpx2.Timeout(30.0, read=300.0),
                limits=httpx2.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE),
                verify=server_verify(self.spec.verify),
            )
            return streamable_http_client(self.spec.url, http_client=http)
        env, self._versions = self._credentials.environment(self.spec)
        spec = self.spec
        params = StdioServerParameters(command=spec.command, args=spec.args, env=env or None, cwd=spec.cwd)
        return stdio_client(params, errlog=self._errlog)

    def refusal(self, since: float) -> str | None:
        """Which credential the HTTP server refused, after a refresh, at or after `since` (monotonic)."""
        refused = self.auth.refusals.since(since) if self.auth is not None else None
        return f"the server refused {refused}" if refused else None

    def reset(self, generation: int) -> None:
        """Drop the session a failed call used, unless it was already replaced."""
        if generation == self._generation:
            self._stop.set()
            self._client = None

    def lost(self, generation: int, message: str) -> TransportError:
        """The error for a call whose connection broke. A stdio server's session ends with it, and its name
        rides on the error: every call in flight when a server process dies fails with the same name, and the
        breaker counts them once. An HTTP session outlives one failed request (when the session itself ended,
        its owner task has ended too, and the next call opens a new one); each failed request is a verdict of
        its own."""
        error = TransportError(message)
        if isinstance(self.spec, StdioServer):
            self.reset(generation)
            error.session = f"{self._id}-{generation}"
        return error

    async def close(self) -> None:
        self._stop.set()
        owners = [self._owner, *(owner for _, owner in self._draining.values())]
        for stop, _ in self._draining.values():
            stop.set()
        for owner in owners:
            if owner is not None:
                with contextlib.suppress(BaseException):
                    await owner


class SessionPool:
    """Every MCP session of this process, and the event loop that owns them."""

    def __init__(
        self,
        servers: Config | Callable[[str], StdioServer | HttpServer],
        log_dir: Path,
        credentials: Credentials | None = None,
    ) -> None:
        # How to reach a server by name: a configuration's servers, or a lookup that also knows the
        # instances registered at run time.
        self._server = servers.server_params if isinstance(servers, Config) else servers
        self._log_dir = log_dir
        self._credentials = credentials
        self._connections: dict[str, Connection] = {}
        self._logs: dict[str, TextIO] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._in_flight: dict[str, set[asyncio.Task[Any]]] = {}

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None, key: str | None = None) -> T:
        """Run a coroutine on the pool's loop from any other thread and wait for its result.

        With a key (a run id), `cancel(key)` cancels it; the caller then gets `Cancelled`.
        """
        future = asyncio.run_coroutine_threadsafe(self._tracked(coroutine, key), self._running_loop())
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError as exc:
            raise Cancelled("the run was cancelled; the call was cancelled on the server") from exc

    async def _tracked(self, coroutine: Coroutine[Any, Any, T], key: str | None) -> T:
        if key is None:
            return await coroutine
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.setdefault(key, set()).add(task)
        try:
            return await coroutine
        finally:
            tasks = self._in_flight.get(key, set())
            tasks.discard(task)
            if not tasks:
                self._in_flight.pop(key, None)

    def cancel(self, key: str) -> None:
        """Cancel every call in flight under key (from any thread)."""
        if self._loop is None:
            return

        def cancel_all() -> None:
            for task in list(self._in_flight.get(key, ())):
                task.cancel()

        self._loop.call_soon_threadsafe(cancel_all)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="mcp-sessions", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    def _connection(self, server: str) -> Connection:
        spec = self._server(server)
        current = self._connections.get(server)
        if current is not None and current.spec != spec:  # re-registered elsewhere: the old session goes
            asyncio.get_running_loop().create_task(current.close())
            current = None
        if current is None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            errlog = self._logs.setdefault(server, open(self._log_dir / f"{server}.stderr.log", "a"))  # noqa: SIM115
            current = self._connections[server] = Connection(server, spec, errlog, self._credentials)
        return current

    async def call_tool(
        self, server: str, tool: str, arguments: dict[str, Any], timeout: float, meta: dict[str, Any] | None = None
    ) -> Any:
        """Call one tool, with `meta` as the request's `_meta`; the output is its structured content when it has
        one, else its text."""
        result = await self._request(
            server, timeout, lambda client: client.call_tool(tool, arguments, timeout, meta=meta)
        )
        assert isinstance(result, CallToolResult)
        text = "\n".join(block.text for block in result.content if isinstance(block, TextContent))
        if result.is_error:
            raise ToolError(text or f"tool '{tool}' failed", tool=tool)
        return result.structured_content if result.structured_content is not None else text

    def ready(self, server: str, timeout: float) -> None:
        """Open the session to server now, if none is open (from any thread other than the loop's): a call that
        must go at a given time (a rate limit's slot) is not held back by a session's start-up after it."""
        connection = self._connections.get(server)
        if connection is None or not connection.alive:
            self.run(self._open_session(server, timeout))

    async def _open_session(self, server: str, timeout: float) -> None:
        try:  # shielded: a call out of time leaves the session opening for the calls after it
            await asyncio.wait_for(asyncio.shield(self._connection(server).client()), timeout)
        except TimeoutError as exc:
            raise timed_out(server, timeout) from exc

    async def list_tools(self, server: str, timeout: float = 30.0) -> ListToolsResult:
        """The server's tools, asked of the server itself (the client cache is off)."""
        result = await self._request(server, timeout, lambda client: client.list_tools())
        assert isinstance(result, ListToolsResult)
        return result

    async def protocol_version(self, server: str) -> str:
        """The protocol version negotiated with the server (connecting if needed)."""
        client, _ = await self._connection(server).client()
        return client.protocol_version

    async def _request(self, server: str, timeout: float, send: Any) -> Any:
        started = time.monotonic()
        connection = self._connection(server)
        async with connection.use() as (client, generation):
            try:
                async with asyncio.timeout(timeout):  # not wait_for, which wraps each call in a task of its own
                    return await send(client)
            except TimeoutError as exc:
                raise timed_out(server, timeout) from exc
            except MCPError as exc:
                if exc.code == REQUEST_TIMEOUT:  # the SDK's own clock on the same timeout ran out first
                    raise timed_out(server, timeout) from exc
                if exc.code in (CONNECTION_CLOSED, REQUEST_LOST):
                    raise connection.lost(generation, f"MCP server '{server}': {exc.message}") from exc
                if refusal := connection.refusal(started):
                    raise CredentialRejected(f"MCP server '{server}': {refusal}") from exc
                raise ToolCallError(
                    f"MCP server '{server}' refused the request: {exc.message} (code {exc.code})"
                ) from exc
            except (
                OSError,
                anyio.ClosedResourceError,
                anyio.BrokenResourceError,
                anyio.EndOfStream,
                httpx2.HTTPError,
            ) as exc:
                raise connection.lost(generation, f"MCP server '{server}': connection lost: {describe(exc)}") from exc

    def close(self) -> None:
        """Close every session (stopping stdio servers) and the loop."""
        if self._loop is None:
            return

        async def close_all() -> None:
            await asyncio.gather(*(connection.close() for connection in self._connections.values()))

        with contextlib.suppress(Exception):
            self.run(close_all(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None
        self._connections.clear()
        for errlog in self._logs.values():
            errlog.close()
        self._logs.clear()
