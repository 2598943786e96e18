"""Loading a split: local files (read here, errors naming the file and line) and the shipped sample."""

import csv
import json
import re

import pytest
from conftest import SAMPLE_DATA

from samsum_qlora import data
from samsum_qlora.errors import UserError


def test_loads_shipped_sample():
    rows = data.load_rows(str(SAMPLE_DATA), "train")
    assert len(rows) == 60 and rows[0]["id"] == "smp-train-001"
    assert set(rows[0]) == {"index", "id", "dialogue", "summary"} and rows[0]["summary"].startswith("Lukas will buy")
    assert [r["index"] for r in rows] == list(range(60))  # each row's position in the split


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_rows(str(tmp_path / "nope"), "train")


def test_missing_split(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"dialogue": "a", "summary": "b"}) + "\n")
    with pytest.raises(UserError, match=r"no 'test' split in .*found train.jsonl"):
        data.load_rows(str(tmp_path), "test")


def test_missing_column(tmp_path):
    with (tmp_path / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["id", "dialogue", "abstract"], ["1", "A: hi", "A greets."]])
    with pytest.raises(UserError, match=r"train.csv has no column summary"):
        data.load_rows(str(tmp_path), "train")


def test_empty_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(UserError, match="train.jsonl is empty"):
        data.load_rows(str(tmp_path), "train")


def test_csv_with_numeric_ids_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"id": [13, 14], "dialogue": ["A: hi", "B: yo"], "summary": ["A greets.", "B greets."]})
    frame.to_parquet(tmp_path / "train.parquet")
    first = {"index": 0, "id": "13", "dialogue": "A: hi", "summary": "A greets."}
    assert data.load_rows(str(tmp_path), "train")[0] == first
    frame.to_csv(tmp_path / "test.csv", index=False)
    second = {"index": 1, "id": "14", "dialogue": "B: yo", "summary": "B greets."}
    assert data.load_rows(str(tmp_path), "test")[1] == second


def test_csv_keeps_quoted_newlines_and_crlf(tmp_path):
    (tmp_path / "train.csv").write_bytes(b'id,summary,dialogue\r\n1,"A greets.","A: hi\r\nB: yo"\r\n')
    assert data.load_rows(str(tmp_path), "train")[0]["dialogue"] == "A: hi\r\nB: yo"


def test_missing_or_null_ids_become_the_row_number(tmp_path):
    lines = [
        {"dialogue": "A: hi", "summary": "s"},
        {"id": None, "dialogue": "B: yo", "summary": "s"},
        {"id": "x", "dialogue": "C: hey", "summary": "s"},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r["id"] for r in data.load_rows(str(tmp_path), "train")] == ["0", "1", "x"]


def test_json_array_file(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"dialogue": "A: hi", "summary": "A greets."}]))
    assert data.load_rows(str(tmp_path), "train")[0]["summary"] == "A greets."


# --- bad files: one line naming the file, the line and what is wrong ---


def test_non_utf8_file_names_the_line_and_encoding(tmp_path):
    good = json.dumps({"dialogue": "A: hi", "summary": "s"}).encode()
    (tmp_path / "train.jsonl").write_bytes(good + b"\n" + good + b"\n" + b'{"dialogue": "caf\xe9", "summary": "s"}\n')
    with pytest.raises(UserError, match=r"train.jsonl line 3 is not UTF-8 \(byte 0xe9\): save it as UTF-8"):
        data.load_rows(str(tmp_path), "train")
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "train.csv").write_bytes(b"id,dialogue,summary\n1,\xff\xfe,s\n")
    with pytest.raises(UserError, match=r"train.csv line 2 is not UTF-8"):
        data.load_rows(str(tmp_path), "train")


def test_broken_jsonl_line_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"dialogue": "a", "summary": "b"}\n{"dialogue": "a", "summ\n')
    with pytest.raises(UserError, match=r"train.jsonl line 2 is not valid JSON"):
        data.load_rows(str(tmp_path), "train")


def test_dialogue_that_is_not_text(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"dialogue": ["A: hi", "B: yo"], "summary": "s"}) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl row 1: dialogue is list"):
        data.load_rows(str(tmp_path), "train")


def test_parquet_with_numbers_for_text(tmp_path):
    import pandas as pd

    pd.DataFrame({"dialogue": [1, 2], "summary": [3, 4]}).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(UserError, match=r"train.parquet: column dialogue holds int64, not text"):
        data.load_rows(str(tmp_path), "train")


def test_csv_with_only_a_header(tmp_path):
    (tmp_path / "train.csv").write_text("id,dialogue,summary\n")
    with pytest.raises(UserError, match=r"train.csv has a header \(id, dialogue, summary\) but no rows"):
        data.load_rows(str(tmp_path), "train")


def test_csv_without_a_dialogue_column(tmp_path):
    (tmp_path / "train.csv").write_text("id,text,summary\n1,A: hi,A greets.\n")
    with pytest.raises(UserError, match=r"train.csv has no column dialogue \(columns: id, text, summary\)$"):
        data.load_rows(str(tmp_path), "train")


