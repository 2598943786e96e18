"""Rows -> chat messages -> token ids and labels. Pure and CPU-only, apart from reading files.

The loss-mask rule lives in `encode_example`; every other function here serves it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from samsum_qlora.errors import UserError

if TYPE_CHECKING:  # keep `import samsum_qlora.data` cheap
    import datasets
    import torch

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
REQUIRED_COLUMNS = ("dialogue", "summary")
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
LLAMA3_PAD = "<|finetune_right_pad_id|>"  # Llama 3 has no pad token; this reserved one is meant for it
END_OF_TURN = "<|eot_id|>"


# --- loading -------------------------------------------------------------------------------------


def is_local(source: str) -> bool:
    return Path(source).exists() or source.startswith((".", "/", "~"))


def split_file(directory: Path, split: str) -> Path:
    """The one file holding `split` in a local data directory (train.csv, test.jsonl, ...)."""
    found = [directory / f"{split}{ext}" for ext in FILE_FORMATS if (directory / f"{split}{ext}").is_file()]
    if not found:
        have = sorted(p.name for p in directory.iterdir() if p.suffix in FILE_FORMATS)
        raise UserError(
            f"no '{split}' split in {directory}: expected {split}.jsonl, .json, .csv or .parquet"
            + (f" (found {', '.join(have)})" if have else "")
        )
    if len(found) > 1:
        raise UserError(f"split '{split}' is ambiguous in {directory}: {', '.join(p.name for p in found)}")
    return found[0]


def load_split(source: str, split: str, revision: str | None = None) -> "datasets.Dataset":
    """A split with string columns `id`, `dialogue`, `summary`, from a local dir or the Hub."""
    import datasets

    if is_local(source):
        directory = Path(source).expanduser()
        if not directory.is_dir():
            raise UserError(f"data.source {source} does not exist (give a directory or a Hub dataset id)")
        path = split_file(directory, split)
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty")
        try:
            ds = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # pyarrow/pandas parse errors come in many types
            raise UserError(f"{path} could not be read as {path.suffix[1:]}: {str(e).splitlines()[0]}") from None
        where = str(path)
    else:
        try:
            ds = datasets.load_dataset(source, split=split, revision=revision)
        except ValueError as e:  # unknown split
            raise UserError(f"Hub dataset {source} has no split '{split}': {str(e).splitlines()[0]}") from None
        except (FileNotFoundError, ConnectionError, OSError) as e:
            raise UserError(f"could not load Hub dataset {source}: {str(e).splitlines()[0]}") from None
        where = f"{source} ({split})"
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"{where} has no column {', '.join(missing)} (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise UserError(f"{where} has no rows")
    return ds


def rows(ds: "datasets.Dataset") -> list[dict[str, str]]:
    """Plain dicts with string id/dialogue/summary; missing ids become the row number."""
    ids = ds["id"] if "id" in ds.column_names else list(range(len(ds)))
    return [
        {"id": str(i), "dialogue": d or "", "summary": s or ""}
        for i, d, s in zip(ids, ds["dialogue"], ds["summary"])
    ]


# --- formatting ----------------------------------------------------------------------------------


def clean(text: str) -> str:
    """SAMSum mixes \\r\\n and \\n; the chat template trims the ends anyway."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


@functools.lru_cache(maxsize=8)
def _special_pattern(specials: frozenset[str]) -> "re.Pattern[str]":
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or r"(?!)")


