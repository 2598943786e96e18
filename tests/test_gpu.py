"""GPU tests: the real train/eval path on the Llama-3.2-1B shape with random weights.

Run on a CUDA machine with the reference folder at .ref/ (see ../shared/gpu/README.md):
    python3 -m pytest -m gpu tests/test_gpu.py
"""

from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / ".ref"


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if not (REF / "llama-3.2-1b-instruct-shape" / "tokenizer.json").is_file():
        pytest.skip(".ref/llama-3.2-1b-instruct-shape is not here")
    from samsum_qlora.bench import random_model_dir

    return random_model_dir(str(REF / "llama-3.2-1b-instruct-shape"), None, "bfloat16", tmp_path_factory.mktemp("llama1b"))


def gpu_cfg(shape_dir, out, **extra):
    from samsum_qlora.config import load_config

    return load_config(None, {
        "model.name": str(shape_dir), "data.source": str(REF / "samsum"), "data.train_split": "validation",
        "train.output_dir": str(out), "train.max_steps": 30, "train.logging_steps": 5, "train.save_steps": 15,
        "eval.limit": 64, **extra,
    })


def test_train_and_eval_real_shape(shape_dir, tmp_path):
    import json

    from samsum_qlora import evaluate, train

    cfg = gpu_cfg(shape_dir, tmp_path / "run")
    metrics = train.run(cfg)
    print("GPU train metrics:", json.dumps({k: metrics[k] for k in ("first_logged_loss", "last_logged_loss", "train_loss", "train_seconds", "trainable_parameters")}))
    assert metrics["trainable_parameters"] == 1_703_936
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    plan = evaluate.plan_eval(cfg, adapters=None, base_only=False, split="test", limit=None, output_dir=None)
    scores = evaluate.run_eval(cfg, plan)
    assert scores["n_examples"] == 64 and 0 <= scores["rouge1"] <= 1


def test_seed_recipe_trains_on_4bit_weights(shape_dir, tmp_path):
    import bitsandbytes as bnb

    from samsum_qlora import model as modeling
    from samsum_qlora.bench import SEED_RECIPE, with_overrides

    cfg = with_overrides(gpu_cfg(shape_dir, tmp_path / "seed"), SEED_RECIPE)
    model = modeling.attach_new_adapters(modeling.load_model(cfg, training=True), cfg)
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"


def test_fast_path_loss_equals_plain_padded_path_on_gpu(shape_dir, tmp_path):
    import torch

    from samsum_qlora import data, model as modeling, train

    plain_cfg = gpu_cfg(shape_dir, tmp_path / "p", **{
        "quantization.dequantize_once": False, "train.trained_logits_only": False,
        "train.max_tokens_per_batch": None})
    fast_cfg = gpu_cfg(shape_dir, tmp_path / "f")
    tokenizer = modeling.load_tokenizer(str(shape_dir))
    rows = data.rows(data.load_split(str(REF / "samsum"), "validation"))[:48]
    columns, _ = data.encode_rows(tokenizer, rows, instruction=fast_cfg.data.task_instruction,
                                  max_length=1024, date_string=fast_cfg.data.date_string, progress=False)
    torch.manual_seed(0)
    plain = modeling.attach_new_adapters(modeling.load_model(plain_cfg, training=True), plain_cfg)
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    fast = modeling.attach_new_adapters(modeling.load_model(fast_cfg, training=True), fast_cfg)
    fast.load_state_dict({k: v for k, v in plain.state_dict().items() if "lora_" in k}, strict=False)
    pad = data.pad_token_id(tokenizer)
    total = sum(sum(label != -100 for label in row[1:]) for row in columns["labels"])
    plain_trainer = train.build_trainer(plain_cfg, plain, tokenizer, train.training_set(plain_cfg, columns), tmp_path / "pc")
    fast_trainer = train.build_trainer(fast_cfg, fast, tokenizer, train.training_set(fast_cfg, columns), tmp_path / "fc")

    def summed(trainer, model, items):
        loss = 0.0
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # as the Trainer runs it
            for start in range(0, len(items), 8 if items is plain_items else 1):
                batch = data.PadToLongest(pad)(items[start : start + (8 if items is plain_items else 1)])
                batch = {k: v.cuda() for k, v in batch.items()}
                loss += trainer.compute_loss(model, batch, num_items_in_batch=total).item()
        return loss

    plain_items = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    fast_items = [fast_trainer.train_dataset[i] for i in range(len(fast_trainer.train_dataset))]
    plain_loss, fast_loss = summed(plain_trainer, plain, plain_items), summed(fast_trainer, fast, fast_items)
    print(f"GPU loss: plain padded 4-bit {plain_loss:.6f}, fast path {fast_loss:.6f}, "
          f"relative difference {abs(fast_loss - plain_loss) / plain_loss:.2e}")
    assert fast_loss == pytest.approx(plain_loss, rel=1e-3)
