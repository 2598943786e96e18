"""Secrets live in the environment only: no file a run writes, and no line it prints, holds one."""

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


@pytest.mark.slow
def test_no_secret_in_any_file_or_log_of_a_run(tmp_path):
    pytest.importorskip("wandb")
    env = {**os.environ, **SECRETS, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "HOME": str(tmp_path / "home")}
    args = set_args(smoke_overrides(tmp_path, **{"train.max_steps": 6, "train.save_steps": 3,
                                                 "train.report_to": "wandb"}))
    logs = ""
    for command in (["train", *args], ["eval", *args, "--limit", "3"]):
        done = subprocess.run([sys.executable, "-m", "samsum_qlora", *command], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        logs += done.stdout + done.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in written)
    assert any(p.suffix == ".wandb" for p in written)  # the offline W&B run was written too
    for name, value in SECRETS.items():
        assert value not in logs, f"{name} printed"
        leaks = [p for p in written if value.encode() in p.read_bytes()]
        assert not leaks, f"{name} written to {leaks}"
