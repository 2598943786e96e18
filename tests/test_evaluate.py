import json
import os
import shutil

import pytest
from conftest import SAMPLE_DATA, SMOKE_CONFIG, TINY_MODEL, smoke_overrides

from samsum_qlora.commands import evaluate, train
from samsum_qlora.config import load_config
from samsum_qlora.errors import UserError
from samsum_qlora.layout import EvalDir
from samsum_qlora.metrics import rouge
from samsum_qlora.predictor import Prediction


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun")
    train.train_adapters(load_config(SMOKE_CONFIG, smoke_overrides(out)))
    return out


def answers(*texts, ended=True):
    return [Prediction(t, ended) for t in texts]


def test_eval_writes_metrics_that_match_its_predictions(run_dir):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir))
    metrics = evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg))
    out = run_dir / "run" / "eval"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["n_examples"] == 12
    assert [p["id"] for p in preds] == [f"smp-test-{i:03d}" for i in range(1, 13)]  # dataset order
    assert [p["index"] for p in preds] == list(range(12))
    expected = rouge([p["prediction"] for p in preds], [p["reference"] for p in preds])
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert saved[key] == pytest.approx(expected[key]) and 0 <= saved[key] <= 1
    assert saved["type"] == "QLoRA adapters" and saved["adapters"].endswith("lora_adapters")
    assert saved["ended_share"] == pytest.approx(sum(p["ended"] for p in preds) / 12)
    assert saved["empty_predictions"] == sum(not p["prediction"] for p in preds)
    assert not EvalDir(out).partial().exists()


def test_interrupted_eval_resumes_without_regenerating(run_dir):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir))
    p = evaluate.plan_eval(cfg, output_dir=str(run_dir / "resume-eval"), limit=5)
    calls = []

    def crash_after_two(rows, save):
        calls.append(len(rows))
        save([0, 1], answers("first summary", "second summary"))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_model(cfg, p, predict=crash_after_two)
    assert not (p.output_dir / "metrics.json").exists()  # no "final" file from a crashed run

    def finish(rows, save):
        calls.append(len(rows))
        save(list(range(len(rows))), answers(*["rest"] * len(rows)))

    metrics = evaluate.evaluate_model(cfg, p, predict=finish)
    assert calls == [5, 3] and metrics["n_examples"] == 5
    evaluate.evaluate_model(cfg, p, predict=lambda *a: pytest.fail("a finished eval must not generate again"))


def test_base_only_and_limit(run_dir):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir))
    metrics = evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, base_only=True, limit=3))
    assert metrics["type"] == "base" and metrics["adapters"] is None and metrics["n_examples"] == 3
    assert (run_dir / "run" / "eval-base" / "metrics.json").is_file()


def test_output_dir_of_another_evaluation_is_refused(run_dir):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir))
    out = str(run_dir / "shared-out")
    evaluate.evaluate_model(
        cfg,
        evaluate.plan_eval(cfg, output_dir=out, limit=2),
        predict=lambda rows, save: save([0, 1], answers("a", "b")),
    )
    with pytest.raises(UserError, match=r"holds another evaluation \(limit, the rows changed\); pass --overwrite"):
        evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, output_dir=out, limit=3))


def test_missing_adapters(tmp_path):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    with pytest.raises(UserError, match="adapters not found"):
        evaluate.plan_eval(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no LoRA adapters"):
        evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, adapters=str(tmp_path / "empty")))


def test_adapters_for_another_base_are_refused(run_dir, tmp_path):
    # Same tokenizer, different size: the adapters' shapes cannot fit.
    from transformers import AutoTokenizer, LlamaForCausalLM

    from samsum_qlora.assets.build_tiny_llama import build_model

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    other = build_model(tok)
    other.config.hidden_size = 128
    bigger = LlamaForCausalLM(other.config)
    bigger_dir = tmp_path / "bigger" / TINY_MODEL.name  # named like the base: it passes the name check
    bigger.save_pretrained(bigger_dir)
    tok.save_pretrained(bigger_dir)
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir, **{"model.name": str(bigger_dir)}))
    p = evaluate.plan_eval(cfg, adapters=str(run_dir / "run" / "lora_adapters"), output_dir=str(tmp_path / "e"))
    with pytest.raises(
        UserError, match=r"trained on .*tiny-llama.*hidden_size': 64.*not on .*bigger.*hidden_size': 128"
    ):
        evaluate.evaluate_model(cfg, p)


