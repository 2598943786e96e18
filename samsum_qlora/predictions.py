"""An evaluation's predictions on disk: what they score, resuming an interrupted run, publishing.

Predictions are keyed by their row's position in the split (ids may repeat or be missing) and
appended batch by batch to a partial file, so an interrupted evaluation resumes where it stopped.
The folder's identity (`eval_identity.json`) records everything that decides the predictions: the
adapters' bytes, the base model's files, the chat template's text, the rows, and every config key
but the few listed in FREE_KEYS, which cannot change a prediction (a key added later counts). A
folder scored with other inputs is never resumed into or reported as done: it is refused, or
cleared with --overwrite.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from samsum_qlora import chat, files, layout
from samsum_qlora.config import Config
from samsum_qlora.data import Scorable
from samsum_qlora.errors import UserError
from samsum_qlora.layout import EvalDir
from samsum_qlora.metrics import results_table, rouge
from samsum_qlora.predictor import Prediction, Save

MIN_ENDED = 0.9  # below this share of summaries that reached their end of turn, eval warns


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


# What an eval folder's identity leaves out: settings that cannot change its predictions. Every other
# config key counts, including any key added later (default-deny). Names end at a dot for a whole section.
FREE_KEYS = {
    # how the adapters were trained: their bytes are in the identity, and a base or API model trains nothing
    "train.",
    "lora.",
    "data.train_split",
    "data.max_train_samples",
    "model.liger_kernels",  # training kernels only
    # which rows, and where they go: the plan's split and limit and the rows' own text are in the identity
    "eval.split",
    "eval.limit",
    "eval.output_dir",
    # how an API is asked, not what: its normalised base is in the identity of an API evaluation
    "api.",
}
# An API model sees the prompt alone: our own model's loading, arithmetic and batching play no part.
FREE_FOR_API = {
    "model.",
    "quantization.",
    "eval.batch_size",
    "eval.max_tokens_per_batch",
    "eval.merge_adapters",
    "eval.cuda_graphs",
}
MAX_HASHED_BYTES = 64 * 1024**2  # model files up to this size are identified by content, larger ones by size and time


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_stamp(folder: Path) -> dict:
    """Every file of a local model folder: the content of the small ones (config, tokenizer, chat
    template), the size and modification time of the weights. A rewritten model is another model."""
    stamp = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            size = p.stat().st_size
            stamp[p.name] = files.sha256(p) if size <= MAX_HASHED_BYTES else [size, p.stat().st_mtime_ns]
    return stamp


def counted_settings(cfg: Config, *, api: bool) -> dict:
    """The config's keys that decide an evaluation's predictions, flat ("eval.max_new_tokens": 128)."""
    free = tuple(FREE_KEYS | (FREE_FOR_API if api else set()))
    flat = {f"{section}.{k}": v for section, values in cfg.to_dict().items() for k, v in values.items()}
    return {k: v for k, v in flat.items() if not k.startswith(free)}


def identity(cfg: Config, plan: EvalPlan, rows: list[dict]) -> dict:
    """Everything that decides the predictions. Equal identities, equal predictions."""
    ident = {
        "model": plan.model,
        "type": plan.kind,
        "split": plan.split,
        "limit": plan.limit,
        "rows_sha256": _sha256(json.dumps([[r["index"], r["id"], r["dialogue"], r["summary"]] for r in rows]).encode()),
        **counted_settings(cfg, api=plan.api_base is not None),
    }
    if plan.api_base is not None:
        ident["api_base"] = plan.api_base
    else:
        local = Path(cfg.model.name).expanduser()
        template = cfg.model.chat_template
        ident |= {
            "model_files": _files_stamp(local) if local.is_dir() else None,
            # the template named by a path is identified by what the file holds now
            "chat_template_sha256": None if template is None else _sha256(chat.read_template(template).encode()),
            "adapters": None
            if plan.adapters is None
            else {
                name: files.sha256(plan.adapters / name)
                for name in (layout.ADAPTER_CONFIG, layout.ADAPTER_WEIGHTS)
                if (plan.adapters / name).is_file()
            },
        }
    return json.loads(json.dumps(ident))  # as it reads back from eval_identity.json


def _changed(saved: dict, current: dict) -> str:
    names = {"adapters": "the adapters", "rows_sha256": "the rows", "chat_template_sha256": "the chat template"}
    keys = [names.get(k, k) for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if "model_files" in keys:
        before, now = saved.get("model_files") or {}, current.get("model_files") or {}
        changed = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
        keys[keys.index("model_files")] = f"the model's {', '.join(changed[:3]) or 'files'}"
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def resume(folder: EvalDir, ident: dict, *, overwrite: bool, say=print) -> dict[int, dict]:
    """The predictions already in `folder` for this identity (row index -> record), from a
    finished run or an interrupted one. A folder holding another evaluation is refused, or with
    `overwrite` cleared, so predictions of two evaluations never mix."""
    saved = files.read_json(folder.identity) if folder.identity.is_file() else None
    leftovers = [p for p in (folder.metrics, folder.predictions, *folder.partials()) if p.is_file()]
    if saved != ident and any(p.stat().st_size for p in leftovers):
        what = f"{_changed(saved, ident)} changed" if saved is not None else "no record of what it scored"
        if not overwrite:
            raise UserError(
                f"{folder.root} holds another evaluation ({what}); pass --overwrite to replace it, "
                "or --output-dir for a new folder"
            )
    if saved != ident:  # another evaluation's results, or empty files of one that failed before any
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


def forget_unscored(folder: EvalDir) -> None:
    """After a failure before any prediction was saved: the identity and empty partial files go, so
    the folder holds nothing an evaluation wrote."""
    partials = [p for p in folder.partials() if p.is_file()]
    if folder.metrics.is_file() or folder.predictions.is_file() or any(p.stat().st_size for p in partials):
        return
    for path in (folder.identity, *partials):
        path.unlink(missing_ok=True)


def saver(sink, todo: list[dict], into: dict[int, dict]) -> Save:
    """The `save` a predictor of `todo` calls (with positions in `todo`): each finished batch goes
    to `into` by row index and is appended to the partial file at once, so an interruption loses
    at most that batch."""

    def save(positions: list[int], predictions: list[Prediction]) -> None:
        records = []
        for i, p in zip(positions, predictions):
            row = todo[i]
            records.append(
                {
                    "index": row["index"],
                    "id": row["id"],
                    "dialogue": chat.clean(row["dialogue"]),  # for the report page's example browser
                    "reference": chat.clean(row["summary"]),
                    "prediction": p.text,
                    "ended": p.ended,
                }
                | ({"truncated": True} if p.truncated else {})  # only the dialogue's beginning was summarised
            )
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        files.append_whole(sink.fileno(), lines.encode("utf-8"))  # a full disk cuts no record in half
        into.update((r["index"], r) for r in records)

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
        # dialogues whose tail was cut to fit data.max_length tokens (marked "truncated" in predictions.jsonl)
        "truncated_dialogues": sum(bool(r.get("truncated")) for r in records),
        **extra,
        "config": cfg.to_dict(),
    }
    files.write_jsonl(folder.predictions, records)
    files.write_json(folder.metrics, metrics)
    for partial in folder.partials():
        partial.unlink(missing_ok=True)
    print(results_table([(plan.model, plan.kind, metrics)]))
    if ended < MIN_ENDED * len(records) and layout.is_embedded_model(cfg.model.name):
        print(
            f"note: {ended} of {len(records)} summaries ended at the end of turn, the rest ran to "
            f"eval.max_new_tokens={cfg.eval.max_new_tokens}: expected of the embedded tiny model, whose weights are "
            "random (a real model's summaries end)"
        )
    elif ended < MIN_ENDED * len(records):
        print(
            f"warning: only {ended} of {len(records)} summaries ended at the end of turn; the rest ran "
            f"to eval.max_new_tokens={cfg.eval.max_new_tokens} (looping, or a stop token the model does not use)"
        )
    if empty:
        print(f"warning: {empty} of {len(records)} predictions are empty; ROUGE counts them as 0")
    print(f"wrote {folder.metrics} and {folder.predictions}")
    return metrics
