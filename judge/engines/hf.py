"""`HFEngine`: judge and generate with a transformers causal LM on CPU or CUDA.

What makes it fast and correct:
- **Last-position logits only.** A label distribution needs one row of logits per prompt;
  `logits_to_keep=1` skips the (vocab x seq) projection for every other position.
- **Shared-prefix KV reuse.** Every judge prompt in a call starts with the same chat header,
  system text and rubric head. That common token prefix is run once, its keys/values are kept
  (a small LRU keyed by the token ids, so it also survives across calls), and each batch only
  runs the per-item suffixes on top of it. This is what llama.cpp's prompt cache does, but
  shared by a whole batch instead of one slot.
- **Length-bucketed, left-padded batches.** Suffixes are sorted by length and left-padded so
  the last position is the real last token of every row. Padding sits *between* the shared
  prefix and the suffix; the attention mask hides it and explicit `position_ids` continue from
  the prefix, so each row sees exactly what it would see alone. Batched results therefore
  equal unbatched ones (tested to 1e-4). Masks come from lengths, never from `ids != pad_id`
  (SmolLM2's pad token is its EOS, which also occurs inside chat prompts).
- **Multi-token labels** ("10" is two tokens for many tokenizers) are scored as the sum of
  their token log-probs: extra last-position queries `prompt + label[:j]` read `label[j]`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from judge.engines.base import EngineError, GenerationParams, normalize_log_probs
from judge.models import load_causal_lm
from judge.types import ChatPrompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Query:
    """Token ids whose last position's next-token log-probs we need."""

    ids: tuple[int, ...]


