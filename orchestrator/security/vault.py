"""The credential vault: server credentials encrypted at rest in Redis, under a key ring Redis never sees.

Each secret is one field of the `<namespace>:vault` hash: its current version and the ciphertext of its last
few versions (Fernet tokens), each with its creation time. The key ring (Fernet keys, newest first) comes
from MCPO_VAULT_KEYS or a key file (default `<MCPO_HOME>/vault.keys`, mode 0600), never from Redis, so a
copy of Redis holds nothing readable. Writes (set, rm, key rotation) hold a Redis lock, so a secret is never
written under a ring that a concurrent rotation is about to retire.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis import Redis

from orchestrator.errors import KeyRingMissing, SecretNotFound, SecretUndecryptable, VaultError
from orchestrator.history import events
from orchestrator.security import redaction
from orchestrator.security.events import security_event
from orchestrator.settings import settings
from orchestrator.text import as_text

KEEP_VERSIONS = 5  # older versions are dropped: a rotation needs the new one, history needs a few
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class VaultSettings(BaseSettings):
    """Where the key ring comes from: MCPO_VAULT_KEYS (comma-separated, newest first) or MCPO_VAULT_KEY_FILE."""

    model_config = SettingsConfigDict(env_prefix="MCPO_VAULT_", extra="ignore")
    keys: str | None = None
    key_file: Path | None = None


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise VaultError(f"invalid secret name {name!r}: letters, digits, '.', '_' and '-', at most 128")
    return name


class KeyRing:
    """The vault's Fernet keys, newest first: given in the environment, else read from the key file."""

    def __init__(self, keys: list[bytes] | None = None, path: Path | None = None) -> None:
        self._keys = keys
        self.path = path

    @classmethod
    def from_environment(cls) -> KeyRing:
        chosen = VaultSettings()
        keys = [key.strip().encode() for key in chosen.keys.split(",") if key.strip()] if chosen.keys else None
        return cls(keys or None, chosen.key_file or settings.home / "vault.keys")

    @property
    def from_env(self) -> bool:
        return self._keys is not None

    @property
    def source(self) -> str:
        return "MCPO_VAULT_KEYS" if self._keys is not None else str(self.path)

    def load(self) -> list[bytes]:
        """The keys, read afresh from the file each time (a rotation may have changed it)."""
        if self._keys is not None:
            return _checked(self._keys, self.source)
        if self.path is None or not self.path.exists():
            raise KeyRingMissing(
                f"no vault key ring: set MCPO_VAULT_KEYS or create the key file {self.path} "
                "(`mcp-orchestrator secrets set` creates it)"
            )
        lines = [line.strip() for line in self.path.read_text().splitlines()]
        keys = [line.encode() for line in lines if line and not line.startswith("#")]
        if not keys:
            raise KeyRingMissing(f"the vault key file {self.path} holds no key")
        return _checked(keys, self.source)

    def fernet(self) -> MultiFernet:
        return MultiFernet([Fernet(key) for key in self.load()])

    def ensure(self) -> bool:
        """Create the key file with one new key when there is no ring at all; True when it was created."""
        if self._keys is not None or (self.path is not None and self.path.exists()):
            return False
        self.write([Fernet.generate_key()])
        return True

    def write(self, keys: list[bytes]) -> None:
        """Replace the key file at once (write aside, then rename), readable by its owner only."""
        if self.path is None or self._keys is not None:
            raise VaultError("the key ring comes from MCPO_VAULT_KEYS; the key file is not used")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        aside = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write("# mcp-orchestrator vault keys, newest first\n")
            handle.writelines(f"{key.decode()}\n" for key in keys)
        os.replace(aside, self.path)


def _checked(keys: list[bytes], source: str) -> list[bytes]:
    for number, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except ValueError:
            raise KeyRingMissing(f"key {number} of the vault key ring ({source}) is not a Fernet key") from None
    return keys


@dataclass(frozen=True)
class SecretInfo:
    """What `secrets list` shows of a secret: never its value."""

    name: str
    version: int
    versions: list[int]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Rotation:
    """What a key rotation did."""

    secrets: int
    ciphertexts: int
    retired: int
    source: str


