"""Load a split as plain rows {"index", "id", "dialogue", "summary"}: from a local folder or the Hub;
and the dialogues `summarize` reads: a file or standard input, without references.

Local files are read here, line by line, so a bad file is named with its line (a non-UTF-8 byte,
a broken JSON line, a dialogue that is not text) instead of failing deep inside a parser.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samsum_qlora import files, layout
from samsum_qlora.errors import UserError

REQUIRED_COLUMNS = ("dialogue", "summary")
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
Row = dict[str, Any]


def split_file(directory: Path, split: str) -> Path:
    """The one file holding `split` in a local data directory (train.csv, test.jsonl, ...)."""
    found = [directory / f"{split}{ext}" for ext in FORMATS if os.path.lexists(directory / f"{split}{ext}")]
    if not found:
        have = sorted(p.name for p in directory.iterdir() if p.suffix in FORMATS)
        raise UserError(
            f"no '{split}' split in {directory}: expected {split}.jsonl, .json, .csv or .parquet"
            + (f" (found {', '.join(have)})" if have else "")
        )
    if len(found) > 1:
        raise UserError(f"split '{split}' is ambiguous in {directory}: {', '.join(p.name for p in found)}")
    if not found[0].is_file():  # a folder, a broken link or a loop of links, a device
        raise UserError(f"{found[0]} is not a regular file: the '{split}' split must be one file")
    return found[0]


def load_rows(source: str, split: str, revision: str | None = None) -> list[Row]:
    """Rows of `split` with string id/dialogue/summary and `index`, the row's position in the split
    (what predictions are keyed by: ids may repeat or be missing); a missing id becomes the index."""
    if layout.is_local(source):
        directory = Path(source).expanduser()
        if not directory.is_dir():
            raise UserError(f"data.source {source} does not exist (give a directory or a Hub dataset id)")
        path = split_file(directory, split)
        records, where = read_records(path), str(path)
    else:
        records, where = _hub_records(source, split, revision), f"{source} ({split})"
    if not records:
        raise UserError(f"{where} has no rows")
    return [_row(r, i, where) for i, r in enumerate(records)]


def _row(record: dict[str, Any], i: int, where: str) -> Row:
    for column in REQUIRED_COLUMNS:
        value = record.get(column)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where} row {i + 1}: {column} is {type(value).__name__} {value!r:.40}, not text")
    ident = record.get("id")
    return {
        "index": i,
        "id": str(i) if ident is None or ident == "" else str(ident),
        "dialogue": record.get("dialogue") or "",
        "summary": record.get("summary") or "",
    }


@dataclass
class Scorable:
    """The rows an evaluation generates for, and how many of the rows asked for it skipped."""

    rows: list[Row]
    empty_dialogue: int = 0
    empty_reference: int = 0

    def describe(self) -> str:
        counts = {"dialogue": self.empty_dialogue, "reference summary": self.empty_reference}
        parts = [f"{n} with an empty {what}" for what, n in counts.items() if n]
        return "skipped " + " and ".join(parts) if parts else ""


def scorable(rows: list[Row], *, limit: int | None = None, references: bool = True) -> Scorable:
    """The first `limit` rows of a split (all without it), less those with an empty dialogue, or with
    `references` an empty reference summary (ROUGE would score it 0): each keeps its `index`."""
    out = Scorable([])
    for row in rows[:limit]:
        if not row["dialogue"].strip():
            out.empty_dialogue += 1
        elif references and not row["summary"].strip():
            out.empty_reference += 1
        else:
            out.rows.append(row)
    return out


# --- local files ---------------------------------------------------------------------------------


def _text(path: Path) -> str:
    return _decode(path.read_bytes(), path)


def _decode(raw: bytes, where: Path | str) -> str:
    return files.utf8_text(raw, str(where), bom=True)  # a BOM, as spreadsheet programs write, is no text


def read_records(path: Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict[str, Any]]:
    """The file's rows as dicts, `required` columns checked; errors name the file and line."""
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty")
    if path.suffix == ".parquet":
        records = _parquet(path, required)
    elif path.suffix == ".csv":
        records = _csv(path)
    else:
        records = _json(path, required)
    missing = [c for c in required if records and all(c not in r for r in records)]
    if missing:
        columns = ", ".join(map(str, records[0]))
        raise UserError(f"{path} has no column {', '.join(missing)} (columns: {columns})")
    return records


def _json(path: Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict[str, Any]]:
    text = _text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {e.lineno} is not valid JSON: {e.msg}") from None
        except _RepeatedKey as e:
            raise UserError(f"{path}: a record has the key {e.key!r} twice (the last would silently win)") from None
    elif path.suffix == ".json" and not _reads_as_json_lines(text):
        raise UserError(f"{path} holds one JSON value, not rows: expected a JSON array of rows or JSON Lines")
    else:
        records = _json_lines(text, path)
    check_objects(records, path, required)
    return records


def check_objects(records: list[Any], where: Path | str, required: tuple[str, ...]) -> None:
    """Every record must be a JSON object (a row), not a list or a bare value."""
    wanted = " and ".join(required)
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise UserError(f"{where} record {number} is {type(record).__name__}, not an object with {wanted}")


class _RepeatedKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: json keeps the last of a repeated key unsaid."""
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        raise _RepeatedKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _reads_as_json_lines(text: str) -> bool:
    """Whether a .json file that is not an array reads as JSON Lines: not one object (or other value)
    spread over several lines, and not one value that is no object, such as {"data": [...]}'s."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return True  # several values, one per line (or broken lines, named while reading them)
    return isinstance(value, dict) and len(text.strip().splitlines()) == 1 and any(c in value for c in REQUIRED_COLUMNS)