def plain_text(tokenizer, text: str) -> str:
    """`clean(text)` without the tokenizer's special-token strings: a literal "<|eot_id|>" in a
    dialogue would otherwise become a real end-of-turn (or a second BOS) inside the prompt."""
    specials = frozenset(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return clean(_special_pattern(specials).sub("", clean(text)))


def build_messages(dialogue: str, instruction: str, summary: str | None = None) -> list[dict[str, str]]:
    """system (the task) + user (the dialogue) [+ assistant (the summary), for training]."""
    messages = [
        {"role": "system", "content": instruction},
        {"role": "user", "content": clean(dialogue)},
    ]
    if summary is not None:
        messages.append({"role": "assistant", "content": clean(summary)})
    return messages


def render_ids(tokenizer, messages: list[dict[str, str]], date_string: str, generation_prompt: bool) -> list[int]:
    """The chat template's own rendering, tokenised once. The template writes the BOS itself, so
    the tokenizer must not add a second one."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, date_string=date_string
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_dialogue(
    tokenizer, dialogue: str, render: Callable[[str], list[int]], max_length: int
) -> tuple[str, list[int]] | None:
    """Shorten the dialogue's tail until `render(dialogue)` fits `max_length` tokens.

    Cuts at token boundaries mapped back to characters, so a multi-byte character is never split
    into replacement characters. Returns (dialogue used, ids), or None when not even the
    dialogue's first token fits."""
    ids = render(dialogue)
    excess = len(ids) - max_length
    if excess <= 0:
        return dialogue, ids
    ends = [end for _, end in tokenizer(dialogue, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    keep = len(ends) - excess
    while keep > 0:
        # re-encoding the shortened text may merge differently at the cut: re-render, re-measure
        shortened = dialogue[: ends[keep - 1]].rstrip()
        ids = render(shortened)
        excess = len(ids) - max_length
        if excess <= 0 and shortened:
            return shortened, ids
        keep -= max(excess, 1)
    return None


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_example(
    tokenizer, dialogue: str, summary: str, *, instruction: str, max_length: int, date_string: str
) -> Encoded | None:
    """Tokens and labels of one training row.

    The mask rule: labels are -100 everywhere except the summary's tokens and the end-of-turn
    token that closes the assistant turn (`<|eot_id|>` for Llama 3), so the model learns the
    summary and when to stop, never the prompt. The prompt is the chat template's rendering of
    system + user with the assistant header (`add_generation_prompt=True`); the full row is that
    rendering with the assistant message, and must start with the prompt's exact tokens.

    Rows longer than `max_length` lose the end of their dialogue, never any summary token.
    Returns None for a row with an empty dialogue or summary, or whose summary alone cannot fit.
    """
    dialogue, summary = plain_text(tokenizer, dialogue), plain_text(tokenizer, summary)
    if not dialogue or not summary:
        return None

    def full(d: str) -> list[int]:
        return render_ids(tokenizer, build_messages(d, instruction, summary), date_string, False)

    fitted = fit_dialogue(tokenizer, dialogue, full, max_length)
    if fitted is None:
        return None
    used, ids = fitted
    prompt = render_ids(tokenizer, build_messages(used, instruction), date_string, True)
    if ids[: len(prompt)] != prompt or len(ids) == len(prompt):
        raise ValueError("the chat template's prompt is not a prefix of the full conversation")
    check_single_bos(tokenizer, ids)
    labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
    return Encoded(input_ids=ids, labels=labels, truncated=used != dialogue)


def encode_prompt(tokenizer, dialogue: str, *, instruction: str, max_length: int, date_string: str) -> list[int]:
    """Prompt ids for generation: the same rendering as training, ending in the assistant header."""

    def prompt(d: str) -> list[int]:
        return render_ids(tokenizer, build_messages(d, instruction), date_string, True)

    fitted = fit_dialogue(tokenizer, plain_text(tokenizer, dialogue), prompt, max_length)
    if fitted is None:
        raise UserError(f"data.max_length={max_length} is too short for even the prompt template")
    return fitted[1]


def check_single_bos(tokenizer, ids: list[int]) -> None:
    bos = tokenizer.bos_token_id
    if bos is not None and (ids[:1] != [bos] or ids.count(bos) != 1):
        raise ValueError(f"expected exactly one BOS token at the start, got {ids.count(bos)}")


@dataclass
class EncodeStats:
    kept: int = 0
    skipped_empty: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0


def encode_rows(
    tokenizer, examples: list[dict[str, str]], *, instruction: str, max_length: int, date_string: str,
    progress: bool = True,
) -> tuple[dict[str, list[Any]], EncodeStats]:
    """Encode many rows; returns columns (id, input_ids, labels) and what was skipped and why."""
    from tqdm.auto import tqdm

    columns: dict[str, list[Any]] = {"id": [], "input_ids": [], "labels": []}
    stats = EncodeStats()
    for row in tqdm(examples, desc="tokenising", unit="row", disable=not progress, leave=False):
        if not plain_text(tokenizer, row["dialogue"]) or not plain_text(tokenizer, row["summary"]):
            stats.skipped_empty += 1
            continue
        enc = encode_example(
            tokenizer, row["dialogue"], row["summary"],
            instruction=instruction, max_length=max_length, date_string=date_string,
        )
        if enc is None:
            stats.dropped_too_long += 1
            continue
        columns["id"].append(row["id"])
        columns["input_ids"].append(enc.input_ids)
        columns["labels"].append(enc.labels)
        stats.kept += 1
        stats.truncated += enc.truncated
        stats.tokens += len(enc.input_ids)
        stats.trained_tokens += sum(label != IGNORE_INDEX for label in enc.labels)
    return columns, stats


# --- tokenizer and batches -----------------------------------------------------------------------


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else Llama 3's reserved pad; never the end-of-turn token, which
    the model must learn to emit (and which some recipes wrongly mask out by padding with it)."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN) if END_OF_TURN in tokenizer.get_vocab() else None
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eot:
        return tokenizer.pad_token_id
    if LLAMA3_PAD in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(LLAMA3_PAD)
    raise UserError("the tokenizer has no pad token and no <|finetune_right_pad_id|>; add a pad token to it")


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end generation: end-of-turn and end-of-text."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in (END_OF_TURN, "<|end_of_text|>") if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def token_budget_batches(lengths: list[int], max_tokens: int, seed: int, pool: int = 1024,
                         multiple: int = 1) -> list[list[int]]:
    """Row indices grouped into batches whose padded size (rows x longest, rounded up to
    `multiple`) stays within `max_tokens`.

    Rows are shuffled, then sorted by length inside pools of `pool` rows, so each batch holds rows
    of similar length (little padding) while batches still mix the data; the Trainer shuffles the
    batch order. A row longer than the budget gets a batch of its own."""
    import random

    lengths = [round_up(n, multiple) for n in lengths]
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batch: list[int] = []
        for i in chunk:  # ascending length: the newest row is always the longest
            if batch and (len(batch) + 1) * lengths[i] > max_tokens:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    return batches


def group_rows(columns: dict[str, list[Any]], batches: list[list[int]]) -> dict[str, list[Any]]:
    """One dataset item per batch: the Trainer then draws (and on resume skips) whole batches."""
    return {key: [[columns[key][i] for i in batch] for batch in batches] for key in ("input_ids", "labels")}


@dataclass
class PadToLongest:
    """Collator: right-pads a batch to its longest row (rounded up to `multiple`); padded labels
    are -100. Accepts plain rows, or items that are themselves pre-formed batches (`group_rows`)."""

    pad_id: int
    multiple: int = 1

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        if features and features[0]["input_ids"] and isinstance(features[0]["input_ids"][0], list):
            features = [{"input_ids": ids, "labels": labels}
                        for f in features for ids, labels in zip(f["input_ids"], f["labels"])]

        longest = round_up(max(len(f["input_ids"]) for f in features), self.multiple)
        input_ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            attention_mask[i, :n] = 1
        if not (labels != IGNORE_INDEX).any():
            raise ValueError("a batch has no trained token: its loss would be a silent zero")
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
