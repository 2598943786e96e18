"""The Hugging Face Trainer as `train` and `bench` use it.

TrainingArguments from our TrainArgs, the collator, the token-budget training set, a Trainer that
computes the loss only where labels are trained and stops at the first non-finite loss, and the
callbacks that make a run safe to interrupt: checkpoint manifests, SIGTERM/SIGINT, readable logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from samsum_qlora import batching, checkpoints, hf_compat, layout, modeling, runtime, step_graphs
from samsum_qlora.batching import pad
from samsum_qlora.chat import IGNORE_INDEX
from samsum_qlora.config import TrainArgs
from samsum_qlora.errors import UserError

OUR_FIELDS = {
    "max_tokens_per_batch",
    "trained_logits_only",
    "pad_to_multiple_of",
    "output_dir",
    "per_device_train_batch_size",
    "gradient_checkpointing",
    "bucket_shapes",
    "cuda_graphs",
    # validation: passed as `evaluation_arguments` decides
    "eval_strategy",
    "eval_steps",
    "metric_for_best_model",
    "load_best_model_at_end",
}
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal, what job schedulers expect


class Stopped(Exception):
    """SIGTERM or Ctrl-C arrived and a checkpoint was saved; the CLI exits with `code`."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# --- settings ------------------------------------------------------------------------------------


def check_precision(t: TrainArgs, cuda: bool, cpu_bf16: bool) -> None:
    """Mixed precision that needs a GPU, refused early with the --set that fixes it."""
    if cuda:
        return
    if t.fp16:
        raise UserError("train.fp16 needs a CUDA GPU and none was found; use --set train.fp16=false")
    if t.bf16 and not cpu_bf16:
        raise UserError("train.bf16 is not supported by this CPU and no CUDA GPU was found; use --set train.bf16=false")


def per_process_batch(t: TrainArgs, processes: int) -> tuple[int | None, int, str]:
    """(max_tokens_per_batch, gradient_accumulation_steps, note) for each of `processes`, so that
    an optimizer step trains the global batch the config describes, whatever the GPU count.

    The config describes one GPU. Under torchrun each of N processes takes 1/N of it: the token
    budget is divided by N (rounded down); with fixed rows the accumulation steps are, and must
    divide by N. The note says what was done (empty for one process)."""
    n, accumulation = processes, t.gradient_accumulation_steps
    if n <= 1:
        return t.max_tokens_per_batch, accumulation, ""
    steps = f" x {accumulation} accumulation steps" if accumulation > 1 else ""
    if t.max_tokens_per_batch:
        budget = t.max_tokens_per_batch
        tokens = budget // n
        if tokens < 16:
            raise UserError(
                f"train.max_tokens_per_batch={budget} split over {n} processes leaves {tokens} "
                f"tokens each; set it to at least {16 * n} or launch fewer processes"
            )
        kept = f"{budget:,}" if tokens * n == budget else f"{budget:,} (rounded down to {tokens * n:,})"
        return (
            tokens,
            accumulation,
            f"{n} processes: {tokens:,} tokens per device per step{steps} keeps the global {kept}",
        )
    rows = t.per_device_train_batch_size
    if accumulation % n:
        total = rows * accumulation
        fits = [str(d) for d in range(1, accumulation + 1) if accumulation % d == 0]
        counts = ", ".join(fits[:-1]) + f" or {fits[-1]} processes" if len(fits) > 1 else "one process"
        fix = next(
            (
                f"--set train.per_device_train_batch_size={total // a} --set train.gradient_accumulation_steps={a}"
                for a in range(n, total + 1, n)
                if total % a == 0
            ),
            None,
        )
        raise UserError(
            f"the global batch of {rows} rows x {accumulation} accumulation steps does not split over {n} processes: "
            + (f"keep its {total} rows per step with {fix}, " if fix else "")
            + f"launch {counts}, or use token budgets (train.max_tokens_per_batch)"
        )
    return (
        None,
        accumulation // n,
        (
            f"{n} processes: {rows} rows x {accumulation // n} accumulation steps per device "
            f"keeps the global {rows * accumulation} rows per step"
        ),
    )