class Vault:
    """Secrets of one namespace: set, read (by workers), list, remove; and rotation of the key ring."""

    def __init__(self, redis: Redis, namespace: str, ring: KeyRing | None = None) -> None:
        self.redis = redis
        self.namespace = namespace
        self.key = f"{namespace}:vault"
        self.ring = ring or KeyRing.from_environment()
        self._fernet: MultiFernet | None = None

    def set(self, name: str, value: str, who: str | None = None) -> int:
        """Store value as the secret's new current version; returns that version. `who` is the caller the
        security event names (default: this process's user)."""
        check_name(name)
        if not value:
            raise VaultError(f"secret '{name}': the value is empty")
        with self._locked():
            fernet = self._reload()
            entry = self._entry(name) or {"current": 0, "versions": {}, "created_at": time.time()}
            version = int(entry["current"]) + 1
            token = fernet.encrypt(value.encode()).decode()
            entry["versions"][str(version)] = {"token": token, "created_at": time.time()}
            for old in sorted(entry["versions"], key=int)[:-KEEP_VERSIONS]:
                del entry["versions"][old]
            entry["current"] = version
            self.redis.hset(self.key, name, json.dumps(entry))
        self._report("secret-set", who, secret=name, version=version)
        return version

    def get(self, name: str, version: int | None = None) -> str:
        """The secret's value (its current version unless one is named)."""
        return self.current(name, version)[1]

    def current(self, name: str, version: int | None = None) -> tuple[int, str]:
        """(version, value) of the secret: its current version unless one is named."""
        entry = self._entry(name)
        if entry is None:
            raise SecretNotFound(f"no secret '{name}' in the vault (set it with `mcp-orchestrator secrets set {name}`)")
        version = int(entry["current"]) if version is None else version
        stored = entry["versions"].get(str(version))
        if stored is None:
            raise SecretNotFound(f"secret '{name}' has no version {version}")
        value = self._decrypt(name, stored["token"].encode())
        redaction.remember(value)  # this process holds it now: no log line of it may show it
        return version, value

    def seal(self, value: str) -> str:
        """Encrypt a value kept outside the secrets hash (an OAuth token) under the vault's ring."""
        return (self._fernet or self._reload()).encrypt(value.encode()).decode()

    def unseal(self, what: str, token: str) -> str:
        """Decrypt what `seal` encrypted; `what` names it in the error, which never holds the value."""
        return self._decrypt(what, token.encode())

    def versions(self, names: list[str]) -> dict[str, int]:
        """The current version of each named secret (0 for one that is gone), in one round trip."""
        raw = self.redis.hmget(self.key, names) if names else []
        return {name: int(json.loads(item)["current"]) if item else 0 for name, item in zip(names, raw, strict=True)}

    def list(self) -> list[SecretInfo]:
        infos = []
        for name, raw in sorted(self.redis.hgetall(self.key).items()):
            entry = json.loads(raw)
            versions = sorted(int(v) for v in entry["versions"])
            updated = entry["versions"][str(entry["current"])]["created_at"]
            infos.append(SecretInfo(as_text(name), int(entry["current"]), versions, entry["created_at"], updated))
        return infos

    def remove(self, name: str, who: str | None = None) -> bool:
        with self._locked():
            removed = bool(self.redis.hdel(self.key, name))
        if removed:
            self._report("secret-removed", who, secret=name)
        return removed

    def rotate_keys(self, who: str | None = None) -> Rotation:
        """Put a new key first in the key file's ring, re-encrypt every secret under it, then retire the older
        keys once no ciphertext needs them. With MCPO_VAULT_KEYS, re-encrypt under its first key instead."""
        with self._locked():
            old = self.ring.load()
            keys = old if self.ring.from_env else [Fernet.generate_key(), *old]
            if not self.ring.from_env:
                self.ring.write(keys)  # workers that read the ring now can decrypt both old and new ciphertext
            secrets, ciphertexts = self._reencrypt(MultiFernet([Fernet(key) for key in keys]))
            self._verify(Fernet(keys[0]))
            retired = len(keys) - 1
            if not self.ring.from_env:
                self.ring.write(keys[:1])
            self._fernet = None
        self._report("keys-rotated", who, secrets=secrets, retired=retired, source=self.ring.source)
        return Rotation(secrets, ciphertexts, retired, self.ring.source)

    def _report(self, kind: str, who: str | None, **detail: Any) -> None:
        # A credential change is a security event (the audit chain records it): names and versions, never a value.
        security_event(kind, who or events.caller(), {"namespace": self.namespace, **detail})

    def _reencrypt(self, fernet: MultiFernet) -> tuple[int, int]:
        secrets = ciphertexts = 0
        for name, raw in self.redis.hgetall(self.key).items():
            entry = json.loads(raw)
            for stored in entry["versions"].values():
                try:
                    stored["token"] = fernet.rotate(stored["token"].encode()).decode()
                except InvalidToken:
                    raise SecretUndecryptable(
                        f"secret '{as_text(name)}' does not decrypt under the current key ring ({self.ring.source}); "
                        "nothing was retired"
                    ) from None
                ciphertexts += 1
            self.redis.hset(self.key, name, json.dumps(entry))
            secrets += 1
        return secrets, ciphertexts

    def _verify(self, newest: Fernet) -> None:
        # Retiring a key that some ciphertext still needs would lose that secret: check every one first.
        for name, raw in self.redis.hgetall(self.key).items():
            for stored in json.loads(raw)["versions"].values():
                try:
                    newest.decrypt(stored["token"].encode())
                except InvalidToken:
                    raise SecretUndecryptable(
                        f"secret '{as_text(name)}' is not under the new key after re-encryption; nothing was retired"
                    ) from None

    def _entry(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.key, name)
        return json.loads(raw) if raw else None

    def _decrypt(self, name: str, token: bytes) -> str:
        try:
            return (self._fernet or self._reload()).decrypt(token).decode()
        except InvalidToken:
            pass
        # The ring may have been rotated since this process read it: read it again, once.
        try:
            return self._reload().decrypt(token).decode()
        except InvalidToken:
            raise SecretUndecryptable(
                f"secret '{name}' does not decrypt under the vault key ring ({self.ring.source})"
            ) from None

    def _reload(self) -> MultiFernet:
        self._fernet = self.ring.fernet()
        return self._fernet

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self.redis.lock(f"{self.key}:lock", timeout=120, blocking_timeout=60):
            yield
