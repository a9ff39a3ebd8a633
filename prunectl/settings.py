"""prunectl's environment variables (the client; `--url` and `--api-key` override them)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_URL = "http://localhost:8000"


class ClientSettings(BaseSettings):
    """Where prunectl sends its requests and with which key; blank variables count as unset."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, frozen=True)

    url: str = Field(DEFAULT_URL, validation_alias="PRUNE_URL", description="Base URL of the service's API.")
    api_key: str | None = Field(
        None,
        validation_alias="PRUNE_API_KEY",
        description="API key sent as `Authorization: Bearer <key>`; unset for an open service.",
        repr=False,
        json_schema_extra={"secret": True},
    )
