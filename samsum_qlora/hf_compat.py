"""Every place the package leans on transformers', peft's or accelerate's private or undocumented
surface, in one room: on an upgrade, read this list and run tests/test_hf_compat.py.

Each touch point is a small function or constant below; the rest of the package calls it and never
names the private thing itself (tests/test_architecture.py checks). "Checked" names the releases the
touch point was in use with: transformers 5.17 (the GPU machine's image, where the project ran and
was measured before 5.25) and 5.25.0 (the newest pyproject allows, what CI installs, where
tests/test_hf_compat.py passes); peft 0.21.2, accelerate 1.16.0.

  touch point                                     here                        used by                 checked
  `from_pretrained(use_kernels=False)`            NO_HUB_KERNELS              modeling.load_model     5.25.0
  `config._attn_implementation` read and written  attn_implementation,        modeling.sdpa_swapped,  5.17, 5.25.0
                                                  set_attn_implementation     compile_fused_kernels
  `modeling_llama.apply_rotary_pos_emb` rebound   use_llama_rope              modeling (liger, GPU)   5.17, 5.25.0
  `TrainingArguments._n_gpu` written              train_on_one_gpu            training                5.17, 5.25.0
  `Trainer._track_num_input_tokens` overridden    OVERRIDDEN_TRAINER_METHODS  training.LossTrainer    5.17, 5.25.0
  `Trainer._prepare_inputs` called                prepare_inputs              training.LossTrainer    5.17, 5.25.0
  `Trainer.loss_is_scaled_for_ga` read            loss_is_scaled_for_ga       training (CUDA graphs)  5.17, 5.25.0
  `Trainer.model_accepts_loss_kwargs` read        model_accepts_loss_kwargs   training (CUDA graphs)  5.17, 5.25.0
  `Trainer._load_best_model` called               load_best_model             commands.train          5.25.0
  `ProgressCallback.training_bar` inherited       PROGRESS_BAR                training                5.17, 5.25.0
  the Cache protocol, duck-typed                  CACHE_PROTOCOL              generation.SlotCache    5.17, 5.25.0
  the decoder forward's cache keyword, sniffed    cache_keyword               generation              5.17, 5.25.0
  `model.is_loaded_in_4bit` read and written      loaded_in_4bit,             modeling,               5.17, 5.25.0
                                                  mark_dequantized            commands.train
  `import_utils.KERNELS_MIN/MAX_VERSION`          hub_kernels_available,      config.ModelArgs        5.17, 5.25.0
                                                  hub_kernels_pin
  peft LoRA layers' `cast_input_dtype_enabled`   stop_adapter_input_casts,   modeling, validation    peft 0.21.2
                                                  uncast_adapter_layers,
                                                  set_input_casts
  accelerate's `model._original_forward`          forward_without_autocast    validation              accelerate 1.16.0

Imported from an internal module path and called as transformers calls them (tests here check the
signatures): `transformers.integrations.sdpa_attention.sdpa_attention_forward` (modeling,
generation.decode_attention), `transformers.masking_utils.sdpa_mask` and `AttentionMaskInterface`
(generation, modeling), the temperature and top-p warpers of `transformers.generation.logits_process`
(generation).

Behaviour copied rather than touched (tests compare ours with transformers' own; rerun them on an
upgrade): generation.BeamSearch is generate's beam search, generation's sampling its `_sample`, an
unfull SlotCache grows as DynamicCache does (tests/test_generation.py); modeling.flat_rope rotates
as `apply_rotary_pos_emb` does (tests/test_modeling.py); training.trained_token_loss is the model's
own causal-LM loss (tests/test_training.py).
"""

from __future__ import annotations

import inspect

# --- loading ---------------------------------------------------------------------------------------

# For AutoModelForCausalLM.from_pretrained. transformers >= 5.25 swaps layers for kernels fetched
# from the Hub at load when `kernels` is installed (a dependency of 5.25): offline, loading fails on
# a GPU; online, unmeasured remote code would replace the RoPE our fast path patches. Checked:
# 5.25.0. If the keyword goes, from_pretrained no longer reads it and Hub kernels load again.
NO_HUB_KERNELS = {"use_kernels": False}


def attn_implementation(config) -> str:
    """The attention a model's layers dispatch to, transformers' private `config._attn_implementation`
    (`attn_implementation=` only sets it at load). Checked: 5.17 and 5.25.0. If it changes, the swaps
    of modeling.sdpa_swapped stop taking effect (decoding and bucketed training lose their kernels)."""
    return config._attn_implementation


def set_attn_implementation(config, name: str) -> None:
    """A loaded model attends with `name` (an AttentionInterface registration) from its next forward
    on: every layer reads the config at each call. Checked: 5.17 and 5.25.0."""
    config._attn_implementation = name


def use_llama_rope(rope) -> None:
    """Rebind `apply_rotary_pos_emb` of transformers.models.llama.modeling_llama, the module global
    LlamaAttention.forward calls, for every Llama in the process (as liger-kernel patches it).
    Checked: 5.17 and 5.25.0 (on a GPU only: liger's fused RoPE). If attention stops reading the
    global, the fused RoPE silently stops running: training is slower, not wrong."""
    from transformers.models.llama import modeling_llama

    modeling_llama.apply_rotary_pos_emb = rope


# --- the Trainer -----------------------------------------------------------------------------------


def train_on_one_gpu(args) -> None:
    """One process seeing several GPUs trains on one: `TrainingArguments.n_gpu` is a read-only
    property over the private `_n_gpu`, and the Trainer wraps the model in nn.DataParallel when it
    is above 1. Checked: 5.17 and 5.25.0. If it changes, such a process trains with DataParallel."""
    args._n_gpu = 1


