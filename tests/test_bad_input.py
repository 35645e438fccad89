"""Bad input and an unreachable Redis, as the real CLI meets them: one line on stderr, `error: ...` naming what is
wrong and where, exit 2 for bad input and 3 for Redis; never a traceback.

The bad files are a corpus in tests/bad/, indexed with the message each must give by tests/bad/cases.yaml.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, TEST_SERVICES, PrivateRedis, cli_at_once

BAD = ROOT / "tests" / "bad"
CASES: list[dict[str, Any]] = yaml.safe_load((BAD / "cases.yaml").read_text())
EXIT_INVALID, EXIT_UNREACHABLE = 2, 3


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line the command wrote on stderr (the once-per-home access note aside)."""
    lines = [line for line in done.stderr.splitlines() if not line.startswith("note: ")]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture
def home_env(tmp_path: Path) -> dict[str, str]:
    """A home of its own, without REDIS_URL: bad input fails before any Redis is asked."""
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "MCPO_REDIS_URL")}
    env["MCPO_HOME"] = str(tmp_path / "home")
    return env


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_bad_input_is_one_error_line_exit_2(case: dict[str, Any], home_env: dict[str, str]) -> None:
    args = [arg.replace("{bad}", str(BAD.relative_to(ROOT))) for arg in case["args"]]
    done = cli(home_env, *args)
    line = error_line(done)
    assert case["error"] in line, line
    assert done.returncode == case.get("exit", EXIT_INVALID), done.stderr
    assert len(line) < 600, line  # an over-long value is shown cut, not whole


def test_every_corpus_file_is_used() -> None:
    used = {Path(arg.split("/")[-1]).name for case in CASES for arg in case["args"] if "{bad}" in arg}
    assert used == {path.name for path in BAD.iterdir()} - {"cases.yaml"}


# Redis down, then frozen: every command that needs Redis says so in one line, exit 3, within its client timeout.


def redis_commands(run_id: str) -> list[list[str]]:
    config = ["-c", str(TEST_SERVICES)]
    return [
        ["status", run_id],
        ["show", run_id],
        ["cancel", run_id],
        ["enqueue", *config, str(BAD / "good.yaml")],
        ["run", *config, str(BAD / "good.yaml")],
        ["services", *config],
        ["discover", *config],
    ]


@pytest.fixture
def redis_env(home_env: dict[str, str], private_redis: PrivateRedis) -> dict[str, str]:
    return {**home_env, "REDIS_URL": private_redis.url}


def test_redis_down_is_one_error_line_exit_3(redis_env: dict[str, str], private_redis: PrivateRedis) -> None:
    private_redis.stop()
    commands = redis_commands("0123456789abcdef0123456789abcdef")
    for args, done in zip(commands, cli_at_once([(redis_env, args) for args in commands], 60), strict=True):
        line = error_line(done)
        assert f"Redis at 127.0.0.1:{private_redis.port} is not reachable" in line, (args, line)
        assert done.returncode == EXIT_UNREACHABLE, (args, done.stderr)


def test_a_frozen_redis_is_an_error_within_the_client_timeout(
    redis_env: dict[str, str], private_redis: PrivateRedis
) -> None:
    assert private_redis._process is not None
    os.kill(private_redis._process.pid, signal.SIGSTOP)
    try:
        commands = [["status", "0123456789abcdef"], ["enqueue", "-c", str(TEST_SERVICES), str(BAD / "good.yaml")]]
        for args, done in zip(commands, cli_at_once([(redis_env, args) for args in commands], 60), strict=True):
            line = error_line(done)  # cli_at_once raises past 60 s: a frozen Redis must not hang a command
            assert f"Redis at 127.0.0.1:{private_redis.port} is not reachable" in line, (args, line)
            assert done.returncode == EXIT_UNREACHABLE, (args, done.stderr)
    finally:
        os.kill(private_redis._process.pid, signal.SIGCONT)


def test_status_and_show_read_the_records_when_redis_is_down(home_env: dict[str, str]) -> None:
    # A run made on the embedded default is in the records (SQLite under the home); its Redis is then gone.
    done = cli(home_env, "run", "-c", str(TEST_SERVICES), str(BAD / "good.yaml"), "--json")
    assert done.returncode == 0, done.stderr
    run_id = yaml.safe_load(done.stdout)["id"]
    down = {**home_env, "REDIS_URL": f"redis://127.0.0.1:{free_closed_port()}/0"}
    for command in ("status", "show"):
        shown = cli(down, command, run_id, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert run_id in shown.stdout and "succeeded" in shown.stdout
        assert "Traceback" not in shown.stderr


def free_closed_port() -> int:
    from .conftest import free_port

    return free_port()  # nothing listens on it once the probe closed


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_run_following_a_run_when_redis_goes_away_says_how_to_look_it_up(home_env: dict[str, str],
                                                                         tmp_path: Path) -> None:  # fmt: skip
    # The embedded default: the `run` process starts its own redis-server, which this test then kills.
    workflow = tmp_path / "slow.yaml"
    workflow.write_text("steps:\n  - id: nap\n    service: testing\n    tool: sleep\n    parameters: {seconds: 10}\n")
    # The follower (and the in-process worker's calls) ride out a Redis outage of MCPO_REDIS_OUTAGE first: 3 s here.
    env = {**home_env, "MCPO_REDIS_OUTAGE": "3"}
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "-c", str(TEST_SERVICES),
                                str(workflow)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        while first.startswith("note: "):
            first = process.stderr.readline()
        assert first.startswith("run ") and first.rstrip().endswith(" enqueued"), first
        run_id = first.split()[1]
        redis = [pid for pid in children(process.pid) if "redis" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert redis, "the embedded redis-server was not found"
        os.kill(redis[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and "is not reachable" in lines[0], stderr
    assert f"look it up later: mcp-orchestrator status {run_id}" in lines[0], lines[0]
    assert process.returncode == EXIT_UNREACHABLE, stderr


def test_discover_on_the_embedded_default(home_env: dict[str, str]) -> None:
    done = cli(home_env, "discover", "-c", str(TEST_SERVICES))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("testing: ") and " echo" in done.stdout
