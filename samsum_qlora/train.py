"""`samsum-qlora train`: the tutorial's recipe, top to bottom.

seed -> data -> tokenizer and 4-bit model -> LoRA -> Trainer -> train (resuming if a checkpoint
exists) -> save adapters, config and metrics atomically.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

from samsum_qlora import checkpoints, files, tracking
from samsum_qlora.config import Config, TrainArgs, dump_config
from samsum_qlora.errors import UserError

CHECKPOINTS = "checkpoints"
ADAPTERS = "lora_adapters"


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved. The CLI exits non-zero so a managed job restarts."""


def _callbacks(config_tree: dict):
    from transformers import TrainerCallback

    class ManifestCallback(TrainerCallback):
        """Marks each checkpoint complete once the Trainer has written all of it."""

        def on_save(self, args, state, control, **kwargs):
            if args.world_size > 1:  # under torchrun every process writes its RNG state into the checkpoint
                from accelerate import PartialState

                PartialState().wait_for_everyone()
            if args.should_save:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    checkpoints.write_manifest(ckpt, config_tree)

    class SigtermCallback(TrainerCallback):
        """Clouds send SIGTERM before taking a spot machine: finish the step, save, stop."""

        def __init__(self):
            self.received = False
            signal.signal(signal.SIGTERM, self._handle)

        def _handle(self, signum, frame):
            print("SIGTERM received: saving a checkpoint after this step", flush=True)
            self.received = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.received:
                control.should_save = True
                control.should_training_stop = True

    return ManifestCallback(), SigtermCallback()


def _config_to_wandb(config_tree: dict):
    from transformers import TrainerCallback

    class ConfigToWandb(TrainerCallback):
        """The HF W&B callback logs TrainingArguments; this adds our whole resolved config (which
        never holds a secret: keys stay in the environment)."""

        def on_train_begin(self, args, state, control, **kwargs):
            import wandb

            if state.is_world_process_zero and wandb.run is not None:
                wandb.config.update({"samsum_qlora": config_tree}, allow_val_change=True)

    return ConfigToWandb()


def trained_token_loss(hidden, labels, head, num_items_in_batch=None):
    """Causal-LM cross-entropy computed only where a label is trained.

    Equals the model's own loss (shift by one, ignore -100, sum / number of trained tokens), but
    projects only those positions to the vocabulary: ~12% of SAMSum tokens, so the 128K-wide
    logits of the prompt are never built."""
    import torch.nn.functional as F

    from samsum_qlora.data import IGNORE_INDEX

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep]).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum())


