"""Decide once: every automatic choice of a run (`auto` in the config) with the reason it says.

The policies are pure functions of the config, the model's shape and the memory free on the GPU;
`for_training` and `for_generation` read that memory (the only reads in the package) and return
the record the run follows and `train_metrics.json["chosen"]` keeps. No other room asks a policy
question: `modeling` loads and attaches as told, `training` runs the steps as told.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from samsum_qlora import runtime
from samsum_qlora.config import Config, QuantArgs, TrainArgs
from samsum_qlora.errors import UserError


@dataclass(frozen=True)
class Choices:
    """What a training run does where the config says auto, and why (lines already said)."""

    dequantize_once: bool  # faster steps: the 4-bit base dequantised once, not at every matmul
    gradient_checkpointing: bool  # less memory: activations recomputed in backward
    cuda_graphs: bool  # faster steps: each batch shape's step replayed as one CUDA graph
    reasons: tuple[str, ...] = ()

    def record(self) -> dict:
        return {
            "dequantize_once": self.dequantize_once,
            "gradient_checkpointing": self.gradient_checkpointing,
            "cuda_graphs": self.cuda_graphs,
            "reasons": list(self.reasons),
        }


def decide(
    cfg: Config,
    t: TrainArgs,
    model_config,
    *,
    loaded_in_4bit: bool,
    dequantized: int,
    free: int | None,
    cuda: bool,
    processes: int,
) -> Choices:
    """The training run's choices, in the order they build on each other: the copy of the base
    (`dequantized` bytes) takes its room first, then a batch's activations decide checkpointing in
    what is left, then what is left decides the graphs' memory pool. `free`: as the loaded base
    leaves the GPU (None on a CPU)."""
    q = cfg.quantization
    dequantize, why_dequantize = should_dequantize(q, dequantized, free)
    # The copy is counted whole; the 4-bit weights it replaces (a quarter of it) are not given back.
    left = None if free is None else free - (dequantized if dequantize else 0)
    in_4bit = loaded_in_4bit and not dequantize
    tokens = t.max_tokens_per_batch or t.per_device_train_batch_size * cfg.data.max_length
    checkpoint, why_checkpoint = should_checkpoint(t, model_config, in_4bit=in_4bit, tokens=tokens, free=left)
    decided = dataclasses.replace(t, gradient_checkpointing=checkpoint)
    room = graphs_fit(activation_bytes(model_config, in_4bit=in_4bit, tokens=tokens), left)
    graphs, why_graphs = should_capture(decided, cfg.lora.lora_dropout, cuda=cuda, processes=processes, room=room)
    reasons = tuple(why for why in (why_dequantize, why_checkpoint, why_graphs) if why)
    return Choices(dequantize, checkpoint, graphs, reasons)


def for_training(cfg: Config, t: TrainArgs, model_config, *, loaded_in_4bit: bool, dequantized: int) -> Choices:
    """`decide` on this process's GPU, as the loaded base leaves it; each reason said once."""
    rt = runtime.current()
    free, cuda = runtime.free_memory(), runtime.has_cuda()
    chosen = decide(
        cfg,
        t,
        model_config,
        loaded_in_4bit=loaded_in_4bit,
        dequantized=dequantized,
        free=free,
        cuda=cuda,
        processes=rt.world_size,
    )
    for why in chosen.reasons:
        rt.say(why)
    return chosen


def for_generation(q: QuantArgs, dequantized: int) -> bool:
    """Whether eval's loaded 4-bit base is dequantised once (`dequantized` bytes), saying why."""
    chosen, why = should_dequantize(q, dequantized, runtime.free_memory())
    if why:
        runtime.current().say(why)
    return chosen


# --- the policies -----------------------------------------------------------------------------------


def size(n: int) -> str:
    """Bytes as a person reads them: GiB, or MiB below a tenth of one."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


# Activation memory per token, layer and hidden unit of a training step, measured on an H200 with the
# Llama-3.2-1B shape at 4,096-token batches (docs/performance.md): what `should_checkpoint` expects.
ACTIVATION_BYTES = {"dequantized": 45, "4-bit": 67}


def activation_bytes(model_config, *, in_4bit: bool, tokens: int) -> int:
    """What a training step of `tokens` keeps for backward, by ACTIVATION_BYTES."""
    per_unit = ACTIVATION_BYTES["4-bit" if in_4bit else "dequantized"]
    return tokens * model_config.num_hidden_layers * model_config.hidden_size * per_unit


def graphs_fit(activations: int, free: int | None) -> bool:
    """Room for CUDA graphs of the training step: their memory pool keeps a second batch's
    activations beside the eager steps' ones, and both must fit in 90% of the free memory."""
    return free is None or 2 * activations <= 0.9 * free


