"""A secured fleet beside the benchmark's plain one, with everything a production user switches on at once:
Celery message signing, caller-token checks at the worker, and the MCP server's credential from the vault.

It runs the bench service of bench/services.yaml, as `secure`, in a namespace of its own (signed and unsigned workers
cannot share a control queue), on the same broker: one `mcp-orchestrator worker` and one client process
(bench/secure_client.py), since signing is global to a process. Keys, certificate, vault key ring and
configuration are generated under the benchmark's home.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml
from redis import Redis

from bench._common import CONFIG, HOME, NAMESPACE, ROOT, Workers
from orchestrator.security.identity import SigningKey, TokenBook
from orchestrator.security.vault import KeyRing, Vault
from workers.signing import create_identity

SECURE_HOME = HOME / "secure"
# Under the run's namespace, so the broker's clean-up at the end removes its keys and queues too.
SECURE_NAMESPACE = f"{NAMESPACE}.secure"
SECRET = "safla-api-key"  # the SAFLA server takes it in its environment, as a real server's API key


def secure_config(workflow: dict[str, Any]) -> Path:
    """bench/services.yaml with access control, signing and a vault secret in the server's environment, and
    the workflow; written under the secured home (so the server's path is made absolute)."""
    # An Ed25519 key and its certificate as `init --secure` makes them, the certificate alone in the store.
    key, cert = SECURE_HOME / "fleet.key", SECURE_HOME / "trusted" / "fleet.pem"
    create_identity(key, cert, "fleet", days=1)
    config = yaml.safe_load(CONFIG.read_text())
    server = config["servers"]["safla"]
    server["args"] = [str((CONFIG.parent / server["args"][0]).resolve())]
    server["env"] = {"SAFLA_API_KEY": {"secret": SECRET}}
    config["services"] = {"secure": config["services"]["bench"]}  # its own name: its own queue and worker log
    config["access"] = {"enabled": True, "signing": {"key": str(key), "certificate": str(cert),
                                                     "store": str(cert.parent), "digest": "sha256"}}  # fmt: skip
    config["workflows"] = {workflow["id"]: workflow}
    path = SECURE_HOME / "secure.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def provision(url: str) -> tuple[str, Path]:
    """The secured namespace's vault secret (under a key ring of its own) and an operator's caller token;
    returns the token and the key ring file."""
    ring = KeyRing(path=SECURE_HOME / "vault.keys")
    ring.ensure()
    SigningKey.from_environment().ensure()  # the token key file in the home, which workers share
    with Redis.from_url(url) as redis:
        Vault(redis, SECURE_NAMESPACE, ring).set(SECRET, secrets.token_urlsafe(32))
        token, _ = TokenBook(redis, SECURE_NAMESPACE).issue("bench", "operator", 3600)
    assert ring.path is not None
    return token, ring.path


class SecureClient:
    """The client process: one run of the workflow per call, timed inside it; `worker` is its worker's pid."""

    def __init__(self, config: Path, workflow: str, env: dict[str, str], worker: int) -> None:
        log = open(HOME / "secure-client.log", "wb")  # noqa: SIM115 (the child writes to it until it ends)
        self.process = subprocess.Popen([sys.executable, "-m", "bench.secure_client", str(config), workflow],
                                        env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=log, text=True)  # fmt: skip
        self.worker = worker
        self._read("ready")

    def run(self) -> float:
        """Seconds from enqueue to the run's end, as the client measured them."""
        self._stdin.write("\n")
        self._stdin.flush()
        return float(self._read())

    def close(self) -> None:
        self._stdin.close()  # the client ends at the end of its input
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    @property
    def _stdin(self) -> IO[str]:
        assert self.process.stdin is not None
        return self.process.stdin

    def _read(self, expected: str | None = None) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line or (expected is not None and line != expected):
            raise RuntimeError(f"the secured client said {line!r}; see {HOME / 'secure-client.log'}")
        return line


@contextlib.contextmanager
def secured(url: str, workflow: dict[str, Any], concurrency: int) -> Iterator[SecureClient]:
    """The secured fleet: its worker and its client, stopped at the end."""
    config = secure_config(workflow)
    token, ring = provision(url)
    env = {"MCPO_NAMESPACE": SECURE_NAMESPACE, "MCPO_VAULT_KEY_FILE": str(ring)}
    workers = Workers(url, env)
    try:
        # The parent, unsigned, cannot see a signed worker's queues: the client waits for it instead.
        workers.ours("secure", concurrency, config, wait=False)
        client = SecureClient(config, workflow["id"], {**workers.env, "MCPO_TOKEN": token}, workers.pids[0])
        try:
            yield client
        finally:
            client.close()
    finally:
        workers.stop()
