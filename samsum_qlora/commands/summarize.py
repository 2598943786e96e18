"""`samsum-qlora summarize`: summaries for dialogues that have no reference.

input (a file, or standard input) -> records -> the dialogues that are not empty -> eval's
`Summarizer` (the same chat rules, truncation, stop ids, batches, decoding and fast path) -> one
JSON line per input record, in input order: its columns plus "summary" and "ended". Standard
output carries those lines and nothing else: whatever is printed on the way goes to stderr.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from samsum_qlora import chat, data, files, runtime, summarizer
from samsum_qlora.config import Config
from samsum_qlora.errors import UserError
from samsum_qlora.predictor import Prediction


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plural(n: int) -> str:
    return f"{n} dialogue{'' if n == 1 else 's'}"


def read_input(source: str | None, stdin: BinaryIO) -> tuple[list[dict[str, Any]], str]:
    """(records, where they came from): INPUT's, or standard input's for '-' or none."""
    if source not in (None, "-"):
        return data.dialogues_from_file(Path(source)), source
    if stdin.isatty():
        raise UserError("give INPUT, or pipe dialogues in: ... | samsum-qlora summarize -")
    return data.dialogues_from_stdin(stdin.read()), data.STDIN


def check_columns(records: list[dict[str, Any]], where: str) -> None:
    """The input's columns must not collide with what is written beside them."""
    columns = set().union(*records)
    if "ended" in columns:
        raise UserError(f"{where} has a column ended, which summarize writes: rename it")
    if {"summary", "reference"} <= columns:
        raise UserError(
            f"{where} has columns summary and reference: summarize writes summary and keeps an input's "
            "summary as reference; rename one"
        )


def output_record(record: dict[str, Any], prediction: Prediction | None) -> dict[str, Any]:
    """The input record, its own summary (a reference) kept as "reference", plus "summary" and
    "ended"; an empty dialogue, not summarised, gets null and false."""
    out = {("reference" if key == "summary" else key): value for key, value in record.items()}
    out["summary"] = prediction.text if prediction else None
    out["ended"] = prediction.ended if prediction else False
    if prediction and prediction.truncated:
        out["truncated"] = True  # only the dialogue's beginning, data.max_length tokens, was summarised
    return out


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """A record's NaN and infinite numbers (a .json input's NaN, a parquet column's missing float)
    as null: json.dumps would write NaN, which no JSON reader takes."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def write_stdout(stdout: BinaryIO, data: bytes) -> None:
    """The JSON Lines on standard output; a full device there (`> /dev/full`, a full disk) is one line."""
    try:
        stdout.write(data)
        stdout.flush()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        with contextlib.suppress(OSError, ValueError):  # what is left in its buffer goes nowhere at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
        raise UserError(
            "no space left on the device of standard output while writing the summaries; free some space, "
            "then rerun the same command"
        ) from None


def summarize_dialogues(
    cfg: Config,
    *,
    source: str | None,
    out: Path | None,
    adapters: str | None,
    base_only: bool,
    stdin: BinaryIO,
    stdout: BinaryIO,
) -> list[dict[str, Any]]:
    """Summarise every non-empty dialogue of `source`; write the JSON Lines to `out` (atomically)
    or `stdout`. Everything that can be refused is refused before the model loads."""
    if runtime.current().distributed:
        raise UserError("summarize runs in one process: run it without torchrun")
    folder = summarizer.adapters_to_use(cfg, adapters, base_only)
    records, where = read_input(source, stdin)
    check_columns(records, where)
    if out is not None:
        if source not in (None, "-") and out.exists() and os.path.samefile(source, out):
            raise UserError(
                f"--out {out} is the input {source}: writing it would replace your dialogues; choose another file"
            )
        files.ensure_writable_file(out)
    if cfg.model.chat_template is not None:
        chat.read_template(cfg.model.chat_template)  # a file that cannot be read is said before any work
    todo = [i for i, r in enumerate(records) if (r.get("dialogue") or "").strip()]
    if not todo:
        raise UserError(f"every dialogue in {where} is empty: nothing to summarise")
    if len(todo) < len(records):
        say(f"{where}: skipped {len(records) - len(todo)} with an empty dialogue (their lines get summary null)")
    say(f"summarising {plural(len(todo))} with {cfg.model.name}" + (f" + {folder}" if folder else ""))
    started, results = time.perf_counter(), {}
    with contextlib.redirect_stdout(sys.stderr):  # a library's print() must not reach the JSON Lines
        model = summarizer.Summarizer(cfg, folder)
        prompts, cut = model.fitted_prompts([records[i]["dialogue"] for i in todo])

        def on_batch(positions, decoded):
            results.update({todo[p]: model.text(d, truncated=cut[p]) for p, d in zip(positions, decoded)})

        model.generate(prompts, model.batches(prompts), on_batch, keys=todo)
    lines = [output_record(r, results.get(i)) for i, r in enumerate(records)]
    text = "".join(json.dumps(json_safe(line), ensure_ascii=False, default=str) + "\n" for line in lines)
    if out is not None:
        with files.disk_full_is_user_error(out.parent, f"writing {out}"):
            files.write_text(out, text)
    else:
        write_stdout(stdout, text.encode("utf-8"))
    say(f"summarised {plural(len(todo))} in {time.perf_counter() - started:.1f} s" + (f": {out}" if out else ""))
    return lines
