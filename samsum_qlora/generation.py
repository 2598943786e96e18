"""Batched decoding: prompt ids in, summary ids out, each row stopping at its end of turn.

Greedy decoding (the default), sampling (temperature, top_p) and beam search run on our own loop
below; repetition controls and sampled beams (`Decoding.slow_path`) run on transformers' `generate`
over the same left-padded batches, with the same stop ids, pad id and token budget
(`generate_batch`). `generate` picks. Beam search keeps each prompt's beams as rows of the cache,
reordered by index every step, and chooses beams exactly as transformers' `_beam_search` does
(`BeamSearch`): its scores, length penalty, early stopping and end-of-turn handling.

Our own loop rather than `model.generate`, because at SAMSum's sizes decoding is bound by kernel
launches and Python, not by the GPU: one forward per step into a preallocated KV cache
(`SlotCache`), no host synchronisation but a check every few steps, and on CUDA each step
captured once per batch as a CUDA graph and replayed: one launch per generated token instead of
hundreds. Without graphs (CPU, or `eval.cuda_graphs: false`) a step computes exactly what
`generate` computes: the same masks, the same kernels, so the same tokens, greedy, sampled (from the
same seed) or beams (tests keep it so). Any decoder-only Hugging Face model that accepts a 4-D
attention mask decodes this way.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from samsum_qlora import hf_compat
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
    early_stopping: bool | str = False  # beam search: True, False or "never", as transformers means them

    @property
    def greedy(self) -> bool:
        """The likeliest token at every step."""
        return self.num_beams == 1 and not self.do_sample and not self.slow_path

    @property
    def slow_path(self) -> str:
        """Why these settings decode on transformers' `generate` rather than ours; empty if they do not."""
        if self.no_repeat_ngram_size:
            return "eval.no_repeat_ngram_size"
        if self.repetition_penalty != 1:
            return "eval.repetition_penalty"
        if self.do_sample and self.num_beams > 1:
            return "eval.do_sample with eval.num_beams > 1 (sampled beams)"
        return ""

    def generation_config(self):
        """These settings as a complete transformers GenerationConfig. Sampling is temperature and
        top_p alone (top_k 0, where transformers would default to 50), so nothing a model's own
        generation_config.json sets for sampling leaks in."""
        from transformers import GenerationConfig

        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0} if self.do_sample else {}
        beams = (
            {"num_beams": self.num_beams, "length_penalty": self.length_penalty, "early_stopping": self.early_stopping}
            if self.num_beams > 1
            else {}
        )
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
    layout as `generate` does. What transformers calls on it, duck-typed, is `hf_compat.CACHE_PROTOCOL`."""

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

    def spread(self, beams: int) -> None:
        """Beam search on a full view: each prompt, prefilled into its first beam's row, copied to
        the rows of its other beams (rows are prompt-major: prompt i's beams are rows i*beams..)."""
        for t in (*self.keys.values(), *self.values.values()):
            grouped = t.view(-1, beams, *t.shape[1:])
            grouped[:, 1:] = grouped[:, :1]

    def reorder(self, rows: torch.Tensor, start: int) -> None:
        """Beam search: row i takes the keys and values of row `rows[i]` (a beam of the same prompt).
        A full view moves only what was generated, from slot `start`: a prompt's beams share their
        prompt. Grown by concatenation, it moves everything, as transformers' `DynamicCache` does."""
        for store in (self.keys, self.values):
            for layer, t in store.items():
                if self.full_view:
                    t[:, :, start:] = t[:, :, start:].index_select(0, rows)
                else:
                    store[layer] = t.index_select(0, rows)

    # what transformers' mask code asks a cache before a forward (when no 4-D mask is given)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.filled

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.filled + query_length, 0


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
    seed: int | None = None,
) -> list[Decoded]:
    """Continuations of `prompts`, left-padded into one batch: greedy, sampled or by beam search as
    `decoding` says (not its `slow_path` settings). `full_view` (implied by `graphs`) attends over
    the whole preallocated cache, as a captured graph must, with `decode_attention`, after
    prefilling the prompts in chunks of similar length of at most `prefill_tokens` padded tokens;
    without it, a step computes what `generate` computes. Sampling draws from torch's generator
    seeded with `seed` (default `decoding.seed`), as `generate_batch` does; the caller's random
    state is restored afterwards."""
    if decoding.slow_path:
        raise ValueError(f"{decoding.slow_path} decodes on transformers' generate (generate_batch)")
    full_view = graphs if full_view is None else full_view
    device = next(model.parameters()).device
    with grouped_decode_attention(model) if full_view else nullcontext():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=decoding.do_sample):
            if decoding.do_sample:
                torch.manual_seed(decoding.seed if seed is None else seed)
            return _decode(model, prompts, decoding, graphs=graphs, full_view=full_view, prefill_tokens=prefill_tokens)


