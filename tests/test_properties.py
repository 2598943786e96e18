"""Random dialogues and summaries through the preprocessing: it never crashes, and the mask rule
holds for every row it keeps."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samsum_qlora import chat
from samsum_qlora.config import DataArgs

NAMES = st.sampled_from(["Ana", "Bo", "Dr. Who: The 2nd", "李雷", "José", "O'Neil", "a:b:c", "😀"])
PIECES = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs",)),
    st.sampled_from(["\n", "\r\n", "\r", " ", ":", "😀", "🇵🇱", "<|eot_id|>", "<|begin_of_text|>"]),
)
TEXT = st.lists(PIECES, max_size=60).map("".join)
TURN = st.one_of(st.tuples(NAMES, TEXT).map(lambda t: f"{t[0]}: {t[1]}"), st.just(""), TEXT.map(lambda t: t * 20))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    dialogue=st.lists(TURN, max_size=12),
    newline=st.sampled_from(["\n", "\r\n"]),
    summary=TEXT,
    max_length=st.integers(min_value=100, max_value=600),
)
def test_mask_rule_holds_for_every_kept_row(tokenizer, dialogue, newline, summary, max_length):
    fmt = chat.ChatFormat.build(tokenizer, DataArgs(max_length=max_length))
    enc = fmt.encode(newline.join(dialogue), summary)
    plain_summary, plain_dialogue = fmt.plain(summary), fmt.plain(newline.join(dialogue))
    if enc is None:  # only empty text, or a summary that leaves no room for the dialogue's first token
        if plain_summary and plain_dialogue:
            first = tokenizer(plain_dialogue, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][
                0
            ][1]
            shortest = fmt.messages(plain_dialogue[:first], plain_summary)
            assert len(fmt.ids(fmt.render(shortest, False))) > max_length
        return
    assert len(enc.input_ids) == len(enc.labels) <= max_length
    assert enc.input_ids.count(tokenizer.bos_token_id) == 1 and enc.input_ids[0] == tokenizer.bos_token_id
    first = next(i for i, label in enumerate(enc.labels) if label != chat.IGNORE_INDEX)
    assert all(label == chat.IGNORE_INDEX for label in enc.labels[:first])
    assert enc.labels[first:] == enc.input_ids[first:]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert enc.labels[-1] == eot and eot not in enc.labels[first:-1]
    trained = tokenizer.decode(enc.labels[first:], clean_up_tokenization_spaces=False)
    assert trained == plain_summary + "<|eot_id|>"
