"""ROUGE from strings and the results table. Pure, CPU-only."""

from __future__ import annotations

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_per_example(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """F-measure of each prediction against its reference, stemmer on: what
    `evaluate.load("rouge")` computes with `use_aggregator=False, use_stemmer=True`."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {t: [s[t].fmeasure for s in scores] for t in ROUGE_TYPES}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean per-example F-measure of each ROUGE type, as a fraction 0-1."""
    per_example = rouge_per_example(predictions, references)
    n = len(predictions)
    return {t: (sum(v) / n if n else 0.0) for t, v in per_example.items()}


def results_table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """The seed's Markdown table; rows are (model, type, metrics with fractions 0-1)."""
    lines = ["| Model | Type | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|---|"]
    for model, kind, m in rows:
        lines.append(
            f"| {model} | {kind} | {100 * m['rouge1']:.2f} | {100 * m['rouge2']:.2f} | {100 * m['rougeL']:.2f} |"
        )
    return "\n".join(lines)