class HFEngine:
    """transformers-backed engine. Construct once and share; calls are serialized by a lock."""

    def __init__(self, model_path: str | Path, *, name: str | None = None, gguf_file: str | None = None,
                 device: str = "cpu", dtype: str = "auto", max_batch_size: int = 16,
                 max_batch_tokens: int = 16384, prefix_cache: bool = True, prefix_cache_entries: int = 4,
                 model=None, tokenizer=None) -> None:
        if model is None or tokenizer is None:
            model, tokenizer = load_causal_lm(model_path, dtype=dtype, device=device, gguf_file=gguf_file)
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefix_cache = prefix_cache
        self._prefix_entries = prefix_cache_entries
        self._prefix_kv: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()
        self._name = name or Path(str(model_path)).name
        self._dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if tokenizer.chat_template is None:
            raise EngineError(f"{self._name}: the tokenizer has no chat template; judges need a chat/instruct model")

    @property
    def engine_id(self) -> str:
        return f"hf:{self._name}@{self._dtype}"

    @property
    def model_name(self) -> str:
        return self._name

    # ------------------------------------------------------------------ tokenization
    def encode_prompt(self, prompt: ChatPrompt) -> list[int]:
        """Chat template + generation header, tokenized without adding extra special tokens."""
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_label(self, label: str) -> list[int]:
        ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        if not ids:
            raise EngineError(f"label {label!r} tokenizes to nothing")
        return ids

    # ------------------------------------------------------------------ label_probs
    def label_probs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, len(labels)))
        prompt_ids = [tuple(self.encode_prompt(p)) for p in prompts]
        return self.label_probs_from_ids(prompt_ids, labels)

    def label_probs_from_ids(self, prompt_ids: Sequence[tuple[int, ...]], labels: Sequence[str]) -> np.ndarray:
        """Same as `label_probs` for already tokenized prompts. (N, L)."""
        label_ids = [self.encode_label(label) for label in labels]
        # Every (prompt, label, token j) needs log P(label[j] | prompt + label[:j]) at a last position.
        queries: dict[tuple[int, ...], int] = {}
        for ids in prompt_ids:
            for tokens in label_ids:
                for j in range(len(tokens)):
                    queries.setdefault(ids + tuple(tokens[:j]), len(queries))
        with self._lock:
            log_probs = self._last_token_log_probs(list(queries))  # (Q, V)
        scores = np.zeros((len(prompt_ids), len(labels)), dtype=np.float64)
        for i, ids in enumerate(prompt_ids):
            for k, tokens in enumerate(label_ids):
                scores[i, k] = sum(float(log_probs[queries[ids + tuple(tokens[:j])], tokens[j]]) for j in range(len(tokens)))
        return normalize_log_probs(scores)

    @torch.inference_mode()
    def _last_token_log_probs(self, sequences: list[tuple[int, ...]]) -> torch.Tensor:
        """Log-softmax of the next-token logits after each sequence. (Q, V) float32 on CPU."""
        prefix = _common_prefix(sequences) if self.prefix_cache and len(sequences) > 0 else ()
        # Leave at least one token of every sequence to run, so each row has a last position.
        prefix = prefix[: min(len(s) for s in sequences) - 1] if prefix else ()
        prefix_kv = self._prefix_kv_for(prefix) if len(prefix) >= 8 else None
        if prefix_kv is None:
            prefix = ()
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out: list[torch.Tensor | None] = [None] * len(sequences)
        for batch in self._buckets(order, sequences, len(prefix)):
            suffixes = [sequences[i][len(prefix):] for i in batch]
            rows = self._forward_last(suffixes, prefix_kv, len(prefix))
            for i, row in zip(batch, rows):
                out[i] = row
        return torch.stack(out)  # type: ignore[arg-type]

    def _buckets(self, order: list[int], sequences: list[tuple[int, ...]], prefix_len: int):
        batch: list[int] = []
        for i in order:
            width = len(sequences[i]) - prefix_len  # sorted ascending: the newest is the widest
            if batch and (len(batch) >= self.max_batch_size or width * (len(batch) + 1) > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _forward_last(self, suffixes: list[tuple[int, ...]], prefix_kv, prefix_len: int) -> torch.Tensor:
        from transformers import DynamicCache

        batch_size, width = len(suffixes), max(len(s) for s in suffixes)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, ids in enumerate(suffixes):  # left padding: the last column is every row's last token
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            suffix_mask[row, width - len(ids):] = 1
        # Positions continue from the prefix and skip the padding. (B, S)
        position_ids = (prefix_len + suffix_mask.cumsum(dim=1) - 1).clamp(min=prefix_len)
        attention_mask = torch.cat([torch.ones((batch_size, prefix_len), dtype=torch.long), suffix_mask], dim=1)
        kwargs = {}
        if prefix_kv is not None:
            kwargs["past_key_values"] = DynamicCache(
                ddp_cache_data=[(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in prefix_kv],
                config=self.model.config)
        try:
            outputs = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                 position_ids=position_ids.to(self.device), use_cache=prefix_kv is not None,
                                 logits_to_keep=1, **kwargs)
        except torch.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU to hit
            raise EngineError(f"out of memory on a batch of {batch_size}x{width}: lower max_batch_size") from exc
        return torch.log_softmax(outputs.logits[:, -1, :].float(), dim=-1).cpu()  # (B, V)

    def _prefix_kv_for(self, prefix: tuple[int, ...]):
        """Keys/values of `prefix` (one row), computed once and kept in a small LRU."""
        cached = self._prefix_kv.get(prefix)
        if cached is not None:
            self._prefix_kv.move_to_end(prefix)
            return cached
        ids = torch.tensor([prefix], device=self.device)
        outputs = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = outputs.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefix_kv[prefix] = kv
        while len(self._prefix_kv) > self._prefix_entries:
            self._prefix_kv.popitem(last=False)
        return kv

    # ------------------------------------------------------------------ generate
    @torch.inference_mode()
    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams) -> list[list[str]]:
        if not prompts:
            return []
        encoded = [self.encode_prompt(p) for p in prompts]
        results: list[list[str]] = [[] for _ in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        with self._lock, torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(order), self.max_batch_size):
                batch = order[start:start + self.max_batch_size]
                texts = self._generate_batch([encoded[i] for i in batch], params)
                for offset, i in enumerate(batch):
                    results[i] = texts[offset * params.n:(offset + 1) * params.n]
        return results

    def _generate_batch(self, encoded: list[list[int]], params: GenerationParams) -> list[str]:
        width = max(len(ids) for ids in encoded)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        sampling = params.temperature > 0
        kwargs = {"do_sample": sampling, "max_new_tokens": params.max_new_tokens, "num_return_sequences": params.n,
                  "pad_token_id": pad_id, "eos_token_id": self.tokenizer.eos_token_id}
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        elif params.n > 1:
            raise EngineError("n > 1 needs temperature > 0 (greedy decoding would repeat the same text)")
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        output = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs)
        texts = self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        return [_cut_at_stop(text, params.stop).strip() for text in texts]


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def _common_prefix(sequences: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    first, last = min(sequences), max(sequences)  # the LCP of a set is the LCP of its lexicographic extremes
    n = 0
    for a, b in zip(first, last):
        if a != b:
            break
        n += 1
    return first[:n]
