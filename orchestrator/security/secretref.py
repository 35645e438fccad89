"""`{secret: NAME}` in a configuration: a value kept in the credential vault, named, never written there.

Its own module so that every settings model may use it (server credentials, the alert webhook) without importing
the vault, which imports the security events that the alerts' settings are part of.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SecretRef(BaseModel):
    """A value kept in the credential vault, named in the configuration as `{secret: NAME}`; the process that
    needs it reads it when it uses it, so the configuration never holds it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    secret: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


Value = str | SecretRef
