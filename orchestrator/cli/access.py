"""Access control: the caller tokens this orchestrator issues, and `init --secure`, which switches it on."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator.cli.common import (
    _errors,
    _fail,
    _key_created,
    _listing,
    _redis,
    _require,
    _settings,
    _when,
    config_option,
    json_list_option,
    main,
)

if TYPE_CHECKING:
    from orchestrator.config import Config


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
    from orchestrator.security.access import AccessSettings
    from orchestrator.security.identity import TokenBook, parse_duration

    with _errors():
        redis = _redis()
        config, who = _require(config_path, redis, "admin", "tokens")
        roles = (config.access or AccessSettings()).all_roles
        if role not in roles:
            _fail(f"unknown role '{role}' (roles: {', '.join(roles)})")
        book = TokenBook(redis, _settings().namespace)
        _key_created(book.signing.ensure(), "a token signing key", book.signing.path, "every API host and worker",
                     "MCPO_TOKEN_KEY")  # fmt: skip
        token, info = book.issue(subject, role, parse_duration(ttl), who)
    click.echo(f"token {info.id} for {subject} ({role}), expires {_when(info.expires_at)}; shown only now:", err=True)
    click.echo(token)


@tokens.command("list")
@json_list_option
@config_option
def tokens_list(as_json: bool, config_path: str | None) -> None:
    """Every issued token's id, subject, role and expiry; never the token."""
    from orchestrator.security.identity import TokenBook

    with _errors():
        redis = _redis()
        _require(config_path, redis, "admin", "tokens")
        infos = TokenBook(redis, _settings().namespace).list()

    def line(info: Any) -> str:
        expired = " (expired)" if info.expires_at < time.time() else ""
        return f"{info.id:32} {info.subject:24} {info.role:12} {_when(info.expires_at)}{expired}"

    _listing(infos, as_json, f"{'ID':32} {'SUBJECT':24} {'ROLE':12} {'EXPIRES':19}", line)


@tokens.command("revoke")
@click.argument("token_id")
@config_option
def tokens_revoke(token_id: str, config_path: str | None) -> None:
    """Revoke token TOKEN_ID: the API refuses it at once, workers within a second (runs it started fail)."""
    from orchestrator.security.identity import TokenBook

    with _errors():
        redis = _redis()
        _, who = _require(config_path, redis, "admin", "tokens")
        if not TokenBook(redis, _settings().namespace).revoke(token_id, who):
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
    from orchestrator.security.access import enabled
    from orchestrator.security.alerts import watch
    from orchestrator.security.identity import TokenBook, parse_duration
    from orchestrator.security.vault import KeyRing

    if not secure:
        _fail("nothing to do: `mcp-orchestrator init --secure --config FILE` sets up access control")
    path = Path(config_path or _settings().config or "")
    if not config_path and not _settings().config:
        _fail("no configuration: pass --config FILE (created if missing) or set MCPO_CONFIG")
    with _errors():
        seconds = parse_duration(ttl)
        redis = _redis()
        data = read_document(path) if path.exists() else None
        who = None
        if isinstance(data, dict) and "access" in data and enabled(load_config(path).access):
            # Access control is on already: another admin token is the admin's to issue.
            _, who = _require(str(path), redis, "admin", "tokens")
        watch(redis, _settings().namespace)  # the admin token's issue goes on the audit chain
        book = TokenBook(redis, _settings().namespace)
        for created, what in ((book.signing.ensure(), f"token signing key {book.signing.path}"),
                              (KeyRing.from_environment().ensure(), "vault key ring")):  # fmt: skip
            click.echo(f"{'created' if created else 'kept the existing'} {what}", err=True)
        signing_key, certificate = _message_signing_identity()
        if isinstance(data, dict) and "access" in data:
            click.echo(f"kept the `access:` section of {path}", err=True)
        else:
            with path.open("a") as handle:
                handle.write(_access_section(signing_key, certificate))
            click.echo(f"added an `access:` section with message signing to {path}", err=True)
        _say_signing(load_config(path), path, signing_key, certificate)
        token, info = book.issue(subject, "admin", seconds, who)
    click.echo(f"admin token {info.id} for {subject}, expires {_when(info.expires_at)}; shown only now:", err=True)
    click.echo(token)


def _access_section(key: Path, certificate: Path) -> str:
    """The `access:` section `init` adds: access control and message signing on (JSON strings are YAML)."""
    signing = {"key": str(key), "certificate": str(certificate), "store": str(certificate.parent)}
    return ("\n# Access control: roles viewer, operator, admin; see README, Access control\n"
            "access:\n  enabled: true\n"
            "  # Message signing: every process of the fleet needs these files, and a namespace of its own.\n"
            "  # Remove `signing:` to switch it off (then a caller token read from Redis can be replayed).\n"
            f"  signing: {json.dumps(signing)}\n")  # fmt: skip


def _say_signing(config: Config, path: Path, key: Path, certificate: Path) -> None:
    if config.access is not None and config.access.signing is not None:
        click.echo(f"message signing is on (`signing:` under `access:` in {path}): every worker, beat and enqueuing "
                   "process needs the same settings and a namespace of its own; to switch it off, remove "
                   "`signing:` there", err=True)  # fmt: skip
        return
    click.echo(f"message signing is off: to switch it on, add `signing: {{key: {key}, certificate: {certificate}, "
               f"store: {certificate.parent}}}` under `access:` (every process of the fleet needs it, and a "
               "namespace of its own; see README, Access control)", err=True)  # fmt: skip


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
