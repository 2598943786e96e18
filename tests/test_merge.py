"""Merging trained tiny adapters: the saved model computes what base + adapters computed."""

import json
import re

import pytest
import torch
from conftest import SMOKE_CONFIG, TINY_MODEL, fill, set_args, smoke_overrides
from test_cli import one_line_error, run_cli

from samsum_qlora.commands import merge, train
from samsum_qlora.config import load_config
from samsum_qlora.errors import UserError

INPUT = torch.tensor([[0, 17, 230, 5, 999, 64, 12, 801, 3, 77, 402, 9]])  # any ids: not the module's probe


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge")
    train.train_adapters(
        load_config(SMOKE_CONFIG, smoke_overrides(out, **{"train.max_steps": 4, "train.save_steps": 100}))
    )
    return out / "run" / "lora_adapters"


def logits_of(model):
    with torch.inference_mode():
        return model(input_ids=INPUT).logits.float()


def test_merged_model_computes_base_plus_adapters(adapters, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    info = merge.merge_adapters(adapters, out)  # no config: the base comes from adapter_config.json
    assert info["base_model"] == str(TINY_MODEL) and info["stored_dtype"] == "float32"  # the tiny base's own
    assert info["max_abs_diff"] <= info["tolerance"] == 1e-3 and info["storage_rounding_max_abs"] is None

    # independently of merge.py: fresh base + adapters (unmerged) vs the folder it wrote
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    base_logits = logits_of(base)
    unmerged = logits_of(PeftModel.from_pretrained(base, str(adapters)).eval())
    merged_model = AutoModelForCausalLM.from_pretrained(out).eval()
    merged = logits_of(merged_model)
    assert (unmerged - base_logits).abs().max() > 0.1  # the adapters matter, so this test can fail
    assert (merged - unmerged).abs().max() <= 1e-3
    assert type(merged_model).__name__ == "LlamaForCausalLM" and merged_model.dtype == torch.float32

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "lora_" in k]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "merge.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "merge.json").read_text())["adapters"] == str(adapters)
    assert not list(tmp_path.glob(".*"))  # no staging folder or lock left behind
    # safetensors writes its files 0600; the merged model and the adapters are for people, like every result
    for weights in (out / "model.safetensors", adapters / "adapter_model.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~files_umask()


def test_cli_with_config_states_diff_and_tolerance(adapters, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()  # an empty folder is fine
    args = set_args(smoke_overrides(tmp_path))
    result = run_cli(["merge", *args, "--adapters", str(adapters), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "max |merged - (base + adapters)| over" in result.output
    assert "(tolerance 1e-03, float32)" in result.output and (out / "model.safetensors").is_file()
    one_line_error(run_cli(["merge", "--adapters", str(adapters), "--out", str(out)]), "exists and is not empty")


def test_bf16_storage_is_merged_in_float32_then_rounded(adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    info = merge.merge_adapters(adapters, tmp_path / "merged", dtype="bfloat16")
    assert info["merged_in"] == "float32" and info["max_abs_diff"] <= 1e-3  # the check is the float32 one
    assert info["stored_dtype"] == "bfloat16" and info["storage_rounding_max_abs"] > 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16


def test_out_of_tolerance_writes_nothing(adapters, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "MAX_ABS_DIFF", -1.0)  # no merge can pass this
    with pytest.raises(UserError, match=r"differs from base \+ adapters by .* nothing written"):
        merge.merge_adapters(adapters, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "is not a folder"),
        ("no-config", "holds no LoRA adapters (no adapter_config.json)"),
        ("no-base", "names no base_model_name_or_path"),
        ("relative-base", "the adapters' base samsum_qlora/assets/tiny-llama is not here"),
    ],
)
def test_bad_adapters(tmp_path, monkeypatch, case, needle):
    folder = tmp_path / "adapters"
    if case != "missing":
        folder.mkdir()
    if case == "no-base":
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    if case == "relative-base":  # trained from the repo root, merged from elsewhere
        (folder / "adapter_config.json").write_text('{"base_model_name_or_path": "samsum_qlora/assets/tiny-llama"}')
        monkeypatch.chdir(tmp_path)
    one_line_error(run_cli(["merge", "--adapters", str(folder), "--out", str(tmp_path / "m")]), needle)
    assert not (tmp_path / "m").exists()


def test_stored_dtype_defaults_to_the_checkpoints_own():
    from types import SimpleNamespace

    assert merge.stored_dtype(SimpleNamespace(dtype=torch.bfloat16), None) == "bfloat16"  # Llama 3.2's
    assert merge.stored_dtype(SimpleNamespace(dtype="float32"), None) == "float32"
    assert merge.stored_dtype(SimpleNamespace(dtype=torch.float16), None) == "float16"
    assert merge.stored_dtype(SimpleNamespace(dtype=None), None) == "bfloat16"  # none recorded
    assert merge.stored_dtype(SimpleNamespace(), "float32") == "float32"


def files_umask() -> int:
    from samsum_qlora import files

    return files._UMASK


def must_not_load(*args, **kwargs):
    raise AssertionError("loaded a model before refusing")


def test_a_second_merge_into_the_same_out_is_refused_with_the_holders_pid(adapters, tmp_path, monkeypatch):
    import os

    from samsum_qlora import files, layout, modeling

    out = tmp_path / "merged"
    monkeypatch.setattr(modeling, "load_model", must_not_load)
    with files.hold(layout.merge_lock(out), "merge"):  # as a merge in another process holds it
        held = rf"^{re.escape(str(out))} is in use by another samsum-qlora merge \(pid {os.getpid()}\)"
        with pytest.raises(UserError, match=held):  # --out, not the folder it is in
            merge.merge_adapters(adapters, out)
    assert list(tmp_path.iterdir()) == []  # neither --out, nor a staging folder, nor the lock


@pytest.mark.parametrize(
    "case, needle",
    [
        ("file", "is a file, not a folder; choose a new folder"),
        ("under-a-file", "/blocker is a file, not a folder"),
    ],
)
def test_an_out_that_cannot_be_written_is_refused_before_loading(adapters, tmp_path, monkeypatch, case, needle):
    from samsum_qlora import modeling

    (tmp_path / "blocker").write_text("")
    out = tmp_path / "blocker" if case == "file" else tmp_path / "blocker" / "merged"
    monkeypatch.setattr(modeling, "load_model", must_not_load)
    one_line_error(run_cli(["merge", "--adapters", str(adapters), "--out", str(out)]), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_a_base_with_a_smaller_vocabulary_is_refused_before_its_logits(tmp_path):
    """The check eval makes: the tokenizer's ids must fit the model's embedding (an IndexError before)."""
    import shutil

    from test_modeling import with_adapters
    from transformers import AutoConfig, AutoModelForCausalLM

    small = tmp_path / "small"
    shutil.copytree(TINY_MODEL, small)
    config = AutoConfig.from_pretrained(small)
    config.vocab_size = 300
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"model.name": str(small)}))
    adapters = tmp_path / "adapters"  # no run.json beside them: nothing says which base they were made on
    with_adapters(cfg).save_pretrained(adapters)
    with pytest.raises(UserError, match="the tokenizer has 1,0.. tokens but the model embeds only 300"):
        merge.merge_adapters(adapters, tmp_path / "merged", cfg=cfg)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("disk_full", ["tmpfs", "injected"])
def test_merge_on_a_full_disk_is_one_line_and_leaves_nothing(adapters, tmp_path, request, monkeypatch, disk_full):
    """safetensors reports a full disk with an error class of its own."""
    if disk_full == "tmpfs":
        disk = request.getfixturevalue("small_disk")
        fill(disk)
    else:
        import transformers.modeling_utils
        from safetensors import SafetensorError

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        disk = tmp_path
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    result = run_cli(["merge", "--adapters", str(adapters), "--out", str(disk / "merged")])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: no space left on the device of {disk} while saving the merged model; free some space")
    )
    assert sorted(p.name for p in disk.iterdir()) == (["filler"] if disk_full == "tmpfs" else [])
