"""Engine backends and the `build_engine(spec)` factory.

Engine specs are strings so the CLI, YAML configs and service settings all speak one language:

| spec | engine |
|---|---|
| `default` | the embedded SmolLM2-135M-Instruct (HFEngine on a dequantized copy of the GGUF) |
| `hf:<model id or path>[?device=cuda&dtype=bf16&max_batch_size=N]` | `HFEngine` |
| `hf:<file>.gguf[?dtype=bf16]` | `HFEngine` on the GGUF's weights, dequantized once into `$RLAIF_CACHE_DIR/plain/` |
| `openai:<base_url>#<model>[?api_key_env=VAR]` | `OpenAIEngine` (vLLM serve, llama.cpp server, SGLang, hosted APIs) |
| `vllm:<model>[?tensor_parallel_size=N&...]` | `VLLMEngine` (needs the `[vllm]` extra and a GPU; untested here) |

Options after `?` are engine keyword arguments (`default?device=cuda` works too).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from rlaif.judge.engines.base import Engine, EngineError, GenerationParams

__all__ = ["Engine", "EngineError", "GenerationParams", "build_engine", "parse_engine_spec", "validate_engine_spec"]

_INT_OPTIONS = {"max_batch_size", "max_batch_tokens", "max_wave_tokens", "tensor_parallel_size", "max_model_len",
                "prefix_cache_entries", "max_retries", "concurrency", "top_logprobs", "batch_overhead_tokens", "seed"}
_FLOAT_OPTIONS = {"gpu_memory_utilization", "timeout", "backoff_seconds"}
_BOOL_OPTIONS = {"prefix_cache", "enable_prefix_caching"}
_NOT_SPEC_OPTIONS = {"self", "model_path", "base_url", "model", "tokenizer_object", "api_key", "llm_kwargs"}
"""Constructor arguments a spec cannot set (positional targets, objects, secrets: use api_key_env)."""


def parse_engine_spec(spec: str) -> tuple[str, str, dict[str, object]]:
    """Split a spec into (backend, target, options). Raises ValueError with the accepted forms."""
    spec = spec.strip()
    base, _, query = spec.partition("?")
    options: dict[str, object] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        try:
            if key in _INT_OPTIONS:
                options[key] = int(value)
            elif key in _FLOAT_OPTIONS:
                options[key] = float(value)
            elif key in _BOOL_OPTIONS:
                options[key] = value.lower() in {"1", "true", "yes", "on"}
            else:
                options[key] = value
        except ValueError:
            raise ValueError(f"engine option {key}={value!r} in {spec!r} is not a number") from None
    if base == "default":
        return "default", "", options
    backend, sep, target = base.partition(":")
    if not sep or backend not in {"hf", "openai", "vllm"} or not target:
        raise ValueError(f"invalid engine spec {spec!r}; use 'default', 'hf:<model id or path>', "
                         "'openai:<base_url>#<model>' or 'vllm:<model>'")
    return backend, target, options


def check_engine_options(backend: str, options: dict[str, object]) -> None:
    """Refuse unknown options before anything loads, with the closest valid name.

    Checked against the engine class's own constructor, so the list can never drift from the code."""
    import difflib
    import inspect

    engine_class = _engine_class(backend)
    parameters = inspect.signature(engine_class.__init__).parameters
    accepted = sorted(name for name, p in parameters.items()
                      if name not in _NOT_SPEC_OPTIONS and p.kind is not inspect.Parameter.VAR_KEYWORD
                      and not (backend == "hf" and name in {"model", "tokenizer"}))
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # vLLM forwards unknown options to vllm.LLM, which validates them itself
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown engine option {key!r} for {backend} engines{hint} "
                             f"(accepted: {', '.join(accepted)})")


def _engine_class(backend: str) -> type:
    if backend in {"default", "hf"}:
        from rlaif.judge.engines.hf import HFEngine

        return HFEngine
    if backend == "openai":
        from rlaif.judge.engines.openai import OpenAIEngine

        return OpenAIEngine
    from rlaif.judge.engines.vllm import VLLMEngine

    return VLLMEngine


def validate_engine_spec(spec: str) -> tuple[str, str, dict[str, object]]:
    """Everything that can be checked about a spec without loading a model, in one place; returns the parse.

    Syntax, option names (with "did you mean"), the `openai:` model part, and that the model exists:
    a local folder or file, a model in the Hugging Face cache, or one the hub confirms (offline is
    reported at once; `rlaif.judge.models.check_model_source`). Every command calls it before it loads
    anything, and `build_engine` calls it first."""
    backend, target, options = parse_engine_spec(spec)
    from rlaif.judge.models import check_model_source, default_model_available

    if backend == "default":
        default_model_available()
    elif backend in {"hf", "vllm"}:
        check_model_source(target)
    elif not target.partition("#")[2]:
        raise ValueError(f"openai engine spec needs a model after '#': openai:<base_url>#<model>, got {spec!r}")
    check_engine_options(backend, options)  # imports the engine class (and torch): after the cheap checks
    return backend, target, options


def build_engine(spec: str = "default") -> Engine:
    """Construct the engine a spec names. Heavy backends are imported only when used."""
    backend, target, options = validate_engine_spec(spec)
    if backend == "default":
        from rlaif.judge.engines.hf import HFEngine
        from rlaif.judge.models import DEFAULT_MODEL_NAME, plain_checkpoint

        return HFEngine(plain_checkpoint(), name=DEFAULT_MODEL_NAME, **options)  # type: ignore[arg-type]
    if backend == "hf":
        from rlaif.judge.engines.hf import HFEngine

        if target.endswith(".gguf") and "gguf_file" not in options:
            from rlaif.judge.models import plain_gguf_checkpoint

            # A GGUF file: dequantize once into the cache, then load the plain folder (seconds, trainable).
            return HFEngine(plain_gguf_checkpoint(target), name=Path(target).stem, **options)  # type: ignore[arg-type]
        return HFEngine(target, **options)  # type: ignore[arg-type]
    if backend == "openai":
        from rlaif.judge.engines.openai import OpenAIEngine

        base_url, sep, model = target.partition("#")
        if not sep or not model:
            raise ValueError(f"openai engine spec needs a model after '#': openai:<base_url>#<model>, got {spec!r}")
        return OpenAIEngine(base_url, model, **options)  # type: ignore[arg-type]
    from rlaif.judge.engines.vllm import VLLMEngine

    return VLLMEngine(target, **options)  # type: ignore[arg-type]
