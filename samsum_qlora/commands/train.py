"""`samsum-qlora train`: the tutorial's recipe, top to bottom.

where to start -> seed -> data -> tokenizer and 4-bit model -> LoRA -> Trainer -> train (resuming
if a checkpoint exists) -> save adapters, config and metrics, whole or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path

from samsum_qlora import (
    chat,
    checkpoints,
    choices,
    data,
    files,
    hf_compat,
    layout,
    modeling,
    run_chart,
    runtime,
    tracking,
    training,
    validation,
)
from samsum_qlora.config import Config, dump_config
from samsum_qlora.errors import UserError
from samsum_qlora.layout import RunDir


def train_adapters(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    """Train LoRA adapters as `cfg` says; returns the training metrics. Under torchrun every
    process runs this; only rank 0 holds the output folder, talks and writes."""
    rt = runtime.current()
    run = RunDir(Path(cfg.train.output_dir))
    with files.hold(run.lock, "train") if rt.is_main else contextlib.nullcontext():
        return _train(cfg, run, rt, overwrite=overwrite, resume=resume)


def _train(cfg: Config, run: RunDir, rt: runtime.Runtime, *, overwrite: bool, resume: str | None) -> dict:
    from transformers import set_seed

    # --- where to start: step 0, or the checkpoint an interrupted run left ---
    config_tree = cfg.to_dict()
    resume_from = start_point(cfg, config_tree, run, rt, overwrite=overwrite, resume=resume)

    # --- seed ---
    set_seed(cfg.train.seed)

    # --- data: rows -> chat template -> tokens and labels ---
    fmt = modeling.chat_format(cfg)
    rows, validation_rows = validation.split_rows(cfg)
    columns, stats = encode_training_rows(cfg, fmt, rt, rows)
    train_args = per_process_args(cfg, run, rt)
    validator = validation_set(cfg, validation_rows, train_args, rt)

    # --- model: the 4-bit base, then fresh LoRA adapters ---
    model, train_args, chosen = modeling.training_model(cfg, fmt.tokenizer, train_args)
    trainable, total = model.get_nb_trainable_parameters()
    rt.say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    # --- trainer: checkpoints marked complete, stops on SIGTERM and Ctrl-C ---
    stop = training.StopOnSignal()
    trainer = make_trainer(
        train_args, model, columns, pad_id=fmt.pad_id, run=run, config_tree=config_tree, stop=stop, validator=validator
    )

    # --- train (validating as train.eval_strategy says) ---
    started = time.perf_counter()
    finish = functools.partial(
        save_run,
        cfg,
        run,
        trainer,
        fmt.tokenizer,
        started=started,
        stats=stats,
        resume_from=resume_from,
        trainable=trainable,
        args=train_args,
        chosen=chosen,
    )
    try:
        result = fit(trainer, stop, run, resume_from, rt)
    except training.Stopped:
        publish_best_so_far(trainer, finish, rt)
        raise
    check_finite(model, trainer.args.learning_rate)

    # --- save: the adapters and what a later reader needs, whole or not at all ---
    metrics = finish(result)
    runtime.barrier()  # every process returns once the adapters are in place
    return metrics


def save_run(cfg: Config, run: RunDir, trainer, tokenizer, result, *, started: float, **counts) -> dict:
    """train_metrics.json, the adapters the model holds now and the run's chart (main process);
    `counts`: train_metrics' keywords."""
    metrics = train_metrics(trainer, result, time.perf_counter() - started, **counts)
    if runtime.current().is_main:
        with files.disk_full_is_user_error(run.root, "saving the adapters"):
            publish(cfg, run, trainer.model, tokenizer, metrics)
            run_chart.write(run.chart, trainer.state.log_history, metrics.get("best_step"))
        step = metrics["adapters_step"]
        print(f"saved adapters to {run.adapters} (step {step}); train loss {metrics['train_loss']:.4f}")
    return metrics


