"""`samsum-qlora eval`: generate summaries for a split and score them with ROUGE.

plan (what is scored, where it goes) -> rows -> predictions already saved -> the rest generated
(our model in batches, or an API model) -> metrics.json and predictions.jsonl -> the scores added to
the training run's W&B run. Under torchrun each process generates its share of the batches and rank 0
writes the results (`_evaluate_sharded`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from samsum_qlora import data, files, predictions, predictor, runtime, tracking
from samsum_qlora.config import Config
from samsum_qlora.errors import UserError
from samsum_qlora.layout import EvalDir, RunDir
from samsum_qlora.predictions import EvalPlan
from samsum_qlora.predictor import Predict
from samsum_qlora.summarizer import adapters_to_use, check_context, local_predictor


def plan_eval(
    cfg: Config,
    *,
    adapters: str | None = None,
    base_only: bool = False,
    split: str | None = None,
    limit: int | None = None,
    output_dir: str | None = None,
    api_model: str | None = None,
) -> EvalPlan:
    """What the command line asks to score, checked before anything is loaded."""
    run = RunDir(Path(cfg.train.output_dir))
    limit = limit if limit is not None else cfg.eval.limit
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    split = split or cfg.eval.split
    if api_model is not None:
        from samsum_qlora import api

        if not api_model.strip():
            raise UserError("--api-model needs the name of the model the endpoint serves")
        if adapters or base_only:
            raise UserError("--api-model scores a remote model: drop --adapters/--base-only")
        out = output_dir or cfg.eval.output_dir or run.eval_dir(api_model=api_model)
        kind, base = predictor.KIND_API, api.normalise_base(cfg.api.base)
        return EvalPlan(api_model.strip(), kind, None, split, limit, Path(out), api_base=base)
    adapter_dir = adapters_to_use(cfg, adapters, base_only)
    out = output_dir or cfg.eval.output_dir or run.eval_dir(base_only=base_only)
    kind = predictor.KIND_BASE if base_only else predictor.KIND_QLORA
    return EvalPlan(cfg.model.name, kind, adapter_dir, split, limit, Path(out))


def eval_rows(cfg: Config, plan: EvalPlan) -> data.Scorable:
    """The split's first `plan.limit` rows that can be scored, and how many could not (said once)."""
    rows = data.load_rows(cfg.data.source, plan.split, cfg.data.revision)
    chosen = data.scorable(rows, limit=plan.limit)
    if chosen.describe():
        runtime.current().say(f"{plan.split}: {chosen.describe()}; they are not scored")
    if not chosen.rows:
        raise UserError(f"no row of {cfg.data.source} ({plan.split}) has both a dialogue and a reference summary")
    return chosen


def evaluate_model(cfg: Config, plan: EvalPlan, *, overwrite: bool = False, predict: Predict | None = None) -> dict:
    """Score `plan`: reuse saved predictions, generate the rest, write the results. A run that fails
    before saving any prediction leaves no folder or file behind."""
    rt = runtime.current()
    chosen = eval_rows(cfg, plan)
    if plan.api_base is None:
        check_context(cfg)
    if rt.distributed:
        if predict is not None:
            raise UserError("an API model is scored by one process: run `samsum-qlora eval` without torchrun")
        return _evaluate_sharded(cfg, plan, chosen, overwrite=overwrite)
    created = not plan.output_dir.exists()
    folder = EvalDir(files.ensure_writable_dir(plan.output_dir))
    try:
        with files.hold(folder.lock, "eval"), disk_full_stops(folder.root):
            return _score(cfg, plan, folder, chosen, overwrite=overwrite, predict=predict)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.root.rmdir()  # only when this run left nothing in it
        raise


def disk_full_stops(root: Path):
    return files.disk_full_is_user_error(
        root, "saving predictions", "rerun the same command: it resumes from the predictions saved so far"
    )


