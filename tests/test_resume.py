"""Preemption and crashes: a killed or SIGTERMed run resumes to the same adapters."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOKE_CONFIG, set_args, smoke_overrides
from safetensors.torch import load_file
from test_reliability import hooked

from samsum_qlora import checkpoints
from samsum_qlora.commands import train
from samsum_qlora.config import load_config
from samsum_qlora.errors import UserError

STEPS = 60  # long enough (a few seconds) to interrupt between checkpoints


def command(out: Path, *flags: str, **extra) -> list[str]:
    overrides = smoke_overrides(
        out,
        **{
            "train.max_steps": STEPS,
            "train.save_steps": 10,
            "train.save_total_limit": 3,
            "train.logging_steps": 10,
            **extra,
        },
    )
    return [sys.executable, "-m", "samsum_qlora", "train", *set_args(overrides), *flags]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def start_and_signal(out: Path, sig: int, *flags: str) -> subprocess.CompletedProcess:
    """Start training, send `sig` as soon as the first complete checkpoint exists."""
    proc = subprocess.Popen(
        command(out, *flags), env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "run" / "checkpoints" / "checkpoint-10" / checkpoints.MANIFEST).exists():
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    stdout, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout)


def finish(out: Path, *flags: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(out, *flags, **extra), env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "run" / "lora_adapters" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    done = finish(out)
    assert done.returncode == 0, done.stdout + done.stderr
    return adapter(out)


def assert_same_adapters(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_the_same_adapters(tmp_path, uninterrupted):
    killed = start_and_signal(tmp_path, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "lora_adapters").exists()
    rerun = finish(tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming from" in rerun.stdout and "(step " in rerun.stdout
    assert f'"global_step": {STEPS}' in (tmp_path / "run" / "train_metrics.json").read_text()
    assert_same_adapters(adapter(tmp_path), uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_exits_nonzero_and_resumes(tmp_path, uninterrupted):
    """With --overwrite in the command, too: rerunning the interrupted command resumes it."""
    stopped = start_and_signal(tmp_path, signal.SIGTERM, "--overwrite")
    assert stopped.returncode == 143, stopped.stdout
    assert "SIGTERM received" in stopped.stdout and "rerun the same command to resume" in stopped.stdout
    saved = checkpoints.newest_complete(tmp_path / "run" / "checkpoints")
    assert saved is not None and int(saved.name.split("-")[1]) >= 10
    rerun = finish(tmp_path, "--overwrite")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming from {saved}" in rerun.stdout
    assert_same_adapters(adapter(tmp_path), uninterrupted)


def short_run(tmp_path, **extra):
    cfg = load_config(
        SMOKE_CONFIG, smoke_overrides(tmp_path, **{"train.max_steps": 20, "train.save_steps": 10, **extra})
    )
    train.train_adapters(cfg)
    return tmp_path / "run" / "checkpoints"


def test_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys):
    ckpts = short_run(tmp_path, **{"train.save_total_limit": 3})
    newest = ckpts / "checkpoint-20"
    victim = newest / "adapter_model.safetensors"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a file cut in half
    assert checkpoints.newest_complete(ckpts) == ckpts / "checkpoint-10"
    assert "skipping" in capsys.readouterr().out
    (ckpts / "checkpoint-30").mkdir()  # cut off before its manifest was written
    assert checkpoints.newest_complete(ckpts) == ckpts / "checkpoint-10"


def test_resume_with_changed_config_names_the_difference(tmp_path):
    ckpts = short_run(tmp_path)
    (tmp_path / "run" / "lora_adapters").rename(tmp_path / "run" / "old")  # pretend it was interrupted
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"lora.lora_r": 16, "train.max_steps": 30}))
    with pytest.raises(UserError, match=r"lora.lora_r: 8 -> 16"):
        train.train_adapters(cfg)
    assert checkpoints.newest_complete(ckpts) is not None


def test_resume_into_a_finished_run_needs_overwrite(tmp_path):
    ckpts = short_run(tmp_path)
    before = (tmp_path / "run" / "lora_adapters" / "adapter_model.safetensors").read_bytes()
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"train.max_steps": 20, "train.save_steps": 10}))
    with pytest.raises(UserError, match="already holds a finished run; pass --overwrite"):
        train.train_adapters(cfg, resume=str(ckpts / "checkpoint-10"))
    assert (tmp_path / "run" / "lora_adapters" / "adapter_model.safetensors").read_bytes() == before


def test_a_resumed_run_reports_the_whole_runs_loss(tmp_path, capsys):
    """The Trainer's own train_loss after a resume averages only the steps since; the log history,
    which checkpoints keep and which logs each saving step, covers them all."""
    steps = {"train.max_steps": 8, "train.save_steps": 5, "train.logging_steps": 3}  # logs at 3, 5, 6, 8
    short_run(tmp_path, **steps)
    whole = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    (tmp_path / "run" / "lora_adapters").rename(tmp_path / "run" / "old")  # as if cut off after checkpoint-5
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-8")
    capsys.readouterr()
    short_run(tmp_path, **steps)
    resumed = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-5") and resumed["global_step"] == whole["global_step"] == 8
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert f"train loss {whole['train_loss']:.4f}" in capsys.readouterr().out


def test_resume_given_the_checkpoints_folder_lists_the_checkpoints_in_it(tmp_path):
    from samsum_qlora.layout import RunDir

    run = RunDir(tmp_path / "run")
    for step in (10, 20):
        (run.checkpoints / f"checkpoint-{step}").mkdir(parents=True)
    run.adapters.mkdir()
    for given, needle in [
        (run.checkpoints, "is not a checkpoint folder; pass one it holds: checkpoint-20, checkpoint-10"),
        (run.adapters, "is not a checkpoint folder; one is <output_dir>/checkpoints/checkpoint-N"),
    ]:
        with pytest.raises(UserError, match=re.escape(f"--resume {given} {needle}")):
            checkpoints.start_point(run, {}, overwrite=True, resume=str(given))


@pytest.mark.slow
def test_killed_while_publishing_the_last_step_publishes_that_checkpoint_as_it_is(tmp_path):
    """kill -9 once the last checkpoint is complete and the adapters are being staged: the rerun
    publishes that checkpoint, not one step more (a constant rate would show a further step)."""
    steps = {
        "train.max_steps": 6,
        "train.save_steps": 3,
        "train.logging_steps": 1,
        "train.lr_scheduler_type": "constant",
    }
    straight = subprocess.run(command(tmp_path / "a", **steps), env=env(), cwd=ROOT, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    kill_at_staging = (
        "from samsum_qlora import files\nfiles.staged_dir = lambda final: os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = hooked(kill_at_staging, command(tmp_path / "b", **steps)[3:])
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "b" / "run"
    assert not (run / "lora_adapters").exists() and checkpoints.problem(run / "checkpoints" / "checkpoint-6") is None
    rerun = finish(tmp_path / "b", **steps)
    assert rerun.returncode == 0, rerun.stderr
    want, got = (json.loads((t / "run" / "train_metrics.json").read_text()) for t in (tmp_path / "a", tmp_path / "b"))
    for key in ("global_step", "tokens_seen", "train_loss", "first_logged_loss", "last_logged_loss", "rows"):
        assert got[key] == want[key], key
    assert got["global_step"] == 6
    adapters = "lora_adapters/adapter_model.safetensors"
    assert (run / adapters).read_bytes() == (tmp_path / "a" / "run" / adapters).read_bytes()
    assert f"{run / 'checkpoints' / 'checkpoint-6'} is the run's last step: publishing it as it is" in rerun.stdout
