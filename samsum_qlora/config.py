"""One typed config tree, loaded from YAML; the command line only overrides it.

Precedence: ``--set`` > YAML > the dataclass defaults below, which are the shipped recipe
(``configs/llama32-1b-samsum.yaml``; a test keeps the two equal). Each field's comment is the one
description of that key: the shipped YAML and the README point here.

A config is only ever changed by building a new one (`load_config`, `with_overrides`), so every
check in the ``__post_init__`` methods holds for every config the package sees.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from samsum_qlora import hf_compat
from samsum_qlora.errors import UserError

DEFAULT_INSTRUCTION = "Summarize the following dialogue in one or two sentences."
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
DTYPES = ("bfloat16", "float16", "float32")
# eval's decoding settings, named as in transformers' GenerationConfig (seed aside)
DECODING_KEYS = (
    "num_beams",
    "length_penalty",
    "no_repeat_ngram_size",
    "repetition_penalty",
    "do_sample",
    "temperature",
    "top_p",
    "seed",
)
MIN_TEMPERATURE = 1e-3  # logits / temperature: below this, the likeliest token is drawn anyway
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _tristate(value: bool | str, key: str) -> bool | str:
    """true, false, or "auto" (the package decides on the device it runs on)."""
    choice = str(value).lower()
    _check(choice in ("true", "false", "auto"), f"{key} must be true, false or auto, got {value!r}")
    return "auto" if choice == "auto" else choice == "true"


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_path_fits(name: str, key: str) -> None:
    """A name that can be neither a folder here nor a Hub id (96 characters at most), because a part
    of it is longer than a file name may be: refused before a file system call fails on it."""
    longest = max(len(part.encode()) for part in name.split("/"))
    _check(longest <= 255, f"{key} has a part of {longest} bytes: too long for a folder name (255) or a Hub id (96)")


@dataclass
class ModelArgs:
    name: str = "meta-llama/Llama-3.2-1B-Instruct"  # Hub id or a local directory
    revision: str | None = None  # Hub branch, tag or commit; None = main
    # A Jinja chat template (text, or a path to a .jinja file) for a model whose tokenizer has
    # none, or to replace its own. The model's template decides prompt, BOS and end of turn.
    chat_template: str | None = None
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2 | flash_attention_3 | ...
    # Fused Triton kernels (liger-kernel) for RMSNorm, SwiGLU and RoPE when training a Llama on a
    # CUDA GPU: fewer kernel launches and less activation memory. Ignored elsewhere.
    liger_kernels: bool = True
    # cuDNN's attention builds a plan per new shape; batches here change shape every step, so
    # planning costs more than it saves.
    cudnn_attention: bool = False

    def __post_init__(self):
        _check(bool(self.name.strip()), "model.name is empty: give a Hub id or a model folder")
        _check_path_fits(self.name, "model.name")
        _check(
            self.attn_implementation in ATTENTION or "/" in self.attn_implementation,
            f"model.attn_implementation must be one of {', '.join(ATTENTION)} (or a Hub kernel "
            f"'org/name'), got {self.attn_implementation!r}",
        )
        if "/" in self.attn_implementation:
            lowest, excluded = hf_compat.hub_kernels_pin()
            _check(
                hf_compat.hub_kernels_available(),
                f"model.attn_implementation {self.attn_implementation!r} is a Hub kernel, which needs the kernels "
                f"package (pip install 'kernels>={lowest},<{excluded}'); or use one of {', '.join(ATTENTION)}",
            )


@dataclass
class QuantArgs:
    load_in_4bit: bool = True  # QLoRA: the frozen base in 4 bits, adapters in higher precision
    bnb_4bit_quant_type: str = "nf4"  # NF4 matches normally distributed weights better than fp4
    bnb_4bit_use_double_quant: bool = True  # quantise the quantisation constants too (~0.4 bit/param)
    # The dtype matmuls run in: the NF4 weights are dequantised to it; with load_in_4bit false
    # the base is loaded in it.
    bnb_4bit_compute_dtype: str = "bfloat16"
    # Dequantise the NF4 weights once after loading, into a frozen copy in the compute dtype,
    # instead of on every matmul: the same numbers, much faster, 2 bytes/param more memory.
    # auto: only when that copy takes at most half of the GPU memory still free (an 8B on a 24 GB
    # card keeps 4 bits); true / false force it.
    dequantize_once: bool | str = "auto"

    def __post_init__(self):
        self.dequantize_once = _tristate(self.dequantize_once, "quantization.dequantize_once")
        _check(
            self.bnb_4bit_quant_type in ("nf4", "fp4"),
            f"quantization.bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}",
        )
        _check(
            self.bnb_4bit_compute_dtype in DTYPES,
            f"quantization.bnb_4bit_compute_dtype must be one of {', '.join(DTYPES)}, "
            f"got {self.bnb_4bit_compute_dtype!r}",
        )


@dataclass
class LoraArgs:
    lora_r: int = 8  # adapter rank: higher = more capacity and memory
    lora_alpha: int = 16  # the update is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input; 0 also skips a kernel per module
    # Adapted layers, by module name (q_proj ... down_proj in a Llama); ~1.7 M params for the 1B.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False  # rank-stabilised LoRA: scale by alpha / sqrt(r), so high ranks keep learning
    use_dora: bool = False  # DoRA: learn each weight's magnitude apart from its direction (slower steps)

    def __post_init__(self):
        _check(self.lora_r >= 1, f"lora.lora_r must be at least 1, got {self.lora_r}")
        _check(self.lora_alpha > 0, f"lora.lora_alpha must be positive, got {self.lora_alpha}")
        _check(
            _finite(self.lora_dropout) and 0 <= self.lora_dropout < 1,
            f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}",
        )
        _check(
            bool(self.target_modules),
            "lora.target_modules is empty: name at least one module, e.g. [q_proj, v_proj]",
        )


@dataclass
class DataArgs:
    source: str = "knkarthick/samsum"  # Hub dataset id, or a local dir of train/validation/test files
    revision: str | None = None  # Hub revision of `source`; pin it for reproducible runs
    train_split: str = "train"
    task_instruction: str = DEFAULT_INSTRUCTION  # the system message (or the user turn's opening)
    max_length: int = 1024  # tokens per example; longer dialogues are shortened, summaries never
    date_string: str = "26 Jul 2024"  # pins a template's "Today Date" (Llama 3) so tokens never change
    max_train_samples: int | None = None  # train on the first N rows only (quick experiments)

    def __post_init__(self):
        _check(self.max_length >= 16, f"data.max_length must be at least 16 tokens, got {self.max_length}")
        _check(bool(self.task_instruction.strip()), "data.task_instruction is empty")
        _check_path_fits(self.source, "data.source")
        _check(
            self.max_train_samples is None or self.max_train_samples >= 1,
            f"data.max_train_samples must be at least 1 (or null for every row), got {self.max_train_samples}",
        )


VALIDATION_METRICS = ("rouge1", "rouge2", "rougeL", "loss")  # train.metric_for_best_model's choices


@dataclass
class TrainArgs:
    """Fields named as in transformers.TrainingArguments pass to it unchanged (the HF docs apply);
    `max_tokens_per_batch`, `trained_logits_only`, `pad_to_multiple_of`, `bucket_shapes` and
    `cuda_graphs` are ours."""

    output_dir: str = "outputs/lora_samsum"  # adapters land in <output_dir>/lora_adapters/
    per_device_train_batch_size: int = 4  # rows per batch; used only when max_tokens_per_batch is null
    gradient_accumulation_steps: int = 1
    # Batches of rows of similar length, at most this many tokens (padding included). 4096 tokens
    # is ~18 SAMSum rows: about the tutorial's 16 rows per optimizer step, so the same number of
    # steps per epoch (docs/quality.md). null = fixed rows of per_device_train_batch_size.
    max_tokens_per_batch: int | None = 4096
    trained_logits_only: bool = True  # project only the trained positions to the vocabulary
    pad_to_multiple_of: int = 32  # few distinct batch shapes: GPU kernels and memory blocks reused
    # Batches padded to a few shapes: 4 widths per doubling of length (multiples of
    # pad_to_multiple_of), rows filled up to the token budget with empty ones, trained positions to a
    # fifth of the batch. Kernels compile, and CUDA graphs are captured, once per shape (~10% padding).
    bucket_shapes: bool = True
    # Each batch shape's forward and backward captured once as a CUDA graph and replayed: one launch
    # instead of ~1,600 kernels issued by Python. auto: on for one CUDA GPU with bucket_shapes, where
    # no step draws random numbers (lora_dropout 0, no NEFTune), without gradient checkpointing, and
    # with room for the graphs' memory (a second batch's activations).
    cuda_graphs: bool | str = "auto"
    learning_rate: float = 2e-4  # LoRA tolerates ~10x the full fine-tuning rate
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    lr_scheduler_type: str = "cosine"  # any transformers SchedulerType
    warmup_steps: float = 0.03  # < 1 = a fraction of all steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = True  # needs an Ampere+ GPU (or a CPU with bf16); set fp16 on older cards
    fp16: bool = False
    optim: str = "adamw_torch_fused"  # any transformers OptimizerNames (the tutorial: paged_adamw_8bit)
    # Recompute activations in backward instead of keeping them: ~30% slower steps, much less memory.
    # auto: on only when a batch's activations would not fit in the GPU memory left after loading
    # (an 8B on a 24 GB card); true / false force it.
    gradient_checkpointing: bool | str = "auto"
    logging_steps: int = 10
    save_steps: int = 100  # checkpoint interval: how much a preemption can cost
    save_total_limit: int = 2  # keep only the newest N checkpoints
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["none"])  # [wandb] logs to W&B
    run_name: str | None = None
    dataloader_num_workers: int = 0
    neftune_noise_alpha: float | None = None  # NEFTune: noise on the input embeddings while training (e.g. 5)
    # Validation while training: the model being trained writes summaries of held-out dialogues with
    # eval's decoding (eval.num_beams ...), scored with ROUGE, and its loss on them is computed.
    # steps: every eval_steps optimizer steps and at the last one; no: never.
    eval_strategy: str = "no"
    eval_steps: int | None = None  # null = save_steps, so every evaluated step has its checkpoint
    # The validation rows: the first validation_rows rows of this split of data.source, or with
    # null, validation_rows rows drawn (seeded) out of data.train_split, which training then never sees.
    validation_split: str | None = "validation"
    validation_rows: int | None = 200  # null = the whole validation split
    metric_for_best_model: str = "rouge1"  # rouge1 | rouge2 | rougeL | loss: what makes an evaluation best
    load_best_model_at_end: bool = True  # publish the best evaluation's adapters rather than the last step's
    early_stopping_patience: int | None = None  # stop after N evaluations without a better metric; null = never

    def __post_init__(self):
        self.gradient_checkpointing = _tristate(self.gradient_checkpointing, "train.gradient_checkpointing")
        self.cuda_graphs = _tristate(self.cuda_graphs, "train.cuda_graphs")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        _check(bool(self.output_dir.strip()), "train.output_dir is empty: name a folder for the run")
        _check(
            not (self.bf16 and self.fp16), "train.bf16 and train.fp16 are both true: pick one (--set train.fp16=false)"
        )
        _check(
            self.per_device_train_batch_size >= 1 and self.gradient_accumulation_steps >= 1,
            "train.per_device_train_batch_size and train.gradient_accumulation_steps must be >= 1",
        )
        # Zero of either would train nothing and still publish (untrained) adapters.
        _check(
            _finite(self.num_train_epochs) and self.num_train_epochs > 0,
            f"train.num_train_epochs must be more than 0, got {self.num_train_epochs} (max_steps > 0 overrides it)",
        )
        _check(
            self.max_steps != 0, "train.max_steps=0 trains nothing: set it > 0, or -1 to train train.num_train_epochs"
        )
        _check(0 <= self.seed < 2**32, f"train.seed must be in 0 .. 4294967295 (2**32 - 1), got {self.seed}")
        _check(
            self.dataloader_num_workers >= 0,
            f"train.dataloader_num_workers must be >= 0 (0: the main process), got {self.dataloader_num_workers}",
        )
        _check(
            self.pad_to_multiple_of >= 1, f"train.pad_to_multiple_of must be at least 1, got {self.pad_to_multiple_of}"
        )
        _check(
            self.max_tokens_per_batch is None or self.max_tokens_per_batch >= 16,
            f"train.max_tokens_per_batch must be at least 16 (or null), got {self.max_tokens_per_batch}",
        )
        _check(
            _finite(self.learning_rate) and self.learning_rate > 0,
            f"train.learning_rate must be a positive finite number, got {self.learning_rate}",
        )
        _check(
            _finite(self.warmup_steps) and self.warmup_steps >= 0,
            f"train.warmup_steps must be >= 0 (a fraction of all steps when < 1), got {self.warmup_steps}",
        )
        _check(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            f"train.weight_decay must be >= 0, got {self.weight_decay}",
        )
        _check(
            _finite(self.max_grad_norm) and self.max_grad_norm >= 0,
            f"train.max_grad_norm must be >= 0, got {self.max_grad_norm}",
        )
        _check(
            self.neftune_noise_alpha is None or (_finite(self.neftune_noise_alpha) and self.neftune_noise_alpha > 0),
            f"train.neftune_noise_alpha must be a positive number (or null for none), got {self.neftune_noise_alpha}",
        )
        _check(
            self.logging_steps >= 1 and self.save_steps >= 1 and self.save_total_limit >= 1,
            "train.logging_steps, train.save_steps and train.save_total_limit must be >= 1",
        )
        self._check_library_names()
        self._check_validation()

    def _check_validation(self) -> None:
        _check(
            self.eval_strategy in ("no", "steps"),
            f"train.eval_strategy must be steps or no, got {self.eval_strategy!r} (for once an epoch, set "
            "train.eval_steps to the steps of an epoch, which train prints)",
        )
        _check(self.eval_steps is None or self.eval_steps >= 1, f"train.eval_steps must be >= 1, got {self.eval_steps}")
        _check(
            self.metric_for_best_model in VALIDATION_METRICS,
            f"train.metric_for_best_model must be one of {', '.join(VALIDATION_METRICS)}, "
            f"got {self.metric_for_best_model!r}",
        )
        _check(
            self.validation_rows is None or self.validation_rows >= 1,
            f"train.validation_rows must be at least 1 (or null for the whole split), got {self.validation_rows}",
        )
        _check(
            self.validation_split is not None or self.validation_rows is not None,
            "train.validation_rows=null holds out no training row: give a number, or a train.validation_split",
        )
        evaluating = self.eval_strategy == "steps"
        every = self.eval_steps or self.save_steps
        _check(
            not (evaluating and self.load_best_model_at_end and self.save_steps % every),
            f"train.save_steps={self.save_steps} is not a multiple of train.eval_steps={every}: the best step might "
            f"have no checkpoint to publish; set train.save_steps={every} (or a multiple of it)",
        )
        patience = self.early_stopping_patience
        _check(
            patience is None or patience >= 1, f"train.early_stopping_patience must be >= 1 (or null), got {patience}"
        )
        _check(
            patience is None or (evaluating and self.load_best_model_at_end),
            "train.early_stopping_patience needs evaluations and the best of them kept: set "
            "train.eval_strategy=steps and train.load_best_model_at_end=true",
        )

    def _check_library_names(self) -> None:
        """Names transformers resolves late, deep inside a traceback: refused here instead."""
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        for key, value, choices in (
            ("optim", self.optim, OptimizerNames),
            ("lr_scheduler_type", self.lr_scheduler_type, SchedulerType),
        ):
            names = [c.value for c in choices]
            if value not in names:
                close = difflib.get_close_matches(value, names, n=3, cutoff=0.5)
                hint = f"did you mean {' or '.join(close)}?" if close else f"one of: {', '.join(names)}"
                raise UserError(f"train.{key} {value!r} is not a transformers {choices.__name__}; {hint}")


@dataclass
class EvalArgs:
    split: str = "test"
    # Prompts generated together, longest first: at most batch_size rows and max_tokens_per_batch
    # KV-cache tokens (rows x (longest prompt + max_new_tokens)); fewer, bigger batches are faster
    # and the cache is ~32 KB/token for the 1B, so 262,144 tokens take ~8 GiB.
    batch_size: int = 512
    max_tokens_per_batch: int = 262_144
    # Fold the adapters into a copy of the (dequantised) base for generation: one matmul per
    # layer instead of three. Bf16 rounding of the merged weights moves greedy outputs a little.
    merge_adapters: bool = True
    # Replay each decoding step as one CUDA graph instead of hundreds of kernel launches (CUDA
    # only; falls back to plain launches, with a note, where capture fails).
    cuda_graphs: bool = True
    max_new_tokens: int = 128  # SAMSum summaries average ~25 tokens
    limit: int | None = None  # score only the first N examples
    output_dir: str | None = None  # default: <train.output_dir>/eval (eval-base with --base-only)
    # Decoding, each key as transformers' GenerationConfig means it. Greedy (the default), beam
    # search and sampling run on our fast decoder; repetition controls and sampled beams on
    # transformers' batched `generate` (slower). Beams take num_beams x the KV cache, so batches
    # hold 1/num_beams of max_tokens_per_batch.
    num_beams: int = 1  # beam search with this many beams per dialogue; 1 = none
    length_penalty: float = 1.0  # beam search: > 1 favours longer summaries, < 1 shorter ones
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this many tokens repeats (the dialogue's count too)
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the dialogue or summary less likely
    do_sample: bool = False  # draw each token at random instead of taking the likeliest
    temperature: float = 1.0  # sampling: < 1 sharper, > 1 flatter (no top-k: temperature and top_p only)
    top_p: float = 1.0  # sampling: draw from the fewest likeliest tokens holding this probability
    seed: int = 42  # sampling: each batch is seeded from it and its rows, so reruns and resumes repeat

    def __post_init__(self):
        _check(self.batch_size >= 1, f"eval.batch_size must be at least 1, got {self.batch_size}")
        _check(
            self.max_tokens_per_batch >= 16,
            f"eval.max_tokens_per_batch must be at least 16, got {self.max_tokens_per_batch}",
        )
        _check(self.max_new_tokens >= 1, f"eval.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        _check(self.limit is None or self.limit >= 1, f"eval.limit must be at least 1, got {self.limit}")
        _check(
            self.output_dir is None or bool(self.output_dir.strip()),
            "eval.output_dir is empty: name a folder, or null for the default",
        )
        self._check_decoding()

    def _check_decoding(self) -> None:
        _check(self.num_beams >= 1, f"eval.num_beams must be at least 1 (1 = no beam search), got {self.num_beams}")
        _check(
            _finite(self.length_penalty) and (self.length_penalty == 1 or self.num_beams > 1),
            f"eval.length_penalty={self.length_penalty} acts only in beam search: set eval.num_beams > 1, "
            "or eval.length_penalty=1.0",
        )
        _check(
            self.no_repeat_ngram_size >= 0,
            f"eval.no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}",
        )
        # Generation divides (or multiplies) logits by these in float32: far from 1, logits overflow
        # to inf and sampling fails with "probability tensor contains inf/nan" after the model has
        # loaded, or round to 0 (1e-300 is 0 in float32). Long before that they stop meaning anything.
        low, high = REPETITION_PENALTY_RANGE
        _check(
            _finite(self.repetition_penalty) and low <= self.repetition_penalty <= high,
            f"eval.repetition_penalty must be in [{low}, {high}] (1.0 = off, 1.1 to 1.3 is usual), "
            f"got {self.repetition_penalty}",
        )
        _check(
            _finite(self.temperature) and self.temperature > 0,
            f"eval.temperature must be more than 0, got {self.temperature}; for greedy decoding set "
            "eval.do_sample=false (and leave eval.temperature at 1.0)",
        )
        _check(
            self.temperature >= MIN_TEMPERATURE,
            f"eval.temperature={self.temperature} is below {MIN_TEMPERATURE}, where sampling is greedy decoding "
            "with a risk of overflow: set eval.do_sample=false (and eval.temperature=1.0) for greedy decoding",
        )
        _check(
            _finite(self.top_p) and 0 < self.top_p <= 1,
            f"eval.top_p must be in (0, 1] (1.0 = off), got {self.top_p}",
        )
        for key in ("temperature", "top_p"):
            _check(
                self.do_sample or getattr(self, key) == 1,
                f"eval.{key}={getattr(self, key)} acts only when sampling: set eval.do_sample=true, or eval.{key}=1.0",
            )
        _check(self.seed >= 0, f"eval.seed must be >= 0, got {self.seed}")

    def decoding(self) -> dict[str, Any]:
        """The decoding settings, by key: what generation and the API take."""
        return {key: getattr(self, key) for key in DECODING_KEYS}


@dataclass
class ApiArgs:
    """An OpenAI-compatible Chat Completions endpoint, for `eval --api-model NAME`."""

    base: str = "https://api.openai.com/v1"  # the API root (vLLM, Ollama, LiteLLM: http://host:port/v1)
    concurrency: int = 8  # requests in flight at once
    timeout: float = 60.0  # seconds to wait for one answer before retrying it
    max_attempts: int = 6  # tries per request on 429, 5xx and dropped connections, with backoff

    def __post_init__(self):
        _check(bool(self.base.strip()), "api.base is empty: give the API root, e.g. https://api.openai.com/v1")
        _check(self.concurrency >= 1, f"api.concurrency (--api-concurrency) must be at least 1, got {self.concurrency}")
        _check(
            _finite(self.timeout) and self.timeout > 0,
            f"api.timeout (--api-timeout) must be more than 0 seconds, got {self.timeout}",
        )
        _check(self.max_attempts >= 1, f"api.max_attempts must be at least 1, got {self.max_attempts}")


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    quantization: QuantArgs = field(default_factory=QuantArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    api: ApiArgs = field(default_factory=ApiArgs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {
    "model": ModelArgs,
    "quantization": QuantArgs,
    "lora": LoraArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "eval": EvalArgs,
    "api": ApiArgs,
}
# Keys of the tutorial's flat config.yaml that are not our field names.
FLAT_ALIASES = {
    "model_name": "model.name",
    "model_id": "model.name",
    "dataset_name": "data.source",
    "dataset": "data.source",
    "max_seq_length": "data.max_length",
    "task_instruction": "data.task_instruction",
}

# The tutorial's recipe as overrides of any config. What it learns: 4 rows x 4 accumulation
# steps, LoRA dropout 0.05, paged 8-bit AdamW. How it computes that: rows padded to the longest,
# gradient checkpointing, all logits, bitsandbytes' 4-bit matmuls, no fused kernels, torch's
# attention backends as they come.
TUTORIAL_LEARNING = {
    "lora": {"lora_dropout": 0.05},
    "train": {
        "max_tokens_per_batch": None,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "optim": "paged_adamw_8bit",
    },
}
TUTORIAL_KERNELS = {
    "model": {"liger_kernels": False, "cudnn_attention": True},
    "quantization": {"dequantize_once": False},
    "train": {
        "gradient_checkpointing": True,
        "trained_logits_only": False,
        "pad_to_multiple_of": 1,
        "bucket_shapes": False,
        "cuda_graphs": False,
    },
    "eval": {"merge_adapters": False, "cuda_graphs": False},
}


def merged(*sections: dict) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for tree in sections:
        for section, values in tree.items():
            out.setdefault(section, {}).update(values)
    return out


TUTORIAL_RECIPE = merged(TUTORIAL_LEARNING, TUTORIAL_KERNELS)


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str, candidates: list[str]) -> UserError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce_number(value: Any, tp: type, key: str) -> Any:
    """A number for an int or float key. Text (from --set or a config file) is read as a decimal
    number: a whole-number key takes only a whole one (`1.25e1` is not 12, `010` is ten, `0x10` is
    refused), where YAML would read octal, hexadecimal and sexagesimal forms."""
    kind = "a whole number" if tp is int else "a number"
    if isinstance(value, bool):
        raise UserError(f"{key} must be {kind}, got {value!r}")
    if isinstance(value, str):
        try:
            number = decimal.Decimal(value.strip())
        except decimal.InvalidOperation:
            raise UserError(f"{key} must be {kind}, got {value!r}") from None
        if tp is float:
            return float(number)
        if not number.is_finite() or number != number.to_integral_value():
            raise UserError(f"{key} must be a whole number, got {value!r}")
        return int(number)
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise UserError(f"{key} must be a whole number, got {value!r}")
    try:
        return tp(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{key} must be {kind}, got {value!r}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML or --set value against the field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        args = [a for a in members if a is not type(None)]
        if (value is None or (isinstance(value, SetValue) and value in NULLS)) and len(args) < len(members):
            return None
        for candidate in args[:-1]:  # the first type the value fits (bool | str: true, false or "auto")
            try:
                return _coerce(value, candidate, key)
            except UserError:
                continue
        return _coerce(value, args[-1], key)
    if isinstance(value, SetValue) and tp not in (int, float):  # numbers read their text as decimal
        value = str(value) if tp is str else _yaml_value(value)
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
        return _coerce_number(value, tp, key)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise UserError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _nest(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sectioned YAML passes through; the tutorial's flat YAML is sorted into sections."""
    index = {f.name: f"{s}.{f.name}" for s, cls in reversed(SECTIONS.items()) for f in dataclasses.fields(cls)}
    index.update(FLAT_ALIASES)
    nested: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None:  # a section whose keys are all commented out
                value = {}
            if not isinstance(value, dict):
                raise UserError(
                    f"config section '{key}' must be a mapping of keys, got {type(value).__name__} {value!r:.60}"
                )
            nested.setdefault(key, {}).update(value)
            continue
        if key not in index:
            raise _unknown_key(str(key), list(SECTIONS) + list(index))
        section, name = index[key].split(".")
        nested.setdefault(section, {})[name] = value
    return nested


