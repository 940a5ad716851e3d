"""`HFEngine`: judge and generate with a transformers causal LM on CPU or CUDA.

What makes it fast and correct:
- **Last-position logits only.** A label distribution needs one row of logits per prompt;
  `logits_to_keep=1` skips the (vocab x seq) projection for every other position.
- **Shared-prefix KV reuse, two levels.** Every judge prompt in a call starts with the same
  chat header, system text and rubric head. That common token prefix is run once, its
  keys/values are kept (a small LRU keyed by the token ids, so it also survives across
  calls). On top of it, prompts that share a further stretch form *groups*: the two
  presentation orders of a pair share the user request, several samples judged against one
  prompt share it too, and a multi-token label query `prompt + "1"` shares the whole prompt
  with `prompt`. Each group's shared stretch is run once (as a batch row of its own) and its
  members only run what differs. Prompts are sorted lexicographically, so groups are runs of
  neighbours; a prompt joins a group only if that saves tokens overall.
- **Padding-aware batches.** Rows are sorted by the number of tokens they still have to run
  and cut into batches by a small dynamic program that minimizes padded tokens plus a fixed
  per-forward cost (`batch_overhead_tokens`; small on CPU, where a row of 100+ tokens
  already keeps the matmuls busy and padding is pure waste; large on CUDA, where wide batches
  pay). Rows are left-padded so the last column is every row's real last token. Padding sits
  *between* the cached keys/values and the new tokens (and between the shared prefix and a
  group's stretch); the attention mask hides it and explicit `position_ids` continue each
  row's own positions, so every row sees exactly what it would see alone. Batched results
  therefore equal unbatched ones (tested to 1e-4). Masks come from lengths, never from
  `ids != pad_id` (SmolLM2's pad token is its EOS, which also occurs inside chat prompts).
- **oneDNN linear layers on CPU.** PyTorch's default fp32 GEMM (MKL) runs its AVX2 code path
  on AMD CPUs; oneDNN's AVX-512 kernels with weights pre-packed once are about 2x faster on
  the same fp32 math (agreement ~1e-6). The engine swaps the decoder's `nn.Linear` modules
  for packed ones only on CPU/fp32 models it loaded itself (never on a model passed in, which
  may be trained elsewhere), after checking the result against `F.linear` on the real weights;
  `cpu_kernels="torch"` turns it off.
- **Multi-token labels** ("10" is two tokens for many tokenizers) are scored as the sum of
  their token log-probs: extra last-position queries `prompt + label[:j]` read `label[j]`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from judge.cpu_kernels import use_onednn_linears
from judge.engines.base import (
    EngineError,
    GenerationParams,
    encode_chat_prompt,
    encode_label_ids,
    normalize_log_probs,
)
from judge.models import load_causal_lm
from judge.types import ChatPrompt

logger = logging.getLogger(__name__)

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Keys and values of every layer for one row: [(K, V)] with K, V of shape (1, H_kv, T, D)."""

CpuKernels = Literal["auto", "onednn", "torch"]

_MIN_SHARED_TOKENS = 8
"""Shorter shared stretches are not worth a separate KV (prefix or group)."""
_WAVE_ROWS_PER_BATCH = 4
"""A wave (groups processed together) holds up to this many batches' worth of rows."""
_WAVE_SHARED_TOKENS = 4096
"""...and at most this many group-shared tokens, which bounds the group KVs held at once."""


