"""Validation while training: held-out rows, the best step's adapters published (also when a run is
stopped after it), history and best surviving a resume, early stopping, and one process's metrics
from two."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import SMOKE_CONFIG, set_args, smoke_overrides

from samsum_qlora import data, run_chart, validation
from samsum_qlora.config import load_config
from samsum_qlora.errors import UserError

VALIDATED = {"train.eval_strategy": "steps", "train.save_steps": 10}  # evaluations at every checkpoint


def rows(n: int) -> list[dict]:
    return [{"index": i, "id": f"r{i}", "dialogue": f"A: line {i}", "summary": f"s {i}"} for i in range(n)]


def test_held_out_rows_never_overlap_the_training_rows():
    kept, held = validation.hold_out(rows(50), 12, seed=7)
    assert len(held) == 12 and len(kept) == 38
    assert {r["index"] for r in kept} | {r["index"] for r in held} == set(range(50))
    assert not {r["index"] for r in kept} & {r["index"] for r in held}
    assert [r["index"] for r in kept] == sorted(r["index"] for r in kept)  # split order kept
    assert validation.hold_out(rows(50), 12, seed=7) == (kept, held)  # seeded: the same rows every run
    assert held != validation.hold_out(rows(50), 12, seed=8)[1]
    assert held != rows(50)[-12:]  # drawn, not the split's tail
    with pytest.raises(UserError, match="would hold out all 5 training rows"):
        validation.hold_out(rows(5), 5, seed=0)


def test_the_run_trains_on_none_of_the_held_out_rows(tmp_path):
    held_out = {"train.eval_strategy": "steps", "train.validation_split": None, "train.validation_rows": 10}
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **held_out))
    train, held = validation.split_rows(cfg)
    assert len(train) == 50 and len(held) == 10
    assert not {r["dialogue"] for r in train} & {r["dialogue"] for r in held}
    whole = data.load_rows(cfg.data.source, "train")
    assert sorted(r["id"] for r in train + held) == sorted(r["id"] for r in whole)
    # a split of its own: every training row trains; the same split twice is refused
    split = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **VALIDATED, **{"train.validation_rows": 3}))
    train, held = validation.split_rows(split)
    assert len(train) == 60 and [r["id"] for r in held] == [f"smp-validation-00{i}" for i in (1, 2, 3)]
    same = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **VALIDATED, **{"train.validation_split": "train"}))
    with pytest.raises(UserError, match="its rows would be trained on"):
        validation.split_rows(same)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train.eval_strategy": "epoch"}, "train.eval_strategy must be steps or no"),
        ({"train.metric_for_best_model": "bleu"}, "must be one of rouge1, rouge2, rougeL, loss"),
        ({**VALIDATED, "train.eval_steps": 4}, "set train.save_steps=4"),
        ({"train.early_stopping_patience": 2}, "needs evaluations"),
        ({**VALIDATED, "train.early_stopping_patience": 2, "train.load_best_model_at_end": False}, "needs evaluations"),
    ],
)
def test_contradicting_validation_settings_are_refused_with_the_fix(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **override))


def scripted(monkeypatch, rouge1: dict[int, float], *, stop_at: int | None = None) -> list[int]:
    """Each evaluation's real metrics, but its ROUGE-1 the one `rouge1` gives its step, so which step
    is best is known; SIGTERM sent to this process at `stop_at`. Returns the steps evaluated."""
    real, steps = validation.Validator.__call__, []

    def call(self, trainer):
        step = trainer.state.global_step
        steps.append(step)
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler asks for a checkpoint and a stop
        return real(self, trainer) | {"rouge1": rouge1[step]}

    monkeypatch.setattr(validation.Validator, "__call__", call)
    return steps


def adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def same_weights(a, b) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stopped_run_publishes_its_best_step_and_the_resumed_run_keeps_history_and_best(tmp_path, monkeypatch):
    from samsum_qlora import training
    from samsum_qlora.commands.train import train_adapters

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **VALIDATED, **{"train.max_steps": 40}))
    run, score = tmp_path / "run", {10: 0.1, 20: 0.5, 30: 0.2, 40: 0.3}
    steps = scripted(monkeypatch, score, stop_at=30)
    with pytest.raises(training.Stopped):
        train_adapters(cfg)
    stopped = json.loads((run / "train_metrics.json").read_text())
    # the signal came while step 30 was scored: the run stopped after the next step, with a checkpoint
    assert steps == [10, 20, 30] and stopped["global_step"] == 31 and stopped["stopped_early"]
    assert stopped["best_step"] == stopped["adapters_step"] == 20
    best = adapter_weights(run / "checkpoints" / "checkpoint-20")
    assert same_weights(adapter_weights(run / "lora_adapters"), best)
    assert not same_weights(best, adapter_weights(run / "checkpoints" / "checkpoint-31"))

    steps.clear()
    metrics = train_adapters(cfg)  # resumes from step 31 and scores only step 40
    assert steps == [40]
    assert [e["step"] for e in metrics["validation"]] == [10, 20, 30, 40]
    assert [e["rouge1"] for e in metrics["validation"]] == [0.1, 0.5, 0.2, 0.3]
    assert metrics["best_step"] == metrics["adapters_step"] == 20 and not metrics["stopped_early"]
    assert json.loads((run / "train_metrics.json").read_text())["validation"] == metrics["validation"]
    # the best checkpoint outlived save_total_limit=2, and its adapters are the published ones
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-20", "checkpoint-40"]
    assert same_weights(adapter_weights(run / "lora_adapters"), best)
    entry = metrics["validation"][3]
    assert set(entry) == {"step", "loss", "rouge1", "rouge2", "rougeL", "ended_share", "seconds"}
    assert 0 < entry["loss"] < 20 and entry["seconds"] > 0
    assert (run / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_early_stopping_stops_after_patience_evaluations_without_a_better_one(tmp_path, monkeypatch, capsys):
    from samsum_qlora.commands.train import train_adapters

    overrides = {**VALIDATED, "train.max_steps": 40, "train.early_stopping_patience": 2}
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **overrides))
    steps = scripted(monkeypatch, {10: 0.3, 20: 0.2, 30: 0.1, 40: 0.9})
    metrics = train_adapters(cfg)
    assert steps == [10, 20, 30] and metrics["global_step"] == 30 and metrics["stopped_early"]
    assert metrics["best_step"] == metrics["adapters_step"] == 10
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).split("\n") if "validation at step" in line]
    assert len(lines) == 3 and "ROUGE-1 30.00" in lines[0] and lines[2].endswith("(best: step 10)")
    with pytest.raises(UserError, match="already holds a finished run"):  # not resumed: it ended
        train_adapters(cfg)


def test_the_loss_of_the_validation_is_the_models_own(tmp_path):
    """`hidden_loss_sum` adds up the training loss's per-token cross-entropy: over a batch it equals
    the model's own loss (mean over the trained tokens) times their count."""
    import torch

    from samsum_qlora import modeling, training

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    fmt = modeling.chat_format(cfg)
    model, t, _ = modeling.training_model(cfg, fmt.tokenizer)
    columns, _ = fmt.encode_rows(data.load_rows(cfg.data.source, "validation")[:3], progress=False)
    batch = validation.loss_batches(columns, t, fmt.pad_id)[0]
    train_set, collate = training.training_set(t, columns), training.collator(t, fmt.pad_id)
    trainer = training.build_trainer(t, model, train_set, collate, tmp_path / "checkpoints")
    total, tokens = trainer.hidden_loss_sum(model, batch)
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert tokens == int((batch["labels"][:, 1:] != -100).sum())
    assert total / tokens == pytest.approx(float(own), rel=1e-5)


