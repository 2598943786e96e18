"""An evaluation's predictions on disk: what they score, resuming an interrupted run, publishing.

Predictions are keyed by their row's position in the split (ids may repeat or be missing) and
appended batch by batch to a partial file, so an interrupted evaluation resumes where it stopped.
The folder's identity (`eval_identity.json`) records everything that decides the predictions: the
adapters' bytes, the base model, the rows, the prompt and the decoding. A folder scored with other
inputs is never resumed into or reported as done: it is refused, or cleared with --overwrite.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from samsum_qlora import files, layout, tracking
from samsum_qlora.config import Config
from samsum_qlora.data import Scorable
from samsum_qlora.errors import UserError
from samsum_qlora.layout import EvalDir
from samsum_qlora.metrics import results_table, rouge

KIND_BASE, KIND_QLORA, KIND_API = "base", "QLoRA adapters", "API"
MIN_ENDED = 0.9  # below this share of summaries that reached their end of turn, eval warns


@dataclass
class Prediction:
    text: str
    ended: bool  # the model closed its turn (or the API said "stop"), rather than running out of tokens


# A predictor writes a summary for each of `rows` (any order, any batching) and reports each
# finished batch through `save(positions in rows, predictions)`; it may return extra metrics.
Save = Callable[[list[int], list[Prediction]], None]
Predict = Callable[[list[dict], Save], "dict | None"]


@dataclass
class EvalPlan:
    """What one evaluation scores, resolved from the config and the command line."""

    model: str
    kind: str
    adapters: Path | None
    split: str
    limit: int | None
    output_dir: Path
    api_base: str | None = None  # for an API model: `model` is then the API's model name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_stamp(folder: Path) -> dict:
    """Size and modification time of a local model's files: a rewritten model is another model."""
    return {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.iterdir())
        if p.suffix in (".safetensors", ".bin", ".json") and p.is_file()
    }


def identity(cfg: Config, plan: EvalPlan, rows: list[dict]) -> dict:
    """Everything that decides the predictions. Equal identities, equal predictions."""
    ident = {
        "model": plan.model,
        "type": plan.kind,
        "split": plan.split,
        "limit": plan.limit,
        "data": [cfg.data.source, cfg.data.revision],
        "rows_sha256": _sha256(json.dumps([[r["index"], r["id"], r["dialogue"], r["summary"]] for r in rows]).encode()),
        "prompt": [cfg.data.task_instruction, cfg.data.max_length, cfg.data.date_string],
        "max_new_tokens": cfg.eval.max_new_tokens,
        "decoding": cfg.eval.decoding(),
    }
    if plan.api_base is not None:
        return ident | {"api_base": plan.api_base}
    local = Path(cfg.model.name).expanduser()
    adapters = None
    if plan.adapters is not None:
        adapters = {
            name: _sha256((plan.adapters / name).read_bytes())
            for name in (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS)
            if (plan.adapters / name).is_file()
        }
    q, e = cfg.quantization, cfg.eval
    return ident | {
        "model_revision": cfg.model.revision,
        "model_files": _files_stamp(local) if local.is_dir() else None,
        "chat_template": cfg.model.chat_template,
        "adapters": adapters,
        "arithmetic": [
            q.load_in_4bit,
            q.bnb_4bit_quant_type,
            q.bnb_4bit_use_double_quant,
            q.bnb_4bit_compute_dtype,
            q.dequantize_once,
            e.merge_adapters,
            e.cuda_graphs,
        ],
    }


def _changed(saved: dict, current: dict) -> str:
    names = {"adapters": "the adapters", "model_files": "the model's files", "rows_sha256": "the rows"}
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(names.get(k, k) for k in keys)


