"""The vault: server credentials, encrypted at rest, and its key ring."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.common import (
    _errors,
    _fail,
    _key_created,
    _listing,
    _vault,
    config_option,
    json_list_option,
    main,
)


@main.group()
def secrets() -> None:
    """Server credentials in the vault, encrypted at rest; the configuration names them `{secret: NAME}`."""


@secrets.command("set")
@click.argument("name")
@click.option("--from-file", "from_file", type=click.Path(exists=True, dir_okay=False),
              help="read the value from this file (default: stdin)")  # fmt: skip
@config_option
def secrets_set(name: str, from_file: str | None, config_path: str | None) -> None:
    """Store a new version of secret NAME, its value read from stdin or a file (never the command line)."""
    from orchestrator.security.vault import check_name

    with _errors():
        vault, who = _vault(config_path, "secrets", f"secret:{name}")
        check_name(name)
        if sys.stdin.isatty() and from_file is None:
            click.echo(f"value of secret '{name}' (end with Ctrl-D):", err=True)
        value = (Path(from_file).read_text() if from_file else sys.stdin.read()).rstrip("\r\n")
        _key_created(vault.ring.ensure(), "a new vault key ring", vault.ring.path, "every worker", "MCPO_VAULT_KEYS")
        version = vault.set(name, value, who)
    click.echo(f"secret '{name}' version {version} set")


@secrets.command("list")
@json_list_option
@config_option
def secrets_list(as_json: bool, config_path: str | None) -> None:
    """Every secret's name, current version and age; never a value."""
    with _errors():
        vault, _ = _vault(config_path, "secrets", "secret:*")
        infos = vault.list()
    now = time.time()

    def line(info: Any) -> str:
        kept = ",".join(str(v) for v in info.versions)
        ages = f"{_age(now - info.created_at):>8} {_age(now - info.updated_at):>8}"
        return f"{info.name:32} {info.version:>7} {kept:12} {ages}"

    _listing(infos, as_json, f"{'NAME':32} {'VERSION':>7} {'KEPT':12} {'CREATED':>8} {'UPDATED':>8}", line)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@secrets.command("rm")
@click.argument("name")
@config_option
def secrets_rm(name: str, config_path: str | None) -> None:
    """Remove secret NAME and all its versions."""
    with _errors():
        vault, who = _vault(config_path, "secrets", f"secret:{name}")
        if not vault.remove(name, who):
            _fail(f"no secret '{name}' in the vault")
    click.echo(f"secret '{name}' removed")


@main.group()
def keys() -> None:
    """The vault's key ring (MCPO_VAULT_KEYS or the key file, never Redis)."""


@keys.command("rotate")
@config_option
def keys_rotate(config_path: str | None) -> None:
    """Add a new key first in the key file, re-encrypt every secret under it, then retire the old keys.

    Workers keep running: one that cannot decrypt with the ring it holds reads the key file again.
    """
    with _errors():
        vault, who = _vault(config_path, "keys", "vault")
        rotation = vault.rotate_keys(who)
    if rotation.source == "MCPO_VAULT_KEYS":
        click.echo(f"re-encrypted {rotation.ciphertexts} ciphertexts of {rotation.secrets} secrets under the first "
                   "key of MCPO_VAULT_KEYS; the other keys there may now be removed")  # fmt: skip
        return
    click.echo(f"new key in {rotation.source}; re-encrypted {rotation.ciphertexts} ciphertexts of "
               f"{rotation.secrets} secrets; retired {rotation.retired} old key(s)")  # fmt: skip
