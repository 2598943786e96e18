"""ROUGE from strings and the results table. Pure, CPU-only."""

from __future__ import annotations

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SHOWN = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))  # the tutorial's columns
RESAMPLES, SEED, LEVEL = 1000, 0, 0.95  # bootstrap: resamples, their seed, the interval's level


def rouge_per_example(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """F-measure of each prediction against its reference, stemmer on: what
    `evaluate.load("rouge")` computes with `use_aggregator=False, use_stemmer=True`."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {t: [s[t].fmeasure for s in scores] for t in ROUGE_TYPES}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def means(per_example: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each metric's per-example scores: what a table shows."""
    return {metric: mean(values) for metric, values in per_example.items()}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean per-example F-measure of each ROUGE type, as a fraction 0-1."""
    return means(rouge_per_example(predictions, references))


def bootstrap_interval(
    values: list[float], *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the examples with replacement.

    The same seed draws the same example indices for every evaluation of the same size, so rows
    scored on the same examples are compared on the same resamples."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to resample")
    rng = np.random.default_rng(seed)
    resampled = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(resampled, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_difference(a: list[float], b: list[float], **kwargs) -> dict[str, float]:
    """Mean of a - b over the same examples, with its bootstrap interval: whether two systems
    scored on the same rows differ by more than the rows' own spread."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} scores against {len(b)}")
    diff = [x - y for x, y in zip(a, b)]
    lo, hi = bootstrap_interval(diff, **kwargs)
    return {"mean": mean(diff), "low": lo, "high": hi}


def results_table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """The tutorial's Markdown table; rows are (model, type, metrics with fractions 0-1)."""
    lines = ["| Model | Type | " + " | ".join(label for _, label in SHOWN) + " |", "|---|---|" + "---|" * len(SHOWN)]
    for model, kind, m in rows:
        cells = [table_cell(model), table_cell(kind)] + [f"{100 * m[k]:.2f}" for k, _ in SHOWN]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_cell(text: str) -> str:
    """`text` as one cell of a Markdown table: a "|" would end the cell, a line break the row."""
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").split())
