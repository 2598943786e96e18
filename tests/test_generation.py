"""Our greedy decoder computes what `model.generate` computes: same tokens, one prompt at a time
or left-padded in batches, for the trained tiny model and for each family's own architecture."""

import pytest
import torch
from chat_families import FAMILIES, build_family
from conftest import SAMPLE_DATA, SMOKE_CONFIG, smoke_overrides

from samsum_qlora import chat, data, generation, modeling
from samsum_qlora.config import DataArgs, load_config


def reference(model, prompt, fmt, budget):
    """The tutorial's loop: `generate`, one prompt, greedy, stopping at the end of turn."""
    return generation.generate_one(model, prompt, decoding(fmt, budget))


def decoding(fmt, budget):
    return generation.Decoding(budget, fmt.stop_ids, fmt.pad_id)


def ours(model, prompts, fmt, budget, **kw):
    return generation.decode_batch(model, prompts, decoding(fmt, budget), **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke recipe's adapters, merged into the base as eval merges them."""
    from samsum_qlora.commands.train import train_adapters

    out = tmp_path_factory.mktemp("gen")
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(out))
    train_adapters(cfg)
    model = modeling.load_generation_model(cfg.model, cfg.quantization, out / "run" / "lora_adapters", merge=True)
    fmt = chat.ChatFormat.build(modeling.load_tokenizer(cfg.model), cfg.data)
    prompts = [fmt.prompt(r["dialogue"]) for r in data.load_rows(str(SAMPLE_DATA), "test")]
    assert len({len(p) for p in prompts}) > 5  # really different lengths, so padding is exercised
    return model, fmt, prompts


def test_one_at_a_time_equals_generate(trained):
    model, fmt, prompts = trained
    for prompt in prompts:
        assert ours(model, [prompt], fmt, 24)[0] == reference(model, prompt, fmt, 24)


def test_batched_left_padded_equals_one_at_a_time(trained):
    """Batching must not change a greedy output: left padding, masks and stopping are per row."""
    model, fmt, prompts = trained
    single = [ours(model, [p], fmt, 24)[0] for p in prompts]
    assert ours(model, prompts, fmt, 24) == single
    # the layout a CUDA graph needs: attention over the whole preallocated cache, hidden by the mask,
    # after a prefill in one chunk, in chunks of several rows padded to their own longest, or row by row
    longest = max(map(len, prompts))
    for prefill_tokens in (10**6, 3 * longest, 1):
        assert ours(model, prompts, fmt, 24, full_view=True, prefill_tokens=prefill_tokens) == single
    assert any(len(d.ids) > 3 for d in single)  # it generated something to compare


def test_generate_deals_batches_and_reports_each(trained):
    from samsum_qlora import batching

    model, fmt, prompts = trained
    batches = batching.generation_batches([len(p) for p in prompts], max_rows=5, max_tokens=10**6, new_tokens=8)
    seen = {}
    generation.generate(
        model,
        prompts,
        batches,
        decoding(fmt, 8),
        graphs=True,
        on_batch=lambda idx, dec: seen.update(zip(idx, dec)),
        progress=False,
    )
    assert [len(b) for b in batches] == [5, 5, 2] and sorted(seen) == list(range(len(prompts)))
    assert seen == dict(enumerate(ours(model, prompts, fmt, 8)))  # graphs ask for CUDA; on a CPU, plain steps


def test_stopping_marks_ended_and_cuts_the_stop_token():
    stops = {7, 9}
    assert generation.cut([5, 6, 9, 7, 9], stops) == generation.Decoded([5, 6], True)
    assert generation.cut([7, 1], stops) == generation.Decoded([], True)
    assert generation.cut([5, 6], stops) == generation.Decoded([5, 6], False)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_architecture_decodes_as_generate(family, tmp_path):
    folder = build_family(family, tmp_path / family)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fmt = chat.ChatFormat.build(
        tok, DataArgs(max_length=256), modeling.generation_eos(modeling.ModelArgs(name=str(folder)))
    )
    rows = data.load_rows(str(SAMPLE_DATA), "test")[:4]
    prompts = [fmt.prompt(r["dialogue"]) for r in rows]
    single = [ours(model, [p], fmt, 12)[0] for p in prompts]
    assert single == [reference(model, p, fmt, 12) for p in prompts]
    assert ours(model, prompts, fmt, 12) == single
    assert ours(model, prompts, fmt, 12, full_view=True, prefill_tokens=2 * max(map(len, prompts))) == single


