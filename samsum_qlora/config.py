"""One typed config tree, loaded from YAML; the command line only overrides it.

Precedence: ``--set`` > YAML > the dataclass defaults below. The defaults *are* the seed
tutorial's recipe (Llama-3.2-1B-Instruct, NF4 + double quant, r=8, batch 4 x 4, ...), so
``configs/llama32-1b-samsum.yaml`` and "no --config at all" train the same thing; a test keeps
the two in step.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from samsum_qlora.errors import UserError

DEFAULT_INSTRUCTION = "Summarize the following dialogue in one or two sentences."


@dataclass
class ModelArgs:
    name: str = "meta-llama/Llama-3.2-1B-Instruct"  # Hub id or a local directory
    revision: str | None = None  # Hub branch, tag or commit; None = main
    attn_implementation: str = "sdpa"  # "eager" | "sdpa" | "flash_attention_2"
    # Fused Triton kernels (liger-kernel) for RMSNorm, SwiGLU and RoPE on a CUDA GPU: fewer
    # kernel launches and less activation memory. Ignored on the CPU or when not installed.
    liger_kernels: bool = True
    # cuDNN's attention builds a plan per new shape; batches here change shape every step and
    # generation grows the KV cache every token, so planning costs more than it saves.
    cudnn_attention: bool = False


@dataclass
class QuantArgs:
    load_in_4bit: bool = True  # QLoRA: the frozen base in 4 bits, adapters in higher precision
    bnb_4bit_quant_type: str = "nf4"  # NF4 matches normally distributed weights better than fp4
    bnb_4bit_use_double_quant: bool = True  # quantise the quantisation constants too (~0.4 bit/param)
    bnb_4bit_compute_dtype: str = "bfloat16"  # matmuls run in this dtype after dequantisation
    # Fast path: after loading in 4 bits, dequantise the NF4 weights once into a frozen copy in the
    # compute dtype, for training and generation, instead of on every matmul. Same weights, same
    # numbers; costs 2 bytes/param (2.5 GB for 1B).
    dequantize_once: bool = True

    def __post_init__(self):
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise UserError(f"quantization.bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}")
        if self.bnb_4bit_compute_dtype not in ("bfloat16", "float16", "float32"):
            raise UserError(
                "quantization.bnb_4bit_compute_dtype must be bfloat16, float16 or float32, "
                f"got {self.bnb_4bit_compute_dtype!r}"
            )


@dataclass
class LoraArgs:
    lora_r: int = 8  # adapter rank: higher = more capacity and memory
    lora_alpha: int = 16  # scale = alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input; 0 skips a kernel and a saved mask per module
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        if self.lora_r < 1:
            raise UserError(f"lora.lora_r must be at least 1, got {self.lora_r}")
        if not self.target_modules:
            raise UserError("lora.target_modules is empty: name at least one module, e.g. [q_proj, v_proj]")


@dataclass
class DataArgs:
    source: str = "knkarthick/samsum"  # Hub dataset id, or a local dir with train/validation/test files
    revision: str | None = None  # Hub revision of `source`; pin it for reproducible runs
    train_split: str = "train"
    task_instruction: str = DEFAULT_INSTRUCTION  # the system message of every example
    max_length: int = 1024  # tokens per example; longer dialogues are shortened, summaries never
    date_string: str = "26 Jul 2024"  # pins the chat template's "Today Date" so tokens never change
    max_train_samples: int | None = None  # use only the first N training rows (quick experiments)

    def __post_init__(self):
        if self.max_length < 16:
            raise UserError(f"data.max_length must be at least 16 tokens, got {self.max_length}")


@dataclass
class TrainArgs:
    """Field names are transformers.TrainingArguments' own, so the HF docs apply."""

    output_dir: str = "outputs/lora_samsum"  # adapters land in <output_dir>/lora_adapters/
    per_device_train_batch_size: int = 4  # rows per batch; used only when max_tokens_per_batch is null
    gradient_accumulation_steps: int = 1
    # Fast path: batches of rows of similar length, at most this many tokens (padding included).
    # 8192 tokens is ~39 SAMSum rows per step (the seed: 16); null = fixed rows of the batch size.
    max_tokens_per_batch: int | None = 8192
    trained_logits_only: bool = True  # project only summary positions to the 128K vocabulary
    pad_to_multiple_of: int = 32  # few distinct batch shapes, so GPU kernels and memory blocks are reused
    learning_rate: float = 2e-4  # LoRA tolerates ~10x the full fine-tuning rate
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03  # < 1 = a fraction of all steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = True  # needs an Ampere+ GPU (or a CPU with bf16); set fp16 on older cards
    fp16: bool = False
    optim: str = "adamw_torch_fused"  # 1.7 M trainable params: 8-bit states would save 10 MB and cost time
    gradient_checkpointing: bool = False  # true trades ~30% speed for much less activation memory
    logging_steps: int = 10
    save_steps: int = 100  # checkpoint interval, for resuming after a preemption
    save_total_limit: int = 2  # keep only the newest N checkpoints
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["none"])  # e.g. [wandb]
    run_name: str | None = None
    dataloader_num_workers: int = 0

    def __post_init__(self):
        if self.bf16 and self.fp16:
            raise UserError("train.bf16 and train.fp16 are both true: pick one (--set train.fp16=false)")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise UserError("train.per_device_train_batch_size and train.gradient_accumulation_steps must be >= 1")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise UserError("set train.max_steps > 0 or train.num_train_epochs > 0, or there is nothing to train")
        if self.pad_to_multiple_of < 1:
            raise UserError(f"train.pad_to_multiple_of must be at least 1, got {self.pad_to_multiple_of}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 16:
            raise UserError(f"train.max_tokens_per_batch must be at least 16 (or null), got {self.max_tokens_per_batch}")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]


