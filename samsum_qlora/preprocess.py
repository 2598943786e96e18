"""`samsum-qlora preprocess`: the training tokenisation, saved to disk and shown to a person."""

from __future__ import annotations

from pathlib import Path

import click

from samsum_qlora import data, files
from samsum_qlora.config import Config
from samsum_qlora.errors import UserError


def marked(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The row's text with the trained span between ⟦ and ⟧ (green where the terminal allows)."""
    parts, span, trained = [], [], False
    for tok, label in zip(input_ids, labels):
        is_trained = label != data.IGNORE_INDEX
        if is_trained != trained and span:
            text = tokenizer.decode(span)
            parts.append(click.style(f"⟦{text}⟧", fg="green", bold=True) if trained else text)
            span = []
        trained = is_trained
        span.append(tok)
    if span:
        text = tokenizer.decode(span)
        parts.append(click.style(f"⟦{text}⟧", fg="green", bold=True) if trained else text)
    return "".join(parts)


def run(cfg: Config, *, split: str, out_dir: Path, show: int) -> None:
    from datasets import Dataset

    from samsum_qlora import model as modeling

    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out_dir} exists and is not empty; choose a new folder")
    tokenizer = modeling.load_tokenizer(cfg.model.name, cfg.model.revision)
    examples = data.rows(data.load_split(cfg.data.source, split, cfg.data.revision))
    columns, stats = data.encode_rows(
        tokenizer, examples, instruction=cfg.data.task_instruction,
        max_length=cfg.data.max_length, date_string=cfg.data.date_string,
    )
    if stats.kept == 0:
        raise UserError(f"no usable rows in {cfg.data.source} ({split})")
    files.ensure_writable_dir(out_dir.parent)
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    Dataset.from_dict(columns).save_to_disk(str(staging))
    files.publish_dir(staging, out_dir)  # an empty --out folder is replaced
    for i in range(min(show, stats.kept)):
        click.echo(f"--- {columns['id'][i]} ({len(columns['input_ids'][i])} tokens) ---")
        click.echo(marked(tokenizer, columns["input_ids"][i], columns["labels"][i]))
    click.echo(
        f"wrote {stats.kept} rows to {out_dir}: {stats.tokens:,} tokens, {stats.trained_tokens:,} trained; "
        f"skipped {stats.skipped_empty} empty, dropped {stats.dropped_too_long} too long, "
        f"shortened {stats.truncated}"
    )
