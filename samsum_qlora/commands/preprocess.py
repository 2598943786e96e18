"""`samsum-qlora preprocess`: the training tokenisation, saved to disk and shown to a person."""

from __future__ import annotations

from pathlib import Path

import click

from samsum_qlora import chat, data, files, modeling
from samsum_qlora.config import Config
from samsum_qlora.errors import UserError


def marked(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The row's text with each trained span between ⟦ and ⟧ (green where the terminal allows)."""
    spans: list[tuple[bool, list[int]]] = []
    for tok, label in zip(input_ids, labels):
        trained = label != chat.IGNORE_INDEX
        if not spans or spans[-1][0] != trained:
            spans.append((trained, []))
        spans[-1][1].append(tok)
    return "".join(
        click.style(f"⟦{tokenizer.decode(ids)}⟧", fg="green", bold=True) if trained else tokenizer.decode(ids)
        for trained, ids in spans
    )


def tokenize_split(cfg: Config, *, split: str, out_dir: Path, show: int) -> None:
    """Tokenise `split` exactly as `train` does, save it with `save_to_disk`, show `show` rows."""
    from datasets import Dataset

    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out_dir} exists and is not empty; choose a new folder")
    files.check_can_create(out_dir)
    fmt = modeling.chat_format(cfg)
    tokenizer = fmt.tokenizer
    columns, stats = fmt.encode_rows(data.load_rows(cfg.data.source, split, cfg.data.revision))
    if stats.kept == 0:
        raise UserError(f"no usable rows in {cfg.data.source} ({split})")
    files.ensure_writable_dir(out_dir.parent)
    with files.staged_dir(out_dir) as staging:  # an empty --out folder is replaced
        Dataset.from_dict(columns).save_to_disk(str(staging))
    for i in range(min(show, stats.kept)):
        click.echo(f"--- {columns['id'][i]} ({len(columns['input_ids'][i])} tokens) ---")
        click.echo(marked(tokenizer, columns["input_ids"][i], columns["labels"][i]))
    click.echo(
        f"wrote {stats.kept} rows to {out_dir}: {stats.tokens:,} tokens, {stats.trained_tokens:,} trained; "
        f"skipped {stats.skipped_empty} empty, dropped {stats.dropped_too_long} too long, "
        f"shortened {stats.truncated}"
    )
