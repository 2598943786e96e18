"""Weights & Biases around a run: offline without credentials, one W&B run per output dir, and the
eval scores added to the training run. Pure apart from the environment and one small file.

The run id lives in the run folder (`layout.RunDir.wandb_run_id`), so rerunning `train` into the same dir
(a resume, or a managed job's recovery after a preemption) continues the same W&B run.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from urllib.parse import urlparse

from samsum_qlora import files
from samsum_qlora.errors import UserError
from samsum_qlora.layout import RunDir

DEFAULT_PROJECT = "samsum-qlora"
SAMPLE_ROWS = 20  # predictions shown in the W&B table
INSTALL = "pip install 'samsum-qlora[cloud]' (or: pip install wandb)"


def has_credentials(env: MutableMapping[str, str]) -> bool:
    """WANDB_API_KEY, or a `wandb login` entry in ~/.netrc for the W&B host."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc"
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _mode(env: MutableMapping[str, str], where: str) -> str | None:
    """WANDB_MODE as chosen, else "offline" when there are no credentials (with a notice naming
    `where` W&B writes)."""
    if env.get("WANDB_MODE") or has_credentials(env):
        return env.get("WANDB_MODE") or None
    print(
        f"WANDB_API_KEY is not set: W&B logs offline to {where}/wandb (no `wandb login` found either; "
        f"upload later with `wandb sync {where}/wandb/offline-run-*`)",
        flush=True,
    )
    return "offline"


def prepare_wandb(
    report_to: list[str], output_dir: Path, *, is_main: bool = True, env: MutableMapping[str, str] = os.environ
) -> list[str]:
    """Set W&B's environment for a training run into `output_dir`; returns the Trainer's report_to.

    Only when "wandb" is in `report_to`: WANDB_PROJECT defaults to samsum-qlora; without
    credentials W&B goes offline (WANDB_MODE=offline, said on stdout); WANDB_DIR defaults to
    `output_dir`, so W&B's files travel with the adapters; WANDB_RUN_ID comes from (or is saved
    to) `output_dir/wandb_run_id.txt`, with WANDB_RESUME=allow. WANDB_MODE=disabled drops wandb.
    """
    if "wandb" not in report_to:
        return list(report_to)
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"train.report_to includes wandb but wandb is not installed: {INSTALL}")
    if env.get("WANDB_MODE") == "disabled":
        return [r for r in report_to if r != "wandb"] or ["none"]
    if not is_main:  # under torchrun only rank 0 logs
        return list(report_to)

    output_dir = Path(output_dir)
    env.setdefault("WANDB_PROJECT", DEFAULT_PROJECT)
    env.setdefault("WANDB_DIR", str(output_dir))
    mode = _mode(env, env["WANDB_DIR"])
    if mode:
        env["WANDB_MODE"] = mode

    # One W&B run per output dir: an explicit WANDB_RUN_ID wins and is remembered.
    id_file = RunDir(output_dir).wandb_run_id
    saved = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
    run_id = env.get("WANDB_RUN_ID") or saved or uuid.uuid4().hex[:12]
    if run_id != saved:
        files.ensure_writable_dir(output_dir)
        files.write_text(id_file, run_id + "\n")
    env["WANDB_RUN_ID"] = run_id
    env.setdefault("WANDB_RESUME", "allow")
    return list(report_to)


def log_eval_to_wandb(
    metrics: dict, predictions: list[dict], train_dir: Path, env: MutableMapping[str, str] = os.environ
) -> bool:
    """Log <split>/<metric> (test/rouge1 ...) and a table of the first SAMPLE_ROWS predictions to W&B:
    named by the split, apart from the eval/<metric> curve of the validation while training.

    Goes to the active W&B run, else reopens the run whose id `<train_dir>/wandb_run_id.txt`
    holds (the training run). Returns False, logging nothing, when there is neither, when wandb
    is not installed, or with WANDB_MODE=disabled.
    """
    if env.get("WANDB_MODE") == "disabled" or importlib.util.find_spec("wandb") is None:
        return False
    import wandb

    run, opened = wandb.run, False
    if run is None:
        id_file = RunDir(Path(train_dir)).wandb_run_id
        if not id_file.is_file():
            return False
        where = env.get("WANDB_DIR") or str(train_dir)
        run = wandb.init(
            project=env.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            id=id_file.read_text(encoding="utf-8").strip(),
            resume="allow",
            dir=where,
            mode=_mode(env, where),
        )
        opened = True
    split = metrics.get("split") or "test"
    scores = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rows = [[p.get("id"), p.get("reference"), p.get("prediction")] for p in predictions[:SAMPLE_ROWS]]
    run.log({**scores, f"{split}/samples": wandb.Table(columns=["id", "reference", "prediction"], data=rows)})
    if opened:
        run.finish()
    return True
