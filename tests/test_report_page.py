"""report.html: its data on the hand-made folders of test_report.py, whose ROUGE is known by hand,
and its escaping. The page in a real browser is tests/test_report_browser.py."""

import base64
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SMOKE_CONFIG, smoke_overrides
from test_cli import run_cli
from test_report import REFS, ROWS, write_eval

from samsum_qlora import chat, data, files, metrics, report_page
from samsum_qlora.commands import evaluate, report
from samsum_qlora.config import load_config
from samsum_qlora.predictor import Prediction

HOSTILE = "Eve: </script><script>alert(1)</script> <!-- & \u2028\u2029 <b>bold</b>"


@pytest.fixture
def run_dir(tmp_path):
    for name, (model, kind, answers) in ROWS.items():
        write_eval(tmp_path / "run" / name, model, kind, answers)
    return tmp_path / "run"


def scored(*folders):
    return report.name_apart([report.load_scored(f) for f in report.eval_dirs(list(folders))])


def test_per_row_scores_are_rouge_per_example(run_dir):
    evals = scored(run_dir)  # base, API, QLoRA
    rows = report_page.example_rows(evals)
    assert [r["id"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert [r["reference"] for r in rows] == REFS
    for k, ev in enumerate(evals):
        records = files.read_jsonl(ev.folder / "predictions.jsonl")
        expected = metrics.rouge_per_example([r["prediction"] for r in records], [r["reference"] for r in records])
        assert [r["out"][k]["scores"] for r in rows] == [list(s) for s in zip(*(expected[m] for m, _ in report.SHOWN))]
        assert [r["out"][k]["prediction"] for r in rows] == [r["prediction"] for r in records]
    # by hand: the base model answers t1 with its last two words swapped
    assert rows[1]["out"][0]["scores"] == pytest.approx([1, 1 / 3, 3 / 4])
    assert rows[1]["out"][0]["ended"] is None and rows[1]["dialogue"] is None  # older records: not recorded


def test_paired_differences_and_wins_ties_losses_by_hand(run_dir):
    # per-row ROUGE-L: base (1, 3/4, 0, 0), API (1, 1, 3/4, 0), QLoRA (1, 1, 1, 3/4)
    evals = scored(run_dir)
    pairs = report_page.paired_comparisons(evals, report_page.example_rows(evals))
    got = {(p["a"], p["b"]): p for p in pairs}
    assert list(got) == [(1, 0), (2, 0), (2, 1)]  # later minus earlier: API - base, QLoRA - base, QLoRA - API
    assert [(p["n"], p["wins"], p["ties"], p["losses"]) for p in pairs] == [(4, 2, 2, 0), (4, 3, 1, 0), (4, 2, 2, 0)]
    means = {pair: [p["diff"][m]["mean"] for m in ("rouge1", "rouge2", "rougeL")] for pair, p in got.items()}
    assert means[(1, 0)] == pytest.approx([1 / 4, 1 / 4, 1 / 4])
    assert means[(2, 0)] == pytest.approx([1 / 2, 1 / 2, 1 / 2])
    assert means[(2, 1)] == pytest.approx([1 / 4, 1 / 4, 1 / 4])
    qlora, base = evals[2], evals[0]
    for metric in ("rouge1", "rouge2", "rougeL"):  # the interval is metrics.paired_difference's
        assert got[(2, 0)]["diff"][metric] == metrics.paired_difference(
            qlora.per_example[metric], base.per_example[metric]
        )


def test_pairs_are_tuned_minus_base_whatever_the_order_given(run_dir):
    evals = scored(run_dir / "eval", run_dir / "eval-base")  # QLoRA given first: still QLoRA - base
    (pair,) = report_page.paired_comparisons(evals, report_page.example_rows(evals))
    assert (pair["a"], pair["b"], pair["wins"], pair["ties"], pair["losses"]) == (0, 1, 3, 1, 0)
    assert pair["diff"]["rougeL"]["mean"] == pytest.approx(1 / 2)
    # neither is base: the later minus the earlier, so a worse later evaluation loses
    api, qlora = scored(run_dir / "eval", run_dir / "eval-api-gpt-4o-mini")
    assert report_page.oriented([api, qlora], 1, 0) == (1, 0)


def test_the_better_of_a_pair_is_marked_only_past_the_interval():
    ahead, behind, unclear = (
        {"rouge1": {"mean": m, "low": lo, "high": hi}}
        for m, lo, hi in ((0.1, 0.02, 0.2), (-0.1, -0.2, -0.01), (0.01, -0.02, 0.05))
    )
    assert [report_page.better_of(d) for d in (ahead, behind, unclear, {})] == ["a", "b", None, None]


def test_the_page_shows_ended_shares_what_differs_and_the_better_model(tmp_path):
    def recs(ended):
        return [
            {"index": i, "id": f"t{i}", "dialogue": "d", "reference": REFS[i], "prediction": p, "ended": e}
            for i, (p, e) in enumerate(zip(ended[0], ended[1]))
        ]

    beams = {"eval": {"num_beams": 4, "length_penalty": 1.0, "do_sample": False}}
    for name, kind, config, (predictions, ended) in (
        ("tuned", "QLoRA adapters", beams, (REFS, [True, True, True, False])),
        ("base", "base", {"eval": {"num_beams": 1}}, (["x"] * 4, [False, False, True, False])),
    ):
        write_records(tmp_path / name, "m", kind, recs((predictions, ended)))
        meta = files.read_json(tmp_path / name / "metrics.json") | {"split": "test", "config": config}
        files.write_json(tmp_path / name / "metrics.json", meta)
    evals = scored(tmp_path / "base", tmp_path / "tuned")
    (pair,) = report_page.paired_comparisons(evals, report_page.example_rows(evals))
    assert (evals[pair["a"]].kind, pair["ended"], pair["better"]) == ("QLoRA adapters", [0.75, 0.25], "a")
    page = report_page.render_page(evals, [report.intervals(e) for e in evals], b"png")
    assert "<th>decoding</th>" in page and "<td>num_beams=4</td>" in page and "<td>greedy</td>" in page
    assert "<th>split</th>" not in page  # the same for both: not a difference
    assert '<td class="num">75%</td>' in page and '<td class="num">75% / 25%</td>' in page
    assert page.count('<span class="better"') == 2  # the note's sample and the tuned model's mark
    assert "@media print" in page and "@media (max-width: 700px)" in page


def records(*rows):
    """Records as eval writes them: (index, id, prediction) against REFS[index]."""
    return [
        {"index": i, "id": ident, "dialogue": f"dialogue {i}", "reference": REFS[i], "prediction": p, "ended": True}
        for i, ident, p in rows
    ]


def write_records(folder, model, kind, recs):
    folder.mkdir(parents=True)
    files.write_jsonl(folder / "predictions.jsonl", recs)
    files.write_json(folder / "metrics.json", {"model": model, "type": kind})


def test_rows_match_by_index_so_repeated_ids_stay_apart(tmp_path):
    write_records(tmp_path / "a", "m", "base", records((0, "x", REFS[0]), (1, "x", "red"), (2, "y", REFS[2])))
    # another order, a row the first lacks, one it skipped; id "x" twice, told apart by the index
    write_records(tmp_path / "b", "m", "API", records((3, "z", REFS[3]), (1, "x", REFS[1]), (0, "x", "red")))
    evals = scored(tmp_path / "a", tmp_path / "b")
    rows = report_page.example_rows(evals)
    assert [(r["index"], r["id"]) for r in rows] == [(0, "x"), (1, "x"), (2, "y"), (3, "z")]
    assert [[o and o["scores"][2] for o in r["out"]] for r in rows] == [[1, 0], [0, 1], [1, None], [None, 1]]
    (pair,) = report_page.paired_comparisons(evals, rows)
    assert (pair["n"], pair["wins"], pair["ties"], pair["losses"]) == (2, 1, 0, 1)


def test_rows_of_another_split_never_pair_up(tmp_path):
    write_records(tmp_path / "a", "m", "base", records((0, "test-1", REFS[0])))
    write_records(tmp_path / "b", "m", "API", records((0, "val-1", REFS[0])))
    evals = scored(tmp_path / "a", tmp_path / "b")
    (pair,) = report_page.paired_comparisons(evals, report_page.example_rows(evals))
    assert pair["n"] == 0 and pair["diff"] == {}
    page = report_page.render_page(evals, [report.intervals(e) for e in evals], b"png")
    assert "no rows in common" in page and "did not score the same examples" in page


def test_without_an_index_rows_match_by_id_numbered_on_repeats(tmp_path):
    plain = [{"id": i, "reference": REFS[0], "prediction": REFS[0]} for i in ("p", "q", "p")]
    write_records(tmp_path / "a", "m", "base", plain)
    write_records(tmp_path / "b", "m", "API", plain[:2])
    assert report_page.row_keys(scored(tmp_path / "a", tmp_path / "b")) == [["p", "q", "p#2"], ["p", "q"]]


def test_embedded_json_cannot_close_its_script_tag():
    payload = {"dialogue": HOSTILE, "n": [1, 0.5]}
    text = report_page.script_json(payload)
    assert json.loads(text) == payload  # still the same JSON
    for raw in ("<", ">", "&", "\u2028", "\u2029"):
        assert raw not in text
    assert "\\u003c/script\\u003e" in text and "\\u0026" in text and "\\u2028\\u2029" in text


def test_the_page_holds_data_only_as_escaped_json(run_dir, tmp_path):
    base = run_dir / "eval-base"
    recs = files.read_jsonl(base / "predictions.jsonl")
    files.write_jsonl(base / "predictions.jsonl", [recs[0] | {"dialogue": HOSTILE, "prediction": HOSTILE}, *recs[1:]])
    meta = files.read_json(base / "metrics.json")
    files.write_json(base / "metrics.json", meta | {"model": "<b>model</b>"})
    report.write_report([run_dir], tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<script") == 2 and page.count("</script>") == 2  # ours: the data block and the code
    assert "alert(1)" in page and "<b>" not in page and "&lt;b&gt;model&lt;/b&gt;" in page
    blob = page.split('<script type="application/json" id="report-data">')[1].split("</script>")[0]
    data = json.loads(blob)
    assert data["rows"][0]["dialogue"] == HOSTILE and data["rows"][0]["out"][0]["prediction"] == HOSTILE
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_the_page_is_self_contained(run_dir, tmp_path):
    report.write_report([run_dir], tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page  # the chart, inline
    for remote in ("http://", "https://", "//cdn", "<link", 'src="http'):
        assert remote not in page
    # the table's numbers: report.md's, x100 with 2 decimals
    for value in ("50.00", "33.33", "43.75", "75.00", "58.33", "68.75", "100.00", "83.33", "93.75"):
        assert f'<span class="mean">{value}</span>' in page


def test_older_predictions_without_dialogue_still_render(run_dir, tmp_path):
    # one folder written by this eval (with dialogues), the others older (without)
    recs = files.read_jsonl(run_dir / "eval" / "predictions.jsonl")
    files.write_jsonl(run_dir / "eval" / "predictions.jsonl", [r | {"dialogue": f"A: {r['id']}"} for r in recs[:2]])
    evals = scored(run_dir)
    data = report_page.page_data(evals)
    assert [r["dialogue"] for r in data["rows"]] == ["A: t0", "A: t1", None, None]
    page = report_page.render_page(evals, [report.intervals(e) for e in evals], b"png")
    assert "(dialogue not recorded)" in page


def test_no_html_writes_no_page_and_says_what_it_wrote(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(["report", str(run_dir), "--no-html", "--out", "plain"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["report.md", "report.png"]
    assert result.stderr.strip() == "wrote plain/report.md and plain/report.png"
    result = run_cli(["report", str(run_dir), "--out", "full"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["report.html", "report.md", "report.png"]
    assert result.stderr.strip() == "wrote full/report.md, full/report.png and full/report.html"
    assert (tmp_path / "full" / "report.md").read_text() == (tmp_path / "plain" / "report.md").read_text()


def test_eval_records_each_dialogue_cleaned(tmp_path):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    plan = evaluate.plan_eval(cfg, base_only=True, limit=3, output_dir=str(tmp_path / "e"))
    evaluate.evaluate_model(cfg, plan, predict=lambda rows, save: save([0, 1, 2], [Prediction("s", True)] * 3))
    saved = files.read_jsonl(plan.output_dir / "predictions.jsonl")
    rows = data.load_rows(cfg.data.source, "test")[:3]
    assert [r["dialogue"] for r in saved] == [chat.clean(r["dialogue"]) for r in rows]
    assert [list(r) for r in saved] == [["index", "id", "dialogue", "reference", "prediction", "ended"]] * 3


def test_jsonl_lines_end_at_newline_only(tmp_path):
    recs = [{"dialogue": "A: hi\u2028B: yo\u0085C: \x0c"}, {"dialogue": "plain"}]
    files.write_jsonl(tmp_path / "p.jsonl", recs)
    assert files.read_jsonl(tmp_path / "p.jsonl") == recs


def test_short_labels_drop_folders_unless_two_would_meet(tmp_path):
    write_records(tmp_path / "a", "/models/tiny-llama", "base", records((0, "x", REFS[0])))
    write_records(tmp_path / "b", "meta-llama/Llama-3.2-1B-Instruct", "API", records((0, "x", REFS[0])))
    write_records(tmp_path / "c", "/other/tiny-llama", "base", records((0, "x", REFS[0])))
    two = scored(tmp_path / "a", tmp_path / "b")
    assert report_page.short_labels(two) == ["tiny-llama (base)", "Llama-3.2-1B-Instruct (API)"]
    three = scored(tmp_path / "a", tmp_path / "b", tmp_path / "c")
    assert report_page.short_labels(three) == [report_page.label(e) for e in three]
    assert report_page.label(three[2]) == "/other/tiny-llama (base)"


def test_the_page_counts_one_evaluation_in_the_singular(tmp_path):
    write_records(tmp_path / "a", "m", "base", records((0, "x", REFS[0])))
    evals = scored(tmp_path / "a")
    page = report_page.render_page(evals, [report.intervals(e) for e in evals], b"png")
    assert "<p>1 evaluation, 1 dialogue · written by" in page  # "1 evaluations, 1 dialogues"


PAGE = ROOT / "samsum_qlora" / "assets" / "page"
PAGE_FILES = ("page.html", "page.css", "page.js")


def test_the_page_is_its_files_filled_in(run_dir):
    evals = scored(run_dir)
    page = report_page.render_page(evals, [report.intervals(e) for e in evals], b"png")
    skeleton, css, script = ((PAGE / name).read_text() for name in PAGE_FILES)
    assert f"<style>\n{css}</style>" in page and f"<script>\n{script}</script>" in page
    head, tail = skeleton.split("$css")[0], skeleton.split("$script")[1]
    assert page.startswith(head) and page.endswith(tail)


@pytest.mark.slow
def test_a_built_wheel_carries_the_page_files(tmp_path):
    """The page's files are package data: read from the wheel itself, imported as a zip, they are whole."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "samsum_qlora", src / "samsum_qlora", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    build = ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)]
    subprocess.run([sys.executable, "-m", "pip", *build], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("samsum_qlora-*.whl")
    code = "import sys, samsum_qlora.report_page as p; print(p.__file__); "
    code += "print(*map(p.page_file, sys.argv[1:]), sep='')"
    env = {**os.environ, "PYTHONPATH": str(wheel)}
    result = subprocess.run(
        [sys.executable, "-c", code, *PAGE_FILES], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    where, text = result.stdout.split("\n", 1)
    assert where == str(wheel / "samsum_qlora" / "report_page.py")  # the wheel's own, not this checkout's
    assert text == "".join((PAGE / name).read_text() for name in PAGE_FILES) + "\n"
