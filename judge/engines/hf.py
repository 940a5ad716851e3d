"""`HFEngine`: judge and generate with a transformers causal LM on CPU or CUDA.

(Over 500 lines on purpose: the radix-tree planner and the batched forward it drives share
private row/node types and one exactness rule; split apart they would need them as public API.)

What makes it fast, and why it stays exact:
- **Exact labels.** `label_logprobs` returns log P(the reply is exactly the label) (the project's
  one label semantics, `rlaif.judge.engines.base`): the label's tokens, then a token that ends it,
  read over the whole vocabulary (special tokens and tokens starting with a non-word character,
  minus those that would continue into another label), so "10" never counts as "1".
- **Last-position logits only.** Every query needs one row of next-token logits, so
  `logits_to_keep=1` skips the (vocab x seq) projection for every other position.
- **Radix-tree prefix sharing.** A judge call asks for the next-token distribution after many
  token sequences that share long prefixes: the rubric head (all of them), the user request (both
  presentation orders of a pair, every sample judged against one prompt), the whole prompt (its
  label queries `prompt + "A"`, `prompt + "1"`, `prompt + "10"`). The sequences are arranged in a
  radix tree and every tree node's tokens are run exactly once, on top of its ancestors' cached
  keys/values. Rows of one forward pass are laid out `[prefix][pad][ancestors][pad][own tokens]`:
  the mask hides the padding and explicit `position_ids` continue each row's own positions, so
  every row computes what it would compute alone. The common prefix of a call is kept in a
  small LRU across calls (the rubric head of the next request is free).
- **Only where that is provably exact.** Padding *inside* the cache and explicit positions are
  exact for full causal attention with positions driven by `position_ids`; a sliding window is
  applied by cache index, so padding shifts it. `rlaif.judge.engines.exactness.prefix_sharing_support`
  decides per model (allowlisted architectures + config checks); sliding-window models share
  only calls whose padded rows fit inside the window; everything else runs plain left-padded
  batches (exact for any causal LM: padding precedes each row's tokens). `engine.sharing` says
  which rule applies and `engine.stats` counts which path each call took and the tokens it ran.
- **Padding-aware batches.** Rows are sorted by the tokens they run and cut into batches by a
  small dynamic program minimizing padded tokens plus a per-forward cost (`batch_overhead_tokens`:
  small on CPU, large on CUDA). Subtrees are processed depth-first in waves of at most
  `max_wave_tokens` tokens, which bounds the keys/values held at once.
- **oneDNN linear layers on CPU** for models the engine loaded itself (`rlaif.judge.cpu_kernels`).
- Masks come from lengths, never from `ids != pad_id` (SmolLM2's pad token is its EOS, which also
  occurs inside chat prompts).

Identity (`engine_id`): a content fingerprint of the model files (or of the weights of a model
object handed in), dtype and device class, so two checkpoints in folders of the same name never
share cache entries.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rlaif.judge.cpu_kernels import use_onednn_linears
from rlaif.judge.engines.base import (
    EngineError,
    GenerationParams,
    LocalTokenizerMixin,
    check_labels,
    tokenizer_special_tokens,
)
from rlaif.judge.engines.exactness import SharingSupport, prefix_sharing_support
from rlaif.judge.models import load_causal_lm, model_fingerprint, module_fingerprint
from rlaif.judge.types import ChatPrompt

logger = logging.getLogger(__name__)

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Keys and values of every layer for one tree node: [(K, V)] with K, V of shape (1, H_kv, T, D)."""

CpuKernels = Literal["auto", "onednn", "torch"]

_MIN_PREFIX_TOKENS = 8
"""A shorter common prefix is not worth a cached KV entry."""