# training.LossTrainer overrides these private Trainer methods by name (Python needs them on the
# subclass); tests/test_hf_compat.py checks that the Trainer still defines and calls each, with the
# same signature. `_track_num_input_tokens(self, inputs)`: real tokens counted on the CPU.
# Checked: 5.17 and 5.25.0. If it is renamed, the Trainer counts on the GPU again (a sync a step).
OVERRIDDEN_TRAINER_METHODS = ("_track_num_input_tokens",)

# training.ReadableProgress writes through the tqdm bar its base class, ProgressCallback, keeps in
# this attribute (None outside training). Checked: 5.17 and 5.25.0.
PROGRESS_BAR = "training_bar"


def prepare_inputs(trainer, inputs: dict) -> dict:
    """A batch moved to the Trainer's device as its own training_step moves it
    (`Trainer._prepare_inputs`). Checked: 5.17 and 5.25.0. If it changes, the CUDA-graph step and
    the validation loss fail at once."""
    return trainer._prepare_inputs(inputs)


def loss_is_scaled_for_ga(trainer) -> bool | None:
    """Whether compute_loss's loss is already divided for gradient accumulation
    (`Trainer.loss_is_scaled_for_ga`; None: the Trainer decides, as in releases without it).
    Checked: 5.17 and 5.25.0. The CUDA-graph step computes the Trainer's loss only when it is not
    False."""
    return getattr(trainer, "loss_is_scaled_for_ga", None)


def model_accepts_loss_kwargs(trainer) -> bool:
    """Whether the Trainer hands `num_items_in_batch` to the loss rather than rescaling the loss
    itself (`Trainer.model_accepts_loss_kwargs`, set in its __init__). Checked: 5.17 and 5.25.0.
    The CUDA-graph step runs only when it is true."""
    return trainer.model_accepts_loss_kwargs


def load_best_model(trainer) -> None:
    """The Trainer's own end-of-run load of the best checkpoint (`Trainer._load_best_model`, what
    `load_best_model_at_end` runs), for a run stopped by a signal. Checked: 5.25.0. If it changes,
    a stopped run fails to publish its best adapters."""
    trainer._load_best_model()


# --- decoding --------------------------------------------------------------------------------------

# What transformers' decoder forward (attention layers, mask building) calls on a cache:
# generation.SlotCache implements exactly these, duck-typed (it is no `Cache` subclass).
# Checked: 5.17 and 5.25.0. A member newly called there fails our decoding with an AttributeError.
CACHE_PROTOCOL = ("update", "get_seq_length", "get_query_offset", "get_mask_sizes")
# asked for with a default (`getattr(cache, name, False)`): SlotCache leaves them out
CACHE_OPTIONAL = ("is_compileable",)


def cache_keyword(model) -> str:
    """The decoder forward's name for the KV cache, read off its signature: `cache` in newer
    transformers, `past_key_values` before. Checked: 5.17 and 5.25.0. Were it neither, the cache
    would vanish into **kwargs and decoding would go wrong (the decoding tests fail)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", base)
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


# --- flags on models and layers --------------------------------------------------------------------


def loaded_in_4bit(model) -> bool:
    """Whether the model holds bitsandbytes 4-bit layers: the `is_loaded_in_4bit` flag transformers'
    4-bit loading sets, and the Trainer, peft and accelerate read. Checked: 5.17 and 5.25.0."""
    return bool(getattr(model, "is_loaded_in_4bit", False))


def mark_dequantized(model) -> None:
    """After modeling.dequantize_base: peft and the Trainer treat the model as a plain one (no k-bit
    preparation, DataParallel allowed), and so does `loaded_in_4bit`. Checked: 5.17 and 5.25.0."""
    model.is_loaded_in_4bit = False


INPUT_CAST = "cast_input_dtype_enabled"  # on peft's LoRA layers: cast each input to the adapter's dtype


def stop_adapter_input_casts(model) -> None:
    """Every peft layer of `model` leaves its input's dtype alone (autocast already runs the adapter
    matmuls in half precision). Checked: peft 0.21.2. If peft renames the flag, training makes the
    float32 copies again: slower, not wrong."""
    for module in model.modules():
        if hasattr(module, INPUT_CAST):
            setattr(module, INPUT_CAST, False)


def uncast_adapter_layers(model) -> list:
    """The peft layers of `model` whose input cast is off (`stop_adapter_input_casts`)."""
    return [m for m in model.modules() if getattr(m, INPUT_CAST, None) is False]


def set_input_casts(modules, enabled: bool) -> None:
    for module in modules:
        setattr(module, INPUT_CAST, enabled)


def forward_without_autocast(model):
    """The forward accelerate kept as `model._original_forward` when it wrapped `model.forward` in
    mixed-precision autocast (a Trainer with bf16 or fp16); None where forward is not wrapped.
    Checked: accelerate 1.16.0 (transformers 5.25.0). If it changes, validation decodes under
    autocast, whose cast cache a CUDA graph cannot capture."""
    if vars(model).get("forward") is None or not hasattr(model, "_original_forward"):
        return None
    return model._original_forward


# --- Hub attention kernels -------------------------------------------------------------------------


def hub_kernels_available() -> bool:
    """Whether `kernels`, which transformers loads Hub attention kernels with, is installed."""
    from transformers.utils import import_utils

    return import_utils.is_kernels_available()


def hub_kernels_pin() -> tuple[str, str]:
    """(lowest, first excluded) `kernels` version transformers accepts: its internal
    `import_utils.KERNELS_MIN_VERSION` and `KERNELS_MAX_VERSION`, quoted in config's advice.
    Checked: 5.17 and 5.25.0."""
    from transformers.utils import import_utils

    return import_utils.KERNELS_MIN_VERSION, import_utils.KERNELS_MAX_VERSION