def _decode(model, prompts, decoding: Decoding, *, graphs: bool, full_view: bool, prefill_tokens: int) -> list[Decoded]:
    max_new_tokens, pad_id, beams = decoding.max_new_tokens, decoding.pad_id, decoding.num_beams
    device = next(model.parameters()).device
    ids, real = (t.to(device).repeat_interleave(beams, 0) for t in pad(prompts, pad_id, left=True))
    rows, width = ids.shape  # beam search: prompt i's beams are rows i * beams ..
    padded = bool((real == 0).any())
    cache = SlotCache(width + max_new_tokens, full_view, device, rows)
    valid = torch.zeros(rows, width + max_new_tokens, dtype=torch.bool, device=device)
    valid[:, :width] = real.bool()
    kwarg = hf_compat.cache_keyword(model)

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

    # --- prefill: the prompts, in one forward, or in chunks of similar length (padding costs compute);
    # beams: generate prefills every beam of a prompt, a full view each prompt once, then copies it ---
    if full_view:
        logits = _prefill_chunks(forward, prompts, cache, width, pad_id, prefill_tokens, beams)
        if beams > 1:
            cache.spread(beams)
            logits = logits.repeat_interleave(beams, 0)
    else:
        logits = _prefill(forward, ids, real)
    cache.advance(width)
    reorder = (lambda source: cache.reorder(source, width)) if beams > 1 else None
    next_positions = real.sum(-1, keepdim=True)  # the prompt's length
    step = _Step(forward, rows, next_positions, valid, graphs, padded, reorder)
    if beams > 1:
        generated = _beam_loop(step, cache, logits, decoding, len(prompts))
    else:
        generated = _token_loop(step, cache, logits, decoding, _chooser(decoding))
    stops = set(decoding.stop_ids)
    return [cut(seq, stops) for seq in generated]


