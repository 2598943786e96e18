"""Batched greedy generation and scoring: writes metrics.json and predictions.jsonl.

Predictions are appended to `predictions.partial.jsonl` batch by batch, so an interrupted
evaluation resumes where it stopped instead of generating everything again. Under torchrun each
process generates its share of the batches into `predictions.partial.rank<r>.jsonl`, and rank 0
writes the results (`_run_eval_sharded`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

from samsum_qlora import files, tracking
from samsum_qlora.config import Config
from samsum_qlora.errors import UserError
from samsum_qlora.metrics import results_table, rouge

PARTIAL = "predictions.partial.jsonl"
KIND_BASE, KIND_QLORA, KIND_API = "base", "QLoRA adapters", "API"


@dataclass
class EvalPlan:
    """What one evaluation scores, resolved from config and command line."""

    model: str
    kind: str
    adapters: Path | None
    split: str
    limit: int | None
    output_dir: Path
    api_base: str | None = None  # set for an API model: `model` is then the API's model name

    def fingerprint(self, cfg: Config) -> dict:
        """Everything that changes the predictions: a folder holding another plan's is not reused."""
        fingerprint = {
            "model": self.model, "adapters": str(self.adapters) if self.adapters else None,
            "data": cfg.data.source, "split": self.split, "limit": self.limit,
            "task_instruction": cfg.data.task_instruction, "max_length": cfg.data.max_length,
            "max_new_tokens": cfg.eval.max_new_tokens, "date_string": cfg.data.date_string,
        }
        if self.api_base:
            fingerprint["api_base"] = self.api_base
        else:  # our own model: how its numbers are computed changes greedy outputs slightly
            fingerprint["merge_adapters"] = cfg.eval.merge_adapters
            fingerprint["dequantize_once"] = cfg.quantization.dequantize_once
        return fingerprint


def plan_eval(cfg: Config, *, adapters: str | None, base_only: bool, split: str | None,
              limit: int | None, output_dir: str | None, api_model: str | None = None,
              api_base: str | None = None) -> EvalPlan:
    train_dir = Path(cfg.train.output_dir)
    if api_model is not None or api_base is not None:
        return _plan_api_eval(cfg, api_model, api_base, adapters=adapters, base_only=base_only, split=split,
                              limit=limit, output_dir=output_dir)
    if base_only and adapters:
        raise UserError("--base-only and --adapters contradict each other: give one")
    adapter_dir = None if base_only else Path(adapters) if adapters else train_dir / "lora_adapters"
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise UserError(f"adapters not found: {adapter_dir} (train first, pass --adapters DIR, or use --base-only)")
    default_out = train_dir / ("eval-base" if base_only else "eval")
    limit = limit if limit is not None else cfg.eval.limit
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    return EvalPlan(
        model=cfg.model.name, kind=KIND_BASE if base_only else KIND_QLORA, adapters=adapter_dir,
        split=split or cfg.eval.split, limit=limit,
        output_dir=Path(output_dir or cfg.eval.output_dir or default_out),
    )


def _plan_api_eval(cfg: Config, api_model: str | None, api_base: str | None, *, adapters: str | None,
                   base_only: bool, split: str | None, limit: int | None, output_dir: str | None) -> EvalPlan:
    """An OpenAI-compatible endpoint as the model; default folder <train.output_dir>/eval-api-<name>."""
    from samsum_qlora import api

    if not api_model or not api_model.strip():
        raise UserError("--api-base needs --api-model NAME (the model the endpoint serves)")
    if adapters or base_only:
        raise UserError("--api-model scores a remote model: drop --adapters/--base-only")
    limit = limit if limit is not None else cfg.eval.limit
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    folder = "eval-api-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", api_model).strip("-.") or "model")
    return EvalPlan(
        model=api_model.strip(), kind=KIND_API, adapters=None, split=split or cfg.eval.split, limit=limit,
        output_dir=Path(output_dir or cfg.eval.output_dir or Path(cfg.train.output_dir) / folder),
        api_base=api.normalise_base(api_base or api.DEFAULT_BASE),
    )


def generation_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of similar length, longest first (an OOM shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate(
    model, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, pad_id: int,
    stop_ids: list[int], decode: Callable[[list[int]], str], on_batch: Callable[[list[int], list[str]], None],
    progress: bool = True, batches: list[list[int]] | None = None,
) -> None:
    """Greedy generation in batches of similar length, left-padded so every prompt ends where
    generation starts; stops each row at end-of-turn (`stop_ids`; none: always `max_new_tokens`).
    Calls `on_batch(indices, texts)` per batch. (`batches`, a share of `generation_batches`,
    generates only those.)"""
    import torch
    from tqdm.auto import tqdm

    if batches is None:
        batches = generation_batches([len(p) for p in prompts], batch_size)
    device = next(model.parameters()).device
    for idx in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(prompts[i]) :] = torch.as_tensor(prompts[i])
            attention_mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                eos_token_id=stop_ids, pad_token_id=pad_id,
            )
        on_batch(idx, [decode(seq[width:].tolist()) for seq in out])


