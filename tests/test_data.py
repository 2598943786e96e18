import csv
import json

import pytest

from samsum_qlora import data
from samsum_qlora.config import DEFAULT_INSTRUCTION
from samsum_qlora.errors import UserError

from conftest import REFERENCE, SAMPLE_DATA

DATE = "26 Jul 2024"
DIALOGUE = "Ana: are we still on for lunch?\r\nBo: yes, 12:30 at the usual place\r\nAna: great, see you"
SUMMARY = "Ana and Bo will have lunch at 12:30 at their usual place. "


def encode(tokenizer, dialogue=DIALOGUE, summary=SUMMARY, max_length=512, date=DATE):
    return data.encode_example(
        tokenizer, dialogue, summary, instruction=DEFAULT_INSTRUCTION, max_length=max_length, date_string=date
    )


def trained(enc):
    return [t for t, label in zip(enc.input_ids, enc.labels) if label != data.IGNORE_INDEX]


def test_trained_tokens_are_exactly_summary_plus_end_of_turn(tokenizer):
    enc = encode(tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    expected = tokenizer(SUMMARY.strip(), add_special_tokens=False)["input_ids"] + [eot]
    assert trained(enc) == expected
    # and the trained span is one contiguous tail: nothing of the prompt leaks in
    first = next(i for i, label in enumerate(enc.labels) if label != data.IGNORE_INDEX)
    assert all(label == data.IGNORE_INDEX for label in enc.labels[:first])
    assert enc.labels[first:] == enc.input_ids[first:]


def test_prompt_tokens_equal_generation_prompt(tokenizer):
    enc = encode(tokenizer)
    prompt = data.encode_prompt(tokenizer, DIALOGUE, instruction=DEFAULT_INSTRUCTION, max_length=512, date_string=DATE)
    n_prompt = sum(label == data.IGNORE_INDEX for label in enc.labels)
    assert enc.input_ids[:n_prompt] == prompt  # eval sees exactly what training conditioned on


def test_exactly_one_bos(tokenizer):
    enc = encode(tokenizer)
    bos = tokenizer.bos_token_id
    assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 1


def test_date_is_pinned_not_today(tokenizer):
    enc = encode(tokenizer, date="01 Jan 2030")
    text = tokenizer.decode(enc.input_ids)
    assert "Today Date: 01 Jan 2030" in text
    assert encode(tokenizer).input_ids == encode(tokenizer).input_ids


def test_crlf_normalised(tokenizer):
    text = tokenizer.decode(encode(tokenizer).input_ids)
    assert "\r" not in text and "Bo: yes, 12:30 at the usual place\nAna: great" in text


def test_truncation_shortens_dialogue_never_summary(tokenizer):
    long_dialogue = "\n".join(f"Ana: message number {i} about the weekend plans" for i in range(200))
    full = encode(tokenizer, dialogue=long_dialogue, max_length=100_000)
    enc = encode(tokenizer, dialogue=long_dialogue, max_length=250)
    assert len(full.input_ids) > 250
    assert len(enc.input_ids) <= 250 and enc.truncated
    assert trained(enc) == trained(full)  # the whole summary + <|eot_id|> survives
    assert "message number 0 " in tokenizer.decode(enc.input_ids)  # the start of the dialogue is kept


def test_row_whose_summary_cannot_fit_is_dropped(tokenizer):
    assert encode(tokenizer, summary="word " * 300, max_length=64) is None


def test_empty_rows_are_skipped_and_counted(tokenizer):
    examples = [
        {"id": "1", "dialogue": DIALOGUE, "summary": SUMMARY},
        {"id": "2", "dialogue": "  ", "summary": SUMMARY},
        {"id": "3", "dialogue": DIALOGUE, "summary": ""},
        {"id": "4", "dialogue": DIALOGUE, "summary": "word " * 300},
    ]
    columns, stats = data.encode_rows(
        tokenizer, examples, instruction=DEFAULT_INSTRUCTION, max_length=200, date_string=DATE, progress=False
    )
    assert columns["id"] == ["1"]
    assert (stats.kept, stats.skipped_empty, stats.dropped_too_long) == (1, 2, 1)


def test_pad_token_is_never_end_of_turn(tokenizer):
    pad = data.pad_token_id(tokenizer)
    assert pad == tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert pad != tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_collator_pads_right_and_masks_padding(tokenizer):
    a, b = encode(tokenizer), encode(tokenizer, summary="Short.")
    pad = data.pad_token_id(tokenizer)
    batch = data.PadToLongest(pad)([{"input_ids": a.input_ids, "labels": a.labels},
                                    {"input_ids": b.input_ids, "labels": b.labels}])
    n = len(b.input_ids)
    assert batch["input_ids"].shape == (2, max(len(a.input_ids), n))
    assert batch["input_ids"][1, n:].tolist() == [pad] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][1, n:].eq(data.IGNORE_INDEX).all()
    assert batch["attention_mask"][1].sum().item() == n


def test_batch_without_trained_tokens_is_an_error():
    with pytest.raises(ValueError, match="no trained token"):
        data.PadToLongest(0)([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])


# --- loading ---


def test_loads_shipped_sample():
    ds = data.load_split(str(SAMPLE_DATA), "train")
    assert len(ds) == 60 and {"dialogue", "summary"} <= set(ds.column_names)


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_split(str(tmp_path / "nope"), "train")


def test_missing_split(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"dialogue": "a", "summary": "b"}) + "\n")
    with pytest.raises(UserError, match=r"no 'test' split in .*found train.jsonl"):
        data.load_split(str(tmp_path), "test")


def test_missing_column(tmp_path):
    with (tmp_path / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["id", "dialogue", "abstract"], ["1", "A: hi", "A greets."]])
    with pytest.raises(UserError, match=r"train.csv has no column summary"):
        data.load_split(str(tmp_path), "train")


def test_empty_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(UserError, match="train.jsonl is empty"):
        data.load_split(str(tmp_path), "train")


def test_csv_with_numeric_ids_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"id": [13, 14], "dialogue": ["A: hi", "B: yo"], "summary": ["A greets.", "B greets."]})
    frame.to_parquet(tmp_path / "train.parquet")
    assert data.rows(data.load_split(str(tmp_path), "train"))[0] == {"id": "13", "dialogue": "A: hi", "summary": "A greets."}


# --- the real tokenizer and real SAMSum rows (skipped where ../shared/reference is absent) ---


@pytest.mark.parametrize("max_length", [1024, 128])
def test_reference_validation_trained_tokens_decode_to_summary(reference_tokenizer, max_length):
    ds = data.load_split(str(REFERENCE / "samsum"), "validation")
    tok = reference_tokenizer
    kept = 0
    for row in data.rows(ds):
        enc = encode(tok, row["dialogue"], row["summary"], max_length=max_length)
        if enc is None:
            # only a summary that cannot fit with the template may be dropped
            assert max_length == 128
            continue
        kept += 1
        assert len(enc.input_ids) <= max_length
        assert enc.input_ids.count(tok.bos_token_id) == 1
        text = tok.decode(trained(enc), clean_up_tokenization_spaces=False)
        assert text == data.clean(row["summary"]) + "<|eot_id|>", row["id"]
    assert kept > 700
