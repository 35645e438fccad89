"""The `mcp-orchestrator` command. Exit codes: 0 succeeded, 1 the workflow failed, 2 invalid input, 3 Redis is
not reachable (infrastructure).

`common` holds the `main` group and what the commands share; each other module holds the commands of one concept.
"""

from __future__ import annotations

# Importing a command module registers its commands on `main`.
from orchestrator.cli import access, deadletters, fleet, records, runs, vault  # noqa: F401
from orchestrator.cli.common import main

__all__ = ["main"]
