"""`samsum-qlora export`: GGUF files written by llama.cpp's own converter, the Ollama Modelfile and
the model card; llama.cpp's converter source comes from llama-cpp-python's sdist on PyPI (the
`llama_cpp_source` fixture), SmolLM2's real weights from ../shared/reference (skipped without)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from chat_families import FAMILIES, build_tokenizer
from conftest import SMOKE_CONFIG, TINY_MODEL, smoke_overrides
from test_cli import one_line_error, run_cli
from test_real_weights import CACHE, smollm2  # noqa: F401  (the fixture)

from samsum_qlora import chat, gguf_export, modeling
from samsum_qlora.commands import evaluate, export, merge, train
from samsum_qlora.config import DataArgs, load_config
from samsum_qlora.errors import UserError

SOURCE_CACHE = CACHE.parent / "llama.cpp-source"
DIALOGUE = "Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I'll bring you tomorrow :-)"


@pytest.fixture(scope="session")
def llama_cpp_source() -> str:
    """llama.cpp's converter and gguf-py, taken from llama-cpp-python's sdist (pip download, once
    per machine, kept in the cache); skipped where PyPI cannot be reached."""
    import fcntl

    if os.environ.get(gguf_export.SOURCE_ENV):
        return os.environ[gguf_export.SOURCE_ENV]
    SOURCE_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(SOURCE_CACHE.with_name(SOURCE_CACHE.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (SOURCE_CACHE / gguf_export.CONVERTER).is_file():
            download = SOURCE_CACHE.with_name(SOURCE_CACHE.name + ".download")
            shutil.rmtree(download, ignore_errors=True)
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(download)]
            done = subprocess.run([*pip, gguf_export.LLAMA_CPP_PYTHON], capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                pytest.skip(f"llama-cpp-python's source could not be downloaded: {done.stderr.strip()[-200:]}")
            staging = SOURCE_CACHE.with_name(SOURCE_CACHE.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            with tarfile.open(next(download.glob("*.tar.gz"))) as sdist:
                wanted = re.compile(r"^[^/]+/vendor/llama\.cpp/(convert_hf_to_gguf\.py|conversion/|gguf-py/gguf/)")
                members = [m for m in sdist.getmembers() if wanted.match(m.name) and m.isfile()]
                for m in members:
                    m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
                sdist.extractall(staging, members=members, filter="data")
            staging.replace(SOURCE_CACHE)
            shutil.rmtree(download, ignore_errors=True)
    return str(SOURCE_CACHE)


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(out, **{"train.max_steps": 4, "train.save_steps": 100}))
    train.train_adapters(cfg)
    return out / "run" / "lora_adapters"


def fake_converter(tmp_path: Path) -> str:
    """A folder that looks like llama.cpp's source, for refusals that come before it runs."""
    (tmp_path / "llama.cpp").mkdir()
    (tmp_path / "llama.cpp" / gguf_export.CONVERTER).write_text("raise SystemExit('must not run')\n")
    return str(tmp_path / "llama.cpp")


def must_not_load(*args, **kwargs):
    raise AssertionError("loaded a model before refusing")


# --- the chat template and the Modelfile: pure, every family ---


@pytest.mark.parametrize("family", FAMILIES)
def test_template_default_instruction_renders_the_trained_prompt(family):
    """A conversation of the dialogue alone, through the GGUF's template, is the prompt training saw."""
    tok = build_tokenizer(family)
    fmt = chat.ChatFormat.build(tok, DataArgs())
    wrapped = gguf_export.with_default_instruction(tok.chat_template, fmt.instruction, system_role=fmt.system_role)
    alone = [{"role": "user", "content": DIALOGUE}]
    kwargs = {"tokenize": False, "add_generation_prompt": True, "date_string": fmt.date_string}
    assert tok.apply_chat_template(alone, chat_template=wrapped, **kwargs) == fmt.render(fmt.messages(DIALOGUE), True)
    # a conversation that brings its own system message is left as it is
    own = [{"role": "system", "content": "Be brief."}, *alone]
    if fmt.system_role:
        assert tok.apply_chat_template(own, chat_template=wrapped, **kwargs) == fmt.render(own, True)


@pytest.mark.parametrize("family", FAMILIES)
def test_ollama_template_with_its_system_and_prompt_is_the_trained_prompt(family):
    tok = build_tokenizer(family)
    fmt = chat.ChatFormat.build(tok, DataArgs())
    stand_ins = chat.build_messages(
        gguf_export.DIALOGUE_STAND_IN, gguf_export.SYSTEM_STAND_IN, system_role=fmt.system_role
    )
    rendered = fmt.render(stand_ins, True)
    for add_bos in (False, True):
        go = gguf_export.ollama_template(rendered, tok.bos_token, add_bos)
        filled = go.replace("{{ .System }}", fmt.instruction).replace("{{ .Prompt }}", DIALOGUE)
        prompt = fmt.render(fmt.messages(DIALOGUE), True)
        # llama.cpp writes BOS itself where the GGUF says so: the template must not write it again
        expected = prompt.removeprefix(tok.bos_token) if add_bos and tok.bos_token else prompt
        assert filled == expected and "\x00" not in go


