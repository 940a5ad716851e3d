"""`ReviewSettings`: the knobs of `rlaif review`, from `RLAIF_REVIEW_*` environment variables or CLI flags."""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ANNOTATOR_PATTERN = re.compile(r"^[\w.@ -]{1,64}$")


class ReviewSettings(BaseSettings):
    """Settings of one review server. Env var = `RLAIF_REVIEW_` + field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="RLAIF_REVIEW_", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="Interface to bind. Loopback by default; anything else needs api_keys.")
    port: int = Field(8010, ge=0, le=65535, description="TCP port (0 = any free port).")
    annotator: str = Field("anonymous", description=(
        "Name recorded with every answer when no API keys are set (the page can change it per browser)."))
    api_keys: SecretStr | None = Field(None, description=(
        "Comma-separated `name:key` pairs (or bare keys, named key-1, key-2, ...). When set, the page asks for a key "
        "once per browser (an HttpOnly SameSite=Strict session cookie) and API calls need `Authorization: Bearer <key>`; "
        "each answer is recorded under the key's name."))
    blind: bool = Field(False, description="Hide the judge's verdict until the annotator has answered the pair.")
    max_note_chars: int = Field(2000, ge=0, description="Longest note per answer.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body (413 beyond).")
    max_display_chars: int = Field(20_000, ge=100, description="Texts longer than this are cut on the page (the rest is counted).")

    @field_validator("annotator")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ANNOTATOR_PATTERN.match(value):
            raise ValueError("annotator names are 1-64 letters, digits, spaces or . @ _ -")
        return value

    @model_validator(mode="after")
    def _keys(self) -> ReviewSettings:
        if self.api_keys is not None and not self.named_keys():
            raise ValueError("api_keys is set but holds no key; give comma-separated name:key pairs or unset it")
        return self

    def named_keys(self) -> dict[str, str]:
        """key -> annotator name."""
        if self.api_keys is None:
            return {}
        keys: dict[str, str] = {}
        for n, part in enumerate(p.strip() for p in self.api_keys.get_secret_value().split(",")):
            if not part:
                continue
            name, sep, key = part.rpartition(":")
            if not sep:
                name, key = f"key-{n + 1}", part
            if not ANNOTATOR_PATTERN.match(name) or not key:
                raise ValueError(f"api_keys entry {n + 1}: use name:key with a name of letters, digits, . @ _ -")
            keys[key] = name
        return keys

    @property
    def is_loopback(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"} or self.host.startswith("127.")
