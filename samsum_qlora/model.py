"""Library config objects from ours (pure), and `load_model`: the one place that puts a model on
a device."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from samsum_qlora.config import Config, LoraArgs, QuantArgs
from samsum_qlora.errors import UserError

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(q: QuantArgs):
    """transformers.BitsAndBytesConfig from our QuantArgs; None when 4-bit is off."""
    if not q.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.bnb_4bit_compute_dtype),
    )


def lora_config(lora: LoraArgs):
    """peft.LoraConfig from our LoraArgs."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def lora_parameter_count(hidden: int, kv_dim: int, layers: int, lora: LoraArgs) -> int:
    """Trainable LoRA parameters for q/k/v/o of a Llama: r x (in + out) per adapted matrix."""
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv_dim), "v_proj": (hidden, kv_dim), "o_proj": (hidden, hidden)}
    return layers * sum(lora.lora_r * sum(shapes[m]) for m in lora.target_modules if m in shapes)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_device_settings(cfg: Config, cuda: bool, cpu_bf16: bool) -> None:
    """Settings that need a GPU, refused early with the --set that fixes them."""
    if cuda:
        return
    if cfg.train.fp16:
        raise UserError("train.fp16 needs a CUDA GPU and none was found; use --set train.fp16=false")
    if cfg.train.bf16 and not cpu_bf16:
        raise UserError("train.bf16 is not supported by this CPU and no CUDA GPU was found; use --set train.bf16=false")
    if cfg.model.attn_implementation == "flash_attention_2":
        raise UserError("flash_attention_2 needs a CUDA GPU; use --set model.attn_implementation=sdpa")


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except OSError as e:
        raise UserError(f"could not load a tokenizer from {name}: {str(e).splitlines()[0]}") from None
    if tokenizer.chat_template is None:
        raise UserError(f"the tokenizer of {name} has no chat template; use an Instruct model")
    return tokenizer


def load_model(cfg: Config, *, training: bool):
    """The base model, 4-bit when configured, on the GPU if there is one (else the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    if cuda:
        # Under torchrun this process's GPU must also be the current device: liger-kernel 0.8.5's
        # RoPE kernel launches on the current one, not its tensors'. (The Trainer sets it; eval would not.)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # off by default: measured on an H100, generation 3.3x and training 1.2x faster without it
        torch.backends.cuda.enable_cudnn_sdp(cfg.model.cudnn_attention)
    compute = torch_dtype(cfg.quantization.bnb_4bit_compute_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.name,
            revision=cfg.model.revision,
            quantization_config=quantization_config(cfg.quantization),
            dtype=compute if cfg.quantization.load_in_4bit else (torch.bfloat16 if cfg.train.bf16 else torch.float32),
            attn_implementation=cfg.model.attn_implementation,
            # one process = one GPU; under torchrun each rank takes its own
            device_map={"": int(os.environ.get("LOCAL_RANK", 0))} if cuda else {"": "cpu"},
        )
    except OSError as e:
        raise UserError(f"could not load model {cfg.model.name}: {str(e).splitlines()[0]}") from None
    if training:
        model.config.use_cache = False  # the KV cache is useless in training and breaks packed masks
    if cuda and cfg.model.liger_kernels:
        apply_fused_kernels(model)
    return model


def apply_fused_kernels(model) -> bool:
    """liger-kernel's RMSNorm, SwiGLU and RoPE for a Llama (measured on an H100: with 8192-token
    batches, 47.6K instead of ~30K tokens/s and less memory). Off the GPU, or without the package,
    the model is left as it is."""
    if model.config.model_type != "llama":
        return False
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        print("note: pip install liger-kernel for fused kernels (faster training, less memory)")
        return False
    apply_liger_kernel_to_llama(model=model, rope=True, rms_norm=True, swiglu=True,
                                cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def dequantize_base(model, dtype_name: str):
    """Swap every 4-bit linear layer for a frozen plain one holding its dequantised NF4 weights.

    The weights are the very numbers the 4-bit layer multiplies by (bitsandbytes dequantises to
    the compute dtype before each matmul); doing it once instead of on every call is what makes
    the fast path fast. Adapters trained or merged on this copy belong to the NF4 base."""
    import bitsandbytes as bnb
    import torch

    dtype = torch_dtype(dtype_name)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
                plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                        device=weight.device, dtype=dtype)
                plain.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    plain.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
                setattr(parent, name, plain)
    model.is_loaded_in_4bit = False  # peft and the Trainer now treat it as a plain model
    return model


def attach_new_adapters(model, cfg: Config):
    """Fresh LoRA adapters on the base: the QLoRA recipe (prepare_model_for_kbit_training on the
    4-bit model), or on the dequantised copy for the fast path."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization.load_in_4bit and cfg.quantization.dequantize_once:
        model = dequantize_base(model, cfg.quantization.bnb_4bit_compute_dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, lora_config(cfg.lora))
        if cfg.train.bf16 or cfg.train.fp16:
            # Autocast already runs the adapter matmuls in half precision; peft's own cast of
            # every adapter input to float32 only adds copies (kept for backward) and kernels.
            for module in model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
        return model
    if cfg.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg.lora))


def check_adapters_fit(adapters: Path, base_name: str, base_config) -> None:
    """Refuse adapters trained on another architecture or size, naming both."""
    cfg_file = adapters / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{adapters} holds no LoRA adapters (no adapter_config.json)")
    trained_on = json.loads(cfg_file.read_text()).get("base_model_name_or_path") or "unknown base"
    run_file = adapters.parent / "run.json"  # written by train beside lora_adapters/
    shape = json.loads(run_file.read_text()).get("model_shape") if run_file.is_file() else None
    here = model_shape(base_config)
    if shape and shape != here:
        raise UserError(f"adapters in {adapters} were trained on {trained_on} {shape}, not on {base_name} {here}")


def model_shape(model_config) -> dict:
    return {k: getattr(model_config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}


def attach_saved_adapters(model, adapters: Path, base_name: str, merge: bool = False):
    """The base with trained adapters; with `merge`, folded into its (dequantised) weights."""
    from peft import PeftModel

    check_adapters_fit(adapters, base_name, model.config)
    try:
        model = PeftModel.from_pretrained(model, str(adapters))
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, unknown modules
        raise UserError(
            f"adapters in {adapters} do not fit base model {base_name}: {str(e).splitlines()[0][:200]}"
        ) from None
    return model.merge_and_unload() if merge else model


def load_generation_model(cfg: Config, adapters: Path | None):
    """The model eval generates with: the 4-bit base (dequantised once on the fast path), with
    the adapters attached, or merged in, unless scoring the base alone."""
    model = load_model(cfg, training=False)
    if cfg.quantization.load_in_4bit and cfg.quantization.dequantize_once:
        model = dequantize_base(model, cfg.quantization.bnb_4bit_compute_dtype)
    if adapters is not None:
        # The adapters stay float32, as in the seed's per-example loop. (Casting the whole model
        # to bf16 instead also rounded RoPE's float32 inverse frequencies: on a trained 1B stand-in
        # batched greedy outputs then matched the loop on 52% of prompts instead of 81%.)
        model = attach_saved_adapters(model, adapters, cfg.model.name, merge=cfg.eval.merge_adapters)
    return model.eval()


def cast_parameters(model, dtype):
    """Cast the floating-point weights only. `model.to(dtype)` would also round buffers such as
    RoPE's float32 inverse frequencies, which turns every position's rotation by a little more."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model
