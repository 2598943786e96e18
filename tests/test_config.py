import dataclasses
import re
from pathlib import Path

import pytest

from samsum_qlora.config import Config, load_config, parse_overrides
from samsum_qlora.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_shipped_llama_config_equals_the_builtin_defaults():
    # `samsum-qlora train` without --config must train exactly the documented recipe.
    assert load_config(ROOT / "configs" / "llama32-1b-samsum.yaml") == Config()


def test_shipped_recipe_is_written_from_the_dataclasses_comments():
    """One description per key: the recipe's comments are config.py's (regenerate with
    `samsum-qlora config > body`), and `config` prints a config that loads back to itself."""
    from samsum_qlora.config import TrainArgs, annotated_yaml, field_comments

    text = (ROOT / "configs" / "llama32-1b-samsum.yaml").read_text()
    assert text.endswith(annotated_yaml(Config()))
    assert field_comments(TrainArgs)["save_steps"] == ["checkpoint interval: how much a preemption can cost"]
    assert len(field_comments(TrainArgs)["max_tokens_per_batch"]) == 3  # a paragraph above the key


@pytest.mark.parametrize("name", ["llama32-1b-samsum.yaml", "smollm2-cpu-demo.yaml"])
def test_generated_configs_are_their_header_and_annotated_yaml(name):
    """These shipped configs are a header (the command, what it is for, what was measured) and
    `annotated_yaml` of the config they load to: every comment below the header is config.py's."""
    from samsum_qlora.config import annotated_yaml

    path = ROOT / "configs" / name
    assert path.read_text().endswith("\n\n" + annotated_yaml(load_config(path)))


def test_config_command_prints_the_resolved_config(tmp_path):
    from click.testing import CliRunner

    from samsum_qlora.commands.cli import main

    result = CliRunner().invoke(main, ["config", "--set", "lora.lora_r=16", "--set", "train.max_steps=7"])
    assert result.exit_code == 0 and "  lora_r: 16  # adapter rank" in result.output
    (tmp_path / "c.yaml").write_text(result.output)
    assert load_config(tmp_path / "c.yaml") == load_config(None, {"lora.lora_r": 16, "train.max_steps": 7})


def test_defaults_learn_what_the_tutorial_learns():
    cfg = Config()
    assert cfg.model.name == "meta-llama/Llama-3.2-1B-Instruct"
    assert (cfg.quantization.bnb_4bit_quant_type, cfg.quantization.bnb_4bit_use_double_quant) == ("nf4", True)
    assert cfg.quantization.bnb_4bit_compute_dtype == "bfloat16"
    assert (cfg.lora.lora_r, cfg.lora.lora_alpha) == (8, 16)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.train.learning_rate == 2e-4 and cfg.train.bf16
    assert cfg.train.output_dir == "outputs/lora_samsum"
    # token-budget batches: ~18 SAMSum rows (~210 tokens each) per optimizer step, the seed's 16 or so
    assert cfg.train.max_tokens_per_batch * cfg.train.gradient_accumulation_steps == 4096


def test_tutorial_recipe_overrides_give_its_exact_settings():
    from samsum_qlora.config import TUTORIAL_RECIPE, with_overrides

    seed = with_overrides(Config(), TUTORIAL_RECIPE)
    assert (seed.train.per_device_train_batch_size, seed.train.gradient_accumulation_steps) == (4, 4)
    assert seed.train.max_tokens_per_batch is None and seed.train.gradient_checkpointing
    assert seed.train.optim == "paged_adamw_8bit" and not seed.train.trained_logits_only
    assert not seed.quantization.dequantize_once


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert path.read_text().startswith("# samsum-qlora ")


def test_precedence_set_beats_yaml_beats_defaults(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  learning_rate: 0.001\n  max_steps: 50\n")
    cfg = load_config(yaml_file, parse_overrides(["train.max_steps=7"]))
    assert cfg.train.max_steps == 7  # --set wins
    assert cfg.train.learning_rate == 0.001  # YAML beats the default
    assert cfg.train.seed == 42  # default where neither speaks


def test_false_and_zero_overrides_are_kept():
    cfg = load_config(None, parse_overrides(["train.bf16=false", "train.weight_decay=0", "lora.lora_dropout=0"]))
    assert cfg.train.bf16 is False and cfg.train.weight_decay == 0.0 and cfg.lora.lora_dropout == 0.0


def test_list_override_from_comma_string():
    cfg = load_config(None, parse_overrides(["lora.target_modules=q_proj,v_proj"]))
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_it_and_suggests_the_nearest():
    with pytest.raises(UserError, match=r"unknown config key 'train.learnig_rate'; did you mean 'train.learning_rate'"):
        load_config(None, {"train.learnig_rate": 1e-4})


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  lora_rank: 16\n")
    with pytest.raises(UserError, match=r"'lora.lora_rank'; did you mean 'lora.lora_r'"):
        load_config(bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=abc", "train.learning_rate must be a number, got 'abc'"),
        ("train.max_steps=1.5", "train.max_steps must be a whole number"),
        ("train.bf16=maybe", "train.bf16 must be true or false"),
        ("quantization.bnb_4bit_quant_type=int3", "must be nf4 or fp4"),
        ("noequals", "--set expects KEY=VALUE"),
    ],
)
def test_bad_values_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, parse_overrides([override]))


