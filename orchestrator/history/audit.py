"""The audit chain: append-only rows, each carrying the previous row's hash, and its verification.

A row's `hash` is sha256 over the canonical JSON of its columns (`seq` included) and the previous row's
hash; the first row follows GENESIS. `audit_head` holds the last row's seq and hash: appends lock it
first (an UPDATE, which PostgreSQL holds as a row lock and SQLite as its one write lock), so writers in
any number of processes extend one chain; and rows cut off the end show as a head the chain does not reach.

Editing a row breaks its hash; deleting one leaves a gap in `seq`; moving one (renumbering) breaks the link
to its new predecessor. Anyone able to rewrite the whole chain from a point on (and the head) is not
detected: the chain proves order and integrity against edits, not against whoever holds the hash scheme.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from orchestrator.history.events import canonical
from orchestrator.history.tables import AuditHead, AuditRecord

GENESIS = "0" * 64
# Every column a row's hash covers, in the order export writes them.
HASHED = ("seq", "event_id", "at", "who", "action", "run_id", "step_id", "service", "instance", "tool",
          "arguments_digest", "outcome", "duration_ms", "worker", "detail")  # fmt: skip
_TEXT = ("event_id", "who", "action", "run_id", "step_id", "service", "instance", "tool", "arguments_digest",
         "outcome", "worker")  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """The first row of the chain that does not hold, and why."""

    seq: int
    reason: str

    def __str__(self) -> str:
        return f"audit row {self.seq}: {self.reason}"


def row_hash(fields: dict[str, Any], prev_hash: str) -> str:
    return hashlib.sha256(canonical({**{k: fields[k] for k in HASHED}, "prev_hash": prev_hash}).encode()).hexdigest()


def normalized(fields: dict[str, Any]) -> dict[str, Any]:
    """A row's columns as the database gives them back (floats as floats, detail as canonical JSON text),
    so the hash computed before the insert is the one verify computes from the stored row."""
    row: dict[str, Any] = {k: (None if fields.get(k) is None else str(fields[k])) for k in _TEXT}
    row["at"] = float(fields["at"])
    row["duration_ms"] = None if fields.get("duration_ms") is None else float(fields["duration_ms"])
    detail = fields.get("detail")
    row["detail"] = None if detail is None else detail if isinstance(detail, str) else canonical(detail)
    return row


def lock_head(session: Session) -> AuditHead:
    """Take the chain's write lock for this transaction and return its head."""
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq))
    return session.execute(select(AuditHead).where(AuditHead.id == 1)).scalar_one()


def seen(session: Session, event_ids: Iterable[str]) -> set[str]:
    """The events among these already audited (their first row is in the chain)."""
    firsts = [f"{event_id}:0" for event_id in event_ids]
    found: set[str] = set()
    for start in range(0, len(firsts), 500):
        query = select(AuditRecord.event_id).where(AuditRecord.event_id.in_(firsts[start : start + 500]))
        found.update(event_id.rsplit(":", 1)[0] for event_id in session.scalars(query))
    return found


def append(session: Session, head: AuditHead, rows: list[dict[str, Any]]) -> None:
    """Add rows at the end of the chain; the caller holds the head's lock (`lock_head`)."""
    for fields in rows:
        row = {**normalized(fields), "seq": head.seq + 1}
        digest = row_hash(row, head.hash)
        session.add(AuditRecord(**row, prev_hash=head.hash, hash=digest))
        head.seq, head.hash = row["seq"], digest


def verify(session: Session) -> tuple[int, Problem | None]:
    """Walk the chain by seq: how many rows hold, and the first that does not (None: the chain is whole)."""
    expected_seq, prev = 1, GENESIS
    for row in _rows(session):
        if row.seq != expected_seq:
            missing = f"row {expected_seq}" if row.seq == expected_seq + 1 else f"rows {expected_seq}-{row.seq - 1}"
            return expected_seq - 1, Problem(row.seq, f"{missing} before it missing (deleted or renumbered)")
        if row.prev_hash != prev:
            return expected_seq - 1, Problem(row.seq, "does not follow the row before it (a row moved or was replaced)")
        if row_hash(_columns(row), prev) != row.hash:
            return expected_seq - 1, Problem(row.seq, "its contents do not match its hash (edited)")
        expected_seq, prev = expected_seq + 1, row.hash
    head = session.get(AuditHead, 1)
    if head is not None and (head.seq, head.hash) != (expected_seq - 1, prev):
        reason = f"missing: the chain ends at row {expected_seq - 1} but its head is row {head.seq} (rows cut off)"
        return expected_seq - 1, Problem(expected_seq, reason)
    return expected_seq - 1, None


def export(session: Session, out: TextIO, since: float | None = None) -> int:
    """Write the chain as JSON lines (a SIEM's input), in order; returns how many rows."""
    count = 0
    for row in _rows(session):
        if since is not None and row.at < since:
            continue
        record = {**_columns(row), "prev_hash": row.prev_hash, "hash": row.hash}
        record["detail"] = json.loads(row.detail) if row.detail else None
        out.write(json.dumps(record, sort_keys=False) + "\n")
        count += 1
    return count


def _rows(session: Session) -> Iterator[AuditRecord]:
    yield from session.scalars(select(AuditRecord).order_by(AuditRecord.seq).execution_options(yield_per=1000))


def _columns(row: AuditRecord) -> dict[str, Any]:
    return {k: getattr(row, k) for k in HASHED}