def test_end_of_turn_must_be_one_llama_cpp_stops_at():
    meta = {"eos": 2, "eot": None}
    gguf_export.check_end_of_turn(meta, 2, "<|whatever|>")  # the file's EOS
    gguf_export.check_end_of_turn(meta, 7, "<|im_end|>")  # a text llama.cpp knows
    with pytest.raises(UserError, match=r"llama.cpp would not stop at this model's end of turn '<my_end>' \(id 7\)"):
        gguf_export.check_end_of_turn(meta, 7, "<my_end>")


# --- refusals, before any model is loaded ---


def test_no_converter_names_the_pip_command(tiny_adapters, tmp_path, monkeypatch):
    monkeypatch.delenv(gguf_export.SOURCE_ENV, raising=False)
    result = run_cli(["export", "--adapters", str(tiny_adapters), "--out", str(tmp_path / "x")])
    one_line_error(result, f"pip download --no-deps --no-binary :all: {gguf_export.LLAMA_CPP_PYTHON}")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["exists", "no-end-of-turn"])
def test_refused_before_loading(tiny_adapters, tmp_path, monkeypatch, case):
    monkeypatch.setattr(modeling, "load_model", must_not_load)
    out = tmp_path / "exported"
    args = ["export", "--adapters", str(tiny_adapters), "--out", str(out), "--llama-cpp", fake_converter(tmp_path)]
    if case == "exists":
        out.mkdir()
        (out / "model-f16.gguf").write_text("an earlier export")
        one_line_error(run_cli(args), f"--out {out} exists; choose a new folder")
        assert [p.name for p in out.iterdir()] == ["model-f16.gguf"]
        return
    base = tmp_path / "no-eot"  # a template that closes the assistant's turn with plain text
    shutil.copytree(TINY_MODEL, base)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (base / "chat_template.jinja").write_text(template + "{% if add_generation_prompt %}assistant: {% endif %}")
    one_line_error(run_cli([*args, "--set", f"model.name={base}"]), "closes the assistant's turn with no special token")
    assert not out.exists()


def test_adapters_of_another_base_are_refused(tiny_adapters, tmp_path, monkeypatch, smollm2):  # noqa: F811
    monkeypatch.setattr(modeling, "load_model", must_not_load)
    args = ["--adapters", str(tiny_adapters), "--out", str(tmp_path / "x"), "--llama-cpp", fake_converter(tmp_path)]
    result = run_cli(["export", *args, "--set", f"model.name={smollm2}"])
    one_line_error(result, f"were trained on {TINY_MODEL}")
    assert not (tmp_path / "x").exists()


# --- llama.cpp's converter on the embedded tiny model: its tokenizer is one llama.cpp does not know ---


@pytest.mark.slow
def test_tiny_tokenizer_is_refused_in_one_line_before_merging(tiny_adapters, tmp_path, llama_cpp_source, monkeypatch):
    monkeypatch.setattr(modeling, "load_model", must_not_load)
    args = ["export", "--adapters", str(tiny_adapters), "--out", str(tmp_path / "x"), "--llama-cpp", llama_cpp_source]
    one_line_error(run_cli(args), "llama.cpp does not know this model's tokenizer")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_unsupported_architecture_is_refused(tiny_adapters, tmp_path, llama_cpp_source):
    base = tmp_path / "odd"
    shutil.copytree(TINY_MODEL, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"architectures": ["OddForCausalLM"]}))
    args = ["--adapters", str(tiny_adapters), "--out", str(tmp_path / "x"), "--llama-cpp", llama_cpp_source]
    one_line_error(
        run_cli(["export", *args, "--set", f"model.name={base}"]),
        "llama.cpp cannot convert this model: its architecture OddForCausalLM is not one it supports",
    )
    assert not (tmp_path / "x").exists()


