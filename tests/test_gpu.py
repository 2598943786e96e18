"""GPU tests: the real train/eval path on the Llama-3.2-1B shape with random weights.

Run on a CUDA machine with the reference folder at .ref/ (see ../shared/gpu/README.md):
    python3 -m pytest -m gpu tests/test_gpu.py
"""

import dataclasses
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
    from samsum_qlora.commands.bench import random_model_dir
    from samsum_qlora.config import load_config

    cfg = load_config(None, {"model.name": str(REF / "llama-3.2-1b-instruct-shape")})
    return random_model_dir(cfg, tmp_path_factory.mktemp("llama1b") / "model")


def gpu_cfg(shape_dir, out, **extra):
    from samsum_qlora.config import load_config

    return load_config(
        None,
        {
            "model.name": str(shape_dir),
            "data.source": str(REF / "samsum"),
            "data.train_split": "validation",
            "train.output_dir": str(out),
            "train.max_steps": 30,
            "train.logging_steps": 5,
            "train.save_steps": 15,
            "eval.limit": 64,
            **extra,
        },
    )


def with_adapters(cfg):
    from samsum_qlora import modeling

    base = modeling.load_model(cfg.model, cfg.quantization, training=True)
    return modeling.attach_new_adapters(
        base,
        cfg.lora,
        cfg.quantization,
        dequantize=modeling.dequantize_as_configured(base, cfg.quantization),
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        half_precision=cfg.train.bf16,
    )


def test_train_and_eval_real_shape(shape_dir, tmp_path):
    import json

    from samsum_qlora.commands import evaluate, train

    cfg = gpu_cfg(shape_dir, tmp_path / "run")
    metrics = train.train_adapters(cfg)
    print(
        "GPU train metrics:",
        json.dumps(
            {
                k: metrics[k]
                for k in (
                    "first_logged_loss",
                    "last_logged_loss",
                    "train_loss",
                    "train_seconds",
                    "trainable_parameters",
                    "chosen",
                )
            }
        ),
    )
    assert metrics["trainable_parameters"] == 1_703_936
    assert metrics["chosen"]["cuda_graphs"] is True and metrics["chosen"]["cuda_graphs_captured"] >= 1
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    scores = evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, split="test"))
    assert scores["n_examples"] == 64 and 0 <= scores["rouge1"] <= 1


def test_tutorial_recipe_trains_on_4bit_weights(shape_dir, tmp_path):
    import bitsandbytes as bnb

    from samsum_qlora.config import TUTORIAL_RECIPE, with_overrides

    cfg = with_overrides(gpu_cfg(shape_dir, tmp_path / "seed"), TUTORIAL_RECIPE)
    model = with_adapters(cfg)
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"


