"""Each chat family end to end on the CPU: 4-bit load, LoRA, a few training steps, the decoder,
ROUGE. Phi-3's fused projections need their own LoRA targets; a wrong one is named up front."""

import json

import pytest
from chat_families import FAMILIES, LORA_TARGETS, SPECS, build_family
from conftest import SAMPLE_DATA, SMOKE_CONFIG

from samsum_qlora.commands.evaluate import evaluate_model, plan_eval
from samsum_qlora.commands.train import train_adapters
from samsum_qlora.config import load_config
from samsum_qlora.errors import UserError


def family_cfg(folder, out, **extra):
    return load_config(
        SMOKE_CONFIG,
        {
            "model.name": str(folder),
            "data.source": str(SAMPLE_DATA),
            "train.output_dir": str(out),
            "train.max_steps": 3,
            "train.logging_steps": 1,
            "eval.max_new_tokens": 8,
            **extra,
        },
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_eval_each_family(family, tmp_path):
    folder = build_family(family, tmp_path / family)
    targets = {"lora.target_modules": LORA_TARGETS[family]} if family in LORA_TARGETS else {}
    cfg = family_cfg(folder, tmp_path / "run", **targets)
    metrics = train_adapters(cfg)
    assert metrics["global_step"] == 3 and metrics["train_loss"] > 0 and metrics["rows"] == 60
    scores = evaluate_model(cfg, plan_eval(cfg, limit=3))
    assert scores["n_examples"] == 3 and 0 <= scores["rouge1"] <= 1
    preds = [json.loads(line) for line in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    for p in preds:  # never the text of a special token, whatever the model emitted
        assert not any(t in p["prediction"] for t in SPECS[family].special_tokens), p["prediction"]


def test_phi3_with_llama_targets_is_told_its_projections(tmp_path):
    cfg = family_cfg(build_family("phi3", tmp_path / "phi3"), tmp_path / "run")
    with pytest.raises(
        UserError,
        match=r"has no module q_proj, k_proj, v_proj \(its projections: down_proj, "
        r"gate_up_proj, o_proj, qkv_proj\)",
    ):
        train_adapters(cfg)
