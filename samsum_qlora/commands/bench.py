"""`samsum-qlora bench`: training and generation speed of *this* config on *this* machine.

The weights are `--model-dir`'s, or `model.name`'s architecture with random weights (no
download); the sequence lengths are the configured data's, tokenised for real. Training runs the
model `train` builds through the Trainer `train` builds; generation runs `eval`'s own
`Summarizer`. `--compare tutorial` times the tutorial's recipe in the same process; `--eval` times
`eval`'s generation against the tutorial's per-example loop, greedy, and beam search beside it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from samsum_qlora import chat, data, files, generation, modeling, runtime, training
from samsum_qlora.config import TUTORIAL_RECIPE, Config, EvalArgs, with_overrides
from samsum_qlora.errors import UserError
from samsum_qlora.layout import RANDOM_MARK
from samsum_qlora.metrics import LEVEL, SHOWN, means, paired_difference, rouge, rouge_per_example
from samsum_qlora.summarizer import Summarizer

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
GIB = 1024**3
LOOP_TIMED_ALONE = 8  # prompts the per-example loop is timed on alone when processes share the rest


def peak_flops(device_name: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if device_name and k in device_name), None)


@dataclass(frozen=True)
class Timed:
    """What a timed stretch of training did: real and padded tokens, in `seconds`."""

    real_tokens: int
    padded_tokens: int
    seconds: float


def summarise(timed: Timed, *, n_params: int, device: str | None, peak_bytes: int | None, epoch_tokens: int) -> dict:
    """Figures of one timed run. FLOPs per trained token: 4 x parameters (forward 2, backward
    through the frozen weights 2; LoRA's own weight gradients are negligible)."""
    tps = timed.real_tokens / timed.seconds
    flops = peak_flops(device)
    padded = timed.padded_tokens
    return {
        "tokens_per_s": round(tps, 1),
        "padding_fraction": round(1 - timed.real_tokens / padded, 4) if padded else 0.0,
        "peak_memory_gib": round(peak_bytes / GIB, 2) if peak_bytes is not None else None,
        "mfu": round(tps * 4 * n_params / flops, 4) if flops else None,
        "epoch_minutes": round(epoch_tokens / tps / 60, 2),
        "timed_tokens": timed.real_tokens,
        "timed_seconds": round(timed.seconds, 3),
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
    """Wraps a collator to record (real, padded) tokens and the shape of every micro-batch, in order."""

    def __init__(self, collator):
        self.collator, self.counts, self.shapes = collator, [], []

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        self.counts.append((batch[training.REAL_TOKENS], ids.numel()))
        self.shapes.append(tuple(ids.shape))
        return batch


class Clock(TrainerCallback):
    """Marks when training began and when each optimizer step ended, on the GPU's own timeline
    (CUDA events: recording one waits for nothing, so the steps run exactly as in `train`, and the
    time between two marks includes any moment the GPU waited for Python); on a CPU, the wall clock."""

    def __init__(self):
        self.marks: list = []

    def _mark(self):
        if runtime.has_cuda():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()

    def seconds(self, first: int, last: int) -> float:
        """Seconds from mark `first` to mark `last` (mark 0: training began; mark k: step k ended)."""
        if runtime.has_cuda():
            self.marks[last].synchronize()
            return self.marks[first].elapsed_time(self.marks[last]) / 1000
        return self.marks[last] - self.marks[first]


def time_training(
    cfg: Config, model_dir: Path, columns: dict, *, steps: int, warmup: int | None, epoch_tokens: int, workdir: Path
) -> dict:
    """Figures of `steps` optimizer steps after `warmup` (None: one pass over the split's batches)."""
    micro = cfg.train.gradient_accumulation_steps
    train_set = training.training_set(cfg.train, columns)
    passes = warmup is None
    warmup = warmup or -(-len(train_set) // micro)
    cfg = with_overrides(
        cfg,
        {
            "model": {"name": str(model_dir)},
            "train": {"max_steps": warmup + steps, "save_steps": 10**9, "logging_steps": 10**9, "report_to": ["none"]},
        },
    )
    runtime.release_memory(reset_peak=True)
    tokenizer = modeling.load_tokenizer(cfg.model)
    model, train_args, _ = modeling.training_model(cfg, tokenizer)
    clock, counting = Clock(), Counting(training.collator(train_args, chat.pad_id(tokenizer)))
    trainer = training.build_trainer(train_args, model, train_set, counting, workdir / "ckpt", [clock])
    trainer.train()
    timed = counting.counts[warmup * micro : (warmup + steps) * micro]
    figures = summarise(
        Timed(sum(r for r, _ in timed), sum(p for _, p in timed), clock.seconds(warmup, warmup + steps)),
        n_params=base_parameter_count(model_dir),
        device=runtime.device_name() if runtime.has_cuda() else None,
        peak_bytes=runtime.peak_memory(),
        epoch_tokens=epoch_tokens,
    )
    # What a user sees: the warm-up steps as they ran (new shapes, kernels compiled, memory grown),
    # then the rest of the epoch at the timed pace.
    warm = Timed(sum(r for r, _ in counting.counts[: warmup * micro]), 0, clock.seconds(0, warmup))
    figures |= first_epoch(warm, figures["tokens_per_s"], epoch_tokens)
    figures["step_seconds"] = [round(clock.seconds(k, k + 1), 4) for k in range(warmup + steps)]
    figures["step_shapes"] = [list(shape) for shape in counting.shapes[: (warmup + steps) * micro]]
    figures["timed_new_shapes"] = new_shapes(counting.shapes, warmup * micro, (warmup + steps) * micro)
    figures |= {"warmup": warmup, "warmup_is_one_pass": passes}
    figures["cuda_graphs"] = len(trainer.graphs.graphs) if trainer.graphs is not None and trainer.graphs.on else None
    del trainer, model
    runtime.release_memory()
    return figures


def new_shapes(shapes: list[tuple], start: int, end: int) -> int:
    """How many of the batches start..end have a shape no batch before them had: on a machine's first
    run each one compiles kernels, so a pace timed over many of them is not the steady one."""
    seen, new = set(shapes[:start]), 0
    for shape in shapes[start:end]:
        new += shape not in seen
        seen.add(shape)
    return new


def first_epoch(warm: Timed, tokens_per_s: float, epoch_tokens: int) -> dict:
    """The epoch as a user's run spends it: the warm-up steps' real time, the rest at the timed pace."""
    rest = max(epoch_tokens - warm.real_tokens, 0) / tokens_per_s
    minutes = (warm.seconds + rest) / 60
    return {
        "warmup_seconds": round(warm.seconds, 3),
        "warmup_tokens": warm.real_tokens,
        "epoch_minutes_all": round(minutes, 2),
    }


# --- generation ------------------------------------------------------------------------------------


def random_adapters(cfg: Config, out: Path) -> Path:
    """Adapters with an effect (B != 0), saved, so eval's loading path reads them like real ones."""
    torch.manual_seed(0)
    base = modeling.load_model(cfg.model, cfg.quantization, training=False)
    model = modeling.attach_new_adapters(
        base,
        cfg.lora,
        cfg.quantization,
        dequantize=modeling.dequantize_as_configured(base, cfg.quantization),
        gradient_checkpointing=False,
        half_precision=False,
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.save_pretrained(out)
    return out


def time_batched(summarizer: Summarizer, prompts: list[list[int]]) -> tuple[dict, float]:
    """`eval`'s generation of every prompt: ({index: Decoded}, seconds), after a small warm-up."""
    batches = summarizer.batches(prompts)
    out: dict[int, generation.Decoded] = {}

    def run(chosen):
        summarizer.generate(prompts, chosen, lambda idx, decoded: out.update(zip(idx, decoded)), progress=False)

    run([batches[-1][:2]])  # warm-up: loading, kernels, workspaces, graph machinery
    runtime.synchronize()
    started = time.perf_counter()
    run(batches)
    runtime.synchronize()
    seconds = time.perf_counter() - started
    summarizer.model = None
    runtime.release_memory()
    return out, seconds


@dataclass(frozen=True)
class LoopTask:
    """The tutorial's per-example loop and our decoder at batch 1, on the loop's model: the 4-bit
    base with the adapters attached, unmerged (`config.TUTORIAL_RECIPE`). Picklable, for workers."""

    cfg: Config
    adapters: Path
    decoding: generation.Decoding

    def load(self):
        tutorial = with_overrides(self.cfg, TUTORIAL_RECIPE)
        return modeling.load_generation_model(tutorial.model, tutorial.quantization, self.adapters, merge=False)

    def loop(self, model, prompt: list[int]) -> list[int]:
        return generation.generate_one(model, prompt, self.decoding).ids

    def ours(self, model, prompt: list[int]) -> list[int]:
        return generation.decode_batch(model, [prompt], self.decoding)[0].ids


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
    runtime.synchronize()
    started = time.perf_counter()
    loop = {i: task.loop(model, prompts[i]) for i in timed}
    runtime.synchronize()
    seconds = time.perf_counter() - started
    ours = {i: task.ours(model, prompts[i]) for i in timed}
    del model
    runtime.release_memory()
    rest = {i: prompts[i] for i in sample if i not in loop}
    for i, (theirs, mine) in (in_processes(task, rest, workers) if rest else {}).items():
        loop[i], ours[i] = theirs, mine
    return loop, ours, timed, seconds


def time_generation(
    cfg: Config,
    model_dir: Path,
    adapters: Path | None,
    rows: list[dict],
    workdir: Path,
    *,
    loop_sample: int,
    loop_workers: int,
) -> dict:
    """`eval`'s batched generation of every prompt at eval.max_new_tokens with real stopping,
    against the tutorial's per-example loop on the split's first `loop_sample` prompts, shared by
    `loop_workers` processes; then beam search on every prompt (`beams`)."""
    beams = beam_decoding(cfg)
    cfg = with_overrides(cfg, {"model": {"name": str(model_dir)}, "eval": greedy_decoding(cfg)})
    adapters = adapters or random_adapters(cfg, workdir / "adapters")
    summarizer = Summarizer(cfg, adapters)
    fmt, prompts = summarizer.fmt, summarizer.prompts([r["dialogue"] for r in rows])
    fast, fast_s = time_batched(summarizer, prompts)
    sample = list(range(min(loop_sample, len(prompts))))
    task = LoopTask(cfg, adapters, summarizer.decoding)
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
    figures["beams"] = time_beams(with_overrides(cfg, {"eval": beams}), adapters, prompts, fast, fast_s, rows)
    return figures


def beam_decoding(cfg: Config) -> dict:
    """The beam search `bench --eval` times beside greedy: eval's num_beams and length_penalty when it
    searches with beams, else 4 beams (the shipped SmolLM2 recipe's); no sampling or repetition controls."""
    greedy = {key: value for key, value in EvalArgs().decoding().items() if key != "seed"}
    e = cfg.eval
    searched = {"num_beams": e.num_beams, "length_penalty": e.length_penalty} if e.num_beams > 1 else {"num_beams": 4}
    return greedy | searched


def time_beams(cfg: Config, adapters: Path, prompts: list[list[int]], greedy: dict, greedy_s: float, rows) -> dict:
    """Beam search on every prompt, as `eval` runs it, against greedy's time; with real weights the
    ROUGE of both on every row."""
    summarizer = Summarizer(cfg, adapters)
    beamed, seconds = time_batched(summarizer, prompts)
    figures = {
        "num_beams": cfg.eval.num_beams,
        "length_penalty": cfg.eval.length_penalty,
        "seconds": round(seconds, 2),
        "new_tokens": sum(len(d.ids) + d.ended for d in beamed.values()),
        "ended_share": round(sum(d.ended for d in beamed.values()) / len(beamed), 4),
        "vs_greedy": round(seconds / greedy_s, 2),
    }
    if weights_label(Path(cfg.model.name)) != "random":
        refs = [chat.clean(r["summary"]) for r in rows]
        order = range(len(prompts))
        figures["rouge"] = {
            path: rouge([summarizer.fmt.decode(found[i].ids) for i in order], refs)
            for path, found in (("greedy", greedy), ("beams", beamed))
        }
    return figures


def greedy_decoding(cfg: Config) -> dict:
    """eval's decoding settings set back to greedy: the tutorial's loop is greedy, and so is the path
    it is compared with (said when the config asked for another decoding)."""
    greedy = {key: value for key, value in EvalArgs().decoding().items() if key != "seed"}
    if any(cfg.eval.decoding()[key] != value for key, value in greedy.items()):
        print("note: bench --eval times greedy decoding, as the tutorial's loop it is compared with decodes")
    return greedy


def compare_rouge(texts: dict[str, list[str]], refs: list[str]) -> dict:
    """ROUGE of the batched path and of the loop on the same rows, and batched - loop per row with
    its bootstrap interval: a difference inside the interval is the rows' spread, not the path."""
    scores = {path: rouge_per_example(t, refs) for path, t in texts.items()}
    out: dict = {path: means(per_example) for path, per_example in scores.items()}
    out["difference"] = {k: paired_difference(scores["batched"][k], scores["loop"][k]) for k, _ in SHOWN}
    return out


# --- the command -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPlan:
    """What `bench` is asked to time, from its command line."""

    split: str
    steps: int = 20
    warmup: int | None = None  # None: one pass over the split's batches (the tutorial's recipe: 3)
    compare_tutorial: bool = False
    with_eval: bool = False
    loop_sample: int = 16
    loop_workers: int = 1
    epoch_tokens: int | None = None
    json_path: Path | None = None
    model_dir: Path | None = None
    adapters: Path | None = None


def benchmark(cfg: Config, plan: BenchPlan) -> dict:
    if plan.json_path is not None:
        files.ensure_writable_dir(plan.json_path.parent)
    if plan.adapters is not None and not plan.adapters.is_dir():
        raise UserError(f"--adapters {plan.adapters} is not a folder")
    # A random model's tiny gradients reach float32 denormals, which CPUs process ~100x slower
    # (GPUs do not); flushing them to zero keeps CPU timings about the model, not the FPU.
    torch.set_flush_denormal(True)

    # --- the data: the rows eval scores, tokenised as train does ---
    rows = data.scorable(data.load_rows(cfg.data.source, plan.split, cfg.data.revision)).rows
    columns, stats = modeling.chat_format(cfg).encode_rows(rows)
    device = runtime.device_name()
    print(f"bench on {device}: {stats.kept} rows of {cfg.data.source} ({plan.split}), {stats.tokens:,} tokens")
    epoch_tokens = plan.epoch_tokens or stats.tokens
    result: dict = {"device": device, "model": cfg.model.name, "split": plan.split, "rows": stats.kept}
    result |= {"epoch_tokens": epoch_tokens, "steps": plan.steps, "warmup": plan.warmup}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # --- the weights ---
        model_dir = random_model_dir(cfg, plan.model_dir or workdir / "random-model")
        result["weights"] = weights_label(model_dir)

        # --- generation, then training: liger-kernel patches transformers for the whole process once
        # a model trains with it, and neither eval's generation nor the tutorial's recipe runs with it ---
        if plan.with_eval:
            result["eval"] = time_generation(
                cfg,
                model_dir,
                plan.adapters,
                rows,
                workdir,
                loop_sample=plan.loop_sample,
                loop_workers=plan.loop_workers,
            )

        def timed(config, warmup=plan.warmup):
            return time_training(
                config,
                model_dir,
                columns,
                steps=plan.steps,
                warmup=warmup,
                epoch_tokens=epoch_tokens,
                workdir=workdir,
            )

        tutorial = timed(with_overrides(cfg, TUTORIAL_RECIPE), plan.warmup or 3) if plan.compare_tutorial else None
        result.update(timed(cfg))
        if tutorial is not None:
            result["tutorial"], result["ratio"] = tutorial, round(result["tokens_per_s"] / tutorial["tokens_per_s"], 2)
    print(render(result))
    if plan.json_path is not None:
        files.write_json(plan.json_path, result)
        print(f"wrote {plan.json_path}")
    return result


def render(r: dict) -> str:
    """The figures as a person reads them: a table, the speed-up, the generation lines."""

    def line(name, f):
        mem = f"{f['peak_memory_gib']:.2f} GiB" if f["peak_memory_gib"] is not None else "n/a"
        mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "n/a"
        return (
            f"| {name} | {f['tokens_per_s']:,.0f} | {100 * f['padding_fraction']:.1f}% | {mem} | {mfu} "
            f"| {f['epoch_minutes']:.1f} min | {f['epoch_minutes_all']:.1f} min ({f['warmup_seconds']:.1f} s) |"
        )

    passes = " (one pass over the split's batches: every batch shape met first)" if r.get("warmup_is_one_pass") else ""
    out = [
        f"device: {r['device']}; {r['model']}'s shape, weights: {r['weights']}; "
        f"{r['steps']} step{'' if r['steps'] == 1 else 's'} timed after {r['warmup']} warm-up "
        f"step{'' if r['warmup'] == 1 else 's'}{passes}"
        + (f"; the tutorial's recipe after {r['tutorial']['warmup']}" if "tutorial" in r else ""),
        "| recipe | real tokens/s | padding | peak memory | MFU | epoch at this pace | epoch from the first step "
        "(the warm-up's own time) |",
        "|---|---|---|---|---|---|---|",
        line("this config", r),
    ]
    if "tutorial" in r:
        out += [line("tutorial recipe", r["tutorial"]), f"speed-up over the tutorial's recipe: {r['ratio']:.1f}x"]
    if r.get("timed_new_shapes"):
        out.append(
            f"{r['timed_new_shapes']} of this config's {r['steps']} timed steps met a batch shape for the first time; "
            "on a machine's first run each compiles kernels, so the pace above is below the steady one "
            "(more --warmup steps time it)"
        )
    if r.get("cuda_graphs") is not None:
        out.append(f"this config's steps ran as CUDA graphs: {r['cuda_graphs']} batch shapes captured")
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
    if "beams" in e:
        lines += beam_lines(e["beams"], e)
    if "rouge_sample" in e:
        shown = [k for k, _ in SHOWN]
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


def beam_lines(b: dict, greedy: dict) -> list[str]:
    lines = [
        f"beam search, {b['num_beams']} beams (length_penalty {b['length_penalty']}), the same {greedy['examples']} "
        f"prompts: {b['seconds']:.2f} s ({b['new_tokens']:,} tokens; {100 * b['ended_share']:.0f}% ended), "
        f"{b['vs_greedy']:.2f}x greedy's {greedy['batched_seconds']:.2f} s"
    ]
    for path, scores in b.get("rouge", {}).items():
        shown = " / ".join(f"{100 * scores[k]:.2f}" for k, _ in SHOWN)
        lines.append(f"ROUGE-1/2/L of all {greedy['examples']}, {path}: {shown}")
    return lines
