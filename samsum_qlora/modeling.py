"""Library config objects from ours (pure), and the one place that puts a model on a device.

`load_model` reads the base (4-bit when configured) onto this process's GPU, or the CPU;
everything else here reshapes a loaded model: NF4 dequantised once, LoRA adapters attached new or
from disk, merged for generation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from samsum_qlora import chat, choices, hf_compat, layout, runtime
from samsum_qlora.config import Config, LoraArgs, ModelArgs, QuantArgs, TrainArgs
from samsum_qlora.errors import UserError

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
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
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def model_shape(model_config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return {k: getattr(model_config, k, None) for k in keys}


# --- finding the model -----------------------------------------------------------------------------


def check_source(name: str) -> None:
    """A model that looks like a path must be one: say so, instead of the Hub's "Repo id must be
    in the form 'namespace/name'"."""
    path = Path(name).expanduser()
    if layout.is_local(name) and not path.exists():
        raise UserError(f"model {name} does not exist (give a model folder or a Hub id)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{name} holds no model: no config.json in it")


def load_tokenizer(m: ModelArgs):
    """The model's tokenizer, with `model.chat_template` in place of its own when given."""
    from transformers import AutoTokenizer

    check_source(m.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(m.name, revision=m.revision)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a tokenizer from {m.name}: {str(e).splitlines()[0]}") from None
    if m.chat_template is not None:
        tokenizer.chat_template = chat.read_template(m.chat_template)
    if not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of {m.name} has no chat template; set model.chat_template to a Jinja "
            "chat template (text or a .jinja file), or use an Instruct model"
        )
    return tokenizer


def chat_format(cfg: Config) -> chat.ChatFormat:
    """The model's tokenizer with its chat rules and `cfg.data`'s prompt settings: what every command
    that tokenises (train, eval, preprocess, bench, merge) builds first."""
    return chat.ChatFormat.build(load_tokenizer(cfg.model), cfg.data, generation_eos(cfg.model))


def generation_eos(m: ModelArgs) -> list[int]:
    """Every EOS id the model's generation_config.json names (Llama 3.2: end of text, eom, eot)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(m.name, revision=m.revision).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS is used
        return []
    return [eos] if isinstance(eos, int) else list(eos or [])


def module_names(m: ModelArgs) -> set[str]:
    """The last part of every module name of the model, built on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = read_config(m)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:
            raise UserError(f"{m.name} is a {config.model_type} model, not a causal language model") from None
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def read_config(m: ModelArgs):
    from transformers import AutoConfig

    check_source(m.name)
    try:
        return AutoConfig.from_pretrained(m.name, revision=m.revision)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the model config of {m.name}: {str(e).splitlines()[0]}") from None


def check_lora_targets(m: ModelArgs, lora: LoraArgs) -> None:
    """Every lora.target_modules name must be a module of the model: refused before loading."""
    names = module_names(m)
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        linear = sorted(n for n in names if n.endswith("_proj"))
        raise UserError(
            f"lora.target_modules: {m.name} has no module {', '.join(missing)}"
            + (f" (its projections: {', '.join(linear)})" if linear else "")
        )


# --- loading: the one place that touches the GPU ---------------------------------------------------