def publish_best_so_far(trainer, finish, rt: runtime.Runtime) -> None:
    """A run stopped by a signal after an evaluation still publishes the best evaluated adapters
    (its checkpoint stays for the rerun, which resumes from the newest one)."""
    if not (trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint):
        return
    if rt.is_main:
        hf_compat.load_best_model(trainer)  # the Trainer's own end-of-run load, from the best checkpoint
        finish(None)


def start_point(
    cfg: Config, config_tree: dict, run: RunDir, rt: runtime.Runtime, *, overwrite: bool, resume: str | None
):
    """The checkpoint to resume from (None: step 0), after the checks that need no model."""
    from transformers.utils import is_torch_bf16_available_on_device

    training.check_precision(cfg.train, runtime.has_cuda(), is_torch_bf16_available_on_device("cpu"))
    # refuses train.cuda_graphs=true where graphs cannot run, before the data and the model load
    choices.should_capture(cfg.train, cfg.lora.lora_dropout, cuda=runtime.has_cuda(), processes=rt.world_size)
    resume_from = checkpoints.start_point(run, config_tree, overwrite=overwrite, resume=resume, warn=rt.say)
    if resume_from is None and rt.is_main:
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # an earlier run's: they must not mix with ours
    modeling.check_lora_targets(cfg.model, cfg.lora)
    return resume_from


def fit(trainer, stop, run: RunDir, resume_from, rt: runtime.Runtime):
    """trainer.train(), resuming where asked; a signal ends it with a checkpoint and `Stopped`."""
    if resume_from is not None and checkpoints.finished_training(resume_from):
        # trained to the end, cut off before publishing: the Trainer would train a step past the end
        stop.restore()
        rt.say(f"{resume_from} is the run's last step: publishing it as it is")
        return training.take_finished(trainer, resume_from)
    if resume_from is not None:
        rt.say(f"resuming from {resume_from} (step {layout.checkpoint_step(resume_from)})")
    try:
        with files.disk_full_is_user_error(run.root, "saving a checkpoint"):
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stop.restore()
    if stop.received is not None:
        raise training.Stopped(
            f"stopped by {stop.received.name} at step {trainer.state.global_step}; rerun the same command to resume",
            training.EXIT_CODES[stop.received],
        )
    return result


def encode_training_rows(cfg: Config, fmt: chat.ChatFormat, rt: runtime.Runtime, rows: list[data.Row]):
    columns, stats = fmt.encode_rows(rows[: cfg.data.max_train_samples], progress=rt.is_main)
    rt.say("data: " + stats.describe(cfg.data.source, cfg.data.max_length))
    if stats.kept == 0:
        raise UserError(f"no usable training rows in {cfg.data.source} ({cfg.data.train_split})")
    return columns, stats


def per_process_args(cfg: Config, run: RunDir, rt: runtime.Runtime):
    """TrainArgs for this process: its share of the global batch (config.yaml keeps the global
    one), and W&B as `train.report_to` asks (offline without a key, one W&B run per folder)."""
    tokens, accumulation, note = training.per_process_batch(cfg.train, rt.world_size)
    if note:
        rt.say(note)
    report_to = tracking.prepare_wandb(cfg.train.report_to, run.root, is_main=rt.is_main)
    return dataclasses.replace(
        cfg.train, max_tokens_per_batch=tokens, gradient_accumulation_steps=accumulation, report_to=report_to
    )


def validation_set(cfg: Config, rows: list[data.Row] | None, train_args, rt: runtime.Runtime):
    """The `Validator` of train.eval_strategy=steps (None without), saying what it scores."""
    if rows is None:
        return None
    validator = validation.Validator(cfg, rows, train_args)
    t = cfg.train
    where = t.validation_split or f"rows held out of {cfg.data.train_split}"
    rt.say(
        f"validation: {len(validator.rows)} dialogues ({where}) every {t.eval_steps or t.save_steps} steps and at "
        f"the last; the best by {t.metric_for_best_model}"
    )
    return validator


