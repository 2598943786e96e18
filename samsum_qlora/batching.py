"""Rows grouped into batches of similar length, for training and for generation, and padded into
tensors. Pure."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad(
    sequences: list[list[int]],
    value: int,
    *,
    left: bool = False,
    multiple: int = 1,
    width: int | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): `sequences` padded with `value` to the longest, rounded up to `multiple` (or to
    `width`), on the right (training) or on the left (generation: every prompt ends where
    generation starts), then to `rows` rows with rows of `value` alone. The mask is 1 at real
    positions: padding is told by position, never by id."""
    import torch

    width = width or round_up(max(len(s) for s in sequences), multiple)
    shape = (max(rows or 0, len(sequences)), width)
    ids = torch.full(shape, value, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


# Widths per doubling of length when batch shapes are bucketed: 4 keeps padding near 10% on SAMSum's
# lengths with about 13 widths (2: 19% padding, 8 shapes; 8: 7%, 22 shapes).
WIDTHS_PER_DOUBLING = 4


def bucket_widths(multiple: int, longest: int) -> list[int]:
    """The batch widths bucketed batches take, up to one >= `longest`: WIDTHS_PER_DOUBLING steps
    per doubling (multiples of `multiple`), so a length is padded by at most ~19%."""
    widths, base = set(), max(multiple, 1)
    while not widths or max(widths) < longest:
        widths.update(
            round_up(int(base * 2 ** (k / WIDTHS_PER_DOUBLING)), multiple) for k in range(WIDTHS_PER_DOUBLING)
        )
        base *= 2
    widths.add(round_up(base, multiple))
    return sorted(widths)


def bucket(n: int, widths: list[int]) -> int:
    """The smallest width that holds `n` (the last one, if none does)."""
    return next((w for w in widths if w >= n), widths[-1])


def bucketed_width(n: int, multiple: int) -> int:
    """The bucket width of a batch whose longest row is `n` (each list of widths begins the next)."""
    return bucket(n, bucket_widths(multiple, n))


def bucket_rows(width: int, max_tokens: int) -> int:
    """Rows of a bucketed batch of `width`: as many as the token budget holds, at least one."""
    return max(1, max_tokens // width)


def trained_capacity(count: int, tokens: int) -> int:
    """Trained positions a bucketed batch of `tokens` is padded to: at least a fifth of its tokens
    (SAMSum trains ~11%, at most ~15% of a batch), rounded up to 128, so that a batch shape meets
    one capacity, not several: each costs a compile and a capture."""
    return round_up(max(count, tokens // 5, 1), 128)


def token_budget_batches(
    lengths: list[int], max_tokens: int, seed: int, pool: int = 1024, multiple: int = 1, widths: list[int] | None = None
) -> list[list[int]]:
    """Row indices grouped into training batches whose padded size (rows x longest, rounded up to
    `multiple`, or to a bucket of `widths`) stays within `max_tokens`.

    Rows are shuffled, then sorted by length inside pools of `pool` rows, so each batch holds rows
    of similar length (little padding) while batches still mix the data; the Trainer shuffles the
    batch order. A row longer than the budget gets a batch of its own."""
    lengths = [bucket(n, widths) if widths else round_up(n, multiple) for n in lengths]
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        batch: list[int] = []
        for i in sorted(order[start : start + pool], key=lambda i: lengths[i]):
            if batch and (len(batch) + 1) * lengths[i] > max_tokens:  # ascending: row i is the longest
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    return batches


def group_rows(columns: dict[str, list], batches: list[list[int]]) -> dict[str, list]:
    """One dataset item per batch: the Trainer then draws (and on resume skips) whole batches."""
    return {key: [[columns[key][i] for i in batch] for batch in batches] for key in ("input_ids", "labels")}


def generation_batches(lengths: list[int], *, max_rows: int, max_tokens: int, new_tokens: int) -> list[list[int]]:
    """Prompt indices in batches for generation, longest first (an out-of-memory shows at once).

    A batch holds at most `max_rows` prompts and `max_tokens` KV-cache slots: rows x (its longest
    prompt + `new_tokens`). A prompt too long for the budget alone still gets a batch of its own.
    Deterministic, so every torchrun process deals the same batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            width = lengths[batch[0]] + new_tokens  # the batch's first prompt is its longest
            if len(batch) < max_rows and (len(batch) + 1) * width <= max_tokens:
                batch.append(i)
                continue
        batches.append([i])
    return batches