def _chooser(decoding: Decoding) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a token is chosen from a step's logits: the likeliest, or drawn as transformers' `_sample`
    draws it, through its own temperature and top-p warpers (top-k off), one `multinomial` per step."""
    if not decoding.do_sample:
        return lambda logits: logits.argmax(-1)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(decoding.temperature)] if decoding.temperature != 1 else []
    warpers += [TopPLogitsWarper(decoding.top_p)] if decoding.top_p < 1 else []

    def draw(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        for warp in warpers:
            scores = warp(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    return draw


def _token_loop(step: _Step, cache: SlotCache, logits, decoding: Decoding, choose) -> list[list[int]]:
    """One token per row and step until every row has stopped: greedy or sampled."""
    max_new_tokens, pad_id = decoding.max_new_tokens, decoding.pad_id
    stop_tensor = torch.tensor(decoding.stop_ids, device=logits.device)
    generated = torch.full((logits.shape[0], max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for t in range(max_new_tokens):
        token = choose(logits).masked_fill(done, pad_id)
        generated[:, t] = token
        done |= torch.isin(token, stop_tensor)
        if t + 1 == max_new_tokens or ((t + 1) % CHECK_EVERY == 0 and bool(done.all())):
            break
        logits = step(token, cache)
    return generated.tolist()


def _beam_loop(step: _Step, cache: SlotCache, logits, decoding: Decoding, prompts: int) -> list[list[int]]:
    """Beam search over `prompts` prompts whose beams are the rows: each step chooses the beams,
    then the cache rows follow their beams and the next forward runs. Looking at whether the search
    has ended only every few steps changes nothing: past its end, no hypothesis can enter."""
    search = BeamSearch(decoding, prompts, logits.device)
    for t in range(decoding.max_new_tokens):
        tokens, source = search.advance(logits, t)
        if t + 1 == decoding.max_new_tokens or ((t + 1) % CHECK_EVERY == 0 and search.ended()):
            break
        logits = step(tokens, cache, source)
    return search.best()


def _prefill(forward, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """One forward over left-padded prompts: positions count real tokens only, and a mask is given
    only where there is padding (none lets SDPA take its causal kernels, as `generate` does)."""
    n = ids.shape[1]
    mask = attention_mask(real.bool(), 0, n, n) if bool((real == 0).any()) else None
    return forward(ids, (real.cumsum(-1) - 1).clamp(min=0), mask)


def _prefill_chunks(forward, prompts, cache: SlotCache, width: int, pad_id: int, max_tokens: int, beams: int = 1):
    """Each chunk left-padded to its own longest prompt only and written into the cache where the
    batch's left padding puts it (ending at `width`), into each prompt's first row (`beams` rows
    per prompt): the last logits of every prompt."""
    lengths = [len(p) for p in prompts]
    logits = None
    for chunk in generation_batches(lengths, max_rows=len(prompts), max_tokens=max_tokens, new_tokens=0):
        ids, real = (t.to(cache.slot.device) for t in pad([prompts[i] for i in chunk], pad_id, left=True))
        prompt_index = torch.tensor(chunk, device=ids.device)
        cache.chunk = (prompt_index * beams, width - ids.shape[1])
        out = _prefill(forward, ids, real)
        logits = out.new_empty(len(prompts), out.shape[-1]) if logits is None else logits
        logits[prompt_index] = out
    cache.chunk = None
    return logits


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[prompts, beams, ...] picked along the beams by `index` [prompts, n] (transformers' `_gather_beams`)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class BeamSearch:
    """transformers' beam search (5.x, generation/utils.py `_beam_search` and its helpers), the same
    tensor operations in the same order, so the same hypotheses win, on generated tokens only.

    Each step keeps the best `keep` continuations over all beams of a prompt (enough that `beams`
    go on when some end), where a continuation ends at a stop id or at the token budget. The best
    `beams` that go on are the next beams; those among the best `beams` that end enter the prompt's
    finished hypotheses, scored by their summed log-probabilities / length ** `length_penalty`.
    A prompt takes no more hypotheses once no running beam can beat its worst finished one (the
    `early_stopping` heuristics), or, with early_stopping=True, once it holds `beams` of them."""

    def __init__(self, decoding: Decoding, prompts: int, device):
        self.d, self.prompts, self.beams = decoding, prompts, decoding.num_beams
        self.keep = max(2, 1 + len(decoding.stop_ids)) * self.beams
        shape, n = (prompts, self.beams), decoding.max_new_tokens
        self.top_beams = torch.arange(self.keep, device=device) < self.beams
        self.stops = torch.tensor(decoding.stop_ids, device=device)
        self.offset = torch.arange(prompts, device=device)[:, None] * self.beams  # a prompt's first row
        self.running = torch.full((*shape, n), decoding.pad_id, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(shape, device=device)
        self.running_scores[:, 1:] = -1e9  # the beams start equal: only the first one's continuations count
        self.finished = self.running.clone()  # the finished hypotheses, best first
        self.scores = torch.full(shape, -1e9, device=device)
        self.is_finished = torch.zeros(shape, dtype=torch.bool, device=device)
        self.improvable = torch.ones(prompts, 1, dtype=torch.bool, device=device)
        self.ends = torch.zeros(prompts, self.keep, dtype=torch.bool, device=device)

    def advance(self, logits: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `t` (the t+1-th token) from the logits of every row: (each row's next token, the row
        whose cache it continues)."""
        log_probs = torch.nn.functional.log_softmax(logits.float(), dim=-1)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.view(self.prompts, self.beams, vocab) + self.running_scores[:, :, None]
        top_scores, top = torch.topk(log_probs.reshape(self.prompts, -1), k=self.keep)
        from_beam, token = top // vocab, top % vocab
        candidates = _gather(self.running, from_beam)
        candidates[:, :, t] = token
        self.ends = torch.isin(token, self.stops) | (t + 1 >= self.d.max_new_tokens)
        # the beams that go on: the best continuations that did not end
        going_on = top_scores + self.ends.to(torch.float32) * -1.0e9
        chosen = torch.topk(going_on, k=self.beams)[1]
        self.running = _gather(candidates, chosen)
        self.running_scores = _gather(going_on, chosen)
        self._finish(candidates, top_scores, t)
        self._update_improvable(t)
        source = (_gather(from_beam, chosen) + self.offset).flatten()
        return _gather(token, chosen).flatten(), source

    def _finish(self, candidates: torch.Tensor, top_scores: torch.Tensor, t: int) -> None:
        """Those of the best `beams` continuations that ended enter the finished hypotheses, if better."""
        ended = self.ends & self.top_beams[None, :]
        scores = top_scores / ((t + 1) ** self.d.length_penalty)
        full = torch.all(self.is_finished, dim=-1, keepdim=True) & (self.d.early_stopping is True)
        scores += full.to(torch.float32) * -1.0e9
        scores += (~self.improvable).to(torch.float32) * -1.0e9
        scores += (~ended) * -1.0e9
        merged_scores = torch.cat((self.scores, scores), dim=1)
        best = torch.topk(merged_scores, k=self.beams)[1]
        self.finished = _gather(torch.cat((self.finished, candidates), dim=1), best)
        self.scores = _gather(merged_scores, best)
        self.is_finished = _gather(torch.cat((self.is_finished, ended), dim=1), best)

    def _update_improvable(self, t: int) -> None:
        """Whether a prompt's best running beam could still beat its worst finished hypothesis: at its
        current length, or, with early_stopping="never" and a positive length penalty, at the budget."""
        never = self.d.early_stopping == "never" and self.d.length_penalty > 0.0
        length = self.d.max_new_tokens if never else t + 1
        best_possible = self.running_scores[:, :1] / (length**self.d.length_penalty)
        worst = torch.where(self.is_finished, torch.min(self.scores, dim=1, keepdim=True)[0], -1.0e9)
        self.improvable = self.improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)

    def ended(self) -> bool:
        """Whether transformers' loop would have stopped by now (a look at the GPU's values)."""
        open_beam = ~(torch.all(self.is_finished) & (self.d.early_stopping is True))
        return not bool(torch.any(self.improvable) & open_beam & ~torch.all(self.ends))

    def best(self) -> list[list[int]]:
        """Each prompt's best finished hypothesis."""
        return self.finished[:, 0].tolist()


