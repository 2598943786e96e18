import json

import pytest
from conftest import SMOKE_CONFIG, smoke_overrides

from samsum_qlora.commands import evaluate, train
from samsum_qlora.config import load_config
from samsum_qlora.errors import UserError
from samsum_qlora.layout import EvalDir
from samsum_qlora.metrics import rouge
from samsum_qlora.predictions import Prediction


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
    from conftest import TINY_MODEL
    from transformers import AutoTokenizer, LlamaForCausalLM

    from samsum_qlora.assets.build_tiny_llama import build_model

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    other = build_model(tok)
    other.config.hidden_size = 128
    bigger = LlamaForCausalLM(other.config)
    bigger.save_pretrained(tmp_path / "bigger")
    tok.save_pretrained(tmp_path / "bigger")
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir, **{"model.name": str(tmp_path / "bigger")}))
    p = evaluate.plan_eval(cfg, adapters=str(run_dir / "run" / "lora_adapters"), output_dir=str(tmp_path / "e"))
    with pytest.raises(
        UserError, match=r"trained on .*tiny-llama.*hidden_size': 64.*not on .*bigger.*hidden_size': 128"
    ):
        evaluate.evaluate_model(cfg, p)


def test_decoding_settings_are_recorded_and_part_of_the_folder_identity(tmp_path):
    """Beam search through eval's own predictor; metrics.json records the settings, and the same
    folder refuses an evaluation with another setting instead of mixing the two."""
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"eval.num_beams": 2, "eval.max_new_tokens": 8}))
    metrics = evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, base_only=True, limit=3))
    assert metrics["n_examples"] == 3 and metrics["config"]["eval"]["num_beams"] == 2
    saved = json.loads((tmp_path / "run" / "eval-base" / "metrics.json").read_text())
    assert {k: saved["config"]["eval"][k] for k in cfg.eval.decoding()} == cfg.eval.decoding()
    greedy = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"eval.max_new_tokens": 8}))
    with pytest.raises(UserError, match=r"holds another evaluation \(decoding changed\); pass --overwrite"):
        evaluate.evaluate_model(greedy, evaluate.plan_eval(greedy, base_only=True, limit=3))