def merged_folder(path, adapters):
    """A stand-in for `merge`'s output: the tiny model's files and a merge.json naming `adapters`."""
    shutil.copytree(TINY_MODEL, path)
    (path / "merge.json").write_text(json.dumps({"adapters": str(adapters), "base_model": str(TINY_MODEL)}))
    return path


@pytest.mark.parametrize("command", ["eval", "summarize", "merge"])
def test_adapters_on_a_merged_model_or_another_base_are_refused_before_loading(run_dir, tmp_path, command):
    """Both ran without a word: a merged model got the same adapters a second time, and adapters of
    one base went on another of the same shape (no run record beside them to compare)."""
    from test_cli import one_line_error, runner

    from samsum_qlora.commands.cli import main

    adapters = tmp_path / "downloaded"  # no run.json beside them: the shape check had nothing to go by
    shutil.copytree(run_dir / "run" / "lora_adapters", adapters)
    merged = merged_folder(tmp_path / "merged", adapters)
    other = shutil.copytree(TINY_MODEL, tmp_path / "another-model")
    for model, message in (
        (merged, f"model.name {merged} is a merged model ({adapters} merged into {TINY_MODEL}): its adapters are "
         "already in its weights; pass --base-only"),
        (other, f"adapters in {adapters} were trained on {TINY_MODEL}, not on model.name {other}: pass "
         f"--set model.name={TINY_MODEL}"),
    ):  # fmt: skip
        args = [command, "--adapters", str(adapters), "--config", str(SMOKE_CONFIG)]
        args += ["--out", str(tmp_path / "merged-out")] if command == "merge" else []
        args += ["--set", f"model.name={model}", "--set", f"data.source={SAMPLE_DATA}"]
        args += ["--set", f"train.output_dir={tmp_path / 'run'}"]
        one_line_error(runner().invoke(main, args, input="A: hi"), message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged-out").exists()


def test_damaged_adapter_weights_are_one_line_in_eval_summarize_and_merge(run_dir, tmp_path):
    from test_cli import one_line_error, runner

    from samsum_qlora.commands.cli import main

    adapters = shutil.copytree(run_dir / "run" / "lora_adapters", tmp_path / "adapters")
    weights = adapters / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # a download cut short: SafetensorError, a traceback
    sets = ["--config", str(SMOKE_CONFIG), "--set", f"model.name={TINY_MODEL}", "--set", f"data.source={SAMPLE_DATA}"]
    for args in (
        ["eval", "--adapters", str(adapters), "--output-dir", str(tmp_path / "e"), *sets],
        ["summarize", "--adapters", str(adapters), *sets],
        ["merge", "--adapters", str(adapters), "--out", str(tmp_path / "merged")],
    ):
        result = runner().invoke(main, args, input="A: hi")
        one_line_error(result, f"{weights} is damaged (Error while deserializing header: invalid header length)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


def test_adapters_without_a_config_bring_the_settings_they_were_trained_with(run_dir, tmp_path):
    """`eval --adapters DIR` after downloading a run: the base and settings from the run's config.yaml,
    results in that run folder; adapters alone: the base their adapter_config.json names."""
    from test_cli import runner

    from samsum_qlora.commands.cli import _config, main

    run = run_dir / "run"
    cfg = _config(None, ["eval.max_new_tokens=4"], adapters=str(run / "lora_adapters"))
    trained = load_config(run / "config.yaml")
    assert (cfg.model, cfg.quantization, cfg.data) == (trained.model, trained.quantization, trained.data)
    assert cfg.model.name == str(TINY_MODEL) and cfg.train.output_dir == str(run) and cfg.eval.max_new_tokens == 4
    alone = shutil.copytree(run / "lora_adapters", tmp_path / "alone")
    cfg = _config(None, [], adapters=str(alone))
    assert cfg.model.name == str(TINY_MODEL) and cfg.data.source == "knkarthick/samsum"  # the rest: defaults

    args = ["eval", "--adapters", str(run / "lora_adapters"), "--limit", "2", "--set", "eval.max_new_tokens=4"]
    result = runner().invoke(main, [*args, "--output-dir", str(tmp_path / "e")])
    assert result.exit_code == 0, result.stderr  # the default config's Llama 3.2 would be fetched from the Hub
    note = f"note: base model {TINY_MODEL} and the settings it was trained with, from {run / 'config.yaml'}"
    assert result.stderr.splitlines()[0] == note
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["model"] == str(TINY_MODEL)


# --- what an eval folder's identity holds -------------------------------------------------------------


def changed(cfg, key):
    """`cfg` with `key` set to a value no config holds (unchecked: only the identity reads it)."""
    import copy

    out = copy.deepcopy(cfg)
    section, name = key.split(".")
    setattr(getattr(out, section), name, "{changed}")
    return out


@pytest.mark.parametrize("kind", ["local", "api"])
def test_identity_counts_every_config_key_but_a_short_list(smoke_cfg, kind):
    """Default-deny: a key counts unless listed as unable to change a prediction, so a key added
    later counts without anyone remembering to add it."""
    from samsum_qlora.config import all_keys
    from samsum_qlora.predictions import identity

    plan = evaluate.plan_eval(smoke_cfg, base_only=True) if kind == "local" else evaluate.plan_eval(
        smoke_cfg, api_model="m"
    )  # fmt: skip
    rows = evaluate.eval_rows(smoke_cfg, plan).rows[:3]
    before = identity(smoke_cfg, plan, rows)
    free = {k for k in all_keys() if k.startswith(("train.", "lora.", "api."))}
    free |= {"data.train_split", "data.max_train_samples", "model.liger_kernels"}
    free |= {"eval.split", "eval.limit", "eval.output_dir"}
    if kind == "api":  # an API model sees the prompt alone
        free |= {k for k in all_keys() if k.startswith(("model.", "quantization."))}
        free |= {"eval.batch_size", "eval.max_tokens_per_batch", "eval.merge_adapters", "eval.cuda_graphs"}
    counted = {k for k in all_keys() if identity(changed(smoke_cfg, k), plan, rows) != before}
    assert counted == set(all_keys()) - free
    assert "model.attn_implementation" in counted or kind == "api"  # the old list forgot it


def test_a_changed_chat_template_is_another_evaluation(tmp_path):
    """The template's text counts, whether the model folder holds it or model.chat_template names it."""

    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    template = tmp_path / "mine.jinja"
    template.write_text((TINY_MODEL / "chat_template.jinja").read_text())
    for edited, extra in ((model / "chat_template.jinja", {}), (template, {"model.chat_template": str(template)})):
        cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"model.name": str(model), **extra}))
        plan = evaluate.plan_eval(cfg, base_only=True, limit=2, output_dir=str(tmp_path / edited.stem))
        evaluate.evaluate_model(cfg, plan, predict=lambda rows, save: save([0, 1], answers("a", "b")))
        stat = edited.stat()
        edited.write_text(edited.read_text().replace("\n", "\n\n", 1))  # one more newline: another prompt
        with pytest.raises(
            UserError, match=r"holds another evaluation \(the (model's chat_template.jinja|chat template)"
        ):
            evaluate.evaluate_model(cfg, plan, predict=lambda *a: pytest.fail("reported or resumed the old one"))
        os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old time stamp
        with pytest.raises(UserError, match="holds another evaluation"):
            evaluate.evaluate_model(cfg, plan, predict=lambda *a: pytest.fail("reported or resumed the old one"))