def training_arguments(t: TrainArgs, checkpoint_dir: Path, *, cuda: bool, count_tokens: bool = False):
    """transformers.TrainingArguments from our TrainArgs: fields of the same name pass unchanged.
    `count_tokens` makes the Trainer count the real tokens it trains (one sync a step)."""
    shared = {f.name for f in dataclasses.fields(TrainingArguments)} - OUR_FIELDS
    args = TrainingArguments(
        **{f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name in shared},
        output_dir=str(checkpoint_dir),
        # token-budget batches arrive pre-formed, one dataset item each
        per_device_train_batch_size=1 if t.max_tokens_per_batch else t.per_device_train_batch_size,
        **(
            {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
            if t.gradient_checkpointing is True  # "auto" is decided with the model loaded (modeling)
            else {}
        ),
        save_strategy="steps",
        data_seed=t.seed,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not cuda,
        include_num_input_tokens_seen="non_padding" if count_tokens else "no",
        logging_nan_inf_filter=False,  # a non-finite loss stops the run (Trainer.training_step) instead
        # under torchrun every LoRA weight gets a gradient each step: DDP need not search the graph
        ddp_find_unused_parameters=False,
        # batches are pinned and copied to the GPU without waiting: a blocking copy waits for every
        # step queued before it, and the GPU then idles while Python prepares the next (~14% of a step)
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},
        **evaluation_arguments(t),
    )
    if args.n_gpu > 1:  # one process seeing several GPUs: the Trainer would wrap the model in nn.DataParallel
        print(
            f"note: {args.n_gpu} GPUs visible to one process; training on one. "
            f"torchrun --nproc_per_node {args.n_gpu} uses them all"
        )
        hf_compat.train_on_one_gpu(args)
    return args


def evaluation_arguments(t: TrainArgs) -> dict[str, Any]:
    """The Trainer's evaluation settings from ours: none unless `eval_strategy` is steps; evaluations
    every `eval_steps` (default: at every checkpoint); the best by `metric_for_best_model`, whose
    evaluations the Trainer reports as eval_<name> (the loss is the one where lower is better)."""
    if t.eval_strategy == "no":
        return {"eval_strategy": "no"}
    return {
        "eval_strategy": "steps",
        "eval_steps": t.eval_steps or t.save_steps,
        "metric_for_best_model": t.metric_for_best_model,
        "greater_is_better": t.metric_for_best_model != "loss",
        "load_best_model_at_end": t.load_best_model_at_end,
        "restore_callback_states_from_checkpoint": True,  # early stopping's count of evaluations since the best
    }


# --- data ------------------------------------------------------------------------------------------


@dataclass
class Collator:
    """Right-pads a batch to its longest row (rounded up to `multiple`); labels are -100 wherever
    there is padding. Accepts plain rows, or items that are themselves pre-formed batches.

    With `buckets`, a batch takes one of a few shapes instead: its width the bucket of its longest
    row (`batching.bucket_widths`), its rows filled up to `rows` (or to what `max_tokens` holds at
    that width) with rows of padding that train nothing, and no attention mask: right padding in a
    causal model changes nothing before it, so attention runs its plain causal kernel and a step
    reads no mask (one a CUDA graph could not capture).

    For `LossTrainer` (`step_extras`) it also says, found here on the CPU, where the batch is still
    (the Trainer moves it to the GPU before a step sees it), so that a step never waits for the GPU
    to find them: `REAL_TOKENS`, the batch's non-padding tokens, and with `trained_positions` where
    the loss is computed (`TRAINED_AT`: flat positions row * width + t whose next token is trained;
    `TRAINED_IDS`: those next tokens; with `buckets`, padded to `batching.trained_capacity` with
    position 0 and the ignored id -100)."""

    pad_id: int
    multiple: int = 1
    trained_positions: bool = False
    step_extras: bool = False
    buckets: bool = False
    max_tokens: int | None = None
    rows: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if features and features[0]["input_ids"] and isinstance(features[0]["input_ids"][0], list):
            features = [
                {"input_ids": ids, "labels": labels}
                for f in features
                for ids, labels in zip(f["input_ids"], f["labels"])
            ]
        shape = self.shape([len(f["input_ids"]) for f in features])
        input_ids, attention_mask = pad([f["input_ids"] for f in features], self.pad_id, **shape)
        labels, _ = pad([f["labels"] for f in features], IGNORE_INDEX, **shape)
        if not (labels != IGNORE_INDEX).any():
            raise ValueError("a batch has no trained token: its loss would be a silent zero")
        batch = {"input_ids": input_ids, "labels": labels}
        if not self.buckets:
            batch["attention_mask"] = attention_mask
        if self.step_extras:
            batch[REAL_TOKENS] = int(attention_mask.sum())
            if self.trained_positions:
                at, ids = trained_positions(labels)
                if self.buckets:
                    at, ids = pad_positions(at, ids, batching.trained_capacity(len(ids), labels.numel()))
                batch[TRAINED_AT], batch[TRAINED_IDS] = at, ids
        return batch

    def shape(self, lengths: list[int]) -> dict[str, int | None]:
        """`pad`'s width and rows for rows of these lengths."""
        if not self.buckets:
            return {"multiple": self.multiple}
        width = batching.bucketed_width(max(lengths), self.multiple)
        rows = batching.bucket_rows(width, self.max_tokens) if self.max_tokens else self.rows
        return {"width": width, "rows": rows}


