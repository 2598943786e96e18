"""Bucketed batch shapes and the CUDA-graph training step's logic, on the CPU: the widths, the
padding (rows, positions, no mask) computing the same loss and gradients, the choice of graphs,
and the fallback to the Trainer's own step when capture is off or fails. The captured graphs
themselves run in tests/test_gpu.py."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from chat_families import FAMILIES, LORA_TARGETS, build_family
from conftest import SMOKE_CONFIG, smoke_overrides
from test_training import encoded, with_adapters

from samsum_qlora import batching, chat, choices, modeling, training
from samsum_qlora.chat import IGNORE_INDEX
from samsum_qlora.config import TrainArgs, load_config
from samsum_qlora.errors import UserError

# --- widths and shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("multiple", [1, 8, 32])
def test_bucket_widths_are_few_multiples_that_pad_a_length_by_at_most_a_fifth(multiple):
    widths = batching.bucket_widths(multiple, 5000)
    assert widths == sorted(set(widths)) and widths[-1] >= 5000
    assert all(w % multiple == 0 for w in widths)
    for n in range(1, 5001):
        w = batching.bucketed_width(n, multiple)
        assert w in widths and n <= w <= max(1.19 * n + multiple, multiple)
        assert w == batching.bucket(n, widths)  # the same width whatever the longest row of the data
    doublings = len([w for w in widths if 256 < w <= 512])
    assert doublings == batching.WIDTHS_PER_DOUBLING  # e.g. 320, 384, 448, 512


def test_trained_capacity_is_a_fifth_of_the_batch_or_the_count_in_steps_of_128():
    assert [batching.trained_capacity(n, 4096) for n in (0, 1, 300, 819, 820, 896, 897, 4096)] == [
        896, 896, 896, 896, 896, 896, 1024, 4096,
    ]  # fmt: skip
    assert batching.trained_capacity(10, 100) == 128


def test_bucketed_token_budget_batches_fit_their_shape():
    lengths = [5, 300, 40, 41, 39, 120, 7, 800, 64, 64, 33, 97, 250, 251, 255]
    widths = batching.bucket_widths(8, max(lengths))
    batches = batching.token_budget_batches(lengths, 512, seed=3, multiple=8, widths=widths)
    assert sorted(itertools.chain(*batches)) == list(range(len(lengths)))
    for b in batches:
        width = batching.bucket(max(lengths[i] for i in b), widths)
        assert len(b) <= batching.bucket_rows(width, 512)


# --- the collator's padding ------------------------------------------------------------------------


def bucketed(cfg, **train):
    return dataclasses.replace(cfg.train, **({"bucket_shapes": True} | train))


def test_bucketed_batch_has_its_shape_empty_rows_and_padded_positions(tmp_path, tokenizer):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    columns = encoded(tokenizer, cfg, n=3)
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(columns["input_ids"], columns["labels"])]
    pad = chat.pad_id(tokenizer)
    t = bucketed(cfg)
    batch = training.collator(t, pad)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    width = batching.bucketed_width(longest, t.pad_to_multiple_of)
    assert batch["input_ids"].shape == (batching.bucket_rows(width, t.max_tokens_per_batch), width)
    assert "attention_mask" not in batch  # the causal kernel: right padding changes nothing before it
    assert batch["input_ids"][len(rows) :].eq(pad).all() and batch["labels"][len(rows) :].eq(IGNORE_INDEX).all()
    plain = training.collator(dataclasses.replace(t, bucket_shapes=False), pad)(rows)
    real_at, real_ids = training.trained_positions(plain["labels"])
    n = len(real_ids)
    at, ids = batch[training.TRAINED_AT], batch[training.TRAINED_IDS]
    assert len(at) == len(ids) == batching.trained_capacity(n, batch["labels"].numel()) > n
    assert ids[:n].tolist() == real_ids.tolist() and ids[n:].eq(IGNORE_INDEX).all() and at[n:].eq(0).all()
    # the same rows at another width: positions are row * width + t
    assert (at[:n] // width).tolist() == (real_at // plain["labels"].shape[1]).tolist()
    assert (at[:n] % width).tolist() == (real_at % plain["labels"].shape[1]).tolist()
    # fixed rows: filled up to per_device_train_batch_size
    fixed = training.collator(dataclasses.replace(t, max_tokens_per_batch=None, per_device_train_batch_size=5), pad)
    assert fixed(rows)["input_ids"].shape == (5, width)


@pytest.mark.parametrize("family", (None, *FAMILIES))
def test_bucketed_batch_trains_exactly_what_the_plain_batch_trains(tmp_path, tokenizer, family):
    """Empty rows, no mask and padded positions: the same loss and the same gradients, for the
    tiny Llama and every chat family's own architecture (sliding windows, soft-capping, fused
    projections)."""
    overrides = smoke_overrides(tmp_path)
    if family is not None:
        overrides["model.name"] = str(build_family(family, tmp_path / family))
        overrides |= {"lora.target_modules": LORA_TARGETS[family]} if family in LORA_TARGETS else {}
    cfg = load_config(SMOKE_CONFIG, overrides)
    fmt_tokenizer = tokenizer if family is None else modeling.load_tokenizer(cfg.model)
    columns = encoded(fmt_tokenizer, cfg, n=5)
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(columns["input_ids"], columns["labels"])]
    pad = chat.pad_id(fmt_tokenizer)
    torch.manual_seed(0)
    model = with_adapters(cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    trainer = training.build_trainer(cfg.train, model, [], training.Collator(pad), tmp_path / "ck")
    results = []
    for buckets in (False, True):
        batch = training.collator(bucketed(cfg, bucket_shapes=buckets), pad)(rows)
        batch.pop(training.REAL_TOKENS)
        assert ("attention_mask" in batch) != buckets
        assert buckets or batch["attention_mask"].eq(0).any()  # the plain batch has padding to mask
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (plain_loss, plain_grads), (loss, grads) = results
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    for a, b in zip(plain_grads, grads):
        # float32 sums taken in another order (other shapes, other kernels) differ by a few ulps of
        # the largest term: 64 machine epsilons of the gradient's scale, where a real masking error
        # moves gradients by a whole token's share (~1e-2 of it)
        atol = 64 * torch.finfo(torch.float32).eps * a.abs().max().item()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("trained_logits_only", (True, False))
def test_a_bucketed_batch_attends_without_a_mask(tmp_path, tokenizer, sdpa_calls, trained_logits_only):
    """Both loss paths run a bucketed batch through SDPA's causal kernel with no mask, even where
    transformers would build one (as while a CUDA graph is captured: simulated); a plain batch keeps
    its padding mask."""
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"train.trained_logits_only": trained_logits_only}))
    columns = encoded(tokenizer, cfg, n=3)
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(columns["input_ids"], columns["labels"])]
    model = with_adapters(cfg)
    trainer = training.build_trainer(cfg.train, model, [], training.Collator(0), tmp_path / "ck")
    seen = sdpa_calls
    for buckets, expected in ((True, (True, True)), (False, (False, False))):
        batch = training.collator(bucketed(cfg, bucket_shapes=buckets), chat.pad_id(tokenizer))(rows)
        batch.pop(training.REAL_TOKENS)
        seen.clear()
        with torch.no_grad():
            trainer.compute_loss(model, batch)
        assert seen and set(seen) == {expected}
    assert model.config._attn_implementation == "sdpa"


# --- choosing graphs -------------------------------------------------------------------------------


def test_auto_captures_only_where_a_graph_computes_the_same_step():
    t = TrainArgs()
    assert choices.should_capture(t, 0.0, cuda=True, processes=1)[0] is True
    assert choices.should_capture(t, 0.0, cuda=False, processes=1) == (False, "")  # a CPU: silent
    for changed, dropout, processes, reason in [
        ({}, 0.05, 1, "lora.lora_dropout is above 0"),
        ({"neftune_noise_alpha": 5.0}, 0.0, 1, "NEFTune"),
        ({"gradient_checkpointing": True}, 0.0, 1, "gradient checkpointing"),
        ({}, 0.0, 2, "torchrun"),
        ({"bucket_shapes": False}, 0.0, 1, "bucket_shapes"),
        ({"trained_logits_only": False}, 0.0, 1, "trained_logits_only"),
        ({"fp16": True, "bf16": False}, 0.0, 1, "fp16"),
        ({"room": False}, 0.0, 1, "memory pool"),
    ]:
        room = changed.pop("room", True)
        chosen, why = choices.should_capture(
            dataclasses.replace(t, **changed), dropout, cuda=True, processes=processes, room=room
        )
        assert chosen is False and why.startswith("train.cuda_graphs=auto: off") and reason in why
    assert choices.should_capture(dataclasses.replace(t, cuda_graphs=False), 0.0, cuda=True, processes=1) == (
        False,
        "",
    )
    forced = dataclasses.replace(t, cuda_graphs=True)
    assert choices.should_capture(forced, 0.0, cuda=True, processes=1, room=False)[0]  # true: the user's call
    assert choices.should_capture(dataclasses.replace(forced, neftune_noise_alpha=5.0), 0.0, cuda=True, processes=1)[0]
    for cuda, processes, message in [(False, 1, "needs a CUDA GPU"), (True, 2, "torchrun")]:
        with pytest.raises(UserError, match=f"train.cuda_graphs=true .*{message}"):
            choices.should_capture(forced, 0.0, cuda=cuda, processes=processes)


# --- the step, and its fallback ---------------------------------------------------------------------


def train_weights(tmp_path, tokenizer, *, graphs: bool, capture=None, accumulation: int = 1, resume=None):
    """Adapter weights after 6 optimizer steps on the sample rows (a checkpoint every 3), through
    GraphedSteps (whose capture, on a CPU, is `capture`) or through the Trainer's own step; with
    `resume`, from that checkpoint."""
    cfg = load_config(
        SMOKE_CONFIG,
        smoke_overrides(
            tmp_path,
            **{
                "train.max_steps": 6,
                "train.save_steps": 3,
                "train.gradient_accumulation_steps": accumulation,
                "train.max_tokens_per_batch": 512,
            },
        ),
    )
    torch.manual_seed(0)
    model = with_adapters(cfg)
    columns = encoded(tokenizer, cfg, n=24)
    t = dataclasses.replace(cfg.train, cuda_graphs=graphs)
    trainer = training.build_trainer(
        t, model, training.training_set(t, columns), training.collator(t, chat.pad_id(tokenizer)), tmp_path / "ck"
    )
    if graphs and capture is not None:
        trainer.graphs._capture = capture(trainer.graphs)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return weights, result.training_loss, trainer


class Replayed:
    """A stand-in for a captured graph on a CPU: replaying computes the step eagerly."""

    def __init__(self, graphs, model, static):
        self.replay = lambda: graphs._forward_backward(model, static)


def replays_eagerly(graphs):
    """A stand-in for capture on a CPU, with a loss tensor the replay refreshes as a graph's is."""

    def capture(model, key, static):
        loss = torch.zeros(())
        graphs.graphs[key] = (Replayed(graphs, model, static), loss)
        inner = graphs.graphs[key][0].replay
        graphs.graphs[key][0].replay = lambda: loss.copy_(inner())

    return capture


