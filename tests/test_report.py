"""`report` on three hand-made eval folders whose ROUGE is known by hand."""

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from test_cli import one_line_error, run_cli

from samsum_qlora import files, metrics
from samsum_qlora.commands import report
from samsum_qlora.errors import UserError
from samsum_qlora.metrics import rouge

REFS = ["alpha beta gamma delta", "epsilon zeta eta theta", "iota kappa lambda mu", "nu xi omicron pi"]


def exact(ref):  # ROUGE-1, -2, -L = 1, 1, 1
    return ref


def swapped(ref):  # last two words swapped: ROUGE-1 = 1, ROUGE-2 = 1/3, ROUGE-L = 3/4
    words = ref.split()
    return " ".join(words[:2] + words[:1:-1])


def wrong(ref):  # 0, 0, 0
    return "red"


ROWS = {  # folder -> (model, type, how each of the four references is answered)
    "eval-base": ("Llama-3.2-1B-Instruct", "base", (exact, swapped, wrong, wrong)),
    "eval-api-gpt-4o-mini": ("gpt-4o-mini", "API", (exact, exact, swapped, wrong)),
    "eval": ("Llama-3.2-1B-Instruct", "QLoRA adapters", (exact, exact, exact, swapped)),
}
# By hand: base (1+1+0+0)/4, (1+1/3)/4, (1+3/4)/4; API (3, 2+1/3, 2+3/4)/4; QLoRA (4, 3+1/3, 3+3/4)/4
TABLE = """\
| Model | Type | ROUGE-1 | ROUGE-2 | ROUGE-L |
|---|---|---|---|---|
| Llama-3.2-1B-Instruct | base | 50.00 | 33.33 | 43.75 |
| gpt-4o-mini | API | 75.00 | 58.33 | 68.75 |
| Llama-3.2-1B-Instruct | QLoRA adapters | 100.00 | 83.33 | 93.75 |"""
# Golden values of the fixed seed (numpy's PCG64 stream). With four examples the resampled means
# take few distinct values and both percentiles fall well inside a run of equal ones, so float
# details cannot move them; QLoRA's ROUGE-1 is 1 on every example, hence an interval of width 0.
INTERVALS = """\
| Model | Type | n | ROUGE-1 95% CI | ROUGE-2 95% CI | ROUGE-L 95% CI |
|---|---|---|---|---|---|
| Llama-3.2-1B-Instruct | base | 4 | 0.00 – 100.00 | 0.00 – 75.00 | 0.00 – 87.50 |
| gpt-4o-mini | API | 4 | 25.00 – 100.00 | 16.67 – 100.00 | 25.00 – 100.00 |
| Llama-3.2-1B-Instruct | QLoRA adapters | 4 | 100.00 – 100.00 | 50.00 – 100.00 | 81.25 – 100.00 |"""


def write_eval(folder, model, kind, answers):
    folder.mkdir(parents=True)
    preds = [how(ref) for how, ref in zip(answers, REFS)]
    records = [{"id": f"t{i}", "reference": ref, "prediction": p} for i, (ref, p) in enumerate(zip(REFS, preds))]
    files.write_jsonl(folder / "predictions.jsonl", records)
    files.write_json(
        folder / "metrics.json", {**rouge(preds, REFS), "n_examples": 4, "model": model, "type": kind, "split": "test"}
    )


@pytest.fixture
def run_dir(tmp_path):
    for name, (model, kind, answers) in ROWS.items():
        write_eval(tmp_path / "run" / name, model, kind, answers)
    (tmp_path / "run" / "lora_adapters").mkdir()  # a training run's other folders are ignored
    return tmp_path / "run"


def test_report_markdown_is_exact(run_dir, tmp_path):
    markdown = report.write_report([run_dir], tmp_path / "out")
    assert (tmp_path / "out" / "report.md").read_text() == markdown
    assert TABLE in markdown  # the seed's table, rows in the tutorial's order: base, API, QLoRA
    assert markdown == (
        "## ROUGE on SAMSum\n\n" + TABLE + "\n\n"
        "95% bootstrap confidence intervals (1000 resamples of the examples, seed 0):\n\n" + INTERVALS + "\n\n"
        f"Sources: `{run_dir / 'eval-base'}`, `{run_dir / 'eval-api-gpt-4o-mini'}`, `{run_dir / 'eval'}`\n"
    )