def test_contradiction_fails_with_the_fix():
    with pytest.raises(UserError, match="pick one"):
        load_config(None, {"train.fp16": True})  # bf16 is on by default


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_flat_tutorial_config_loads(tmp_path):
    flat = tmp_path / "config.yaml"
    flat.write_text(
        "model_name: my/model\nload_in_4bit: true\nbnb_4bit_quant_type: fp4\nlora_r: 16\nlora_alpha: 32\n"
        "target_modules: [q_proj, v_proj]\nlearning_rate: 0.0001\noutput_dir: out/x\nper_device_train_batch_size: 2\n"
    )
    cfg = load_config(flat)
    assert cfg.model.name == "my/model"
    assert cfg.quantization.bnb_4bit_quant_type == "fp4"
    assert (cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (16, 32, ["q_proj", "v_proj"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.output_dir == "out/x"
    assert cfg.train.per_device_train_batch_size == 2


def test_required_dotted_keys_exist():
    cfg = Config()
    for dotted in ("model.name", "data.source", "data.max_length", "train.output_dir", "train.max_steps"):
        section, name = dotted.split(".")
        assert name in {f.name for f in dataclasses.fields(getattr(cfg, section))}


@pytest.mark.parametrize(
    "override, key, literal",
    [
        ("data.revision=0777123", "data", "0777123"),  # YAML: the octal number 261715
        ("train.run_name=0x10", "train", "0x10"),  # YAML: 16
        (
            "data.task_instruction=Summarize in 1-2 sentences #no bullets",
            "data",
            "Summarize in 1-2 sentences #no bullets",
        ),
        ("train.run_name=Yes", "train", "Yes"),  # YAML: True
        ("train.output_dir=out/a\nb", "train", "out/a\nb"),  # YAML folds the newline into a space
        ("data.task_instruction=Summary: one sentence", "data", "Summary: one sentence"),  # YAML: a mapping
        ("data.revision=1.10", "data", "1.10"),  # YAML: the number 1.1
    ],
)
def test_set_gives_a_string_key_the_text_as_typed(override, key, literal):
    name = override.partition("=")[0].split(".")[1]
    assert getattr(getattr(load_config(None, parse_overrides([override])), key), name) == literal


@pytest.mark.parametrize(
    "line, key, literal",
    [  # what YAML makes of each, unquoted: 261715, 31, 90, True, a date, 1.1
        ("data:\n  revision: 0777123", "data.revision", "0777123"),
        ("model:\n  revision: 0x1F", "model.revision", "0x1F"),
        ("train:\n  run_name: 1:30", "train.run_name", "1:30"),
        ("train:\n  run_name: yes", "train.run_name", "yes"),
        ("data:\n  date_string: 2024-07-26", "data.date_string", "2024-07-26"),
        ("data:\n  revision: 1.10", "data.revision", "1.10"),
        ("lora:\n  target_modules: [q_proj, 010]", "lora.target_modules", ["q_proj", "010"]),
    ],
)
def test_a_config_file_gives_a_string_key_its_text_as_written(tmp_path, line, key, literal):
    (tmp_path / "c.yaml").write_text(line + "\n")
    section, name = key.split(".")
    assert getattr(getattr(load_config(tmp_path / "c.yaml"), section), name) == literal


@pytest.mark.parametrize(
    "value, expected",
    [("12", 12), ("010", 10), ("1e3", 1000), ("+7", 7), ("1.25e1", None), ("9.9e0", None), ("0x10", None)],
)
def test_a_whole_number_key_takes_a_whole_decimal_number_or_refuses(tmp_path, value, expected):
    (tmp_path / "c.yaml").write_text(f"eval:\n  batch_size: {value}\n")
    for load in (
        lambda: load_config(None, parse_overrides([f"eval.batch_size={value}"])),
        lambda: load_config(tmp_path / "c.yaml"),
    ):
        if expected is None:  # YAML and int(float(...)) made 12, 9, 16 of these
            with pytest.raises(UserError, match=f"eval.batch_size must be a whole number, got '{re.escape(value)}'"):
                load()
        else:
            assert load().eval.batch_size == expected


def test_a_config_file_still_reads_numbers_and_booleans(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "train:\n  learning_rate: 1.0e-4\n  bf16: no\n  max_steps: 30\n  warmup_steps: 5\n"
    )
    t = load_config(tmp_path / "c.yaml").train
    assert (t.learning_rate, t.bf16, t.max_steps, t.warmup_steps) == (1e-4, False, 30, 5.0)


def test_set_still_reads_other_types_as_yaml_and_null_unsets():
    cfg = load_config(
        None,
        parse_overrides(
            ["lora.target_modules=[q_proj, v_proj]", "train.max_tokens_per_batch=null", "data.revision=null"]
            + ["train.learning_rate=1e-4", "train.bf16=Yes", "eval.limit=~"]
        ),
    )
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.train.max_tokens_per_batch is None
    assert cfg.data.revision is None and cfg.eval.limit is None
    assert cfg.train.learning_rate == 1e-4 and cfg.train.bf16 is True


@pytest.mark.parametrize(
    "text, expected",
    [
        ("eval:\n  # batch_size: 8\nlora:\n  lora_r: 4\n", None),  # every key commented out: the defaults
        ("eval: [batch_size, 8]\n", "config section 'eval' must be a mapping of keys, got list"),
        ("train:\n  seed: 1\n  learning_rate: 0.1\n  seed: 2\n", "line 4: 'seed' is given twice"),
        ("train:\n  seed: 1\nlora: {}\ntrain:\n  seed: 2\n", "line 4: 'train' is given twice"),
    ],
)
def test_sections_empty_listed_or_repeated(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    if expected is None:
        cfg = load_config(path)
        assert cfg.eval == Config().eval and cfg.lora.lora_r == 4
    else:
        with pytest.raises(UserError, match=re.escape(expected)):
            load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.num_train_epochs=0", "train.num_train_epochs must be more than 0, got 0.0"),  # smoke's max_steps=40
        ("train.max_steps=0", "train.max_steps=0 trains nothing"),
        ("train.seed=-5", "train.seed must be in 0 .. 4294967295"),
        ("train.seed=99999999999", "train.seed must be in 0 .. 4294967295"),
        ("train.dataloader_num_workers=-1", "train.dataloader_num_workers must be >= 0"),
        ("model.name=" + "a" * 300, "model.name has a part of 300 bytes: too long"),
        ("data.source=/tmp/" + "d" * 256, "data.source has a part of 256 bytes: too long"),
        ("model.attn_implementation=foo/bar", "'foo/bar' is a Hub kernel, which needs the kernels package"),
    ],
)
def test_values_that_trained_nothing_or_failed_late_are_refused(override, message, monkeypatch):
    from conftest import SMOKE_CONFIG
    from transformers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_kernels_available", lambda: False)  # as on this machine
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(SMOKE_CONFIG, parse_overrides([override]))


def test_decoding_defaults_are_greedy_as_in_transformers():
    from transformers import GenerationConfig

    from samsum_qlora.config import DECODING_KEYS

    e, hf = Config().eval, GenerationConfig()._get_default_generation_params()
    assert {k: v for k, v in e.decoding().items() if k != "seed"} == {k: hf[k] for k in DECODING_KEYS if k != "seed"}
    assert load_config(None, {"eval.num_beams": 4, "eval.length_penalty": 0.8}).eval.decoding()["num_beams"] == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval.num_beams": 0}, "eval.num_beams must be at least 1"),
        ({"eval.length_penalty": 2.0}, r"acts only in beam search: set eval.num_beams > 1"),
        ({"eval.no_repeat_ngram_size": -1}, "eval.no_repeat_ngram_size must be >= 0"),
        ({"eval.repetition_penalty": 0}, r"eval.repetition_penalty must be in \[0.01, 100.0\]"),
        # these passed the checks, then sampling failed on inf/nan logits after the model loaded
        ({"eval.do_sample": True, "eval.repetition_penalty": 1e-300}, r"eval.repetition_penalty must be in \["),
        ({"eval.do_sample": True, "eval.repetition_penalty": 1e300}, r"eval.repetition_penalty must be in \["),
        ({"eval.do_sample": True, "eval.temperature": 1e-40}, r"eval.temperature=1e-40 is below 0.001"),
        ({"eval.do_sample": True, "eval.temperature": 0}, "for greedy decoding set eval.do_sample=false"),
        ({"eval.do_sample": True, "eval.top_p": 1.5}, r"eval.top_p must be in \(0, 1\]"),
        ({"eval.temperature": 0.7}, "acts only when sampling: set eval.do_sample=true"),
        ({"eval.top_p": 0.9}, "eval.top_p=0.9 acts only when sampling"),
        ({"eval.seed": -1}, "eval.seed must be >= 0"),
    ],
)
def test_bad_decoding_settings_fail_with_the_fix(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)
