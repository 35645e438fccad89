"""Dead letters: the task messages workers quarantined and the record events the database refused.

`list` and `show` need the `audit` permission on `dead-letters`, `requeue` and `purge` need `admin` on it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from orchestrator.cli.common import _errors, _fail, _redis, _require, _settings, _when, config_option, main

if TYPE_CHECKING:
    from orchestrator.deadletters import DeadLetters

RESOURCE = "dead-letters"


@contextmanager
def _letters(config_path: str | None, action: str) -> Iterator[DeadLetters]:
    """The namespace's dead letters, once the caller may do action on them."""
    from orchestrator.deadletters import DeadLetters

    with _errors():
        redis = _redis()
        try:
            _require(config_path, redis, action, RESOURCE)
            yield DeadLetters(redis, _settings().namespace)
        finally:
            redis.close()


@main.group(name="dead-letters")
def dead_letters() -> None:
    """Refused task messages and record events, kept with the reason (list, show, requeue, purge)."""


@dead_letters.command(name="list")
@config_option
@click.option("--limit", type=int, default=100, show_default=True, help="the newest this many")
@click.option("--json", "as_json", is_flag=True, help="print them as JSON")
def list_letters(config_path: str | None, limit: int, as_json: bool) -> None:
    """The newest dead letters, oldest first: id, kind, when, queue and reason."""
    with _letters(config_path, "audit") as letters:
        found = [letter.summary() for letter in letters.list(limit)]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{'ID':17}  {'KIND':7} {'AT':19}  {'QUEUE':24} REASON")
    for letter in found:
        click.echo(f"{letter['id']:17}  {letter['kind']:7} {_when(letter['at']):19}  {letter['queue']:24} "
                   f"{letter['reason']}")  # fmt: skip


@dead_letters.command()
@click.argument("letter_id")
@config_option
def show(letter_id: str, config_path: str | None) -> None:
    """One dead letter as JSON, with its raw body (as text where it is UTF-8, else base64)."""
    import base64

    with _letters(config_path, "audit") as letters:
        letter = letters.get(letter_id)
    try:
        body, encoding = letter.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(letter.body).decode(), "base64"
    shown = {**letter.summary(), "envelope": letter.envelope, "body_encoding": encoding, "body": body}
    click.echo(json.dumps(shown, indent=2, default=str))


@dead_letters.command()
@click.argument("letter_id")
@config_option
def requeue(letter_id: str, config_path: str | None) -> None:
    """Put a dead letter back where it came from (a message on its queue, a record event on the records buffer)
    and drop it from the dead letters."""
    import celeryconfig

    with _letters(config_path, "admin") as letters:
        letter = letters.requeue(letter_id, celeryconfig.broker_url or _redis())
    click.echo(f"requeued {letter.kind} {letter_id} on {letter.queue}")


@dead_letters.command()
@config_option
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def purge(config_path: str | None, yes: bool) -> None:
    """Drop every dead letter of the namespace."""
    with _letters(config_path, "admin") as letters:
        count = letters.count()
        if count and not yes:
            if not sys.stdin.isatty():
                _fail(f"{count} dead letters would be dropped: pass --yes to purge without a prompt")
            click.confirm(f"drop {count} dead letters of {letters.key}?", abort=True)
        dropped = letters.purge() if count else 0
    click.echo(f"purged {dropped} dead letters")