def test_fast_path_loss_equals_plain_padded_path_on_gpu(shape_dir, tmp_path):
    import torch

    from samsum_qlora import chat, data, modeling, training

    plain_cfg = gpu_cfg(
        shape_dir,
        tmp_path / "p",
        **{
            "quantization.dequantize_once": False,
            "train.trained_logits_only": False,
            "train.max_tokens_per_batch": None,
        },
    )
    fast_cfg = gpu_cfg(shape_dir, tmp_path / "f")
    tokenizer = modeling.load_tokenizer(fast_cfg.model)
    rows = data.load_rows(str(REF / "samsum"), "validation")[:48]
    columns, _ = chat.ChatFormat.build(tokenizer, fast_cfg.data).encode_rows(rows, progress=False)
    torch.manual_seed(0)
    plain = with_adapters(plain_cfg)
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    fast = with_adapters(fast_cfg)
    fast.load_state_dict({k: v for k, v in plain.state_dict().items() if "lora_" in k}, strict=False)
    pad = chat.pad_id(tokenizer)
    plain_collate, fast_collate = training.collator(plain_cfg.train, pad), training.collator(fast_cfg.train, pad)
    total = sum(sum(label != -100 for label in row[1:]) for row in columns["labels"])
    plain_trainer = training.build_trainer(
        plain_cfg.train, plain, training.training_set(plain_cfg.train, columns), plain_collate, tmp_path / "pc"
    )
    fast_trainer = training.build_trainer(
        fast_cfg.train, fast, training.training_set(fast_cfg.train, columns), fast_collate, tmp_path / "fc"
    )

    def summed(trainer, model, collate, items, size):
        loss = 0.0
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # as the Trainer runs it
            for start in range(0, len(items), size):
                batch = {
                    k: v.cuda() if torch.is_tensor(v) else v for k, v in collate(items[start : start + size]).items()
                }
                loss += trainer.compute_loss(model, batch, num_items_in_batch=total).item()
        return loss

    plain_items = [{"input_ids": i, "labels": lab} for i, lab in zip(columns["input_ids"], columns["labels"])]
    fast_items = [fast_trainer.train_dataset[i] for i in range(len(fast_trainer.train_dataset))]
    plain_loss = summed(plain_trainer, plain, plain_collate, plain_items, 8)
    fast_loss = summed(fast_trainer, fast, fast_collate, fast_items, 1)  # trained positions from the collator
    print(
        f"GPU loss: plain padded 4-bit {plain_loss:.6f}, fast path {fast_loss:.6f}, "
        f"relative difference {abs(fast_loss - plain_loss) / plain_loss:.2e}"
    )
    assert fast_loss == pytest.approx(plain_loss, rel=1e-3)