@dataclass
class EvalArgs:
    split: str = "test"
    batch_size: int = 128  # prompts generated together; sorted by length to waste little padding
    # Fold the adapters into the base weights for generation: fewer kernels per token, but the
    # bf16 rounding of the merge moves logits (docs/performance.md has the measured trade-off).
    merge_adapters: bool = False
    max_new_tokens: int = 128  # SAMSum summaries average ~25 tokens
    limit: int | None = None  # score only the first N examples
    output_dir: str | None = None  # default: <train.output_dir>/eval


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    quantization: QuantArgs = field(default_factory=QuantArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_TYPES = {
    "model": ModelArgs,
    "quantization": QuantArgs,
    "lora": LoraArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "eval": EvalArgs,
}
# Keys of the tutorial's flat config.yaml that are not our field names.
_FLAT_ALIASES = {
    "model_name": "model.name",
    "model_id": "model.name",
    "dataset_name": "data.source",
    "dataset": "data.source",
    "max_seq_length": "data.max_length",
    "task_instruction": "data.task_instruction",
}


def _field_index() -> dict[str, str]:
    """Every dotted key we know, plus a map from bare field name -> dotted key (for flat YAML)."""
    flat = {}
    for section, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            flat.setdefault(f.name, f"{section}.{f.name}")
    flat.update(_FLAT_ALIASES)
    return flat


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTION_TYPES.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str, candidates: list[str]) -> UserError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML or --set value against the field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # --set lora.target_modules=q_proj,v_proj
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{key} must be a number, got {value!r}")
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise UserError(f"{key} must be a whole number, got {value!r}")
        try:
            return tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
        except (TypeError, ValueError):
            kind = "a whole number" if tp is int else "a number"
            raise UserError(f"{key} must be {kind}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _nest(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sectioned YAML passes through; the tutorial's flat YAML is sorted into sections."""
    if all(isinstance(v, dict) for k, v in raw.items() if k in _SECTION_TYPES) and set(raw) <= set(_SECTION_TYPES):
        return raw
    index = _field_index()
    nested: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key in _SECTION_TYPES and isinstance(value, dict):
            nested.setdefault(key, {}).update(value)
            continue
        if key not in index:
            raise _unknown_key(key, list(_SECTION_TYPES) + list(index))
        section, name = index[key].split(".")
        nested.setdefault(section, {})[name] = value
    return nested


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set a.b=value` strings -> {"a.b": parsed value}. Values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        out[key.strip()] = parsed
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then dotted `overrides`."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in _SECTION_TYPES}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise UserError(f"{path} is not valid YAML{where}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UserError(f"{path} must be a YAML mapping of sections, got {type(raw).__name__}")
        for section, values in _nest(raw).items():
            merged[section].update(values)
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if section not in _SECTION_TYPES or not name:
            raise _unknown_key(dotted, all_keys())
        merged[section][name] = value
    return build_config(merged)


def build_config(merged: dict[str, dict[str, Any]]) -> Config:
    sections = {}
    for section, cls in _SECTION_TYPES.items():
        values = merged.get(section) or {}
        if not isinstance(values, dict):
            raise UserError(f"config section '{section}' must be a mapping, got {values!r}")
        hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__`
        kwargs = {}
        for name, value in values.items():
            if name not in hints:
                raise _unknown_key(f"{section}.{name}", all_keys())
            kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
        sections[section] = cls(**kwargs)
    return Config(**sections)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from a saved `config.yaml` (the resolved tree of an earlier run)."""
    return build_config({k: v for k, v in data.items() if k in _SECTION_TYPES})


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
