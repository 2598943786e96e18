"""`samsum-qlora eval`: generate summaries for a split and score them with ROUGE.

plan (what is scored, where it goes) -> rows -> predictions already saved -> the rest generated
(our model in batches, or an API model) -> metrics.json and predictions.jsonl. Under torchrun each
process generates its share of the batches and rank 0 writes the results (`_evaluate_sharded`).
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from samsum_qlora import batching, chat, data, files, generation, predictions, runtime
from samsum_qlora import model as modeling
from samsum_qlora.config import Config
from samsum_qlora.errors import UserError
from samsum_qlora.layout import EvalDir, RunDir
from samsum_qlora.predictions import EvalPlan, Predict, Prediction


def plan_eval(
    cfg: Config,
    *,
    adapters: str | None = None,
    base_only: bool = False,
    split: str | None = None,
    limit: int | None = None,
    output_dir: str | None = None,
    api_model: str | None = None,
    api_base: str | None = None,
) -> EvalPlan:
    """What the command line asks to score, checked before anything is loaded."""
    run = RunDir(Path(cfg.train.output_dir))
    limit = limit if limit is not None else cfg.eval.limit
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    split = split or cfg.eval.split
    if api_model is not None or api_base is not None:
        from samsum_qlora import api

        if not api_model or not api_model.strip():
            raise UserError("--api-base needs --api-model NAME (the model the endpoint serves)")
        if adapters or base_only:
            raise UserError("--api-model scores a remote model: drop --adapters/--base-only")
        out = output_dir or cfg.eval.output_dir or run.eval_dir(api_model=api_model)
        return EvalPlan(
            api_model.strip(),
            predictions.KIND_API,
            None,
            split,
            limit,
            Path(out),
            api_base=api.normalise_base(api_base or api.DEFAULT_BASE),
        )
    if base_only and adapters:
        raise UserError("--base-only and --adapters contradict each other: give one")
    adapter_dir = None if base_only else Path(adapters) if adapters else run.adapters
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise UserError(f"adapters not found: {adapter_dir} (train first, pass --adapters DIR, or use --base-only)")
    out = output_dir or cfg.eval.output_dir or run.eval_dir(base_only=base_only)
    kind = predictions.KIND_BASE if base_only else predictions.KIND_QLORA
    return EvalPlan(cfg.model.name, kind, adapter_dir, split, limit, Path(out))


def eval_rows(cfg: Config, plan: EvalPlan) -> list[dict]:
    rows = [r for r in data.load_rows(cfg.data.source, plan.split, cfg.data.revision) if chat.clean(r["dialogue"])]
    return rows[: plan.limit] if plan.limit else rows


def local_predictor(cfg: Config, plan: EvalPlan, shard: tuple[int, int] = (0, 1)) -> Predict:
    """Our own model: the base (dequantised NF4 on the fast path), with the adapters merged or
    attached unless --base-only. With `shard=(r, N)`, only batches r, r+N, ... of those one
    process would generate."""

    def predict(rows: list[dict], save) -> None:
        tokenizer = modeling.load_tokenizer(cfg.model)
        fmt = chat.ChatFormat.build(tokenizer, cfg.data, modeling.generation_eos(cfg.model))
        prompts = [fmt.prompt(r["dialogue"]) for r in rows]
        rank, processes = shard
        batches = batching.generation_batches(
            [len(p) for p in prompts],
            max_rows=cfg.eval.batch_size,
            max_tokens=cfg.eval.max_tokens_per_batch,
            new_tokens=cfg.eval.max_new_tokens,
        )[rank::processes]
        if not batches:
            return  # fewer batches than processes: nothing for this one, so no model to load
        model = modeling.load_generation_model(
            cfg.model, cfg.quantization, plan.adapters, merge=cfg.eval.merge_adapters
        )
        modeling.check_vocabulary(model, tokenizer)

        def on_batch(indices, decoded):
            save(indices, [Prediction(fmt.decode(d.ids), d.ended) for d in decoded])

        generation.generate(
            model,
            prompts,
            batches,
            max_new_tokens=cfg.eval.max_new_tokens,
            pad_id=fmt.pad_id,
            stop_ids=fmt.stop_ids,
            graphs=cfg.eval.cuda_graphs,
            on_batch=on_batch,
            progress=rank == 0,
        )

    return predict


def evaluate_model(cfg: Config, plan: EvalPlan, *, overwrite: bool = False, predict: Predict | None = None) -> dict:
    """Score `plan`: reuse saved predictions, generate the rest, write the results."""
    rt = runtime.current()
    rows = eval_rows(cfg, plan)
    if rt.distributed:
        if predict is not None:
            raise UserError("an API model is scored by one process: run `samsum-qlora eval` without torchrun")
        return _evaluate_sharded(cfg, plan, rows, overwrite=overwrite, rt=rt)
    folder = EvalDir(files.ensure_writable_dir(plan.output_dir))
    with files.hold(folder.root, "eval"):
        done = predictions.resume(folder, predictions.identity(cfg, plan, rows), overwrite=overwrite)
        if len(done) == len(rows) and folder.is_finished():
            return predictions.finished_metrics(folder)
        todo = [i for i in range(len(rows)) if i not in done]
        started, extra = time.perf_counter(), {}
        if todo:
            with folder.partial().open("a", encoding="utf-8") as sink:
                save = predictions.saver(sink, rows, todo, done)
                extra = (predict or local_predictor(cfg, plan))([rows[i] for i in todo], save) or {}
        extra["generation_seconds"] = round(time.perf_counter() - started, 2)
        return predictions.publish(cfg, plan, folder, rows, done, extra)


def _evaluate_sharded(cfg: Config, plan: EvalPlan, rows: list[dict], *, overwrite: bool, rt) -> dict:
    """`eval` under torchrun: rank 0 resumes or refuses as one process would and tells the others
    what is left; rank r generates batches r, r+N, r+2N, ... of it; rank 0 gathers and writes.

    Whole batches are dealt, not examples, so each batch is the very one a single process would
    generate, padded the same way: the predictions, and so the metrics, are identical. The
    processes talk through gloo, also on GPUs: they pass a few Python objects, no tensors."""
    import contextlib

    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:  # rank 0 waits at the gather for the slowest process: allow a long evaluation
        dist.init_process_group("gloo", timeout=timedelta(hours=2))
    folder = EvalDir(plan.output_dir)
    try:
        with files.hold(folder.root, "eval") if rt.is_main else contextlib.nullcontext():
            outcome = _broadcast_from_main(rt, lambda: _resume_for_all(cfg, plan, folder, rows, overwrite))
            if "error" in outcome:
                raise UserError(outcome["error"])
            if "finished" in outcome:
                return outcome["finished"]
            todo, started, share = outcome["todo"], time.perf_counter(), {}
            if todo:
                files.ensure_writable_dir(folder.root)  # on another node's disk, too
                with folder.partial(rt.rank).open("a", encoding="utf-8") as sink:
                    local_predictor(cfg, plan, shard=(rt.rank, rt.world_size))(
                        [rows[i] for i in todo], predictions.saver(sink, rows, todo, share)
                    )
            shares = [None] * rt.world_size if rt.is_main else None
            dist.gather_object(share, shares, dst=0)
            metrics = _broadcast_from_main(
                rt,
                lambda: _publish_shares(
                    cfg, plan, folder, rows, outcome["done"], shares, time.perf_counter() - started
                ),
            )
        folder.partial(rt.rank).unlink(missing_ok=True)  # rank 0 removed those it sees, not other nodes'
        return metrics
    finally:
        if joined:
            dist.destroy_process_group()


def _broadcast_from_main(rt, compute):
    import torch.distributed as dist

    box = [compute() if rt.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _resume_for_all(cfg, plan, folder: EvalDir, rows, overwrite) -> dict:
    try:
        files.ensure_writable_dir(folder.root)
        done = predictions.resume(folder, predictions.identity(cfg, plan, rows), overwrite=overwrite)
    except UserError as e:
        return {"error": str(e)}
    if len(done) == len(rows) and folder.is_finished():
        return {"finished": predictions.finished_metrics(folder)}
    return {"done": done, "todo": [i for i in range(len(rows)) if i not in done]}


def _publish_shares(cfg, plan, folder, rows, done, shares, seconds) -> dict:
    for share in shares:
        done.update(share)
    return predictions.publish(cfg, plan, folder, rows, done, {"generation_seconds": round(seconds, 2)})
