"""Which checkpoint to resume from, and whether it may be resumed. Pure apart from reading files.

A checkpoint counts as complete only when its manifest (written by `ManifestCallback` after the
Trainer has saved everything) lists every file with the size and hash found on disk: a checkpoint
cut off mid-write, or with a file cut in half, is skipped in favour of the one before.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from samsum_qlora.errors import UserError

MANIFEST = "samsum_manifest.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")
# Keys whose change makes a checkpoint unusable: another model, adapter shape or data.
RESUME_KEYS = (
    "model.name", "model.revision", "quantization.load_in_4bit", "quantization.bnb_4bit_quant_type",
    "lora.lora_r", "lora.lora_alpha", "lora.target_modules", "data.source", "data.revision",
    "data.train_split", "data.task_instruction", "data.max_length", "data.date_string",
    "data.max_train_samples", "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
    "train.max_tokens_per_batch",
    "train.seed",
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(checkpoint: Path, config: dict[str, Any]) -> None:
    entries = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(checkpoint.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    tmp = checkpoint / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": entries, "config": config}, indent=2))
    tmp.replace(checkpoint / MANIFEST)


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return "no manifest (cut off while saving)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable manifest"
    for name, want in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            return f"{name} does not match its manifest (truncated or changed)"
    return None


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint dirs in `folder`, newest (highest step) first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_complete(folder: Path, warn=print) -> Path | None:
    for ckpt in checkpoints(folder):
        why = problem(ckpt)
        if why is None:
            return ckpt
        warn(f"warning: skipping {ckpt}: {why}")
    return None


def _flatten(tree: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in tree.items() if isinstance(section, dict) for k, v in section.items()}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> now' for each resume-relevant key that changed."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in RESUME_KEYS if a.get(k) != b.get(k)]


def check_resumable(checkpoint: Path, current: dict[str, Any]) -> None:
    why = problem(checkpoint)
    if why is not None:
        raise UserError(f"cannot resume from {checkpoint}: {why}")
    saved = json.loads((checkpoint / MANIFEST).read_text())["config"]
    diffs = config_differences(saved, current)
    if diffs:
        raise UserError(
            f"cannot resume from {checkpoint}: the config changed ({'; '.join(diffs)}); "
            "restore those values or use a new train.output_dir"
        )
