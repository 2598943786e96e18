"""`summarize`: dialogues without references in (each file form, standard input), one JSON line per
dialogue out, in input order, with eval's own generation; bad input is one line and exit code 2."""

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE_DATA, SMOKE_CONFIG, set_args, smoke_overrides
from test_cli import one_line_error, runner

from samsum_qlora import data
from samsum_qlora.commands.cli import main
from samsum_qlora.errors import UserError

DIALOGUES = ["Ana: lunch at 1?\nBo: yes, the usual place", "Cy: I lost my keys 😩\nDee: check the car", "Eve: hi"]
FAST = {"eval.max_new_tokens": 6}


def write_table(path, records):
    """`records` as the file form `path`'s suffix names."""
    import pandas as pd

    frame = pd.DataFrame(records)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- reading the input ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_each_table_form_keeps_every_column_in_order(tmp_path, suffix):
    records = [{"ref": f"r{i}", "dialogue": d, "lang": "en"} for i, d in enumerate(DIALOGUES)]
    assert data.dialogues_from_file(write_table(tmp_path / f"in{suffix}", records)) == records


def test_text_blocks_from_a_file_and_from_stdin(tmp_path):
    text = "\n\n".join(DIALOGUES).replace("\n\n", "\n \r\n\n\n", 1).replace("\n", "\r\n", 1) + "\n\n"
    expected = [{"dialogue": d} for d in DIALOGUES]
    (tmp_path / "in.txt").write_text(text)
    assert data.dialogues_from_file(tmp_path / "in.txt") == expected
    assert data.dialogues_from_stdin(text.encode()) == expected


def test_stdin_is_json_lines_when_it_starts_as_json():
    lines = [json.dumps({"n": i, "dialogue": d}) for i, d in enumerate(DIALOGUES)]
    assert data.dialogues_from_stdin(("\n".join(lines) + "\n\n").encode())[1] == {"n": 1, "dialogue": DIALOGUES[1]}
    separators = json.dumps({"dialogue": "A: one\u2028two\u0085three"}, ensure_ascii=False) + "\r\n"
    assert data.dialogues_from_stdin(separators.encode()) == [{"dialogue": "A: one\u2028two\u0085three"}]
    text = "Ana: {not json}\nBo: [sic]\n"
    assert data.dialogues_from_stdin(text.encode()) == [{"dialogue": text.strip()}]


@pytest.mark.parametrize(
    "stdin, message",
    [  # each was read as one text dialogue: the raw JSON summarised as a conversation, exit 0
        (
            '{"dialogue": "A: hi"}\n{"dialogue": "B: yo"\n{"dialogue": "C: x"}\n',
            "standard input line 2 is not valid JSON",
        ),
        ('{"dialogue": "A: hi"}\nAna: {not json}\n', "standard input line 2 is not valid JSON"),
        ('["A: hi", "B: yo"]\n', "standard input record 1 is list, not an object with dialogue"),
    ],
)
def test_stdin_that_starts_as_json_is_read_as_strictly_as_a_jsonl_file(stdin, message):
    with pytest.raises(UserError, match=re.escape(message)):
        data.dialogues_from_stdin(stdin.encode())


def test_a_txt_file_with_old_mac_line_ends_is_one_dialogue_per_block(tmp_path):
    (tmp_path / "in.txt").write_bytes("\r\r".join(DIALOGUES).replace("\n", "\r").encode())
    assert data.dialogues_from_file(tmp_path / "in.txt") == [{"dialogue": d} for d in DIALOGUES]


