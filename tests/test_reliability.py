"""What a careless or hostile user met: stale results, lost runs, tracebacks, noise. Each case
asserts the exit code, the one-line message, and what is (or is not) on disk afterwards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE_DATA, SMOKE_CONFIG, TINY_MODEL, fill, set_args, smoke_overrides
from test_cli import one_line_error, run_cli

from samsum_qlora import checkpoints


def cli_env():
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "disabled",
    }


def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "samsum_qlora", *args],
        env=cli_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)


def last_line_error(result, needle):
    """Exit code 2 and the error as the last line, after whatever progress the run had shown."""
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last and "Traceback" not in result.stderr, result.stderr


def nothing_published(run: Path) -> bool:
    return not (run / "lora_adapters").exists() and not list(run.glob(".*staging*"))


# --- silent wrong results ------------------------------------------------------------------------


def test_eval_after_retraining_never_reports_the_old_adapters(tmp_path):
    args = set_args(smoke_overrides(tmp_path, **{"train.max_steps": 5}))
    assert run_cli(["train", *args]).exit_code == 0
    first = run_cli(["eval", *args, "--limit", "3"])
    assert first.exit_code == 0
    metrics = tmp_path / "run" / "eval" / "metrics.json"
    before = metrics.read_bytes()
    retrain = set_args(smoke_overrides(tmp_path, **{"train.max_steps": 5, "train.learning_rate": 0.03}))
    assert run_cli(["train", *retrain, "--overwrite"]).exit_code == 0
    again = run_cli(["eval", *retrain, "--limit", "3"])
    one_line_error(again, "holds another evaluation (the adapters changed); pass --overwrite")
    assert metrics.read_bytes() == before  # untouched, and not reported as the new adapters' score
    assert run_cli(["eval", *retrain, "--limit", "3", "--overwrite"]).exit_code == 0
    assert json.loads(metrics.read_text())["config"]["train"]["learning_rate"] == 0.03


def test_duplicate_and_null_ids_are_kept_apart_by_position(tmp_path):
    from samsum_qlora.metrics import rouge

    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (SAMPLE_DATA / "test.jsonl").read_text().splitlines()]
    lines = [{**r, "id": "same" if i % 2 else None} for i, r in enumerate(rows)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = set_args(smoke_overrides(tmp_path, **{"data.source": str(data), "eval.max_new_tokens": 8}))
    assert run_cli(["eval", *args, "--base-only"]).exit_code == 0
    out = tmp_path / "run" / "eval-base"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in preds] == list(range(12))
    assert [p["reference"] for p in preds] == [r["summary"].strip() for r in rows]
    assert [p["id"] for p in preds][:3] == ["0", "same", "2"]  # a null id becomes the row number
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_examples"] == 12
    assert saved["rouge1"] == pytest.approx(
        rouge([p["prediction"] for p in preds], [p["reference"] for p in preds])["rouge1"]
    )


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    """Real processes: a long train and a long eval hold their folders; a second train and a
    second eval into them each say so, in one line, and write nothing; the holders carry on."""
    train_args = set_args(smoke_overrides(tmp_path, **{"train.max_steps": 100_000, "train.save_steps": 100_000}))
    long_model = tmp_path / "long-model"  # the tiny model with room for long summaries (RoPE has no end)
    shutil.copytree(TINY_MODEL, long_model)
    config = json.loads((long_model / "config.json").read_text())
    (long_model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    eval_args = set_args(
        smoke_overrides(
            tmp_path, **{"eval.max_new_tokens": 4000, "data.max_length": 4096, "model.name": str(long_model)}
        )
    )
    eval_args += ["--base-only"]
    run, evals = tmp_path / "run", tmp_path / "run" / "eval-base"
    holders = {"train": (spawn(["train", *train_args]), run, train_args),
               "eval": (spawn(["eval", *eval_args]), evals, eval_args)}  # fmt: skip
    try:
        for proc, folder, _ in holders.values():
            wait_for(folder / ".samsum-qlora.lock", proc)
        time.sleep(1.0)  # the pid is written right after the lock is taken
        for command, (proc, folder, args) in holders.items():
            second = subprocess.run([sys.executable, "-m", "samsum_qlora", command, *args], env=cli_env(),
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
            assert second.returncode == 2, second.stderr
            lines = [line for line in second.stderr.splitlines() if line.strip()]
            assert lines == [f"error: {folder} is in use by another samsum-qlora {command} (pid {proc.pid}); "
                             "wait for it to finish or choose another folder"]  # fmt: skip
            assert proc.poll() is None  # the holder goes on
        assert not (run / "lora_adapters").exists() and not (evals / "metrics.json").exists()
    finally:
        for proc, _, _ in holders.values():
            proc.kill()
            proc.communicate()


def test_a_diverging_run_stops_and_publishes_nothing(tmp_path):
    result = run_cli(["train", *set_args(smoke_overrides(tmp_path, **{"train.learning_rate": 1e30}))])
    last_line_error(
        result,
        "error: training diverged at step 2: the loss is nan; lower train.learning_rate "
        "(now 1e+30); nothing was published",
    )
    assert nothing_published(tmp_path / "run")


def test_empty_predictions_are_counted_and_warned_about(tmp_path, capsys):
    from conftest import SMOKE_CONFIG

    from samsum_qlora.commands import evaluate
    from samsum_qlora.config import load_config
    from samsum_qlora.predictor import Prediction

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    plan = evaluate.plan_eval(cfg, base_only=True, limit=4)
    metrics = evaluate.evaluate_model(
        cfg,
        plan,
        predict=lambda rows, save: save(
            [0, 1, 2, 3],
            [Prediction("", True), Prediction("Bo is late.", True), Prediction(" ", False), Prediction("x", False)],
        ),
    )
    assert metrics["empty_predictions"] == 2 and metrics["ended_share"] == 0.5
    out = capsys.readouterr().out
    assert "warning: 2 of 4 predictions are empty" in out
    # the embedded tiny model's summaries rarely end (random weights): a note says so, not a warning
    assert "note: 2 of 4 summaries ended" in out and "warning: only" not in out


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"train.output_dir": ""}, "train.output_dir is empty"),
        ({"data.max_train_samples": 0}, "data.max_train_samples must be at least 1"),
        ({"data.max_train_samples": -5}, "data.max_train_samples must be at least 1"),
    ],
)
def test_settings_that_silently_meant_something_else(tmp_path, extra, needle):
    one_line_error(run_cli(["train", *set_args(smoke_overrides(tmp_path, **extra))]), needle)
    assert not list(Path.cwd().glob("lora_adapters")) and nothing_published(tmp_path / "run")


def signalled(out: Path, sig: int, extra_args=()) -> subprocess.CompletedProcess:
    """Start training, send `sig` once the first complete checkpoint exists."""
    args = set_args(smoke_overrides(out, **{"train.max_steps": 60, "train.save_steps": 10, "train.logging_steps": 10}))
    proc = spawn(["train", *args, *extra_args])
    wait_for(out / "run" / "checkpoints" / "checkpoint-10" / checkpoints.MANIFEST, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes(tmp_path):
    stopped = signalled(tmp_path, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert "SIGINT received: saving a checkpoint after this step" in stopped.stdout
    assert stopped.stderr.strip().splitlines()[-1].startswith("stopped: stopped by SIGINT at step")
    saved = checkpoints.newest_complete(tmp_path / "run" / "checkpoints")
    assert saved is not None and int(saved.name.split("-")[1]) > 10  # the step it was at, not the last save
    assert nothing_published(tmp_path / "run")
    args = set_args(
        smoke_overrides(tmp_path, **{"train.max_steps": 60, "train.save_steps": 10, "train.logging_steps": 10})
    )
    rerun = run_cli(["train", *args])
    assert rerun.exit_code == 0 and f"resuming from {saved}" in rerun.output


def test_resuming_with_a_changed_learning_rate_is_refused_naming_it(tmp_path):
    from conftest import SMOKE_CONFIG

    from samsum_qlora.commands import train
    from samsum_qlora.config import load_config

    train.train_adapters(
        load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"train.max_steps": 20, "train.save_steps": 10}))
    )
    (tmp_path / "run" / "lora_adapters").rename(tmp_path / "run" / "kept")  # as if cut off before publishing
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-20")  # and before its last checkpoint
    args = set_args(
        smoke_overrides(tmp_path, **{"train.max_steps": 20, "train.save_steps": 10, "train.learning_rate": 0.03})
    )
    one_line_error(run_cli(["train", *args]), "train.learning_rate: 0.01 -> 0.03")
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-10").is_dir()  # nothing was thrown away
    started_over = run_cli(["train", *args, "--overwrite"])  # --overwrite: start again with the new rate
    assert started_over.exit_code == 0 and "resuming from" not in started_over.output


# --- tracebacks that are now one line and exit code 2 ---------------------------------------------


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("train.learning_rate", "-1", "train.learning_rate must be a positive finite number, got -1"),
        ("train.learning_rate", "nan", "train.learning_rate must be a positive finite number, got nan"),
        ("train.learning_rate", "inf", "train.learning_rate must be a positive finite number, got inf"),
        ("train.optim", "sgdx", "train.optim 'sgdx' is not a transformers OptimizerNames; did you mean sgd"),
        ("train.lr_scheduler_type", "bogus", "train.lr_scheduler_type 'bogus' is not a transformers SchedulerType"),
        ("train.warmup_steps", "-1", "train.warmup_steps must be >= 0"),
        ("lora.lora_dropout", "1.5", "lora.lora_dropout must be in [0, 1), got 1.5"),
        ("model.attn_implementation", "magic", "model.attn_implementation must be one of eager, sdpa"),
        ("lora.target_modules", "[nonexistent_proj]", "lora.target_modules: "),
        ("eval.batch_size", "0", "eval.batch_size must be at least 1, got 0"),
        ("eval.batch_size", "-3", "eval.batch_size must be at least 1, got -3"),
        ("eval.max_new_tokens", "0", "eval.max_new_tokens must be at least 1, got 0"),
    ],
)
def test_values_the_libraries_would_reject_are_refused_up_front(tmp_path, key, value, needle):
    one_line_error(run_cli(["train", *set_args(smoke_overrides(tmp_path, **{key: value}))]), needle)
    assert nothing_published(tmp_path / "run")


def test_unknown_lora_target_names_the_models_projections(tmp_path):
    result = run_cli(["train", *set_args(smoke_overrides(tmp_path, **{"lora.target_modules": "[nonexistent_proj]"}))])
    one_line_error(result, "has no module nonexistent_proj (its projections: down_proj, gate_proj, k_proj")


def test_a_config_file_that_is_not_text(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(bytes(range(256)) * 4)
    one_line_error(run_cli(["train", "--config", str(bad)]), "is not a text file: a config is UTF-8 YAML")


@pytest.mark.parametrize(
    "case, needle",
    [
        ("empty-folder", "holds no model: no config.json in it"),
        ("truncated", "could not load the weights of"),
        ("not-causal", "is a vit model, not a causal language model"),
        ("small-embedding", "the model embeds only"),
    ],
)
def test_bad_models(tmp_path, case, needle):
    model = tmp_path / "model"
    if case == "empty-folder":
        model.mkdir()
    else:
        shutil.copytree(TINY_MODEL, model)
    if case == "truncated":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if case == "not-causal":
        (model / "config.json").write_text(
            json.dumps({"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2})
        )
    if case == "small-embedding":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model)
        config.vocab_size = 300  # fewer rows than the tokenizer has tokens
        AutoModelForCausalLM.from_config(config).save_pretrained(model)
    result = run_cli(["train", *set_args(smoke_overrides(tmp_path, **{"model.name": str(model)}))])
    last_line_error(result, needle)
    assert nothing_published(tmp_path / "run")


def test_a_truncated_model_in_bench_model_dir(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli(["bench", *set_args(smoke_overrides(tmp_path)), "--model-dir", str(model), "--steps", "1"])
    last_line_error(result, f"could not load the weights of {model}")


def test_full_disk_while_saving_a_checkpoint_and_the_adapters(tmp_path, monkeypatch):
    import errno

    import torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)  # the Trainer's optimizer and RNG states
    args = set_args(smoke_overrides(tmp_path, **{"train.max_steps": 4, "train.save_steps": 2}))
    last_line_error(run_cli(["train", *args]), "no space left on the device of")
    assert nothing_published(tmp_path / "run")
    monkeypatch.undo()

    from samsum_qlora import files

    monkeypatch.setattr(files, "write_text", full)  # config.yaml, run.json, train_metrics.json cannot be written
    result = run_cli(["train", *set_args(smoke_overrides(tmp_path / "b", **{"train.max_steps": 2}))])
    last_line_error(result, "while saving the adapters; free some space, then rerun the same command")
    assert nothing_published(tmp_path / "b" / "run")
    assert not list((tmp_path / "b" / "run").glob("*.json")) and not list((tmp_path / "b" / "run").glob(".*pending"))


# --- full disks, crowded folders, signals ---------------------------------------------------------


def enospc(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def report_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())} if out.is_dir() else {}


@pytest.mark.parametrize("disk_full", ["tmpfs", "injected"])
def test_report_on_a_full_disk_replaces_all_three_files_or_none(tmp_path, request, monkeypatch, disk_full):
    from test_report import ROWS, write_eval

    from samsum_qlora import files

    for name, (model, kind, answers) in ROWS.items():
        write_eval(tmp_path / "run" / name, model, kind, answers)
    disk = request.getfixturevalue("small_disk") if disk_full == "tmpfs" else tmp_path
    out = disk / "report"
    assert run_cli(["report", str(tmp_path / "run" / "eval-base"), "--out", str(out)]).exit_code == 0
    old = report_files(out)
    assert set(old) == {"report.md", "report.png", "report.html"}
    if disk_full == "tmpfs":
        fill(disk)
    else:
        real = files.write_bytes
        monkeypatch.setattr(
            files, "write_bytes", lambda p, d: enospc() if p.name.endswith(".png.pending") else real(p, d)
        )
    for folder in (out, disk / "empty-report"):
        result = run_cli(["report", str(tmp_path / "run"), "--out", str(folder)])
        one_line_error(result, f"no space left on the device of {folder} while writing the report")
    assert report_files(out) == old  # the old report whole, no new report.md beside it
    assert report_files(disk / "empty-report") == {}


def test_eval_on_a_full_disk_keeps_whole_predictions_and_resumes(tmp_path, small_disk):
    args = [*set_args(smoke_overrides(tmp_path, **{"eval.batch_size": 4, "eval.max_new_tokens": 8})), "--base-only"]
    args += ["--output-dir", str(small_disk / "eval")]
    fill(small_disk)
    room = 3 * 4096  # the lock, what the folder scores and one page of predictions: a batch or two
    os.truncate(small_disk / "filler", (small_disk / "filler").stat().st_size - room)
    full = run_cli(["eval", *args])
    last_line_error(full, "while saving predictions; free some space, then rerun the same command: it resumes")
    lines = (small_disk / "eval" / "predictions.partial.jsonl").read_text().split("\n")
    assert lines[-1] == "" and len(lines[:-1]) % 4 == 0 and lines[:-1]  # whole batches, no record cut
    assert len({json.loads(line)["index"] for line in lines[:-1]}) == len(lines) - 1
    (small_disk / "filler").unlink()
    rerun = run_cli(["eval", *args])
    assert rerun.exit_code == 0 and f"resuming: {len(lines) - 1} predictions" in rerun.output
    assert json.loads((small_disk / "eval" / "metrics.json").read_text())["n_examples"] == 12


@pytest.mark.parametrize("left_behind", ["", "dead pid"])
def test_a_refusal_names_the_live_holder_even_before_it_wrote_its_pid(tmp_path, left_behind):
    """The winner takes the claim, then writes its pid over what was there (nothing, or the pid of a
    run killed earlier): a loser reading in between waits for the live pid."""
    import fcntl
    import threading

    from samsum_qlora import files
    from samsum_qlora.errors import UserError

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".samsum-qlora.lock"
    lock.write_text(dead.stdout if left_behind else "")
    winner = os.open(lock, os.O_RDWR)
    fcntl.flock(winner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the claim taken, its pid not yet written
    late = threading.Timer(0.3, lambda: os.pwrite(winner, f"{os.getpid()}\n".encode(), 0))
    late.start()
    try:
        with pytest.raises(UserError, match=rf"in use by another samsum-qlora eval \(pid {os.getpid()}\)"):
            with files.hold(lock, "eval"):
                pass
    finally:
        late.join()
        os.close(winner)


def default_sigint() -> None:
    """In the child: Ctrl-C's default action, though a background job or a runner may have the
    tests ignoring it (an ignored signal stays ignored across exec, and Python then never raises
    KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def hooked(hook: str, args: list[str], **env) -> subprocess.CompletedProcess:
    """The CLI in a child process that first runs `hook`: Python that wraps a function so that it
    acts (sends a signal) at a chosen moment of the command."""
    code = f"import os, signal, sys\n{hook}\nfrom samsum_qlora.commands.cli import main\nmain()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**cli_env(), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=default_sigint,
    )