def test_a_csv_row_with_more_fields_than_the_header_is_named_not_cut_at_its_comma(tmp_path):
    # line 3's unquoted comma: a lenient reader keeps "A: yes" and drops the rest unsaid
    (tmp_path / "train.csv").write_text(
        'id,dialogue,summary\n1,"A: hi\nB: hello",greeting\n2,A: yes, at 5,time\n3,A: ok,fine\n'
    )
    with pytest.raises(UserError, match=r"train.csv line 4 has 4 fields, the header 3: quote a field"):
        data.load_rows(str(tmp_path), "train")


def test_an_unterminated_csv_quote_is_named_where_it_opens(tmp_path):
    # without the check, the four rows below the quote became one dialogue and nothing was said
    rows = ["id,dialogue,summary", "1,A: hi,greets", '2,"A: hello,greets', "3,A: x,y", "4,A: z,w", "5,A: q,r"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r'train.csv line 3: a quoted field opens here and its closing " never comes'):
        data.load_rows(str(tmp_path), "train")


def test_csv_rows_keep_quoted_commas_newlines_and_short_rows(tmp_path):
    (tmp_path / "train.csv").write_text('\nid,dialogue,summary\n1,"A: yes, at 5\nB: ok",time\n\n2,A: hm\n')
    rows = data.load_rows(str(tmp_path), "train")
    assert [(r["id"], r["dialogue"], r["summary"]) for r in rows] == [
        ("1", "A: yes, at 5\nB: ok", "time"),
        ("2", "A: hm", ""),
    ]


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "train.csv",
            "id,dialogue,dialogue\n1,a,b\n",
            "train.csv line 1: the header names column dialogue more than once",
        ),
        (
            "train.jsonl",
            '{"dialogue": "a", "summary": "b"}\n{"dialogue": "a", "summary": "b", "dialogue": "c"}\n',
            "train.jsonl line 2 has the key 'dialogue' twice",
        ),
        (
            "train.json",
            '[{"dialogue": "a", "summary": "b", "summary": "c"}]',
            "train.json: a record has the key 'summary' twice",
        ),
    ],
)
def test_a_column_or_key_given_twice_is_refused(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        data.load_rows(str(tmp_path), "train")


@pytest.mark.parametrize("kind", ["folder", "loop", "broken-link"])
def test_a_split_that_is_not_a_regular_file(tmp_path, kind):
    split = tmp_path / "test.jsonl"
    if kind == "folder":
        split.mkdir()
    elif kind == "loop":
        split.symlink_to(tmp_path / "test.jsonl")
    else:
        split.symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(UserError, match=r"test.jsonl is not a regular file: the 'test' split must be one file"):
        data.load_rows(str(tmp_path), "test")


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"data": [{"dialogue": "A: hi", "summary": "A greets."}]}),  # one object holding the rows
        json.dumps({"dialogue": "A: hi", "summary": "A greets."}, indent=2),  # one row over several lines
    ],
)
def test_json_holding_one_top_level_value(tmp_path, text):
    (tmp_path / "test.json").write_text(text)
    with pytest.raises(UserError, match=r"test.json holds one JSON value, not rows: expected a JSON array of rows"):
        data.load_rows(str(tmp_path), "test")


def test_json_lines_in_a_json_file_still_load(tmp_path):
    row = {"dialogue": "A: hi", "summary": "A greets."}
    (tmp_path / "test.json").write_text(json.dumps(row) + "\n")
    assert data.load_rows(str(tmp_path), "test")[0]["summary"] == "A greets."
    (tmp_path / "test.json").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    assert len(data.load_rows(str(tmp_path), "test")) == 2


def test_dictionary_encoded_parquet_strings_are_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"dialogue": ["A: hi", "B: yo", "A: hi"], "summary": ["A greets.", "B greets.", "A greets."]})
    pq.write_table(table.cast(pa.schema([(c, pa.dictionary(pa.int32(), pa.string())) for c in table.column_names])),
                   tmp_path / "test.parquet")  # fmt: skip
    assert pq.read_table(tmp_path / "test.parquet").schema.field("dialogue").type == pa.dictionary(
        pa.int32(), pa.string()
    )
    rows = data.load_rows(str(tmp_path), "test")
    assert [r["dialogue"] for r in rows] == ["A: hi", "B: yo", "A: hi"] and rows[2]["summary"] == "A greets."


def test_scorable_skips_and_counts_empty_rows_and_keeps_their_positions():
    rows = [
        {"index": i, "id": str(i), "dialogue": d, "summary": s}
        for i, (d, s) in enumerate([("A: hi", "a"), (" \n", "b"), ("C: yo", "  "), ("D: hey", "d"), ("E: ho", "e")])
    ]
    chosen = data.scorable(rows)
    assert [r["index"] for r in chosen.rows] == [0, 3, 4]  # positions in the split, not after filtering
    assert (chosen.empty_dialogue, chosen.empty_reference) == (1, 1)
    assert chosen.describe() == "skipped 1 with an empty dialogue and 1 with an empty reference summary"
    first_four = data.scorable(rows, limit=4)  # --limit N: the split's first N rows, then the skips
    assert [r["index"] for r in first_four.rows] == [0, 3]
    assert [r["index"] for r in data.scorable(rows, references=False).rows] == [0, 2, 3, 4]
