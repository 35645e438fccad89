"""Alembic migrations of the records schema, shipped in the package: no alembic.ini needed."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection


def config(connection: Connection | None = None) -> Config:
    """An Alembic configuration over this package's scripts, on the given connection."""
    settings = Config()
    settings.set_main_option("script_location", "orchestrator:migrations")
    settings.attributes["connection"] = connection
    return settings


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Migrate the database behind connection to revision (the newest by default)."""
    command.upgrade(config(connection), revision)
