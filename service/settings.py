"""`ServiceSettings`: every knob of `rlaif serve`, from `RLAIF_*` environment variables or CLI flags.

Precedence: CLI flag > environment variable (`RLAIF_PORT=9000`) > the defaults below.
API keys are held as a `SecretStr`, so they never appear in reprs, logs or error messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Settings of one judge-service process. Env var = `RLAIF_` + field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="RLAIF_", extra="ignore", validate_default=True)

    # --- network
    host: str = Field("127.0.0.1", description=(
        "Interface to bind. Loopback by default: exposing the judge is an explicit choice (set api_keys too)."))
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")

    # --- model and rubrics
    engine: str = Field("default", description=(
        "Engine spec: default (embedded SmolLM2-135M-Instruct) | hf:<id-or-path> | openai:<url>#<model> | vllm:<model>."))
    pairwise_rubric: str = Field("helpfulness", description="Default rubric of /v1/judge/pairwise and pairwise rewards (id or YAML path).")
    score_rubric: str = Field("score-1-10", description="Default rubric of /v1/judge/score, score rewards and /get_reward (id or YAML path).")
    extra_rubrics: str = Field("", description=(
        "Comma-separated rubric YAML files served in addition to the built-in library. Requests can only "
        "name served rubrics, never arbitrary paths."))
    tie_margin: float = Field(0.05, ge=0.0, lt=0.5, description="Pairwise: |P(A) - 0.5| below this is a TIE.")
    reward_model: Path | None = Field(None, description=(
        "Directory of a distilled reward model (policy_training.reward_model.RewardModel) to serve in "
        "/v1/rewards (mode=reward_model) and /get_reward."))
    reward_model_device: str = Field("cpu", description="Device of the served reward model.")

    # --- batching and load
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most items the micro-batcher hands the engine at once.")
    max_wait_ms: float = Field(10.0, ge=0.0, le=10_000.0, description=(
        "How long the first request of a batch waits for others to join it. Small next to engine time."))
    max_queue: int = Field(1024, ge=1, description=(
        "Most items waiting for the engine; beyond it requests get 429 with Retry-After."))
    request_timeout: float = Field(300.0, gt=0.0, description="Seconds a request may wait for its judgments before a 504.")
    retry_after: float = Field(1.0, gt=0.0, description="Seconds suggested in Retry-After on 429 and not-ready 503s.")

    # --- input limits
    max_items: int = Field(256, ge=1, description="Most items in one request (413 beyond).")
    max_chars: int = Field(32_000, ge=1, description="Longest prompt/response/reference/query, in characters (413 beyond).")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body in bytes (413 beyond).")

    # --- behaviour
    prefix_mismatch: Literal["error", "whole_query"] = Field("error", description=(
        "/get_reward when prompts[i] is not a prefix of query[i]: `error` = 422 naming the indices; "
        "`whole_query` = judge the whole query as the response."))
    api_keys: SecretStr | None = Field(None, description=(
        "Comma-separated bearer tokens. When set, every endpoint except /healthz and /readyz needs "
        "`Authorization: Bearer <key>`."))
    cache: bool = Field(True, description="Use the SQLite judgment cache (repeated items skip the engine).")
    cache_path: Path | None = Field(None, description="Cache file; unset = $RLAIF_CACHE_DIR/judgments.sqlite.")

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if self.max_queue < self.max_items:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_items ({self.max_items}), "
                             "or a full-size request could never be queued; raise max_queue or lower max_items")
        if self.api_keys is not None and not self.key_list():
            raise ValueError("api_keys is set but holds no key; give comma-separated keys or unset it")
        return self

    def rubric_files(self) -> list[str]:
        """`extra_rubrics` as a list (comma-separated, so one env var can name several files)."""
        return [part.strip() for part in self.extra_rubrics.split(",") if part.strip()]

    def key_list(self) -> list[str]:
        """The configured API keys (empty = auth disabled)."""
        if self.api_keys is None:
            return []
        return [key.strip() for key in self.api_keys.get_secret_value().split(",") if key.strip()]

    @property
    def is_loopback(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"} or self.host.startswith("127.")
