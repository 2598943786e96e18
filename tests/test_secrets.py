"""Secrets live in the environment only: no file a run writes, and no line it prints, holds one.
And what it prints is what a person should read: no known library noise."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, set_args, smoke_overrides

SECRETS = {
    "HF_TOKEN": "hf_SECRETtoken1234567890abcdef",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "OPENAI_API_KEY": "sk-SECRETopenai1234567890",
}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """train then eval as a user runs them, secrets in the environment: (logs, files written)."""
    pytest.importorskip("wandb")
    tmp_path = tmp_path_factory.mktemp("secrets")
    env = {
        **os.environ,
        **SECRETS,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "HOME": str(tmp_path / "home"),
    }
    args = set_args(
        smoke_overrides(
            tmp_path,
            **{"train.max_steps": 6, "train.save_steps": 3, "train.logging_steps": 2, "train.report_to": "wandb"},
        )
    )
    logs = ""
    for command in (["train", *args], ["eval", *args, "--limit", "3"]):
        done = subprocess.run(
            [sys.executable, "-m", "samsum_qlora", *command],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        logs += done.stdout + done.stderr
    return logs, [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_no_secret_in_any_file_or_log_of_a_run(logged_run):
    logs, written = logged_run
    assert any(p.name == "adapter_model.safetensors" for p in written)
    assert any(p.suffix == ".wandb" for p in written)  # the offline W&B run was written too
    for name, value in SECRETS.items():
        assert value not in logs, f"{name} printed"
        leaks = [p for p in written if value.encode() in p.read_bytes()]
        assert not leaks, f"{name} written to {leaks}"


@pytest.mark.slow
def test_a_run_prints_no_known_noise(logged_run):
    logs, _ = logged_run
    for noise in (
        "gemm_4bit_forward",
        "is_gradient_checkpointing",
        "Generating train split",
        "Token indices sequence length",
        "'loss': '",
        "mtime may not be reliable",
        "Ignoring clean_up_tokenization_spaces",
        "Traceback",
    ):
        assert noise not in logs, noise
    assert "step 2/6: loss " in logs  # the log says numbers as numbers
