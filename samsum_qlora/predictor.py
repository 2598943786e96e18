"""What a predictor is: the contract between what writes an evaluation's summaries (our model,
`summarizer.local_predictor`; an API model, `api.predictor`) and the evaluation that saves, resumes
and scores them (`predictions`, the `eval` command). Plain types, so each side imports them and
neither imports the other: scoring and reporting never reach the model's side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# What an evaluation scored, as metrics.json's "type" says: eval writes it, report orders and pairs by it.
KIND_BASE, KIND_QLORA, KIND_API = "base", "QLoRA adapters", "API"


@dataclass
class Prediction:
    text: str
    ended: bool  # the model closed its turn (or the API said "stop"), rather than running out of tokens
    truncated: bool = False  # the dialogue's tail was cut to fit data.max_length tokens


# A predictor writes a summary for each of `rows` (any order, any batching) and reports each
# finished batch through `save(positions in rows, predictions)`; it may return extra metrics.
Save = Callable[[list[int], list[Prediction]], None]
Predict = Callable[[list[dict], Save], "dict | None"]
