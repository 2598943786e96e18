"""`samsum-qlora bench`: training and generation speed of *this* config on *this* machine.

The model is `model.name`'s architecture with random weights (no weight download), the sequence
lengths are the configured data's, tokenised for real, and training runs through the very Trainer
that `train` builds. `--compare seed` times the tutorial's recipe in the same process.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from samsum_qlora import data, files
from samsum_qlora.config import Config, build_config
from samsum_qlora.errors import UserError

# The seed tutorial's recipe, as overrides of any config: 4 rows x 4 accumulation padded to the
# longest, gradient checkpointing, paged 8-bit AdamW, all logits, the 4-bit matmuls, LoRA dropout
# 0.05, no fused kernels, torch's attention backends as they come.
SEED_RECIPE = {
    "model": {"liger_kernels": False, "cudnn_attention": True},  # torch's default
    "lora": {"lora_dropout": 0.05},
    "quantization": {"dequantize_once": False},
    "train": {
        "max_tokens_per_batch": None, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
        "gradient_checkpointing": True, "trained_logits_only": False, "optim": "paged_adamw_8bit",
        "pad_to_multiple_of": 1,
    },
    "eval": {"merge_adapters": False},
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
GIB = 1024**3


def with_overrides(cfg: Config, sections: dict) -> Config:
    tree = cfg.to_dict()
    for section, values in sections.items():
        tree[section].update(values)
    return build_config(tree)


def peak_flops(device_name: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if device_name and k in device_name), None)


def summarise(real_tokens: int, padded_tokens: int, seconds: float, n_params: int, device: str | None,
              peak_bytes: int | None, epoch_tokens: int) -> dict:
    """Figures of one timed run. FLOPs per trained token: 4 x parameters (forward 2, backward
    through the frozen weights 2; LoRA's own weight gradients are negligible)."""
    tps = real_tokens / seconds
    flops = peak_flops(device)
    return {
        "tokens_per_s": round(tps, 1),
        "padding_fraction": round(1 - real_tokens / padded_tokens, 4) if padded_tokens else 0.0,
        "peak_memory_gib": round(peak_bytes / GIB, 2) if peak_bytes is not None else None,
        "mfu": round(tps * 4 * n_params / flops, 4) if flops else None,
        "epoch_minutes": round(epoch_tokens / tps / 60, 2),
        "timed_tokens": real_tokens, "timed_seconds": round(seconds, 3),
    }


RANDOM_MARK = "RANDOM_WEIGHTS"


def random_model_dir(name: str, revision: str | None, dtype_name: str, out: Path) -> Path:
    """`name`'s architecture with random weights, saved in `out` so the real loading path (4-bit)
    reads it. An `out` that already holds a model of that shape is used as it is: the random one
    of an earlier run (seeded, so the same), or real weights (then `same_outputs_as_loop` means
    something). The random model is written beside `out` and moved there only when whole."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from samsum_qlora.model import load_tokenizer, model_shape, torch_dtype

    config = AutoConfig.from_pretrained(name, revision=revision)
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        # model.name's tokenizer encodes the data: another vocabulary or size would not fit it
        found, wanted = model_shape(AutoConfig.from_pretrained(out)), model_shape(config)
        if found != wanted:
            raise UserError(f"--model-dir {out} holds a model of shape {found}, not {name}'s {wanted}")
        return out
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--model-dir {out} is not empty and holds no model (config.json, *.safetensors): "
                        "give a model folder or a new one")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype_name))
    model.save_pretrained(staging)
    load_tokenizer(name, revision).save_pretrained(staging)
    (staging / RANDOM_MARK).write_text("random weights written by `samsum-qlora bench` (torch seed 0)\n")
    del model
    files.publish_dir(staging, out)
    return out


def weights_label(model_dir: Path) -> str:
    return "random" if (model_dir / RANDOM_MARK).is_file() else str(model_dir)


class _Counting:
    """Wraps a collator to record (real, padded) tokens of every micro-batch, in order."""

    def __init__(self, collator):
        self.collator, self.counts = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        self.counts.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch


def time_training(cfg: Config, model_dir: Path, columns: dict, steps: int, warmup: int, epoch_tokens: int,
                  workdir: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from samsum_qlora import model as modeling, train

    cfg = copy.deepcopy(cfg)
    cfg.model.name = str(model_dir)
    cfg.train.max_steps, cfg.train.save_steps, cfg.train.logging_steps = warmup + steps, 10**9, 10**9
    cfg.train.report_to = ["none"]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tokenizer = modeling.load_tokenizer(cfg.model.name)
    model = modeling.attach_new_adapters(modeling.load_model(cfg, training=True), cfg)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    counting = _Counting(data.PadToLongest(data.pad_token_id(tokenizer), cfg.train.pad_to_multiple_of))
    trainer = train.build_trainer(cfg, model, tokenizer, train.training_set(cfg, columns), workdir / "ckpt",
                                  [Clock()], collator=counting)
    trainer.train()
    micro = cfg.train.gradient_accumulation_steps
    timed = counting.counts[warmup * micro : (warmup + steps) * micro]
    figures = summarise(
        sum(r for r, _ in timed), sum(p for _, p in timed), stamps[warmup + steps - 1] - stamps[warmup - 1],
        base_parameter_count(model_dir), torch.cuda.get_device_name() if cuda else None,
        torch.cuda.max_memory_allocated() if cuda else None, epoch_tokens,
    )
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return figures


def base_parameter_count(model_dir: Path) -> int:
    """Parameters of the base model (tied embeddings once), from its safetensors header."""
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def until_stop(seq: list[int], stop_ids: list[int]) -> list[int]:
    """The part of a greedy continuation that generation stopping at end-of-turn would return."""
    return next((seq[:i] for i, t in enumerate(seq) if t in stop_ids), seq)


def time_generation(cfg: Config, model_dir: Path, prompts: list[list[int]], loop_sample: int, workdir: Path,
                    new_tokens: int = 64) -> dict:
    """Batched generation with the eval path's model vs the per-example loop of the seed
    (4-bit base, unmerged adapters, batch 1), `new_tokens` per example.

    Both run greedily without stopping, so every example costs the same; greedy decoding is causal,
    so each output cut at its first end-of-turn is exactly what `eval` (which stops there) returns,
    and those are what `same_outputs_as_loop` compares. (Suppressing end-of-turn instead would
    compare text no model would ever emit.)"""
    import torch

    from samsum_qlora import evaluate, model as modeling

    cfg = copy.deepcopy(cfg)
    cfg.model.name = str(model_dir)
    cuda = torch.cuda.is_available()
    tokenizer = modeling.load_tokenizer(cfg.model.name)
    # Adapters with an effect (B != 0), saved and loaded the way eval loads real ones.
    torch.manual_seed(0)
    fresh = modeling.attach_new_adapters(modeling.load_model(cfg, training=False), cfg)
    for name, p in fresh.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    fresh.save_pretrained(workdir / "adapters")
    del fresh
    pad = data.pad_token_id(tokenizer)

    def run(gen_cfg, subset, batch_size):
        model = modeling.load_generation_model(gen_cfg, workdir / "adapters")
        outputs: dict[int, list[int]] = {}
        evaluate.generate(model, [prompts[subset[0]]], batch_size=1, max_new_tokens=4, pad_id=pad,
                          stop_ids=[], decode=lambda ids: ids, on_batch=lambda *a: None, progress=False)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        evaluate.generate(
            model, [prompts[i] for i in subset], batch_size=batch_size, max_new_tokens=new_tokens, pad_id=pad,
            stop_ids=[], decode=lambda ids: ids,
            on_batch=lambda idx, seqs: outputs.update({subset[i]: s for i, s in zip(idx, seqs)}), progress=False)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        del model
        if cuda:
            torch.cuda.empty_cache()
        return outputs, seconds

    everything = list(range(len(prompts)))
    sample = everything[:: max(1, len(prompts) // loop_sample)][:loop_sample]
    batched, batched_s = run(cfg, everything, cfg.eval.batch_size)
    loop, loop_s = run(with_overrides(cfg, SEED_RECIPE), sample, 1)
    loop_projected = loop_s / len(sample) * len(prompts)
    stops = data.end_of_turn_ids(tokenizer)
    same = sum(until_stop(batched[i], stops) == until_stop(loop[i], stops) for i in sample)
    # summaries that ended (end-of-turn) within the budget, and their lengths
    ended = [n for n in (len(until_stop(s, stops)) for s in batched.values()) if n < new_tokens]
    batched_tokens = sum(map(len, batched.values()))
    return {
        "examples": len(prompts), "new_tokens_per_example": new_tokens, "batch_size": cfg.eval.batch_size,
        "merged_adapters": cfg.eval.merge_adapters,
        "batched_seconds": round(batched_s, 2), "batched_new_tokens": batched_tokens,
        "batched_tokens_per_s": round(batched_tokens / batched_s, 1),
        "loop_sample": len(sample), "loop_tokens_per_s": round(sum(map(len, loop.values())) / loop_s, 1),
        "loop_projected_seconds": round(loop_projected, 1), "ratio": round(loop_projected / batched_s, 1),
        "same_outputs_as_loop": round(same / len(sample), 4),
        "ended_within_budget": round(len(ended) / len(prompts), 4),
        "mean_summary_tokens": round(sum(ended) / len(ended), 1) if ended else None,
    }


def run(cfg: Config, *, split: str, steps: int, warmup: int, compare_seed: bool, with_eval: bool,
        loop_sample: int, epoch_tokens: int | None, json_path: Path | None, model_dir: Path | None = None) -> dict:
    import torch

    from samsum_qlora import model as modeling

    if json_path is not None:
        files.ensure_writable_dir(json_path.parent)
    # A random model's tiny gradients reach float32 denormals, which CPUs process ~100x slower
    # (GPUs do not); flushing them to zero keeps CPU timings about the model, not the FPU.
    torch.set_flush_denormal(True)
    tokenizer = modeling.load_tokenizer(cfg.model.name, cfg.model.revision)
    rows = data.rows(data.load_split(cfg.data.source, split, cfg.data.revision))
    columns, stats = data.encode_rows(tokenizer, rows, instruction=cfg.data.task_instruction,
                                      max_length=cfg.data.max_length, date_string=cfg.data.date_string)
    epoch_tokens = epoch_tokens or stats.tokens
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"bench on {device}: {stats.kept} rows of {cfg.data.source} ({split}), {stats.tokens:,} tokens")
    result: dict = {"device": device, "model": cfg.model.name, "split": split, "rows": stats.kept,
                    "epoch_tokens": epoch_tokens, "steps": steps, "warmup": warmup}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = random_model_dir(cfg.model.name, cfg.model.revision, cfg.quantization.bnb_4bit_compute_dtype,
                                     model_dir or workdir / "random-model")
        result["weights"] = weights_label(model_dir)
        # The seed first: liger-kernel patches transformers' Llama functions for the whole process.
        seed = (time_training(with_overrides(cfg, SEED_RECIPE), model_dir, columns, steps, warmup, epoch_tokens,
                              workdir) if compare_seed else None)
        result.update(time_training(cfg, model_dir, columns, steps, warmup, epoch_tokens, workdir))
        if seed is not None:
            result["seed"], result["ratio"] = seed, round(result["tokens_per_s"] / seed["tokens_per_s"], 2)
        if with_eval:
            prompts = [data.encode_prompt(tokenizer, r["dialogue"], instruction=cfg.data.task_instruction,
                                          max_length=cfg.data.max_length, date_string=cfg.data.date_string)
                       for r in rows if data.clean(r["dialogue"])]
            result["eval"] = time_generation(cfg, model_dir, prompts, loop_sample, workdir)
    print(report(result))
    if json_path is not None:
        files.write_json(json_path, result)
        print(f"wrote {json_path}")
    return result


def report(r: dict) -> str:
    def line(name, f):
        mem = f"{f['peak_memory_gib']:.2f} GiB" if f["peak_memory_gib"] is not None else "n/a"
        mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "n/a"
        return (f"| {name} | {f['tokens_per_s']:,.0f} | {100 * f['padding_fraction']:.1f}% | {mem} | {mfu} "
                f"| {f['epoch_minutes']:.1f} min |")

    out = [f"device: {r['device']}; {r['model']}'s shape, weights: {r['weights']}",
           "| recipe | real tokens/s | padding | peak memory | MFU | epoch |",
           "|---|---|---|---|---|---|", line("this config", r)]
    if "seed" in r:
        out += [line("seed recipe", r["seed"]), f"speed-up over the seed recipe: {r['ratio']:.1f}x"]
    if "eval" in r:
        e = r["eval"]
        out.append(
            f"generation, {e['examples']} examples x {e['new_tokens_per_example']} new tokens: batched "
            f"{e['batched_seconds']:.1f} s ({e['batched_tokens_per_s']:,.0f} tokens/s); per-example loop "
            f"{e['loop_tokens_per_s']:,.0f} tokens/s, {e['loop_projected_seconds']:.0f} s projected: "
            f"{e['ratio']:.0f}x; same greedy output as the loop on {100 * e['same_outputs_as_loop']:.0f}% "
            f"of {e['loop_sample']} sampled examples (cut at end-of-turn; {100 * e['ended_within_budget']:.0f}% "
            f"ended within {e['new_tokens_per_example']} tokens)"
        )
    return "\n".join(out)

