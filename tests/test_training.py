"""The Trainer as train and bench use it: token-budget batches, the collator, the trained-logits
loss equal to the model's own on the plain padded 4-bit path, and readable logs."""

import dataclasses

import pytest
import torch
from conftest import SAMPLE_DATA, SMOKE_CONFIG, smoke_overrides

from samsum_qlora import batching, chat, data, modeling, training
from samsum_qlora.config import load_config


def encoded(tokenizer, cfg, n=24):
    rows = data.load_rows(str(SAMPLE_DATA), "train")[:n]
    columns, _ = chat.ChatFormat.build(tokenizer, cfg.data).encode_rows(rows, progress=False)
    return columns


def with_adapters(cfg):
    base = modeling.load_model(cfg.model, cfg.quantization, training=True)
    return modeling.attach_new_adapters(
        base,
        cfg.lora,
        cfg.quantization,
        dequantize=modeling.dequantize_as_configured(base, cfg.quantization),
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        half_precision=cfg.train.bf16,
    )


def test_token_budget_batches_cover_every_row_once_within_budget():
    lengths = [5, 300, 40, 41, 39, 120, 7, 800, 64, 64]
    batches = batching.token_budget_batches(lengths, max_tokens=256, seed=1, pool=4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 256
    assert batching.token_budget_batches(lengths, 256, seed=1, pool=4) == batches  # seeded


def test_generation_batches_are_longest_first_within_rows_and_tokens():
    lengths = [5, 9, 9, 3, 7, 1, 8, 2, 6, 4, 9]
    batches = batching.generation_batches(lengths, max_rows=3, max_tokens=10**6, new_tokens=4)
    assert [len(b) for b in batches] == [3, 3, 3, 2]
    assert [lengths[i] for i in batches[0]] == [9, 9, 9]  # longest first
    by_tokens = batching.generation_batches(lengths, max_rows=100, max_tokens=40, new_tokens=4)
    for b in by_tokens:  # rows x (longest prompt + new tokens) within the cache budget
        assert len(b) * (max(lengths[i] for i in b) + 4) <= 40
    assert sorted(i for b in by_tokens for i in b) == list(range(len(lengths)))
    assert batching.generation_batches([50, 2], max_rows=8, max_tokens=10, new_tokens=4) == [[0], [1]]


def test_padding_is_small_with_token_budget_batches(tokenizer, smoke_cfg):
    lengths = [len(ids) for ids in encoded(tokenizer, smoke_cfg, n=60)["input_ids"]]
    batches = batching.token_budget_batches(lengths, max_tokens=1024, seed=0)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.10


def test_collator_pads_right_and_masks_padding(tokenizer, smoke_cfg):
    fmt = chat.ChatFormat.build(tokenizer, smoke_cfg.data)
    a, b = fmt.encode("Ana: hi\nBo: hello there", "Ana greets Bo."), fmt.encode("A: x", "Short.")
    batch = training.Collator(fmt.pad_id)(
        [{"input_ids": a.input_ids, "labels": a.labels}, {"input_ids": b.input_ids, "labels": b.labels}]
    )
    n = len(b.input_ids)
    assert batch["input_ids"].shape == (2, max(len(a.input_ids), n))
    assert batch["input_ids"][1, n:].tolist() == [fmt.pad_id] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][1, n:].eq(chat.IGNORE_INDEX).all()
    assert batch["attention_mask"][1].sum().item() == n


def test_batch_without_trained_tokens_is_an_error():
    with pytest.raises(ValueError, match="no trained token"):
        training.Collator(0)([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])


def test_fast_path_loss_equals_plain_padded_path(tmp_path, tokenizer):
    plain_cfg = load_config(
        SMOKE_CONFIG,
        smoke_overrides(
            tmp_path,
            **{
                "quantization.dequantize_once": False,
                "train.trained_logits_only": False,
                "train.max_tokens_per_batch": None,
            },
        ),
    )
    fast_cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    assert fast_cfg.quantization.dequantize_once and fast_cfg.train.trained_logits_only
    columns = encoded(tokenizer, plain_cfg)

    torch.manual_seed(0)
    plain = with_adapters(plain_cfg)
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)  # adapters that change the loss, so a wrong path shows
    fast = with_adapters(fast_cfg)
    lora = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    result = fast.load_state_dict(lora, strict=False)
    assert lora and not result.unexpected_keys

    pad = chat.pad_id(tokenizer)
    everything = training.Collator(pad)(
        [{"input_ids": i, "labels": lab} for i, lab in zip(columns["input_ids"], columns["labels"])]
    )
    with torch.no_grad():
        plain_loss = plain(**everything).loss.item()

    trainer = training.build_trainer(
        fast_cfg.train, fast, training.training_set(fast_cfg.train, columns), training.Collator(pad), tmp_path / "ck"
    )
    total = sum(sum(label != -100 for label in row[1:]) for row in columns["labels"])
    fast_loss = 0.0
    with torch.no_grad():
        for item in trainer.train_dataset:
            batch = training.collator(fast_cfg.train, pad)([item])  # as train collates: trained positions found
            fast_loss += trainer.compute_loss(fast, batch, num_items_in_batch=total).item()
    assert len(trainer.train_dataset) > 1  # several token-budget batches, not one
    assert fast_loss == pytest.approx(plain_loss, rel=1e-3)


