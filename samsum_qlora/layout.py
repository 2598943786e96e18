"""The folders a run leaves behind, named once, and the readers of their files.

<train.output_dir>/               RunDir
  lora_adapters/                  the adapters (peft format) and the tokenizer
  checkpoints/checkpoint-N/       for resuming
  config.yaml  run.json  train_metrics.json
  eval/  eval-base/  eval-api-<model>/     EvalDir: metrics.json, predictions.jsonl
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from samsum_qlora import files
from samsum_qlora.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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

    def eval_dir(self, *, base_only: bool = False, api_model: str | None = None) -> Path:
        if api_model is not None:
            return self.root / ("eval-api-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", api_model).strip("-.") or "model"))
        return self.root / ("eval-base" if base_only else "eval")


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

    def partial(self, rank: int | None = None) -> Path:
        """Predictions appended batch by batch while generating (one file per torchrun process)."""
        return self.root / ("predictions.partial.jsonl" if rank is None else f"predictions.partial.rank{rank}.jsonl")

    def partials(self) -> list[Path]:
        return [self.partial(), *sorted(self.root.glob("predictions.partial.rank*.jsonl"))]

    def is_finished(self) -> bool:
        return self.metrics.is_file() and self.predictions.is_file()


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