def test_chart_is_a_png(run_dir, tmp_path):
    report.write_report([run_dir], tmp_path / "out")
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert len(png) > 10_000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_intervals_contain_the_point_estimates(run_dir):
    for folder in report.eval_dirs([run_dir]):
        scored = report.load_scored(folder)
        for metric, (lo, hi) in report.intervals(scored).items():
            assert lo <= scored.mean(metric) <= hi
            assert 0 <= lo <= hi <= 1


def test_bootstrap_is_deterministic_given_the_seed(run_dir, tmp_path):
    values = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.8, 0.0]
    first = metrics.bootstrap_interval(values, seed=0)
    assert metrics.bootstrap_interval(values, seed=0) == first
    assert metrics.bootstrap_interval(values, seed=1) != first
    assert report.write_report([run_dir], tmp_path / "a") == report.write_report([run_dir], tmp_path / "b")
    assert (tmp_path / "a" / "report.png").read_bytes() == (tmp_path / "b" / "report.png").read_bytes()


def test_bootstrap_of_a_constant_is_that_constant():
    assert metrics.bootstrap_interval([0.25] * 7) == pytest.approx((0.25, 0.25))


def test_eval_dirs_keep_argument_order_and_drop_duplicates(run_dir):
    qlora, base = run_dir / "eval", run_dir / "eval-base"
    assert report.eval_dirs([qlora, base, run_dir / "eval" / "."]) == [qlora, base]


