"""choices.decide: every automatic choice of a training run made once, each building on the one
before (the dequantised copy's room, then the activations, then the graphs' pool)."""

import re
from types import SimpleNamespace

import pytest

from samsum_qlora import choices
from samsum_qlora.config import load_config
from samsum_qlora.errors import UserError

GIB = 2**30
LLAMA_1B = SimpleNamespace(num_hidden_layers=16, hidden_size=2048)  # 5.6 GiB of activations a 4,096-token batch
COPY = int(2.3 * GIB)  # the 1B's 4-bit layers dequantised to bfloat16


def decide(free, *, cuda=True, processes=1, **overrides):
    cfg = load_config(None, overrides)
    return choices.decide(
        cfg, cfg.train, LLAMA_1B, loaded_in_4bit=True, dequantized=COPY, free=free, cuda=cuda, processes=processes
    )


def test_a_roomy_gpu_takes_every_fast_path_and_says_why():
    chosen = decide(40 * GIB)
    assert (chosen.dequantize_once, chosen.gradient_checkpointing, chosen.cuda_graphs) == (True, False, True)
    assert [why.split(":")[0] for why in chosen.reasons] == [
        "quantization.dequantize_once=auto",
        "train.gradient_checkpointing=auto",
        "train.cuda_graphs=auto",
    ]
    assert "37.7 GiB is free" in chosen.reasons[1]  # the activations are weighed against what the copy leaves
    assert chosen.record() == {
        "dequantize_once": True,
        "gradient_checkpointing": False,
        "cuda_graphs": True,
        "reasons": list(chosen.reasons),
    }


def test_the_dequantised_copy_takes_its_room_before_the_activations_are_weighed():
    """8 GiB free: the copy (2.3 GiB) fits in half of it, and leaves 5.7 GiB, where a batch's 5.6 GiB of
    activations would crowd the card: checkpointing, and so no graphs. Weighed against the 8 GiB
    before the copy, checkpointing would stay off and the first step would run out of memory."""
    chosen = decide(8 * GIB)
    assert chosen.dequantize_once and chosen.gradient_checkpointing and not chosen.cuda_graphs
    assert re.search(r"on, since .* 5\.6 GiB of activations and 5\.7 GiB is free", chosen.reasons[1])
    assert chosen.reasons[2] == "train.cuda_graphs=auto: off, since gradient checkpointing is on"
    kept = decide(8 * GIB, **{"quantization.dequantize_once": "false"})  # 4 bits: 8.4 GiB of activations
    assert not kept.dequantize_once and kept.gradient_checkpointing
    assert "8.4 GiB of activations and 8.0 GiB is free" in kept.reasons[0]


def test_a_cpu_and_torchrun():
    cpu = decide(None, cuda=False)
    assert (cpu.dequantize_once, cpu.gradient_checkpointing, cpu.cuda_graphs) == (True, False, False)
    assert len(cpu.reasons) == 1 and "a CPU" in cpu.reasons[0]
    ddp = decide(40 * GIB, processes=2)
    assert not ddp.cuda_graphs and "does not run under torchrun" in ddp.reasons[-1]


def test_what_the_config_fixes_is_kept_and_an_impossible_demand_refused():
    fixed = decide(GIB, **{"quantization.dequantize_once": "true", "train.gradient_checkpointing": "false"})
    assert fixed.dequantize_once and not fixed.gradient_checkpointing and fixed.reasons[-1].endswith("crowd the GPU")
    with pytest.raises(UserError, match=r"train.cuda_graphs=true needs a CUDA GPU"):
        decide(None, cuda=False, **{"train.cuda_graphs": "true"})