def test_no_room_for_the_ggufs_leaves_nothing(tiny_adapters, tmp_path, monkeypatch):
    """The merge runs, then the GGUFs' room is checked against the merged weights' size."""
    from collections import namedtuple

    monkeypatch.setattr(gguf_export, "check_converts", lambda *a: None)  # the tiny tokenizer would be refused
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match=r"no room for the GGUFs in .*: they need about .*, 0.0 MiB is free"):
        export.export_gguf(
            tiny_adapters, tmp_path / "x", merge=merge.merge_adapters, llama_cpp=fake_converter(tmp_path)
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.cpp"]


# --- the card: in every merged folder, its scores those of the newest eval of these adapters ---


def test_merged_folder_card_reports_the_newest_eval_of_these_adapters(tiny_adapters, tmp_path):
    run = tiny_adapters.parent
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(run.parent))
    metrics = evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, adapters=str(tiny_adapters), limit=6))
    base_metrics = evaluate.evaluate_model(cfg, evaluate.plan_eval(cfg, base_only=True, limit=4))
    assert base_metrics["rouge1"] != metrics["rouge1"]  # so picking the base's eval would show

    merge.merge_adapters(tiny_adapters, tmp_path / "merged")
    text = (tmp_path / "merged" / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["library_name"] == "transformers" and header["datasets"] == ["knkarthick/samsum"]
    assert header["license"] == "other" and "base_model" not in header  # a local base: no Hub id, no card
    result = header["model-index"][0]["results"][0]
    assert result["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {
        k: round(100 * metrics[k], 2) for k in ("rouge1", "rouge2", "rougeL")
    }
    assert f"On {metrics['n_examples']} SAMSum test dialogues" in text
    assert f"| {100 * metrics['rouge1']:.2f} [" in text and "| lora.lora_r | `8` |" in text
    assert "hf upload YOUR_NAME/samsum-tiny-llama ." in text


# --- SmolLM2's real weights, through llama.cpp's converter, read back by gguf and by transformers ---


@pytest.fixture(scope="module")
def smollm2_export(smollm2, llama_cpp_source, tmp_path_factory):  # noqa: F811
    """SmolLM2 with adapters that move its logits, exported at every outtype."""
    from test_modeling import with_adapters

    folder = tmp_path_factory.mktemp("smollm2-export")
    cfg = load_config(None, {"model.name": str(smollm2), "quantization.load_in_4bit": False})
    torch.manual_seed(0)  # before peft draws lora_A: the same adapters in every process
    model = with_adapters(cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # peft starts B at zero: no effect to carry
    model.save_pretrained(folder / "adapters")
    out = folder / "exported"
    info = export.export_gguf(
        folder / "adapters",
        out,
        merge=merge.merge_adapters,
        outtypes=["f16", "q8_0", "f32", "bf16"],
        llama_cpp=llama_cpp_source,
        cfg=cfg,
    )
    return cfg, folder / "adapters", out, info


@pytest.mark.slow
def test_smollm2_gguf_reads_back_with_its_chat_rules(smollm2_export):
    from transformers import AutoTokenizer

    cfg, _, out, info = smollm2_export
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "README.md",
        "merge.json",
        "model-bf16.gguf",
        "model-f16.gguf",
        "model-f32.gguf",
        "model-q8_0.gguf",
    ]
    assert info["gguf"]["model-q8_0.gguf"] < 0.6 * info["gguf"]["model-f16.gguf"]
    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    fmt = modeling.chat_format(cfg)
    meta = gguf_export.read_back(out / "model-f16.gguf")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["architecture"] == "llama" and meta["eos"] == im_end == fmt.end_of_turn
    assert meta["tokens"] == tok.convert_ids_to_tokens(list(range(len(meta["tokens"]))))
    assert len(meta["tokens"]) == len(tok)
    assert meta["chat_template"] == gguf_export.with_default_instruction(
        tok.chat_template, fmt.instruction, system_role=True
    )


@pytest.mark.slow
def test_transformers_loads_the_gguf_with_logits_of_the_merged_model(smollm2_export):
    """transformers' GGUF loader (dequantising to float32) against base + adapters, unmerged, in
    float32: the f16 file is as close as f16 rounding allows, and far closer than the base alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, adapters, out, _ = smollm2_export
    fmt = modeling.chat_format(cfg)
    ids = torch.tensor([fmt.prompt(DIALOGUE)])

    def logits(model):
        with torch.inference_mode():
            return model.eval()(input_ids=ids).logits.float()

    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
    base_logits = logits(base)
    unmerged = logits(PeftModel.from_pretrained(base, str(adapters)))
    from_gguf = logits(AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32))
    effect = (unmerged - base_logits).abs().max().item()
    off = (from_gguf - unmerged).abs().max().item()
    assert effect > 1.0 and off < 0.05 * effect, (effect, off)
    assert torch.equal(from_gguf.argmax(-1), unmerged.argmax(-1))


@pytest.mark.slow
def test_smollm2_modelfile_and_card(smollm2_export):
    cfg, _, out, _ = smollm2_export
    text = (out / "Modelfile").read_text()
    assert text.splitlines()[0] == "FROM ./model-f16.gguf"
    assert re.findall(r"^PARAMETER stop (.*)$", text, flags=re.M) == ['"<|im_end|>"']
    assert f'SYSTEM """{cfg.data.task_instruction}"""' in text
    assert f"PARAMETER num_predict {cfg.eval.max_new_tokens}\n" in text and "PARAMETER top_k 1\n" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, flags=re.S).group(1)
    fmt = modeling.chat_format(cfg)
    filled = template.replace("{{ .System }}", fmt.instruction).replace("{{ .Prompt }}", DIALOGUE)
    assert filled == fmt.render(fmt.messages(DIALOGUE), True)  # SmolLM2's GGUF adds no BOS of its own
    card = (out / "README.md").read_text()
    assert "llama-cli -m model-f16.gguf" in card and "ollama create samsum-summariser -f Modelfile" in card
    assert "No evaluation of these adapters was found" in card


# --- the proof: llama.cpp itself summarises as the merged model does (needs llama-cpp-python) ---

PROOF_ROWS = 50


@pytest.fixture(scope="module")
def llama_cpp():
    """Skips before the expensive fixtures: building llama.cpp on install takes ~22 min on 2 cores."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


@pytest.fixture(scope="module")
def merged_predictions(smollm2_export, tmp_path_factory):
    """The merged Hugging Face model's greedy summaries of the first test dialogues, in float32,
    by eval's own path."""
    from conftest import REFERENCE

    cfg, adapters, _, _ = smollm2_export
    folder = tmp_path_factory.mktemp("proof")
    merge.merge_adapters(adapters, folder / "merged", cfg=cfg, dtype="float32")
    overrides = {
        "model.name": str(folder / "merged"),
        "data.source": str(REFERENCE / "samsum"),
        "quantization.load_in_4bit": False,
        "quantization.bnb_4bit_compute_dtype": "float32",
        "eval.max_new_tokens": 64,
    }
    merged_cfg = load_config(None, overrides)
    plan = evaluate.plan_eval(merged_cfg, base_only=True, limit=PROOF_ROWS, output_dir=str(folder / "eval"))
    evaluate.evaluate_model(merged_cfg, plan)
    return merged_cfg, [json.loads(line) for line in (folder / "eval" / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "outtype",
    [
        "f32",
        "f16",
        "bf16",
        # Not met on 50 rows: ROUGE-1 1.00-1.38 off with these random adapters, 0.34 with trained ones, which
        # are 0.59 off on 200 rows and 0.09 on 400, 95% of resamples within -0.53..0.68 there
        # (docs/gguf-proof.py): 0.3 is inside the rows' own spread, and 400 rows take ~25 min here.
        pytest.param(
            "q8_0",
            marks=pytest.mark.xfail(strict=True, reason="q8_0 is over 0.3 ROUGE-1 off on these 50 rows (1.00-1.38)"),
        ),
    ],
)
def test_llama_cpp_summarises_as_the_merged_model(llama_cpp, smollm2_export, merged_predictions, outtype):
    """f32: token for token. f16/bf16: llama.cpp's CPU matmuls round the activations to the weights'
    type too, which no float32 reference does: the summaries agree where greedy choices are not near
    ties. q8_0: ROUGE-1 within 0.3 of the merged model's on the same rows."""
    from samsum_qlora.metrics import rouge

    _, _, out, _ = smollm2_export
    merged_cfg, records = merged_predictions
    fmt = modeling.chat_format(merged_cfg)
    ours = [r["prediction"] for r in records]
    theirs = gguf_export.llama_cpp_summaries(out / f"model-{outtype}.gguf", fmt, [r["dialogue"] for r in records], 64)
    same = sum(a == b for a, b in zip(ours, theirs))
    references = [r["reference"] for r in records]
    r1_ours, r1_theirs = (100 * rouge(texts, references)["rouge1"] for texts in (ours, theirs))
    print(f"{outtype}: {same} of {len(ours)} summaries identical; ROUGE-1 {r1_theirs:.2f} against {r1_ours:.2f}")
    assert len(ours) == PROOF_ROWS
    # These random adapters ramble to the token limit, so one differing summary moves ROUGE-1 by ~0.5:
    # token identity is the steadier measure. Measured here: f32 49-50, f16 47-49, bf16 37-44 of 50
    # (float32 sums taken in llama.cpp's order flip a rare near tie even at f32).
    if outtype in ("f32", "f16"):  # f16: 11 bits of mantissa
        assert same >= 0.9 * len(ours)
    elif outtype == "bf16":  # 8 bits: more near-tie choices move
        assert same >= 0.7 * len(ours)
    else:
        assert abs(r1_theirs - r1_ours) <= 0.3
