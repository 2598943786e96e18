"""The chat rules, read from each model's own template: the loss mask, truncation, BOS, stop and
pad ids, for the shipped tiny Llama 3, six chat-model families, and the real Llama 3 tokenizer."""

import pytest
from chat_families import FAMILIES, MISTRAL_V02_ORIGINAL_TEMPLATE, SPECS, build_tokenizer
from conftest import REFERENCE

from samsum_qlora import batching, chat, data
from samsum_qlora.config import DataArgs
from samsum_qlora.errors import UserError

DIALOGUE = "Ana: are we still on for lunch?\r\nBo: yes, 12:30 at the usual place\r\nAna: great, see you"
SUMMARY = "Ana and Bo will have lunch at 12:30 at their usual place. "


def fmt_for(tokenizer, **data_args) -> chat.ChatFormat:
    return chat.ChatFormat.build(tokenizer, DataArgs(**{"max_length": 512, **data_args}))


def trained(enc):
    return [t for t, label in zip(enc.input_ids, enc.labels) if label != chat.IGNORE_INDEX]


# --- the shipped tiny Llama 3 -------------------------------------------------------------------


def test_trained_tokens_are_exactly_summary_plus_end_of_turn(tokenizer):
    enc = fmt_for(tokenizer).encode(DIALOGUE, SUMMARY)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    expected = tokenizer(SUMMARY.strip(), add_special_tokens=False)["input_ids"] + [eot]
    assert trained(enc) == expected
    # and the trained span is one contiguous tail: nothing of the prompt leaks in
    first = next(i for i, label in enumerate(enc.labels) if label != chat.IGNORE_INDEX)
    assert all(label == chat.IGNORE_INDEX for label in enc.labels[:first])
    assert enc.labels[first:] == enc.input_ids[first:]


def test_prompt_tokens_equal_generation_prompt(tokenizer):
    fmt = fmt_for(tokenizer)
    enc = fmt.encode(DIALOGUE, SUMMARY)
    n_prompt = sum(label == chat.IGNORE_INDEX for label in enc.labels)
    assert enc.input_ids[:n_prompt] == fmt.prompt(DIALOGUE)  # eval sees exactly what training conditioned on


def test_exactly_one_bos(tokenizer):
    enc = fmt_for(tokenizer).encode(DIALOGUE, SUMMARY)
    bos = tokenizer.bos_token_id
    assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 1


def test_date_is_pinned_not_today(tokenizer):
    enc = fmt_for(tokenizer, date_string="01 Jan 2030").encode(DIALOGUE, SUMMARY)
    assert "Today Date: 01 Jan 2030" in tokenizer.decode(enc.input_ids)
    assert (
        fmt_for(tokenizer).encode(DIALOGUE, SUMMARY).input_ids == fmt_for(tokenizer).encode(DIALOGUE, SUMMARY).input_ids
    )


def test_crlf_normalised(tokenizer):
    text = tokenizer.decode(fmt_for(tokenizer).encode(DIALOGUE, SUMMARY).input_ids)
    assert "\r" not in text and "Bo: yes, 12:30 at the usual place\nAna: great" in text


def test_truncation_shortens_dialogue_never_summary(tokenizer):
    long_dialogue = "\n".join(f"Ana: message number {i} about the weekend plans" for i in range(200))
    full = fmt_for(tokenizer, max_length=100_000).encode(long_dialogue, SUMMARY)
    enc = fmt_for(tokenizer, max_length=250).encode(long_dialogue, SUMMARY)
    assert len(full.input_ids) > 250
    assert len(enc.input_ids) <= 250 and enc.truncated
    assert trained(enc) == trained(full)  # the whole summary + <|eot_id|> survives
    assert "message number 0 " in tokenizer.decode(enc.input_ids)  # the start of the dialogue is kept


def test_row_whose_summary_cannot_fit_is_dropped(tokenizer):
    assert fmt_for(tokenizer, max_length=64).encode(DIALOGUE, "word " * 300) is None


def test_empty_rows_are_skipped_and_counted(tokenizer):
    rows = [
        {"id": "1", "dialogue": DIALOGUE, "summary": SUMMARY},
        {"id": "2", "dialogue": "  ", "summary": SUMMARY},
        {"id": "3", "dialogue": DIALOGUE, "summary": ""},
        {"id": "4", "dialogue": DIALOGUE, "summary": "word " * 300},
    ]
    columns, stats = fmt_for(tokenizer, max_length=200).encode_rows(rows, progress=False)
    assert columns["id"] == ["1"]
    assert (stats.kept, stats.skipped_empty, stats.dropped_too_long) == (1, 2, 1)