class SetValue(str):
    """A value exactly as typed: a `--set` value, or a config file's unquoted scalar that YAML would
    read as a number, a boolean or a date. A string field keeps the text (read as YAML, 0777123 would
    be an octal number, `#` would start a comment, Yes would be True, 1:30 would be 90); a number
    field reads it as a decimal number; any other field reads it as YAML."""


NULLS = ("null", "Null", "NULL", "~")  # YAML's null: what `--set` gives an optional field to unset it


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set a.b=value` strings -> {"a.b": SetValue(value)}; each field reads it as its type."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = SetValue(value)
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error: otherwise the
    last one silently wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _source_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> SetValue:
    return SetValue(loader.construct_scalar(node))


for _tag in ("bool", "int", "float", "timestamp"):  # what YAML would turn into something other than text
    _UniqueKeyLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _source_text)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`, or a one-line UserError saying what is wrong with the file."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file: a config is UTF-8 YAML") from None
    except _DuplicateKey as e:
        raise UserError(
            f"{path} line {e.line}: '{e.key}' is given twice (the last would silently win); keep one"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a YAML mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then dotted `overrides`."""
    tree: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if path is not None:
        for section, values in _nest(read_yaml(Path(path))).items():
            tree[section].update(values)
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or not name:
            raise _unknown_key(dotted, all_keys())
        tree[section][name] = value
    return build_config(tree)


def build_config(tree: dict[str, dict[str, Any]]) -> Config:
    sections = {}
    for section, cls in SECTIONS.items():
        values = tree.get(section) or {}
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


def with_overrides(cfg: Config, sections: dict[str, dict[str, Any]]) -> Config:
    """`cfg` with some values replaced, checked like any loaded config."""
    tree = cfg.to_dict()
    for section, values in sections.items():
        tree[section].update(values)
    return build_config(tree)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def field_comments(cls: type) -> dict[str, list[str]]:
    """Each field's comments in the dataclass source: the lines above it and the one beside it.
    The one description of every key; the shipped YAML and `samsum-qlora config` print them."""
    import inspect
    import re

    comments: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped[1:].strip())
        elif m := re.match(r"(\w+): [^=]+= .*?(?:  # (.*))?$", stripped):
            comments[m.group(1)] = pending + ([m.group(2)] if m.group(2) else [])
            pending = []
        else:
            pending = []
    return comments


def annotated_yaml(cfg: Config) -> str:
    """`cfg` as YAML, every key with its comment from the dataclasses above."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        comments = field_comments(cls)
        for name, value in getattr(cfg, section).__dict__.items():
            text = yaml.safe_dump({name: value}, default_flow_style=True, allow_unicode=True, width=1000)
            text = text.strip()[1:-1]  # {key: value} -> key: value
            about = comments.get(name, [])
            if len(about) > 1:  # a paragraph above the key, a phrase beside it
                lines += [f"  # {c}" for c in about]
            lines.append(f"  {text}" + (f"  # {about[0]}" if len(about) == 1 else ""))
        lines.append("")
    return "\n".join(lines)