Save = Callable[[list[int], list[str]], None]
# A predictor writes a summary for each row of `todo` (any order, any batching) and reports each
# finished batch through `save(indices into todo, texts)`; it may return extra metrics (e.g. usage).
Predict = Callable[[Config, EvalPlan, list[dict], Save], "dict | None"]


def predict_local(cfg: Config, plan: EvalPlan, todo: list[dict], save: Save, *,
                  shard: tuple[int, int] = (0, 1)) -> None:
    """Our own model: the 4-bit base, with the adapters attached unless --base-only. With
    `shard=(r, N)`, only batches r, r+N, r+2N, ... of the ones a single process would generate."""
    from samsum_qlora import data, model as modeling

    tokenizer = modeling.load_tokenizer(cfg.model.name, cfg.model.revision)
    prompts = [
        data.encode_prompt(tokenizer, r["dialogue"], instruction=cfg.data.task_instruction,
                           max_length=cfg.data.max_length, date_string=cfg.data.date_string)
        for r in todo
    ]
    rank, processes = shard
    batches = generation_batches([len(p) for p in prompts], cfg.eval.batch_size)[rank::processes]
    if not batches:
        return  # fewer batches than processes: nothing for this one, so no model to load
    model = modeling.load_generation_model(cfg, plan.adapters)
    generate(
        model, prompts, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
        pad_id=data.pad_token_id(tokenizer), stop_ids=data.end_of_turn_ids(tokenizer),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip(), on_batch=save,
        progress=rank == 0, batches=batches,
    )


def _partials(out: Path) -> list[Path]:
    """Interrupted evaluations' predictions: one process's, and each torchrun process's."""
    return [out / PARTIAL, *sorted(out.glob("predictions.partial.rank*.jsonl"))]


def _saved_predictions(cfg: Config, plan: EvalPlan, overwrite: bool) -> tuple[Path, dict]:
    """The output folder and the predictions already in it (id -> record), from a finished run
    (predictions.jsonl) or an interrupted one, of one process or several (the partial files).
    Never mixes predictions of two different evaluations: refuses, or with `overwrite` clears."""
    out = files.ensure_writable_dir(plan.output_dir)
    fingerprint = plan.fingerprint(cfg)
    plan_file = out / "eval_plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != fingerprint:
        if not overwrite:
            raise UserError(f"{out} holds another evaluation ({plan_file}); pass --output-dir or --overwrite")
        for stale in (*_partials(out), out / "predictions.jsonl", out / "metrics.json"):
            stale.unlink(missing_ok=True)
    files.write_json(plan_file, fingerprint)
    done = {}
    for saved in (out / "predictions.jsonl", *_partials(out)):
        if saved.is_file():
            done.update({r["id"]: r for r in files.read_jsonl(saved)})
    return out, done


def run_eval(cfg: Config, plan: EvalPlan, *, overwrite: bool = False, predict: Predict | None = None) -> dict:
    """Score `plan`: load the split, reuse saved predictions, generate the rest, write results.
    Under torchrun (WORLD_SIZE > 1) the processes share the generation (`_run_eval_sharded`)."""
    from samsum_qlora import data

    # --- data ---
    examples = data.rows(data.load_split(cfg.data.source, plan.split, cfg.data.revision))
    examples = [r for r in examples if data.clean(r["dialogue"])]
    if plan.limit:
        examples = examples[: plan.limit]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if predict is not None:
            raise UserError("an API model is scored by one process: run `samsum-qlora eval` without torchrun")
        return _run_eval_sharded(cfg, plan, examples, overwrite=overwrite)

    # --- resume or refuse: never mix predictions of two different evaluations ---
    out, done = _saved_predictions(cfg, plan, overwrite)
    partial = out / PARTIAL
    todo = [r for r in examples if r["id"] not in done]
    if done:
        print(f"resuming: {len(examples) - len(todo)} of {len(examples)} predictions already in {out}")
    if not todo and (out / "metrics.json").is_file() and (out / "predictions.jsonl").is_file():
        return _already_complete(out)

    # --- generate what is missing; each finished batch is appended to the partial file ---
    started = time.perf_counter()
    extra: dict = {}
    if todo:
        with partial.open("a", encoding="utf-8") as sink:
            extra = (predict or predict_local)(cfg, plan, todo, _saver(sink, todo, done)) or {}
    seconds = time.perf_counter() - started
    return _publish(cfg, plan, out, examples, done, seconds, extra)


