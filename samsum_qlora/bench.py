"""`samsum-qlora bench`: training and generation speed of *this* config on *this* machine.

The weights are `--model-dir`'s, or `model.name`'s architecture with random weights (no
download); the sequence lengths are the configured data's, tokenised for real, and training runs
through the very Trainer that `train` builds. `--compare seed` times the tutorial's recipe in the
same process; `--eval` times `eval`'s generation against the tutorial's per-example loop.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from samsum_qlora import batching, chat, data, files, generation, runtime
from samsum_qlora import model as modeling
from samsum_qlora import trainer as training
from samsum_qlora.config import SEED_RECIPE, Config, with_overrides
from samsum_qlora.errors import UserError
from samsum_qlora.metrics import LEVEL, paired_difference, rouge_per_example

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
GIB = 1024**3
RANDOM_MARK = "RANDOM_WEIGHTS"
LOOP_TIMED_ALONE = 8  # prompts the per-example loop is timed on alone when processes share the rest


def peak_flops(device_name: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if device_name and k in device_name), None)


def summarise(
    real_tokens: int,
    padded_tokens: int,
    seconds: float,
    n_params: int,
    device: str | None,
    peak_bytes: int | None,
    epoch_tokens: int,
) -> dict:
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
        "timed_tokens": real_tokens,
        "timed_seconds": round(seconds, 3),
    }


# --- the weights -----------------------------------------------------------------------------------


def random_model_dir(cfg: Config, out: Path) -> Path:
    """`model.name`'s architecture with random weights, saved in `out` so the real loading path
    (4-bit) reads it. An `out` that already holds a model of that shape is used as it is: the
    random one of an earlier run (seeded, so the same), or real weights. The random model is
    written beside `out` and moved there only when whole."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = modeling.read_config(cfg.model)
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        # model.name's tokenizer encodes the data: another vocabulary or size would not fit it
        found, wanted = modeling.model_shape(AutoConfig.from_pretrained(out)), modeling.model_shape(config)
        if found != wanted:
            raise UserError(f"--model-dir {out} holds a model of shape {found}, not {cfg.model.name}'s {wanted}")
        return out
    if out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"--model-dir {out} is not empty and holds no model (config.json, *.safetensors): "
            "give a model folder or a new one"
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, dtype=modeling.torch_dtype(cfg.quantization.bnb_4bit_compute_dtype)
    )
    with files.staged_dir(out) as staging:
        model.save_pretrained(staging)
        modeling.load_tokenizer(cfg.model).save_pretrained(staging)
        (staging / RANDOM_MARK).write_text("random weights written by `samsum-qlora bench` (torch seed 0)\n")
    return out


def weights_label(model_dir: Path) -> str:
    return "random" if (model_dir / RANDOM_MARK).is_file() else str(model_dir)


def base_parameter_count(model_dir: Path) -> int:
    """Parameters of the base model (tied embeddings once), from its safetensors header."""
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


# --- training --------------------------------------------------------------------------------------


class Counting:
    """Wraps a collator to record (real, padded) tokens of every micro-batch, in order."""

    def __init__(self, collator):
        self.collator, self.counts = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        self.counts.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch


class Clock(TrainerCallback):
    """The time at the end of every optimizer step, the GPU's work included."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def time_training(
    cfg: Config, model_dir: Path, columns: dict, steps: int, warmup: int, epoch_tokens: int, workdir: Path
) -> dict:
    cfg = with_overrides(
        cfg,
        {
            "model": {"name": str(model_dir)},
            "train": {"max_steps": warmup + steps, "save_steps": 10**9, "logging_steps": 10**9, "report_to": ["none"]},
        },
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pad_id = chat.pad_id(modeling.load_tokenizer(cfg.model))
    model = modeling.attach_new_adapters(
        modeling.load_model(cfg.model, cfg.quantization, training=True),
        cfg.lora,
        cfg.quantization,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        half_precision=cfg.train.bf16 or cfg.train.fp16,
    )
    clock, counting = Clock(), Counting(training.Collator(pad_id, cfg.train.pad_to_multiple_of))
    trainer = training.build_trainer(
        cfg.train, model, training.training_set(cfg.train, columns), counting, workdir / "ckpt", [clock]
    )
    trainer.train()
    micro = cfg.train.gradient_accumulation_steps
    timed = counting.counts[warmup * micro : (warmup + steps) * micro]
    figures = summarise(
        sum(r for r, _ in timed),
        sum(p for _, p in timed),
        clock.stamps[warmup + steps - 1] - clock.stamps[warmup - 1],
        base_parameter_count(model_dir),
        torch.cuda.get_device_name() if cuda else None,
        torch.cuda.max_memory_allocated() if cuda else None,
        epoch_tokens,
    )
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return figures


# --- generation ------------------------------------------------------------------------------------


def random_adapters(cfg: Config, out: Path) -> Path:
    """Adapters with an effect (B != 0), saved, so eval's loading path reads them like real ones."""
    torch.manual_seed(0)
    model = modeling.attach_new_adapters(
        modeling.load_model(cfg.model, cfg.quantization, training=False),
        cfg.lora,
        cfg.quantization,
        gradient_checkpointing=False,
        half_precision=False,
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.save_pretrained(out)
    return out


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release(model) -> None:
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fast_path(cfg: Config, adapters: Path, fmt: chat.ChatFormat, prompts: list[list[int]]):
    """`eval`'s generation of every prompt: ({index: Decoded}, seconds), after a small warm-up."""
    e = cfg.eval
    model = modeling.load_generation_model(cfg.model, cfg.quantization, adapters, merge=e.merge_adapters)
    batches = batching.generation_batches(
        [len(p) for p in prompts], max_rows=e.batch_size, max_tokens=e.max_tokens_per_batch, new_tokens=e.max_new_tokens
    )
    out: dict[int, generation.Decoded] = {}

    def run(chosen):
        generation.generate(
            model,
            prompts,
            chosen,
            max_new_tokens=e.max_new_tokens,
            pad_id=fmt.pad_id,
            stop_ids=fmt.stop_ids,
            graphs=e.cuda_graphs,
            progress=False,
            on_batch=lambda idx, decoded: out.update(zip(idx, decoded)),
        )

    run([batches[-1][:2]])  # warm-up: kernels, workspaces, graph machinery
    _synchronize()
    started = time.perf_counter()
    run(batches)
    _synchronize()
    seconds = time.perf_counter() - started
    _release(model)
    return out, seconds


@dataclass(frozen=True)
class LoopTask:
    """The tutorial's per-example loop and our decoder at batch 1, on the loop's model: the 4-bit
    base with the adapters attached, unmerged (`config.SEED_RECIPE`). Picklable, for workers."""

    cfg: Config
    adapters: Path
    pad_id: int
    stop_ids: tuple[int, ...]

    def load(self):
        seed = with_overrides(self.cfg, SEED_RECIPE)
        return modeling.load_generation_model(seed.model, seed.quantization, self.adapters, merge=False)

    def loop(self, model, prompt: list[int]) -> list[int]:
        return generation.generate_one(model, prompt, max_new_tokens=self.cfg.eval.max_new_tokens,
                                       pad_id=self.pad_id, stop_ids=self.stop_ids).ids  # fmt: skip

    def ours(self, model, prompt: list[int]) -> list[int]:
        return generation.decode_batch(model, [prompt], max_new_tokens=self.cfg.eval.max_new_tokens,
                                       pad_id=self.pad_id, stop_ids=self.stop_ids)[0].ids  # fmt: skip


_WORKER: dict = {}  # a worker process's task and model, loaded once


def _worker_start(task: LoopTask) -> None:
    runtime.quiet_known_noise()
    torch.set_num_threads(1)  # workers side by side: one CPU thread each is all batch-1 decoding uses
    _WORKER["task"], _WORKER["model"] = task, task.load()


def _worker_run(chunk: dict[int, list[int]]) -> dict[int, tuple[list[int], list[int]]]:
    task, model = _WORKER["task"], _WORKER["model"]
    return {i: (task.loop(model, p), task.ours(model, p)) for i, p in chunk.items()}


def in_processes(task: LoopTask, prompts: dict[int, list[int]], workers: int) -> dict:
    """Both per-example paths on `prompts`, shared by `workers` processes: at batch 1 a step is
    bound by Python and kernel launches, so processes side by side keep the GPU busier."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    items = list(prompts.items())
    chunks = [dict(items[k : k + 4]) for k in range(0, len(items), 4)]
    out: dict = {}
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with (
        ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start, initargs=(task,)) as pool,
        tqdm(total=len(items), desc="per-example loop", unit="prompt") as bar,
    ):
        for done in as_completed([pool.submit(_worker_run, c) for c in chunks]):
            out.update(done.result())
            bar.update(len(done.result()))
    return out


def per_example_paths(task: LoopTask, prompts: list[list[int]], sample: list[int], workers: int, timed_alone: int):
    """The loop and our decoder one prompt at a time on `sample`: the same arithmetic, so they must
    give the same tokens. The loop is timed in this process alone: on all of `sample`, or with
    `workers` > 1 on its first `timed_alone` prompts, the rest decoded in that many processes (for
    their outputs: contention would blur their times). Returns ({i: loop ids}, {i: our ids},
    prompts timed, seconds)."""
    timed = sample if workers <= 1 else sample[:timed_alone]
    model = task.load()
    _synchronize()
    started = time.perf_counter()
    loop = {i: task.loop(model, prompts[i]) for i in timed}
    _synchronize()
    seconds = time.perf_counter() - started
    ours = {i: task.ours(model, prompts[i]) for i in timed}
    _release(model)
    rest = {i: prompts[i] for i in sample if i not in loop}
    for i, (theirs, mine) in (in_processes(task, rest, workers) if rest else {}).items():
        loop[i], ours[i] = theirs, mine
    return loop, ours, timed, seconds


def time_generation(cfg: Config, model_dir: Path, adapters: Path | None, rows: list[dict], workdir: Path, *,
                    loop_sample: int, loop_workers: int) -> dict:  # fmt: skip
    """`eval`'s batched generation of every prompt at eval.max_new_tokens with real stopping,
    against the tutorial's per-example loop on the split's first `loop_sample` prompts, shared by
    `loop_workers` processes."""
    cfg = with_overrides(cfg, {"model": {"name": str(model_dir)}})
    fmt = chat.ChatFormat.build(modeling.load_tokenizer(cfg.model), cfg.data, modeling.generation_eos(cfg.model))
    prompts = [fmt.prompt(r["dialogue"]) for r in rows]
    adapters = adapters or random_adapters(cfg, workdir / "adapters")
    fast, fast_s = fast_path(cfg, adapters, fmt, prompts)
    sample = list(range(min(loop_sample, len(prompts))))
    task = LoopTask(cfg, adapters, fmt.pad_id, fmt.stop_ids)
    loop, ours, timed, loop_s = per_example_paths(task, prompts, sample, loop_workers, LOOP_TIMED_ALONE)
    new_tokens = sum(len(d.ids) + d.ended for d in fast.values())
    loop_tokens = sum(len(loop[i]) + (len(loop[i]) < cfg.eval.max_new_tokens) for i in timed)
    figures = {
        "examples": len(prompts),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "merged_adapters": cfg.eval.merge_adapters,
        "cuda_graphs": cfg.eval.cuda_graphs,
        "batched_seconds": round(fast_s, 2),
        "batched_new_tokens": new_tokens,
        "batched_tokens_per_s": round(new_tokens / fast_s, 1),
        "ended_share": round(sum(d.ended for d in fast.values()) / len(fast), 4),
        "loop_sample": len(sample),
        "loop_timed": len(timed),
        "loop_tokens_per_s": round(loop_tokens / loop_s, 1),
        "loop_projected_seconds": round(loop_s / len(timed) * len(prompts), 1),
        "same_outputs_as_loop": round(sum(fast[i].ids == loop[i] for i in sample) / len(sample), 4),
        "same_arithmetic_same_outputs": round(sum(ours[i] == loop[i] for i in sample) / len(sample), 4),
    }
    figures["ratio"] = round(figures["loop_projected_seconds"] / fast_s, 1)
    if weights_label(model_dir) != "random":  # real weights: what the two paths score
        texts = {"batched": [fmt.decode(fast[i].ids) for i in sample], "loop": [fmt.decode(loop[i]) for i in sample]}
        figures["rouge_sample"] = compare_rouge(texts, [chat.clean(rows[i]["summary"]) for i in sample])
        figures["sample_outputs"] = [{"row": i, "batched": b, "loop": lp} for i, b, lp in zip(sample, *texts.values())]
    return figures


def compare_rouge(texts: dict[str, list[str]], refs: list[str]) -> dict:
    """ROUGE of the batched path and of the loop on the same rows, and batched - loop per row with
    its bootstrap interval: a difference inside the interval is the rows' spread, not the path."""
    scores = {path: rouge_per_example(t, refs) for path, t in texts.items()}
    out: dict = {path: {k: sum(v) / len(v) for k, v in s.items()} for path, s in scores.items()}
    out["difference"] = {
        k: paired_difference(scores["batched"][k], scores["loop"][k]) for k in ("rouge1", "rouge2", "rougeL")
    }
    return out


# --- the command -----------------------------------------------------------------------------------


def benchmark(cfg: Config, *, split: str, steps: int, warmup: int, compare_seed: bool, with_eval: bool,
              loop_sample: int, epoch_tokens: int | None, json_path: Path | None, model_dir: Path | None = None,
              adapters: Path | None = None, loop_workers: int = 1) -> dict:  # fmt: skip
    if json_path is not None:
        files.ensure_writable_dir(json_path.parent)
    if adapters is not None and not adapters.is_dir():
        raise UserError(f"--adapters {adapters} is not a folder")
    # A random model's tiny gradients reach float32 denormals, which CPUs process ~100x slower
    # (GPUs do not); flushing them to zero keeps CPU timings about the model, not the FPU.
    torch.set_flush_denormal(True)

    # --- the data: real rows, tokenised as train does ---
    fmt = chat.ChatFormat.build(modeling.load_tokenizer(cfg.model), cfg.data, modeling.generation_eos(cfg.model))
    rows = [r for r in data.load_rows(cfg.data.source, split, cfg.data.revision) if chat.clean(r["dialogue"])]
    columns, stats = fmt.encode_rows(rows)
    device = runtime.device_name()
    print(f"bench on {device}: {stats.kept} rows of {cfg.data.source} ({split}), {stats.tokens:,} tokens")
    result: dict = {"device": device, "model": cfg.model.name, "split": split, "rows": stats.kept,
                    "epoch_tokens": epoch_tokens or stats.tokens, "steps": steps, "warmup": warmup}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # --- the weights ---
        model_dir = random_model_dir(cfg, model_dir or workdir / "random-model")
        result["weights"] = weights_label(model_dir)

        # --- generation, then training: liger-kernel patches transformers for the whole process once
        # a model trains with it, and neither eval's generation nor the seed recipe runs with it ---
        if with_eval:
            result["eval"] = time_generation(
                cfg, model_dir, adapters, rows, workdir, loop_sample=loop_sample, loop_workers=loop_workers
            )

        def timed(config):
            return time_training(config, model_dir, columns, steps, warmup, result["epoch_tokens"], workdir)

        seed = timed(with_overrides(cfg, SEED_RECIPE)) if compare_seed else None
        result.update(timed(cfg))
        if seed is not None:
            result["seed"], result["ratio"] = seed, round(result["tokens_per_s"] / seed["tokens_per_s"], 2)
    print(report(result))
    if json_path is not None:
        files.write_json(json_path, result)
        print(f"wrote {json_path}")
    return result


def report(r: dict) -> str:
    def line(name, f):
        mem = f"{f['peak_memory_gib']:.2f} GiB" if f["peak_memory_gib"] is not None else "n/a"
        mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "n/a"
        return (
            f"| {name} | {f['tokens_per_s']:,.0f} | {100 * f['padding_fraction']:.1f}% | {mem} | {mfu} "
            f"| {f['epoch_minutes']:.1f} min |"
        )

    out = [
        f"device: {r['device']}; {r['model']}'s shape, weights: {r['weights']}",
        "| recipe | real tokens/s | padding | peak memory | MFU | epoch |",
        "|---|---|---|---|---|---|",
        line("this config", r),
    ]
    if "seed" in r:
        out += [line("seed recipe", r["seed"]), f"speed-up over the seed recipe: {r['ratio']:.1f}x"]
    if "eval" in r:
        out += eval_lines(r["eval"])
    return "\n".join(out)


def eval_lines(e: dict) -> list[str]:
    lines = [
        f"generation, {e['examples']} prompts, up to {e['max_new_tokens']} new tokens, stopping at the end of "
        f"turn: {e['batched_seconds']:.2f} s ({e['batched_new_tokens']:,} tokens, {e['batched_tokens_per_s']:,.0f} "
        f"tokens/s; {100 * e['ended_share']:.0f}% ended); the per-example loop {e['loop_tokens_per_s']:,.1f} "
        f"tokens/s, {e['loop_projected_seconds']:.0f} s projected: {e['ratio']:.0f}x",
        f"on the first {e['loop_sample']} prompts (the loop timed on {e['loop_timed']}), same output as the loop: "
        f"batched {100 * e['same_outputs_as_loop']:.1f}%, our decoder one at a time on the loop's model "
        f"{100 * e['same_arithmetic_same_outputs']:.1f}%",
    ]
    if "rouge_sample" in e:
        shown = ("rouge1", "rouge2", "rougeL")
        for path in ("batched", "loop"):
            scores = e["rouge_sample"][path]
            lines.append(f"ROUGE-1/2/L on the sample, {path}: " + " / ".join(f"{100 * scores[k]:.2f}" for k in shown))
        d = e["rouge_sample"]["difference"]
        lines.append(
            f"batched - loop, per row, {100 * LEVEL:.0f}% bootstrap interval: "
            + " / ".join(
                f"{100 * d[k]['mean']:+.2f} ({100 * d[k]['low']:+.2f} to {100 * d[k]['high']:+.2f})" for k in shown
            )
        )
    return lines
