"""Health history: one row per health beat of each service instance."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"


def upgrade() -> None:
    op.create_table(
        "health",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("service", sa.String(200), nullable=False, index=True),
        sa.Column("instance", sa.String(200), nullable=False),
        sa.Column("at", sa.Float(), nullable=False, index=True),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("tools", sa.Integer()),
        sa.Column("error", sa.Text()),
    )


def downgrade() -> None:
    op.drop_table("health")
