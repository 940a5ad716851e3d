"""`ServiceSettings`: every knob of `rlaif serve`, from `RLAIF_*` environment variables or CLI flags.

Precedence: CLI flag > environment variable (`RLAIF_PORT=9000`) > the defaults below.
API keys are held as a `SecretStr`, so they never appear in reprs, logs or error messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


DEFAULT_ITEM_TOKENS = 4096
"""Per-item token budget when neither `max_item_tokens` nor the engine's context length is known."""


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
    calibrations: str = Field("", description=(
        "Comma-separated calibration files (`rlaif calibrate`), at most one per pairwise rubric; each is applied to "
        "its rubric's judgments in the mode it was fit in. Checked against the engine at startup."))
    reward_model: Path | None = Field(None, description=(
        "Directory of a distilled reward model (rlaif.judge.reward_model.RewardModel) to serve in "
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
    get_reward_max_items: int = Field(8192, ge=1, description=(
        "Most samples in one /get_reward request (413 beyond). Larger than max_items because OpenRLHF <= 0.9 "
        "posts a whole rollout (1,024 samples by default) at once; the service judges it in engine batches."))
    max_chars: int = Field(32_000, ge=1, description="Longest prompt/response/reference/query, in characters (413 beyond).")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body in bytes (413 beyond).")
    max_item_tokens: int | None = Field(None, ge=16, description=(
        "Most tokens one item may need in its longest engine sequence (rendered rubric + label, or + CoT "
        "rationale); 413 beyond. Unset = the engine's context length, or 4096 when the engine does not "
        "report one. Never more than the context length or max_batch_tokens."))
    max_batch_tokens: int | None = Field(None, ge=16, description=(
        "Most tokens in one engine batch (sum over its items of their engine sequences); larger requests "
        "are split across batches. Unset = 4 x max_item_tokens."))

    # --- connections
    max_connections: int = Field(256, ge=1, description=(
        "Most open connections and in-flight requests (uvicorn's limit_concurrency); requests beyond get 503."))
    header_timeout: float = Field(10.0, gt=0.0, description=(
        "Seconds a connection may take to send a request's line and headers before it is closed (408)."))
    body_timeout: float = Field(60.0, gt=0.0, description="Seconds to receive a whole request body (408 beyond).")
    keep_alive_timeout: int = Field(5, ge=1, description="Seconds an idle keep-alive connection stays open.")

    # --- behaviour
    prefix_mismatch: Literal["recover", "whole_query", "error"] = Field("recover", description=(
        "/get_reward when prompts[i] is not a prefix of query[i] (OpenRLHF left-truncates long prompts but "
        "sends them whole): `recover` = the response is what follows the longest suffix of prompts[i] found "
        "in query[i] (>= 16 characters, or the whole prompt), else the whole query, flagged in extra_logs; "
        "`whole_query` = judge the whole query, flagged; `error` = strict, 422 naming the indices."))
    strip_chat_template: bool = Field(True, description=(
        "/get_reward: remove the policy's chat-template markers (ChatML, Llama-3, Gemma, Phi-3, [INST]) from "
        "prompts and trailing end-of-turn / padding tokens from responses before judging, so a templated "
        "(prompt, response) gets the same reward as the plain one from /v1/rewards."))
    api_keys: SecretStr | None = Field(None, description=(
        "Comma-separated bearer tokens. When set, every endpoint except /healthz and /readyz (and the "
        "OpenAPI docs with public_docs) needs `Authorization: Bearer <key>`."))
    public_docs: bool = Field(False, description=(
        "Serve /docs, /redoc and /openapi.json without a key even when api_keys are set (they are open "
        "anyway when no keys are configured)."))
    cache: bool = Field(True, description="Use the SQLite judgment cache (repeated items skip the engine).")
    cache_path: Path | None = Field(None, description="Cache file; unset = $RLAIF_CACHE_DIR/judgments.sqlite.")

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if self.max_queue < self.max_items:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_items ({self.max_items}), "
                             "or a full-size request could never be queued; raise max_queue or lower max_items")
        if self.max_item_tokens is not None and self.max_batch_tokens is not None \
                and self.max_batch_tokens < self.max_item_tokens:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_item_tokens "
                             f"({self.max_item_tokens}), or an item of the allowed size could never be judged")
        if self.api_keys is not None and not self.key_list():
            raise ValueError("api_keys is set but holds no key; give comma-separated keys or unset it")
        return self

    def token_budget(self, context_length: int | None) -> tuple[int, int]:
        """(max_item_tokens, max_batch_tokens) for an engine with this context length (None = unknown)."""
        item = self.max_item_tokens or context_length or DEFAULT_ITEM_TOKENS
        if context_length is not None:
            item = min(item, context_length)
        if self.max_batch_tokens is not None:
            item = min(item, self.max_batch_tokens)  # an item must fit in a batch
        return item, self.max_batch_tokens or 4 * item

    def calibration_files(self) -> list[str]:
        """`calibrations` as a list of paths."""
        return [part.strip() for part in self.calibrations.split(",") if part.strip()]

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
