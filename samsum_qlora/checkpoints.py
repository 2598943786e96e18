"""Where training starts: which checkpoint to resume from, and whether it may be resumed.

A checkpoint counts as complete only when its manifest (written by `ManifestCallback` after the
Trainer has saved everything) lists every file with the size and hash found on disk: a checkpoint
cut off mid-write, or with a file cut in half, is skipped in favour of the one before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from samsum_qlora import files, layout
from samsum_qlora.errors import UserError
from samsum_qlora.layout import MANIFEST, RunDir

# Keys that change how a run is computed, watched or saved, not what it learns: they may change
# between an interruption and the resume. Every other key (the eval section aside) must match.
FREE_KEYS = {
    "model.attn_implementation",
    "model.liger_kernels",
    "model.cudnn_attention",
    "train.output_dir",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.report_to",
    "train.run_name",
    "train.dataloader_num_workers",
}


def write_manifest(checkpoint: Path, config: dict[str, Any]) -> None:
    entries = {
        p.name: {"bytes": p.stat().st_size, "sha256": files.sha256(p)}
        for p in sorted(checkpoint.iterdir())
        if p.is_file() and p.name != MANIFEST
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
        listed = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable manifest"
    for name, want in listed.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"] or files.sha256(path) != want["sha256"]:
            return f"{name} does not match its manifest (truncated or changed)"
    return None


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint dirs in `folder`, newest (highest step) first."""
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if p.is_dir() and (step := layout.checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def newest_complete(folder: Path, warn=print) -> Path | None:
    for ckpt in checkpoints(folder):
        why = problem(ckpt)
        if why is None:
            return ckpt
        warn(f"warning: skipping {ckpt}: {why}")
    return None


def _flatten(tree: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{s}.{k}": v
        for s, section in tree.items()
        if isinstance(section, dict) and s not in ("eval", "api")
        for k, v in section.items()
    }


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> now' for each key that changes what is learned."""
    a, b = _flatten(saved), _flatten(current)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in FREE_KEYS and a.get(k) != b.get(k)
    ]


def saved_config(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST).read_text())["config"]


def check_resumable(checkpoint: Path, current: dict[str, Any]) -> None:
    why = problem(checkpoint)
    if why is not None:
        raise UserError(f"cannot resume from {checkpoint}: {why}")
    diffs = config_differences(saved_config(checkpoint), current)
    if diffs:
        raise UserError(
            f"cannot resume from {checkpoint}: the config changed ({'; '.join(diffs)}); "
            "restore those values, pass --overwrite to start over, or use a new train.output_dir"
        )


def finished_training(checkpoint: Path) -> bool:
    """Whether the checkpoint was saved at the run's last step, or where early stopping ended it."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        return state["global_step"] >= state["max_steps"] > 0 or stopped_early(state)
    except (OSError, ValueError, KeyError):
        return False


def stopped_early(state: dict) -> bool:
    """The Trainer's EarlyStoppingCallback, as the checkpoint saved it, had run out of patience."""
    saved = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback")
    saved = saved[-1] if isinstance(saved, list) else saved
    if not saved:
        return False
    patience, waited = saved["args"]["early_stopping_patience"], saved["attributes"]["early_stopping_patience_counter"]
    return waited >= patience


def start_point(run: RunDir, config: dict[str, Any], *, overwrite: bool, resume: str | None, warn=print) -> Path | None:
    """The checkpoint training resumes from, or None to start at step 0 (then any checkpoints in
    the folder are an earlier run's, and the caller clears them).

    An interrupted run is always resumed, --overwrite or not: rerunning the interrupted command
    must never start over. Its config must match (else refused, naming the key; with --overwrite,
    started over). A finished run (lora_adapters/) is only replaced with --overwrite."""
    finished = f"{run.adapters} already holds a finished run; pass --overwrite or set another train.output_dir"
    if resume:
        chosen = Path(resume)
        if not chosen.is_dir():
            raise UserError(f"--resume {resume} is not a checkpoint directory")
        if layout.checkpoint_step(chosen) is None and not (chosen / MANIFEST).is_file():
            inside = [p.name for p in checkpoints(chosen)]
            hint = (
                f"pass one it holds: {', '.join(inside)}" if inside else "one is <output_dir>/checkpoints/checkpoint-N"
            )
            raise UserError(f"--resume {resume} is not a checkpoint folder; {hint}")
        if run.adapters.exists() and not overwrite:
            raise UserError(finished)
        check_resumable(chosen, config)
        return chosen
    newest = newest_complete(run.checkpoints, warn=warn)
    interrupted = newest is not None and not finished_training(newest)
    if interrupted and not (overwrite and config_differences(saved_config(newest), config)):
        check_resumable(newest, config)
        return newest
    if run.adapters.exists() and not overwrite:
        raise UserError(finished)
    if newest is not None and not overwrite and not run.adapters.exists():
        check_resumable(newest, config)  # trained to the end, cut off before publishing
        return newest
    return None