def _trainer_class(trained_logits_only: bool):
    from transformers import Trainer

    if not trained_logits_only:
        return Trainer

    class TrainedLogitsTrainer(Trainer):
        """compute_loss is the one hook that can keep the model from building all the logits:
        the forward asks for one position's logits, and a hook on the final norm hands us the
        hidden states to project where the labels are trained."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            base = self.accelerator.unwrap_model(model).get_base_model()
            captured = {}
            hook = base.model.norm.register_forward_hook(lambda mod, args, out: captured.update(hidden=out))
            try:
                outputs = model(**inputs, use_cache=False, logits_to_keep=1)
            finally:
                hook.remove()
            loss = trained_token_loss(captured["hidden"], labels, base.get_output_embeddings(), num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
            return (loss, outputs) if return_outputs else loss

    return TrainedLogitsTrainer


def training_arguments(cfg: Config, output_dir: Path, cuda: bool, count_tokens: bool = False):
    """transformers.TrainingArguments from our TrainArgs (same field names). `count_tokens` makes
    the Trainer count the real tokens it trains (state.num_input_tokens_seen), at one sync a step."""
    from transformers import TrainingArguments

    t = cfg.train
    args = TrainingArguments(
        output_dir=str(output_dir),
        # token-budget batches arrive pre-formed, one dataset item each
        per_device_train_batch_size=1 if t.max_tokens_per_batch else t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        fp16=t.fp16,
        optim=t.optim,
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if t.gradient_checkpointing else {}),
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to,
        run_name=t.run_name,
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not cuda,
        include_num_input_tokens_seen="non_padding" if count_tokens else "no",
        # under torchrun every LoRA weight gets a gradient each step: DDP need not search the graph
        ddp_find_unused_parameters=False,
    )
    if args.n_gpu > 1:  # one process seeing several GPUs: the Trainer would wrap the model in nn.DataParallel
        print(f"note: {args.n_gpu} GPUs visible to one process; training on one. "
              f"torchrun --nproc_per_node {args.n_gpu} uses them all")
        args._n_gpu = 1
    return args


def per_process_batch(t: TrainArgs, processes: int) -> tuple[int | None, int, str]:
    """(max_tokens_per_batch, gradient_accumulation_steps, note) for each of `processes` processes,
    so that an optimizer step trains the global batch the config describes, whatever the GPU count.

    The config describes one GPU: a step is `max_tokens_per_batch` tokens (or
    `per_device_train_batch_size` rows) x `gradient_accumulation_steps`. Under torchrun each of N
    processes takes 1/N of it: the token budget is divided by N (rounded down); with fixed rows the
    accumulation steps are, and must divide by N. The note says what was done (empty for one process)."""
    n = processes
    if n <= 1:
        return t.max_tokens_per_batch, t.gradient_accumulation_steps, ""
    accumulation = t.gradient_accumulation_steps
    steps = f" x {accumulation} accumulation steps" if accumulation > 1 else ""
    if t.max_tokens_per_batch:
        budget = t.max_tokens_per_batch
        tokens = budget // n
        if tokens < 16:
            raise UserError(f"train.max_tokens_per_batch={budget} split over {n} processes leaves {tokens} tokens "
                            f"each; set it to at least {16 * n} or launch fewer processes")
        kept = f"{budget:,}" if tokens * n == budget else f"{budget:,} (rounded down to {tokens * n:,})"
        note = f"{n} processes: {tokens:,} tokens per device per step{steps} keeps the global {kept}"
        return tokens, accumulation, note
    rows = t.per_device_train_batch_size
    if accumulation % n:
        total = rows * accumulation
        fits = [str(d) for d in range(1, accumulation + 1) if accumulation % d == 0]
        counts = ", ".join(fits[:-1]) + f" or {fits[-1]} processes" if len(fits) > 1 else "one process"
        fix = next((f"--set train.per_device_train_batch_size={total // a} --set train.gradient_accumulation_steps={a}"
                    for a in range(n, total + 1, n) if total % a == 0), None)
        raise UserError(
            f"the global batch of {rows} rows x {accumulation} accumulation steps does not split over {n} processes: "
            + (f"keep its {total} rows per step with {fix}, " if fix else "")
            + f"launch {counts}, or use token budgets (train.max_tokens_per_batch)")
    return None, accumulation // n, (f"{n} processes: {rows} rows x {accumulation // n} accumulation steps per device "
                                     f"keeps the global {rows * accumulation} rows per step")


def run(cfg: Config, *, overwrite: bool = False, resume: str | None = None) -> dict:
    import torch
    from transformers import set_seed

    from samsum_qlora import data, model as modeling

    # Under torchrun or `accelerate launch` every process runs this function; only rank 0 talks
    # and writes (the Trainer itself also adds each process's RNG state to its checkpoints).
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    main = os.environ.get("RANK", "0") == "0"
    say = print if main else (lambda *args, **kwargs: None)
    # One process per GPU: each takes 1/N of the global batch (config.yaml keeps the global one).
    tokens, accumulation, note = per_process_batch(cfg.train, processes)
    out = Path(cfg.train.output_dir)
    final = out / ADAPTERS
    if final.exists() and not overwrite:
        raise UserError(f"{final} already holds a finished run; pass --overwrite or set another train.output_dir")
    cuda = torch.cuda.is_available()
    from transformers.utils import is_torch_bf16_available_on_device

    modeling.check_device_settings(cfg, cuda, cpu_bf16=is_torch_bf16_available_on_device("cpu"))
    config_tree = cfg.to_dict()

    # Resume point: --resume PATH, else the newest complete checkpoint in this output dir.
    ckpt_dir = out / CHECKPOINTS
    if resume:
        resume_from = Path(resume)
        if not resume_from.is_dir():
            raise UserError(f"--resume {resume} is not a checkpoint directory")
    else:
        resume_from = None if overwrite else checkpoints.newest_complete(ckpt_dir, warn=say)
    if resume_from is not None:
        checkpoints.check_resumable(resume_from, config_tree)
    files.ensure_writable_dir(out)

    # --- seed ---
    set_seed(cfg.train.seed)

    # --- data ---
    tokenizer = modeling.load_tokenizer(cfg.model.name, cfg.model.revision)
    examples = data.rows(data.load_split(cfg.data.source, cfg.data.train_split, cfg.data.revision))
    if cfg.data.max_train_samples:
        examples = examples[: cfg.data.max_train_samples]
    columns, stats = data.encode_rows(
        tokenizer, examples, instruction=cfg.data.task_instruction,
        max_length=cfg.data.max_length, date_string=cfg.data.date_string, progress=main,
    )
    say(
        f"data: {stats.kept} training rows from {cfg.data.source} ({stats.trained_tokens:,} trained of "
        f"{stats.tokens:,} tokens); skipped {stats.skipped_empty} with an empty dialogue or summary, "
        f"dropped {stats.dropped_too_long} whose summary cannot fit {cfg.data.max_length} tokens, "
        f"shortened {stats.truncated} dialogues"
    )
    if stats.kept == 0:
        raise UserError(f"no usable training rows in {cfg.data.source} ({cfg.data.train_split})")
    # W&B, if asked for: offline without a key, one run id per output dir (a report_to for the Trainer)
    report_to = tracking.prepare_wandb(cfg.train.report_to, out)
    per_process = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, max_tokens_per_batch=tokens, gradient_accumulation_steps=accumulation, report_to=report_to))
    if note:
        say(note)
    train_set = training_set(per_process, columns)

    # --- model: 4-bit base + LoRA ---
    model = modeling.load_model(cfg, training=True)
    model = modeling.attach_new_adapters(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    # --- trainer ---
    manifest_cb, sigterm_cb = _callbacks(config_tree)
    trainer = build_trainer(per_process, model, tokenizer, train_set, ckpt_dir, [manifest_cb, sigterm_cb],
                            count_tokens=True)
    if "wandb" in report_to:
        trainer.add_callback(_config_to_wandb(config_tree))

    # --- train ---
    if resume_from is not None:
        say(f"resuming from {resume_from} (step {resume_from.name.split('-')[-1]})")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    if sigterm_cb.received:
        raise Preempted(f"stopped by SIGTERM at step {trainer.state.global_step}; rerun the same command to resume")

    # --- save: stage everything, then rename into place ---
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "global_step": result.global_step,
        "train_seconds": round(seconds, 2),
        "trainable_parameters": trainable,
        "rows": stats.kept, "skipped_empty": stats.skipped_empty,
        "dropped_too_long": stats.dropped_too_long, "truncated": stats.truncated,
        "tokens": stats.tokens, "trained_tokens": stats.trained_tokens,
        "resumed_from": str(resume_from) if resume_from else None,
        # What a throughput comparison needs: real (non-padding) tokens trained by all processes,
        # per second of this command's training (not after a resume, which counts earlier ones too).
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": None if resume_from else round(trainer.state.num_input_tokens_seen / seconds, 1),
        "processes": processes,
        "per_process_batch": {"max_tokens_per_batch": tokens, "gradient_accumulation_steps": accumulation},
    }
    if trainer.is_world_process_zero():
        staging = out / f".{ADAPTERS}.staging"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files.write_text(out / "config.yaml", dump_config(cfg))
        files.write_json(out / "run.json", run_info(model))
        files.write_json(out / "train_metrics.json", metrics)
        files.publish_dir(staging, final)
        print(f"saved adapters to {final}; train loss {result.training_loss:.4f}")
    trainer.accelerator.wait_for_everyone()  # every process returns once the adapters are in place
    return metrics


def training_set(cfg: Config, columns: dict):
    """Rows, or token-budget batches of rows of similar length (the fast path)."""
    from datasets import Dataset

    from samsum_qlora import data

    rows = {"input_ids": columns["input_ids"], "labels": columns["labels"]}
    if cfg.train.max_tokens_per_batch:
        lengths = [len(ids) for ids in rows["input_ids"]]
        batches = data.token_budget_batches(lengths, cfg.train.max_tokens_per_batch, cfg.train.seed,
                                            multiple=cfg.train.pad_to_multiple_of)
        rows = data.group_rows(rows, batches)
    return Dataset.from_dict(rows)


def build_trainer(cfg: Config, model, tokenizer, train_set, output_dir: Path, callbacks=(), collator=None,
                  count_tokens: bool = False):
    """The HF Trainer exactly as `train` uses it (also timed by `bench`, which counts tokens itself)."""
    import torch

    from samsum_qlora import data

    return _trainer_class(cfg.train.trained_logits_only)(
        model=model,
        args=training_arguments(cfg, output_dir, torch.cuda.is_available(), count_tokens),
        train_dataset=train_set,
        data_collator=collator or data.PadToLongest(data.pad_token_id(tokenizer), cfg.train.pad_to_multiple_of),
        callbacks=list(callbacks),
    )


def run_info(model) -> dict:
    """What a later eval or a person needs to trust these adapters: base shape, library versions."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    from samsum_qlora import __version__, model as modeling

    return {
        "model_shape": modeling.model_shape(model.get_base_model().config),
        "versions": {
            "samsum_qlora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
        },
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