@pytest.mark.parametrize("accumulation", [1, 2])
def test_graphed_steps_train_what_the_trainers_step_trains(tmp_path, tokenizer, accumulation):
    """Loss scaling, gradients handed to the optimizer (set after it clears them, summed over
    accumulated micro-batches), and every shape's first, captured and replayed batch."""
    plain, plain_loss, _ = train_weights(tmp_path / "a", tokenizer, graphs=False, accumulation=accumulation)
    graphed, loss, trainer = train_weights(
        tmp_path / "b", tokenizer, graphs=True, capture=replays_eagerly, accumulation=accumulation
    )
    assert trainer.graphs.on and trainer.graphs.replays >= 2  # the steps went through GraphedSteps
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    for name in plain:
        torch.testing.assert_close(graphed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_graphed_training_resumes_to_the_same_weights(tmp_path, tokenizer):
    """A resumed run starts with no graphs (its shapes run eagerly once, then are captured again)
    and ends where the uninterrupted run ends."""
    straight, _, _ = train_weights(tmp_path / "a", tokenizer, graphs=True, capture=replays_eagerly)
    checkpoint = tmp_path / "a" / "ck" / "checkpoint-3"
    assert checkpoint.is_dir()
    resumed, _, trainer = train_weights(
        tmp_path / "b", tokenizer, graphs=True, capture=replays_eagerly, resume=checkpoint
    )
    assert trainer.state.global_step == 6 and trainer.graphs.replays >= 1
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-7)


def test_a_failed_capture_falls_back_to_the_trainers_step(tmp_path, tokenizer, capsys):
    def failing(graphs):
        def capture(model, key, static):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

        return capture

    plain, plain_loss, _ = train_weights(tmp_path / "a", tokenizer, graphs=False)
    graphed, loss, trainer = train_weights(tmp_path / "b", tokenizer, graphs=True, capture=failing)
    assert not trainer.graphs.on and not trainer.graphs.graphs
    assert "CUDA graph capture failed (CUDA error: operation not permitted" in capsys.readouterr().err
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    for name in plain:
        torch.testing.assert_close(graphed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_other_errors_in_a_graphed_step_are_not_swallowed(tmp_path, tokenizer):
    def broken(graphs):
        def capture(model, key, static):
            raise RuntimeError("CUDA out of memory")

        return capture

    with pytest.raises(RuntimeError, match="out of memory"):
        train_weights(tmp_path, tokenizer, graphs=True, capture=broken)
