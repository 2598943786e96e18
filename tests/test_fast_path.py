"""The fast path trains the same model: same loss as the plain padded 4-bit path, same data."""

import pytest
import torch

from samsum_qlora import data, model as modeling, train
from samsum_qlora.config import load_config

from conftest import SAMPLE_DATA, SMOKE_CONFIG, smoke_overrides


def encoded(tokenizer, cfg, n=24):
    rows = data.rows(data.load_split(str(SAMPLE_DATA), "train"))[:n]
    columns, _ = data.encode_rows(tokenizer, rows, instruction=cfg.data.task_instruction,
                                  max_length=cfg.data.max_length, date_string=cfg.data.date_string, progress=False)
    return columns


def test_token_budget_batches_cover_every_row_once_within_budget():
    lengths = [5, 300, 40, 41, 39, 120, 7, 800, 64, 64]
    batches = data.token_budget_batches(lengths, max_tokens=256, seed=1, pool=4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 256
    assert data.token_budget_batches(lengths, 256, seed=1, pool=4) == batches  # seeded


def test_padding_is_small_with_token_budget_batches(tokenizer, smoke_cfg):
    lengths = [len(ids) for ids in encoded(tokenizer, smoke_cfg, n=60)["input_ids"]]
    batches = data.token_budget_batches(lengths, max_tokens=1024, seed=0)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.10


def test_fast_path_loss_equals_plain_padded_path(tmp_path, tokenizer):
    plain_cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{
        "quantization.dequantize_once": False, "train.trained_logits_only": False,
        "train.max_tokens_per_batch": None}))
    fast_cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    assert fast_cfg.quantization.dequantize_once and fast_cfg.train.trained_logits_only
    columns = encoded(tokenizer, plain_cfg)

    torch.manual_seed(0)
    plain = modeling.attach_new_adapters(modeling.load_model(plain_cfg, training=True), plain_cfg)
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)  # adapters that change the loss, so a wrong path shows
    fast = modeling.attach_new_adapters(modeling.load_model(fast_cfg, training=True), fast_cfg)
    lora = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    result = fast.load_state_dict(lora, strict=False)
    assert lora and not result.unexpected_keys

    pad = data.pad_token_id(tokenizer)
    everything = data.PadToLongest(pad)([{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])])
    with torch.no_grad():
        plain_loss = plain(**everything).loss.item()

    trainer = train.build_trainer(fast_cfg, fast, tokenizer, train.training_set(fast_cfg, columns), tmp_path / "ck")
    total = sum(sum(label != -100 for label in row[1:]) for row in columns["labels"])
    fast_loss = 0.0
    with torch.no_grad():
        for item in trainer.train_dataset:
            batch = data.PadToLongest(pad)([item])
            fast_loss += trainer.compute_loss(fast, batch, num_items_in_batch=total).item()
    assert len(trainer.train_dataset) > 1  # several token-budget batches, not one
    assert fast_loss == pytest.approx(plain_loss, rel=1e-3)