def test_skipped_rows_are_counted_said_and_keep_their_positions(tmp_path, capsys):
    """An empty reference is skipped, not scored 0; an empty dialogue is skipped without shifting the
    other rows' index; --limit N takes the split's first N rows."""
    source = tmp_path / "data"
    source.mkdir()
    rows = [json.loads(line) for line in (SAMPLE_DATA / "test.jsonl").read_text().splitlines()]
    rows[1]["dialogue"], rows[3]["summary"] = " ", "\n"
    (source / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"data.source": str(source)}))
    plan = evaluate.plan_eval(cfg, base_only=True, limit=6)

    def echo_reference(todo, save):  # a perfect model: any row with reference scored 0 would show
        save(list(range(len(todo))), answers(*[r["summary"] for r in todo]))

    metrics = evaluate.evaluate_model(cfg, plan, predict=echo_reference)
    assert "test: skipped 1 with an empty dialogue and 1 with an empty reference summary; they are not scored" in (
        capsys.readouterr().out
    )
    preds = [json.loads(line) for line in (plan.output_dir / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in preds] == [0, 2, 4, 5] and [p["id"] for p in preds][1] == rows[2]["id"]
    assert metrics["n_examples"] == 4 and metrics["rouge1"] == pytest.approx(1.0)
    assert (metrics["skipped_empty_dialogue"], metrics["skipped_empty_reference"]) == (1, 1)
    assert json.loads((plan.output_dir / "metrics.json").read_text())["skipped_empty_reference"] == 1


# --- failures before any prediction leave nothing, and block nothing --------------------------------


def test_a_split_of_empty_dialogues_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from samsum_qlora import runtime

    source = tmp_path / "data"
    source.mkdir()
    (source / "test.jsonl").write_text('{"dialogue": "", "summary": "s"}\n{"dialogue": " ", "summary": "t"}\n')
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"data.source": str(source)}))
    for world in (1, 2):  # alone and as rank 0 of torchrun's two processes
        monkeypatch.setattr(runtime, "current", lambda w=world: runtime.Runtime(world_size=w))
        with pytest.raises(UserError, match=r"no row of .* \(test\) has both a dialogue and a reference summary"):
            evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, base_only=True))
        assert not (tmp_path / "run").exists() and not (tmp_path / "merged-out").exists()


