"""The command line as a user meets it: instant --help, one-line errors with exit code 2."""

import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import ROOT, set_args, smoke_overrides

from samsum_qlora.commands.cli import main


def test_help_is_instant_and_imports_no_torch():
    code = "import sys; from samsum_qlora.commands.cli import main; assert 'torch' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout == "ok\n"
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "preprocess"):
        assert command in result.output


def test_top_level_help_lists_the_commands_in_the_order_they_are_used_uncut():
    """It listed them alphabetically (bench first), cut every description at "...", in one line."""
    lines = CliRunner().invoke(main, ["--help"], terminal_width=80).output.splitlines()
    commands = lines[lines.index("Commands:") + 1 :]
    names = [line.split()[0] for line in commands if line.startswith("  ") and not line.startswith("   ")]
    assert names == ["train", "eval", "summarize", "report", "merge", "export", "config", "preprocess", "bench"]
    assert not [line for line in commands if line.rstrip().endswith("...")]
    assert all(main.commands[n].get_short_help_str(10).endswith(".") for n in names)  # its own short help, whole
    usage = lines[: lines.index("Options:")]
    assert [line.split()[1] for line in usage if line.startswith("    samsum-qlora ")] == names[:4]


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "samsum_qlora", "train", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "--overwrite" in out.stdout


def runner():
    try:  # click < 8.2 mixes stderr into output unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def run_cli(args):
    return runner().invoke(main, args)


def one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"train.learning_rate": "abc"}, "train.learning_rate must be a number, got 'abc'"),
        ({"train.learnng_rate": "1"}, "did you mean 'train.learning_rate'"),
        ({"data.source": "/nonexistent/samsum"}, "data.source /nonexistent/samsum does not exist"),
        ({"data.train_split": "nope"}, "no 'nope' split"),
        ({"train.fp16": "true"}, "needs a CUDA GPU"),
        ({"train.cuda_graphs": "true"}, "train.cuda_graphs=true needs a CUDA GPU; use --set train.cuda_graphs=auto"),
        ({"train.cuda_graphs": "maybe"}, "train.cuda_graphs must be true, false or auto, got 'maybe'"),
        ({"model.name": "/nonexistent/model"}, "model /nonexistent/model does not exist"),
    ],
)
def test_train_bad_input(tmp_path, extra, needle):
    result = run_cli(["train", *set_args(smoke_overrides(tmp_path, **extra))])
    one_line_error(result, needle)
    assert not (tmp_path / "run" / "lora_adapters").exists()


def test_config_that_is_not_yaml(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train: [1,\n")
    one_line_error(run_cli(["train", "--config", str(bad)]), "is not valid YAML")


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_cli(["train", *set_args(smoke_overrides(tmp_path, **{"train.output_dir": str(blocker / "sub")}))])
    one_line_error(result, "cannot create output directory")


def test_eval_without_adapters_and_bad_split(tmp_path):
    one_line_error(run_cli(["eval", *set_args(smoke_overrides(tmp_path))]), "adapters not found")
    result = run_cli(["eval", "--base-only", "--split", "nope", *set_args(smoke_overrides(tmp_path))])
    one_line_error(result, "no 'nope' split")


def test_preprocess_writes_dataset_and_shows_marked_tokens(tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "tok"
    result = run_cli(
        ["preprocess", *set_args(smoke_overrides(tmp_path)), "--split", "validation", "--out", str(out), "--show", "1"]
    )
    assert result.exit_code == 0, result.output
    ds = load_from_disk(str(out))
    assert len(ds) == 12 and {"input_ids", "labels"} <= set(ds.column_names)
    assert "⟦" in result.output and result.output.count("<|eot_id|>⟧") == 1
    one_line_error(run_cli(["preprocess", *set_args(smoke_overrides(tmp_path)), "--out", str(out)]), "not empty")


def test_train_then_eval_through_the_cli(tmp_path):
    args = set_args(smoke_overrides(tmp_path, **{"train.max_steps": 5}))
    assert run_cli(["train", *args]).exit_code == 0
    result = run_cli(["eval", *args, "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert "| Model | Type | ROUGE-1 | ROUGE-2 | ROUGE-L |" in result.output
    assert (tmp_path / "run" / "eval" / "metrics.json").is_file()


def test_preprocess_checks_out_before_tokenising(tmp_path, monkeypatch):
    from samsum_qlora import modeling

    (tmp_path / "blocker").write_text("")
    monkeypatch.setattr(modeling, "chat_format", lambda cfg: pytest.fail("tokenised before checking --out"))
    result = run_cli(["preprocess", *set_args(smoke_overrides(tmp_path)), "--out", str(tmp_path / "blocker" / "tok")])
    one_line_error(result, "cannot create " + str(tmp_path / "blocker" / "tok") + ": " + str(tmp_path / "blocker"))
