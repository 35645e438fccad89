"""Dead letters: what the fleet refused to run or to record, kept in Redis with the reason, for an operator.

A task message a worker cannot decode, validate or start (kind `message`), and a record event the database
refuses for a reason other than an outage (kind `record`), are moved to the namespace's stream
`<namespace>:dead-letters` instead of being redelivered for ever or dropped: the stream keeps about
`MAX_LETTERS` of them (XADD MAXLEN ~) and each raw body up to `MAX_BODY` bytes. `requeue` puts a message back on
its queue as it came (through the broker, kombu) and a record event back on the records buffer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import Redis

from orchestrator.errors import DeadLetterNotFound
from orchestrator.history.events import buffer_key
from orchestrator.text import as_text

Kind = Literal["message", "record"]
MAX_LETTERS = 10_000
MAX_BODY = 4 * 1024 * 1024  # bytes of a raw body kept; a longer one is cut (and marked `truncated`)


def stream_key(namespace: str) -> str:
    return f"{namespace}:dead-letters"


@dataclass
class DeadLetter:
    """One refused message or record event: why, from where, and its raw body (bytes as received)."""

    kind: Kind
    reason: str
    queue: str
    body: bytes
    at: float = field(default_factory=time.time)
    id: str = ""  # the stream entry id, once stored
    truncated: bool = False
    envelope: dict[str, Any] = field(default_factory=dict)  # a message's content type, encoding, headers, properties

    def fields(self) -> dict[str, str | bytes]:
        return {"kind": self.kind, "reason": self.reason, "queue": self.queue, "at": repr(self.at),
                "body": self.body, "truncated": "1" if self.truncated else "0",
                "envelope": json.dumps(self.envelope, default=str)}  # fmt: skip

    @classmethod
    def of(cls, entry_id: Any, fields: Any) -> DeadLetter:
        """A letter as XRANGE returns it: (entry id, {field: value}), all bytes."""
        text = {k.decode(): v for k, v in fields.items()}
        return cls(kind=text["kind"].decode(), reason=text["reason"].decode(), queue=text["queue"].decode(),
                   body=text["body"], at=float(text["at"]), truncated=text.get("truncated") == b"1",
                   envelope=json.loads(text.get("envelope") or b"{}"),
                   id=as_text(entry_id))  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """What `list` shows: everything but the body, and the body's size."""
        return {"id": self.id, "kind": self.kind, "at": self.at, "queue": self.queue, "reason": self.reason,
                "bytes": len(self.body), "truncated": self.truncated}  # fmt: skip


class DeadLetters:
    """The namespace's dead-letter stream."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self.key = stream_key(namespace)

    def add(self, letter: DeadLetter) -> str:
        """Store letter (its body cut to MAX_BODY); its entry id."""
        if len(letter.body) > MAX_BODY:
            letter.body, letter.truncated = letter.body[:MAX_BODY], True
        entry = self.redis.xadd(self.key, letter.fields(), maxlen=MAX_LETTERS, approximate=True)  # type: ignore[arg-type]
        letter.id = as_text(entry)
        return letter.id

    def list(self, count: int = 100) -> list[DeadLetter]:
        """The newest `count` letters, oldest first."""
        entries = self.redis.xrevrange(self.key, count=count)
        return [DeadLetter.of(entry_id, fields) for entry_id, fields in reversed(list(entries or []))]

    def get(self, letter_id: str) -> DeadLetter:
        try:
            entries = self.redis.xrange(self.key, letter_id, letter_id)
        except Exception as exc:  # redis refuses an id that is not one: the operator typed a wrong id
            raise DeadLetterNotFound(f"dead letter {letter_id!r} is not an entry id of {self.key}") from exc
        if not entries:
            raise DeadLetterNotFound(f"dead letter {letter_id} is not in {self.key}")
        entry_id, fields = next(iter(entries))
        return DeadLetter.of(entry_id, fields)

    def remove(self, letter_id: str) -> None:
        self.redis.xdel(self.key, letter_id)

    def purge(self) -> int:
        """Drop every letter; how many there were."""
        count = int(self.redis.xlen(self.key))
        self.redis.delete(self.key)
        return count

    def count(self) -> int:
        return int(self.redis.xlen(self.key))

    def requeue(self, letter_id: str, broker_url: str | None = None) -> DeadLetter:
        """Put the letter back where it came from and drop it: a record event on the records buffer, a message on
        its queue through the broker at broker_url (as it was received: body, headers and properties)."""
        letter = self.get(letter_id)
        if letter.truncated:
            raise DeadLetterNotFound(f"dead letter {letter_id} was cut at {MAX_BODY} bytes: it cannot be requeued")
        if letter.kind == "record":
            self.redis.rpush(buffer_key(self.namespace), letter.body)
        else:
            _publish(letter, broker_url or "")
        self.remove(letter_id)
        return letter


def _publish(letter: DeadLetter, broker_url: str) -> None:
    from kombu.connection import Connection

    envelope = letter.envelope
    properties = {k: v for k, v in (envelope.get("properties") or {}).items()
                  if k not in ("delivery_info", "delivery_tag", "body_encoding", "delivery_mode")}  # fmt: skip
    with Connection(broker_url) as connection:  # type: ignore[no-untyped-call]
        producer = connection.Producer()
        # A bytes body with its content type given is published as it is, not serialized again.
        producer.publish(letter.body, routing_key=letter.queue, exchange=envelope.get("exchange") or "",
                         headers=envelope.get("headers") or {}, content_type=envelope.get("content_type") or
                         "application/json", content_encoding=envelope.get("content_encoding") or "utf-8",
                         retry=True, retry_policy={"max_retries": 3}, **properties)  # fmt: skip
