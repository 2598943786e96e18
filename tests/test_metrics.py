import pytest

from samsum_qlora.metrics import results_table, rouge, rouge_per_example


def test_rouge1_by_hand():
    # 5 shared unigrams (the, cat, on, the, mat) of 6 on each side: P = R = F = 5/6.
    scores = rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores["rouge1"] == pytest.approx(5 / 6)
    # bigrams: (the cat) (on the) (the mat) shared of 5 each: 3/5
    assert scores["rouge2"] == pytest.approx(3 / 5)


def test_stemmer_is_on():
    # "running" and "runs" share the stem "run" only with the Porter stemmer.
    assert rouge(["she runs"], ["she running"])["rouge1"] == pytest.approx(1.0)


def test_mean_of_per_example_fmeasure_equals_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["Amanda baked cookies for Jerry.", "Tom will call later.", ""]
    refs = ["Amanda baked cookies and will bring Jerry some tomorrow.", "Tom is calling Anna tonight.", "Nothing."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {
        t: sum(scorer.score(r, p)[t].fmeasure for p, r in zip(preds, refs)) / 3
        for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    }
    assert rouge(preds, refs) == pytest.approx(expected)
    assert rouge_per_example(preds, refs)["rouge1"][2] == 0.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        rouge(["a"], ["a", "b"])


def test_table_in_the_seed_format():
    table = results_table([("Llama-3.2-1B-Instruct", "base", {"rouge1": 0.35123, "rouge2": 0.1304, "rougeL": 0.27256})])
    assert table == (
        "| Model | Type | ROUGE-1 | ROUGE-2 | ROUGE-L |\n"
        "|---|---|---|---|---|\n"
        "| Llama-3.2-1B-Instruct | base | 35.12 | 13.04 | 27.26 |"
    )