def signal_when_called(module: str, name: str, sig: str) -> str:
    """A hook: `module.name` (a function, or a class's method: "Class.method") sends `sig` to its
    own process, then does what it did."""
    owner, _, attr = f"m.{name}".rpartition(".")
    return (
        f"import {module} as m\nreal = {owner}.{attr}\n"
        f"def hooked(*a, **k):\n    os.kill(os.getpid(), signal.{sig})\n    return real(*a, **k)\n"
        f"{owner}.{attr} = hooked"
    )


@pytest.fixture(scope="module")
def trained_adapters(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    assert run_cli(["train", *set_args(smoke_overrides(out, **{"train.max_steps": 2}))]).exit_code == 0
    return out / "run" / "lora_adapters"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
@pytest.mark.parametrize("command", ["merge", "preprocess", "report", "bench", "summarize"])
def test_every_command_stops_on_a_signal_with_one_line_and_nothing_half_written(
    tmp_path, trained_adapters, command, sig, code
):
    from test_report import ROWS, write_eval

    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    if command == "merge":  # while the merged model is being staged
        args = ["merge", "--adapters", str(trained_adapters), "--out", str(out)]
        hook, kept = signal_when_called("samsum_qlora.files", "write_json", sig), "nothing was written"
    elif command == "preprocess":
        args = ["preprocess", *set_args(smoke_overrides(tmp_path)), "--out", str(out)]
        hook, kept = signal_when_called("datasets", "Dataset.save_to_disk", sig), "nothing was written"
    elif command == "report":
        for name, (model, kind, answers) in ROWS.items():
            write_eval(tmp_path / "run" / name, model, kind, answers)
        args = ["report", str(tmp_path / "run"), "--out", str(out)]
        hook, kept = (
            signal_when_called("samsum_qlora.files", "write_all_or_none", sig),
            "the report files are all the old ones or all new",
        )
    elif command == "summarize":  # while generating
        args = ["summarize", str(SAMPLE_DATA / "test.jsonl"), *set_args(smoke_overrides(tmp_path)), "--base-only"]
        args += ["--out", str(out / "summaries.jsonl")]
        hook = signal_when_called("samsum_qlora.summarizer", "Summarizer.generate", sig)
        kept = "nothing was written"
    else:  # once the random weights are in the temporary folder
        args = ["bench", *set_args(smoke_overrides(tmp_path)), "--steps", "1", "--json", str(out / "b.json")]
        hook = signal_when_called("samsum_qlora.commands.bench", "time_training", sig)
        kept = "the temporary weights were removed and nothing was written"
    stopped = hooked(hook, args, TMPDIR=str(tmp))
    assert stopped.returncode == code, stopped.stderr
    assert "Aborted" not in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == f"stopped: stopped by {sig}; {kept}: rerun the same command"
    # torchinductor_<user>: torch's compile cache, made by bitsandbytes' import where
    # $TORCHINDUCTOR_CACHE_DIR is unset (it is set in this process once it imported bitsandbytes itself)
    ours = [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]
    assert [p for p in out.rglob("*") if not p.is_dir()] == [] and ours == []  # report's, bench's --json: folders
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging, no lock


# --- long dialogues -----------------------------------------------------------------------------

MEETING = "Ana: shall we meet at the cafe near the station at five tomorrow?\n"


def test_a_10_mb_dialogue_is_cut_before_it_is_tokenised(tmp_path):
    """Rendering and tokenising a 10 MB dialogue whole took 2.6 GB (a prompt) and 3.4 GB (a training
    row) of memory here; only a bounded beginning can reach data.max_length tokens."""
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from conftest import SMOKE_CONFIG, smoke_overrides
from samsum_qlora import modeling
from samsum_qlora.config import load_config

fmt = modeling.chat_format(load_config(SMOKE_CONFIG, smoke_overrides(Path({str(tmp_path)!r}))))
dialogue = {MEETING!r} * (10_000_000 // {len(MEETING)})
ids, cut = fmt.fit_prompt(dialogue)
columns, stats = fmt.encode_rows([{{"id": "x", "dialogue": dialogue, "summary": "They meet at five."}}], progress=False)
# this process's own high-water mark: ru_maxrss keeps the forking parent's (pytest's, GBs late in a
# run) across exec on Linux; VmHWM belongs to the new address space
status = Path("/proc/self/status")
if status.exists():
    peak = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")) * 1024
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak, len(ids), cut, len(columns["input_ids"][0]), stats.truncated)
"""
    done = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=300)
    peak, prompt_tokens, cut, row_tokens, truncated = done.stdout.split()
    assert int(peak) < 1024**3, f"peak {int(peak) / 1024**2:.0f} MiB"
    assert (int(prompt_tokens), cut, int(row_tokens), truncated) == (512, "True", 512, "1")


def test_cutting_to_the_character_budget_first_changes_no_token(tmp_path):
    import dataclasses

    from samsum_qlora import modeling
    from samsum_qlora.config import load_config

    fmt = modeling.chat_format(load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"data.max_length": 96})))
    unbounded = dataclasses.replace(fmt, _char_budget=None)
    assert fmt._char_budget == 2 * 97 * 25  # the tiny tokenizer's longest entry: 25 characters
    rows = [json.loads(line) for line in (SAMPLE_DATA / "test.jsonl").read_text().splitlines()]
    for dialogue in [MEETING * 2000, "".join(r["dialogue"] for r in rows) * 20, rows[0]["dialogue"]]:
        assert len(dialogue) > fmt._char_budget or dialogue == rows[0]["dialogue"]
        assert fmt.fit_prompt(dialogue) == unbounded.fit_prompt(dialogue)
        assert fmt.encode(dialogue, "Bo is late.") == unbounded.encode(dialogue, "Bo is late.")


def test_eval_and_summarize_say_which_dialogues_were_cut(tmp_path):
    """train counted them; eval and summarize cut them without a word."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (SAMPLE_DATA / "test.jsonl").read_text().splitlines()][:3]
    rows[1]["dialogue"] = MEETING * 200  # ~3,000 tokens, past data.max_length=512
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = set_args(smoke_overrides(tmp_path, **{"data.source": str(data), "eval.max_new_tokens": 4}))
    warning = (
        "warning: 1 of 3 dialogues are longer than data.max_length=512 tokens with the prompt: only their "
        'beginning is summarised (their records say "truncated": true)'
    )
    evaluated = run_cli(["eval", *args, "--base-only"])
    assert evaluated.exit_code == 0 and warning in evaluated.stderr.splitlines(), evaluated.stderr
    out = tmp_path / "run" / "eval-base"
    assert json.loads((out / "metrics.json").read_text())["truncated_dialogues"] == 1
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r.get("truncated") for r in records] == [None, True, None]
    source = tmp_path / "dialogues.jsonl"
    source.write_text("".join(json.dumps({"dialogue": r["dialogue"]}) + "\n" for r in rows))
    summarized = run_cli(["summarize", str(source), *args, "--base-only"])
    assert summarized.exit_code == 0 and warning in summarized.stderr.splitlines(), summarized.stderr
    assert [json.loads(line).get("truncated") for line in summarized.stdout.splitlines()] == [None, True, None]


def test_the_ctrl_c_tests_pass_when_the_tests_run_with_ctrl_c_ignored():
    """As under `pytest &` in a script, or a runner that ignores SIGINT."""
    ignored = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_evaluate.py",
            "-k",
            "ctrl_c and SIGINT",
        ],
        env=cli_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert ignored.returncode == 0 and "1 passed" in ignored.stdout, ignored.stdout[-2000:]


def test_a_signal_during_the_reports_renames_waits_for_all_three(tmp_path, monkeypatch):
    from samsum_qlora import files, runtime

    paths = [tmp_path / name for name in ("report.md", "report.png", "report.html")]
    for path in paths:
        path.write_text("old")
    rename = os.replace

    def signalled_rename(src, dst):
        if Path(dst) == paths[0]:
            os.kill(os.getpid(), signal.SIGTERM)  # lands now, between the first rename and the next
        rename(src, dst)

    monkeypatch.setattr(os, "replace", signalled_rename)
    with pytest.raises(runtime.Terminated), runtime.sigterm_interrupts():
        files.write_all_or_none({path: b"new" for path in paths})
    assert [path.read_text() for path in paths] == ["new"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