def _run_eval_sharded(cfg: Config, plan: EvalPlan, examples: list[dict], *, overwrite: bool) -> dict:
    """`eval` under torchrun: rank 0 resumes or refuses as one process would and tells the others
    what is left; rank r generates batches r, r+N, r+2N, ... of it; rank 0 gathers the predictions
    and writes the results. Every process returns the same metrics.

    Whole batches are dealt out, not examples, so each batch is the very one a single process
    would generate, padded the same way: the predictions, and so the metrics, are identical.
    Dealing them in turn from the longest gives each process about the same work. The processes
    talk through gloo, also on GPUs: they only pass a few Python objects, which needs no GPU memory."""
    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:  # rank 0 waits at the gather for the slowest process: allow a long evaluation
        dist.init_process_group("gloo", timeout=timedelta(hours=2))
    rank, processes = dist.get_rank(), dist.get_world_size()
    mine = plan.output_dir / f"predictions.partial.rank{rank}.jsonl"
    try:
        # --- rank 0 resumes or refuses, as one process does; the others learn the outcome ---
        outcome: list = [None]
        if rank == 0:
            try:
                out, done = _saved_predictions(cfg, plan, overwrite)
                left = [r["id"] for r in examples if r["id"] not in done]
                if done:
                    print(f"resuming: {len(examples) - len(left)} of {len(examples)} predictions already in {out}")
                if not left and (out / "metrics.json").is_file() and (out / "predictions.jsonl").is_file():
                    outcome[0] = {"finished": _already_complete(out)}
                else:
                    outcome[0] = {"left": left}
            except UserError as e:
                outcome[0] = {"error": str(e)}
        dist.broadcast_object_list(outcome, src=0)
        if "error" in outcome[0]:
            raise UserError(outcome[0]["error"])
        if "finished" in outcome[0]:
            return outcome[0]["finished"]
        left = set(outcome[0]["left"])
        todo = [r for r in examples if r["id"] in left]

        # --- generate this process's share; each finished batch is appended to its own partial file ---
        started = time.perf_counter()
        share: dict[str, dict] = {}
        if todo:
            files.ensure_writable_dir(plan.output_dir)  # on another node's disk, too
            with mine.open("a", encoding="utf-8") as sink:
                predict_local(cfg, plan, todo, _saver(sink, todo, share), shard=(rank, processes))

        # --- rank 0 gathers every share and writes the results in dataset order ---
        shares = [None] * processes if rank == 0 else None
        dist.gather_object(share, shares, dst=0)
        metrics: list = [None]
        if rank == 0:
            for part in shares:
                done.update(part)
            metrics[0] = _publish(cfg, plan, out, examples, done, time.perf_counter() - started, {})
        dist.broadcast_object_list(metrics, src=0)
        mine.unlink(missing_ok=True)  # rank 0 removed those it sees; not those on other nodes' disks
        return metrics[0]
    finally:
        if joined:
            dist.destroy_process_group()


def _saver(sink, todo: list[dict], into: dict[str, dict]) -> Save:
    """The `save` a predictor calls: each finished batch goes to `into` (id -> record) and is
    appended to the partial file at once, so an interruption loses at most the batch in flight."""
    from samsum_qlora import data

    def save(indices: list[int], texts: list[str]) -> None:
        for i, text in zip(indices, texts):
            rec = {"id": todo[i]["id"], "reference": data.clean(todo[i]["summary"]), "prediction": text}
            into[rec["id"]] = rec
            sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
        sink.flush()

    return save


def _already_complete(out: Path) -> dict:
    """Finished before: keep its metrics.json, which alone records what that run measured (an
    API's token usage); rewriting it would drop that and say generation took 0 s."""
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for partial in _partials(out):
        partial.unlink(missing_ok=True)
    print(results_table([(metrics["model"], metrics["type"], metrics)]))
    print(f"already complete: {out / 'metrics.json'}")
    return metrics


def _publish(cfg: Config, plan: EvalPlan, out: Path, examples: list[dict], done: dict, seconds: float,
             extra: dict) -> dict:
    """Score the predictions and write them, in dataset order, with metrics.json."""
    predictions = [done[r["id"]] for r in examples]
    scores = rouge([p["prediction"] for p in predictions], [p["reference"] for p in predictions])
    metrics = {
        **scores, "n_examples": len(predictions), "model": plan.model, "type": plan.kind,
        "adapters": str(plan.adapters) if plan.adapters else None, "split": plan.split,
        "generation_seconds": round(seconds, 2), **extra, "config": cfg.to_dict(),
    }
    files.write_jsonl(out / "predictions.jsonl", predictions)
    files.write_json(out / "metrics.json", metrics)
    for partial in _partials(out):
        partial.unlink(missing_ok=True)
    print(results_table([(plan.model, plan.kind, scores)]))
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")
    if tracking.log_eval_to_wandb(metrics, predictions, Path(cfg.train.output_dir)):
        print("logged the scores and sample predictions to the training run's W&B run")
    return metrics
