"""Batched decoding: prompt ids in, summary ids out, each row stopping at its end of turn.

Greedy decoding (the default) runs on our own loop below; beam search, sampling and repetition
controls (`Decoding`'s other settings) run on transformers' `generate` over the same left-padded
batches, with the same stop ids, pad id and token budget (`generate_batch`). `generate` picks.

Our own loop rather than `model.generate`, because at SAMSum's sizes decoding is bound by kernel
launches and Python, not by the GPU: one forward per step into a preallocated KV cache
(`SlotCache`), no host synchronisation but a check every few steps, and on CUDA each step
captured once per batch as a CUDA graph and replayed: one launch per generated token instead of
hundreds. Without graphs (CPU, or `eval.cuda_graphs: false`) a step computes exactly what
`generate` computes: the same masks, the same kernels, so the same greedy tokens (a test keeps it
so). Any decoder-only Hugging Face model that accepts a 4-D attention mask decodes this way.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from samsum_qlora.batching import generation_batches, pad
from samsum_qlora.modeling import sdpa_swapped

CHECK_EVERY = 8  # steps between looks at whether every row has stopped (each look syncs the GPU)
PREFILL_TOKENS = 32768  # padded prompt tokens per prefill forward: enough to keep a GPU's matmuls busy


@dataclass(frozen=True)
class Decoding:
    """What every decoder here is told: at most `max_new_tokens`, a row ends at any of `stop_ids`,
    and `pad_id` fills left padding and the rows that have ended; then how to choose each token,
    named and meant as in transformers' GenerationConfig (`config.EvalArgs` describes each)."""

    max_new_tokens: int
    stop_ids: tuple[int, ...]
    pad_id: int
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42

    @property
    def greedy(self) -> bool:
        """The likeliest token at every step, as our own decoder computes it."""
        plain = self.no_repeat_ngram_size == 0 and self.repetition_penalty == 1
        return self.num_beams == 1 and not self.do_sample and plain

    def generation_config(self):
        """These settings as a complete transformers GenerationConfig. Sampling is temperature and
        top_p alone (top_k 0, where transformers would default to 50), so nothing a model's own
        generation_config.json sets for sampling leaks in."""
        from transformers import GenerationConfig

        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0} if self.do_sample else {}
        beams = {"num_beams": self.num_beams, "length_penalty": self.length_penalty} if self.num_beams > 1 else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=list(self.stop_ids),
            pad_token_id=self.pad_id,
            **sampling,
            **beams,
        )

    def batch_seed(self, keys: list[int]) -> int:
        """The seed of a sampled batch: from `seed` and its rows' stable keys (their row indices),
        so the same batch draws the same tokens in a rerun, a resumed run or another process."""
        digest = hashlib.sha256(f"{self.seed}:{min(keys)}:{len(keys)}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Decoded:
    ids: list[int]  # the generated ids, up to the first stop id (excluded)
    ended: bool  # stopped at a stop id, rather than at max_new_tokens


class SlotCache:
    """Keys and values of every layer. With `full_view` (what a CUDA graph needs): buffers
    allocated once per batch, [rows, kv heads, capacity, head dim], written in place at `slot` (a
    device tensor), every step attending over the whole buffer while the mask hides what is not
    written yet: fixed shapes and addresses; a prefill chunk (`chunk`) writes its rows' keys where
    the batch's left padding puts them and attends to its own. Without: grown by concatenation,
    exactly as transformers' `DynamicCache` grows, so a step runs the same kernels on the same
    layout as `generate` does."""

    def __init__(self, capacity: int, full_view: bool, device, rows: int):
        self.capacity, self.full_view, self.rows = capacity, full_view, rows
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.filled = 0  # host copy of the filled length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # while prefilling a chunk of rows: (their row indices, the slot their padded prompts start at)
        self.chunk: tuple[torch.Tensor, int] | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.full_view:
            if layer_idx in self.keys:
                key_states = torch.cat([self.keys[layer_idx], key_states], dim=-2)
                value_states = torch.cat([self.values[layer_idx], value_states], dim=-2)
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
            return key_states, value_states
        if layer_idx not in self.keys:
            heads = key_states.shape[1]
            self.keys[layer_idx] = key_states.new_zeros(self.rows, heads, self.capacity, key_states.shape[-1])
            self.values[layer_idx] = value_states.new_zeros(self.rows, heads, self.capacity, value_states.shape[-1])
        if self.chunk is not None:  # the chunk attends to itself alone: nothing is cached before it
            rows, start = self.chunk
            end = start + key_states.shape[-2]
            self.keys[layer_idx][rows, :, start:end] = key_states
            self.values[layer_idx][rows, :, start:end] = value_states
            return key_states, value_states
        where = self.slot + torch.arange(key_states.shape[-2], device=self.slot.device)
        self.keys[layer_idx].index_copy_(2, where, key_states)
        self.values[layer_idx].index_copy_(2, where, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        self.slot += n
        self.filled += n

    # what transformers' mask code asks a cache before a forward (when no 4-D mask is given)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.filled

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.filled + query_length, 0


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", base)
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


DECODE_ATTENTION = "samsum_decode"


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except that a single query token attends on the key/value
    heads as they are, its query heads grouped per KV head (GQA), rather than on the cache copied
    once per group (`repeat_kv`, which transformers 5.17's SDPA path does whenever a mask is given):
    for a 1B model at batch 256 over 1,000 cached tokens, tens of GB moved per step."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    rows, heads, queries, _ = query.shape
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1  # the same for every head
    if queries != 1 or groups == 1 or not shared_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("SDPA does not support softcap: set model.attn_implementation=eager")
    grouped = query.reshape(rows, heads // groups, groups, query.shape[-1])  # head h reads KV head h // groups
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def grouped_decode_attention(model):
    """Within: an SDPA model attends with `decode_attention`. Other implementations are left alone."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_swapped(model, DECODE_ATTENTION, decode_attention, mask=sdpa_mask)


def attention_mask(valid: torch.Tensor, start: int, queries: int, keys: int) -> torch.Tensor:
    """Boolean [rows, 1, queries, keys] mask of the queries at positions start.. over the first
    `keys` positions: causal, and blind to padding. A padding query (left padding) sees itself,
    so no row of the softmax is empty: an empty row is NaN, and 0 x NaN would reach the real rows."""
    q = torch.arange(start, start + queries, device=valid.device)[:, None]
    k = torch.arange(keys, device=valid.device)[None, :]
    mask = (k <= q) & (valid[:, None, :keys] | (k == q))
    return mask[:, None]


@torch.inference_mode()
def decode_batch(
    model,
    prompts: list[list[int]],
    decoding: Decoding,
    *,
    graphs: bool = False,
    full_view: bool | None = None,
    prefill_tokens: int = PREFILL_TOKENS,
) -> list[Decoded]:
    """Greedy continuations of `prompts`, left-padded into one batch. `full_view` (implied by
    `graphs`) attends over the whole preallocated cache, as a captured graph must, with
    `decode_attention`, after prefilling the prompts in chunks of similar length of at most
    `prefill_tokens` padded tokens; without it, a step computes what `generate` computes."""
    full_view = graphs if full_view is None else full_view
    with grouped_decode_attention(model) if full_view else nullcontext():
        return _decode(model, prompts, decoding, graphs=graphs, full_view=full_view, prefill_tokens=prefill_tokens)


def _decode(model, prompts, decoding: Decoding, *, graphs: bool, full_view: bool, prefill_tokens: int) -> list[Decoded]:
    max_new_tokens, pad_id, stop_ids = decoding.max_new_tokens, decoding.pad_id, decoding.stop_ids
    device = next(model.parameters()).device
    ids, real = (t.to(device) for t in pad(prompts, pad_id, left=True))
    rows, width = ids.shape
    padded = bool((real == 0).any())
    cache = SlotCache(width + max_new_tokens, full_view, device, rows)
    valid = torch.zeros(rows, width + max_new_tokens, dtype=torch.bool, device=device)
    valid[:, :width] = real.bool()
    kwarg = cache_keyword(model)

    def forward(input_ids, positions, mask):
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{kwarg: cache},
        )
        return out.logits[:, -1]

    # --- prefill: the prompts, in one forward, or in chunks of similar length (padding costs compute) ---
    if full_view:
        logits = _prefill_chunks(forward, prompts, cache, width, pad_id, prefill_tokens)
    else:
        logits = _prefill(forward, ids, real)
    cache.advance(width)
    stop_tensor = torch.tensor(stop_ids, device=device)
    step = _Step(forward, rows, real.sum(-1, keepdim=True), valid, graphs, padded)  # next position: prompt length
    generated = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        token = logits.argmax(-1).masked_fill(done, pad_id)
        generated[:, t] = token
        done |= torch.isin(token, stop_tensor)
        if t + 1 == max_new_tokens or ((t + 1) % CHECK_EVERY == 0 and bool(done.all())):
            break
        logits = step(token, cache)
    stops = set(stop_ids)
    return [cut(seq, stops) for seq in generated.tolist()]


def _prefill(forward, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """One forward over left-padded prompts: positions count real tokens only, and a mask is given
    only where there is padding (none lets SDPA take its causal kernels, as `generate` does)."""
    n = ids.shape[1]
    mask = attention_mask(real.bool(), 0, n, n) if bool((real == 0).any()) else None
    return forward(ids, (real.cumsum(-1) - 1).clamp(min=0), mask)


def _prefill_chunks(forward, prompts, cache: SlotCache, width: int, pad_id: int, max_tokens: int) -> torch.Tensor:
    """Each chunk left-padded to its own longest prompt only and written into the cache where the
    batch's left padding puts it (ending at `width`): the last logits of every row."""
    lengths = [len(p) for p in prompts]
    logits = None
    for chunk in generation_batches(lengths, max_rows=len(prompts), max_tokens=max_tokens, new_tokens=0):
        ids, real = (t.to(cache.slot.device) for t in pad([prompts[i] for i in chunk], pad_id, left=True))
        rows = torch.tensor(chunk, device=ids.device)
        cache.chunk = (rows, width - ids.shape[1])
        out = _prefill(forward, ids, real)
        logits = out.new_empty(len(prompts), out.shape[-1]) if logits is None else logits
        logits[rows] = out
    cache.chunk = None
    return logits


class _Step:
    """One decoding step: the new tokens at the next slot. With `graphs`, the inputs live in fixed
    buffers and the forward is captured as a CUDA graph on first use, then replayed."""

    def __init__(self, forward: Callable, rows: int, next_positions, valid, graphs: bool, padded: bool):
        self.forward, self.valid, self.graphs, self.padded = forward, valid, graphs, padded
        self.positions = next_positions.clone()
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=valid.device)
        self.graph = None
        self.logits = None

    def mask(self, cache: SlotCache):
        if cache.full_view:  # a view: what is written into `valid` later reaches a captured graph
            return self.valid[:, None, None, :]
        return attention_mask(self.valid, cache.filled, 1, cache.filled + 1) if self.padded else None

    def __call__(self, token, cache: SlotCache):
        self.tokens.copy_(token[:, None])
        self.valid.index_fill_(1, cache.slot, True)
        if not self.graphs:
            logits = self.forward(self.tokens, self.positions, self.mask(cache))
        else:
            if self.graph is None:
                self._capture(self.mask(cache))
            self.graph.replay()
            logits = self.logits
        cache.advance(1)
        self.positions += 1
        return logits

    def _capture(self, mask) -> None:
        def run():
            return self.forward(self.tokens, self.positions, mask)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazily created kernels and workspaces
            run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run()


def cut(seq: list[int], stops: set[int]) -> Decoded:
    """A generated sequence up to its first stop id."""
    end = next((i for i, t in enumerate(seq) if t in stops), None)
    return Decoded(seq if end is None else seq[:end], end is not None)


@torch.inference_mode()
def generate_one(model, prompt: list[int], decoding: Decoding) -> Decoded:
    """The tutorial's per-example loop, one prompt: transformers' `generate`, greedy, stopping at
    the end of turn. What our decoder is compared with."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=decoding.max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=list(decoding.stop_ids),
        pad_token_id=decoding.pad_id,
    )
    return cut(out[0, len(prompt) :].tolist(), set(decoding.stop_ids))


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], decoding: Decoding, *, seed: int | None = None) -> list[Decoded]:
    """transformers' `generate` on `prompts` left-padded into one batch, with all of `decoding`'s
    settings (beam search, sampling, repetition controls), its stop ids, pad id and token budget.
    Sampling draws from torch's generator seeded with `seed` (default `decoding.seed`); the
    caller's random state is restored afterwards."""
    device = next(model.parameters()).device
    ids, real = (t.to(device) for t in pad(prompts, decoding.pad_id, left=True))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(decoding.seed if seed is None else seed)
        out = model.generate(input_ids=ids, attention_mask=real, generation_config=decoding.generation_config())
    stops = set(decoding.stop_ids)
    return [cut(seq, stops) for seq in out[:, ids.shape[1] :].tolist()]


def generate(
    model,
    prompts: list[list[int]],
    batches: list[list[int]],
    decoding: Decoding,
    *,
    graphs: bool,
    on_batch: Callable[[list[int], list[Decoded]], None],
    progress: bool = True,
    keys: list[int] | None = None,
) -> None:
    """Decode `batches` (lists of indices into `prompts`); `on_batch(indices, decoded)` after each.

    Greedy decoding runs on our decoder (with CUDA graphs where asked for and possible); any other
    on `generate_batch`, each batch seeded from `decoding.seed` and its prompts' `keys`: numbers
    that stay with a prompt across runs, such as its row's index (default: positions in `prompts`)."""
    from tqdm.auto import tqdm

    graphs = graphs and next(model.parameters()).is_cuda
    keys = list(range(len(prompts))) if keys is None else keys
    with tqdm(total=sum(map(len, batches)), desc="generating", unit="summary", disable=not progress) as bar:
        for idx in batches:
            batch = [prompts[i] for i in idx]
            if decoding.greedy:
                decoded, graphs = _greedy(model, batch, decoding, graphs)
            else:
                decoded = generate_batch(model, batch, decoding, seed=decoding.batch_seed([keys[i] for i in idx]))
            on_batch(idx, decoded)
            bar.update(len(idx))


def _greedy(model, batch: list[list[int]], decoding: Decoding, graphs: bool) -> tuple[list[Decoded], bool]:
    """Our decoder on one batch, with CUDA graphs until a capture fails: (decoded, graphs still on)."""
    try:
        return decode_batch(model, batch, decoding, graphs=graphs), graphs
    except RuntimeError as e:
        if not graphs or "graph" not in str(e).lower():
            raise
        print(f"note: CUDA graph capture failed ({str(e).splitlines()[0][:120]}); decoding without", file=sys.stderr)
        return decode_batch(model, batch, decoding, graphs=False), False