def test_a_record_that_is_no_object_is_refused_without_asking_for_a_summary(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"dialogue": "A: hi"}\n"A: yo"\n')
    with pytest.raises(UserError, match=r"in.jsonl record 2 is str, not an object with dialogue$"):
        data.dialogues_from_file(tmp_path / "in.jsonl")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("in.csv", "id,text\n1,hi\n", "in.csv has no column dialogue (columns: id, text)"),
        ("in.jsonl", "", "in.jsonl is empty"),
        ("in.json", "[]", "in.json holds no dialogue"),
        ("in.csv", "id,dialogue\n", "has a header (id, dialogue) but no rows"),
        ("in.txt", " \n\n \n", "in.txt holds no dialogue"),
        ("in.jsonl", '{"dialogue": "A: hi"}\n{"dialogue": ["A: hi"]}\n', "in.jsonl row 2: dialogue is list"),
        ("in.docx", "x", "give a .jsonl, .json, .csv, .parquet, .txt file, or - for standard input"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        data.dialogues_from_file(tmp_path / name)


def test_bad_standard_input_and_parquet(tmp_path):
    with pytest.raises(UserError, match="standard input has no column dialogue"):
        data.dialogues_from_stdin(b'{"text": "A: hi"}\n')
    with pytest.raises(UserError, match="standard input row 1: dialogue is int 5, not text"):
        data.dialogues_from_stdin(b'{"dialogue": 5}\n')
    with pytest.raises(UserError, match="standard input line 2 is not UTF-8"):
        data.dialogues_from_stdin(b"A: hi\nB: caf\xe9\n")
    numbers = write_table(tmp_path / "n.parquet", [{"dialogue": 1}])
    with pytest.raises(UserError, match="column dialogue holds int64, not text"):
        data.dialogues_from_file(numbers)


# --- the command ---------------------------------------------------------------------------------


def summarize(tmp_path, *args, stdin=None, **overrides):
    return runner().invoke(
        main, ["summarize", *args, *set_args(smoke_overrides(tmp_path, **FAST, **overrides))], input=stdin
    )


def test_summaries_are_evals_own_in_input_order(tmp_path):
    """The sample's 12 test dialogues with adapters: the very summaries eval writes, one line per
    dialogue in input order, the input's columns carried (its summary column as "reference")."""
    from samsum_qlora.commands.bench import random_adapters
    from samsum_qlora.commands.evaluate import evaluate_model, plan_eval
    from samsum_qlora.config import load_config

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **FAST))
    adapters = random_adapters(cfg, tmp_path / "run" / "lora_adapters")
    evaluate_model(cfg, plan_eval(cfg))
    evaluated = [json.loads(line) for line in (tmp_path / "run" / "eval" / "predictions.jsonl").open()]
    result = summarize(tmp_path, str(SAMPLE_DATA / "test.jsonl"))
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    rows = data.load_rows(str(SAMPLE_DATA), "test")
    assert [(x["id"], x["dialogue"], x["reference"]) for x in lines] == [
        (r["id"], r["dialogue"], r["summary"]) for r in rows
    ]
    assert [(x["summary"], x["ended"]) for x in lines] == [(p["prediction"], p["ended"]) for p in evaluated]
    assert any(x["summary"] for x in lines)
    assert f"summarising 12 dialogues with {cfg.model.name} + {adapters}" in result.stderr


def test_a_pipe_gets_json_lines_alone_and_empty_dialogues_keep_their_line(tmp_path):
    """`... | samsum-qlora summarize - > out.jsonl` in a real process: stdout is the JSON Lines and
    nothing else; an empty dialogue is counted on stderr and keeps its line, summary null."""
    records = [
        {"n": 0, "dialogue": DIALOGUES[0]},
        {"n": 1, "dialogue": "  "},
        {"n": 2},
        {"n": 3, "dialogue": DIALOGUES[2]},
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "samsum_qlora",
            "summarize",
            "-",
            "--base-only",
            *set_args(smoke_overrides(tmp_path, **FAST)),
        ],
        input="".join(json.dumps(r) + "\n" for r in records).encode(),
        capture_output=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = [json.loads(line) for line in done.stdout.decode().split("\n")[:-1]]
    assert [x["n"] for x in lines] == [0, 1, 2, 3]
    assert [x["summary"] is None for x in lines] == [False, True, True, False] and not lines[1]["ended"]
    assert all(x["summary"] for x in (lines[0], lines[3]))
    assert "standard input: skipped 2 with an empty dialogue" in done.stderr.decode()


def test_text_blocks_on_stdin_and_an_atomic_out_file(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    result = summarize(tmp_path, "--base-only", "--out", str(out), stdin="\n\n".join(DIALOGUES).encode())
    assert result.exit_code == 0 and result.stdout == "", result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(x) for x in lines] == [{"dialogue", "summary", "ended"}] * 3
    assert [x["dialogue"] for x in lines] == DIALOGUES and all(isinstance(x["summary"], str) for x in lines)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no scratch or temporary file left


def test_an_interrupted_run_leaves_an_existing_out_file_as_it_was(tmp_path, monkeypatch):
    from samsum_qlora.summarizer import Summarizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Summarizer, "generate", interrupted)
    out = tmp_path / "out.jsonl"
    out.write_text("earlier\n")
    summarize(tmp_path, "--base-only", "--out", str(out), stdin=DIALOGUES[0].encode())
    assert out.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


