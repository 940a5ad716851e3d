"""Fast sampling for `HFEngine.generate`: slot-based KV cache, prompt prefilled once, rows refilled.

Policy sampling (`rlaif label`, `rlaif best-of-n`, CoT rationales) draws N continuations of each
prompt. transformers' `generate()` spends most of a CPU's time on work that does not change the
text: it prefills every prompt N times (`num_return_sequences` repeats the input first), keeps
computing rows that already ended (a batch runs until its longest sample stops) and grows every
layer's cache with `torch.cat` at each step (copying the whole cache per token). Here:

- **Prefill once per prompt.** A prompt's keys/values are computed once and copied into the
  N slots of its samples.
- **Slots, like llama.cpp's server.** Each sequence owns a slot (a row of a preallocated
  per-layer buffer) and writes its next key/value at its own column. Attention reads the active
  slots' columns through an explicit mask, and positions come from `position_ids`, so a slot's
  layout never has to line up with its neighbours'. A finished sequence frees its slot at once
  (the last active slot moves into it, so active slots stay contiguous and are passed as a view,
  without copying), and waiting prompts are admitted into free slots while the others decode:
  the batch stays full until the queue is empty.
- **Randomness keyed by the sequence, not the batch.** Each sampling step draws one uniform
  number from a counter-based hash of (seed, the prompt's tokens, which copy of that prompt in
  the call, sample index, step) and picks the token by inverting the CDF of the
  temperature/top-p distribution. So a sample's text depends only on its prompt, seed and index:
  not on batch size, call order, slot refills or which other prompts share the call (up to the
  ~1e-6 float noise of different batch shapes, which moves a draw only when it lands on a CDF
  boundary). The test suite checks that against a slow reference that runs one sequence at a
  time through the stock model without any cache.

Exactness: keys are cached after their rotary/position embedding, attention over cached keys is
order-invariant given the mask, and positions are explicit, which holds for the architectures
`rlaif.judge.engines.exactness` verifies for full causal attention (`SharingSupport.exact`).
`HFEngine` uses this path only for those, and transformers' `generate()` for every other model.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64's finalizer: a bijective 64-bit mixer (Steele et al. 2014)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sequence_key(seed: int, prompt_ids: Sequence[int], occurrence: int, sample: int) -> int:
    """64-bit key of one sampled sequence: (seed, prompt tokens, copy of that prompt in the call, sample index)."""
    digest = hashlib.blake2b(repr((int(seed), tuple(prompt_ids), occurrence, sample)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def step_uniform(key: int, step: int) -> float:
    """The uniform in (0, 1) that sequence `key` uses at generation step `step` (53 random bits)."""
    return ((_mix64(key ^ _mix64(step)) >> 11) + 0.5) / float(1 << 53)


def pick_tokens(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    """Next tokens from logits (R, V): argmax at temperature 0, else the inverse CDF at each row's uniform. (R,)

    Top-p keeps the fewest most likely tokens whose probability reaches `top_p` (the first one
    always), as transformers' `TopPLogitsWarper` does; probabilities are renormalized over them."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (R, V)
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)
        return order.gather(1, inverse_cdf(probs, uniforms).unsqueeze(1)).squeeze(1)
    return inverse_cdf(probs, uniforms)