def test_special_token_text_in_a_dialogue_is_not_a_special_token(tokenizer):
    fmt = fmt_for(tokenizer)
    enc = fmt.encode("Ana: type <|eot_id|> here\nBo: <|begin_of_text|>ok", SUMMARY)
    eot, bos = (tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|begin_of_text|>"))
    assert enc.input_ids.count(bos) == 1 and enc.input_ids.count(eot) == 3  # system, user, and the summary's


def test_llama3_stop_and_pad_ids(tokenizer):
    fmt = fmt_for(tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert fmt.end_of_turn == eot and fmt.stop_ids[0] == eot and fmt.system_role
    assert fmt.pad_id == tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>")


def test_pad_is_told_by_position_not_by_id():
    """PAD == EOS == end of turn (SmolLM2): padding must not hide the trained end-of-turn label."""
    eot = 7
    ids, mask = batching.pad([[1, 2, eot], [1, eot]], eot)
    labels, _ = batching.pad([[-100, 2, eot], [-100, eot]], chat.IGNORE_INDEX)
    assert ids.tolist() == [[1, 2, eot], [1, eot, eot]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[-100, 2, eot], [-100, eot, -100]]  # the real eot is trained, the pad is not
    left, left_mask = batching.pad([[1, 2, 3], [4]], 0, left=True, multiple=4)
    assert left.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]] and left_mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_decode_cuts_at_the_first_stop_and_drops_special_text(tokenizer):
    fmt = fmt_for(tokenizer)
    ids = tokenizer("Bo is late.", add_special_tokens=False)["input_ids"]
    assert fmt.decode(ids + [fmt.end_of_turn] + ids) == "Bo is late."
    assert fmt.decode(tokenizer("<|begin_of_text|>Bo is late.", add_special_tokens=False)["input_ids"]) == "Bo is late."


def test_a_tokenizer_without_a_chat_template_names_the_config_key(tmp_path):
    from samsum_qlora import modeling
    from samsum_qlora.config import ModelArgs

    tok = build_tokenizer("llama3")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no chat template; set model.chat_template"):
        modeling.load_tokenizer(ModelArgs(name=str(tmp_path / "m")))
    (tmp_path / "t.jinja").write_text(SPECS["smollm2"].chat_template)
    given = modeling.load_tokenizer(ModelArgs(name=str(tmp_path / "m"), chat_template=str(tmp_path / "t.jinja")))
    assert given.chat_template == SPECS["smollm2"].chat_template
    with pytest.raises(UserError, match="model.chat_template: nope.jinja is not a file"):
        modeling.load_tokenizer(ModelArgs(name=str(tmp_path / "m"), chat_template="nope.jinja"))


def test_a_template_that_never_closes_the_turn_is_refused():
    tok = build_tokenizer("smollm2")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="closes the assistant's turn with no special token.*model.chat_template"):
        fmt_for(tok)


# --- six families: each template's own rules, one mask rule ---------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, build_tokenizer(request.param)


def test_family_mask_rule(family):
    """Labels train exactly what the template writes after the generation prompt: the summary, the
    token that closes the turn, and what follows it in that turn; never the prompt."""
    name, tok = family
    fmt = fmt_for(tok)
    enc = fmt.encode(DIALOGUE, SUMMARY)
    prompt = fmt.prompt(DIALOGUE)
    n_prompt = len(prompt)
    assert enc.input_ids[:n_prompt] == prompt and enc.labels[:n_prompt] == [chat.IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    # what is trained is the rendered completion, token for token
    messages = fmt.messages(DIALOGUE, SUMMARY)
    full_text = tok.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024")
    prompt_text = tok.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True, date_string="26 Jul 2024"
    )
    completion = full_text[len(prompt_text) :]
    # token for token up to whitespace, which Phi-3's turn markers swallow when they are decoded
    assert "".join(tok.decode(trained(enc)).split()) == "".join(completion.split())
    assert completion.lstrip().startswith(SUMMARY.strip())
    closing = tok.convert_tokens_to_ids(SPECS[name].closes_turn)
    summary_ids = trained(enc)
    assert fmt.end_of_turn == closing and closing in summary_ids
    assert summary_ids.count(closing) == 1  # closed once; nothing of another turn is trained


