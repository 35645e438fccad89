"""Access control: the caller tokens this orchestrator issues, and `init --secure`, which switches it on."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.common import _errors, _fail, _redis_url, _require, _settings, _when, config_option, main


def _redis() -> Any:
    """A client of REDIS_URL or the embedded Redis."""
    from workers.tls import connect_redis

    return connect_redis(_redis_url())


@main.group()
def tokens() -> None:
    """Caller tokens this orchestrator issues: signed, revocable, stored hashed (admin only when access is on)."""


@tokens.command("issue")
@click.option("--subject", required=True, help="who the token identifies")
@click.option("--role", required=True, help="a shipped role (viewer, operator, admin) or one of the configuration")
@click.option("--ttl", default="8h", show_default=True, help="how long it is valid: 90s, 30m, 8h, 7d")
@config_option
def tokens_issue(subject: str, role: str, ttl: str, config_path: str | None) -> None:
    """Issue a token and print it, once: only its hash is kept."""
    from orchestrator.access import AccessSettings
    from orchestrator.identity import TokenBook, parse_duration

    with _errors():
        redis = _redis()
        config, _ = _require(config_path, redis, "admin", "tokens")
        roles = (config.access or AccessSettings()).all_roles
        if role not in roles:
            _fail(f"unknown role '{role}' (roles: {', '.join(roles)})")
        book = TokenBook(redis, _settings().namespace)
        if book.signing.ensure():
            click.echo(f"created a token signing key in {book.signing.path} (mode 0600): every API host and worker "
                       "needs it (or MCPO_TOKEN_KEY); keep it out of Redis", err=True)  # fmt: skip
        token, info = book.issue(subject, role, parse_duration(ttl))
    click.echo(f"token {info.id} for {subject} ({role}), expires {_when(info.expires_at)}; shown only now:", err=True)
    click.echo(token)


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
@config_option
def tokens_list(as_json: bool, config_path: str | None) -> None:
    """Every issued token's id, subject, role and expiry; never the token."""
    from orchestrator.identity import TokenBook

    with _errors():
        redis = _redis()
        _require(config_path, redis, "admin", "tokens")
        infos = TokenBook(redis, _settings().namespace).list()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(info) for info in infos], indent=2))
        return
    click.echo(f"{'ID':32} {'SUBJECT':24} {'ROLE':12} {'EXPIRES':19}")
    for info in infos:
        expired = " (expired)" if info.expires_at < time.time() else ""
        click.echo(f"{info.id:32} {info.subject:24} {info.role:12} {_when(info.expires_at)}{expired}")


@tokens.command("revoke")
@click.argument("token_id")
@config_option
def tokens_revoke(token_id: str, config_path: str | None) -> None:
    """Revoke token TOKEN_ID: the API refuses it at once, workers within a second (runs it started fail)."""
    from orchestrator.identity import TokenBook

    with _errors():
        redis = _redis()
        _require(config_path, redis, "admin", "tokens")
        if not TokenBook(redis, _settings().namespace).revoke(token_id):
            _fail(f"no token {token_id} (see `mcp-orchestrator tokens list`)")
    click.echo(f"token {token_id} revoked")


@main.command()
@click.option("--secure", is_flag=True, help="switch access control on: keys, an admin token, an `access:` block")
@config_option
@click.option("--subject", default="admin", show_default=True, help="the admin token's subject")
@click.option("--ttl", default="30d", show_default=True, help="the admin token's lifetime")
def init(secure: bool, config_path: str | None, subject: str, ttl: str) -> None:
    """Set up security in one go: the token signing key, vault key ring and message signing key and certificate
    (keys mode 0600, under MCPO_HOME), an `access:` section in the configuration, and an admin token, printed
    once."""
    from orchestrator.config import load_config, read_document
    from orchestrator.identity import TokenBook, parse_duration
    from orchestrator.security import watch
    from orchestrator.vault import KeyRing

    if not secure:
        _fail("nothing to do: `mcp-orchestrator init --secure --config FILE` sets up access control")
    path = Path(config_path or _settings().config or "")
    if not config_path and not _settings().config:
        _fail("no configuration: pass --config FILE (created if missing) or set MCPO_CONFIG")
    with _errors():
        seconds = parse_duration(ttl)
        redis = _redis()
        watch(redis, _settings().namespace)  # the admin token's issue goes on the audit chain
        book = TokenBook(redis, _settings().namespace)
        for created, what in ((book.signing.ensure(), f"token signing key {book.signing.path}"),
                              (KeyRing.from_environment().ensure(), "vault key ring")):  # fmt: skip
            click.echo(f"{'created' if created else 'kept the existing'} {what}", err=True)
        signing_key, certificate = _message_signing_identity()
        data = read_document(path) if path.exists() else None
        if isinstance(data, dict) and "access" in data:
            click.echo(f"kept the `access:` section of {path}", err=True)
        else:
            with path.open("a") as handle:
                handle.write("\n# Access control: roles viewer, operator, admin; see README, Access control\n"
                             "access:\n  enabled: true\n")  # fmt: skip
            click.echo(f"added an `access:` section to {path}", err=True)
        config = load_config(path)
        if config.access is None or config.access.signing is None:
            click.echo(f"message signing is off: to switch it on, add `signing: {{key: {signing_key}, certificate: "
                       f"{certificate}, store: {certificate.parent}}}` under `access:` (every process of the fleet "
                       "needs it, and a namespace of its own; see README, Access control)", err=True)  # fmt: skip
        token, info = book.issue(subject, "admin", seconds)
    click.echo(f"admin token {info.id} for {subject}, expires {_when(info.expires_at)}; shown only now:", err=True)
    click.echo(token)


def _message_signing_identity() -> tuple[Path, Path]:
    """The fleet's message signing key (Ed25519) and its self-signed certificate, alone in a trusted store, under
    MCPO_HOME: created unless the key is there. Returns the key's and the certificate's paths."""
    from workers.signing import create_identity

    home = _settings().home
    key, certificate = home / "fleet.key", home / "trusted" / "fleet.pem"
    if key.exists():
        click.echo(f"kept the existing message signing key {key}", err=True)
    else:
        expires = create_identity(key, certificate, f"mcp-orchestrator {_settings().namespace}")
        click.echo(f"created the message signing key {key} (Ed25519, mode 0600) and its certificate {certificate}, "
                   f"valid until {_when(expires.timestamp())}", err=True)  # fmt: skip
    return key, certificate