_BLOCK = 256


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight reaches uniform x total weight. (R, V) -> (R,)

    Two levels (block sums, then one block's running sum) instead of a cumulative sum over the whole
    vocabulary, which is a slow sequential scan; sums in float64."""
    rows, width = weights.shape
    padded = -width % _BLOCK
    if padded:
        weights = torch.nn.functional.pad(weights, (0, padded))
    blocks = weights.view(rows, -1, _BLOCK)  # (R, nb, B)
    block_cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # (R, nb)
    targets = uniforms.to(torch.float64).unsqueeze(1) * block_cdf[:, -1:]  # (R, 1)
    block = torch.searchsorted(block_cdf, targets).clamp_(max=block_cdf.shape[1] - 1)  # (R, 1)
    start = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_(min=0)), 0.0)  # (R, 1)
    inner = blocks[torch.arange(rows), block.squeeze(1)].to(torch.float64).cumsum(dim=-1) + start  # (R, B)
    offset = torch.searchsorted(inner, targets).clamp_(max=_BLOCK - 1)  # (R, 1)
    return (block * _BLOCK + offset).squeeze(1).clamp_(max=width - 1)


class _SlotLayer(DynamicLayer):
    """One layer's keys/values in fixed slots: (slots, H_kv, capacity, D) buffers, written per slot at its own column.

    `update` stores the active slots' new keys at their columns and returns views of the active slots'
    columns [0, width): no concatenation, no copy."""

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def allocate(self, like: torch.Tensor, slots: int, capacity: int) -> None:
        shape = (slots, like.shape[1], capacity, like.shape[3])
        # Zeros, not empty: masked columns still enter q.k (then get the mask's minimum added), and
        # uninitialized memory can hold NaN/inf, which no additive mask removes.
        self.key_buffer = like.new_zeros(shape)
        self.value_buffer = like.new_zeros(shape)
        self.dtype, self.device = like.dtype, like.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        assert self.key_buffer is not None and self.value_buffer is not None
        owner = self.owner
        active, width = owner.active, owner.width
        slots, heads, capacity, dim = self.key_buffer.shape
        # key_states: (active, H_kv, 1, D), one new token per active slot, each at its own column; written
        # through a flat (slots * H * capacity, D) view at the indices the owner computed once per step.
        self.key_buffer.view(-1, dim).index_copy_(0, owner.flat_index, key_states.reshape(-1, dim))
        self.value_buffer.view(-1, dim).index_copy_(0, owner.flat_index, value_states.reshape(-1, dim))
        self.keys = self.key_buffer[:active, :, :width]
        self.values = self.value_buffer[:active, :, :width]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.width - 1 if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0


class SlotCache(DynamicCache):
    """A `DynamicCache` whose layers are `_SlotLayer`s sharing one slot bookkeeping (see module docstring)."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.layers = [_SlotLayer(self) for _ in range(num_layers)]
        self.active = 0
        self.width = 0
        self.flat_index = torch.zeros(0, dtype=torch.long)

    def allocate(self, like: list[tuple[torch.Tensor, torch.Tensor]], slots: int, capacity: int) -> None:
        for layer, (keys, _) in zip(self.layers, like):
            layer.allocate(keys, slots, capacity)

    def set_step(self, columns: torch.Tensor, width: int) -> None:
        """Active slots [0, len(columns)) write their next token at `columns`; attention reads [0, width)."""
        buffer = self.layers[0].key_buffer
        assert buffer is not None
        _, heads, capacity, _ = buffer.shape
        self.active, self.width = len(columns), width
        rows = torch.arange(len(columns), device=columns.device)
        # (active, H) flat row of (slot, head, column) in a (slots, H, capacity, D) buffer
        self.flat_index = ((rows.unsqueeze(1) * heads + torch.arange(heads, device=columns.device)) * capacity
                           + columns.unsqueeze(1)).reshape(-1)

    @property
    def capacity(self) -> int:
        buffer = self.layers[0].key_buffer
        return 0 if buffer is None else int(buffer.shape[2])

    def grow(self, capacity: int) -> None:
        """Widen every buffer to `capacity` columns (a rare copy: capacity doubles)."""
        for layer in self.layers:
            assert layer.key_buffer is not None and layer.value_buffer is not None
            old_k, old_v = layer.key_buffer, layer.value_buffer
            layer.key_buffer = old_k.new_zeros((*old_k.shape[:2], capacity, old_k.shape[3]))
            layer.value_buffer = old_v.new_zeros((*old_v.shape[:2], capacity, old_v.shape[3]))
            layer.key_buffer[:, :, :old_k.shape[2]] = old_k
            layer.value_buffer[:, :, :old_v.shape[2]] = old_v

    def write_prefix(self, slot: int, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Copy a prefilled prompt's keys/values ((H, length, D) per layer) into columns [0, length) of `slot`."""
        for layer, (keys, values) in zip(self.layers, layer_kv):
            assert layer.key_buffer is not None and layer.value_buffer is not None
            layer.key_buffer[slot, :, :length] = keys
            layer.value_buffer[slot, :, :length] = values

    def move_slot(self, source: int, target: int, length: int) -> None:
        for layer in self.layers:
            assert layer.key_buffer is not None and layer.value_buffer is not None
            layer.key_buffer[target, :, :length] = layer.key_buffer[source, :, :length]
            layer.value_buffer[target, :, :length] = layer.value_buffer[source, :, :length]


@dataclass
class _Sequence:
    prompt: int
    sample: int
    key: int
    length: int
    """Tokens held in its slot: prompt + generated so far (the next token's position)."""
    tokens: list[int]
    next_token: int = -1
    credited: float = 0.0
    """Share of this sequence already reported to `on_progress`."""


def sample_sequences(model, prompt_ids: Sequence[Sequence[int]], *, n: int, max_new_tokens: int, temperature: float,
                     top_p: float, seed: int, stop_token_ids: set[int], max_slots: int,
                     pad_token_id: int, device: torch.device, stop_check: Callable[[list[int]], bool] | None = None,
                     on_progress: Callable[[float], None] | None = None) -> list[list[list[int]]]:
    """Generated token ids [prompt][sample] (stop tokens excluded) for every prompt, `n` samples each.

    `stop_check(tokens)` may end a sequence early (the caller cuts its text at a stop string later);
    `on_progress(k)` is called after every step with how many sequences' worth of work it did: a sequence
    counts tokens generated / max_new_tokens while it runs and is topped up to 1 when it ends, so the
    amounts add up to the number of sequences and a bar moves while long samples are still running."""
    occurrences: Counter[tuple[int, ...]] = Counter()
    keys: list[list[int]] = []
    for ids in prompt_ids:
        occurrence = occurrences[tuple(ids)]
        occurrences[tuple(ids)] += 1
        keys.append([sequence_key(seed, ids, occurrence, s) for s in range(n)])
    results: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompt_ids]
    slots = max(n, max_slots - max_slots % n)  # whole prompts only
    queue = deque(sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i])))  # longest first: fewer regrowths
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = SlotCache(num_layers)
    active: list[_Sequence] = []
    valid: torch.Tensor | None = None  # (slots, capacity) bool: which columns each slot attends to
    dtype = next(model.parameters()).dtype
    blocked = torch.finfo(dtype).min

    def finish(sequences: list[_Sequence]) -> None:
        for sequence in sequences:
            results[sequence.prompt][sequence.sample] = sequence.tokens

    def report(running: list[_Sequence], ended: list[_Sequence]) -> None:
        if on_progress is None:
            return
        done = 0.0
        for sequence in running:
            credit = len(sequence.tokens) / max_new_tokens
            done += credit - sequence.credited
            sequence.credited = credit
        done += sum(1.0 - sequence.credited for sequence in ended)
        if done > 0:
            on_progress(done)

    while queue or active:
        free = slots - len(active)
        if queue and (free >= max(n, slots // 4) or not active):
            admitted = []
            while queue and free - len(admitted) * n >= n:
                admitted.append(queue.popleft())
            logits, prefill_kv = _prefill(model, [prompt_ids[i] for i in admitted], pad_token_id, device)
            if cache.capacity == 0:
                capacity = max(len(prompt_ids[i]) for i in admitted) + min(max_new_tokens, 256) + 1
                cache.allocate(prefill_kv, slots, capacity)
                valid = torch.zeros((slots, capacity), dtype=torch.bool, device=device)
            assert valid is not None
            width = prefill_kv[0][0].shape[2]
            first_uniforms = torch.tensor([step_uniform(keys[i][s], 0) for i in admitted for s in range(n)],
                                          dtype=torch.float64)
            first = pick_tokens(logits.repeat_interleave(n, dim=0), first_uniforms, temperature=temperature,
                                top_p=top_p).tolist()
            ended = []
            for row, i in enumerate(admitted):
                length = len(prompt_ids[i])
                if length + 1 > cache.capacity:
                    valid = _grow(cache, valid, length + 1)
                kv = [(k[row, :, width - length:], v[row, :, width - length:]) for k, v in prefill_kv]
                for s in range(n):
                    sequence = _Sequence(prompt=i, sample=s, key=keys[i][s], length=length, tokens=[])
                    token = first[row * n + s]
                    if token in stop_token_ids:
                        ended.append(sequence)
                        continue
                    sequence.tokens.append(token)
                    if max_new_tokens == 1 or (stop_check is not None and stop_check(sequence.tokens)):
                        ended.append(sequence)
                        continue
                    slot = len(active)
                    cache.write_prefix(slot, kv, length)
                    valid[slot].zero_()
                    valid[slot, :length] = True
                    sequence.next_token = token
                    active.append(sequence)
            del prefill_kv, logits
            finish(ended)
            report(active, ended)
            continue
        assert valid is not None
        # Decode one token for every active slot.
        count = len(active)
        longest = max(sequence.length for sequence in active) + 1
        if longest > cache.capacity:
            valid = _grow(cache, valid, max(longest, 2 * cache.capacity))
        lengths = torch.tensor([sequence.length for sequence in active], dtype=torch.long, device=device)
        valid[torch.arange(count, device=device), lengths] = True
        cache.set_step(lengths, longest)
        mask = torch.zeros((count, 1, 1, longest), dtype=dtype, device=device)
        mask.masked_fill_(~valid[:count, :longest].view(count, 1, 1, longest), blocked)
        input_ids = torch.tensor([[sequence.next_token] for sequence in active], dtype=torch.long, device=device)
        outputs = model(input_ids=input_ids, attention_mask=mask, position_ids=lengths.view(count, 1),
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
        uniforms = torch.tensor([step_uniform(sequence.key, len(sequence.tokens)) for sequence in active],
                                dtype=torch.float64)
        picked = pick_tokens(outputs.logits[:, -1, :].float(), uniforms, temperature=temperature, top_p=top_p).tolist()
        del outputs
        ended_slots = []
        for slot, (sequence, token) in enumerate(zip(active, picked)):
            sequence.length += 1
            if token in stop_token_ids:
                ended_slots.append(slot)
                continue
            sequence.tokens.append(token)
            sequence.next_token = token
            if len(sequence.tokens) >= max_new_tokens or (stop_check is not None and stop_check(sequence.tokens)):
                ended_slots.append(slot)
        ended = [active[slot] for slot in ended_slots]
        ending = set(ended_slots)
        report([sequence for slot, sequence in enumerate(active) if slot not in ending], ended)
        if ended_slots:
            finish(ended)
            # Free the slots: the last active slot moves into each hole, so active slots stay [0, count).
            for slot in sorted(ended_slots, reverse=True):
                last = len(active) - 1
                if slot != last:
                    cache.move_slot(last, slot, active[last].length)
                    valid[slot] = valid[last]
                    active[slot] = active[last]
                active.pop()
    return results


def _grow(cache: SlotCache, valid: torch.Tensor, capacity: int) -> torch.Tensor:
    cache.grow(capacity)
    wider = valid.new_zeros((valid.shape[0], capacity))
    wider[:, :valid.shape[1]] = valid
    return wider


@torch.inference_mode()
def _prefill(model, prompts: list[Sequence[int]], pad_token_id: int,
             device: torch.device) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Left-padded prefill of distinct prompts: last-position logits (P, V) and per-layer keys/values (P, H, W, D)."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    position_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids))
        attention_mask[row, width - len(ids):] = 1
        position_ids[row, width - len(ids):] = torch.arange(len(ids))
    cache = DynamicCache(config=model.config)
    outputs = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    position_ids=position_ids.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in outputs.past_key_values.layers]
    return outputs.logits[:, -1, :].float(), kv
