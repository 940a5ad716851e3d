"""`vllm.inputs.TokensPrompt` of the stand-in (a TypedDict in vLLM; a plain dict here). See `__init__`."""

from __future__ import annotations

from typing import TypedDict


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
