"""Records: runs, steps, outputs, the audit chain and its head."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
GENESIS = "0" * 64


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("workflow", sa.String(200), nullable=False, index=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("who", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("created_at", sa.Float(), nullable=False, index=True),
        sa.Column("started_at", sa.Float()),
        sa.Column("finished_at", sa.Float()),
        sa.Column("output", sa.JSON()),
        sa.Column("errors", sa.JSON()),
        sa.Column("error_summary", sa.JSON()),
        sa.Column("fallback_run", sa.String(64)),
    )
    op.create_table(
        "steps",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("step_id", sa.String(200), primary_key=True),
        sa.Column("position", sa.Integer()),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("service", sa.String(200), nullable=False),
        sa.Column("tool", sa.String(200), nullable=False),
        sa.Column("instance", sa.String(200)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("duration_ms", sa.Float()),
        sa.Column("started_at", sa.Float()),
        sa.Column("finished_at", sa.Float()),
        sa.Column("output", sa.JSON()),
        sa.Column("output_id", Id),
        sa.Column("output_size", sa.Integer()),
        sa.Column("error", sa.Text()),
        sa.Column("error_type", sa.String(200)),
        sa.Column("attempt_errors", sa.JSON()),
        sa.Column("served_by", sa.String(400)),
        sa.Column("skip_reason", sa.String(20)),
        sa.Column("stale_age_s", sa.Float()),
        sa.Column("worker", sa.String(400)),
        sa.Column("arguments_digest", sa.String(64)),
    )
    op.create_table(
        "outputs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False, index=True),
        sa.Column("step_id", sa.String(200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("at", sa.Float(), nullable=False, index=True),
        sa.Column("who", sa.String(200)),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("run_id", sa.String(64), index=True),
        sa.Column("step_id", sa.String(200)),
        sa.Column("service", sa.String(200)),
        sa.Column("instance", sa.String(200)),
        sa.Column("tool", sa.String(200)),
        sa.Column("arguments_digest", sa.String(64)),
        sa.Column("outcome", sa.String(200)),
        sa.Column("duration_ms", sa.Float()),
        sa.Column("worker", sa.String(400)),
        sa.Column("detail", sa.Text()),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS}])


def downgrade() -> None:
    for table in ("audit_head", "audit", "outputs", "steps", "runs"):
        op.drop_table(table)
