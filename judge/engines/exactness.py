"""When shared-prefix KV reuse is exact: a per-architecture rule, read from the model's config.

`HFEngine`'s fast path runs a shared token prefix once and lays every batch row out as
``[prefix][pad][middle][pad][tokens]``: cached keys/values of earlier segments, padding *between*
them, the row's own tokens right-aligned. The attention mask hides the padding and explicit
`position_ids` continue each row's own positions, so a row sees what it would see alone -- but
only if nothing in the model depends on a token's *index in the cache* rather than on its
position id or its mask bit. `prefix_sharing_support(model)` decides that from the config (and the
loaded model's attention implementation), answering with a `SharingSupport`; anything it cannot
vouch for gets "not exact" and the engine falls back to plain left padding (all padding before
all real tokens, which keeps every index difference equal to the position difference).

Why each condition matters (each one is pinned by `tests/test_hf_architectures.py`):

- **Verified model types only** (`_VERIFIED`). Exactness is a property of a modeling file, not of a
  config field: ALiBi models (BLOOM, MPT, Falcon-ALiBi) and OPT derive positions from the mask or
  from token indices, prefix-LM and multimodal models (PaliGemma, Gemma-3 with images) switch
  masks on token types, state-space and hybrid models (Mamba, Jamba, Qwen3-Next) carry a
  recurrent state that padding runs through, encoder-decoders have a second cache. A type is on
  the list only after the equivalence test passed on a tiny random instance of it.
- **Causal, decoder-only.** `is_causal=False` / `use_bidirectional_attention` (EmbeddingGemma-style
  configs) let early tokens see later ones, so a cached prefix would be wrong; encoder-decoders and
  cross-attention (`add_cross_attention`) depend on an encoder input the cache does not hold.
- **Attention implementation `eager` or `sdpa`.** Both take the 4-D mask built from the 2-D
  padding mask as is. Other kernels (flash-attention's unpadding, flex, paged) build their own
  layout from the mask and have not been verified with holes in the middle of a row.
- **Sliding-window layers** (`layer_types` containing `"sliding_attention"`, or a `sliding_window`
  on a model without `layer_types`, e.g. Mistral, Phi-3, Starcoder2; Qwen2/Qwen3 only when
  `use_sliding_window` and the layer is past `max_window_layers`, which their configs fold into
  `layer_types`). transformers applies the window by *cache index* (`kv_idx > q_idx - window`) and
  `DynamicSlidingWindowLayer` keeps the last `window - 1` cached entries by index. Padding inside
  the cache shifts a row's real tokens further apart in index than in position, so tokens inside
  the window by position drop out of it (and a long prefix is truncated before the rows ever see
  it). Plain left padding is exact because the window is relative: all of a row's real tokens are
  contiguous, so index distance equals position distance. Sharing is still exact when every row's
  total padded length (prefix + padded middles + padded tokens, i.e. the cache width of the final
  forward) is at most the window: then no index distance reaches it and no cache entry is dropped,
  in the shared run and in the reference alike. That bound is `SharingSupport.window`.
- **Chunked attention** (`attention_chunk_size`, Llama-4) puts chunk boundaries at fixed cache
  indices offset by the left padding; padding in the middle moves them. Never shared.
- **Other layer kinds** (linear attention, conv, mamba, "dummy" KV-sharing consumers of
  `kv_sharing_modes`): their cache is not a plain per-token key/value list. Never shared.
- **Rotary scaling that is a fixed function of the position** (`default`, `linear`, `llama3`,
  `yarn`). `dynamic` NTK recomputes frequencies from the batch's largest position id and keeps
  that state across calls, and `longrope` switches between its short and long factors on the
  batch's largest position id: a row's result then depends on its batch neighbours (and on call
  order), which no layout fixes -- plain left padding in a batch is not exact either for those.
- **Absolute learned positions read from `position_ids`** (GPT-2 `wpe`) are exact: explicit ids
  give every token its own position whatever its index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_VERIFIED: Mapping[str, str] = {
    "llama": "rotary positions from position_ids",
    "mistral": "rotary positions from position_ids",
    "mixtral": "rotary positions from position_ids, per-token expert routing",
    "qwen2": "rotary positions from position_ids",
    "qwen3": "rotary positions from position_ids",
    "phi3": "partial rotary positions from position_ids",
    "gemma": "rotary positions from position_ids",
    "gemma2": "rotary positions from position_ids, logit soft-capping",
    "gemma3_text": "rotary positions from position_ids (local and global bases)",
    "gpt2": "learned absolute positions from position_ids",
    "starcoder2": "rotary positions from position_ids",
    "olmo2": "rotary positions from position_ids",
    "granite": "rotary positions from position_ids, scaled residuals",
    "smollm3": "rotary positions from position_ids, no-RoPE layers",
}
"""Model types the equivalence test passed on, with what carries their positions."""

_EXACT_ATTENTION = frozenset({"eager", "sdpa"})
_STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
_SLIDING_KINDS = frozenset({"sliding_attention"})
_FULL_KINDS = frozenset({"full_attention"})


@dataclass(frozen=True)
class SharingSupport:
    """Whether shared-prefix KV reuse with padding between cached segments is exact for a model."""

    exact: bool
    """The shared-prefix path is exact for every sequence length."""
    window: int | None
    """If not exact for every length: sharing is still exact when every row's total padded length
    (cache width of the forward, prefix + padding + tokens) is <= window (sliding-window models).
    None = never."""
    reason: str
    """One line, e.g. "llama: full causal attention, rotary positions from position_ids"."""
    batch_invariant: bool = True
    """False when a row's result depends on the other rows of its batch even with plain left padding
    (rotary scaling computed from the batch's longest sequence): such models run one sequence per forward."""

    def allows(self, padded_length: int) -> bool:
        """Whether a forward whose rows are `padded_length` cache entries wide may use the shared layout."""
        return self.exact or (self.window is not None and padded_length <= self.window)


def prefix_sharing_support(model: Any) -> SharingSupport:
    """Decide from `model.config` (and its attention implementation) whether prefix sharing is exact."""
    config = model.config
    model_type = str(getattr(config, "model_type", "") or "unknown")

    def never(why: str) -> SharingSupport:
        return SharingSupport(exact=False, window=None, reason=f"{model_type}: {why}; plain left padding only")

    if model_type not in _VERIFIED:
        return never("architecture not verified for shared-prefix KV with padding inside the cache")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        return never("encoder-decoder / cross-attention")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if not getattr(text, "is_causal", True) or getattr(text, "use_bidirectional_attention", False):
        return never("bidirectional attention")
    attention = getattr(config, "_attn_implementation", None) or "sdpa"  # unset: transformers' default
    if attention not in _EXACT_ATTENTION:
        return never(f"attention implementation {attention!r} not verified (eager and sdpa are)")
    dynamic = sorted(rope for rope in _rope_types(text) if rope not in _STATIC_ROPE)
    if dynamic:
        return SharingSupport(exact=False, window=None, batch_invariant=False,
                              reason=f"{model_type}: rope type {', '.join(dynamic)} depends on the batch's longest "
                                     "sequence; one sequence per forward")
    if getattr(text, "attention_chunk_size", None) is not None:
        return never("chunked attention is applied by cache index")
    if getattr(text, "kv_sharing_modes", None) is not None:
        return never("layers share KV caches")

    layers = _layer_kinds(text)
    other = sorted({kind for kind, _ in layers} - _SLIDING_KINDS - _FULL_KINDS)
    if other:
        return never(f"layer kinds {other} are not plain per-token key/value caches")
    positions = _VERIFIED[model_type]
    windows = [window for kind, window in layers if kind in _SLIDING_KINDS]
    if not windows:
        return SharingSupport(exact=True, window=None, reason=f"{model_type}: full causal attention, {positions}")
    if any(window is None for window in windows):
        return never("sliding-window layers without a window size")
    window = min(w for w in windows if w is not None)
    return SharingSupport(exact=False, window=window,
                          reason=f"{model_type}: {len(windows)}/{len(layers)} layers use a sliding window of {window}, "
                                 f"applied by cache index; shared only while rows fit in it ({positions})")


def _layer_kinds(text: Any) -> list[tuple[str, int | None]]:
    """Each decoder layer's (attention kind, sliding window), exactly as `DynamicCache(config=...)` builds it.

    transformers' own helper reads `layer_types` (Gemma-2/3, Qwen2/3 with `max_window_layers`
    folded in), else a config-level `sliding_window` makes every layer sliding (Mistral, Phi-3,
    Starcoder2: their modeling files read it the same way), and it honours per-layer configs.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    kinds, kwargs = get_layer_types_and_kwargs(text)
    return [(str(kind), None if extra.get("sliding_window") is None else int(extra["sliding_window"]))
            for kind, extra in zip(kinds, kwargs)]


def _rope_types(text: Any) -> set[str]:
    """Every rope type a config names (per layer type for Gemma-3-style nested parameters)."""
    found: set[str] = set()
    for field in ("rope_parameters", "rope_scaling"):
        found.update(_rope_types_in(getattr(text, field, None)))
    return found


def _rope_types_in(params: Any) -> Iterable[str]:
    if not isinstance(params, Mapping):
        return ()
    kind = params.get("rope_type", params.get("type"))
    if kind is not None:
        return (str(kind),)
    return [found for value in params.values() for found in _rope_types_in(value)]