def test_a_failure_before_any_prediction_leaves_no_folder_and_blocks_no_rerun(tmp_path):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    out = tmp_path / "e"

    def fails(rows, save):
        raise UserError("the model could not be loaded")

    with pytest.raises(UserError, match="could not be loaded"):
        evaluate.evaluate_model(
            cfg, evaluate.plan_eval(cfg, base_only=True, limit=2, output_dir=str(out)), predict=fails
        )
    assert not out.exists()
    # a folder that such a failure left behind (an identity, an empty partial file) is reused
    other = evaluate.plan_eval(cfg, base_only=True, limit=3, output_dir=str(out))
    out.mkdir()
    files_of_failed = EvalDir(out)
    files_of_failed.identity.write_text(json.dumps({"model": "another", "type": "base"}))
    files_of_failed.partial().write_text("")
    metrics = evaluate.evaluate_model(cfg, other, predict=lambda rows, save: save([0, 1, 2], answers("a", "b", "c")))
    assert metrics["n_examples"] == 3 and sorted(p.name for p in out.iterdir()) == [
        "eval_identity.json",
        "metrics.json",
        "predictions.jsonl",
    ]


@pytest.mark.parametrize("new_tokens, room", [(1537, "at most 1536"), (3_000_000_000, "at most 1536")])
def test_new_tokens_past_the_models_positions_are_refused(tmp_path, new_tokens, room):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"eval.max_new_tokens": new_tokens}))
    with pytest.raises(UserError, match=rf"it has 2,048 positions and a prompt may take data.max_length=512 .*{room}"):
        evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, base_only=True), predict=lambda *a: pytest.fail("ran"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged-out").exists()
    fits = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"eval.max_new_tokens": 1536}))
    evaluate.evaluate_model(
        fits, evaluate.plan_eval(fits, base_only=True, limit=1), predict=lambda r, s: s([0], answers("a"))
    )


def test_eval_of_edited_adapters_is_one_line_and_leaves_no_folder(tmp_path):
    from conftest import set_args
    from test_cli import run_cli
    from test_modeling import with_adapters
    from test_reliability import last_line_error

    from samsum_qlora.config import load_config as load

    cfg = load(SMOKE_CONFIG, smoke_overrides(tmp_path))
    adapters = tmp_path / "adapters"
    with_adapters(cfg).save_pretrained(adapters)
    meta = json.loads((adapters / "adapter_config.json").read_text())
    (adapters / "adapter_config.json").write_text(json.dumps({**meta, "target_modules": ["q_proj"]}))
    out = tmp_path / "e"
    result = run_cli(
        ["eval", *set_args(smoke_overrides(tmp_path)), "--adapters", str(adapters), "--output-dir", str(out)]
    )
    last_line_error(result, "do not match their adapter_config.json: 12 weights of the file have no module to go to")
    assert not out.exists()


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_and_sigterm_stop_eval_with_one_line_and_keep_what_was_saved(tmp_path, monkeypatch, sig, code):
    """As train does: one line and 128 + the signal (click alone said "Aborted!" and exited 1 on
    Ctrl-C; SIGTERM killed the process unsaid). The next run resumes."""
    import signal

    from conftest import set_args
    from test_cli import run_cli

    asked = []

    def interrupted_predictor(cfg, adapters, **kwargs):
        def predict(rows, save):
            asked.append(len(rows))
            save([0, 1], answers("first", "second"))
            os.kill(os.getpid(), getattr(signal, sig))
            save([2], answers("never saved"))  # the signal lands before this line runs

        return predict

    monkeypatch.setattr(evaluate, "local_predictor", interrupted_predictor)
    args = ["eval", *set_args(smoke_overrides(tmp_path)), "--base-only", "--limit", "4"]
    result = run_cli(args)
    assert result.exit_code == code and "Aborted" not in result.output + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"stopped: stopped by {sig}; the predictions saved so far are kept: rerun the same command to resume"
    )
    partial = EvalDir(tmp_path / "run" / "eval-base").partial()
    assert [json.loads(line)["prediction"] for line in partial.read_text().splitlines()] == ["first", "second"]
    monkeypatch.setattr(evaluate, "local_predictor", lambda *a, **k: lambda rows, save: save([0, 1], answers("c", "d")))
    assert run_cli(args).exit_code == 0 and asked == [4]
    preds = (tmp_path / "run" / "eval-base" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in preds] == ["first", "second", "c", "d"]