@pytest.mark.parametrize("dequantize", [True, False])
def test_graphed_training_steps_equal_the_trainers_steps_on_gpu(shape_dir, tmp_path, dequantize):
    """The step captured as CUDA graphs (first batch of a shape eager, second captured, the rest
    replayed) trains what the Trainer's own step trains: the same losses and adapter weights."""
    import torch

    from samsum_qlora import chat, data, modeling, training

    cfg = gpu_cfg(
        shape_dir,
        tmp_path / "g",
        **{"quantization.dequantize_once": dequantize, "train.max_tokens_per_batch": 2048, "train.max_steps": 24},
    )
    tokenizer = modeling.load_tokenizer(cfg.model)
    rows = data.load_rows(str(REF / "samsum"), "validation")[:40]
    columns, _ = chat.ChatFormat.build(tokenizer, cfg.data).encode_rows(rows, progress=False)
    runs = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = with_adapters(cfg)
        start = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        t = dataclasses.replace(cfg.train, cuda_graphs=graphs, logging_steps=1)
        trainer = training.build_trainer(
            t, model, training.training_set(t, columns), training.collator(t, chat.pad_id(tokenizer)), tmp_path / "c"
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        weights = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[graphs] = (losses, weights, trainer.graphs)
        del trainer, model
        torch.cuda.empty_cache()
    (plain_losses, plain_weights, _), (losses, weights, graphs) = runs[False], runs[True]
    print(
        f"GPU graphed steps (dequantize_once={dequantize}): {len(graphs.graphs)} shapes captured, "
        f"{graphs.replays} replays; losses {losses[:3]} ... vs {plain_losses[:3]} ..."
    )
    assert graphs.on and len(graphs.graphs) >= 2 and graphs.replays >= 6
    assert losses == pytest.approx(plain_losses, rel=2e-3)
    # what training moved the weights by, the same up to the GPU's summation order (atomics)
    moved = sum(((w - start[n]) ** 2).sum() for n, w in plain_weights.items()) ** 0.5
    apart = sum(((weights[n] - w) ** 2).sum() for n, w in plain_weights.items()) ** 0.5
    print(f"GPU graphed steps: the weights moved {moved:.4g}, graphed and plain {apart:.4g} apart")
    assert moved > 0 and apart < 0.05 * moved


def test_cuda_graph_steps_equal_plain_steps(shape_dir, tmp_path):
    """A captured decoding step replays the very kernels of the plain one: the same tokens."""
    from samsum_qlora import chat, data, generation, modeling

    cfg = gpu_cfg(shape_dir, tmp_path / "g")
    tokenizer = modeling.load_tokenizer(cfg.model)
    fmt = chat.ChatFormat.build(tokenizer, cfg.data)
    prompts = [fmt.prompt(r["dialogue"]) for r in data.load_rows(str(REF / "samsum"), "test")[:48]]
    model = modeling.load_generation_model(cfg.model, cfg.quantization, None, merge=True)

    def decode(**kw):
        return generation.decode_batch(model, prompts, generation.Decoding(24, fmt.stop_ids, fmt.pad_id), **kw)

    graphed = decode(graphs=True)
    assert graphed == decode(graphs=False, full_view=True)
    assert all(len(d.ids) > 0 for d in graphed)


def test_cuda_graph_beam_and_sampled_steps_equal_plain_steps(shape_dir, tmp_path, monkeypatch):
    """Beam search's captured step (the cache rows following their beams, then the forward) and a
    sampled one, replayed: the same tokens as the same steps run plainly on the same layout. Two
    frequent tokens end hypotheses too, so beams end at several lengths (random weights rarely
    reach an end of turn)."""
    from collections import Counter

    import torch

    from samsum_qlora import chat, data, generation, modeling

    cfg = gpu_cfg(shape_dir, tmp_path / "g")
    fmt = chat.ChatFormat.build(modeling.load_tokenizer(cfg.model), cfg.data)
    prompts = [fmt.prompt(r["dialogue"]) for r in data.load_rows(str(REF / "samsum"), "test")[:32]]
    model = modeling.load_generation_model(cfg.model, cfg.quantization, None, merge=True)
    greedy = generation.decode_batch(model, prompts, generation.Decoding(24, fmt.stop_ids, fmt.pad_id), graphs=True)
    stops = (*fmt.stop_ids, *(t for t, _ in Counter(t for d in greedy for t in d.ids).most_common(2)))
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    for kw in (
        {"num_beams": 4},
        {"num_beams": 4, "length_penalty": 0.6, "early_stopping": True},
        {"num_beams": 2, "early_stopping": "never"},
        {"do_sample": True, "temperature": 0.8, "top_p": 0.9},
    ):
        decoding = generation.Decoding(24, stops, fmt.pad_id, **kw)
        graphed = generation.decode_batch(model, prompts, decoding, graphs=True)
        assert len(replays) >= 2, kw  # the steps were replayed
        replays.clear()
        plain = generation.decode_batch(model, prompts, decoding, graphs=False, full_view=True)
        print(f"GPU graphed {kw}: {sum(d.ended for d in graphed)} of {len(graphed)} ended")
        assert graphed == plain, kw
        assert sum(d.ended for d in graphed) > 0


def test_flat_fused_rope_equals_transformers_rope_on_gpu():
    """liger-kernel's RoPE over the flattened batch rotates as transformers' RoPE does, forward and
    backward, in float32 and in bf16: each within its dtype's rounding of the exact rotation."""
    import liger_kernel.transformers as liger
    import torch

    from samsum_qlora import modeling

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    check_rope_within_rounding(modeling.flat_rope(liger.liger_rotary_pos_emb), "cuda")


ROPE_HEADS, ROPE_DIM = {"q": 32, "k": 8}, 64  # the Llama-3.2-1B shape


def check_rope_within_rounding(fused, device: str, shapes=((6, 640), (17, 192))) -> None:
    """`fused` and transformers' `apply_rotary_pos_emb` against the rotation computed in float64 from
    the same seeded inputs: each output and input gradient, element by element.

    Why this bound and not one atol: an element is a + b, two products (x1 cos - x2 sin and the like;
    backward, the same with the upstream gradient). Either path rounds each product and the sum to
    the dtype (liger-kernel computes in the dtype of cos/sin), so to first order its error is at most
    u (|a| + |b| + |a + b|) <= 2u (|a| + |b|), u being the unit roundoff, eps / 2: 2^-8 for bf16,
    2^-24 for float32. Where a and b cancel, the result is near 0 but its error is not: a fixed atol
    of 0.05 failed 3 of 7.9 M bf16 elements once. 3u leaves room for second-order terms; a wrong layout
    (another position's angle, a swapped half) is off by about |a| + |b| itself."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    for dtype in (torch.float32, torch.bfloat16):
        unit = torch.finfo(dtype).eps / 2
        for rows, width in shapes:
            x, upstream, cos, sin = rope_inputs(rows, width, dtype, device)
            exact = rope_results(apply_rotary_pos_emb, x, upstream, cos, sin, torch.float64)
            bounds = {n: 3 * unit * product_magnitudes(x[n], cos, sin) for n in x}
            bounds |= {f"d{n}": 3 * unit * product_magnitudes(upstream[n], cos, sin) for n in x}
            for name, rope in (("transformers", apply_rotary_pos_emb), ("fused", fused)):
                got = rope_results(rope, x, upstream, cos, sin, dtype)
                for key, bound in bounds.items():
                    excess = (got[key] - exact[key]).abs() - bound
                    assert excess.max() <= 0, (
                        f"{name} {dtype} {rows}x{width} {key}: {int((excess > 0).sum())} of {excess.numel()} "
                        f"elements beyond 3u (|a| + |b|), by up to {excess.max():.3g}"
                    )


def rope_inputs(rows: int, width: int, dtype, device: str):
    """One case's inputs, seeded by its shape: q and k as (rows, width, heads x dim), the upstream
    gradients (drawn in `dtype`, so every path gets exactly the same), and cos, sin of (1, width, dim)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(rows * 10_000 + width)
    x = {
        n: torch.randn(rows, width, h * ROPE_DIM, device=device, generator=gen).to(dtype) for n, h in ROPE_HEADS.items()
    }
    upstream = {n: torch.randn(t.shape, device=device, generator=gen).to(dtype) for n, t in x.items()}
    half = torch.arange(ROPE_DIM // 2, device=device) / (ROPE_DIM // 2)
    angles = torch.arange(width, device=device)[None, :, None] / 10_000**half
    cos, sin = (f(angles.repeat(1, 1, 2)).to(dtype) for f in (torch.cos, torch.sin))
    return x, upstream, cos, sin


def rope_results(rope, x, upstream, cos, sin, precision) -> dict:
    """`rope`'s outputs ("q", "k") and the inputs' gradients ("dq", "dk") under the loss
    sum(output x upstream), computed in `precision`, returned in float64."""
    import torch

    rows, width = x["q"].shape[:2]
    leaves = {n: t.to(precision).requires_grad_() for n, t in x.items()}
    q, k = (leaves[n].view(rows, width, -1, ROPE_DIM).transpose(1, 2) for n in ("q", "k"))
    rq, rk = rope(q * 1, k * 1, cos.to(precision), sin.to(precision))  # * 1: liger rotates in place
    out = {n: t.transpose(1, 2).reshape(rows, width, -1) for n, t in (("q", rq), ("k", rk))}
    loss = sum((out[n].double() * upstream[n].double()).sum() for n in out)
    grads = torch.autograd.grad(loss, [leaves[n] for n in out])
    return {n: t.double() for n, t in out.items()} | {f"d{n}": g.double() for n, g in zip(out, grads)}


def product_magnitudes(t, cos, sin):
    """|a| + |b| for each element of the rotation of `t` (rows, width, heads x dim), forward or
    backward alike: |t| |cos| + |rotate_half(t)| |sin| (cos and sin repeat over both halves)."""
    from transformers.models.llama.modeling_llama import rotate_half

    rows, width = t.shape[:2]
    per_head = t.double().view(rows, width, -1, ROPE_DIM)
    c, s = (u.double().abs().view(1, width, 1, ROPE_DIM) for u in (cos, sin))
    return (per_head.abs() * c + rotate_half(per_head).abs() * s).view_as(t)
