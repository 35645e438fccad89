"""Alembic's environment: migrations run on the connection `orchestrator.history.migrations.upgrade` passes."""

from __future__ import annotations

from alembic import context

from orchestrator.history.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `mcp-orchestrator db upgrade`, which passes the connection")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