def test_decoding_settings_are_recorded_and_part_of_the_folder_identity(tmp_path):
    """Beam search through eval's own predictor; metrics.json records the settings, and the same
    folder refuses an evaluation with another setting instead of mixing the two."""
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"eval.num_beams": 2, "eval.max_new_tokens": 8}))
    metrics = evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, base_only=True, limit=3))
    assert metrics["n_examples"] == 3 and metrics["config"]["eval"]["num_beams"] == 2
    saved = json.loads((tmp_path / "run" / "eval-base" / "metrics.json").read_text())
    assert {k: saved["config"]["eval"][k] for k in cfg.eval.decoding()} == cfg.eval.decoding()
    greedy = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"eval.max_new_tokens": 8}))
    with pytest.raises(UserError, match=r"holds another evaluation \(eval.num_beams changed\); pass --overwrite"):
        evaluate.evaluate_model(greedy, evaluate.plan_eval(greedy, base_only=True, limit=3))


@pytest.mark.parametrize("embedded", [True, False])
def test_summaries_that_never_end_are_explained_on_the_embedded_tiny_model(tmp_path, capsys, embedded):
    """The happy path of the embedded default printed "warning: only 0 of 12 summaries ended"; the
    tiny model is random, which is said instead. Any other model keeps the warning."""
    model = TINY_MODEL if embedded else shutil.copytree(TINY_MODEL, tmp_path / "tiny-llama")
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"model.name": str(model)}))

    def never_ends(rows, save):
        save(list(range(len(rows))), answers(*["and then and then"] * len(rows), ended=False))

    evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, base_only=True, limit=3), predict=never_ends)
    out = capsys.readouterr().out
    budget = cfg.eval.max_new_tokens
    explained = (
        f"note: 0 of 3 summaries ended at the end of turn, the rest ran to eval.max_new_tokens={budget}: expected"
    )
    assert (explained in out, "warning: only 0 of 3 summaries ended" in out) == (embedded, not embedded)


def test_eval_adds_its_scores_and_predictions_to_the_training_runs_wandb_run(tmp_path, monkeypatch, capsys):
    """The command logs what it wrote, once: metrics.json's values, predictions.jsonl's rows in
    dataset order, and the training run's folder, whose wandb_run_id.txt names the W&B run."""
    from samsum_qlora import tracking

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    logged = []
    monkeypatch.setattr(tracking, "log_eval_to_wandb", lambda *args: logged.append(args) or True)

    def echo_reference(todo, save):
        save(list(range(len(todo)))[::-1], answers(*[r["summary"] for r in todo][::-1]))

    plan = evaluate.plan_eval(cfg, base_only=True, limit=4)
    metrics = evaluate.evaluate_model(cfg, plan, predict=echo_reference)
    ((scores, records, train_dir),) = logged
    assert scores == metrics == json.loads((plan.output_dir / "metrics.json").read_text())
    assert records == [json.loads(line) for line in (plan.output_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3] and train_dir == tmp_path / "run"
    assert capsys.readouterr().out.endswith("logged the scores and sample predictions to the training run's W&B run\n")
