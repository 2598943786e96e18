"""report.html: the report as one page that opens from disk, with no network.

It holds the table with its intervals and the chart (the PNG, inline), each pair of evaluations
compared on the rows both scored, and a browser of the examples: one row per dialogue with the
reference and every model's summary, its per-row ROUGE and whether it ended, sortable, filterable
and linkable as `report.html#id=<row id>`.

Pure: evaluations in, an HTML string out. The page's skeleton, style and script are files shipped in
samsum_qlora/assets/page/ (page.html, page.css, page.js). Text from the data never becomes markup: the
static part is escaped with html.escape, and the rows travel as JSON in a <script type="application/json">
block with <, >, &, U+2028 and U+2029 written as \\u escapes (no `</script>` in a dialogue can
close it), which the page's script reads and puts in the page with textContent only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
from collections import Counter
from importlib import resources
from pathlib import Path
from string import Template
from typing import Protocol

from samsum_qlora.metrics import LEVEL, RESAMPLES, SEED, SHOWN, paired_difference
from samsum_qlora.predictor import KIND_BASE  # the model a tuned one is compared against

TIE = 1e-9  # per-row ROUGE-L closer than this is a tie
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


class Evaluation(Protocol):
    """What the page reads of one re-scored eval folder (report.Scored)."""

    folder: Path
    model: str
    kind: str
    records: list[dict]  # predictions.jsonl as read: index, id, dialogue, reference, prediction, ended
    per_example: dict[str, list[float]]  # metric -> the score of each record, fractions 0-1
    # optional: facts (adapters, step, decoding, split: `report.facts`) and curve (training_curve.png bytes)

    def mean(self, metric: str) -> float: ...


def label(ev: Evaluation) -> str:
    return with_kind(ev.model, ev.kind)


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def with_kind(model: str, kind: str) -> str:
    """ "tiny-llama (QLoRA adapters)"; a model already told apart by its folder ("tiny-llama (eval)",
    `report.name_apart`) gets one pair of brackets: "tiny-llama (eval, QLoRA adapters)"."""
    return f"{model[:-1]}, {kind})" if model.endswith(")") and "(" in model else f"{model} ({kind})"


# --- the rows of every evaluation, matched (pure) ------------------------------------------------


def row_keys(evals: list[Evaluation]) -> list[list[str]]:
    """The key of each record, per evaluation, that matches rows across evaluations. Where every
    record has an index (the row's position in the split), the index with the id and the row's own
    text (its reference, and its dialogue where recorded): rows of one split pair up even when ids
    repeat, and rows of two different splits never do, even where ids are missing (the id is then
    the index, the same in every split). Otherwise the id, numbered from its second appearance on
    ("t1", "t1#2")."""
    if all(isinstance(r.get("index"), int) for ev in evals for r in ev.records):
        return [[f"{r['index']}:{r['id']}:{_content_digest(r)}" for r in ev.records] for ev in evals]
    keys = []
    for ev in evals:
        seen: Counter[str] = Counter()
        own = []
        for r in ev.records:
            ident = str(r["id"])
            seen[ident] += 1
            own.append(ident if seen[ident] == 1 else f"{ident}#{seen[ident]}")
        keys.append(own)
    return keys


def _content_digest(record: dict) -> str:
    text = [str(record.get("reference")), record["dialogue"] if isinstance(record.get("dialogue"), str) else ""]
    return hashlib.sha256("\0".join(text).encode()).hexdigest()[:16]


def example_rows(evals: list[Evaluation]) -> list[dict]:
    """One row per dialogue, in the order first seen (the first evaluation's, then rows only later
    ones scored): {key, id, index, dialogue (None where no record has it), reference, out}, where
    out[k] is evaluation k's {prediction, ended (None where not recorded), scores: [ROUGE-1, -2, -L]},
    or None where it did not score that row."""
    rows: dict[str, dict] = {}
    for k, (ev, keys) in enumerate(zip(evals, row_keys(evals))):
        for i, (key, record) in enumerate(zip(keys, ev.records)):
            row = rows.setdefault(key, _new_row(key, record, len(evals)))
            if row["dialogue"] is None and isinstance(record.get("dialogue"), str):
                row["dialogue"] = record["dialogue"]
            ended = record.get("ended")
            row["out"][k] = {
                "prediction": str(record["prediction"]),
                "ended": ended if isinstance(ended, bool) else None,
                "scores": [ev.per_example[metric][i] for metric, _ in SHOWN],
            }
    return list(rows.values())


def _new_row(key: str, record: dict, n_evals: int) -> dict:
    dialogue = record.get("dialogue")
    index = record.get("index")
    return {
        "key": key,
        "id": str(record["id"]),
        "index": index if isinstance(index, int) else None,
        "dialogue": dialogue if isinstance(dialogue, str) else None,
        "reference": str(record["reference"]),
        "out": [None] * n_evals,
    }


def oriented(evals: list[Evaluation], first: int, second: int) -> tuple[int, int]:
    """(a, b) for A − B: a tuned or API model minus the base model, whatever the order given;
    otherwise the later evaluation minus the earlier."""
    is_base = [ev.kind == KIND_BASE for ev in evals]
    if is_base[first] and not is_base[second]:
        return second, first
    if is_base[second] and not is_base[first]:
        return first, second
    return max(first, second), min(first, second)


def ended_share(outs: list[dict]) -> float | None:
    """The share of these summaries that ended at the end of turn (None where none says)."""
    known = [o["ended"] for o in outs if o and o["ended"] is not None]
    return sum(known) / len(known) if known else None


def better_of(diff: dict) -> str | None:
    """ "a" or "b": the one ahead on ROUGE-1 by more than the rows' spread (its interval leaves out 0)."""
    d = diff.get("rouge1")
    return None if not d else "a" if d["low"] > 0 else "b" if d["high"] < 0 else None


def paired_comparisons(evals: list[Evaluation], rows: list[dict], **bootstrap) -> list[dict]:
    """Each pair of evaluations (`oriented`: tuned minus base) on the rows both scored: the mean of
    A - B per metric with its bootstrap interval (metrics.paired_difference), how many rows A wins,
    ties and loses by per-row ROUGE-L, each side's share of summaries that ended, and the better one.
    {a, b (indices into evals), n, diff: {metric: {mean, low, high}} (empty when n is 0), wins, ties,
    losses, ended: [A's, B's], better: "a" | "b" | None}."""
    rouge_l = [m for m, _ in SHOWN].index("rougeL")
    out = []
    for second in range(len(evals)):
        for first in range(second + 1, len(evals)):
            a, b = oriented(evals, first, second)
            shared = [r for r in rows if r["out"][a] and r["out"][b]]
            both = [(r["out"][a]["scores"], r["out"][b]["scores"]) for r in shared]
            diff = {}
            if both:
                diff = {
                    metric: paired_difference([x[m] for x, _ in both], [y[m] for _, y in both], **bootstrap)
                    for m, (metric, _) in enumerate(SHOWN)
                }
            deltas = [x[rouge_l] - y[rouge_l] for x, y in both]
            out.append(
                {
                    "a": a,
                    "b": b,
                    "n": len(both),
                    "diff": diff,
                    "wins": sum(d > TIE for d in deltas),
                    "ties": sum(abs(d) <= TIE for d in deltas),
                    "losses": sum(d < -TIE for d in deltas),
                    "ended": [ended_share([r["out"][k] for r in shared]) for k in (a, b)],
                    "better": better_of(diff),
                }
            )
    return out


def short_labels(evals: list[Evaluation]) -> list[str]:
    """Labels for narrow places (column heads, menus): a model path or Hub id loses its folders
    ("tiny-llama (base)"), unless that would make two labels equal."""
    short = [with_kind(ev.model.rstrip("/").rsplit("/", 1)[-1] or ev.model, ev.kind) for ev in evals]
    return short if len(set(short)) == len(short) else [label(ev) for ev in evals]


def page_data(evals: list[Evaluation]) -> dict:
    """What the page's script renders: the models and the matched rows."""
    models = [
        {"label": label(ev), "short": short, "model": ev.model, "kind": ev.kind, "n": len(ev.records)}
        for ev, short in zip(evals, short_labels(evals))
    ]
    return {"metrics": [name for _, name in SHOWN], "models": models, "rows": example_rows(evals)}


def script_json(data) -> str:
    """JSON that is safe inside <script type="application/json">: no `<`, `>` or `&` (so no
    `</script>` or `<!--`), and no U+2028/U+2029, which older JavaScript parsers read as line ends."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escaped in _JSON_ESCAPES.items():
        text = text.replace(char, escaped)
    return text


# --- the page --------------------------------------------------------------------------------------


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def scores_table(evals: list[Evaluation], cis: list[dict[str, tuple[float, float]]]) -> str:
    """The markdown table's numbers: the mean x100 with its interval beneath, 2 decimals."""
    head = "".join(f"<th>{name}</th>" for _, name in SHOWN)
    lines = [
        '<div class="wide"><table class="scores"><thead><tr><th>Model</th><th>Type</th><th>n</th>'
        f'{head}<th title="summaries that ended at the end of turn">ended</th></tr></thead><tbody>'
    ]
    for ev, ci in zip(evals, cis):
        cells = "".join(
            f'<td class="num" data-metric="{metric}"><span class="mean">{_pct(ev.mean(metric))}</span>'
            f'<span class="ci">{_pct(ci[metric][0])} – {_pct(ci[metric][1])}</span></td>'
            for metric, _ in SHOWN
        )
        share = ended_share(
            [{"ended": r.get("ended") if isinstance(r.get("ended"), bool) else None} for r in ev.records]
        )
        lines.append(
            f'<tr><td title="{_e(ev.folder)}">{_e(ev.model)}</td><td>{_e(ev.kind)}</td>'
            f'<td class="num">{len(ev.records)}</td>{cells}<td class="num">{_share(share)}</td></tr>'
        )
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def pairs_table(evals: list[Evaluation], pairs: list[dict]) -> str:
    """One row per pair: the mean difference (x100) with its interval, wins / ties / losses."""
    head = "".join(f'<th class="num">Δ {name}</th>' for _, name in SHOWN)
    lines = [
        '<div class="wide"><table class="pairs"><thead><tr><th>A</th><th>B</th><th>rows</th>'
        f"{head}<th>A wins / ties / loses<br><small>by per-row ROUGE-L</small></th>"
        "<th>ended<br><small>A / B</small></th><th></th></tr></thead><tbody>"
    ]
    for p in pairs:
        a, b = evals[p["a"]], evals[p["b"]]
        if not p["n"]:
            cells = f'<td colspan="{len(SHOWN) + 2}" class="muted">no rows in common</td><td></td>'
        else:
            cells = "".join(_diff_cell(p["diff"][metric]) for metric, _ in SHOWN)
            cells += (
                f'<td class="num wtl"><span class="win">{p["wins"]}</span> / {p["ties"]} / '
                f'<span class="loss">{p["losses"]}</span></td>'
                f'<td class="num">{_share(p["ended"][0])} / {_share(p["ended"][1])}</td>'
                f'<td><button type="button" class="link" data-a="{p["a"]}" data-b="{p["b"]}">browse A − B</button></td>'
            )
        names = [f"{_e(label(ev))}{BETTER if p['better'] == side else ''}" for ev, side in ((a, "a"), (b, "b"))]
        lines.append(f"<tr><td>{names[0]}</td><td>{names[1]}</td><td class='num'>{p['n']}</td>{cells}</tr>")
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


BETTER = ' <span class="better" title="ahead on ROUGE-1 by more than the rows\' spread">better</span>'


def differences(evals: list[Evaluation]) -> str:
    """A table of what differs between the evaluations (adapters, step, decoding, split): only the
    facts whose values are not the same for all; nothing for one evaluation or identical ones."""
    known = [getattr(ev, "facts", {}) for ev in evals]
    keys = [k for k in FACTS if len({f.get(k, "–") for f in known}) > 1]
    if len(evals) < 2 or not keys:
        return ""
    head = "".join(f"<th>{_e(FACTS[k])}</th>" for k in keys)
    lines = [f'<div class="wide"><table class="differs"><thead><tr><th>Evaluation</th>{head}</tr></thead><tbody>']
    for ev, f in zip(evals, known):
        cells = "".join(f"<td>{_e(f.get(k, '–'))}</td>" for k in keys)
        lines.append(f"<tr><td>{_e(label(ev))}</td>{cells}</tr>")
    lines.append("</tbody></table></div>")
    return "<h3>What differs between them</h3>\n" + "\n".join(lines)


FACTS = {"adapters": "adapters", "step": "adapters' step", "decoding": "decoding", "split": "split"}


def _diff_cell(d: dict[str, float]) -> str:
    """Signed, x100; tinted where the interval leaves out 0."""
    tone = "up" if d["low"] > 0 else "down" if d["high"] < 0 else "flat"
    return (
        f'<td class="num diff {tone}"><span class="mean">{100 * d["mean"]:+.2f}</span>'
        f'<span class="ci">{100 * d["low"]:+.2f} – {100 * d["high"]:+.2f}</span></td>'
    )


def training_curves(evals: list[Evaluation]) -> str:
    """The training run's picture (loss and validation ROUGE against steps) of each evaluation whose
    adapters have one beside them, once per picture."""
    shown, out = set(), []
    for ev in evals:
        png = getattr(ev, "curve", None)
        if png and png not in shown:
            shown.add(png)
            out.append(
                f'<figure><img alt="Training loss and validation ROUGE against steps for {_e(label(ev))}" '
                f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
                f"<figcaption>How {_e(label(ev))} was trained</figcaption></figure>"
            )
    return "\n".join(out)


@functools.cache
def page_file(name: str) -> str:
    """page.html (the skeleton, with $names to fill), page.css or page.js, as the package ships them."""
    # one name per joinpath: several at once need Python 3.11 in every resource reader
    folder = resources.files("samsum_qlora").joinpath("assets").joinpath("page")
    return folder.joinpath(name).read_text(encoding="utf-8")


def render_page(evals: list[Evaluation], cis: list[dict[str, tuple[float, float]]], chart_png: bytes) -> str:
    """The whole page: one string, everything inline."""
    data = page_data(evals)
    pairs = paired_comparisons(evals, data["rows"])
    same_rows = len({tuple(key) for key in row_keys(evals)}) == 1
    chart = base64.b64encode(chart_png).decode("ascii")
    level = int(LEVEL * 100)
    # one pass: a `$` in what fills page.html's $names (the script's, a dialogue's) is never read as a name
    return Template(page_file("page.html")).substitute(
        css=page_file("page.css"),
        script=page_file("page.js"),
        n_evals=counted(len(evals), "evaluation"),
        n_rows=counted(len(data["rows"]), "dialogue"),
        scores=scores_table(evals, cis),
        level=level,
        resamples=RESAMPLES,
        seed=SEED,
        not_same="" if same_rows else NOT_SAME,
        differs=differences(evals),
        sources="".join(f"<li><code>{_e(ev.folder)}</code> — {_e(label(ev))}</li>" for ev in evals),
        chart=chart,
        curves=training_curves(evals),
        pairs=pairs_table(evals, pairs) if pairs else '<p class="muted">One evaluation: nothing to compare.</p>',
        data=script_json(data),
    )


NOT_SAME = (
    '<p class="warn">These evaluations did not score the same examples, so their rows are not directly '
    "comparable; the paired comparison below uses only the rows both scored.</p>"
)