def test_family_stop_ids_pad_and_system_role(family):
    name, tok = family
    spec = SPECS[name]
    eos_ids = [tok.convert_tokens_to_ids(t) for t in spec.generation_eos]
    fmt = chat.ChatFormat.build(tok, DataArgs(), eos_ids)
    assert fmt.stop_ids[0] == tok.convert_tokens_to_ids(spec.closes_turn)
    assert set(eos_ids) <= set(fmt.stop_ids) and tok.convert_tokens_to_ids(spec.eos) in fmt.stop_ids
    expected_pad = tok.convert_tokens_to_ids(spec.pad) if spec.pad else fmt.pad_id
    assert fmt.pad_id == expected_pad and fmt.pad_id is not None
    assert fmt.system_role == (name != "gemma")  # Gemma's template raises on a system message
    rendered = tok.decode(fmt.prompt(DIALOGUE))
    assert DataArgs().task_instruction in rendered  # as a system message, or opening the user turn


def test_family_bos_comes_from_the_template_only(family):
    name, tok = family
    enc = fmt_for(tok).encode(DIALOGUE, SUMMARY)
    bos = tok.bos_token_id
    if name in ("llama3", "gemma", "mistral"):
        assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 1
    elif name == "smollm2":  # ChatML: the BOS string opens every turn
        assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 3
    else:  # Qwen2.5 and Phi-3: no BOS at all
        assert bos is None or bos not in enc.input_ids


def test_family_prediction_has_no_special_text(family):
    name, tok = family
    fmt = fmt_for(tok)
    text = fmt.decode(trained(fmt.encode(DIALOGUE, SUMMARY)))
    assert text == SUMMARY.strip()


def test_mistral_template_without_system_role_puts_the_task_in_the_user_turn():
    tok = build_tokenizer("mistral")
    tok.chat_template = MISTRAL_V02_ORIGINAL_TEMPLATE
    fmt = fmt_for(tok)
    assert not fmt.system_role
    assert fmt.messages("A: hi")[0]["content"].startswith(DataArgs().task_instruction + "\n\nA: hi")
    assert trained(fmt.encode(DIALOGUE, SUMMARY))[-1] == tok.eos_token_id  # </s> closes the answer


def test_family_truncation_keeps_the_summary(family):
    name, tok = family
    long_dialogue = "\n".join(f"Ana: message number {i} about the weekend" for i in range(300))
    full = fmt_for(tok, max_length=100_000).encode(long_dialogue, SUMMARY)
    enc = fmt_for(tok, max_length=300).encode(long_dialogue, SUMMARY)
    assert len(enc.input_ids) <= 300 and enc.truncated and trained(enc) == trained(full)


# --- the real Llama 3 tokenizer on the real SAMSum validation rows --------------------------------


@pytest.mark.parametrize("max_length", [1024, 128])
def test_reference_validation_trained_tokens_decode_to_summary(reference_tokenizer, max_length):
    tok = reference_tokenizer
    fmt = fmt_for(tok, max_length=max_length)
    kept = 0
    for row in data.load_rows(str(REFERENCE / "samsum"), "validation"):
        enc = fmt.encode(row["dialogue"], row["summary"])
        if enc is None:
            assert max_length == 128  # only a summary that cannot fit with the template may be dropped
            continue
        kept += 1
        assert len(enc.input_ids) <= max_length
        assert enc.input_ids.count(tok.bos_token_id) == 1
        text = tok.decode(trained(enc), clean_up_tokenization_spaces=False)
        assert text == chat.clean(row["summary"]) + "<|eot_id|>", row["id"]
    assert kept > 700


def test_a_chat_template_file_that_is_not_utf8_is_one_line_naming_its_line(tmp_path):
    from conftest import set_args, smoke_overrides
    from test_cli import one_line_error, runner

    from samsum_qlora.commands.cli import main

    template = tmp_path / "latin1.jinja"
    template.write_bytes("{# Vorlage #}\n{# für Llama #}\n{{ messages }}".encode("latin-1"))  # a traceback before
    with pytest.raises(UserError, match=r"latin1.jinja line 2 is not UTF-8 \(byte 0xfc\): save it as UTF-8"):
        chat.read_template(str(template))
    args = set_args(smoke_overrides(tmp_path, **{"model.chat_template": str(template)}))
    one_line_error(runner().invoke(main, ["summarize", "--base-only", *args], input="A: hi"), "line 2 is not UTF-8")