def test_the_chart_series_come_from_the_log_history():
    history = [
        {"step": 5, "loss": 2.0},
        {"step": 10, "loss": 1.5},
        {"step": 10, "eval_loss": 1.7, "eval_rouge1": 0.4, "eval_rouge2": 0.2, "eval_rougeL": 0.3},
    ]
    series = run_chart.curves(history)
    assert series["train_loss"] == [(5, 2.0), (10, 1.5)]
    assert series["validation_loss"] == [(10, 1.7)] and series["rouge1"] == [(10, 40.0)]
    assert run_chart.render(history, best_step=10)[:4] == b"\x89PNG"


# The validation of one training model, scored by as many processes as torchrun starts: the LoRA B
# weights drawn with a fixed seed (they start at 0), so every process and every run holds the same model.
EVALUATE = """\
import json, os, sys
import torch
from samsum_qlora import modeling, training, validation
from samsum_qlora.config import load_config

cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
fmt = modeling.chat_format(cfg)
rows, held = validation.split_rows(cfg)
torch.manual_seed(0)  # the LoRA A weights too
model, t, _ = modeling.training_model(cfg, fmt.tokenizer)
columns, _ = fmt.encode_rows(rows[:8], progress=False)
validator = validation.Validator(cfg, held, t)
train_set, collate = training.training_set(t, columns), training.collator(t, fmt.pad_id)
trainer = training.build_trainer(t, model, train_set, collate, cfg.train.output_dir, validation=validator)
torch.manual_seed(0)
for name, p in model.named_parameters():
    if "lora_B" in name:
        p.data.normal_(0, 0.5)
metrics = trainer.evaluate()
out = os.path.join(cfg.train.output_dir, "metrics-rank" + os.environ.get("RANK", "0") + ".json")
open(out, "w").write(json.dumps(metrics))
if torch.distributed.is_initialized():  # gloo's threads left running at exit abort the process (seen in CI)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_score_the_same_metrics_as_one(tmp_path):
    from test_distributed import launch

    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE)
    found = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        overrides = smoke_overrides(tmp_path, **VALIDATED, **{"train.output_dir": str(out), "train.validation_rows": 6})
        overrides |= {"eval.batch_size": 2, "train.max_tokens_per_batch": 512}
        launch([str(SMOKE_CONFIG), json.dumps(overrides)], processes=processes, script=script)
        found[processes] = [json.loads((out / f"metrics-rank{r}.json").read_text()) for r in range(processes)]
    one, (rank0, rank1) = found[1][0], found[2]
    without_time = lambda m: {k: v for k, v in m.items() if k != "eval_seconds"}  # noqa: E731
    assert without_time(rank0) == without_time(rank1) == without_time(one)
    assert one["eval_rouge1"] > 0 and one["eval_loss"] > 0


def test_the_report_page_shows_the_training_curve_of_the_adapters_it_scores(tmp_path):
    from samsum_qlora.commands.report import write_report
    from samsum_qlora.layout import RunDir

    run = RunDir(tmp_path / "run")
    (run.adapters).mkdir(parents=True)
    history = [
        {"step": 5, "loss": 2.0},
        {"step": 10, "eval_loss": 1.7, "eval_rouge1": 0.4, "eval_rouge2": 0.2, "eval_rougeL": 0.3},
    ]
    run_chart.write(run.chart, history, best_step=10)
    folders = []
    for name, adapters in (("tuned", str(run.adapters)), ("base", None)):
        folder = tmp_path / name
        folder.mkdir()
        kind = "QLoRA adapters" if adapters else "base"
        meta = {"model": "m", "type": kind, "adapters": adapters, "rouge1": 0.5, "rouge2": 0.0, "rougeL": 0.5}
        (folder / "metrics.json").write_text(json.dumps(meta))
        record = {"index": 0, "id": "a", "dialogue": "d", "reference": "x y", "prediction": "x", "ended": True}
        (folder / "predictions.jsonl").write_text(json.dumps(record) + "\n")
        folders.append(folder)
    write_report(folders, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    import base64

    assert page.count("Training loss and validation ROUGE against steps") == 1
    assert base64.b64encode(run.chart.read_bytes()).decode() in page


def test_wandb_gets_the_validation_curve(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import wandb
    from wandb_records import history, run_files

    from samsum_qlora.commands.train import train_adapters

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    overrides = {**VALIDATED, "train.max_steps": 20, "train.report_to": "wandb"}
    try:
        train_adapters(load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **overrides)))
    finally:
        wandb.teardown()
    rows = [row for f in run_files(tmp_path / "run") for row in history(f)]
    curve = [(row["train/global_step"], row["eval/rouge1"]) for row in rows if "eval/rouge1" in row]
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert curve == [(e["step"], e["rouge1"]) for e in metrics["validation"]] and len(curve) == 2


@pytest.mark.parametrize("bf16", [False, True])
def test_validation_summaries_are_evals_own(tmp_path, bf16):
    """The last evaluation's summaries are what `eval` writes for the published adapters attached
    (eval.merge_adapters=false): the same prompts, decoding and numbers; with bf16 training too,
    whose autocast the validation leaves (eval runs without it)."""
    from samsum_qlora.commands import evaluate
    from samsum_qlora.commands.train import train_adapters

    if bf16 and not __import__("transformers").utils.is_torch_bf16_available_on_device("cpu"):
        pytest.skip("this CPU has no bf16")
    overrides = {**VALIDATED, "train.max_steps": 10, "train.bf16": bf16, "eval.merge_adapters": False}
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **overrides))
    (last,) = train_adapters(cfg)["validation"]
    plan = evaluate.plan_eval(cfg, split="validation", limit=4, output_dir=str(tmp_path / "eval"))
    scored = evaluate.evaluate_model(cfg, plan)
    assert {k: last[k] for k in ("rouge1", "rouge2", "rougeL", "ended_share")} == {
        k: scored[k] for k in ("rouge1", "rouge2", "rougeL", "ended_share")
    }
    assert last["rouge1"] > 0  # something to agree on


@pytest.mark.slow
def test_a_torchrun_run_validates_and_publishes_its_best_step(tmp_path):
    from test_distributed import launch

    overrides = {**VALIDATED, "train.max_steps": 6, "train.save_steps": 3, "train.max_tokens_per_batch": 2048}
    log = launch(["train", *set_args(smoke_overrides(tmp_path, **overrides))], processes=2)
    run = tmp_path / "run"
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["processes"] == 2 and [e["step"] for e in metrics["validation"]] == [3, 6]
    assert log.count("validation at step 3/6") == 1  # rank 0 alone prints
    best = max(metrics["validation"], key=lambda e: e["rouge1"])["step"]  # the first of equals
    assert metrics["best_step"] == metrics["adapters_step"] == best
    assert same_weights(
        adapter_weights(run / "lora_adapters"), adapter_weights(run / "checkpoints" / f"checkpoint-{best}")
    )
