"""Resume and idempotency: a run keeps its workflow definition, the run it resumes and its idempotency key; a
step the run it resumed from produced, which run that was.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"


def upgrade() -> None:
    # batch mode: SQLite alters a table by copying it
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("definition", sa.JSON()))
        runs.add_column(sa.Column("resumed_from", sa.String(64)))
        runs.add_column(sa.Column("idempotency_key", sa.String(200)))
        runs.create_index("ix_runs_resumed_from", ["resumed_from"])
    with op.batch_alter_table("steps") as steps:
        steps.add_column(sa.Column("reused_from", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("steps") as steps:
        steps.drop_column("reused_from")
    with op.batch_alter_table("runs") as runs:
        runs.drop_index("ix_runs_resumed_from")
        runs.drop_column("idempotency_key")
        runs.drop_column("resumed_from")
        runs.drop_column("definition")