def resume(folder: EvalDir, ident: dict, *, overwrite: bool, say=print) -> dict[int, dict]:
    """The predictions already in `folder` for this identity (row index -> record), from a
    finished run or an interrupted one. A folder holding another evaluation is refused, or with
    `overwrite` cleared, so predictions of two evaluations never mix."""
    saved = files.read_json(folder.identity) if folder.identity.is_file() else None
    leftovers = [p for p in (folder.metrics, folder.predictions, *folder.partials()) if p.is_file()]
    if (saved is not None and saved != ident) or (saved is None and leftovers):
        what = f"{_changed(saved, ident)} changed" if saved is not None else "no record of what it scored"
        if not overwrite:
            raise UserError(
                f"{folder.root} holds another evaluation ({what}); pass --overwrite to replace it, "
                "or --output-dir for a new folder"
            )
        for stale in leftovers:
            stale.unlink()
    files.write_json(folder.identity, ident)
    done: dict[int, dict] = {}
    for path in (folder.predictions, *folder.partials()):
        if path.is_file():
            done.update({r["index"]: r for r in files.read_jsonl(path) if isinstance(r.get("index"), int)})
    if done:
        say(f"resuming: {len(done)} predictions already in {folder.root}")
    return done


def saver(sink, todo: list[dict], into: dict[int, dict]) -> Save:
    """The `save` a predictor of `todo` calls (with positions in `todo`): each finished batch goes
    to `into` by row index and is appended to the partial file at once, so an interruption loses
    at most that batch."""
    from samsum_qlora.chat import clean

    def save(positions: list[int], predictions: list[Prediction]) -> None:
        for i, p in zip(positions, predictions):
            row = todo[i]
            record = {
                "index": row["index"],
                "id": row["id"],
                "dialogue": clean(row["dialogue"]),  # for the report page's example browser
                "reference": clean(row["summary"]),
                "prediction": p.text,
                "ended": p.ended,
            }
            into[row["index"]] = record
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        sink.flush()

    return save


def finished_metrics(folder: EvalDir) -> dict:
    """A finished evaluation of the same identity: its metrics.json, which alone records what that
    run measured (an API's token usage); rewriting it would drop that and say it took 0 s."""
    metrics = files.read_json(folder.metrics)
    for partial in folder.partials():
        partial.unlink(missing_ok=True)
    print(results_table([(metrics["model"], metrics["type"], metrics)]))
    print(f"already complete: {folder.metrics}")
    return metrics


def publish(cfg: Config, plan: EvalPlan, folder: EvalDir, chosen: Scorable, done: dict[int, dict], extra: dict) -> dict:
    """Score the predictions and write them, in dataset order, with metrics.json."""
    records = [done[r["index"]] for r in chosen.rows]
    texts = [r["prediction"] for r in records]
    ended = sum(bool(r.get("ended")) for r in records)
    empty = sum(not t.strip() for t in texts)
    metrics = {
        **rouge(texts, [r["reference"] for r in records]),
        "n_examples": len(records),
        "ended_share": round(ended / len(records), 4),
        "empty_predictions": empty,
        "model": plan.model,
        "type": plan.kind,
        "adapters": str(plan.adapters) if plan.adapters else None,
        "split": plan.split,
        "skipped_empty_dialogue": chosen.empty_dialogue,
        "skipped_empty_reference": chosen.empty_reference,
        **extra,
        "config": cfg.to_dict(),
    }
    files.write_jsonl(folder.predictions, records)
    files.write_json(folder.metrics, metrics)
    for partial in folder.partials():
        partial.unlink(missing_ok=True)
    print(results_table([(plan.model, plan.kind, metrics)]))
    if ended < MIN_ENDED * len(records):
        print(
            f"warning: only {ended} of {len(records)} summaries ended at the end of turn; the rest ran "
            f"to eval.max_new_tokens={cfg.eval.max_new_tokens} (looping, or a stop token the model does not use)"
        )
    if empty:
        print(f"warning: {empty} of {len(records)} predictions are empty; ROUGE counts them as 0")
    print(f"wrote {folder.metrics} and {folder.predictions}")
    if tracking.log_eval_to_wandb(metrics, records, Path(cfg.train.output_dir)):
        print("logged the scores and sample predictions to the training run's W&B run")
    return metrics