def make_trainer(train_args, model, columns: dict, *, pad_id: int, run: RunDir, config_tree: dict, stop, validator):
    callbacks = [stop, training.ManifestCallback(config_tree)]  # the manifest's after every callback asking to save
    if "wandb" in train_args.report_to:
        callbacks.append(training.ConfigToWandb(config_tree))
    return training.build_trainer(
        train_args,
        model,
        training.training_set(train_args, columns),
        training.collator(train_args, pad_id),
        run.checkpoints,
        callbacks,
        count_tokens=True,
        validation=validator,
    )


def check_finite(model, learning_rate: float) -> None:
    import torch

    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise UserError(
            f"training diverged: {len(bad)} adapter weights are not finite; lower "
            f"train.learning_rate (now {learning_rate:g}); nothing was published"
        )


def train_metrics(trainer, result, seconds: float, stats, *, resume_from, trainable: int, args, chosen) -> dict:
    """What train_metrics.json holds; `result` None: the run was stopped (by a signal) before its end."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    whole_run = training.run_loss(trainer.state.log_history)
    seen = trainer.state.num_input_tokens_seen
    counts = {"rows": stats.kept} | {k: v for k, v in dataclasses.asdict(stats).items() if k != "kept"}
    return {
        # the whole run's mean loss; the Trainer's own counts only the steps since a resume
        "train_loss": whole_run if whole_run is not None or result is None else result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "global_step": trainer.state.global_step,
        **validation_record(trainer, stopped=result is None),
        "train_seconds": round(seconds, 2),
        "trainable_parameters": trainable,
        **counts,
        "resumed_from": str(resume_from) if resume_from else None,
        # Real (non-padding) tokens trained by all processes, per second of this command's training
        # (not after a resume, which counts earlier ones too): what a throughput comparison needs.
        "tokens_seen": seen,
        "tokens_per_second": None if resume_from else round(seen / seconds, 1),
        "processes": runtime.current().world_size,
        "per_process_batch": {
            "max_tokens_per_batch": args.max_tokens_per_batch,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        },
        # what the config's "auto" settings chose on this machine, and why (choices.decide)
        "chosen": {
            **chosen.record(),
            "cuda_graphs_captured": len(trainer.graphs.graphs) if trainer.graphs is not None else 0,
        },
    }


def validation_record(trainer, *, stopped: bool) -> dict:
    """The run's evaluations, its best step, and the step whose adapters are published."""
    state, args = trainer.state, trainer.args
    best = state.best_global_step if args.eval_strategy == "steps" else None
    loaded = bool(best and args.load_best_model_at_end and state.best_model_checkpoint)
    return {
        "validation": validation.history(state.log_history),
        "best_step": best,
        "metric_for_best_model": args.metric_for_best_model if best else None,
        "adapters_step": best if loaded else state.global_step,
        "stopped_early": stopped or state.global_step < state.max_steps,
    }


def publish(cfg: Config, run: RunDir, model, tokenizer, metrics: dict) -> None:
    """The adapters, then config.yaml, run.json and train_metrics.json beside them: all written
    first, then renamed into place, so a failed write leaves the previous run's files as they were."""
    beside = {
        run.config: dump_config(cfg),
        run.run_info: json.dumps(run_info(model), indent=2) + "\n",
        run.train_metrics: json.dumps(metrics, indent=2) + "\n",
    }
    pending = {path: path.with_name(f".{path.name}.pending") for path in beside}
    try:
        for path, text in beside.items():
            files.write_text(pending[path], text)
        with files.staged_dir(run.adapters) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        for path, temporary in pending.items():
            os.replace(temporary, path)
    finally:
        for temporary in pending.values():
            temporary.unlink(missing_ok=True)


def run_info(model) -> dict:
    """What a later eval or a person needs to trust these adapters: base shape, library versions."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    from samsum_qlora import __version__

    return {
        "model_shape": modeling.model_shape(model.get_base_model().config),
        "versions": {
            "samsum_qlora": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "cuda_device": runtime.device_name(),
    }