@dataclass
class EngineStats:
    """Counters of what the engine ran, so tests and benchmarks can see that sharing happened."""

    forward_passes: int = 0
    tokens_requested: int = 0
    """Sum of the lengths of the sequences whose next-token distribution was asked for."""
    tokens_computed: int = 0
    """Tokens actually run through the model (padding and cached prefixes excluded)."""
    shared_calls: int = 0
    plain_calls: int = 0
    prefix_cache_hits: int = 0
    tokens_generated: int = 0
    """Tokens sampled by `generate` (stop tokens excluded)."""

    def reset(self) -> None:
        for item in fields(self):
            setattr(self, item.name, 0)


class HFEngine(LocalTokenizerMixin):
    """transformers-backed engine. Construct once and share; calls are serialized by a lock."""

    def __init__(self, model_path: str | Path, *, name: str | None = None, gguf_file: str | None = None,
                 device: str = "cpu", dtype: str = "auto", max_batch_size: int = 16,
                 max_batch_tokens: int = 16384, max_wave_tokens: int = 16384, prefix_cache: bool = True,
                 prefix_cache_entries: int = 4, batch_overhead_tokens: int | None = None,
                 cpu_kernels: CpuKernels = "auto", model=None, tokenizer=None) -> None:
        if cpu_kernels not in ("auto", "onednn", "torch"):
            raise ValueError(f"cpu_kernels must be 'auto', 'onednn' or 'torch', got {cpu_kernels!r}")
        owns_model = model is None or tokenizer is None
        if owns_model:
            model, tokenizer = load_causal_lm(model_path, dtype=dtype, device=device, gguf_file=gguf_file)
            fingerprint = model_fingerprint(model_path, gguf_file=gguf_file)
        else:
            fingerprint = module_fingerprint(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = int(max_batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_wave_tokens = int(max_wave_tokens)
        self.prefix_cache = prefix_cache
        if batch_overhead_tokens is None:
            batch_overhead_tokens = 32 if self.device.type == "cpu" else 2048
        self.batch_overhead_tokens = int(batch_overhead_tokens)
        self._prefix_entries = int(prefix_cache_entries)
        self._prefix_kv: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()
        self._lock = threading.Lock()
        self._name = name or Path(str(model_path)).name
        self._dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self._fingerprint = fingerprint
        if tokenizer.chat_template is None:
            raise EngineError(f"{self._name}: the tokenizer has no chat template; judges need a chat/instruct model")
        self.sharing: SharingSupport = prefix_sharing_support(model)
        logger.info("%s: prefix sharing %s (%s)", self._name,
                    "on" if self.sharing.exact else f"within {self.sharing.window} tokens" if self.sharing.window
                    else "off", self.sharing.reason)
        self.stats = EngineStats()
        self._special_tokens = tokenizer_special_tokens(tokenizer)
        self._ending_masks: dict[tuple[str, ...], list[torch.Tensor]] = {}
        self.cpu_kernels_in_use = "torch"
        if cpu_kernels == "onednn" or (cpu_kernels == "auto" and owns_model):
            if use_onednn_linears(model, self.device):
                self.cpu_kernels_in_use = "onednn"

    # ------------------------------------------------------------------ identity and budgets
    @property
    def engine_id(self) -> str:
        return f"hf:{self._name}@{self._dtype}/{self.device.type}#{self._fingerprint}"

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def context_length(self) -> int | None:
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        for attribute in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(config, attribute, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return self._special_tokens

    # ------------------------------------------------------------------ labels
    def label_logprobs(self, prompts: Sequence[ChatPrompt], labels: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros((0, len(labels)))
        prompt_ids = [tuple(self.encode_prompt(p)) for p in prompts]
        return self.label_logprobs_from_ids(prompt_ids, labels)

    def label_logprobs_from_ids(self, prompt_ids: Sequence[tuple[int, ...]], labels: Sequence[str]) -> np.ndarray:
        """`label_logprobs` for already tokenized prompts. (N, L) log P(reply is exactly label)."""
        targets = check_labels(labels)
        label_ids = [tuple(self.encode_label(label)) for label in targets]
        ending = self._ending_masks_for(tuple(targets))  # per label: (V,) bool mask of tokens that end it
        # Every (prompt, label, j <= len(label)) needs the next-token distribution after prompt + label[:j]:
        # j < len reads label[j]; j == len reads the mass of tokens that end the label.
        queries: dict[tuple[int, ...], int] = {}
        for ids in prompt_ids:
            for tokens in label_ids:
                for j in range(len(tokens) + 1):
                    queries.setdefault(ids + tokens[:j], len(queries))
        reads: list[dict[int, float]] = [{} for _ in queries]  # per query: token id -> log-prob
        ends: dict[tuple[int, int], float] = {}  # (query, label) -> log P(next token ends the label)
        label_of_full: dict[int, list[int]] = {}
        for ids in prompt_ids:
            for k, tokens in enumerate(label_ids):
                label_of_full.setdefault(queries[ids + tokens], []).append(k)
        token_reads: dict[int, set[int]] = {}
        for ids in prompt_ids:
            for tokens in label_ids:
                for j in range(len(tokens)):
                    token_reads.setdefault(queries[ids + tokens[:j]], set()).add(tokens[j])

        def consume(query_indices: list[int], log_probs: torch.Tensor) -> None:
            for row, q in enumerate(query_indices):
                for token in token_reads.get(q, ()):
                    reads[q][token] = float(log_probs[row, token])
                for k in label_of_full.get(q, ()):
                    ends[(q, k)] = float(torch.logsumexp(log_probs[row][ending[k]], dim=0))

        with self._lock:
            self._evaluate(list(queries), consume)
        scores = np.zeros((len(prompt_ids), len(label_ids)), dtype=np.float64)
        for i, ids in enumerate(prompt_ids):
            for k, tokens in enumerate(label_ids):
                total = sum(reads[queries[ids + tokens[:j]]][tokens[j]] for j in range(len(tokens)))
                scores[i, k] = total + ends[(queries[ids + tokens], k)]
        return scores

    def _ending_masks_for(self, labels: tuple[str, ...]) -> list[torch.Tensor]:
        """(V,) bool masks of the tokens that end each label, built once per label set."""
        masks = self._ending_masks.get(labels)
        if masks is None:
            vocab = self._vocab_size()
            masks = []
            for found in self.label_ending_masks(labels):  # sized by the tokenizer; the logits may be wider
                mask = np.zeros(vocab, dtype=bool)
                mask[:min(vocab, len(found))] = found[:vocab]
                masks.append(torch.from_numpy(mask))
            self._ending_masks[labels] = masks
        return masks

    # ------------------------------------------------------------------ next-token distributions
    @torch.inference_mode()
    def next_token_logprobs(self, sequences: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """Log-softmax of the next-token logits after each token sequence. (Q, V) float32 on CPU."""
        unique = list(dict.fromkeys(tuple(s) for s in sequences))
        out = torch.empty((len(unique), self._vocab_size()), dtype=torch.float32)

        def consume(query_indices: list[int], log_probs: torch.Tensor) -> None:
            out[query_indices] = log_probs

        with self._lock:
            self._evaluate(unique, consume)
        index = {s: i for i, s in enumerate(unique)}
        return out[[index[tuple(s)] for s in sequences]]

    @torch.inference_mode()
    def _evaluate(self, sequences: list[tuple[int, ...]], consume: Callable[[list[int], torch.Tensor], None]) -> None:
        """Run the model for the next-token distribution after each (distinct, non-empty) sequence.

        `consume(query indices, log_probs (R, V))` is called once per forward pass with that pass's rows,
        so callers keep only what they need instead of (Q, V) for every query."""
        if any(len(s) == 0 for s in sequences):
            raise EngineError("cannot score an empty token sequence")
        self.stats.tokens_requested += sum(len(s) for s in sequences)
        root = _build_radix_tree(sequences)
        if self.prefix_cache and self._sharing_allowed(root):
            self.stats.shared_calls += 1
            self._evaluate_tree(root, sequences, consume)
        else:
            self.stats.plain_calls += 1
            self._evaluate_plain(sequences, consume)

    def _sharing_allowed(self, root: _Node) -> bool:
        if self.sharing.exact:
            return True
        if self.sharing.window is None:
            return False
        # Widest padded row any forward can have: deepest ancestor chain (prefix included) + widest node.
        nodes = list(_walk(root))[1:]
        return self.sharing.allows(max(node.start for node in nodes) + max(node.end - node.start for node in nodes))

    def _evaluate_plain(self, sequences: list[tuple[int, ...]], consume: Callable[[list[int], torch.Tensor], None]) -> None:
        """Each sequence on its own row, left-padded: exact for every causal LM."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        widths = [len(sequences[i]) for i in order]
        rows_per_batch = self.max_batch_size if self.sharing.batch_invariant else 1
        for begin, end in _plan_batches(widths, rows_per_batch, self.max_batch_tokens, self.batch_overhead_tokens):
            batch = order[begin:end]
            rows = [_Row(tokens=sequences[i], start=0, chain=()) for i in batch]
            log_probs, _ = self._forward(rows, None, keep_kv=False)
            consume(batch, log_probs)

    def _evaluate_tree(self, root: _Node, sequences: list[tuple[int, ...]],
                       consume: Callable[[list[int], torch.Tensor], None]) -> None:
        """Run every radix-tree node once on top of its ancestors' KV; see the module docstring."""
        prefix_node = _split_shared_prefix(root)
        prefix_kv: LayerKV | None = None
        prefix_len = 0
        if prefix_node is not None and prefix_node.end >= _MIN_PREFIX_TOKENS:
            prefix_len = prefix_node.end
            prefix_kv = self._prefix_kv_for(sequences[prefix_node.rep][:prefix_len])
            ready = list(prefix_node.children)
        else:
            ready = list(root.children)
        _count_pending(root)
        stack: list[list[_Node]] = [ready]
        while stack:
            group = stack.pop()
            wave, rest = _take_wave(group, self.max_wave_tokens)
            if rest:
                stack.append(rest)
            self._run_nodes(wave, sequences, prefix_kv, prefix_len, consume)
            children = [child for node in wave for child in node.children]
            if children:
                stack.append(children)

    def _run_nodes(self, nodes: list[_Node], sequences: list[tuple[int, ...]], prefix_kv: LayerKV | None,
                   prefix_len: int, consume: Callable[[list[int], torch.Tensor], None]) -> None:
        order = sorted(range(len(nodes)), key=lambda i: nodes[i].end - nodes[i].start)
        widths = [nodes[i].end - nodes[i].start for i in order]
        for begin, end in _plan_batches(widths, self.max_batch_size, self.max_batch_tokens, self.batch_overhead_tokens):
            batch = [nodes[i] for i in order[begin:end]]
            rows = [_Row(tokens=sequences[node.rep][node.start:node.end], start=node.start, chain=_chain(node, prefix_len))
                    for node in batch]
            keep = any(node.children for node in batch)
            log_probs, kvs = self._forward(rows, prefix_kv, keep_kv=keep, prefix_len=prefix_len)
            with_queries = [row for row, node in enumerate(batch) if node.queries]
            if with_queries:
                consume([q for row in with_queries for q in batch[row].queries],
                        log_probs[[row for row in with_queries for _ in batch[row].queries]])
            for row, node in enumerate(batch):
                if node.children:
                    assert kvs is not None
                    node.kv = kvs[row]
                _finished(node)

    def _forward(self, rows: list[_Row], prefix_kv: LayerKV | None, *, keep_kv: bool,
                 prefix_len: int = 0) -> tuple[torch.Tensor, list[LayerKV] | None]:
        """One forward pass over rows laid out [prefix][pad][ancestor chain][pad][own tokens]. (B, V) log-probs."""
        from transformers import DynamicCache

        batch_size, width = len(rows), max(len(r.tokens) for r in rows)
        chain_lens = [row.start - prefix_len for row in rows]
        chain_width = max(chain_lens)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        token_mask = torch.zeros((batch_size, width), dtype=torch.long)
        chain_mask = torch.zeros((batch_size, chain_width), dtype=torch.long)
        position_ids = torch.zeros((batch_size, width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.tokens)
            input_ids[i, width - n:] = torch.tensor(row.tokens)
            token_mask[i, width - n:] = 1
            chain_mask[i, chain_width - chain_lens[i]:] = 1
            position_ids[i, :] = row.start  # padding positions: any valid index, they are masked
            position_ids[i, width - n:] = torch.arange(row.start, row.start + n)
        attention_mask = torch.cat([torch.ones((batch_size, prefix_len if prefix_kv is not None else 0), dtype=torch.long),
                                    chain_mask, token_mask], dim=1)
        cache = None
        if prefix_kv is not None or chain_width > 0:
            cache = DynamicCache(ddp_cache_data=self._past_kv(prefix_kv, rows, chain_width), config=self.model.config)
        elif keep_kv:
            cache = DynamicCache(config=self.model.config)
        try:
            outputs = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                 position_ids=position_ids.to(self.device), past_key_values=cache,
                                 use_cache=cache is not None, logits_to_keep=1)
        except torch.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU to hit
            raise EngineError(f"out of memory on a batch of {batch_size}x{width}: lower max_batch_size") from exc
        self.stats.forward_passes += 1
        self.stats.tokens_computed += sum(len(r.tokens) for r in rows)
        log_probs = torch.log_softmax(outputs.logits[:, -1, :].float(), dim=-1).cpu()  # (B, V)
        if not keep_kv:
            return log_probs, None
        layers = outputs.past_key_values.layers
        kept = [[(layer.keys[i:i + 1, :, -len(row.tokens):, :].clone(), layer.values[i:i + 1, :, -len(row.tokens):, :].clone())
                 for layer in layers] for i, row in enumerate(rows)]
        return log_probs, kept

    def _past_kv(self, prefix_kv: LayerKV | None, rows: list[_Row],
                 chain_width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (B, H, prefix + chain_width, D): the shared prefix, then each row's left-padded ancestor chain."""
        like = prefix_kv if prefix_kv is not None else next(node.kv for row in rows for node in row.chain if node.kv)
        assert like is not None
        past = []
        for layer in range(len(like)):
            tensors = []
            for which in (0, 1):  # keys, values
                parts = []
                if prefix_kv is not None:
                    parts.append(prefix_kv[layer][which].expand(len(rows), -1, -1, -1))
                if chain_width > 0:
                    sample = like[layer][which]
                    padded = sample.new_zeros((len(rows), sample.shape[1], chain_width, sample.shape[3]))
                    for i, row in enumerate(rows):
                        position = chain_width - sum(node.end - node.start for node in row.chain)
                        for node in row.chain:
                            assert node.kv is not None, "an ancestor's KV was freed before its descendants ran"
                            own = node.kv[layer][which]
                            padded[i, :, position:position + own.shape[2], :] = own[0]
                            position += own.shape[2]
                    parts.append(padded)
                tensors.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
            past.append((tensors[0], tensors[1]))
        return past

    def _prefix_kv_for(self, prefix: tuple[int, ...]) -> LayerKV:
        """Keys/values of `prefix` (one row), computed once and kept in a small LRU."""
        cached = self._prefix_kv.get(prefix)
        if cached is not None:
            self._prefix_kv.move_to_end(prefix)
            self.stats.prefix_cache_hits += 1
            return cached
        ids = torch.tensor([prefix], device=self.device)
        outputs = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.stats.forward_passes += 1
        self.stats.tokens_computed += len(prefix)
        kv = [(layer.keys, layer.values) for layer in outputs.past_key_values.layers]
        self._prefix_kv[prefix] = kv
        while len(self._prefix_kv) > self._prefix_entries:
            self._prefix_kv.popitem(last=False)
        return kv

    def _vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    # ------------------------------------------------------------------ generate
    @property
    def generate_path(self) -> Literal["slots", "transformers"]:
        """`slots`: the fast sampler of `rlaif.judge.engines.sampling` (verified full-attention models);
        `transformers`: stock `generate()` for every other model."""
        return "slots" if self.sharing.exact else "transformers"

    @torch.inference_mode()
    def generate(self, prompts: Sequence[ChatPrompt], params: GenerationParams, *,
                 progress: Callable[[float], None] | None = None) -> list[list[str]]:
        """`params.n` completions per prompt. `progress(k)` (optional) is told how many sequences' worth of work
        (a float; they add up to len(prompts) * n) each step did, so a caller's bar moves during long samples.

        On the `slots` path a sample depends only on (seed, prompt, which copy of that prompt in the call,
        sample index), never on the batch it ran in; a seed of None draws one from torch's global RNG."""
        if not prompts:
            return []
        if params.n > 1 and params.temperature == 0:
            raise EngineError("n > 1 needs temperature > 0 (greedy decoding would repeat the same text)")
        encoded = [self.encode_prompt(p) for p in prompts]
        with self._lock:
            if self.generate_path == "slots":
                return self._generate_slots(encoded, params, progress)
            return self._generate_stock(encoded, params, progress)

    def _generate_slots(self, encoded: list[list[int]], params: GenerationParams,
                        progress: Callable[[float], None] | None) -> list[list[str]]:
        from rlaif.judge.engines.sampling import sample_sequences

        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        stop_check = None
        if params.stop:
            longest_stop = max(len(stop) for stop in params.stop)

            def stop_check(tokens: list[int]) -> bool:
                # Checked every 8 tokens; ends a row once a stop string is in its text and no longer stop
                # string could still begin before it (the text is cut at the first stop string later).
                if len(tokens) % 8:
                    return False
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = len(_cut_at_stop(text, params.stop))
                return cut < len(text) and len(text) - cut >= longest_stop

        tokens = sample_sequences(
            self.model, encoded, n=params.n, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, seed=seed, stop_token_ids=self._stop_token_ids(), max_slots=self.max_batch_size * params.n,
            pad_token_id=self.tokenizer.pad_token_id or 0, device=self.device, stop_check=stop_check,
            on_progress=progress)
        self.stats.tokens_generated += sum(len(ids) for samples in tokens for ids in samples)
        return [[_cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), params.stop).strip() for ids in samples]
                for samples in tokens]

    def _stop_token_ids(self) -> set[int]:
        """EOS of the tokenizer plus the end-of-turn ids the model's generation config names."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return {int(i) for i in ids if i is not None}

    def _generate_stock(self, encoded: list[list[int]], params: GenerationParams,
                        progress: Callable[[float], None] | None) -> list[list[str]]:
        """transformers' `generate()` in left-padded batches of `max_batch_size` prompts (any causal LM)."""
        results: list[list[str]] = [[] for _ in encoded]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(order), self.max_batch_size):
                batch = order[start:start + self.max_batch_size]
                texts = self._generate_batch([encoded[i] for i in batch], params)
                for offset, i in enumerate(batch):
                    results[i] = texts[offset * params.n:(offset + 1) * params.n]
                if progress is not None:
                    progress(len(batch) * params.n)
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
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        output = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs)
        generated = output[:, width:]
        ended = torch.isin(generated, torch.tensor(sorted(self._stop_token_ids()), device=generated.device))
        self.stats.tokens_generated += int(torch.where(ended.any(dim=1), ended.int().argmax(dim=1),
                                                       torch.full_like(ended[:, 0], generated.shape[1], dtype=torch.long)).sum())
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [_cut_at_stop(text, params.stop).strip() for text in texts]


# ---------------------------------------------------------------------------------- radix tree
@dataclass(eq=False)
class _Node:
    """Tokens [start, end) of sequence `rep`, shared by every sequence in this subtree."""

    start: int
    end: int
    rep: int
    parent: _Node | None = None
    children: list[_Node] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    """Sequences that end exactly here (their next-token distribution is this node's last position)."""
    kv: LayerKV | None = None
    pending: int = 0
    """Nodes of this subtree (itself included) that have not run yet; its KV is freed at 0."""


@dataclass(frozen=True)
class _Row:
    tokens: tuple[int, ...]
    start: int
    chain: tuple[_Node, ...]


def _build_radix_tree(sequences: Sequence[tuple[int, ...]]) -> _Node:
    """Compressed trie of distinct sequences, from their sorted order and neighbours' common prefixes."""
    root = _Node(start=0, end=0, rep=0)
    stack = [root]
    previous: tuple[int, ...] | None = None
    for index in sorted(range(len(sequences)), key=lambda i: sequences[i]):
        sequence = sequences[index]
        shared = _lcp_len(previous, sequence) if previous is not None else 0
        popped: _Node | None = None
        while stack[-1].end > shared:
            popped = stack.pop()
        top = stack[-1]
        if top.end < shared:  # split the popped node at `shared`
            assert popped is not None
            middle = _Node(start=top.end, end=shared, rep=popped.rep, parent=top)
            top.children[top.children.index(popped)] = middle
            popped.start, popped.parent = shared, middle
            middle.children.append(popped)
            stack.append(middle)
            top = middle
        if len(sequence) == top.end:  # a duplicate of the node's path
            top.queries.append(index)
            previous = sequence
            continue
        leaf = _Node(start=top.end, end=len(sequence), rep=index, parent=top, queries=[index])
        top.children.append(leaf)
        stack.append(leaf)
        previous = sequence
    return root


def _walk(node: _Node):
    yield node
    for child in node.children:
        yield from _walk(child)


def _split_shared_prefix(root: _Node) -> _Node | None:
    """The node holding the common prefix of every sequence, without queries (split off if needed)."""
    if len(root.children) != 1:
        return None
    node = root.children[0]
    if not node.queries:
        return node
    if node.end - node.start <= 1:
        return None
    # Some sequence *is* the common prefix: keep its last token out of the cached prefix.
    head = _Node(start=0, end=node.end - 1, rep=node.rep, parent=root)
    root.children = [head]
    node.start, node.parent = node.end - 1, head
    head.children.append(node)
    return head


def _count_pending(root: _Node) -> int:
    root.pending = 1 + sum(_count_pending(child) for child in root.children)
    return root.pending


def _finished(node: _Node) -> None:
    """Mark `node` as run; free every ancestor's KV whose whole subtree has now run."""
    current: _Node | None = node
    while current is not None:
        current.pending -= 1
        if current.pending == 0:
            current.kv = None
        current = current.parent


def _chain(node: _Node, prefix_len: int) -> tuple[_Node, ...]:
    """Ancestors of `node` between the cached prefix and the node itself, top-down."""
    chain = []
    current = node.parent
    while current is not None and current.end > prefix_len:
        chain.append(current)
        current = current.parent
    return tuple(reversed(chain))


def _take_wave(group: list[_Node], max_tokens: int) -> tuple[list[_Node], list[_Node]]:
    """Split sibling-level nodes into a wave of at most `max_tokens` tokens (at least one node) and the rest."""
    taken = 0
    for count, node in enumerate(group, start=1):
        taken += node.end - node.start
        if taken >= max_tokens:
            return group[:count], group[count:]
    return group, []


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