def load_model(m: ModelArgs, q: QuantArgs, *, training: bool):
    """The base model, 4-bit when configured, on this process's GPU if there is one (else the CPU)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    device = runtime.use_local_gpu()
    if device != "cpu":
        torch.backends.cuda.enable_cudnn_sdp(m.cudnn_attention)
    elif m.attn_implementation.startswith("flash_attention"):
        raise UserError(f"{m.attn_implementation} needs a CUDA GPU; use --set model.attn_implementation=sdpa")
    config = read_config(m)
    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                m.name,
                revision=m.revision,
                quantization_config=quantization_config(q),
                dtype=torch_dtype(q.bnb_4bit_compute_dtype),
                attn_implementation=m.attn_implementation,
                device_map={"": device},  # one process = one device
                **hf_compat.NO_HUB_KERNELS,  # the kernels measured here, offline too
            )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise UserError(f"{m.name} is a {config.model_type} model, not a causal language model") from None
        raise UserError(f"could not load model {m.name}: {str(e).splitlines()[0]}") from None
    except (OSError, RuntimeError, SafetensorError) as e:  # a truncated or corrupt weights file
        raise UserError(f"could not load the weights of {m.name}: {str(e).splitlines()[0][:200]}") from None
    if training:
        model.config.use_cache = False  # the KV cache is useless in training and breaks packed masks
        if m.liger_kernels:
            apply_fused_kernels(model)
    return model


@contextlib.contextmanager
def _quiet_loading():
    """transformers' loading report lists every missing tied weight; it is not news here."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def check_vocabulary(model, tokenizer) -> None:
    """Token ids beyond the embedding would index out of range on the first batch."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model embeds only {rows:,}: "
            "they do not belong together"
        )


# liger-kernel's RoPE (with CUDA graphs it made steps 14% faster, docs/performance.md). False:
# transformers' RoPE.
FUSED_ROPE = True


def flat_rope(rope):
    """`rope(q, k, cos, sin)` applied to a batch seen as one long row of all its tokens.

    liger-kernel's RoPE compiles anew for each batch row count (a compile-time constant to it),
    and bucketed batches have one row count per width: a fresh machine spent seconds of its first
    epoch compiling. Rotating a token depends only on its own cos/sin, so the flattened batch
    (views of the same memory) gives the same numbers and one compile serves every shape."""

    def reshaped(t, rows: int, width: int):  # (rows, heads, width, dim), as attention holds it
        return t.transpose(1, 2).reshape(rows, width, t.shape[1], t.shape[3]).transpose(1, 2)

    def apply(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        rows, width = q.shape[0], q.shape[2]
        cos, sin = (c.expand(rows, width, c.shape[-1]).reshape(1, rows * width, c.shape[-1]) for c in (cos, sin))
        q, k = rope(reshaped(q, 1, rows * width), reshaped(k, 1, rows * width), cos, sin)
        return reshaped(q, rows, width), reshaped(k, rows, width)

    return apply


CAUSAL_ATTENTION = "samsum_causal"


def plainly_causal(config) -> bool:
    """Every layer attends causally over the whole row: no sliding window, no bidirectional part."""
    layers = getattr(config, "layer_types", None) or ["full_attention"]
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return getattr(config, "is_causal", True) and not window and all(t == "full_attention" for t in layers)


@contextlib.contextmanager
def sdpa_swapped(model, name: str, attention, mask=None):
    """Within: an SDPA model attends with `attention`, registered as `name`, and builds its masks
    with `mask`; with no mask function it gets no mask at all (transformers' rule for external
    kernels). Other implementations are left alone."""
    config = model.config
    if hf_compat.attn_implementation(config) != "sdpa":
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    if mask is not None:
        AttentionMaskInterface.register(name, mask)
    hf_compat.set_attn_implementation(config, name)
    try:
        yield
    finally:
        hf_compat.set_attn_implementation(config, "sdpa")


def unmasked_causal_attention(model):
    """Within: an SDPA model whose batch has no padding mask attends with SDPA's `is_causal` and no
    mask at all, so SDPA runs its causal flash kernel. transformers builds the whole [T, T] mask
    instead whenever a CUDA graph is being captured (it takes a capture for tracing, and cannot rule
    out packed rows), and with a mask SDPA falls back to a slower kernel: 5.7 ms of attention per
    step instead of 3.6 on an H200; without a capture, that check reads the GPU (a sync). Models
    with sliding windows or other masks are left alone."""
    if not plainly_causal(model.config):
        return contextlib.nullcontext()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_swapped(model, CAUSAL_ATTENTION, sdpa_attention_forward)


def apply_fused_kernels(model) -> bool:
    """liger-kernel's RMSNorm and SwiGLU (and RoPE with FUSED_ROPE, one compile for every batch
    shape) for a Llama being trained on a GPU (the gain is in docs/performance.md). Elsewhere, or
    without the package, the model is left as it is."""
    if model.config.model_type != "llama" or not runtime.has_cuda():
        return False
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        print("note: pip install liger-kernel for fused kernels (faster training, less memory)")
        return False
    liger.apply_liger_kernel_to_llama(
        model=model, rope=False, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    if FUSED_ROPE:  # as liger patches it: the module's function, for every Llama in the process
        hf_compat.use_llama_rope(flat_rope(liger.liger_rotary_pos_emb))
    return True


def compile_fused_kernels(config, attn_implementation: str, dtype_name: str, device: int | str) -> None:
    """One forward and backward of a one-layer copy of the model with the fused kernels on, so
    that Triton compiles them (and keeps them on disk) before the real model's first step needs
    them. The copy's weights are left uninitialised (a compile does not mind), so no random number
    is drawn: a seeded run's LoRA initialisation stays what it is."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaModel

    if device != "cpu":  # a thread starts on GPU 0, and Triton launches on the current device
        torch.cuda.set_device(device)
    small = copy.deepcopy(config)
    small.num_hidden_layers, small.use_cache = 1, False
    small.vocab_size, small.pad_token_id = 128, None  # no fused kernel in the embedding: 0.5 GB saved
    hf_compat.set_attn_implementation(small, attn_implementation)
    # the class itself, not from_config: that one sets the process's default dtype, which the main
    # thread's loading relies on
    with torch.device("meta"):  # the architecture without initialising (or allocating) anything
        model = LlamaModel(small)
    model = model.to_empty(device=device).to(torch_dtype(dtype_name)).eval()
    apply_fused_kernels(model)
    ids = torch.zeros((16, 64), dtype=torch.long, device=device)
    model(input_ids=ids).last_hidden_state.float().sum().backward()
    del model
    if device != "cpu":  # its memory back to the card before the auto choices read what is free
        torch.cuda.empty_cache()