class HFEngine:
    """transformers-backed engine. Construct once and share; calls are serialized by a lock."""

    def __init__(self, model_path: str | Path, *, name: str | None = None, gguf_file: str | None = None,
                 device: str = "cpu", dtype: str = "auto", max_batch_size: int = 16,
                 max_batch_tokens: int = 16384, prefix_cache: bool = True, prefix_cache_entries: int = 4,
                 batch_overhead_tokens: int | None = None, cpu_kernels: CpuKernels = "auto",
                 model=None, tokenizer=None) -> None:
        owns_model = model is None or tokenizer is None
        if owns_model:
            model, tokenizer = load_causal_lm(model_path, dtype=dtype, device=device, gguf_file=gguf_file)
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = int(max_batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.prefix_cache = prefix_cache
        if batch_overhead_tokens is None:
            batch_overhead_tokens = 32 if self.device.type == "cpu" else 2048
        self.batch_overhead_tokens = int(batch_overhead_tokens)
        self._prefix_entries = int(prefix_cache_entries)
        self._prefix_kv: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()
        self._lock = threading.Lock()
        self._name = name or Path(str(model_path)).name
        self._dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if tokenizer.chat_template is None:
            raise EngineError(f"{self._name}: the tokenizer has no chat template; judges need a chat/instruct model")
        if cpu_kernels not in ("auto", "onednn", "torch"):
            raise ValueError(f"cpu_kernels must be 'auto', 'onednn' or 'torch', got {cpu_kernels!r}")
        self.cpu_kernels_in_use = "torch"
        if cpu_kernels == "onednn" or (cpu_kernels == "auto" and owns_model):
            if use_onednn_linears(model, self.device):
                self.cpu_kernels_in_use = "onednn"

    @property
    def engine_id(self) -> str:
        return f"hf:{self._name}@{self._dtype}"

    @property
    def model_name(self) -> str:
        return self._name

    # ------------------------------------------------------------------ tokenization
    def encode_prompt(self, prompt: ChatPrompt) -> list[int]:
        return encode_chat_prompt(self.tokenizer, prompt)

    def encode_label(self, label: str) -> list[int]:
        return encode_label_ids(self.tokenizer, label)

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
        if not self.prefix_cache:
            log_probs, _ = self._run_rows(list(sequences), [None] * len(sequences), None, 0, keep_kv=False)
            return log_probs
        prefix = _common_prefix(sequences)
        # Leave at least one token of every sequence to run, so each row has a last position.
        prefix = prefix[: min(len(s) for s in sequences) - 1]
        prefix_kv = self._prefix_kv_for(prefix) if len(prefix) >= _MIN_SHARED_TOKENS else None
        start = len(prefix) if prefix_kv is not None else 0
        out = torch.empty((len(sequences), self._vocab_size()), dtype=torch.float32)
        for wave in self._waves(_share_groups(sequences, start, _MIN_SHARED_TOKENS), start):
            # Stage 1: run each multi-member group's shared stretch once and keep its KV.
            shared = [(members, end) for members, end in wave if len(members) > 1]
            stretches = [sequences[members[0]][start:end] for members, end in shared]
            _, group_kv = self._run_rows(stretches, [None] * len(stretches), prefix_kv, start, keep_kv=True)
            # Stage 2: every member runs only what follows its group's stretch.
            kv_iter = iter(group_kv or [])
            rows: list[tuple[int, ...]] = []
            middles: list[LayerKV | None] = []
            owners: list[int] = []
            for members, end in wave:
                kv = next(kv_iter) if len(members) > 1 else None
                for i in members:
                    rows.append(sequences[i][end:])
                    middles.append(kv)
                    owners.append(i)
            log_probs, _ = self._run_rows(rows, middles, prefix_kv, start, keep_kv=False)
            out[owners] = log_probs
        return out

    def _waves(self, groups: list[tuple[list[int], int]], start: int) -> Iterator[list[tuple[list[int], int]]]:
        """Chunks of groups, so the group KVs held at once stay bounded."""
        wave: list[tuple[list[int], int]] = []
        rows = shared_tokens = 0
        for members, end in groups:
            wave.append((members, end))
            rows += len(members)
            shared_tokens += end - start
            if rows >= _WAVE_ROWS_PER_BATCH * self.max_batch_size or shared_tokens >= _WAVE_SHARED_TOKENS:
                yield wave
                wave, rows, shared_tokens = [], 0, 0
        if wave:
            yield wave

    def _run_rows(self, rows: list[tuple[int, ...]], middles: list[LayerKV | None], prefix_kv: LayerKV | None,
                  prefix_len: int, *, keep_kv: bool) -> tuple[torch.Tensor, list[LayerKV] | None]:
        """Run `rows` on top of the shared prefix (+ each row's own middle KV) in planned batches.

        Returns the last-position log-probs (R, V) and, with `keep_kv`, each row's new KV.
        """
        if not rows:
            return torch.empty((0, self._vocab_size())), ([] if keep_kv else None)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        widths = [len(rows[i]) for i in order]
        log_probs = torch.empty((len(rows), self._vocab_size()), dtype=torch.float32)
        kvs: list[LayerKV | None] = [None] * len(rows)
        for begin, end in _plan_batches(widths, self.max_batch_size, self.max_batch_tokens, self.batch_overhead_tokens):
            batch = order[begin:end]
            rows_lp, rows_kv = self._forward([rows[i] for i in batch], [middles[i] for i in batch],
                                             prefix_kv, prefix_len, keep_kv)
            log_probs[batch] = rows_lp
            if rows_kv is not None:
                for i, kv in zip(batch, rows_kv):
                    kvs[i] = kv
        return log_probs, (kvs if keep_kv else None)  # type: ignore[return-value]

    def _forward(self, rows: list[tuple[int, ...]], middles: list[LayerKV | None], prefix_kv: LayerKV | None,
                 prefix_len: int, keep_kv: bool) -> tuple[torch.Tensor, list[LayerKV] | None]:
        """One forward pass. Row layout: [prefix][pad][own middle][pad][own tokens]. (B, V) log-probs."""
        from transformers import DynamicCache

        batch_size, width = len(rows), max(len(r) for r in rows)
        middle_lens = [0 if m is None else m[0][0].shape[2] for m in middles]
        middle_width = max(middle_lens)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        token_mask = torch.zeros((batch_size, width), dtype=torch.long)
        middle_mask = torch.zeros((batch_size, middle_width), dtype=torch.long)
        for row, (ids, middle_len) in enumerate(zip(rows, middle_lens)):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            token_mask[row, width - len(ids):] = 1
            middle_mask[row, middle_width - middle_len:] = 1
        # Each row's positions continue from its own prefix + middle and skip padding. (B, W)
        offsets = torch.tensor(middle_lens, dtype=torch.long).unsqueeze(1) + prefix_len
        position_ids = torch.maximum(offsets + token_mask.cumsum(dim=1) - 1, offsets)
        attention_mask = torch.cat([torch.ones((batch_size, prefix_len if prefix_kv is not None else 0),
                                               dtype=torch.long), middle_mask, token_mask], dim=1)
        cache = None
        if prefix_kv is not None or middle_width > 0:
            cache = DynamicCache(ddp_cache_data=self._past_kv(prefix_kv, middles, middle_width, batch_size),
                                 config=self.model.config)
        elif keep_kv:
            cache = DynamicCache(config=self.model.config)
        try:
            outputs = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                 position_ids=position_ids.to(self.device), past_key_values=cache,
                                 use_cache=cache is not None, logits_to_keep=1)
        except torch.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU to hit
            raise EngineError(f"out of memory on a batch of {batch_size}x{width}: lower max_batch_size") from exc
        log_probs = torch.log_softmax(outputs.logits[:, -1, :].float(), dim=-1).cpu()  # (B, V)
        if not keep_kv:
            return log_probs, None
        layers = outputs.past_key_values.layers
        kept = [[(layer.keys[row:row + 1, :, -len(ids):, :].clone(), layer.values[row:row + 1, :, -len(ids):, :].clone())
                 for layer in layers] for row, ids in enumerate(rows)]
        return log_probs, kept

    def _past_kv(self, prefix_kv: LayerKV | None, middles: list[LayerKV | None], middle_width: int,
                 batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (B, H, prefix + middle_width, D): the shared prefix, then each row's left-padded middle."""
        n_layers = len(prefix_kv) if prefix_kv is not None else len(next(m for m in middles if m is not None))
        past = []
        for layer in range(n_layers):
            tensors = []
            for which in (0, 1):  # keys, values
                parts = []
                if prefix_kv is not None:
                    shared = prefix_kv[layer][which]
                    parts.append(shared.expand(batch_size, -1, -1, -1))
                if middle_width > 0:
                    like = next(m for m in middles if m is not None)[layer][which]
                    padded = like.new_zeros((batch_size, like.shape[1], middle_width, like.shape[3]))
                    for row, middle in enumerate(middles):
                        if middle is not None:
                            own = middle[layer][which]
                            padded[row, :, middle_width - own.shape[2]:, :] = own[0]
                    parts.append(padded)
                tensors.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
            past.append((tensors[0], tensors[1]))
        return past

    def _prefix_kv_for(self, prefix: tuple[int, ...]) -> LayerKV:
        """Keys/values of `prefix` (one row), computed once and kept in a small LRU."""
        cached = self._prefix_kv.get(prefix)
        if cached is not None:
            self._prefix_kv.move_to_end(prefix)
            return cached
        ids = torch.tensor([prefix], device=self.device)
        outputs = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in outputs.past_key_values.layers]
        self._prefix_kv[prefix] = kv
        while len(self._prefix_kv) > self._prefix_entries:
            self._prefix_kv.popitem(last=False)
        return kv

    def _vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

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


