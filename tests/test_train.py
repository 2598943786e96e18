"""Training on the tiny model: it learns, it saves what eval needs, it never clobbers a result."""

import hashlib
import json

import pytest
import torch
from conftest import SMOKE_CONFIG, smoke_overrides

from samsum_qlora.commands import train
from samsum_qlora.config import load_config
from samsum_qlora.errors import UserError


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(out))
    metrics = train.train_adapters(cfg)
    return cfg, metrics, out / "run"


def test_training_lowers_the_loss_clearly(trained_run):
    cfg, metrics, _ = trained_run
    assert metrics["global_step"] == cfg.train.max_steps
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"] - 1.0


def test_outputs_a_person_and_eval_can_use(trained_run):
    cfg, metrics, run_dir = trained_run
    adapters = run_dir / "lora_adapters"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in adapters.iterdir()
    }
    assert load_config(run_dir / "config.yaml") == cfg  # a rerunnable --config
    saved = json.loads((run_dir / "train_metrics.json").read_text())
    assert saved["trainable_parameters"] == 7168 and saved["rows"] == 60
    # the smoke config asks auto to dequantise (a CPU: yes) and turns checkpointing off itself
    # and no CUDA graphs (a CPU)
    reasons = saved["chosen"].pop("reasons")
    assert saved["chosen"] == {
        "dequantize_once": True,
        "gradient_checkpointing": False,
        "cuda_graphs": False,
        "cuda_graphs_captured": 0,
    }
    assert len(reasons) == 1 and reasons[0].startswith("quantization.dequantize_once=auto: the 4-bit base is dequant")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["model_shape"]["hidden_size"] == 64 and "transformers" in info["versions"]
    assert not list(run_dir.glob(".*staging*"))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_rerun_without_overwrite_changes_no_byte(trained_run):
    cfg, _, run_dir = trained_run
    before = _digest(run_dir / "lora_adapters")
    with pytest.raises(UserError, match="already holds a finished run; pass --overwrite"):
        train.train_adapters(cfg)
    assert _digest(run_dir / "lora_adapters") == before


def test_saved_adapters_reload_to_the_same_logits(tmp_path):
    from peft import PeftModel

    from samsum_qlora import modeling

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    torch.manual_seed(0)
    base = modeling.load_model(cfg.model, cfg.quantization, training=False)
    peft_model = modeling.attach_new_adapters(
        base,
        cfg.lora,
        cfg.quantization,
        dequantize=modeling.dequantize_as_configured(base, cfg.quantization),
        gradient_checkpointing=False,
        half_precision=False,
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapters an effect to preserve
            p.data.normal_(0, 0.5)
    ids = torch.tensor([[0, 5, 17, 42, 99, 300]])
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapters")
    reloaded = modeling.load_generation_model(cfg.model, cfg.quantization, tmp_path / "adapters", merge=False)
    assert isinstance(reloaded, PeftModel)
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    assert (before - base).abs().max() > 1e-2  # the adapters matter...
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # ...and survive the round trip