def _score(cfg: Config, plan: EvalPlan, folder: EvalDir, chosen: data.Scorable, *, overwrite, predict) -> dict:
    done = predictions.resume(folder, predictions.identity(cfg, plan, chosen.rows), overwrite=overwrite)
    todo = [r for r in chosen.rows if r["index"] not in done]
    if not todo and folder.is_finished():
        return predictions.finished_metrics(folder)
    started, extra = time.perf_counter(), {}
    if todo:
        try:
            with folder.partial().open("ab", buffering=0) as sink:
                save = predictions.saver(sink, todo, done)
                extra = (predict or local_predictor(cfg, plan.adapters))(todo, save) or {}
        except BaseException:
            predictions.forget_unscored(folder)  # what was saved stays, for the rerun to resume
            raise
    extra["generation_seconds"] = round(time.perf_counter() - started, 2)
    return publish(cfg, plan, folder, chosen, done, extra)


def _evaluate_sharded(cfg: Config, plan: EvalPlan, chosen: data.Scorable, *, overwrite: bool) -> dict:
    """`eval` under torchrun: rank 0 resumes or refuses as one process would and tells the others
    what is left; rank r generates batches r, r+N, r+2N, ... of it; rank 0 gathers and writes.

    Whole batches are dealt, not examples, so each batch is the very one a single process would
    generate, padded the same way: the predictions, and so the metrics, are identical."""
    rt = runtime.current()
    folder = EvalDir(plan.output_dir)
    with runtime.process_group(), files.hold(folder.lock, "eval") if rt.is_main else contextlib.nullcontext():
        outcome = runtime.from_main(lambda: _resume_for_all(cfg, plan, folder, chosen, overwrite))
        if "error" in outcome:
            raise UserError(outcome["error"])
        if "finished" in outcome:
            return outcome["finished"]
        by_index = {r["index"]: r for r in chosen.rows}
        todo, started, share = [by_index[i] for i in outcome["todo"]], time.perf_counter(), {}
        if todo:
            files.ensure_writable_dir(folder.root)  # on another node's disk, too
            with disk_full_stops(folder.root), folder.partial(rt.rank).open("ab", buffering=0) as sink:
                predict = local_predictor(cfg, plan.adapters, rank=rt.rank, processes=rt.world_size)
                predict(todo, predictions.saver(sink, todo, share))
        shares = runtime.gather_to_main(share)
        seconds = time.perf_counter() - started
        metrics = runtime.from_main(
            lambda: _publish_shares(cfg, plan, folder, chosen, outcome["done"], shares, seconds)
        )
    folder.partial(rt.rank).unlink(missing_ok=True)  # rank 0 removed those it sees, not other nodes'
    return metrics


def _resume_for_all(cfg, plan, folder: EvalDir, chosen: data.Scorable, overwrite) -> dict:
    try:
        files.ensure_writable_dir(folder.root)
        done = predictions.resume(folder, predictions.identity(cfg, plan, chosen.rows), overwrite=overwrite)
    except UserError as e:
        return {"error": str(e)}
    todo = [r["index"] for r in chosen.rows if r["index"] not in done]
    if not todo and folder.is_finished():
        return {"finished": predictions.finished_metrics(folder)}
    return {"done": done, "todo": todo}


def _publish_shares(cfg, plan, folder, chosen: data.Scorable, done, shares, seconds) -> dict:
    for share in shares:
        done.update(share)
    return publish(cfg, plan, folder, chosen, done, {"generation_seconds": round(seconds, 2)})


def publish(
    cfg: Config, plan: EvalPlan, folder: EvalDir, chosen: data.Scorable, done: dict[int, dict], extra: dict
) -> dict:
    """Score and write the results (`predictions.publish`), then add the scores and the first
    predictions to the training run's W&B run, when it has one."""
    metrics = predictions.publish(cfg, plan, folder, chosen, done, extra)
    records = [done[r["index"]] for r in chosen.rows]  # as predictions.jsonl holds them
    if tracking.log_eval_to_wandb(metrics, records, Path(cfg.train.output_dir)):
        print("logged the scores and sample predictions to the training run's W&B run")
    return metrics
