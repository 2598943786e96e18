import json

import pytest

from samsum_qlora import evaluate, train
from samsum_qlora.config import load_config
from samsum_qlora.errors import UserError
from samsum_qlora.metrics import rouge

from conftest import SMOKE_CONFIG, smoke_overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun")
    train.run(load_config(SMOKE_CONFIG, smoke_overrides(out)))
    return out


def plan(cfg, **kw):
    args = {"adapters": None, "base_only": False, "split": None, "limit": None, "output_dir": None} | kw
    return evaluate.plan_eval(cfg, **args)


def test_eval_writes_metrics_that_match_its_predictions(run_dir):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir))
    metrics = evaluate.run_eval(cfg, plan(cfg))
    out = run_dir / "run" / "eval"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["n_examples"] == 12
    assert [p["id"] for p in preds] == [f"smp-test-{i:03d}" for i in range(1, 13)]  # dataset order
    expected = rouge([p["prediction"] for p in preds], [p["reference"] for p in preds])
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert saved[key] == pytest.approx(expected[key]) and 0 <= saved[key] <= 1
    assert saved["type"] == "QLoRA adapters" and saved["adapters"].endswith("lora_adapters")
    assert not (out / evaluate.PARTIAL).exists()


def test_interrupted_eval_resumes_without_regenerating(run_dir, monkeypatch):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir))
    p = plan(cfg, output_dir=str(run_dir / "resume-eval"), limit=5)
    calls = []

    def crash_after_two(cfg_, plan_, todo, save):
        calls.append(len(todo))
        save([0, 1], ["first summary", "second summary"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate.run_eval(cfg, p, predict=crash_after_two)
    assert not (p.output_dir / "metrics.json").exists()  # no "final" file from a crashed run

    def finish(cfg_, plan_, todo, save):
        calls.append(len(todo))
        save(list(range(len(todo))), ["rest"] * len(todo))

    metrics = evaluate.run_eval(cfg, p, predict=finish)
    assert calls == [5, 3] and metrics["n_examples"] == 5
    evaluate.run_eval(cfg, p, predict=lambda *a: pytest.fail("a finished eval must not generate again"))


def test_base_only_and_limit(run_dir):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir))
    metrics = evaluate.run_eval(cfg, plan(cfg, base_only=True, limit=3))
    assert metrics["type"] == "base" and metrics["adapters"] is None and metrics["n_examples"] == 3
    assert (run_dir / "run" / "eval-base" / "metrics.json").is_file()


def test_output_dir_of_another_evaluation_is_refused(run_dir):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir))
    out = str(run_dir / "shared-out")
    evaluate.run_eval(cfg, plan(cfg, output_dir=out, limit=2), predict=lambda c, p, todo, save: save([0, 1], ["a", "b"]))
    with pytest.raises(UserError, match="holds another evaluation"):
        evaluate.run_eval(cfg, plan(cfg, output_dir=out, limit=3))


def test_missing_adapters(tmp_path):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    with pytest.raises(UserError, match="adapters not found"):
        plan(cfg)
    (tmp_path / "empty").mkdir()
    cfg_p = plan(cfg, adapters=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="holds no LoRA adapters"):
        evaluate.run_eval(cfg, cfg_p)


def test_adapters_for_another_base_are_refused(run_dir, tmp_path):
    # Same tokenizer, different size: the adapters' shapes cannot fit.
    from samsum_qlora.assets.build_tiny_llama import build_model
    from transformers import AutoTokenizer

    from conftest import TINY_MODEL

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    other = build_model(tok)
    other.config.hidden_size = 128
    from transformers import LlamaForCausalLM

    bigger = LlamaForCausalLM(other.config)
    bigger.save_pretrained(tmp_path / "bigger")
    tok.save_pretrained(tmp_path / "bigger")
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir, **{"model.name": str(tmp_path / "bigger")}))
    p = plan(cfg, adapters=str(run_dir / "run" / "lora_adapters"), output_dir=str(tmp_path / "e"))
    with pytest.raises(UserError, match=r"trained on .*tiny-llama.*hidden_size': 64.*not on .*bigger.*hidden_size': 128"):
        evaluate.run_eval(cfg, p)


def test_batched_left_padded_generation_equals_one_at_a_time(run_dir):
    """Batching must not change a greedy output: left padding, masks and stopping are per row."""
    from samsum_qlora import data, model as modeling

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run_dir))
    tok = modeling.load_tokenizer(cfg.model.name)
    rows = data.rows(data.load_split(cfg.data.source, "test"))
    prompts = [data.encode_prompt(tok, r["dialogue"], instruction=cfg.data.task_instruction, max_length=512,
                                  date_string=cfg.data.date_string) for r in rows]
    assert len({len(p) for p in prompts}) > 5  # really different lengths, so padding is exercised
    model = modeling.load_generation_model(cfg, run_dir / "run" / "lora_adapters")
    stops = data.end_of_turn_ids(tok)

    def outputs(batch_size):
        out = {}
        evaluate.generate(model, prompts, batch_size=batch_size, max_new_tokens=24, pad_id=data.pad_token_id(tok),
                          stop_ids=stops, decode=lambda ids: ids, on_batch=lambda idx, s: out.update(zip(idx, s)),
                          progress=False)
        return [next((s[:i] for i, t in enumerate(s) if t in stops), s) for s in (out[i] for i in range(len(prompts)))]

    batched, single = outputs(5), outputs(1)
    assert batched == single
    assert any(len(s) > 3 for s in single)  # it generated something to compare