def _json_lines(text: str, where: Path | str) -> list[Any]:
    """One JSON value per non-blank line. Lines end at "\\n" alone: JSON writers leave U+2028, U+0085
    and the like unescaped inside strings, where splitlines() would cut a record in two."""
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line, object_pairs_hook=_unique_keys))
            except json.JSONDecodeError as e:
                raise UserError(f"{where} line {number} is not valid JSON: {e.msg}") from None
            except _RepeatedKey as e:
                raise UserError(
                    f"{where} line {number} has the key {e.key!r} twice (the last would silently win)"
                ) from None
    return records


def _csv(path: Path) -> list[dict[str, Any]]:
    """The rows under the header. Read strictly, row by row, so that what a lenient reader would get
    silently wrong is named with its line: a quote that never closes (every later row would become
    one field), a row with more fields than the header (an unquoted comma), a column named twice."""
    reader = csv.reader(io.StringIO(_text(path), newline=""), strict=True)
    header: list[str] | None = None
    records, start = [], 1  # start: the line the row being read begins on
    try:
        for fields in reader:
            if not fields:  # a blank line is no row, nor the header
                pass
            elif header is None:
                header = fields
                repeated = sorted({c for c in header if header.count(c) > 1})
                if repeated:
                    raise UserError(
                        f"{path} line {start}: the header names column {', '.join(repeated)} more than once"
                    )
            elif len(fields) > len(header):
                raise UserError(
                    f"{path} line {start} has {len(fields)} fields, the header {len(header)}: quote a field that "
                    'holds a comma ("A: yes, at 5")'
                )
            else:
                records.append(dict(zip(header, fields)) | {c: None for c in header[len(fields) :]})
            start = reader.line_num + 1
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise UserError(f'{path} line {start}: a quoted field opens here and its closing " never comes') from None
        raise UserError(f"{path} line {reader.line_num} is not valid CSV: {e}") from None
    if header and not records:
        raise UserError(f"{path} has a header ({', '.join(header)}) but no rows")
    return records


def _parquet(path: Path, text_columns: tuple[str, ...]) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} could not be read as parquet: {str(e).splitlines()[0]}") from None
    for column in text_columns:
        kind = table.schema.field(column).type if column in table.column_names else pa.string()
        if pa.types.is_dictionary(kind):  # strings stored once each, then referred to by number
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: column {column} holds {table.schema.field(column).type}, not text")
    return table.to_pylist()


# --- the Hub -------------------------------------------------------------------------------------


def _hub_records(source: str, split: str, revision: str | None) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()  # it would announce every split it prepares, not the one asked for
    try:
        ds = datasets.load_dataset(source, split=split, revision=revision)
    except ValueError as e:  # unknown split
        raise UserError(f"Hub dataset {source} has no split '{split}': {str(e).splitlines()[0]}") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise UserError(f"could not load Hub dataset {source}: {str(e).splitlines()[0]}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(
            f"{source} ({split}) has no column {', '.join(missing)} (columns: {', '.join(ds.column_names)})"
        )
    return ds.to_list()


# --- dialogues to summarise (no references) --------------------------------------------------------

DIALOGUE_FORMATS = (*FORMATS, ".txt")
STDIN = "standard input"


def dialogues_from_file(path: Path) -> list[dict[str, Any]]:
    """Records to summarise, in file order: the rows of a .csv, .jsonl, .json or .parquet file with
    a `dialogue` column (every column kept), or one {"dialogue": block} per block of a .txt file
    (blocks are separated by blank lines). A missing or null dialogue counts as empty."""
    if not path.is_file():
        raise UserError(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
    if path.suffix == ".txt":
        records = text_blocks(_text(path))
    elif path.suffix in FORMATS:
        records = read_records(path, required=("dialogue",))
    else:
        raise UserError(f"{path}: give a {', '.join(DIALOGUE_FORMATS)} file, or - for standard input")
    return _dialogues(records, str(path))


def dialogues_from_stdin(raw: bytes) -> list[dict[str, Any]]:
    """Records to summarise from standard input: JSON Lines when it starts as JSON does (with "{" or
    "[", which no dialogue line does), read as strictly as a .jsonl file, else text blocks as in a
    .txt file. The first character decides, so a broken line is named, not read as a dialogue."""
    text = _decode(raw, STDIN)
    if text.lstrip().startswith(("{", "[")):
        records = _json_lines(text, STDIN)
        check_objects(records, STDIN, ("dialogue",))
    else:
        records = text_blocks(text)
    return _dialogues(records, STDIN)


def text_blocks(text: str) -> list[dict[str, str]]:
    """{"dialogue": block} for each run of non-blank lines; blank lines only separate blocks. A line
    ends at "\\n", "\\r\\n" or a lone "\\r" (old Mac files), never inside a line (U+2028 and the like)."""
    blocks, lines = [], []
    for line in [*text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), ""]:
        if line.strip():
            lines.append(line.rstrip())
        elif lines:
            blocks.append({"dialogue": "\n".join(lines)})
            lines = []
    return blocks


def _dialogues(records: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    if not records:
        raise UserError(f"{where} holds no dialogue")
    if all("dialogue" not in r for r in records):
        raise UserError(f"{where} has no column dialogue (columns: {', '.join(map(str, records[0]))})")
    for number, record in enumerate(records, 1):
        value = record.get("dialogue")
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where} row {number}: dialogue is {type(value).__name__} {value!r:.40}, not text")
    return records
