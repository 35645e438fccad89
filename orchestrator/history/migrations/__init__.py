"""Alembic migrations of the records schema, shipped in the package: no alembic.ini needed."""

from __future__ import annotations

from typing import TYPE_CHECKING

# Alembic is imported when a migration runs: every process that writes records imports this package, and only
# `db upgrade` or a new SQLite file migrates.
if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection


def config(connection: Connection | None = None) -> Config:
    """An Alembic configuration over this package's scripts, on the given connection."""
    from alembic.config import Config

    settings = Config()
    settings.set_main_option("script_location", "orchestrator.history:migrations")
    settings.attributes["connection"] = connection
    return settings


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Migrate the database behind connection to revision (the newest by default)."""
    from alembic import command

    command.upgrade(config(connection), revision)
