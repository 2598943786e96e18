"""report.html: the report as one page that opens from disk, with no network.

It holds the table with its intervals and the chart (the PNG, inline), each pair of evaluations
compared on the rows both scored, and a browser of the examples: one row per dialogue with the
reference and every model's summary, its per-row ROUGE and whether it ended, sortable, filterable
and linkable as `report.html#id=<row id>`.

Pure: evaluations in, an HTML string out. Text from the data never becomes markup: the static part
is escaped with html.escape, and the rows travel as JSON in a <script type="application/json">
block with <, >, &, U+2028 and U+2029 written as \\u escapes (no `</script>` in a dialogue can
close it), which the page's script reads and puts in the page with textContent only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections import Counter
from pathlib import Path
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


def render_page(evals: list[Evaluation], cis: list[dict[str, tuple[float, float]]], chart_png: bytes) -> str:
    """The whole page: one string, everything inline."""
    data = page_data(evals)
    pairs = paired_comparisons(evals, data["rows"])
    same_rows = len({tuple(key) for key in row_keys(evals)}) == 1
    chart = base64.b64encode(chart_png).decode("ascii")
    level = int(LEVEL * 100)
    return PAGE.format(
        css=CSS,
        script=SCRIPT,
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

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ROUGE on SAMSum — samsum-qlora report</title>
<style>{css}</style>
</head>
<body>
<header class="top"><h1>ROUGE on SAMSum</h1>
<p>{n_evals}, {n_rows} · written by <code>samsum-qlora report</code></p></header>
<main>
<section id="scores-section">
<h2>Scores</h2>
<div class="split">
<div>
{scores}
<p class="note">F-measure x100, mean over the examples; beneath it the {level}% bootstrap interval
({resamples} resamples of the examples, seed {seed}).</p>
{not_same}
{differs}
<details class="sources"><summary>Sources</summary><ul>{sources}</ul></details>
</div>
<figure><img alt="Bar chart of ROUGE-1, ROUGE-2 and ROUGE-L per evaluation with {level}% intervals"
src="data:image/png;base64,{chart}"></figure>
{curves}</div>
</section>
<section id="pairs-section">
<h2>Paired comparison</h2>
<p class="note">A − B on the rows both scored, A the tuned (or API) model where B is the base: the mean
difference x100 with its {level}% bootstrap interval (green or red where the interval leaves out 0), on
how many rows A's ROUGE-L beats, ties or trails B's, and the share of each one's summaries that ended at
the end of turn (the rest ran to eval.max_new_tokens). <span class="better">better</span> marks the one
ahead on ROUGE-1 by more than the interval.</p>
{pairs}
</section>
<section id="examples-section">
<h2>Examples</h2>
<div class="toolbar">
<label>Sort <select id="sort"></select></label>
<label>by <select id="metric"></select></label>
<button type="button" id="direction" title="Reverse the order">↓ high first</button>
<input type="search" id="filter" placeholder="Filter by text or id…" aria-label="Filter by text">
<label>Show <select id="ended"></select></label>
<span id="count" class="muted"></span>
</div>
<div class="scroller"><div id="examples" role="table" aria-label="Examples">
<div class="head" role="row"></div><div class="rows" role="rowgroup"></div></div></div>
<p class="note">Link to a row with <code>report.html#id=ROW_ID</code> (the id in the first column).</p>
</section>
</main>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d8dee4; --bg: #f6f8fa; --accent: #0969da;
  --up: #1a7f37; --down: #cf222e; --warn: #9a6700; font-size: 15px; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
  font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", "Noto Sans", Helvetica, Arial, sans-serif; }
header.top { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); background: var(--bg); }
header.top h1 { margin: 0 0 2px; font-size: 1.5rem; }
header.top p { margin: 0; color: var(--muted); }
main { padding: 8px 28px 40px; }
h2 { font-size: 1.15rem; margin: 26px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.88em; }
.split { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
.split > div { flex: 1 1 520px; min-width: 0; }  /* may shrink below its widest table, which scrolls */
figure { margin: 0; flex: 0 1 640px; }
figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; }
table.scores, table.pairs { font-size: 0.95rem; }
table.scores th, table.scores td, table.pairs th, table.pairs td { padding: 6px 12px;
  border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
table.scores th, table.pairs th { background: var(--bg); font-weight: 600; }
table.scores th, table.pairs th.num { white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.mean { display: block; font-weight: 600; }
.ci { display: block; font-size: 0.8em; color: var(--muted); white-space: nowrap; }
.diff.up .mean { color: var(--up); } .diff.down .mean { color: var(--down); }
.wtl .win { color: var(--up); font-weight: 600; } .wtl .loss { color: var(--down); font-weight: 600; }
.note { color: var(--muted); font-size: 0.88rem; max-width: 70em; }
.warn { color: var(--warn); }
.muted { color: var(--muted); }
.sources { font-size: 0.88rem; color: var(--muted); } .sources ul { margin: 4px 0; padding-left: 20px; }
.sources code { overflow-wrap: anywhere; }
button.link { border: 0; background: none; color: var(--accent); cursor: pointer; padding: 0; font: inherit; }
button.link:hover { text-decoration: underline; }
table.pairs button.link { white-space: nowrap; }
.toolbar { display: flex; flex-wrap: wrap; gap: 10px 16px; align-items: center; padding: 10px 12px;
  background: var(--bg); border: 1px solid var(--line); border-bottom: 0; border-radius: 6px 6px 0 0; }
.toolbar select, .toolbar input, .toolbar button#direction { font: inherit; font-size: 0.9rem; padding: 4px 8px;
  border: 1px solid var(--line); border-radius: 6px; background: #fff; }
.toolbar select { max-width: 24em; }
.toolbar input[type=search] { min-width: 260px; flex: 0 1 340px; }
.toolbar button#direction { cursor: pointer; }
.scroller { max-height: 78vh; overflow: auto; border: 1px solid var(--line); border-radius: 0 0 6px 6px; }
/* rows are grid boxes, not table rows, so that the browser can skip laying out those off screen
   (content-visibility): sorting or filtering a thousand rows then costs only the rows in view */
#examples { font-size: 0.9rem; min-width: fit-content; }
#examples .head, #examples .row { display: grid; grid-template-columns: 8.5em minmax(16em, 2.2fr)
  minmax(12em, 1.3fr) repeat(var(--models, 1), minmax(14em, 1.6fr)); }
#examples .head { position: sticky; top: 0; z-index: 1; background: var(--bg); font-weight: 600;
  border-bottom: 1px solid var(--line); box-shadow: 0 1px 2px rgba(0, 0, 0, 0.06); }
#examples .row { border-bottom: 1px solid var(--line); content-visibility: auto; contain-intrinsic-size: auto 150px; }
#examples .head > div, #examples .cell { padding: 8px 10px; min-width: 0; overflow-wrap: anywhere; }
#examples .row:hover { background: #fafbfc; }
#examples .row.target, #examples .row.target:hover { background: #fff8c5; }
.rowid a { color: var(--accent); text-decoration: none; font-family: ui-monospace, monospace; font-size: 0.85em; }
.rowid .pos, .rowid .sortval { display: block; color: var(--muted); font-size: 0.8em; }
.rowid .sortval { font-variant-numeric: tabular-nums; margin-top: 4px; }
.text { white-space: pre-wrap; }
.clamp { display: -webkit-box; -webkit-line-clamp: 7; -webkit-box-orient: vertical; overflow: hidden; }
.fold { margin-top: 4px; font-size: 0.82em; }
.absent { color: var(--muted); font-style: italic; }
.chips { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 6px; }
.chip { font-size: 0.75em; padding: 1px 6px; border-radius: 10px; font-variant-numeric: tabular-nums;
  border: 1px solid rgba(0, 0, 0, 0.06); white-space: nowrap; }
.chip.ended { color: var(--muted); background: none; }
.chip.runon { color: var(--warn); background: #fff8c5; border-color: #eed888; font-weight: 600; }
.better { font-size: 0.75em; padding: 1px 6px; border-radius: 10px; color: #fff; background: var(--up);
  white-space: nowrap; font-weight: 600; }
.wide { max-width: 100%; overflow-x: auto; }
table.differs { font-size: 0.88rem; margin: 4px 0 10px; }
table.differs th, table.differs td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left;
  overflow-wrap: anywhere; }
h3 { font-size: 1rem; margin: 14px 0 4px; }
/* a phone: tables scroll sideways inside their box, the page itself never does */
@media (max-width: 700px) {
  :root { font-size: 14px; }
  header.top, main { padding-left: 12px; padding-right: 12px; }
  .split > div { flex-basis: 100%; }
  table.scores th, table.scores td, table.pairs th, table.pairs td { padding: 4px 6px; }
  .toolbar input[type=search] { min-width: 0; flex: 1 1 100%; }
}
/* paper: no controls, every example in full, nothing cut at a scroll box */
@media print {
  :root { font-size: 11px; }
  header.top { background: none; }
  .toolbar, button.link, .fold, .sources { display: none; }
  .scroller, .wide { max-height: none; overflow: visible; border: 0; }
  .clamp { display: block; -webkit-line-clamp: none; overflow: visible; }
  #examples .head { position: static; box-shadow: none; }
  #examples .row { content-visibility: visible; break-inside: avoid; }
  .diff.up .mean, .diff.down .mean, .better { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
  section { break-inside: avoid-page; }
}
"""