def test_training_arguments_pass_our_fields_through(tmp_path):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"train.weight_decay": 0.1, "train.warmup_steps": 3}))
    args = training.training_arguments(cfg.train, tmp_path / "ck", cuda=False)
    assert (args.learning_rate, args.weight_decay, args.warmup_steps, args.max_steps) == (0.01, 0.1, 3, 40)
    assert args.per_device_train_batch_size == 1  # token-budget batches arrive whole
    assert args.optim == "adamw_torch" and not args.logging_nan_inf_filter and args.output_dir == str(tmp_path / "ck")
    assert not args.dataloader_pin_memory and not args.accelerator_config.non_blocking  # no GPU to copy to


def test_batches_reach_the_gpu_without_a_step_waiting(tmp_path):
    """On a GPU, batches are pinned and copied with non_blocking: a blocking copy would wait for the
    steps queued before it."""
    args = training.training_arguments(load_config(SMOKE_CONFIG, smoke_overrides(tmp_path)).train, tmp_path, cuda=True)
    assert args.dataloader_pin_memory and args.accelerator_config.non_blocking


def test_logs_are_numbers_not_strings():
    line = training.format_log(
        10, 40, {"loss": 7.26812, "grad_norm": 0.5312, "learning_rate": 2e-05, "epoch": 0.25, "total_flos": 1e12}
    )
    assert line == "step 10/40: loss 7.268, grad_norm 0.5312, learning_rate 2.000e-05, epoch 0.25"


def test_trained_positions_are_the_shifted_trained_labels():
    """Position t is trained when label t + 1 is: the model's own causal shift, found on the CPU."""
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, -100]])
    at, ids = training.trained_positions(labels)
    assert at.tolist() == [1, 2, 5] and ids.tolist() == [7, 8, 5]  # rows of width 5: row 1, t=0 is 5
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    keep = labels[:, 1:] != -100
    assert torch.equal(hidden.reshape(-1, 3).index_select(0, at), hidden[:, :-1][keep])


def test_a_loss_that_is_not_finite_is_caught_before_logging_or_saving(tmp_path, tokenizer):
    """Steps do not wait for their loss; it is checked a step later, and always before the Trainer
    logs or writes a checkpoint, naming the step it came from."""
    from transformers import TrainerControl

    from samsum_qlora.errors import UserError

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    columns = encoded(tokenizer, cfg)
    trainer = training.build_trainer(
        cfg.train, with_adapters(cfg), training.training_set(cfg.train, columns), training.Collator(0), tmp_path / "ck"
    )
    trainer._unchecked.append((7, torch.tensor(float("nan")), None))
    trainer.check_losses(keep_last=1)  # the newest loss may wait for the next step
    settle = next(c for c in trainer.callback_handler.callbacks if isinstance(c, training.SettleBeforeWriting))
    settle.on_step_end(trainer.args, trainer.state, TrainerControl())  # neither logging nor saving: no wait
    with pytest.raises(UserError, match="training diverged at step 7: the loss is nan"):
        settle.on_step_end(trainer.args, trainer.state, TrainerControl(should_save=True))


def test_training_levers_reach_the_libraries(tmp_path):
    """NEFTune goes to the Trainer by its own name; rsLoRA and DoRA to peft's LoraConfig."""
    cfg = load_config(
        SMOKE_CONFIG,
        smoke_overrides(tmp_path, **{"train.neftune_noise_alpha": 5, "lora.use_rslora": True, "lora.use_dora": True}),
    )
    assert training.training_arguments(cfg.train, tmp_path / "ck", cuda=False).neftune_noise_alpha == 5
    lora = modeling.lora_config(cfg.lora)
    assert lora.use_rslora and lora.use_dora
    default = training.training_arguments(load_config(SMOKE_CONFIG).train, tmp_path, cuda=False)
    assert default.neftune_noise_alpha is None


def test_run_loss_weighs_each_logged_loss_by_its_steps():
    from samsum_qlora.training import run_loss

    history = [{"loss": 4.0, "step": 3}, {"learning_rate": 0.1, "step": 3}, {"loss": 1.0, "step": 4}]
    history += [{"loss": 2.0, "step": 10}, {"train_loss": 9.9, "step": 10}]
    assert run_loss(history) == pytest.approx((4 * 3 + 1 * 1 + 2 * 6) / 10)
    assert run_loss([{"learning_rate": 0.1, "step": 1}]) is None


def test_the_collator_counts_real_tokens_on_the_cpu_for_the_trainer(tmp_path, tokenizer):
    """The Trainer moves a batch to the GPU before a step sees it: counting its real tokens there
    would make every step wait; the collator counts them while the batch is still on the CPU."""
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    columns = encoded(tokenizer, cfg, n=3)
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(columns["input_ids"], columns["labels"])]
    real = sum(len(i) for i in columns["input_ids"])
    for buckets in (True, False):
        t = dataclasses.replace(cfg.train, bucket_shapes=buckets)
        batch = training.collator(t, chat.pad_id(tokenizer))(rows)
        assert batch[training.REAL_TOKENS] == real < batch["input_ids"].numel()
    assert real == int(batch["attention_mask"].sum())
    trainer = training.build_trainer(
        cfg.train, with_adapters(cfg), training.training_set(cfg.train, columns), training.Collator(0), tmp_path / "ck"
    )
    trainer.args.include_num_input_tokens_seen = "non_padding"
    trainer._track_num_input_tokens({training.REAL_TOKENS: 7, "attention_mask": None})  # the mask is not read
    assert trainer.state.num_input_tokens_seen == 7