def should_checkpoint(t: TrainArgs, model_config, *, in_4bit: bool, tokens: int, free: int | None) -> tuple[bool, str]:
    """(recompute activations in backward?, why). `train.gradient_checkpointing` auto: on when a
    batch of `tokens` would keep more activations than 90% of the memory still free; never on a CPU."""
    if t.gradient_checkpointing != "auto":
        return bool(t.gradient_checkpointing), ""
    if free is None:
        return False, ""
    need = activation_bytes(model_config, in_4bit=in_4bit, tokens=tokens)
    chosen = need > 0.9 * free
    return chosen, (
        f"train.gradient_checkpointing=auto: {'on' if chosen else 'off'}, since a batch of {tokens:,} tokens "
        f"would keep about {size(need)} of activations and {size(free)} is free on the GPU"
    )


def should_dequantize(q: QuantArgs, needed: int, free: int | None) -> tuple[bool, str]:
    """(dequantise the 4-bit base once?, why). `quantization.dequantize_once` auto: yes when the
    copy takes at most half of the memory still free, so activations keep the other half; always
    on a CPU (its RAM is not the limit; bitsandbytes' CPU matmuls are)."""
    if not q.load_in_4bit:
        return False, ""
    if q.dequantize_once != "auto":
        return bool(q.dequantize_once), ""
    plain = f"{size(needed)} in {q.bnb_4bit_compute_dtype}"
    if free is None:
        return True, f"quantization.dequantize_once=auto: the 4-bit base is dequantised once ({plain}; a CPU)"
    left = f"{size(free)} free on the GPU"
    if needed <= free / 2:
        return True, f"quantization.dequantize_once=auto: the 4-bit base is dequantised once ({plain}, {left})"
    return False, (
        f"quantization.dequantize_once=auto: the base stays in 4 bits, dequantised at each matmul "
        f"(a copy would take {plain} of the {left}); slower, but it fits"
    )


def should_capture(
    t: TrainArgs, lora_dropout: float, *, cuda: bool, processes: int, room: bool = True
) -> tuple[bool, str]:
    """(capture the step as CUDA graphs?, why). `train.cuda_graphs` auto: on for one CUDA GPU
    with bucketed shapes and the trained-positions loss, where nothing in a step draws random
    numbers or recomputes activations, and the GPU has `room` for the graphs' memory pool (a second
    batch's activations); true asks for it wherever it can run at all."""
    hard = [
        (not cuda, "needs a CUDA GPU"),
        (processes > 1, "does not run under torchrun (DDP reduces gradients during backward)"),
        (not t.bucket_shapes, "needs train.bucket_shapes=true (a graph per batch shape)"),
        (not t.trained_logits_only, "needs train.trained_logits_only=true"),
        (t.fp16, "does not run with train.fp16 (its loss scaling is the Trainer's backward)"),
    ]
    soft = [
        (lora_dropout > 0, "lora.lora_dropout is above 0"),
        (bool(t.neftune_noise_alpha), "NEFTune is on"),
        (t.gradient_checkpointing is True, "gradient checkpointing is on"),
        (not room, "the graphs' memory pool (a second batch's activations) would crowd the GPU"),
    ]
    blocker = next((why for applies, why in hard if applies), "")
    if t.cuda_graphs is False:
        return False, ""
    if t.cuda_graphs is True:
        if blocker:
            raise UserError(f"train.cuda_graphs=true {blocker}; use --set train.cuda_graphs=auto")
        return True, ""
    if not cuda:
        return False, ""
    reason = f"it {blocker}" if blocker else next((why for applies, why in soft if applies), "")
    if reason:
        return False, f"train.cuda_graphs=auto: off, since {reason}"
    return True, "train.cuda_graphs=auto: on (each batch shape captured after its first batch)"