SCRIPT = r"""
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const MODELS = DATA.models, METRICS = DATA.metrics, ROWS = DATA.rows;
  const $ = (id) => document.getElementById(id);
  const rowsBox = document.querySelector("#examples .rows");
  const sortSel = $("sort"), metricSel = $("metric"), endedSel = $("ended"), filterBox = $("filter");
  const dirButton = $("direction"), countEl = $("count");
  let descending = true;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  function cell(cls) {
    const node = el("div", "cell " + cls);
    node.setAttribute("role", "cell");
    return node;
  }
  function option(select, value, text) {
    const o = el("option", null, text);
    o.value = value;
    select.appendChild(o);
  }
  function pct(x) { return (100 * x).toFixed(2); }
  function short(metric) { return metric.replace("ROUGE-", "R"); }
  // white at 0 to a soft green at 1: higher is greener, nothing shouts
  function tint(x) { return "rgba(46, 160, 67, " + (0.06 + 0.42 * Math.max(0, Math.min(1, x))).toFixed(3) + ")"; }

  // a block of text from the data, folded when long; textContent only
  function foldable(text) {
    const box = el("div");
    const body = el("div", "text", text);
    box.appendChild(body);
    if (text.split("\n").length > 7 || text.length > 520) {
      body.classList.add("clamp");
      const toggle = el("button", "link fold", "show all");
      toggle.type = "button";
      toggle.addEventListener("click", () => {
        const folded = body.classList.toggle("clamp");
        toggle.textContent = folded ? "show all" : "show less";
      });
      box.appendChild(toggle);
    }
    return box;
  }

  function summaryCell(out) {
    const td = cell("summary");
    if (!out) { td.appendChild(el("div", "absent", "(not scored)")); return td; }
    td.appendChild(out.prediction ? foldable(out.prediction) : el("div", "absent", "(empty)"));
    const chips = el("div", "chips");
    out.scores.forEach((s, m) => {
      const chip = el("span", "chip score", short(METRICS[m]) + " " + pct(s));
      chip.style.background = tint(s);
      chip.title = METRICS[m] + " F-measure x100";
      chips.appendChild(chip);
    });
    if (out.ended === false) chips.appendChild(el("span", "chip runon", "did not end"));
    else if (out.ended === true) chips.appendChild(el("span", "chip ended", "ended"));
    td.appendChild(chips);
    return td;
  }

  function buildRow(row) {
    const tr = el("div", "row");
    tr.setAttribute("role", "row");
    tr.dataset.id = row.id;
    tr.dataset.key = row.key;
    const head = cell("rowid");
    const link = el("a", null, row.id);
    link.href = "#id=" + encodeURIComponent(row.id);
    head.appendChild(link);
    if (row.index !== null) head.appendChild(el("span", "pos", "row " + row.index));
    row.sortEl = el("span", "sortval");
    head.appendChild(row.sortEl);
    tr.appendChild(head);
    const dialogue = cell("dialogue");
    dialogue.appendChild(
      row.dialogue === null ? el("div", "absent", "(dialogue not recorded)") : foldable(row.dialogue));
    tr.appendChild(dialogue);
    const reference = cell("reference");
    reference.appendChild(foldable(row.reference));
    tr.appendChild(reference);
    row.out.forEach((out) => tr.appendChild(summaryCell(out)));
    row.tr = tr;
    row.haystack = [row.id, row.dialogue || "", row.reference]
      .concat(row.out.map((o) => (o ? o.prediction : ""))).join("\n").toLowerCase();
  }

  function buildControls() {
    const headRow = document.querySelector("#examples .head");
    document.getElementById("examples").style.setProperty("--models", String(MODELS.length));
    ["Row", "Dialogue", "Reference"].concat(MODELS.map((m) => m.short)).forEach((text, k) => {
      const th = el("div", null, text);
      th.setAttribute("role", "columnheader");
      if (k >= 3) th.title = MODELS[k - 3].label;
      headRow.appendChild(th);
    });
    option(sortSel, "order", "row order");
    MODELS.forEach((m, i) => option(sortSel, "model:" + i, m.short));
    option(sortSel, "best", "best of all models");
    MODELS.forEach((a, i) => MODELS.forEach((b, j) => {
      if (i !== j) option(sortSel, "diff:" + i + ":" + j, a.short + " − " + b.short);
    }));
    METRICS.forEach((name, m) => option(metricSel, String(m), name));
    metricSel.value = String(METRICS.length - 1);  // ROUGE-L
    option(endedSel, "", "all rows");
    option(endedSel, "any", "a summary did not end");
    MODELS.forEach((m, i) => option(endedSel, "model:" + i, m.short + " did not end"));
  }

  // the value a row is sorted by, or null where it has none (those go last)
  function sortValue(row, how, m) {
    if (how === "order") return null;
    const parts = how.split(":");
    if (parts[0] === "model") { const o = row.out[+parts[1]]; return o ? o.scores[m] : null; }
    if (parts[0] === "best") {
      const scored = row.out.filter((o) => o);
      return scored.length ? Math.max(...scored.map((o) => o.scores[m])) : null;
    }
    const a = row.out[+parts[1]], b = row.out[+parts[2]];
    return a && b ? a.scores[m] - b.scores[m] : null;
  }

  function keep(row, needle, ended) {
    if (needle && !row.haystack.includes(needle)) return false;
    if (ended === "any") return row.out.some((o) => o && o.ended === false);
    if (ended) { const o = row.out[+ended.split(":")[1]]; return Boolean(o) && o.ended === false; }
    return true;
  }

  function apply() {
    const how = sortSel.value, m = +metricSel.value, needle = filterBox.value.trim().toLowerCase();
    const ended = endedSel.value, sign = descending ? -1 : 1;
    metricSel.disabled = dirButton.disabled = how === "order";
    const shown = ROWS.filter((row) => keep(row, needle, ended));
    shown.forEach((row) => { row.value = sortValue(row, how, m); });
    if (how !== "order") {
      shown.sort((x, y) => {
        if (x.value === null || y.value === null) return (x.value === null) - (y.value === null);
        return sign * (x.value - y.value);
      });
    }
    // beside each row's id, the value it is sorted by: "RL 23.53", "best RL 40.00", "Δ RL +19.27"
    const prefix = ({ best: "best ", diff: "Δ " }[how.split(":")[0]] || "") + short(METRICS[m]) + " ";
    shown.forEach((row) => {
      const sign = how.startsWith("diff") && row.value >= 0 ? "+" : "";
      row.sortEl.textContent = row.value === null ? "" : prefix + sign + pct(row.value);
    });
    rowsBox.replaceChildren(...shown.map((row) => row.tr));
    countEl.textContent = shown.length + " of " + ROWS.length + " dialogues";
  }

  // report.html#id=ROW_ID: show that row, scroll to it, highlight it
  function followHash() {
    const match = /^#id=(.*)$/.exec(location.hash);
    if (!match) return;
    let id = match[1];
    try { id = decodeURIComponent(id); } catch (e) { /* a hand-typed "%": take it as written */ }
    const row = ROWS.find((r) => r.id === id);
    if (!row) return;
    if (!row.tr.isConnected) { filterBox.value = ""; endedSel.value = ""; apply(); }
    document.querySelectorAll("#examples .row.target").forEach((tr) => tr.classList.remove("target"));
    row.tr.classList.add("target");
    row.tr.scrollIntoView({ block: "center" });
  }

  buildControls();
  ROWS.forEach(buildRow);
  sortSel.addEventListener("change", apply);
  metricSel.addEventListener("change", apply);
  endedSel.addEventListener("change", apply);
  filterBox.addEventListener("input", apply);
  function setDirection(highFirst) {
    descending = highFirst;
    dirButton.textContent = descending ? "↓ high first" : "↑ low first";
    apply();
  }
  dirButton.addEventListener("click", () => setDirection(!descending));
  // the paired comparison's "browse A − B": the rows where A gains most come first
  document.querySelectorAll("button[data-a]").forEach((button) => button.addEventListener("click", () => {
    sortSel.value = "diff:" + button.dataset.a + ":" + button.dataset.b;
    setDirection(true);
    $("examples-section").scrollIntoView();
  }));
  window.addEventListener("hashchange", followHash);
  apply();
  followHash();
})();
"""