def test_cli_prints_the_markdown_and_writes_both_files(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(["report", str(run_dir)])
    assert result.exit_code == 0, result.stderr
    assert TABLE in result.stdout and INTERVALS in result.stdout
    assert (tmp_path / "report" / "report.md").read_text() == result.stdout  # default --out ./report
    assert (tmp_path / "report" / "report.png").is_file()


def test_the_report_command_loads_no_model_library(run_dir, tmp_path):
    """`report` re-scores text and draws a page: a machine without torch runs it, and it starts fast."""
    code = (
        "import sys; from samsum_qlora.commands.cli import main; main(sys.argv[1:], standalone_mode=False); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    args = ["report", str(run_dir), "--out", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert TABLE in result.stdout and (tmp_path / "out" / "report.html").is_file()  # it did report
    assert result.stdout.endswith("\n[]\n")


def test_stale_metrics_warn_and_the_predictions_win(run_dir, tmp_path, capsys):
    meta = json.loads((run_dir / "eval" / "metrics.json").read_text())
    files.write_json(run_dir / "eval" / "metrics.json", {**meta, "rouge1": 0.5})
    markdown = report.write_report([run_dir / "eval"], tmp_path / "out")
    assert "| 100.00 | 83.33 | 93.75 |" in markdown
    assert "rouge1 in metrics.json is 0.5000, predictions.jsonl gives 1.0000" in capsys.readouterr().err


def test_different_examples_are_flagged(run_dir, tmp_path):
    records = files.read_jsonl(run_dir / "eval" / "predictions.jsonl")[:3]
    files.write_jsonl(run_dir / "eval" / "predictions.jsonl", records)
    assert "did not score the same examples" in report.write_report([run_dir], tmp_path / "out")


@pytest.mark.parametrize(
    "breakage, needle",
    [
        ("missing", "does not exist"),
        ("file", "is not a folder"),
        ("empty-run", "holds no metrics.json and no eval"),
        ("no-predictions", "has metrics.json but no predictions.jsonl"),
        ("bad-json", "metrics.json is not valid JSON"),
        ("no-type", "has no 'model' and 'type'"),
        ("bad-row", "has a row without id, prediction and reference"),
        ("no-rows", "holds no predictions"),
        ("cut-off", "predictions.jsonl is damaged at line 4: not whole JSON (cut off); rerun its eval"),
        ("broken-lines", "predictions.jsonl is damaged at lines 1, 3: not whole JSON; rerun"),
        (
            "repeated",
            "predictions.jsonl is damaged: 2 rows of the split appear more than once (lines 1, 5; lines 2, 6)",
        ),
        ("word-for-number", "metrics.json: rouge1 is 'high', not a number"),
    ],
)
def test_bad_folders_are_one_line_errors_and_write_nothing(run_dir, tmp_path, breakage, needle):
    target = run_dir / "eval"
    if breakage == "missing":
        target = tmp_path / "nope"
    elif breakage == "file":
        target = tmp_path / "a-file"
        target.write_text("x")
    elif breakage == "empty-run":
        target = tmp_path / "empty-run"
        target.mkdir()
    elif breakage == "no-predictions":
        (target / "predictions.jsonl").unlink()
    elif breakage == "bad-json":
        (target / "metrics.json").write_text("{not json")
    elif breakage == "no-type":
        (target / "metrics.json").write_text('{"rouge1": 0.5}')
    elif breakage == "bad-row":
        (target / "predictions.jsonl").write_text('{"id": "t0", "prediction": "x"}\n')
    elif breakage == "no-rows":
        (target / "predictions.jsonl").write_text("")
    elif breakage in ("cut-off", "broken-lines", "repeated"):
        lines = [
            json.dumps({"index": i, **r}) for i, r in enumerate(files.read_jsonl(target / "predictions.jsonl")) if r
        ]
        if breakage == "cut-off":  # what a crash or a full disk leaves: n=3 where metrics.json says 4
            text = "\n".join(lines)[:-7]
        elif breakage == "broken-lines":
            text = "\n".join(["{oops", lines[1], lines[2][:10], lines[3]]) + "\n"
        else:  # n=6 where metrics.json says 4
            text = "\n".join(lines + lines[:2]) + "\n"
        (target / "predictions.jsonl").write_text(text)
    elif breakage == "word-for-number":
        meta = json.loads((target / "metrics.json").read_text())
        (target / "metrics.json").write_text(json.dumps({**meta, "rouge1": "high"}))
    with pytest.raises(UserError, match=re.escape(needle)):
        report.write_report([run_dir / "eval-base", target], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # every folder is read before anything is written
    one_line_error(run_cli(["report", str(target), "--out", str(tmp_path / "out")]), needle)


def test_two_recipes_of_one_model_are_told_apart_by_their_run_folder(tmp_path):
    write_eval(tmp_path / "default" / "eval", "SmolLM2", "QLoRA adapters", (exact, swapped, wrong, wrong))
    write_eval(tmp_path / "best" / "eval", "SmolLM2", "QLoRA adapters", (exact, exact, exact, swapped))
    write_eval(tmp_path / "base" / "eval-base", "SmolLM2", "base", (wrong, wrong, wrong, wrong))
    markdown = report.write_report([tmp_path / "base", tmp_path / "default", tmp_path / "best"], tmp_path / "out")
    assert "| SmolLM2 | base | 0.00 |" in markdown
    assert "| SmolLM2 (default) | QLoRA adapters | 50.00 |" in markdown
    assert "| SmolLM2 (best) | QLoRA adapters | 100.00 |" in markdown


def test_two_evaluations_in_one_run_are_told_apart_by_their_folder(tmp_path):
    write_eval(tmp_path / "run" / "eval", "SmolLM2", "QLoRA adapters", (exact, swapped, wrong, wrong))
    write_eval(tmp_path / "run" / "eval-100", "SmolLM2", "QLoRA adapters", (exact, exact, exact, swapped))
    markdown = report.write_report([tmp_path / "run"], tmp_path / "out")
    assert "| SmolLM2 (eval) | QLoRA adapters | 50.00 |" in markdown
    assert "| SmolLM2 (eval-100) | QLoRA adapters | 100.00 |" in markdown


def write_split(folder, split, refs, kind="base"):
    """An eval folder as eval writes it for data without ids: each id is the row's index."""
    folder.mkdir(parents=True)
    records = [
        {"index": i, "id": str(i), "dialogue": f"{split} dialogue {i}", "reference": r, "prediction": refs[0]}
        for i, r in enumerate(refs)
    ]
    files.write_jsonl(folder / "predictions.jsonl", records)
    preds = [refs[0]] * len(refs)
    files.write_json(folder / "metrics.json", {**rouge(preds, refs), "model": "m", "type": kind, "split": split})


def test_rows_of_two_splits_without_ids_do_not_pair_and_the_note_says_so(tmp_path):
    """Data without ids: test row 0 and validation row 0 both had the key "0:0", so the report paired
    four different dialogues ("4 rows in common", an interval and wins over nothing comparable)."""
    from samsum_qlora import report_page

    write_split(tmp_path / "test", "test", REFS)
    write_split(tmp_path / "validation", "validation", REFS[::-1], kind="API")
    markdown = report.write_report([tmp_path / "test", tmp_path / "validation"], tmp_path / "out")
    assert "did not score the same examples" in markdown
    evals = report.name_apart([report.load_scored(tmp_path / f) for f in ("test", "validation")])
    (pair,) = report_page.paired_comparisons(evals, report_page.example_rows(evals))
    assert pair["n"] == 0
    write_split(tmp_path / "test-again", "test", REFS, kind="API")  # the same split's rows still pair
    evals = [report.load_scored(tmp_path / f) for f in ("test", "test-again")]
    assert report_page.paired_comparisons(evals, report_page.example_rows(evals))[0]["n"] == 4


@pytest.mark.parametrize("key, value, shown", [("prediction", None, "null"), ("reference", 7, "int 7")])
def test_a_prediction_or_reference_that_is_not_text_is_refused_by_line(run_dir, tmp_path, key, value, shown):
    path = run_dir / "eval" / "predictions.jsonl"
    records = files.read_jsonl(path)
    records[2][key] = value  # scored as the text "None" before
    files.write_jsonl(path, [r for r in records if r])
    needle = f"{path} line 3: {key} is {shown}, not text; rerun its eval with --overwrite"
    one_line_error(run_cli(["report", str(run_dir / "eval"), "--out", str(tmp_path / "out")]), needle)
    assert not (tmp_path / "out").exists()


def test_a_model_name_with_a_bar_or_a_line_break_stays_in_its_cell(tmp_path):
    write_eval(tmp_path / "eval", "org/a|b\nc", "base", (exact, swapped, wrong, wrong))
    markdown = report.write_report([tmp_path / "eval"], tmp_path / "out")
    rows = [line for line in markdown.splitlines() if line.startswith("| org/a")]
    assert rows[0] == r"| org/a\|b c | base | 50.00 | 33.33 | 43.75 |"
    assert rows[1].startswith(r"| org/a\|b c | base | 4 | ") and len(rows) == 2


def test_the_chart_and_page_label_a_told_apart_row_with_one_pair_of_brackets(tmp_path):
    from samsum_qlora import report_page

    write_eval(tmp_path / "run" / "eval", "tiny-llama", "QLoRA adapters", (exact, swapped, wrong, wrong))
    write_eval(tmp_path / "run" / "eval-100", "tiny-llama", "QLoRA adapters", (exact, exact, exact, swapped))
    evals = report.name_apart([report.load_scored(f) for f in report.eval_dirs([tmp_path / "run"])])
    assert [report_page.label(e) for e in evals] == [
        "tiny-llama (eval, QLoRA adapters)",
        "tiny-llama (eval-100, QLoRA adapters)",
    ]
    assert report_page.short_labels(evals) == [report_page.label(e) for e in evals]


def test_a_byte_order_mark_an_editor_added_is_no_damage(run_dir, tmp_path):
    path = run_dir / "eval" / "predictions.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # read as "damaged at line 1" before
    assert TABLE.splitlines()[-1] in report.write_report([run_dir], tmp_path / "out")