def start_compiling_fused_kernels(m: ModelArgs, q: QuantArgs) -> threading.Thread | None:
    """`compile_fused_kernels` in a thread, while the base loads: on a fresh machine (no Triton
    cache) compiling them took 3 s of the first training step. None where no fused kernels run."""
    import importlib.util

    if not (m.liger_kernels and runtime.has_cuda() and importlib.util.find_spec("liger_kernel")):
        return None  # without the package, loading says so once
    config = read_config(m)
    if config.model_type != "llama":
        return None
    device = runtime.use_local_gpu()  # this process's GPU under torchrun

    def run():
        try:
            compile_fused_kernels(config, m.attn_implementation, q.bnb_4bit_compute_dtype, device)
        except Exception:  # noqa: BLE001  only a head start: the first step compiles what is missing
            pass

    thread = threading.Thread(target=run, name="compile-fused-kernels", daemon=True)
    thread.start()
    return thread


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
                plain = torch.nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=weight.device,
                    dtype=dtype,
                )
                plain.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    plain.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
                setattr(parent, name, plain)
    hf_compat.mark_dequantized(model)  # peft and the Trainer now treat it as a plain model
    return model


def training_model(cfg: Config, tokenizer, t: TrainArgs | None = None):
    """(the model `train` trains and `bench` times, its TrainArgs with every auto decided, the
    `choices.Choices` made): the base as configured, checked against the tokenizer, with fresh LoRA
    adapters. `t`: this process's TrainArgs (default cfg.train)."""
    t = t or cfg.train
    compiling = start_compiling_fused_kernels(cfg.model, cfg.quantization)
    try:
        model = load_model(cfg.model, cfg.quantization, training=True)
    finally:  # done before the choices read the free memory
        if compiling:  # and before any step runs, or an error ends the process
            compiling.join()
    check_vocabulary(model, tokenizer)
    q = cfg.quantization
    dequantized = dequantized_bytes(model, q.bnb_4bit_compute_dtype) if q.load_in_4bit else 0
    chosen = choices.for_training(
        cfg, t, model.config, loaded_in_4bit=hf_compat.loaded_in_4bit(model), dequantized=dequantized
    )
    model = attach_new_adapters(
        model,
        cfg.lora,
        q,
        dequantize=chosen.dequantize_once,
        gradient_checkpointing=t.gradient_checkpointing is True,
        half_precision=t.bf16 or t.fp16,
    )
    t = dataclasses.replace(t, gradient_checkpointing=chosen.gradient_checkpointing, cuda_graphs=chosen.cuda_graphs)
    return model, t, chosen