@pytest.mark.parametrize(
    "make_args, stdin, message",
    [
        (lambda p: [str(write_table(p / "in.csv", [{"text": "A: hi"}]))], None, "in.csv has no column dialogue"),
        (lambda p: ["-"], b"", "standard input holds no dialogue"),
        (lambda p: ["-"], b'{"dialogue": {"A": "hi"}}\n', "standard input row 1: dialogue is dict"),
        (lambda p: ["-"], b'{"dialogue": ""}\n', "every dialogue in standard input is empty"),
        (lambda p: [str(p / "nope.txt")], None, "nope.txt does not exist"),
        (lambda p: ["--out", str(p / "a-file" / "out.jsonl")], b"A: hi", "cannot create output directory"),
        (lambda p: ["--out", str(p)], b"A: hi", "is a folder: give a file name"),
        (lambda p: ["--adapters", str(p)], b"A: hi", "--base-only and --adapters contradict"),
        (lambda p: ["--set", "eval.top_p=0.5"], b"A: hi", "set eval.do_sample=true"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, make_args, stdin, message):
    (tmp_path / "a-file").write_text("x")
    args = make_args(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = summarize(tmp_path, *args, "--base-only", stdin=stdin)
    one_line_error(result, message)
    assert result.stdout == "" and sorted(tmp_path.rglob("*")) == before


def test_adapters_default_to_the_runs_as_in_eval_and_are_checked_before_loading(tmp_path):
    one_line_error(summarize(tmp_path, stdin=b"A: hi"), f"adapters not found: {tmp_path / 'run' / 'lora_adapters'}")
    one_line_error(summarize(tmp_path, "--adapters", str(tmp_path), stdin=b"A: hi"), "holds no LoRA adapters")


def test_ctrl_c_in_summarize_is_one_line_and_130(tmp_path, monkeypatch):
    """Like eval and train: a line saying nothing was written, and 128 + SIGINT, not click's "Aborted!"."""
    from samsum_qlora import summarizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(summarizer.Summarizer, "generate", interrupted)
    result = summarize(tmp_path, "--base-only", stdin=b"Ana: hi\nBo: hello")
    assert result.exit_code == 130
    assert (
        result.stderr.strip().splitlines()[-1]
        == "stopped: stopped by SIGINT; nothing was written: rerun the same command"
    )


@pytest.mark.parametrize("name", ["in.csv", "in.txt", "link.txt"])
def test_out_that_is_the_input_is_refused_and_the_input_kept(tmp_path, name):
    """`summarize X.csv --out X.csv` replaced the dialogues with JSON Lines; a link to the input too."""
    source = tmp_path / name.replace("link", "in")
    source.write_text("dialogue\nA: hi\n" if name.endswith(".csv") else "A: hi\n")
    out = tmp_path / name
    if name.startswith("link"):
        out = tmp_path / "link.jsonl"
        out.symlink_to(source)
    before = source.read_text()
    result = summarize(tmp_path, str(source), "--out", str(out), "--base-only")
    one_line_error(result, f"--out {out} is the input {source}: writing it would replace your dialogues")
    assert source.read_text() == before


def test_a_full_disk_under_out_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from samsum_qlora import files

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_bytes", full)
    out = tmp_path / "out.jsonl"
    result = summarize(tmp_path, "--base-only", "--out", str(out), stdin=DIALOGUES[0].encode())
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.rstrip().splitlines()[-1]  # after the progress of the work done
    assert last.startswith(f"error: no space left on the device of {tmp_path} while writing {out}; free some space")
    assert not out.exists()


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_standard_output_on_a_full_device_is_one_line_and_exit_2(tmp_path):
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "samsum_qlora", "summarize", "-", "--base-only"]
            + set_args(smoke_overrides(tmp_path, **FAST)),
            input=DIALOGUES[0].encode(),
            stdout=full,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            timeout=300,
        )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr[-2000:]
    assert stderr.rstrip().splitlines()[-1] == (
        "error: no space left on the device of standard output while writing the summaries; free some space, "
        "then rerun the same command"
    )
    assert "Traceback" not in stderr and "Exception ignored" not in stderr


def test_non_finite_numbers_of_the_input_come_out_as_null():
    from samsum_qlora.commands.summarize import json_safe, output_record

    record = data.dialogues_from_stdin(b'{"dialogue": "A: hi", "score": NaN, "weight": -Infinity, "n": 2.5}\n')[0]
    line = json.dumps(json_safe(output_record(record, None)))
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {
        "dialogue": "A: hi",
        "score": None,
        "weight": None,
        "n": 2.5,
        "summary": None,
        "ended": False,
    }
