"""Every file and folder name the package writes or reads, named once, and the readers of its
small metadata files.

<train.output_dir>/               RunDir
  lora_adapters/                  the adapters (peft format) and the tokenizer
  checkpoints/checkpoint-N/       for resuming (each with samsum_manifest.json)
  config.yaml  run.json  train_metrics.json  wandb_run_id.txt
  eval/  eval-base/  eval-api-<model>/     EvalDir: metrics.json, predictions.jsonl, eval_identity.json
<report --out>/                   ReportDir: report.md, report.png, report.html
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from samsum_qlora import files
from samsum_qlora.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LOCK = ".samsum-qlora.lock"  # a folder's claim by the process using it (files.hold)
MANIFEST = "samsum_manifest.json"  # a checkpoint's list of complete files
MERGE_INFO = "merge.json"  # beside a merged model: what was merged and how closely it matches
RANDOM_MARK = "RANDOM_WEIGHTS"  # in a model folder bench filled with random weights
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint folder names


def is_local(name: str) -> bool:
    """Whether a model or data name means a folder here rather than a Hub id. Hub ids have at most
    one slash and never start with '.', '/' or '~'; anything else that looks like a path is one."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def checkpoint_dir(folder: Path, step: int) -> Path:
    return folder / f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder, None for any other folder."""
    m = CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def adapters(self) -> Path:
        return self.root / "lora_adapters"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def train_metrics(self) -> Path:
        return self.root / "train_metrics.json"

    @property
    def chart(self) -> Path:
        """The run's picture: training loss and validation ROUGE against steps (`run_chart`)."""
        return self.root / "training_curve.png"

    @property
    def wandb_run_id(self) -> Path:
        """The W&B run this folder logs to: a resume continues the same run."""
        return self.root / "wandb_run_id.txt"

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    def eval_dir(self, *, base_only: bool = False, api_model: str | None = None) -> Path:
        if api_model is not None:
            return self.root / ("eval-api-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", api_model).strip("-.") or "model"))
        return self.root / ("eval-base" if base_only else "eval")

    def eval_dirs(self) -> list[Path]:
        """The finished evaluations inside the run folder (eval, eval-base, eval-api-*, ...)."""
        return sorted(p for p in self.root.glob("eval*") if p.is_dir() and EvalDir(p).metrics.is_file())


@dataclass(frozen=True)
class EvalDir:
    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.jsonl"

    @property
    def identity(self) -> Path:
        """What this folder's predictions score: adapters, base model, data, prompt, decoding."""
        return self.root / "eval_identity.json"

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    def partial(self, rank: int | None = None) -> Path:
        """Predictions appended batch by batch while generating (one file per torchrun process)."""
        return self.root / ("predictions.partial.jsonl" if rank is None else f"predictions.partial.rank{rank}.jsonl")

    def partials(self) -> list[Path]:
        return [self.partial(), *sorted(self.root.glob("predictions.partial.rank*.jsonl"))]

    def is_finished(self) -> bool:
        return self.metrics.is_file() and self.predictions.is_file()


@dataclass(frozen=True)
class ReportDir:
    root: Path

    @property
    def markdown(self) -> Path:
        return self.root / "report.md"

    @property
    def chart(self) -> Path:
        return self.root / "report.png"

    @property
    def page(self) -> Path:
        return self.root / "report.html"


def merge_lock(out: Path) -> Path:
    """The claim on a merge's --out while it is written (beside it: the folder itself is staged)."""
    return out.with_name(f".{out.name}{LOCK}")


def adapter_config(adapters: Path) -> dict:
    """The adapters' adapter_config.json; a UserError when `adapters` holds none."""
    path = adapters / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{adapters} holds no LoRA adapters (no {ADAPTER_CONFIG})")
    meta = files.read_json(path)
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a LoRA adapter config")
    return meta


def adapter_base(adapters: Path) -> tuple[str, str | None]:
    """(base model, revision) the adapters were trained on."""
    meta = adapter_config(adapters)
    base = meta.get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{adapters / ADAPTER_CONFIG} names no base_model_name_or_path: pass --config (or --set model.name=...)"
        )
    return base, meta.get("revision")


def trained_shape(adapters: Path) -> dict | None:
    """The base model's shape recorded beside the adapters by `train` (run.json), if any."""
    info = RunDir(adapters.parent).run_info
    return files.read_json(info).get("model_shape") if info.is_file() else None
