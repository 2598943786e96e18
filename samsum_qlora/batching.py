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
    sequences: list[list[int]], value: int, *, left: bool = False, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): `sequences` padded with `value` to the longest, rounded up to `multiple`, on
    the right (training) or on the left (generation: every prompt ends where generation starts).
    The mask is 1 at real positions: padding is told by position, never by id."""
    import torch

    width = round_up(max(len(s) for s in sequences), multiple)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def token_budget_batches(
    lengths: list[int], max_tokens: int, seed: int, pool: int = 1024, multiple: int = 1
) -> list[list[int]]:
    """Row indices grouped into training batches whose padded size (rows x longest, rounded up to
    `multiple`) stays within `max_tokens`.

    Rows are shuffled, then sorted by length inside pools of `pool` rows, so each batch holds rows
    of similar length (little padding) while batches still mix the data; the Trainer shuffles the
    batch order. A row longer than the budget gets a batch of its own."""
    lengths = [round_up(n, multiple) for n in lengths]
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
