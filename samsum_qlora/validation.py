"""Validation while training: the model being trained, in place, summarises held-out dialogues with
eval's own `Summarizer` (same prompts, stop rules, decoding, fast path), and ROUGE scores them; its
loss on the same rows is the training loss's own computation, without gradients.

The rows come from another split of the data, or are drawn out of the training split before
training sees it (`split_rows`). Under torchrun each process generates and computes the loss for
its share of the batches, and the main process scores them all, so every process gets the same
metrics (and so the same best step and early stop) as one process would compute.
"""

from __future__ import annotations

import contextlib
import math
import random
import time

from samsum_qlora import batching, data, hf_compat, metrics, runtime, training
from samsum_qlora.config import Config, TrainArgs
from samsum_qlora.data import Row
from samsum_qlora.errors import UserError
from samsum_qlora.summarizer import Summarizer


def hold_out(rows: list[Row], n: int, seed: int) -> tuple[list[Row], list[Row]]:
    """(rows to train on, `n` held-out rows): drawn at random with `seed`, each list in split order.
    A row is in exactly one of them."""
    if n >= len(rows):
        raise UserError(
            f"train.validation_rows={n} would hold out all {len(rows)} training rows: hold out fewer, "
            "or name a train.validation_split"
        )
    held = set(random.Random(seed).sample(range(len(rows)), n))
    return [r for r in rows if r["index"] not in held], [r for r in rows if r["index"] in held]


def split_rows(cfg: Config) -> tuple[list[Row], list[Row] | None]:
    """(the training split's rows to train on, the validation rows; None when the run does not
    validate). Rows held out of the training split are removed before data.max_train_samples."""
    d, t = cfg.data, cfg.train
    rows = data.load_rows(d.source, d.train_split, d.revision)  # each row's "index": its place in the split
    if t.eval_strategy == "no":
        return rows, None
    if t.validation_split is None:
        return hold_out(rows, t.validation_rows, t.seed)
    if t.validation_split == d.train_split:
        raise UserError(
            f"train.validation_split is the training split ({d.train_split}): its rows would be trained on; "
            "name another split, or null to hold train.validation_rows rows out of it"
        )
    return rows, data.load_rows(d.source, t.validation_split, d.revision)[: t.validation_rows]


class Validator:
    """Scores the model a Trainer trains, in place (`__call__(trainer)`): summaries and loss of the
    validation rows, as {"loss", "rouge1", "rouge2", "rougeL", "ended_share", "seconds"}."""

    def __init__(self, cfg: Config, rows: list[Row], t: TrainArgs):
        chosen = data.scorable(rows)
        if not chosen.rows:
            raise UserError("no validation row has both a dialogue and a reference summary")
        self.rows = chosen.rows
        self.summarizer = Summarizer(cfg, None)  # never loads a model: it is handed the one training
        self.prompts = self.summarizer.prompts([r["dialogue"] for r in self.rows])
        columns, _ = self.summarizer.fmt.encode_rows(self.rows, progress=False)
        self.loss_batches = loss_batches(columns, t, self.summarizer.fmt.pad_id)  # t: this process's batch

    def __call__(self, trainer) -> dict[str, float]:
        rt, started = runtime.current(), time.perf_counter()
        model = trainer.model  # the model itself, not the DDP wrapper: no gradient to synchronise
        model.eval()  # no dropout
        try:
            losses = [trainer.hidden_loss_sum(model, b) for b in self.loss_batches[rt.rank :: rt.world_size]]
            summaries = self.summaries(model, rt)
        finally:
            model.train()
        shares = runtime.gather_to_main((losses, summaries))
        return runtime.from_main(lambda: self.score(shares, time.perf_counter() - started))

    def summaries(self, model, rt: runtime.Runtime) -> dict[int, tuple[str, bool]]:
        """This process's share of the summaries, by position in `rows`: (text, ended)."""
        import torch

        s, out = self.summarizer, {}
        s.model = model

        def on_batch(indices, decoded):
            for i, d in zip(indices, decoded):
                p = s.text(d)
                out[i] = (p.text, p.ended)

        batches = s.batches(self.prompts, rank=rt.rank, processes=rt.world_size)
        with torch.no_grad(), as_eval_runs_it(model):
            s.generate(self.prompts, batches, on_batch, keys=[r["index"] for r in self.rows], progress=False)
        return out

    def score(self, shares: list, seconds: float) -> dict[str, float]:
        """Every process's (losses, summaries) as one evaluation's metrics."""
        loss_sum = math.fsum(total for losses, _ in shares for total, _ in losses)  # the same in any order
        tokens = sum(n for losses, _ in shares for _, n in losses)
        found = {i: p for _, summaries in shares for i, p in summaries.items()}
        texts = [found[i][0] for i in range(len(self.rows))]
        scores = metrics.rouge(texts, [r["summary"] for r in self.rows])
        return {
            "loss": loss_sum / tokens,
            **{key: scores[key] for key in ("rouge1", "rouge2", "rougeL")},
            "ended_share": sum(found[i][1] for i in range(len(self.rows))) / len(self.rows),
            "seconds": round(seconds, 2),
        }


@contextlib.contextmanager
def as_eval_runs_it(model):
    """The training model computing as eval's does with attached adapters: without the mixed-precision
    autocast accelerate wraps its forward in for training (a decoding step's CUDA graph cannot capture
    autocast's cast cache), and with peft casting each adapter's input to the adapter's float32,
    which training leaves to autocast (`modeling.attach_new_adapters`)."""
    wrapped = vars(model).get("forward")
    plain = hf_compat.forward_without_autocast(model)
    if plain is not None:
        model.forward = plain
    uncast = hf_compat.uncast_adapter_layers(model)
    hf_compat.set_input_casts(uncast, True)
    try:
        yield model
    finally:
        hf_compat.set_input_casts(uncast, False)
        if wrapped is not None:
            model.forward = wrapped


def loss_batches(columns: dict, t: TrainArgs, pad_id: int) -> list[dict]:
    """The validation rows collated as training collates them (with the positions its loss reads),
    in batches of at most the training batch's tokens, the same for every evaluation."""
    collate = training.Collator(pad_id, t.pad_to_multiple_of, trained_positions=True, step_extras=True)
    rows = [{"input_ids": i, "labels": labels} for i, labels in zip(columns["input_ids"], columns["labels"])]
    lengths = [len(r["input_ids"]) for r in rows]
    budget = t.max_tokens_per_batch or t.per_device_train_batch_size * max(lengths)
    groups = batching.token_budget_batches(lengths, budget, seed=0, multiple=t.pad_to_multiple_of)
    return [collate([rows[i] for i in group]) for group in groups]


def history(log_history: list[dict]) -> list[dict]:
    """The run's evaluations, from the Trainer's log history (which a checkpoint keeps), in order."""
    keys = ("loss", "rouge1", "rouge2", "rougeL", "ended_share", "seconds")
    return [{"step": e["step"], **{k: e[f"eval_{k}"] for k in keys}} for e in log_history if "eval_rouge1" in e]