# ---------------------------------------------------------------------------------- planning helpers
def _plan_batches(widths: Sequence[int], max_batch_size: int, max_batch_tokens: int,
                  overhead_tokens: int) -> list[tuple[int, int]]:
    """Cut rows sorted by ascending width into [begin, end) batches of minimal padded cost.

    cost(batch) = rows * widest row (padding included) + overhead_tokens; a single row is always
    allowed even when it alone exceeds `max_batch_tokens`. O(n * max_batch_size).
    """
    n = len(widths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for begin in range(end - 1, max(-1, end - 1 - max_batch_size), -1):
            rows = end - begin
            if rows > 1 and rows * widths[end - 1] > max_batch_tokens:
                break
            cost = best[begin] + rows * widths[end - 1] + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    spans = []
    end = n
    while end > 0:
        spans.append((cut[end], end))
        end = cut[end]
    return spans[::-1]


def _share_groups(sequences: Sequence[tuple[int, ...]], start: int, min_shared: int) -> list[tuple[list[int], int]]:
    """Group sequences that share tokens beyond `start`: [(member indices, end of shared stretch)].

    Sequences are visited in lexicographic order, so a group's shared stretch is the common
    prefix of its first and last member. A sequence joins the current group only if the tokens
    saved grow ((m - 1) * stretch for m members); the stretch always leaves each member at least
    one token to run. Singletons get `end = start` (nothing shared beyond the prefix).
    """
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    groups: list[tuple[list[int], int]] = []
    members = [order[0]]
    end = len(sequences[order[0]]) - 1
    for i in order[1:]:
        candidate = min(end, _lcp_len(sequences[members[0]], sequences[i]), len(sequences[i]) - 1)
        saved_now = (len(members) - 1) * (end - start)
        if candidate - start >= min_shared and len(members) * (candidate - start) >= saved_now:
            members.append(i)
            end = candidate
        else:
            groups.append((members, end if len(members) > 1 else start))
            members, end = [i], len(sequences[i]) - 1
    groups.append((members, end if len(members) > 1 else start))
    return groups


def _lcp_len(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix, by binary search over slice equality (done in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def _common_prefix(sequences: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    first, last = min(sequences), max(sequences)  # the LCP of a set is the LCP of its lexicographic extremes
    return first[:_lcp_len(first, last)]


# ---------------------------------------------------------------------------------- oneDNN linears
