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
from typing import Any

from samsum_qlora import files
from samsum_qlora.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LOCK = ".samsum-qlora.lock"  # a folder's claim by the process using it (files.hold)
MANIFEST = "samsum_manifest.json"  # a checkpoint's list of complete files
MERGE_INFO = "merge.json"  # beside a merged model: what was merged and how closely it matches
RANDOM_MARK = "RANDOM_WEIGHTS"  # in a model folder bench filled with random weights
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint folder names
EMBEDDED_MODEL = Path(__file__).parent / "assets" / "tiny-llama"  # the demo's tiny random Llama (configs/smoke.yaml)


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


def check_adapter_weights(adapters: Path) -> None:
    """The adapters' weights file is whole: one cut short by a copy or a download is named now,
    before any model loads, instead of peft's `SafetensorError: invalid header length`."""
    from safetensors import SafetensorError, safe_open

    weights = adapters / ADAPTER_WEIGHTS
    if not weights.is_file():  # an older peft's adapter_model.bin: peft's own loading is all there is
        return
    try:
        with safe_open(weights, "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"{weights} is damaged ({str(e).splitlines()[0]}): the file was cut short or is not safetensors; "
            "copy it again, or retrain"
        ) from None


def same_model(a: str, b: str) -> bool:
    """Whether two model names may mean the same base: the same folder, or the same last part (a Hub
    id and its copy downloaded to a folder of its name, one folder reached from two places). Tells
    a merged model or another base apart; the shapes, where recorded, are compared on loading."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
        return True
    return pa.name.lower() == pb.name.lower()


def check_adapters_base(adapters: Path, model_name: str) -> None:
    """Adapters go on the base they were trained on (adapter_config.json's base_model_name_or_path),
    never on a merged model that already holds adapters: both would run without a word, the first
    as another model's adapters, the second with the adapters applied twice."""
    trained_on = adapter_config(adapters).get("base_model_name_or_path")
    merge_record = Path(model_name).expanduser() / MERGE_INFO
    if merge_record.is_file() and not (trained_on and same_model(trained_on, model_name)):
        merged = files.read_json(merge_record)
        what = f" ({merged.get('adapters')} merged into {merged.get('base_model')})" if isinstance(merged, dict) else ""
        raise UserError(
            f"model.name {model_name} is a merged model{what}: its adapters are already in its weights; pass "
            f"--base-only to use it alone, or --set model.name=<the base> to apply {adapters}"
        )
    if trained_on and not same_model(trained_on, model_name):
        raise UserError(
            f"adapters in {adapters} were trained on {trained_on}, not on model.name {model_name}: pass "
            f"--set model.name={trained_on} (or a folder of that name holding it)"
        )


def trained_settings(adapters: Path) -> tuple[dict[str, Any], Path]:
    """The settings to use adapters as they were trained, when no config is given, as dotted keys,
    and the file they come from. Inside a run folder (<run>/lora_adapters beside config.yaml): the
    run's resolved config, results going to that run folder (its data source only when it can be
    reached from here); elsewhere: the base model adapter_config.json names."""
    from samsum_qlora.config import read_yaml

    run = RunDir(adapters.parent)
    if adapters.name != run.adapters.name or not run.config.is_file():
        meta = adapter_config(adapters)
        base = meta.get("base_model_name_or_path")
        return ({"model.name": base, "model.revision": meta.get("revision")} if base else {}), adapters / ADAPTER_CONFIG
    tree = read_yaml(run.config)
    settings = {
        f"{section}.{key}": value
        for section, values in tree.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }
    settings["train.output_dir"] = str(run.root)
    settings.pop("eval.output_dir", None)  # a folder of the machine that trained
    source = settings.get("data.source")
    if isinstance(source, str) and is_local(source) and not Path(source).expanduser().exists():
        settings.pop("data.source")
        settings.pop("data.revision", None)
    return settings, run.config


def is_embedded_model(name: str) -> bool:
    """Whether model.name is the shipped tiny model, whose weights are random (its summaries mean nothing)."""
    path = Path(name).expanduser()
    return path.is_dir() and path.resolve() == EMBEDDED_MODEL.resolve()