def test_decode_attention_groups_query_heads_as_repeat_kv_would():
    """One query token over a GQA cache: the grouped heads give the very attention that copying
    each KV head once per query head gives, head for head, padding mask included."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    rows, kv_heads, groups, keys, dim = 3, 2, 4, 10, 16
    query = torch.randn(rows, kv_heads * groups, 1, dim)
    key, value = torch.randn(rows, kv_heads, keys, dim), torch.randn(rows, kv_heads, keys, dim)
    mask = torch.rand(rows, 1, 1, keys) > 0.4
    mask[..., -1] = True
    out, _ = generation.decode_attention(SimpleNamespace(num_key_value_groups=groups), query, key, value, mask,
                                         scaling=0.25)  # fmt: skip
    # by hand: query head h reads KV head h // groups
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = (query @ k.transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf")).softmax(-1)
    assert out.shape == (rows, 1, kv_heads * groups, dim)
    torch.testing.assert_close(out, (weights @ v).transpose(1, 2))


def test_full_view_decodes_with_grouped_attention_and_restores_sdpa(trained, monkeypatch):
    model, fmt, prompts = trained
    calls = []
    real = generation.decode_attention
    monkeypatch.setattr(generation, "decode_attention", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    ours(model, prompts[:3], fmt, 4, full_view=True)
    assert any(shape[2] == 1 for shape in calls)  # the decoding steps went through it
    assert model.config._attn_implementation == "sdpa"


# --- decoding settings: greedy, sampling and beams on our decoder, the rest on transformers' generate --


def settings(fmt, budget, **kw):
    return generation.Decoding(budget, fmt.stop_ids, fmt.pad_id, **kw)


def test_greedy_through_the_generate_path_equals_our_decoder(trained):
    """num_beams=1 without sampling or repetition controls is greedy on either path."""
    model, fmt, prompts = trained
    assert settings(fmt, 24, num_beams=1).greedy and not settings(fmt, 24, num_beams=2).greedy
    assert generation.generate_batch(model, prompts, settings(fmt, 24)) == ours(model, prompts, fmt, 24)


@pytest.mark.parametrize(
    "kw",
    [
        {"num_beams": 4, "length_penalty": 0.5},
        {"num_beams": 3, "no_repeat_ngram_size": 3, "repetition_penalty": 1.3},
    ],
)
def test_generate_batch_equals_generate_one_prompt_at_a_time(trained, kw):
    """The slow path's left-padded batch against transformers' `generate`, one prompt at a time."""
    model, fmt, prompts = trained
    decoding = settings(fmt, 24, **kw)
    theirs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=list(fmt.stop_ids),
            pad_token_id=fmt.pad_id,
            **kw,
        )
        theirs.append(generation.cut(out[0, len(prompt) :].tolist(), set(fmt.stop_ids)))
    assert generation.generate_batch(model, prompts, decoding) == theirs
    assert theirs != ours(model, prompts, fmt, 24)  # the settings changed something


BEAMS = [
    {"num_beams": 4},
    {"num_beams": 4, "length_penalty": 0.5},
    {"num_beams": 4, "length_penalty": 2.0},
    {"num_beams": 2, "length_penalty": -1.0},
    {"num_beams": 3, "early_stopping": True},
    {"num_beams": 4, "length_penalty": 0.5, "early_stopping": True},
    {"num_beams": 3, "early_stopping": "never"},
    {"num_beams": 4, "length_penalty": 2.0, "early_stopping": "never"},
    {"num_beams": 4, "length_penalty": -0.5, "early_stopping": "never"},
]


def ending_at_full_stops(fmt, budget, **kw):
    """Decoding that also ends at a full stop (two stop ids: (1 + 2) x beams continuations kept per
    step). The tiny model's summaries rarely reach their end of turn in 24 tokens; its sentences end
    after 2 to 15, so hypotheses end early and at different lengths, where length penalty and early
    stopping act."""
    (full_stop,) = fmt.tokenizer.encode(".", add_special_tokens=False)
    return generation.Decoding(budget, (*fmt.stop_ids, full_stop), fmt.pad_id, **kw)


@pytest.mark.parametrize("kw", BEAMS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_beam_search_on_our_decoder_equals_generate(trained, kw):
    """Beam search on our decoder, left-padded batch, against transformers' `generate` on the same
    batch: the same hypotheses win, token for token, also in the layout a CUDA graph needs."""
    model, fmt, prompts = trained
    decoding = ending_at_full_stops(fmt, 24, **kw)
    theirs = generation.generate_batch(model, prompts, decoding)
    assert generation.decode_batch(model, prompts, decoding) == theirs
    longest = max(map(len, prompts))
    assert generation.decode_batch(model, prompts, decoding, full_view=True, prefill_tokens=3 * longest) == theirs
    greedy = generation.decode_batch(model, prompts, ending_at_full_stops(fmt, 24))
    assert theirs != greedy


def test_length_penalty_and_early_stopping_change_what_wins(trained):
    """The settings above act on these prompts: a lower length penalty, or early stopping, picks
    shorter summaries; "never" searches on for longer ones."""
    model, fmt, prompts = trained

    def total_length(**kw):
        return sum(len(d.ids) for d in generation.decode_batch(model, prompts, ending_at_full_stops(fmt, 24, **kw)))

    assert (
        total_length(num_beams=4, length_penalty=0.5)
        < total_length(num_beams=4)
        < total_length(num_beams=4, length_penalty=2.0)
    )
    assert (
        total_length(num_beams=3, early_stopping=True)
        < total_length(num_beams=3)
        < total_length(num_beams=3, early_stopping="never")
    )


def test_beam_search_one_prompt_alone_equals_generate_one_at_a_time(trained):
    model, fmt, prompts = trained
    decoding = settings(fmt, 24, num_beams=4, length_penalty=0.5)
    batched = generation.decode_batch(model, prompts, decoding)
    alone = [generation.decode_batch(model, [p], decoding)[0] for p in prompts]
    assert alone == [generation.generate_batch(model, [p], decoding)[0] for p in prompts]
    assert alone == batched  # left padding does not move a hypothesis on this model


def test_beam_steps_reorder_the_cache_rows(trained, monkeypatch):
    """Beams change places: a step's cache rows follow the beams they continue (not the identity)."""
    model, fmt, prompts = trained
    sources = []
    real = generation.SlotCache.reorder
    monkeypatch.setattr(
        generation.SlotCache, "reorder", lambda c, rows, start: sources.append(rows) or real(c, rows, start)
    )
    generation.decode_batch(model, prompts[:3], settings(fmt, 12, num_beams=4), full_view=True)
    identity = torch.arange(12)
    assert sources and any(not torch.equal(s, identity) for s in sources)
    assert all(torch.equal(s // 4, identity // 4) for s in sources)  # a beam continues a beam of its own prompt


@pytest.mark.parametrize("kw", [{"temperature": 1.5, "top_p": 0.95}, {"top_p": 0.8}, {"temperature": 0.7}, {}])
def test_sampling_on_our_decoder_draws_what_generate_draws(trained, kw):
    """Same seed, same logits, same warpers, same draws: token for token, batched and left-padded."""
    model, fmt, prompts = trained
    decoding = settings(fmt, 16, do_sample=True, seed=11, **kw)
    theirs = generation.generate_batch(model, prompts, decoding, seed=123)
    assert generation.decode_batch(model, prompts, decoding, seed=123) == theirs
    assert generation.decode_batch(model, prompts, decoding, seed=124) != theirs


def test_sampling_in_the_graph_layout_draws_from_the_warped_distribution(trained):
    """Where the logits may differ from `generate`'s in the last bits (the layout a CUDA graph needs),
    exact equality is not promised: the first token of one prompt drawn 3,000 times follows the
    temperature / top-p distribution (its 5 likeliest tokens, and the rest together), and never
    leaves the nucleus."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    model, fmt, prompts = trained
    decoding = settings(fmt, 1, do_sample=True, temperature=2.0, top_p=0.9, seed=5)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompts[0]])).logits[:, -1].float()
    probs = torch.softmax(TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(2.0)(None, logits)), -1)[0]
    drawn = generation.decode_batch(model, [prompts[0]] * 3000, decoding, full_view=True)
    tokens = torch.tensor([d.ids[0] if d.ids else fmt.stop_ids[0] for d in drawn])
    share = torch.bincount(tokens, minlength=len(probs)) / len(tokens)
    assert share[probs == 0].sum() == 0
    likeliest = probs.topk(5).indices
    rest = torch.ones_like(probs, dtype=torch.bool)
    rest[likeliest] = False
    expected = torch.cat([probs[likeliest], probs[rest].sum()[None]])
    seen = torch.cat([share[likeliest], share[rest].sum()[None]])
    assert expected[-1] > 0.1 and expected[0] > 0.05  # a real choice to make
    assert 0.5 * (seen - expected).abs().sum() < 0.05  # total variation; ~0.02 expected from 3,000 draws


def test_only_the_slow_settings_leave_our_decoder_and_say_so(trained, capsys, monkeypatch):
    model, fmt, prompts = trained
    called = []
    monkeypatch.setattr(generation, "generate_batch", lambda m, b, d, seed: called.append(d) or [None] * len(b))
    kinds = [
        {"num_beams": 4, "length_penalty": 0.5},
        {"do_sample": True, "top_p": 0.9},
        {"no_repeat_ngram_size": 3},
        {"num_beams": 2, "repetition_penalty": 1.2},
        {"num_beams": 2, "do_sample": True},
    ]
    said = []
    for kw in kinds:
        generation.generate(model, prompts, [[0, 1]], settings(fmt, 4, **kw), graphs=False, on_batch=lambda i, d: None,
                            progress=False)  # fmt: skip
        said.append(capsys.readouterr().err.strip())
    assert [d.num_beams for d in called] == [1, 2, 2]
    assert said[:2] == ["", ""]
    assert said[2:] == [
        "note: eval.no_repeat_ngram_size decodes on transformers' generate, slower than our decoder",
        "note: eval.repetition_penalty decodes on transformers' generate, slower than our decoder",
        "note: eval.do_sample with eval.num_beams > 1 (sampled beams) decodes on transformers' generate, slower "
        "than our decoder",
    ]


def test_seeded_sampling_repeats_whatever_else_is_batched(trained):
    """A sampled batch is seeded from eval.seed and its rows' keys: the same seed draws the same
    summaries, also when the batch is generated alone (as a resumed eval would), another differs;
    the caller's random state is left alone."""
    model, fmt, prompts = trained
    decoding = settings(fmt, 16, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    batches = [[0, 1, 2, 3], [4, 5, 6], [7, 8]]
    keys = [100 + i for i in range(len(prompts))]

    def run(decoding, chosen):
        seen = {}
        generation.generate(
            model, prompts, chosen, decoding, graphs=False, keys=keys, progress=False,
            on_batch=lambda idx, dec: seen.update(zip(idx, dec)),
        )  # fmt: skip
        return seen

    state = torch.random.get_rng_state()
    first = run(decoding, batches)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = run(decoding, batches[1:])  # the first batch done before an interruption
    assert again == {i: first[i] for i in again}
    other = run(settings(fmt, 16, do_sample=True, temperature=1.5, top_p=0.95, seed=8), batches)
    assert other != first
    greedy = dict(enumerate(ours(model, prompts, fmt, 16)))
    assert {i: greedy[i] for i in first} != first  # it really sampled
    # a nucleus of one token, or a temperature near 0, is greedy again
    for sharp in ({"top_p": 1e-6}, {"temperature": 1e-4}):
        assert run(settings(fmt, 16, do_sample=True, seed=7, **sharp), batches) == {i: greedy[i] for i in first}


def repeated_ngrams(ids, n):
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


def test_no_repeat_ngram_size_leaves_no_repeated_ngram(trained):
    model, fmt, prompts = trained
    greedy = ours(model, prompts, fmt, 48)
    assert sum(repeated_ngrams(d.ids, 2) for d in greedy) > 0  # greedy repeats itself
    capped = generation.generate_batch(model, prompts, settings(fmt, 48, no_repeat_ngram_size=2))
    assert all(repeated_ngrams(d.ids, 2) == 0 for d in capped) and any(len(d.ids) > 4 for d in capped)