class _Step:
    """One decoding step: the new tokens at the next slot. With `graphs`, the inputs live in fixed
    buffers and the forward is captured as a CUDA graph on first use, then replayed. Beam search
    passes `reorder`, run first within the step (and so within the graph): the cache rows follow
    their beams, chosen by the `source` row indices each call brings."""

    def __init__(self, forward: Callable, rows: int, next_positions, valid, graphs: bool, padded: bool, reorder=None):
        self.forward, self.valid, self.graphs, self.padded, self.reorder = forward, valid, graphs, padded, reorder
        self.positions = next_positions.clone()
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=valid.device)
        self.source = torch.arange(rows, device=valid.device)
        self.graph = None
        self.logits = None

    def mask(self, cache: SlotCache):
        if cache.full_view:  # a view: what is written into `valid` later reaches a captured graph
            return self.valid[:, None, None, :]
        return attention_mask(self.valid, cache.filled, 1, cache.filled + 1) if self.padded else None

    def __call__(self, token, cache: SlotCache, source: torch.Tensor | None = None):
        self.tokens.copy_(token[:, None])
        if source is not None:
            self.source.copy_(source)
        self.valid.index_fill_(1, cache.slot, True)
        if not self.graphs:
            logits = self.run(self.mask(cache))
        else:
            if self.graph is None:
                self._capture(self.mask(cache))
            self.graph.replay()
            logits = self.logits
        cache.advance(1)
        self.positions += 1
        return logits

    def run(self, mask):
        if self.reorder is not None:
            self.reorder(self.source)
        return self.forward(self.tokens, self.positions, mask)

    def _capture(self, mask) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazily created kernels and workspaces
            if self.reorder is not None:  # by the identity: moved twice, beams would be lost
                self.reorder(torch.arange(len(self.source), device=self.source.device))
            self.forward(self.tokens, self.positions, mask)  # what it writes, the replay writes again
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.run(mask)


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

    On our decoder (with CUDA graphs where asked for and possible) unless `decoding.slow_path`
    sends it to `generate_batch`, said in one line. A sampled batch is seeded from `decoding.seed`
    and its prompts' `keys`, on either path: numbers that stay with a prompt across runs, such as
    its row's index (default: positions in `prompts`)."""
    from tqdm.auto import tqdm

    graphs = graphs and next(model.parameters()).is_cuda
    keys = list(range(len(prompts))) if keys is None else keys
    if decoding.slow_path:
        print(f"note: {decoding.slow_path} decodes on transformers' generate, slower than our decoder", file=sys.stderr)
    with tqdm(total=sum(map(len, batches)), desc="generating", unit="summary", disable=not progress) as bar:
        for idx in batches:
            batch = [prompts[i] for i in idx]
            seed = decoding.batch_seed([keys[i] for i in idx])
            if decoding.slow_path:
                decoded = generate_batch(model, batch, decoding, seed=seed)
            else:
                decoded, graphs = _ours(model, batch, decoding, graphs, seed)
            on_batch(idx, decoded)
            bar.update(len(idx))


def _ours(model, batch: list[list[int]], decoding: Decoding, graphs: bool, seed: int) -> tuple[list[Decoded], bool]:
    """Our decoder on one batch, with CUDA graphs until a capture fails: (decoded, graphs still on)."""
    try:
        return decode_batch(model, batch, decoding, graphs=graphs, seed=seed), graphs
    except RuntimeError as e:
        if not graphs or "graph" not in str(e).lower():
            raise
        print(f"note: CUDA graph capture failed ({str(e).splitlines()[0][:120]}); decoding without", file=sys.stderr)
        return decode_batch(model, batch, decoding, graphs=False, seed=seed), False