def pad_positions(at: torch.Tensor, ids: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trained positions and ids padded to `capacity`: position 0, id -100 (which the loss ignores)."""
    extra = capacity - len(ids)
    return (
        torch.cat([at, at.new_zeros(extra)]),
        torch.cat([ids, ids.new_full((extra,), IGNORE_INDEX)]),
    )


TRAINED_AT, TRAINED_IDS, REAL_TOKENS = "trained_at", "trained_ids", "real_tokens"


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions row * width + t, the token trained there): every t whose next label is
    trained, the causal shift by one of the model's own loss."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows, cols = keep.nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, targets[keep]


def collator(t: TrainArgs, pad_id: int) -> Collator:
    """The collator `train` uses (and `bench` times)."""
    return Collator(
        pad_id,
        t.pad_to_multiple_of,
        trained_positions=t.trained_logits_only,
        step_extras=True,
        buckets=t.bucket_shapes,
        max_tokens=t.max_tokens_per_batch,
        rows=t.per_device_train_batch_size,
    )


def training_set(t: TrainArgs, columns: dict):
    """Rows, or token-budget batches of rows of similar length (the fast path)."""
    from datasets import Dataset

    rows = {"input_ids": columns["input_ids"], "labels": columns["labels"]}
    if t.max_tokens_per_batch:
        lengths = [len(ids) for ids in rows["input_ids"]]
        widths = batching.bucket_widths(t.pad_to_multiple_of, max(lengths)) if t.bucket_shapes else None
        batches = batching.token_budget_batches(
            lengths, t.max_tokens_per_batch, t.seed, multiple=t.pad_to_multiple_of, widths=widths
        )
        rows = batching.group_rows(rows, batches)
    return Dataset.from_dict(rows)


# --- the Trainer -----------------------------------------------------------------------------------


def trained_token_loss(hidden, at: torch.Tensor, ids: torch.Tensor, head, num_items_in_batch=None):
    """Causal-LM cross-entropy computed only where a label is trained (`trained_positions`).

    Equals the model's own loss (shift by one, ignore -100, sum / number of trained tokens), but
    projects only those positions to the vocabulary: ~12% of SAMSum tokens, so the vocabulary-wide
    logits of the prompt are never built."""
    import torch.nn.functional as F

    logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, at)).float()
    loss = F.cross_entropy(logits, ids, reduction="sum", ignore_index=IGNORE_INDEX)  # padded positions: -100
    return loss / (num_items_in_batch if num_items_in_batch is not None else (ids != IGNORE_INDEX).sum())


class LossTrainer(Trainer):
    """The Trainer with hooks that keep the GPU busy and the loss right:

    - `compute_loss` can keep the model from building every logit: the forward asks for one
      position's logits, and a hook on the decoder, whatever the family, hands over its final hidden
      states to project where labels are trained;
    - nothing in a step waits for the GPU: the loss is checked for being finite one step later,
      when it has long been computed (and before any checkpoint is written), and real tokens are
      counted on the CPU, where the batch still is. A step that waits makes the GPU idle while
      Python prepares the next one.
    """

    def __init__(self, *args, trained_logits_only: bool = True, cuda_graphs: bool = False, validation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_logits_only = trained_logits_only
        self.validation = validation  # trainer -> {"loss": ..., "rouge1": ...}: what `evaluate` reports
        self.graphs = step_graphs.GraphedSteps(self._graphed_loss) if cuda_graphs else None
        self._unchecked: list[tuple[int, torch.Tensor, Any]] = []  # (step, loss copied to the CPU, its event)
        self._uncounted_tokens = 0  # this process's real tokens not yet summed over the processes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        at, ids = inputs.pop(TRAINED_AT, None), inputs.pop(TRAINED_IDS, None)
        inputs.pop(REAL_TOKENS, None)
        if not self.trained_logits_only:
            with self._attention(model, inputs):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        if at is None:  # a batch from elsewhere: find the positions here (this waits for the GPU)
            at, ids = trained_positions(labels)
        loss, outputs = self._trained_loss(model, inputs, at, ids, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
        return (loss, outputs) if return_outputs else loss

    def _trained_loss(self, model, inputs: dict, at, ids, num_items_in_batch):
        base = self.accelerator.unwrap_model(model).get_base_model()
        captured = {}
        hook = base.get_decoder().register_forward_hook(lambda mod, args, out: captured.update(hidden=out[0]))
        try:
            with self._attention(model, inputs):
                outputs = model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        return trained_token_loss(
            captured["hidden"], at, ids, base.get_output_embeddings(), num_items_in_batch
        ), outputs

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The Trainer's evaluation, done by `validation` on the model in place: its metrics logged as
        eval_<name> (into the log history a checkpoint keeps, W&B, the console) and handed to the
        callbacks (early stopping). Every process calls it at the same step."""
        if self.validation is None:
            raise UserError("train.eval_strategy=steps needs validation rows, and none were prepared")
        self.settle(count=False)  # a diverged loss stops the run before it is scored
        found = self.validation(self)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in found.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def hidden_loss_sum(self, model, batch: dict) -> tuple[float, int]:
        """(summed loss, trained tokens) of a collated batch (with `TRAINED_AT`/`TRAINED_IDS`), by the
        training loss's own computation, without gradients: what a validation loss adds up."""
        inputs = hf_compat.prepare_inputs(self, {k: v for k, v in batch.items() if k not in (REAL_TOKENS, "labels")})
        at, ids = inputs.pop(TRAINED_AT), inputs.pop(TRAINED_IDS)
        with torch.no_grad():
            loss, _ = self._trained_loss(model, inputs, at, ids, None)
        return float(loss) * len(ids), len(ids)

    def _attention(self, model, inputs: dict):
        """Bucketed batches carry no mask (right padding trains nothing): causal attention needs none,
        and transformers would build one (`modeling.unmasked_causal_attention`)."""
        if "attention_mask" in inputs:
            return contextlib.nullcontext()
        return modeling.unmasked_causal_attention(self.accelerator.unwrap_model(model).get_base_model())

    def _graphed_loss(self, model, input_ids, at, ids, denominator):
        return self._trained_loss(model, {"input_ids": input_ids}, at, ids, denominator)[0]

    def _graphed_step(self, model, inputs, num_items_in_batch):
        """The step through `step_graphs`, or None where the Trainer's own must run: graphs off, or
        a batch or loss scaling other than the ones the graphs compute (one process, the loss
        divided by the optimizer step's trained tokens, no mask)."""
        scaled = hf_compat.loss_is_scaled_for_ga(self)
        if (
            self.graphs is None
            or not self.graphs.on
            or num_items_in_batch is None
            or not hf_compat.model_accepts_loss_kwargs(self)
            or scaled is False
            or self.args.world_size > 1
            or TRAINED_AT not in inputs
            or "attention_mask" in inputs
            or getattr(self.accelerator, "scaler", None) is not None  # fp16's loss scaling
        ):
            return None
        model.train()
        inputs = hf_compat.prepare_inputs(self, inputs)
        with self.compute_loss_context_manager():
            return self.graphs.step(
                model, inputs["input_ids"], inputs[TRAINED_AT], inputs[TRAINED_IDS], num_items_in_batch
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = self._graphed_step(model, inputs, num_items_in_batch)
        if loss is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.check_losses(keep_last=1)  # the previous step's, computed while this one was queued
        copy, event = loss.detach(), None
        if loss.is_cuda:  # into pinned memory, so the copy does not wait for the queue either
            copy = torch.empty((), dtype=loss.dtype, pin_memory=True).copy_(loss.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._unchecked.append((self.state.global_step + 1, copy, event))
        return loss

    def check_losses(self, keep_last: int = 0) -> None:
        """Stop at the first loss that is not finite, of all but the newest `keep_last` steps."""
        while len(self._unchecked) > keep_last:
            step, copy, event = self._unchecked.pop(0)
            if event is not None:
                event.synchronize()  # only until that loss was copied, not the whole queue
            if not math.isfinite(copy.item()):
                raise UserError(
                    f"training diverged at step {step}: the loss is {copy.item()}; lower "
                    f"train.learning_rate (now {self.args.learning_rate:g}); nothing was published"
                )

    def _track_num_input_tokens(self, inputs):  # overrides the Trainer's: hf_compat.OVERRIDDEN_TRAINER_METHODS
        """The Trainer's count of real tokens, as the collator counted them on the CPU, instead of
        summed on the GPU and read back every step; under torchrun the processes' counts are summed
        only when the count is logged or saved (`settle`)."""
        if self.args.include_num_input_tokens_seen == "no":
            return
        local = inputs[REAL_TOKENS] if REAL_TOKENS in inputs else int(inputs["attention_mask"].sum())
        if self.args.world_size > 1:
            self._uncounted_tokens += local
        else:
            self.state.num_input_tokens_seen += local

    def settle(self, *, count: bool) -> None:
        """Check every pending loss; with `count`, add every process's pending tokens to the count
        (under torchrun a collective: every process calls it at the same step)."""
        self.check_losses()
        if count and self.args.world_size > 1 and self.args.include_num_input_tokens_seen != "no":
            import torch.distributed as dist

            total = torch.tensor(self._uncounted_tokens, device=self.args.device)
            dist.all_reduce(total)
            self.state.num_input_tokens_seen += int(total.item())
            self._uncounted_tokens = 0


class SettleBeforeWriting(TrainerCallback):
    """Before the Trainer logs or saves a checkpoint, and when it stops: the losses checked and the
    tokens counted, the two things `LossTrainer` leaves pending so that a step never waits."""

    def __init__(self, trainer: LossTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_training_stop:
            # the processes sum their counts only at steps they all settle at: logging and saving
            # steps, the last one; not at a stop a signal asked for, which may come at another step
            step = state.global_step
            shared = step % args.logging_steps == 0 or step % args.save_steps == 0 or step >= state.max_steps
            self.trainer.settle(count=shared)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.settle(count=True)


class ManifestCallback(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it, and has the loss logged
    at each step that saves one, so the log history a checkpoint keeps covers every step before it
    (a resumed run's loss is then the whole run's: `run_loss`). Listed after every callback that may
    ask for a save."""

    def __init__(self, config_tree: dict):
        self.config_tree = config_tree

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        runtime.barrier()  # under torchrun every process writes its RNG state into the checkpoint
        ckpt = layout.checkpoint_dir(Path(args.output_dir), state.global_step)
        if args.should_save and ckpt.is_dir():
            checkpoints.write_manifest(ckpt, self.config_tree)


def run_loss(log_history: list[dict]) -> float | None:
    """The mean loss over every step of the run, resumed or not: each logged loss is the mean over
    the steps since the previous one. None before any step was logged."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else None


def take_finished(trainer: Trainer, checkpoint: Path):
    """The run a checkpoint saved at its last step holds, as `trainer.train()` would have returned it:
    the checkpoint's adapters loaded into the model and its state (log history, tokens seen) taken
    as the trainer's. Asked to resume from such a checkpoint, the Trainer trains one step past
    max_steps."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return TrainOutput(trainer.state.global_step, run_loss(trainer.state.log_history), {})


class StopOnSignal(TrainerCallback):
    """SIGTERM (clouds send it before taking a spot machine) or Ctrl-C: finish the step, save a
    checkpoint, stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in EXIT_CODES}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        print(
            f"{self.received.name} received: saving a checkpoint after this step "
            + ("(Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""),
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class ConfigToWandb(TrainerCallback):
    """The HF W&B callback logs TrainingArguments; this adds our whole resolved config (which
    never holds a secret: keys stay in the environment)."""

    def __init__(self, config_tree: dict):
        self.config_tree = config_tree

    def on_train_begin(self, args, state, control, **kwargs):
        import wandb

        if state.is_world_process_zero and wandb.run is not None:
            wandb.config.update({"samsum_qlora": self.config_tree}, allow_val_change=True)


def format_log(step: int, max_steps: int, logs: dict) -> str:
    """`step 10/40: loss 7.268, learning_rate 0.0002, grad_norm 0.5312, epoch 0.25`"""

    def number(v):
        if isinstance(v, float) and math.isfinite(v) and v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    items = ", ".join(f"{k} {number(v)}" for k, v in logs.items() if k != "total_flos")
    return f"step {step}/{max_steps}: {items}"


def format_validation(step: int, max_steps: int, logs: dict, best_step: int | None) -> str:
    """`validation at step 20/40: loss 2.345, ROUGE-1 41.20, ROUGE-2 17.03, ROUGE-L 33.90, 96% ended, 3.1 s (best)`"""
    scores = ", ".join(f"{label} {100 * logs[f'eval_{key}']:.2f}" for key, label in VALIDATION_SHOWN)
    best = " (best so far)" if best_step == step else f" (best: step {best_step})" if best_step else ""
    return (
        f"validation at step {step}/{max_steps}: loss {logs['eval_loss']:.4f}, {scores}, "
        f"{100 * logs['eval_ended_share']:.0f}% ended, {logs['eval_seconds']:.1f} s{best}"
    )


VALIDATION_SHOWN = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))


class ReadableProgress(ProgressCallback):
    """The Trainer's progress bar, logging numbers as numbers rather than a dict of strings; one line
    per validation. Writes through the bar its base class keeps (`hf_compat.PROGRESS_BAR`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None:
            return
        logs = logs or {}
        if "eval_rouge1" in logs:  # the best is decided after the log: say whether this one beats it
            self.training_bar.write(
                format_validation(state.global_step, state.max_steps, logs, best_after(args, state, logs))
            )
        else:
            self.training_bar.write(format_log(state.global_step, state.max_steps, logs))


def best_after(args, state, logs: dict) -> int | None:
    """The best evaluated step once this evaluation (`logs`) is counted, as the Trainer will decide it."""
    if args.metric_for_best_model is None:
        return None
    value, best = logs[f"eval_{args.metric_for_best_model}"], state.best_metric
    better = best is None or (value > best if args.greater_is_better else value < best)
    return state.global_step if better else state.best_global_step


class EvaluateLastStep(TrainerCallback):
    """An evaluation at the last step too, whatever eval_steps: the final adapters are a candidate."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy == "steps" and state.global_step >= state.max_steps:
            control.should_evaluate = True


def build_trainer(
    t: TrainArgs,
    model,
    train_set,
    collator,
    checkpoint_dir: Path,
    callbacks=(),
    count_tokens: bool = False,
    validation=None,
) -> LossTrainer:
    """The Trainer exactly as `train` uses it (`bench` times the same one); `validation` scores the
    model in place when train.eval_strategy asks (`LossTrainer.evaluate`)."""
    callbacks = list(callbacks)
    if validation is None:  # `bench`, and tests: nothing to evaluate with
        t = dataclasses.replace(t, eval_strategy="no", early_stopping_patience=None)
    if t.eval_strategy == "steps":
        from transformers import EarlyStoppingCallback

        callbacks.insert(0, EvaluateLastStep())
        if t.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(t.early_stopping_patience))
    trainer = LossTrainer(
        model=model,
        train_dataset=train_set,
        eval_dataset=validation.rows if validation is not None else None,  # scored by `validation`, not batched here
        data_collator=collator,
        callbacks=callbacks,
        args=training_arguments(t, checkpoint_dir, cuda=runtime.has_cuda(), count_tokens=count_tokens),
        trained_logits_only=t.trained_logits_only,
        cuda_graphs=t.cuda_graphs is True,
        validation=validation,
    )
    trainer.add_callback(SettleBeforeWriting(trainer))
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ReadableProgress)
    return trainer