def dequantized_bytes(model, dtype_name: str) -> int:
    """What the 4-bit layers' weights take once dequantised to `dtype_name`."""
    import bitsandbytes as bnb

    itemsize = torch_dtype(dtype_name).itemsize
    return sum(m.in_features * m.out_features * itemsize for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def dequantize_as_configured(model, q: QuantArgs) -> bool:
    """Whether `quantization.dequantize_once` (auto: `choices.for_generation`) dequantises this
    loaded base once."""
    return q.load_in_4bit and choices.for_generation(q, dequantized_bytes(model, q.bnb_4bit_compute_dtype))


def attach_new_adapters(
    model, lora: LoraArgs, q: QuantArgs, *, dequantize: bool, gradient_checkpointing: bool, half_precision: bool
):
    """Fresh LoRA adapters on the base: the QLoRA recipe (prepare_model_for_kbit_training on the
    4-bit model), or, with `dequantize`, on a dequantised copy for the fast path."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if q.load_in_4bit and dequantize:
        dequantize_base(model, q.bnb_4bit_compute_dtype)
    elif q.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        return get_peft_model(model, lora_config(lora))
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(lora))
    if half_precision:
        # Autocast already runs the adapter matmuls in half precision; peft's own cast of every
        # adapter input to float32 only adds copies (kept for backward) and kernels.
        hf_compat.stop_adapter_input_casts(model)
    return model


def check_adapters_fit(adapters: Path, base_name: str, base_config) -> None:
    """Refuse adapters trained on another architecture or size, naming both."""
    trained_on = layout.adapter_config(adapters).get("base_model_name_or_path") or "unknown base"
    shape, here = layout.trained_shape(adapters), model_shape(base_config)
    if shape and shape != here:
        raise UserError(f"adapters in {adapters} were trained on {trained_on} {shape}, not on {base_name} {here}")
    layout.check_adapter_weights(adapters)


def attach_saved_adapters(model, adapters: Path, base_name: str, merge: bool = False):
    """The base with trained adapters; with `merge`, folded into its (dequantised) weights."""
    from peft import PeftModel

    check_adapters_fit(adapters, base_name, model.config)
    try:
        model = PeftModel.from_pretrained(model, str(adapters))
    except (RuntimeError, ValueError, KeyError, OSError) as e:  # size mismatch, unknown modules, bad file
        raise UserError(
            f"adapters in {adapters} do not fit base model {base_name}: {str(e).splitlines()[0][:200]}"
        ) from None
    check_every_weight_loaded(model, adapters)
    return model.merge_and_unload() if merge else model


def check_every_weight_loaded(model, adapters: Path) -> None:
    """Every weight of the adapters file went into the model, and every adapted module got its own.
    peft only warns when they differ (an edited target_modules), and the model would be scored as
    the adapters with some of them dropped, or left at their initial values."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    weights = adapters / layout.ADAPTER_WEIGHTS
    if not weights.is_file():  # an older peft's adapter_model.bin: peft's own loading is all there is
        return
    with safe_open(weights, "pt") as f:
        saved = set(f.keys())
    wanted = set(get_peft_model_state_dict(model))
    unused, missing = sorted(saved - wanted), sorted(wanted - saved)
    if unused or missing:
        first = f"{len(unused)} weights of the file have no module to go to (e.g. {unused[0]})" if unused else ""
        second = f"{len(missing)} adapted weights are not in the file (e.g. {missing[0]})" if missing else ""
        raise UserError(
            f"adapters in {adapters} do not match their {layout.ADAPTER_CONFIG}: "
            + "; ".join(p for p in (first, second) if p)
            + " (was target_modules edited?)"
        )


def load_generation_model(m: ModelArgs, q: QuantArgs, adapters: Path | None, *, merge: bool):
    """The model eval generates with: the 4-bit base (dequantised once on the fast path) with the
    adapters attached, or merged in, unless scoring the base alone. Attached adapters stay float32,
    as in the tutorial's per-example loop; buffers (RoPE's float32 frequencies) are left alone."""
    model = load_model(m, q, training=False)
    fast = dequantize_as_configured(model, q)
    if fast:
        dequantize_base(model, q.bnb_4bit_compute_dtype)
    if adapters is not None:
        # Merging into 4-bit weights would requantise them: only a dequantised or plain base merges.
        model = attach_saved_adapters(model, adapters, m.name, merge=merge and (fast or not q.load_in_4bit))
    return model.eval()


def cast_parameters(model, dtype):
    """Cast the floating-point weights only. `model.to(dtype)` would also round buffers such as
    RoPE's float32 inverse frequencies, which turns every position's rotation by a little more."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model
