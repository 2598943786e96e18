"""Shared fixtures: the shipped tiny model and sample data, and the optional real reference."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "samsum_qlora" / "assets" / "tiny-llama"
SAMPLE_DATA = ROOT / "samsum_qlora" / "assets" / "samsum-sample"
SMOKE_CONFIG = ROOT / "configs" / "smoke.yaml"
REFERENCE = ROOT.parent / "shared" / "reference"  # beside the checkout on dev machines and CI only

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

# A background job (or a runner) may start the tests with Ctrl-C ignored. An ignored signal stays
# ignored in every child, and Python then never raises KeyboardInterrupt: the tests that press
# Ctrl-C, in this process or in a child, need its default back (a handler is reset at exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="session")
def reference_tokenizer():
    path = REFERENCE / "llama-3.2-1b-instruct-shape"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("../shared/reference is not here")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def smoke_overrides(tmp_path: Path, **extra) -> dict:
    """The smoke config's paths made absolute, its output under tmp_path."""
    values = {
        "model.name": str(TINY_MODEL),
        "data.source": str(SAMPLE_DATA),
        "train.output_dir": str(tmp_path / "run"),
    }
    values.update(extra)
    return values


@pytest.fixture
def smoke_cfg(tmp_path):
    from samsum_qlora.config import load_config

    return load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))


def set_args(overrides: dict) -> list[str]:
    args = ["--config", str(SMOKE_CONFIG)]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    return args


@pytest.fixture
def sdpa_calls(monkeypatch):
    """(mask is None, is_causal) of every SDPA call, where transformers would build a mask for a
    plain causal batch too (as it does while a CUDA graph is captured: its tracing check says yes)."""
    import torch
    from transformers import masking_utils

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask is None, kw.get("is_causal")))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(masking_utils, "is_tracing", lambda *a, **k: True)
    return seen


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of a few MB, for a disk that really fills up (mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC tests cover the writes")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> None:
    """Leave no byte free on `disk`."""
    with (disk / "filler").open("wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == 28  # ENOSPC


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test starts from the same environment: commands set W&B's variables in os.environ
    (WANDB_DIR, WANDB_RUN_ID, ...) for the libraries they call, and one test's run folder must not
    become the next test's."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)
