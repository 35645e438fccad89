"""The worker's MCP session pool against real servers, and the SDK traps it must avoid."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import ToolError, TransportError, load_config
from orchestrator.config import parse_config
from orchestrator.errors import StepTimeout
from workers.sessions import SessionPool

from .conftest import ROOT, SERVERS, SERVICES, TEST_SERVICES
from .proxy import TcpProxy

MEMORY_SERVER = "@modelcontextprotocol/server-memory@2026.8.31"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[SessionPool]:
    sessions = SessionPool(load_config(TEST_SERVICES), tmp_path / "logs")
    yield sessions
    sessions.close()


def call(pool: SessionPool, tool: str, arguments: dict[str, Any] | None = None, timeout: float = 20) -> Any:
    return pool.run(pool.call_tool("testing", tool, arguments or {}, timeout))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_python_server_speaks_2026_07_28_and_structured_output(pool: SessionPool) -> None:
    assert pool.run(pool.protocol_version("testing")) == "2026-07-28"
    assert call(pool, "echo", {"value": [1, {"a": 2}]})["value"] == [1, {"a": 2}]


def test_one_session_carries_over_64_calls_in_flight(pool: SessionPool) -> None:
    async def many() -> list[Any]:
        return await asyncio.gather(
            *(pool.call_tool("testing", "concurrent", {"seconds": 1.0}, 30) for _ in range(100))
        )

    answers = pool.run(many())
    assert max(answer["max_in_flight"] for answer in answers) >= 64
    assert len({answer["pid"] for answer in answers}) == 1  # one server process, not one per call


def test_calls_from_many_threads_share_one_session(pool: SessionPool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as threads:
        pids = set(threads.map(lambda i: call(pool, "echo", {"value": i})["pid"], range(64)))
    assert len(pids) == 1


def test_tool_error_is_not_a_transport_fault(pool: SessionPool) -> None:
    with pytest.raises(ToolError, match="Error executing tool fail"):
        call(pool, "fail", {"message": "bad"})
    assert call(pool, "echo")["value"] is None  # the session is still good


def test_dead_server_is_rebuilt_on_the_next_call(pool: SessionPool) -> None:
    first = call(pool, "echo")["pid"]
    with pytest.raises(TransportError):
        call(pool, "crash")
    second = call(pool, "echo")["pid"]
    assert second != first and not alive(first)


def test_timeout_cancels_the_call_and_the_session_stays_usable(pool: SessionPool) -> None:
    pid = call(pool, "echo")["pid"]
    with pytest.raises(StepTimeout, match=r"within 0\.3 s"):
        call(pool, "sleep", {"seconds": 30}, timeout=0.3)
    assert call(pool, "echo")["pid"] == pid


def test_connect_failure_is_one_clear_error_not_an_exception_group(tmp_path: Path) -> None:
    config = parse_config(
        {"servers": {"broken": {"command": "python", "args": ["does-not-exist.py"]}}}, base_dir=tmp_path
    )
    sessions = SessionPool(config, tmp_path / "logs")
    try:
        with pytest.raises(TransportError, match="cannot connect to MCP server 'broken'") as caught:
            sessions.run(sessions.call_tool("broken", "x", {}, 10))
        assert not isinstance(caught.value, BaseExceptionGroup)
    finally:
        sessions.close()


def test_tool_lists_are_not_cached(pool: SessionPool) -> None:
    before = {tool.name for tool in pool.run(pool.list_tools("testing")).tools}
    call(pool, "register", {"name": "late_tool"})
    after = {tool.name for tool in pool.run(pool.list_tools("testing")).tools}
    assert "late_tool" not in before and "late_tool" in after


def test_stderr_goes_to_a_log_and_never_blocks(pool: SessionPool, tmp_path: Path) -> None:
    assert call(pool, "shout", {"lines": 5000}) == {"result": 5000}
    log = (tmp_path / "logs" / "testing.stderr.log").read_text()
    assert "stderr line 4999" in log


def test_stdio_environment_is_the_allow_list_plus_the_config(
    pool: SessionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCPO_TEST_PARENT_SECRET", "must-not-leak")
    assert call(pool, "getenv", {"name": "TESTING_TOKEN"})["value"] == "from-config"
    assert call(pool, "getenv", {"name": "MCPO_TEST_PARENT_SECRET"})["value"] is None
    assert call(pool, "getenv", {"name": "PATH"})["value"]


def test_close_stops_every_server_process(tmp_path: Path) -> None:
    sessions = SessionPool(load_config(SERVICES), tmp_path / "logs")
    pids = [sessions.run(sessions.call_tool("safla", "deploy_safla_instance", {}, 20))["server_pid"]]
    sessions.close()
    assert not any(alive(pid) for pid in pids)


def test_streamable_http_server(http_server: Callable[..., str], tmp_path: Path) -> None:
    url = http_server("knowledge.py", "docs")
    sessions = SessionPool(parse_config({"servers": {"docs": {"url": url}}}), tmp_path / "logs")

    async def many() -> list[Any]:
        return await asyncio.gather(
            *(sessions.call_tool("docs", "lookup", {"library": f"lib{i}"}, 20) for i in range(20))
        )

    try:
        answers = sessions.run(many())
        assert [a["library"] for a in answers] == [f"lib{i}" for i in range(20)]
    finally:
        sessions.close()


def test_one_http_request_lost_on_the_way_fails_that_call_alone(
    http_server: Callable[..., str], tmp_path: Path
) -> None:
    url = http_server(str(SERVERS / "testing.py"))
    proxy = TcpProxy(("127.0.0.1", int(url.split(":")[2].split("/")[0])), drop=b"dropped-on-the-way")
    sessions = SessionPool(parse_config({"servers": {"t": {"url": f"http://127.0.0.1:{proxy.port}/mcp"}}}),
                           tmp_path / "logs")  # fmt: skip

    async def one(tool: str, arguments: dict[str, Any]) -> Any:
        try:
            return await sessions.call_tool("t", tool, arguments, 20)
        except TransportError as exc:
            return exc

    async def together() -> list[Any]:
        calls = [one("sleep", {"seconds": 1.0}) for _ in range(9)]
        return await asyncio.gather(*calls, one("echo", {"value": "dropped-on-the-way"}))

    try:
        sessions.run(one("echo", {"value": "first"}))  # the session is open before the calls start
        *slept, lost = sessions.run(together())
        assert isinstance(lost, TransportError) and "connection lost" in str(lost) and lost.session is None, lost
        assert not [answer for answer in slept if isinstance(answer, Exception)], slept  # the other 9 finished
        assert sessions.run(one("echo", {"value": "after"}))["value"] == "after"
    finally:
        sessions.close()


@pytest.fixture(scope="session")
def memory_server() -> Path:
    """The reference npm memory server, installed from the npm registry into the project's cache."""
    prefix = ROOT / ".cache" / "npm"
    entry = prefix / "node_modules" / "@modelcontextprotocol" / "server-memory" / "dist" / "index.js"
    if not entry.exists():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install the npm MCP server used by this test"
        subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", MEMORY_SERVER],
                       check=True, capture_output=True, timeout=300)  # fmt: skip
    assert entry.exists()
    return entry


def test_npm_server_speaks_2025_11_25(memory_server: Path, tmp_path: Path) -> None:
    config = parse_config({"servers": {"memory": {
        "command": "node", "args": [str(memory_server)], "env": {"MEMORY_FILE_PATH": str(tmp_path / "memory.jsonl")},
    }}})  # fmt: skip
    sessions = SessionPool(config, tmp_path / "logs")
    try:
        assert sessions.run(sessions.protocol_version("memory")) == "2025-11-25"
        entity = {"name": "celery", "entityType": "library", "observations": ["task queue"]}
        sessions.run(sessions.call_tool("memory", "create_entities", {"entities": [entity]}, 20))
        graph = sessions.run(sessions.call_tool("memory", "read_graph", {}, 20))
        assert [e["name"] for e in graph["entities"]] == ["celery"]
    finally:
        sessions.close()
